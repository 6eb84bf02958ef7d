//! The engine configuration a run resolves from its flags: what builds the
//! `Deduper`, and what a saved state must agree with (its manifest).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use tiered_dedup::exact::redis::{RedisConfig, RedisStats, RedisTier};
use tiered_dedup::{Clock, Deduper, DeduperBuilder, ExactTier};

use crate::cli::RunArgs;
use crate::input::{Chunk, Source};

/// Shards of the CLI's engine: fixed (not per core) so that a state written
/// on one machine restores on another.
pub const SHARDS: usize = 16;

/// Expected keys when nothing better is known (standard input).
const DEFAULT_EXPECTED_KEYS: u64 = 1_000_000;

/// Upper bound of the estimate for a windowed engine, whose filter is
/// allocated in full up front.
const MAX_ESTIMATED_WINDOW_KEYS: u64 = 100_000_000;

/// Everything that shapes the engine and the meaning of its keys. Saved as
/// the manifest of a `--state` directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Settings {
    /// `lines` or `ndjson`.
    pub format: String,
    /// Key pointers, as given.
    pub keys: Vec<String>,
    /// The time pointer, as given.
    pub time_field: Option<String>,
    /// The unit of numeric times (with a time field).
    pub time_unit: Option<String>,
    /// The window in nanoseconds; `None`: keys never expire.
    pub window_ns: Option<u64>,
    /// Allowed lateness in nanoseconds (with a time field).
    pub allowed_lateness_ns: Option<u64>,
    /// The namespace.
    pub namespace: String,
    /// The exact tier.
    pub exact: String,
    /// Engine shards.
    pub shards: usize,
    /// Distinct keys the filter is sized for.
    pub expected_keys: u64,
    /// The filter's false-positive target.
    pub false_positive_rate: f64,
}

impl Settings {
    /// The settings `args` ask for; `expected_keys` is resolved later
    /// ([`Settings::with_estimate`] or a saved state's).
    pub fn from_args(args: &RunArgs) -> Self {
        let time = args.time_field.as_ref();
        let lateness = time.map(|_| match (args.allowed_lateness, args.window) {
            (Some(l), _) => nanos(l),
            (None, Some(w)) => nanos(w),
            // No window: every earlier occurrence counts, so none is late.
            (None, None) => u64::MAX,
        });
        Settings {
            format: args.format.name().to_owned(),
            keys: args.keys.iter().map(|k| k.as_str().to_owned()).collect(),
            time_field: time.map(|p| p.as_str().to_owned()),
            time_unit: time.map(|_| args.time_unit.name().to_owned()),
            window_ns: args.window.map(nanos),
            allowed_lateness_ns: lateness,
            namespace: args.namespace.clone(),
            exact: match &args.exact {
                crate::cli::ExactArg::Memory => "memory".to_owned(),
                crate::cli::ExactArg::Redis(url) => url.clone(),
            },
            shards: SHARDS,
            expected_keys: args.expected_keys.unwrap_or(0),
            false_positive_rate: args.false_positive_rate,
        }
    }

    /// Fills in `expected_keys` when the flags left it open: the records the
    /// input files hold, estimated from their sizes and the mean record
    /// length of the first chunk. Under event time the engine keeps window +
    /// lateness of keys, (window + lateness) / window windows' worth: the
    /// estimate per window is divided by that factor, so the tables made up
    /// front hold the input's records at most (they grow if more come).
    pub fn with_estimate(mut self, sources: &[Source], first: Option<&Chunk>) -> Self {
        if self.expected_keys > 0 {
            return self;
        }
        let total: Option<u64> = sources.iter().map(Source::size).sum();
        let estimate = match (total, first) {
            (Some(total), Some(chunk)) if chunk.len() > 0 => {
                let mean = (chunk.data.len() as f64 / chunk.len() as f64).max(1.0);
                (total as f64 / mean).ceil() as u64
            }
            (Some(total), _) => total / 16,
            (None, _) => DEFAULT_EXPECTED_KEYS,
        };
        let cap = if self.window_ns.is_some() {
            MAX_ESTIMATED_WINDOW_KEYS
        } else {
            u64::MAX
        };
        self.expected_keys = estimate.clamp(1024, cap);
        let span_factor = self.span_factor();
        if span_factor > 1.0 {
            let per_window = (estimate as f64 / span_factor).ceil() as u64;
            self.expected_keys = self.expected_keys.min(per_window.max(1));
        }
        self
    }

    /// (window + lateness) / window: how many windows' worth of keys the
    /// engine keeps (1 without event time or without a window).
    pub fn span_factor(&self) -> f64 {
        match (self.window_ns, self.allowed_lateness_ns) {
            (Some(w), Some(l)) => (w as f64 + l as f64) / w as f64,
            _ => 1.0,
        }
    }

