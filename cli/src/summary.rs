//! The counts of a run, the summary printed at its end, and the progress bar.

use std::fmt::Write as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tiered_dedup::Stats;

use crate::cli::OnError;
use crate::record::BadKind;

/// What happened to the records of a run: every record read is counted in
/// exactly one of `unique`, `duplicates`, `bad`, `unavailable` and
/// `undelivered`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records read.
    pub read: u64,
    /// Judged new (first accepted occurrences), and delivered if written.
    pub unique: u64,
    /// Judged duplicates, and delivered if written.
    pub duplicates: u64,
    /// Bad records, by [`BadKind::index`] (passed ones delivered).
    pub bad: [u64; BadKind::ALL.len()],
    /// Not judged: the exact tier could not answer (neither written nor
    /// recorded).
    pub unavailable: u64,
    /// Judged (or passed), but standard output closed or failed before
    /// they were written.
    pub undelivered: u64,
    /// Of `undelivered`, those judged new: recorded as accepted.
    pub undelivered_accepted: u64,
}

impl Tally {
    /// Bad records of every kind.
    pub fn bad_total(&self) -> u64 {
        self.bad.iter().sum()
    }

    /// The categories' sum, equal to `read`.
    pub fn accounted(&self) -> u64 {
        self.unique + self.duplicates + self.bad_total() + self.unavailable + self.undelivered
    }
}

/// Everything the summary reports.
pub struct Report<'a> {
    /// The counts.
    pub tally: &'a Tally,
    /// What was done with bad records.
    pub on_error: OnError,
    /// Records written.
    pub written: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// From the first read to the last write.
    pub elapsed: Duration,
    /// The engine's counters.
    pub stats: Stats,
    /// Accepted records the exact tier has not stored, when a flush
    /// failed.
    pub not_stored: Option<u64>,
}

impl Report<'_> {
    /// The summary's lines (without a trailing newline).
    pub fn render(&self) -> String {
        let t = self.tally;
        let mut s = String::new();
        let _ = write!(
            s,
            "dedup: {} records read: {} unique, {} duplicates, {} bad",
            t.read,
            t.unique,
            t.duplicates,
            t.bad_total(),
        );
        // Shown when they happened, so the sum is always on the line.
        if t.unavailable > 0 {
            let _ = write!(s, ", {} unavailable", t.unavailable);
        }
        if t.undelivered > 0 {
            let _ = write!(s, ", {} undelivered", t.undelivered);
        }
        let _ = write!(
            s,
            "; {} written ({})",
            self.written,
            format_bytes(self.written_bytes)
        );
        if t.unavailable > 0 {
            let _ = write!(
                s,
                "\ndedup: unavailable: {} records the exact tier could not judge were neither written nor recorded",
                t.unavailable
            );
        }
        if t.undelivered > 0 {
            let _ = write!(
                s,
                "\ndedup: undelivered: {} records were judged but not written ({} of them accepted, so recorded)",
                t.undelivered, t.undelivered_accepted
            );
        }
        if let Some(n) = self.not_stored {
            let _ = write!(
                s,
                "\ndedup: NOT STORED: {n} accepted records are not in the exact tier: a later run will accept them again"
            );
        }
        if t.bad_total() > 0 {
            let kinds: Vec<String> = BadKind::ALL
                .iter()
                .filter(|k| t.bad[k.index()] > 0)
                .map(|k| format!("{} {}", t.bad[k.index()], k.name()))
                .collect();
            let fate = match self.on_error {
                OnError::Fail => "stopped at the first",
                OnError::Skip => "skipped",
                OnError::Pass => "passed through",
            };
            let _ = write!(s, "\ndedup: bad records ({fate}): {}", kinds.join(", "));
        }
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let _ = write!(
            s,
            "\ndedup: {:.3} s, {:.2} M records/s, {:.0} MB/s; peak memory {}",
            secs,
            t.read as f64 / secs / 1e6,
            self.bytes_read as f64 / secs / 1e6,
            peak_memory().map_or_else(|| "unknown".to_owned(), format_bytes)
        );
        let st = &self.stats;
        if st.filter_bytes == 0 {
            // The memory tier answers every key from its table alone.
            let _ = write!(
                s,
                "\ndedup: engine: no filter, {} exact entries in {}",
                st.exact_entries,
                format_bytes(st.exact_bytes),
            );
        } else {
            let _ = write!(
                s,
                "\ndedup: engine: {} of filter ({:.3}% of checks were false positives, confirmed absent), {} exact entries in {}",
                format_bytes(st.filter_bytes),
                st.false_positives_caught as f64 * 100.0 / st.checks.max(1) as f64,
                st.exact_entries,
                format_bytes(st.exact_bytes),
            );
        }
        s
    }
}

/// The process's peak resident memory (Linux: `VmHWM`).
pub fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `118.2 MB`.
pub fn format_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

/// A progress bar over the input files' bytes, or nothing.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar on standard error when `total` bytes are known, it is wanted,
    /// and standard error is a terminal.
    pub fn new(total: Option<u64>, wanted: bool) -> Self {
        use std::io::IsTerminal;
        let Some(total) = total.filter(|_| wanted && std::io::stderr().is_terminal()) else {
            return Progress(None);
        };
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        Progress(Some(bar))
    }

    /// Moves the bar to `bytes`.
    pub fn set(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(bytes);
        }
    }

    /// Prints a line on standard error without tearing the bar.
    pub fn println(&self, line: &str) {
        match &self.0 {
            Some(bar) => bar.suspend(|| crate::say!("{line}")),
            None => crate::say!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
