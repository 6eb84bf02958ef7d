//! The command line: every flag, its default and its `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::json::Pointer;

/// The exit codes, shown at the end of `--help`.
const AFTER_HELP: &str = "\
Keys are exact: a record is a duplicate only when an earlier record with the \
same key was accepted less than the window ago (the window is anchored at the \
first accepted occurrence; duplicates do not extend it). Keys are compared by \
their 128-bit fingerprint in the namespace.

NDJSON keys: a string counts by its content, any other value by its JSON text \
(objects and arrays compact, with sorted member names), so \"7\" and 7 are the \
same key; a missing or null key is bad input.

Bad input (each counted in the summary, and reported as FILE:LINE: reason):
  not-utf8         an NDJSON record that is not UTF-8
  invalid-json     an NDJSON record that is not one JSON value
  missing-key      a --key pointer that is absent or null
  missing-time     the --time-field pointer is absent or null
  bad-time         a time that is neither RFC 3339 nor a non-negative number
  not-object       --output annotate on a record that is not a JSON object
  late             older than watermark - allowed lateness (event time only)
  future           later than --max-future past the watermark or the clock
  too-long         longer than --max-record-bytes (never written, even by pass)

Every record read is counted once: read = unique + duplicates + bad + \
unavailable (the exact tier could not judge it) + undelivered (judged, but \
standard output was closed or failed before it was written).

A last record without a final newline is written without one, unless more \
output follows it (then a newline separates them); `awk '!seen[$0]++'` always \
adds one.

SIGINT or SIGTERM stops a run gracefully: reading stops, what was read is \
judged and written, marks are written, --state is synced and the summary \
printed; a second signal ends the run at once. With --state (--durability os, \
the default) even SIGKILL loses nothing: a rerun writes exactly the records \
the killed run had not written.

Exit status (when several apply, the highest of 1-5; 130/143 only when none of
them does):
  0    every record was read and judged (bad ones skipped or passed as asked),
       or standard output was closed and nothing accepted was left undelivered
  1    another error: bad flags or configuration, an unreadable file, an
       unusable or busy --state
  2    bad input under --on-error fail (what was written before it is flushed)
  3    the exact tier (Redis) could not answer: the records it could not judge
       were neither written nor recorded, and the run stopped
  4    accepted records are not stored in the exact tier: a later run will
       accept them again (the message says how many and why)
  5    standard output was closed or failed after records were accepted
       (recorded) but before they were written (the message says which)
  130  stopped by SIGINT, 143 by SIGTERM (after the steps above)";

/// Drops repeated records from files and pipes: exactly, at millions of
/// records per second, optionally within a time window and across runs.
#[derive(Parser, Debug)]
#[command(
    name = "dedup",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// A sub-command instead of deduplicating.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// What to deduplicate and how.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Sub-commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Measures the engine's throughput on generated keys and prints a table.
    Bench(BenchArgs),
    /// Measures the filter's false-positive rate against its formulas; writes
    /// CSV and an SVG chart.
    Fpr(crate::fpr::FprArgs),
}

