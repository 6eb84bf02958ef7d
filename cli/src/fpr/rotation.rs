//! Experiment (c): the rate of a `GenerationalBloom` over time, fed at a
//! steady key rate through several windows, as generations fill and the
//! oldest is cleared.

use std::time::Duration;

use clap::Args;
use plotters::prelude::SeriesLabelPosition;
use tiered_dedup::filter::sizing::{generation_fpr, shape_for};
use tiered_dedup::{GenerationalBloom, Timestamp, GENERATIONS};

use super::blocked::LIVE_GENERATIONS;
use super::chart::{Chart, Mark, Series};
use super::{
    count_fresh_hits, insert_all, parse_count, parse_rate, rate_cell, CommonArgs, Keys, Measured,
    Report, Table,
};

/// Slices per window: eight generation slots hold six full slices, the one
/// filling and a spare (`docs/architecture.md`, "Time and slices").
const SLICES_PER_WINDOW: u64 = GENERATIONS as u64 - 2;

/// `dedup fpr rotation`.
#[derive(Args, Debug)]
pub struct RotationArgs {
    /// Keys per window: the filter is sized for it and fed at that rate.
    #[arg(long, value_name = "N", default_value = "600k", value_parser = parse_count)]
    pub keys_per_window: u64,

    /// The configured false-positive rate (split over the seven live
    /// generations, as the engine does).
    #[arg(long, value_name = "RATE", default_value_t = 0.01, value_parser = parse_rate)]
    pub target: f64,

    /// Windows to run through.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub windows: u64,

    /// Samples per slice (one slice is a sixth of the window); each is taken
    /// after that share of the slice's keys.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub samples_per_slice: u64,

    /// Never-inserted keys queried per sample.
    #[arg(long, value_name = "N", default_value = "1M", value_parser = parse_count)]
    pub queries: u64,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// One sample.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RotationSample {
    /// Time since the first key, in windows.
    pub(crate) windows: f64,
    /// Keys inserted so far.
    pub(crate) inserted: u64,
    pub(crate) measured: Measured,
    /// `1 − Π (1 − generation_fpr(λ_g, k))` over the live generations.
    pub(crate) predicted: f64,
    /// The filter's own estimate from sampled popcounts (`estimated_fpr`,
    /// the engine's `filter_estimated_fpr` gauge).
    pub(crate) estimated: f64,
}

/// Runs the filter through `windows` windows and samples it.
pub(crate) fn measure(
    keys_per_window: u64,
    target: f64,
    windows: u64,
    samples_per_slice: u64,
    queries: u64,
    seed: u64,
) -> Result<Vec<RotationSample>, String> {
    let stream = Keys::new(seed);
    let window = Duration::from_secs(60);
    let filter =
        GenerationalBloom::new(window, keys_per_window, target).map_err(|e| e.to_string())?;
    // The shape `GenerationalBloom::new` picks: a seventh of the target per
    // generation, for keys_per_window / 6 keys per slice.
    let shape = shape_for(target / f64::from(LIVE_GENERATIONS))
        .ok_or_else(|| format!("--target {target} is too small for the layout"))?;
    let per_slice = keys_per_window.div_ceil(SLICES_PER_WINDOW);
    let blocks = (filter.bytes() / 64) as f64;
    let sized = (per_slice as f64 * shape.bits_per_key / 64.0)
        .ceil()
        .max(1.0);
    if blocks != sized {
        return Err(format!(
            "filter has {blocks} blocks, the formula expects {sized}"
        ));
    }
    let slice = filter.slice_duration();
    let slice_nanos = slice.as_nanos() as u64;
    let start = slice_nanos * 1_000;
    let mut samples = Vec::new();
    let mut next_fresh = 0u64;
    for s in 0..windows * SLICES_PER_WINDOW {
        for j in 0..=samples_per_slice {
            // The j-th sample of slice s: the slice's first j/S of keys are in.
            let offset = (slice_nanos * j / samples_per_slice).min(slice_nanos - 1);
            let now = Timestamp::from_nanos(start + s * slice_nanos + offset);
            filter.advance(now);
            let in_slice = per_slice * j / samples_per_slice;
            let before = per_slice * j.saturating_sub(1) / samples_per_slice;
            let base = s * per_slice;
            insert_all(stream, base + before..base + in_slice, |fp| {
                filter.insert(fp, now)
            });
            let hits = count_fresh_hits(stream, next_fresh..next_fresh + queries, |batch, out| {
                filter.contains_batch(batch, now, out);
            });
            next_fresh += queries;
            // Live: slices s−6 ..= s; those before s hold per_slice keys each
            // (none before the first), slice s holds in_slice.
            let miss_all: f64 = (0..LIVE_GENERATIONS as u64)
                .filter_map(|back| s.checked_sub(back))
                .map(|x| if x == s { in_slice } else { per_slice })
                .map(|keys| 1.0 - generation_fpr(keys as f64 / blocks, shape.hashes))
                .product();
            samples.push(RotationSample {
                windows: (s as f64 + offset as f64 / slice_nanos as f64) / SLICES_PER_WINDOW as f64,
                inserted: base + in_slice,
                measured: Measured { hits, queries },
                predicted: 1.0 - miss_all,
                estimated: filter.estimated_fpr(),
            });
        }
    }
    Ok(samples)
}