    /// Bytes of this process's memory the keys of one span take once the
    /// engine holds `expected_keys` per window: the memory tier's tables
    /// (entries of 24 bytes, 16 without times, at most 4/5 full), or the
    /// filter in front of Redis (about 2 bytes per key per generation, 7
    /// generations).
    pub fn projected_bytes(&self) -> f64 {
        let keys = self.expected_keys as f64 * self.span_factor();
        let per_key = if self.exact.starts_with("redis://") {
            14.0
        } else if self.window_ns.is_none() {
            16.0 * 5.0 / 4.0
        } else {
            // One table holds the span and one more slice (7/6).
            24.0 * 5.0 / 4.0 * 7.0 / 6.0
        };
        keys * per_key
    }

    /// Lowers an estimated `expected_keys` until its projected memory fits
    /// in `budget` bytes.
    pub fn fit_estimate(&mut self, budget: u64) {
        let needed = self.projected_bytes();
        if needed > budget as f64 {
            let scaled = self.expected_keys as f64 * budget as f64 / needed;
            self.expected_keys = (scaled as u64).max(1);
        }
    }

    /// Refuses sizes whose memory exceeds the machine's (`physical`
    /// bytes), with what to change.
    ///
    /// # Errors
    /// The message, when they do.
    pub fn check_memory(&self, physical: u64) -> Result<(), String> {
        let needed = self.projected_bytes();
        if needed <= physical as f64 {
            return Ok(());
        }
        let factor = self.span_factor();
        let lateness = if factor > 1.0 {
            format!(
                " (--allowed-lateness {} keeps {factor:.0} windows' worth of keys)",
                duration(self.allowed_lateness_ns)
            )
        } else {
            String::new()
        };
        Err(format!(
            "--expected-keys {} per window{lateness} needs about {} of memory, more than this \
             machine's {}: give the distinct keys one window really holds, or shorten \
             --window or --allowed-lateness",
            self.expected_keys,
            crate::summary::format_bytes(needed.min(u64::MAX as f64) as u64),
            crate::summary::format_bytes(physical)
        ))
    }

    /// The engine builder these settings describe.
    pub fn builder(&self) -> DeduperBuilder {
        self.builder_with_stats().0
    }

    /// The engine builder these settings describe, and the Redis tier's
    /// counters when the exact tier is Redis.
    pub fn builder_with_stats(&self) -> (DeduperBuilder, Option<Arc<RedisStats>>) {
        let mut redis_stats = None;
        let mut b = Deduper::builder()
            .namespace(&self.namespace)
            .shards(self.shards)
            .expected_keys(self.expected_keys.max(1))
            .false_positive_rate(self.false_positive_rate);
        b = match self.window_ns {
            Some(w) => b.window(Duration::from_nanos(w)),
            None => b.no_window(),
        };
        if self.window_ns.is_none() && !self.exact.starts_with("redis://") {
            // No window on the memory tier: nothing here reads a
            // duplicate's first-seen time, so the table keeps fingerprints
            // alone (16 bytes per key instead of 24). A state saved with
            // times restores into it (the times are dropped).
            b = b.first_seen_times(false);
        }
        if self.exact.starts_with("redis://") {
            // One engine per run, owning its keys: marks are queued and
            // written in batches (large ones: Redis's cost per key falls
            // with the marks each bucket's APPEND carries); a fresh run's
            // cold filter confirms "definitely new" in Redis until a window
            // has passed.
            let tier = RedisTier::new(RedisConfig::new(&self.exact));
            redis_stats = Some(tier.stats());
            b = b
                .exact_tier(ExactTier::Custom(Arc::new(tier)))
                .mark_batch(16_384)
                .flush_interval(crate::run::MARK_FLUSH_INTERVAL);
        }
        if let Some(lateness) = self.allowed_lateness_ns {
            b = b
                .clock(Clock::EventTime)
                .allowed_lateness(Duration::from_nanos(lateness));
        }
        if let Some(physical) = physical_memory() {
            // A filter larger than the machine is refused, not allocated.
            b = b.memory_limit(physical);
        }
        (b, redis_stats)
    }

    /// The Redis URL of `--exact redis://…`, if that is the tier.
    pub fn redis_url(&self) -> Option<&str> {
        self.exact
            .starts_with("redis://")
            .then_some(self.exact.as_str())
    }

    /// How this run's settings contradict `saved`'s, one line per flag.
    pub fn contradictions(&self, saved: &Settings) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |flag: &str, now: String, then: String| {
            if now != then {
                out.push(format!(
                    "{flag}: the state was written with {then}, this run has {now}"
                ));
            }
        };
        check("--format", self.format.clone(), saved.format.clone());
        check("--key", list(&self.keys), list(&saved.keys));
        check(
            "--time-field",
            opt(&self.time_field),
            opt(&saved.time_field),
        );
        check("--time-unit", opt(&self.time_unit), opt(&saved.time_unit));
        check(
            "--window",
            duration(self.window_ns),
            duration(saved.window_ns),
        );
        check(
            "--allowed-lateness",
            duration(self.allowed_lateness_ns),
            duration(saved.allowed_lateness_ns),
        );
        check(
            "--namespace",
            format!("{:?}", self.namespace),
            format!("{:?}", saved.namespace),
        );
        check("--exact", self.exact.clone(), saved.exact.clone());
        check(
            "--false-positive-rate",
            self.false_positive_rate.to_string(),
            saved.false_positive_rate.to_string(),
        );
        if self.expected_keys != 0 {
            check(
                "--expected-keys",
                self.expected_keys.to_string(),
                saved.expected_keys.to_string(),
            );
        }
        if self.shards != saved.shards {
            out.push(format!(
                "shards: the state was written with {}, this build uses {}",
                saved.shards, self.shards
            ));
        }
        out
    }
}