/// The deduplication job.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Files to read, in order; none, or `-`, reads standard input.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// How the input is cut into records: `lines` are the bytes up to each
    /// newline (any bytes); `ndjson` is one JSON value per line.
    #[arg(long, value_enum, default_value_t = Format::Lines)]
    pub format: Format,

    /// NDJSON: the key is the value at this JSON pointer (`/id`,
    /// `/meta/request_id`); repeat for a composite key. Default: the whole
    /// record.
    #[arg(long = "key", value_name = "POINTER", value_parser = Pointer::parse)]
    pub keys: Vec<Pointer>,

    /// Keys expire this long after their first accepted occurrence (`90s`,
    /// `15m`, `24h`, `7d`). Default: never (every earlier occurrence counts,
    /// like `sort -u`).
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    pub window: Option<Duration>,

    /// NDJSON: the event time of each record, at this JSON pointer: an RFC
    /// 3339 string, or a number of Unix seconds (fractions allowed; see
    /// --time-unit). Default: processing time.
    #[arg(long, value_name = "POINTER", value_parser = Pointer::parse)]
    pub time_field: Option<Pointer>,

    /// The unit of numeric event times.
    #[arg(long, value_enum, default_value_t = TimeUnit::S, requires = "time_field")]
    pub time_unit: TimeUnit,

    /// Event time: how far behind the highest time seen (the watermark) a
    /// record may be and still be judged; older ones are bad input of kind
    /// `late`. Memory: the engine keeps window + lateness of keys, so a
    /// lateness N times the window costs about N + 1 times the memory of
    /// the window alone; the tables are sized for the input's records at
    /// most, and grow when more arrive. Default: the window (with
    /// --time-field).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "time_field")]
    pub allowed_lateness: Option<Duration>,

    /// Event time: a record dated more than this after both the watermark
    /// and the wall clock is bad input of kind `future` (it would move the
    /// watermark, and every later record would be `late`); `none` accepts
    /// any time.
    #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = parse_max_future)]
    pub max_future: MaxFuture,

    /// The longest record read (`16MiB`, `4MiB`; at least 1MiB); a longer
    /// one is bad input of kind `too-long`, skipped without being held in
    /// memory (`pass` cannot write it through).
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_record_size)]
    pub max_record_bytes: u64,

    /// Which records to write: the first accepted occurrences (`unique`),
    /// the repeats (`duplicates`), or every record with its verdict
    /// (`annotate`: NDJSON gains a field, lines a `new`/`duplicate` column
    /// and a tab).
    #[arg(long, value_enum, default_value_t = OutputMode::Unique)]
    pub output: OutputMode,

    /// NDJSON with --output annotate: the name of the field added.
    #[arg(long, value_name = "NAME", default_value = "_dedup")]
    pub annotate_field: String,

    /// What to do with bad input (see below): `fail` stops with exit status
    /// 2, `skip` drops the record, `pass` writes it through unchanged;
    /// skipped and passed records are counted.
    #[arg(long, value_enum, default_value_t = OnError::Fail)]
    pub on_error: OnError,

    /// The exact tier that confirms filter matches: `memory`, or
    /// `redis://HOST:PORT[/DB]`.
    #[arg(long, value_name = "TIER", default_value = "memory", value_parser = ExactArg::parse)]
    pub exact: ExactArg,

    /// The key space: the same key in two namespaces is two keys.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub namespace: String,

    /// Keep the engine's state in this directory between runs, so a later
    /// run deduplicates against what this one accepted: a checkpoint and a
    /// log of every record accepted (see --durability); a run with
    /// contradicting flags, or a corrupt state, is refused.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,

    /// How --state survives a crash. `os`: every accepted record is logged
    /// before it is written to standard output, and a rerun after a kill
    /// (even SIGKILL) writes exactly the records the killed run had not
    /// written. `sync`: the same, and the log (and a regular-file output) is
    /// synced every --group-commit, surviving a power loss too (slower).
    /// `none`: the state is saved only when a run ends without error, as a
    /// whole.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Os, requires = "state")]
    pub durability: DurabilityArg,

    /// With --durability sync: how often the log is synced; a chunk's output
    /// waits for the sync that covers it.
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = parse_duration)]
    pub group_commit: Duration,

    /// Distinct keys expected per window (without a window: in all), to size
    /// the tables or the filter up front (`5M`, `1e6`); more only cost speed
    /// (the tables grow). A size given whose memory exceeds the machine's
    /// is refused (an estimate is lowered to fit). Default: estimated from the input files' sizes, else
    /// 1000000, and under event time at most the input's records over
    /// (window + lateness) / window; with --state, the size it was created
    /// with.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub expected_keys: Option<u64>,

    /// The filter's false-positive rate: only a speed knob (matches are
    /// confirmed by the exact tier).
    #[arg(long, value_name = "RATE", default_value_t = 0.01)]
    pub false_positive_rate: f64,

    /// Serve the run's counters (records read, written, duplicates, bad by
    /// kind, and the engine's and exact tier's series) as Prometheus text at
    /// `http://ADDR/metrics` while it runs, e.g. `127.0.0.1:9464`. Only this
    /// address is listened on (a warning when it is not a loopback address:
    /// the endpoint has no authentication); the endpoint closes when the run
    /// ends.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<SocketAddr>,

    /// No summary on standard error.
    #[arg(short, long)]
    pub quiet: bool,

    /// No progress bar (otherwise shown when reading files and standard
    /// error is a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// How input bytes are cut into records.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Bytes up to each newline, any bytes.
    Lines,
    /// One JSON value per line.
    Ndjson,
}

