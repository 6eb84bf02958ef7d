//! `dedup fpr`: false-positive-rate experiments. Each one builds real
//! filters, fills them with one stream of keys, queries them with another,
//! disjoint stream (keys never inserted), and sets the measured rate beside
//! the rate predicted by the crate's own formulas (`tiered_dedup::filter::sizing`).
//! It prints a table and writes `OUT/<experiment>.csv` and
//! `OUT/<experiment>.svg` (measured against predicted). The cases of a
//! sweep, and the keys of one case, run in parallel on a `rayon` pool.
//!
//! - `bloom`: a plain Bloom filter against the textbook formula and table;
//! - `blocked`: the engine's blocked layout over bits per key, probes, fill,
//!   generations and key count, against its exact formula;
//! - `rotation`: a `GenerationalBloom` driven through several windows at a
//!   steady key rate, sampled as generations fill and are cleared;
//! - `large`: generations of up to 2³² bits and more, filled to capacity.
//!
//! See `docs/fpr.md` for the results.

mod blocked;
mod bloom;
mod chart;
mod large;
mod rotation;
mod standard;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use rayon::prelude::*;
use tiered_dedup::{Fingerprint, Namespace};

pub(crate) use crate::cli::parse_count;
use chart::Chart;

/// `dedup fpr EXPERIMENT`: measured against predicted false-positive rates.
#[derive(Args, Debug)]
#[command(
    subcommand_value_name = "EXPERIMENT",
    subcommand_help_heading = "Experiments"
)]
pub struct FprArgs {
    /// The experiment to run.
    #[command(subcommand)]
    pub experiment: Experiment,
}

/// The experiments of `dedup fpr`.
#[derive(Subcommand, Debug)]
pub enum Experiment {
    /// (a) A plain Bloom filter (k positions anywhere in the array, by double
    /// hashing of the xxh3-128 fingerprint) against the standard formula
    /// (1 − e^(−k/b))^k and the published table.
    Bloom(bloom::BloomArgs),
    /// (b) The engine's cache-line-blocked layout against its exact formula
    /// (`sizing::generation_fpr`), over bits per key, probes, fill level,
    /// filled generations and key count.
    Blocked(blocked::BlockedArgs),
    /// (c) A `GenerationalBloom` sized like the engine's, fed at a steady key
    /// rate through several windows: the rate over time as generations fill
    /// and are cleared.
    Rotation(rotation::RotationArgs),
    /// (d) Generations of growing size, up to 2^32 bits and beyond, filled
    /// to capacity: no collapse of the rate with size. The whole filter
    /// (eight generation slots) of 2^N bits per generation takes 2^N bytes:
    /// 4 GiB at 2^32.
    Large(large::LargeArgs),
}

/// Flags every experiment takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Directory for `<experiment>.csv` and `<experiment>.svg` (created if
    /// missing).
    #[arg(long, value_name = "DIR", default_value = "fpr-results")]
    pub out: PathBuf,

    /// Worker threads. Default: one per core.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Seed of the key streams (the namespace the keys are fingerprinted in).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs `dedup fpr`.
pub fn run(args: &FprArgs) -> ExitCode {
    match run_experiment(&args.experiment) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::say!("dedup fpr: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_experiment(experiment: &Experiment) -> Result<(), String> {
    let common = match experiment {
        Experiment::Bloom(a) => &a.common,
        Experiment::Blocked(a) => &a.common,
        Experiment::Rotation(a) => &a.common,
        Experiment::Large(a) => &a.common,
    };
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = common.threads {
        pool = pool.num_threads(n.max(1));
    }
    let pool = pool.build().map_err(|e| e.to_string())?;
    let report = pool.install(|| match experiment {
        Experiment::Bloom(a) => bloom::run(a),
        Experiment::Blocked(a) => blocked::run(a),
        Experiment::Rotation(a) => rotation::run(a),
        Experiment::Large(a) => large::run(a),
    })?;
    report.write(&common.out)
}

/// What an experiment produced: a table (printed, and written as CSV) and
/// a chart.
pub(crate) struct Report {
    pub(crate) name: &'static str,
    pub(crate) table: Table,
    pub(crate) chart: Chart,
}

impl Report {
    /// Prints the table and writes `dir/<name>.csv` and `dir/<name>.svg`.
    fn write(&self, dir: &Path) -> Result<(), String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let csv = dir.join(format!("{}.csv", self.name));
        fs::write(&csv, self.table.to_csv()).map_err(|e| format!("{}: {e}", csv.display()))?;
        let svg = dir.join(format!("{}.svg", self.name));
        self.chart.write_svg(&svg)?;
        print!("{}", self.table.to_text());
        crate::tell!("wrote {} and {}", csv.display(), svg.display());
        Ok(())
    }
}

/// Rows of already formatted cells under named columns.
#[derive(Clone, Debug, Default)]
pub(crate) struct Table {
    pub(crate) columns: Vec<&'static str>,
    pub(crate) rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(columns: &[&'static str]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }

    /// Comma-separated, one header line; cells never contain commas.
    fn to_csv(&self) -> String {
        let mut out = self.columns.join(",");
        out.push('\n');
        for row in &self.rows {
            out.push_str(&row.join(","));
            out.push('\n');
        }
        out
    }

    /// Right-aligned columns for the terminal.
    fn to_text(&self) -> String {
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].len())
                    .chain([self.columns[c].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in std::iter::once(self.columns.iter().map(|c| (*c).to_owned()).collect())
            .chain(self.rows.iter().cloned())
        {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:>w$}"))
                .collect();
            let _ = writeln!(out, "{}", cells.join("  "));
        }
        out
    }
}

/// The two disjoint key streams of an experiment: keys `i < 2⁶³` are the
/// ones inserted, keys from 2⁶³ up are only ever queried. Both are
/// fingerprinted in the namespace of the seed, as the engine fingerprints
/// its keys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keys {
    namespace: Namespace,
}

