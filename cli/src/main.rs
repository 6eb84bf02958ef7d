//! `dedup`: drops repeated records from files and pipes, exactly, within an
//! optional time window and across runs — the command-line face of
//! `tiered_dedup`. See `docs/cli.md` and `dedup --help`.

/// `eprintln!` that never panics: a closed standard error loses the
/// message, not the run.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that never panics on a closed standard output.
#[macro_export]
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod bench;
mod cli;
mod event_time;
mod fpr;
mod input;
mod job;
mod json;
mod judge;
mod output;
mod parse;
mod record;
mod redis_cause;
mod run;
mod serve;
mod settings;
mod signals;
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