pub(crate) fn run(args: &RotationArgs) -> Result<Report, String> {
    if args.windows == 0 {
        return Err("--windows: at least 1".to_owned());
    }
    let samples = measure(
        args.keys_per_window,
        args.target,
        args.windows,
        args.samples_per_slice,
        args.queries,
        args.common.seed,
    )?;
    let mut table = Table::new(&[
        "time_windows",
        "keys_inserted",
        "queries",
        "false_positives",
        "measured",
        "predicted",
        "estimated_by_filter",
        "measured_over_predicted",
        "z",
    ]);
    for s in &samples {
        table.push(vec![
            format!("{:.4}", s.windows),
            s.inserted.to_string(),
            s.measured.queries.to_string(),
            s.measured.hits.to_string(),
            rate_cell(s.measured.rate()),
            rate_cell(s.predicted),
            rate_cell(s.estimated),
            if s.predicted > 0.0 {
                format!("{:.4}", s.measured.rate() / s.predicted)
            } else {
                String::new()
            },
            format!("{:.2}", s.measured.z_score(s.predicted)),
        ]);
    }
    let end = samples.last().map_or(1.0, |s| s.windows);
    let chart = Chart {
        title: format!(
            "Rotation: {} keys per window, target {}",
            args.keys_per_window,
            super::chart::format_percent(args.target)
        ),
        x_label: "time since the first key (windows; a slice is 1/6)".to_owned(),
        y_label: "false-positive rate of a query".to_owned(),
        x_log: false,
        y_log: false,
        x_is_rate: false,
        x_ticks: None,
        legend: SeriesLabelPosition::LowerRight,
        series: vec![
            Series {
                name: "predicted (generation_fpr over the live generations)".to_owned(),
                mark: Mark::Line,
                points: samples.iter().map(|s| (s.windows, s.predicted)).collect(),
            },
            Series {
                name: format!("measured ({} fresh keys per sample)", args.queries),
                mark: Mark::Dots,
                points: samples
                    .iter()
                    .map(|s| (s.windows, s.measured.rate()))
                    .collect(),
            },
            Series {
                name: "estimated by the filter (estimated_fpr)".to_owned(),
                mark: Mark::Crosses,
                points: samples.iter().map(|s| (s.windows, s.estimated)).collect(),
            },
            Series {
                name: "configured target".to_owned(),
                mark: Mark::Dashed,
                points: vec![(0.0, args.target), (end, args.target)],
            },
        ],
    };
    Ok(Report {
        name: "rotation",
        table,
        chart,
    })
}
