//! `dedup`: drops repeated records from files and pipes, exactly, within an
//! optional time window and across runs — the command-line face of
//! `tiered_dedup`. See `docs/cli.md` and `dedup --help`.

mod bench;
mod cli;
mod event_time;
mod fpr;
mod input;
mod json;
mod judge;
mod output;
mod parse;
mod record;
mod run;
mod serve;
mod settings;
mod state;
mod summary;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` print to standard output and succeed;
            // bad flags are errors with exit status 1 (2 means bad input).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::Fpr(args)) => fpr::run(&args),
        None => run::run(cli.run),
    }
}
