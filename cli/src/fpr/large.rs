//! Experiment (d): generations of growing size, up to 2³² bits and beyond,
//! each filled to capacity: the rate must not depend on the size (no
//! collapse from 32-bit index arithmetic).

use std::time::Duration;

use clap::Args;
use plotters::prelude::SeriesLabelPosition;
use tiered_dedup::filter::sizing::{generation_fpr, shape_for};
use tiered_dedup::{GenerationalBloom, Timestamp};

use super::chart::{Chart, Mark, Series};
use super::{
    count_fresh_hits, insert_all, parse_count, parse_rate, rate_cell, CommonArgs, Keys, Measured,
    Report, Table,
};

/// `dedup fpr large`.
#[derive(Args, Debug)]
pub struct LargeArgs {
    /// Smallest generation measured: 2^N bits.
    #[arg(long, value_name = "N", default_value_t = 24, value_parser = clap::value_parser!(u32).range(10..=40))]
    pub min_bits_log2: u32,

    /// Largest generation measured: 2^N bits (the whole filter, eight
    /// generation slots, takes 2^N bytes: 4 GiB at 32).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(10..=40))]
    pub max_bits_log2: u32,

    /// Step between sizes, in powers of two.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub step: u32,

    /// Rate of one generation filled to capacity; its shape is
    /// `shape_for(target)` (12.1 bits per key and 5 probes at 0.01).
    #[arg(long, value_name = "RATE", default_value_t = 0.01, value_parser = parse_rate)]
    pub target: f64,

    /// Never-inserted keys queried per size.
    #[arg(long, value_name = "N", default_value = "4M", value_parser = parse_count)]
    pub queries: u64,

    /// Inserted keys looked up again per size (all must be found).
    #[arg(long, value_name = "N", default_value = "1M", value_parser = parse_count)]
    pub recheck: u64,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// One measured size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LargeCase {
    /// The size asked for: at least 2^bits_log2 bits per generation.
    pub(crate) bits_log2: u32,
    /// Bits of one generation (blocks × 64).
    pub(crate) generation_bits: u64,
    pub(crate) keys: u64,
    pub(crate) hashes: u32,
    pub(crate) bits_per_key: f64,
    pub(crate) measured: Measured,
    pub(crate) predicted: f64,
    /// Inserted keys looked up again, and how many were missing (must be 0).
    pub(crate) rechecked: u64,
    pub(crate) false_negatives: u64,
}

/// Fills one generation of at least `2^bits_log2` bits to capacity at
/// `shape_for(target)` and measures it.
pub(crate) fn measure(
    bits_log2: u32,
    target: f64,
    queries: u64,
    recheck: u64,
    seed: u64,
) -> Result<LargeCase, String> {
    let shape = shape_for(target).ok_or_else(|| format!("--target {target} is too small"))?;
    let stream = Keys::new(seed);
    let keys = ((1u64 << bits_log2) as f64 / shape.bits_per_key).ceil() as u64;
    let filter = GenerationalBloom::with_shape(Duration::from_secs(600), keys, shape)
        .map_err(|e| e.to_string())?;
    let now = Timestamp::from_secs(1_000);
    filter.advance(now);
    insert_all(stream, 0..keys, |fp| filter.insert(fp, now));
    let hits = count_fresh_hits(stream, 0..queries, |batch, out| {
        filter.contains_batch(batch, now, out);
    });
    // Inserted keys spread over the whole range (every keys/recheck-th).
    let rechecked = recheck.min(keys);
    let stride = keys / rechecked.max(1);
    let false_negatives = (0..rechecked)
        .filter(|i| !filter.contains(stream.inserted(i * stride), now))
        .count() as u64;
    let blocks = (filter.bytes() / 64) as u64;
    Ok(LargeCase {
        bits_log2,
        generation_bits: blocks * 64,
        keys,
        hashes: shape.hashes,
        bits_per_key: shape.bits_per_key,
        measured: Measured { hits, queries },
        predicted: generation_fpr(keys as f64 / blocks as f64, shape.hashes),
        rechecked,
        false_negatives,
    })
}

pub(crate) fn run(args: &LargeArgs) -> Result<Report, String> {
    if args.min_bits_log2 > args.max_bits_log2 {
        return Err("--min-bits-log2 is above --max-bits-log2".to_owned());
    }
    let mut cases = Vec::new();
    // One size at a time: the largest alone may take most of the memory.
    for log2 in (args.min_bits_log2..=args.max_bits_log2).step_by(args.step as usize) {
        let case = measure(
            log2,
            args.target,
            args.queries,
            args.recheck,
            args.common.seed,
        )?;
        eprintln!(
            "2^{log2} bits: {} keys, measured {:.5}%, predicted {:.5}%",
            case.keys,
            case.measured.rate() * 100.0,
            case.predicted * 100.0
        );
        cases.push(case);
    }
    let mut table = Table::new(&[
        "generation_bits",
        "filter_bytes",
        "keys",
        "bits_per_key",
        "hashes",
        "queries",
        "false_positives",
        "measured",
        "predicted",
        "measured_over_predicted",
        "z",
        "rechecked",
        "false_negatives",
    ]);
    for c in &cases {
        table.push(vec![
            c.generation_bits.to_string(),
            // Eight generation slots of generation_bits / 8 bytes each.
            c.generation_bits.to_string(),
            c.keys.to_string(),
            format!("{:.3}", c.bits_per_key),
            c.hashes.to_string(),
            c.measured.queries.to_string(),
            c.measured.hits.to_string(),
            rate_cell(c.measured.rate()),
            rate_cell(c.predicted),
            format!("{:.4}", c.measured.rate() / c.predicted),
            format!("{:.2}", c.measured.z_score(c.predicted)),
            c.rechecked.to_string(),
            c.false_negatives.to_string(),
        ]);
    }
    // Plotted at the nominal 2^N (the generation is at most 64 bits larger).
    let bits = |c: &LargeCase| 2f64.powi(c.bits_log2 as i32);
    let (lo, hi) = (
        cases.first().map_or(1.0, bits),
        cases.last().map_or(2.0, bits),
    );
    let chart = Chart {
        title: format!(
            "Large generations filled to capacity, shape_for({})",
            super::chart::format_percent(args.target)
        ),
        x_label: "bits in one generation".to_owned(),
        y_label: "false-positive rate".to_owned(),
        x_log: true,
        y_log: false,
        x_is_rate: false,
        x_ticks: Some(cases.iter().map(bits).collect()),
        legend: SeriesLabelPosition::LowerRight,
        series: vec![
            Series {
                name: "predicted (generation_fpr)".to_owned(),
                mark: Mark::Line,
                points: cases.iter().map(|c| (bits(c), c.predicted)).collect(),
            },
            Series {
                name: format!("measured ({} fresh keys per size)", args.queries),
                mark: Mark::Dots,
                points: cases.iter().map(|c| (bits(c), c.measured.rate())).collect(),
            },
            Series {
                name: "target".to_owned(),
                mark: Mark::Dashed,
                points: vec![(lo, args.target), (hi, args.target)],
            },
        ],
    };
    Ok(Report {
        name: "large",
        table,
        chart,
    })
}