/// The first never-inserted key.
const FRESH: u64 = 1 << 63;

impl Keys {
    pub(crate) fn new(seed: u64) -> Self {
        Keys {
            namespace: Namespace::new(&format!("dedup-fpr-{seed}")),
        }
    }

    /// The `i`-th key of the inserted stream.
    pub(crate) fn inserted(self, i: u64) -> Fingerprint {
        assert!(i < FRESH, "inserted keys stay below 2^63");
        self.namespace.fingerprint(&i.to_le_bytes())
    }

    /// The `i`-th key of the never-inserted stream.
    pub(crate) fn fresh(self, i: u64) -> Fingerprint {
        self.namespace.fingerprint(&(FRESH | i).to_le_bytes())
    }
}

/// Keys per parallel task.
const CHUNK: u64 = 1 << 14;

/// Calls `insert` with inserted keys `range`, in parallel.
pub(crate) fn insert_all(
    keys: Keys,
    range: std::ops::Range<u64>,
    insert: impl Fn(Fingerprint) + Sync,
) {
    let (start, len) = (range.start, range.end.saturating_sub(range.start));
    (0..len.div_ceil(CHUNK)).into_par_iter().for_each(|c| {
        let from = start + c * CHUNK;
        for i in from..(from + CHUNK).min(range.end) {
            insert(keys.inserted(i));
        }
    });
}

/// How many of the never-inserted keys `range` the filter claims, asked
/// in parallel batches (`contains` answers one batch into its vector).
pub(crate) fn count_fresh_hits(
    keys: Keys,
    range: std::ops::Range<u64>,
    contains: impl Fn(&[Fingerprint], &mut Vec<bool>) + Sync,
) -> u64 {
    let (start, len) = (range.start, range.end.saturating_sub(range.start));
    (0..len.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let from = start + c * CHUNK;
            let batch: Vec<Fingerprint> = (from..(from + CHUNK).min(range.end))
                .map(|i| keys.fresh(i))
                .collect();
            let mut answers = Vec::with_capacity(batch.len());
            contains(&batch, &mut answers);
            answers.iter().filter(|&&hit| hit).count() as u64
        })
        .sum()
}

/// A measured rate: `hits` false positives among `queries` never-inserted keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Measured {
    pub(crate) hits: u64,
    pub(crate) queries: u64,
}

impl Measured {
    pub(crate) fn rate(self) -> f64 {
        self.hits as f64 / self.queries.max(1) as f64
    }

    /// How many binomial standard deviations the measurement lies from
    /// `predicted` (queries are independent draws at the predicted rate).
    pub(crate) fn z_score(self, predicted: f64) -> f64 {
        let n = self.queries as f64;
        let sd = (n * predicted * (1.0 - predicted)).sqrt();
        if sd == 0.0 {
            return if self.hits == 0 { 0.0 } else { f64::INFINITY };
        }
        (self.hits as f64 - n * predicted) / sd
    }
}

/// A rate for tables and CSV: six significant digits.
pub(crate) fn rate_cell(rate: f64) -> String {
    format!("{rate:.6e}")
}

/// A rate in (0, 1).
pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if r > 0.0 && r < 1.0 {
        Ok(r)
    } else {
        Err("a rate in (0, 1), such as 0.01".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_streams_are_disjoint_and_deterministic() {
        let keys = Keys::new(3);
        assert_eq!(keys.inserted(5), Keys::new(3).inserted(5));
        assert_ne!(keys.inserted(5), keys.fresh(5));
        assert_ne!(keys.inserted(5), Keys::new(4).inserted(5));
    }

    #[test]
    fn parallel_helpers_visit_every_key_once() {
        let seen = std::sync::Mutex::new(Vec::new());
        insert_all(Keys::new(1), 10..40_010, |fp| seen.lock().unwrap().push(fp));
        let mut seen = seen.into_inner().unwrap();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 40_000);
        // A "filter" that claims every other fresh key.
        let hits = count_fresh_hits(Keys::new(1), 0..50_001, |batch, out| {
            out.extend(batch.iter().map(|fp| fp.low() % 2 == 0));
        });
        assert!((24_000..26_000).contains(&hits), "{hits}");
    }

    #[test]
    fn z_scores() {
        let m = Measured {
            hits: 1_100,
            queries: 100_000,
        };
        assert!((m.rate() - 0.011).abs() < 1e-12);
        let z = m.z_score(0.01);
        assert!((z - 100.0 / 990f64.sqrt()).abs() < 1e-9, "{z}");
    }

    #[test]
    fn tables_render() {
        let mut t = Table::new(&["a", "bb"]);
        t.push(vec!["1".into(), "22".into()]);
        assert_eq!(t.to_csv(), "a,bb\n1,22\n");
        assert_eq!(t.to_text(), "a  bb\n1  22\n");
        assert_eq!(parse_count("2M"), Ok(2_000_000));
        assert!(parse_rate("1").is_err());
    }
}