impl Format {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Format::Lines => "lines",
            Format::Ndjson => "ndjson",
        }
    }
}

/// How `--state` survives a crash.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurabilityArg {
    /// Saved when a run ends without error.
    None,
    /// Logged before output: survives a killed process.
    Os,
    /// Logged and synced before output: survives a power loss.
    Sync,
}

/// Which records are written.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputMode {
    /// First accepted occurrences.
    Unique,
    /// Repeats inside the window.
    Duplicates,
    /// Every record, with its verdict.
    Annotate,
}

/// What happens to a bad record.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Report it and stop with exit status 2.
    Fail,
    /// Report it, drop it, count it.
    Skip,
    /// Report it, write it unchanged, count it.
    Pass,
}

/// The unit of a numeric event time.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeUnit {
    /// Seconds.
    S,
    /// Milliseconds.
    Ms,
    /// Microseconds.
    Us,
    /// Nanoseconds.
    Ns,
}

impl TimeUnit {
    /// Decimal digits from this unit down to nanoseconds.
    pub fn nanos_exponent(self) -> i32 {
        match self {
            TimeUnit::S => 9,
            TimeUnit::Ms => 6,
            TimeUnit::Us => 3,
            TimeUnit::Ns => 0,
        }
    }

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            TimeUnit::S => "s",
            TimeUnit::Ms => "ms",
            TimeUnit::Us => "us",
            TimeUnit::Ns => "ns",
        }
    }
}

/// The exact tier named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExactArg {
    /// The embedded memory tier.
    Memory,
    /// A Redis server (`redis://HOST:PORT[/DB]`).
    Redis(String),
}

impl ExactArg {
    fn parse(s: &str) -> Result<Self, String> {
        if s == "memory" {
            return Ok(ExactArg::Memory);
        }
        if let Some(rest) = s.strip_prefix("redis://") {
            if rest.is_empty() {
                return Err("a Redis URL needs a host: redis://HOST:PORT[/DB]".to_owned());
            }
            return Ok(ExactArg::Redis(s.to_owned()));
        }
        Err(format!(
            "unknown exact tier `{s}`: use `memory` or `redis://HOST:PORT[/DB]`"
        ))
    }
}

/// `dedup bench`: the engine alone, on keys generated in memory.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Keys checked per run (`10M`, `500k` or a plain number).
    #[arg(long, value_name = "N", default_value = "5M", value_parser = parse_count)]
    pub keys: u64,

    /// Share of checks that repeat an earlier key.
    #[arg(long, value_name = "RATIO", default_value_t = 0.3, value_parser = parse_ratio)]
    pub duplicate_ratio: f64,

    /// Which earlier key a repeat picks: any, uniformly, or a recent one with
    /// Zipf-distributed distance (exponent --zipf-exponent).
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,

    /// The exponent of --distribution zipf.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub zipf_exponent: f64,

    /// Thread counts to measure, comma-separated (each thread checks its share
    /// of the keys against one shared engine).
    #[arg(
        long,
        value_name = "N,..",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    pub threads: Vec<usize>,

    /// Exact tiers to measure, comma-separated: `memory`, `dashmap`, or
    /// `none` (probabilistic mode, filter only).
    #[arg(
        long,
        value_name = "TIER,..",
        value_enum,
        value_delimiter = ',',
        default_value = "memory"
    )]
    pub exact: Vec<BenchTier>,

    /// Keys per `check_batch` call (1: one `check` per key).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,

    /// Processing-time window; `none` for keys that never expire.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_optional_window)]
    pub window: OptionalWindow,

    /// Shards of the engine.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub shards: usize,

    /// Distinct keys per window the engine is sized for. Default: the
    /// stream's distinct keys.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub expected_keys: Option<u64>,

    /// Seed of the key generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Print the results as JSON (one object per measurement) instead of a
    /// table.
    #[arg(long)]
    pub json: bool,

    /// Instead of measuring, write the generated keys as lines to standard
    /// output (16 random letters and digits each): the input of the speed
    /// comparison in docs/cli.md.
    #[arg(long)]
    pub emit_lines: bool,
}