/// The machine's memory (Linux: `MemTotal`).
pub fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn duration(ns: Option<u64>) -> String {
    match ns {
        None => "none".to_owned(),
        Some(u64::MAX) => "unlimited".to_owned(),
        Some(ns) => humantime::format_duration(Duration::from_nanos(ns)).to_string(),
    }
}

fn opt(s: &Option<String>) -> String {
    s.as_ref()
        .map_or_else(|| "none".to_owned(), |s| format!("`{s}`"))
}

fn list(keys: &[String]) -> String {
    if keys.is_empty() {
        "the whole record".to_owned()
    } else {
        keys.iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn settings(args: &[&str]) -> Settings {
        let cli =
            Cli::try_parse_from(std::iter::once("dedup").chain(args.iter().copied())).unwrap();
        Settings::from_args(&cli.run)
    }

    #[test]
    fn lateness_defaults_to_the_window_under_event_time() {
        let s = settings(&["--format", "ndjson", "--time-field", "/t", "--window", "1m"]);
        assert_eq!(s.allowed_lateness_ns, Some(60_000_000_000));
        let s = settings(&["--format", "ndjson", "--time-field", "/t"]);
        assert_eq!(s.allowed_lateness_ns, Some(u64::MAX));
        assert_eq!(settings(&["--window", "1m"]).allowed_lateness_ns, None);
    }

    #[test]
    fn contradictions_name_each_flag() {
        let saved = settings(&["--window", "1h"]);
        assert!(settings(&["--window", "1h"])
            .contradictions(&saved)
            .is_empty());
        let now = settings(&["--namespace", "x", "--expected-keys", "5"]);
        let lines = now.contradictions(&saved);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("--window: the state was written with 1h, this run has none"));
        assert!(lines.iter().any(|l| l.starts_with("--namespace")));
        assert!(lines.iter().any(|l| l.starts_with("--expected-keys")));
    }

    #[test]
    fn the_estimate_uses_file_sizes_and_the_first_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![b'x'; 100_000]).unwrap();
        let chunk = Chunk {
            data: b"abc\nde\nfghi\n".to_vec(),
            ends: vec![3, 6, 11],
            ..Chunk::default()
        };
        let s = settings(&[]).with_estimate(&[Source::File(p)], Some(&chunk));
        assert_eq!(s.expected_keys, 25_000);
        let pipe = Source::File(dir.path().join("not-a-file"));
        let s = settings(&[]).with_estimate(&[pipe], None);
        assert_eq!(s.expected_keys, DEFAULT_EXPECTED_KEYS);
        let s = settings(&["--expected-keys", "7"]).with_estimate(&[Source::Stdin], None);
        assert_eq!(s.expected_keys, 7);
    }

    #[test]
    fn lateness_far_past_the_window_sizes_for_the_input_not_the_span() {
        let late = |lateness: &str| {
            settings(&[
                "--format",
                "ndjson",
                "--time-field",
                "/t",
                "--window",
                "1h",
                "--allowed-lateness",
                lateness,
            ])
        };
        // Standard input: 10^6 records assumed; 1000 days is 24001 windows.
        let s = late("1000d").with_estimate(&[Source::Stdin], None);
        assert_eq!(s.expected_keys, 42);
        assert!(s.projected_bytes() < 50e6, "{}", s.projected_bytes());
        // A lateness within the window keeps the estimate.
        let s = late("30m").with_estimate(&[Source::Stdin], None);
        assert_eq!(s.expected_keys, DEFAULT_EXPECTED_KEYS * 2 / 3 + 1);
    }

    #[test]
    fn memory_beyond_the_machine_is_refused_with_what_to_change() {
        let s = settings(&["--window", "1h", "--expected-keys", "1e12"]);
        let e = s.check_memory(24 << 30).unwrap_err();
        assert!(e.contains("--expected-keys 1000000000000"), "{e}");
        assert!(settings(&["--window", "1h", "--expected-keys", "1e6"])
            .check_memory(24 << 30)
            .is_ok());
        let mut s = settings(&[
            "--format",
            "ndjson",
            "--time-field",
            "/t",
            "--window",
            "1h",
            "--allowed-lateness",
            "1000d",
        ]);
        s.expected_keys = 1_000_000;
        let e = s.check_memory(24 << 30).unwrap_err();
        assert!(e.contains("24001 windows"), "{e}");
        // An estimate is lowered to fit instead (a 100 GB file).
        let mut s = settings(&[]);
        s.expected_keys = 10_000_000_000;
        s.fit_estimate(12 << 30);
        assert!(s.projected_bytes() <= (12u64 << 30) as f64);
        assert!(s.expected_keys > 500_000_000, "{}", s.expected_keys);
    }
}
