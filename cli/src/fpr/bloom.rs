//! Experiment (a): a plain Bloom filter against the standard formula
//! `(1 − e^{−k/b})^k` and the published table of bits per key and probes.

use clap::Args;
use plotters::prelude::SeriesLabelPosition;
use rayon::prelude::*;
use tiered_dedup::filter::sizing::standard_bloom_fpr;

use super::chart::{Chart, Mark, Series};
use super::standard::StandardBloom;
use super::{
    count_fresh_hits, insert_all, parse_count, rate_cell, CommonArgs, Keys, Measured, Report, Table,
};

/// The published table (Bloom filter literature, optimal k for each b):
/// bits per key, probes, rate.
pub(crate) const PUBLISHED: [(f64, u32, f64); 6] = [
    (9.0, 6, 0.013),
    (10.0, 7, 0.008),
    (12.0, 8, 0.003),
    (13.0, 9, 0.002),
    (15.0, 10, 0.0007),
    (16.0, 11, 0.0004),
];

/// `dedup fpr bloom`.
#[derive(Args, Debug)]
pub struct BloomArgs {
    /// Shapes to measure as BITS/PROBES (bits per key / probes per key),
    /// comma-separated. Default: the published table.
    #[arg(
        long,
        value_name = "B/K,..",
        value_delimiter = ',',
        value_parser = parse_shape,
        default_value = "9/6,10/7,12/8,13/9,15/10,16/11"
    )]
    pub shapes: Vec<(f64, u32)>,

    /// Keys inserted into each filter (its size is bits per key × keys).
    #[arg(long, value_name = "N", default_value = "1M", value_parser = parse_count)]
    pub keys: u64,

    /// Never-inserted keys queried per filter.
    #[arg(long, value_name = "N", default_value = "10M", value_parser = parse_count)]
    pub queries: u64,

    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_shape(s: &str) -> Result<(f64, u32), String> {
    let (b, k) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}`: expected BITS/PROBES, such as 10/7"))?;
    let b: f64 = b.parse().map_err(|e| format!("`{s}`: {e}"))?;
    let k: u32 = k.parse().map_err(|e| format!("`{s}`: {e}"))?;
    if b > 0.0 && (1..=64).contains(&k) {
        Ok((b, k))
    } else {
        Err(format!("`{s}`: bits per key above 0, probes from 1 to 64"))
    }
}

/// One measured shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BloomCase {
    pub(crate) bits_per_key: f64,
    pub(crate) hashes: u32,
    pub(crate) measured: Measured,
    /// `standard_bloom_fpr(b, k)`.
    pub(crate) predicted: f64,
}

/// Fills a `b·keys`-bit plain Bloom filter with `keys` keys and queries
/// `queries` never-inserted ones.
pub(crate) fn measure(
    bits_per_key: f64,
    hashes: u32,
    keys: u64,
    queries: u64,
    seed: u64,
) -> BloomCase {
    let stream = Keys::new(seed);
    let bits = (bits_per_key * keys as f64).round().max(1.0) as u64;
    let bloom = StandardBloom::new(bits, hashes);
    insert_all(stream, 0..keys, |fp| bloom.insert(fp));
    let hits = count_fresh_hits(stream, 0..queries, |batch, out| {
        out.extend(batch.iter().map(|&fp| bloom.contains(fp)));
    });
    BloomCase {
        bits_per_key,
        hashes,
        measured: Measured { hits, queries },
        predicted: standard_bloom_fpr(bits_per_key, hashes),
    }
}

fn published(b: f64, k: u32) -> Option<f64> {
    PUBLISHED
        .iter()
        .find(|&&(pb, pk, _)| pb == b && pk == k)
        .map(|&(_, _, rate)| rate)
}

pub(crate) fn run(args: &BloomArgs) -> Result<Report, String> {
    let cases: Vec<BloomCase> = args
        .shapes
        .par_iter()
        .map(|&(b, k)| measure(b, k, args.keys, args.queries, args.common.seed))
        .collect();
    let mut table = Table::new(&[
        "bits_per_key",
        "hashes",
        "keys",
        "queries",
        "false_positives",
        "measured",
        "predicted",
        "published",
        "measured_over_predicted",
        "z",
    ]);
    for c in &cases {
        table.push(vec![
            format!("{}", c.bits_per_key),
            c.hashes.to_string(),
            args.keys.to_string(),
            c.measured.queries.to_string(),
            c.measured.hits.to_string(),
            rate_cell(c.measured.rate()),
            rate_cell(c.predicted),
            published(c.bits_per_key, c.hashes).map_or_else(String::new, rate_cell),
            format!("{:.4}", c.measured.rate() / c.predicted),
            format!("{:.2}", c.measured.z_score(c.predicted)),
        ]);
    }
    let mut sorted = cases.clone();
    sorted.sort_by(|a, b| a.bits_per_key.total_cmp(&b.bits_per_key));
    let chart = Chart {
        title: format!(
            "Plain Bloom filter, {} keys: measured vs (1 − e^(−k/b))^k",
            args.keys
        ),
        x_label: "bits per key b (k probes as in the table)".to_owned(),
        y_label: "false-positive rate".to_owned(),
        x_log: false,
        y_log: true,
        x_is_rate: false,
        x_ticks: None,
        legend: SeriesLabelPosition::UpperRight,
        series: vec![
            Series {
                name: "predicted: (1 − e^(−k/b))^k".to_owned(),
                mark: Mark::Line,
                points: sorted
                    .iter()
                    .map(|c| (c.bits_per_key, c.predicted))
                    .collect(),
            },
            Series {
                name: "published table".to_owned(),
                mark: Mark::Crosses,
                points: sorted
                    .iter()
                    .filter_map(|c| {
                        published(c.bits_per_key, c.hashes).map(|p| (c.bits_per_key, p))
                    })
                    .collect(),
            },
            Series {
                name: format!("measured ({} fresh keys each)", args.queries),
                mark: Mark::Dots,
                points: sorted
                    .iter()
                    .map(|c| (c.bits_per_key, c.measured.rate()))
                    .collect(),
            },
        ],
    };
    Ok(Report {
        name: "bloom",
        table,
        chart,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_table_agrees_with_the_formula() {
        for (b, k, rate) in PUBLISHED {
            let p = standard_bloom_fpr(b, k);
            // One significant digit (1.3%: two), rounded except 16/11
            // (0.0459% is listed as 0.04%).
            assert!((p - rate).abs() / rate < 0.2, "{b}/{k}: {p} vs {rate}");
        }
    }

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("10/7"), Ok((10.0, 7)));
        assert!(parse_shape("10").is_err());
        assert!(parse_shape("10/0").is_err());
    }
}