/// How repeats pick an earlier key.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// Any earlier key, uniformly.
    Uniform,
    /// Recent keys more often: the distance back is Zipf-distributed.
    Zipf,
}

/// Exact tiers `dedup bench` can measure.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchTier {
    /// The embedded memory tier.
    Memory,
    /// The `DashMap` tier.
    Dashmap,
    /// No exact tier (probabilistic mode).
    None,
}

/// A window, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalWindow(pub Option<Duration>);

/// `--max-future`: a bound, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxFuture(pub Option<Duration>);

fn parse_max_future(s: &str) -> Result<MaxFuture, String> {
    if s == "none" {
        return Ok(MaxFuture(None));
    }
    parse_duration(s).map(|d| MaxFuture(Some(d)))
}

/// Smallest `--max-record-bytes`: a read's worth (records up to a read
/// long are cut from one read).
pub const MIN_RECORD_BYTES: u64 = 1 << 20;

/// `16MiB`, `512KiB`, `2GiB`, `1MB`, or a plain number of bytes.
fn parse_record_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "`{s}` is not a size (examples: 16MiB, 512KiB, 2GiB)"
            ))
        }
    };
    let n: u64 = digits
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 16MiB, 512KiB, 2GiB)"))?;
    let bytes = n
        .checked_mul(scale)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes < MIN_RECORD_BYTES {
        return Err("at least 1MiB (a record up to one read long is always held)".to_owned());
    }
    Ok(bytes)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 15m, 24h, 7d, 1h30m)"))
}

fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        "expected IP:PORT, e.g. 127.0.0.1:9464 or [::1]:9464 (host names are not resolved)"
            .to_owned()
    })
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("the window must be longer than zero (omit --window for no expiry)".to_owned());
    }
    Ok(d)
}

fn parse_optional_window(s: &str) -> Result<OptionalWindow, String> {
    if s == "none" {
        return Ok(OptionalWindow(None));
    }
    parse_window(s).map(|d| OptionalWindow(Some(d)))
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..1.0).contains(&r) {
        Ok(r)
    } else {
        Err("a ratio in [0, 1)".to_owned())
    }
}

/// `5M`, `500k`, `10_000` or `1e6` (at least 1).
pub(crate) fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.replace('_', "");
    let (digits, scale) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'm' | 'M')) => (&t[..i], 1e6),
        Some((i, 'g' | 'G' | 'b' | 'B')) => (&t[..i], 1e9),
        _ => (t.as_str(), 1.0),
    };
    let n: f64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a count (examples: 5M, 500k, 1000)"))?;
    let n = (n * scale).round();
    if (1.0..1e15).contains(&n) {
        Ok(n as u64)
    } else {
        Err("a count from 1 to 10^15".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn counts_and_windows_parse() {
        assert_eq!(parse_count("5M"), Ok(5_000_000));
        assert_eq!(parse_count("500k"), Ok(500_000));
        assert_eq!(parse_count("1_000"), Ok(1000));
        assert!(parse_count("0").is_err());
        assert_eq!(parse_window("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_window("0s").is_err());
        assert_eq!(parse_optional_window("none"), Ok(OptionalWindow(None)));
        assert_eq!(parse_count("1e12"), Ok(1_000_000_000_000));
        assert_eq!(parse_record_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_record_size("2 GiB"), Ok(2 << 30));
        assert!(parse_record_size("512KiB").is_err());
        assert!(parse_record_size("lots").is_err());
        assert_eq!(parse_max_future("none"), Ok(MaxFuture(None)));
        assert_eq!(
            parse_max_future("1d"),
            Ok(MaxFuture(Some(Duration::from_secs(86_400))))
        );
    }
}
