//! What the benchmarks share: the seeded key streams, the engine as they
//! configure it, the `TD_BENCH_*` switches, paired rounds of whole passes,
//! and the medians and spreads they print.
//!
//! Every bench includes it with `mod support;`. It is a folder module
//! (`benches/support/mod.rs`) because Cargo would build a
//! `benches/support.rs` as a benchmark of its own.
#![allow(dead_code)] // each bench uses a different part

#[path = "../../tests/support/rng.rs"]
pub mod rng;

use std::str::FromStr;
use std::time::Duration;

use tiered_dedup::{Clock, Deduper, DeduperBuilder, ManualClock, Timestamp};

use rng::{shuffled_stream, Rng};

/// Keys per batch of the engine benches (and per clock step).
pub const BATCH: usize = 4096;

/// The window of every bench's engine and filter.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// The share of the window a stream spans on a manual clock: keys arrive
/// at the rate the engine was sized for, and every repeat is inside the
/// window.
pub const STREAM_SPAN: f64 = 0.99;

/// The time the benches' clocks start at.
pub fn t0() -> Timestamp {
    Timestamp::from_secs(1_000_000)
}

/// A manual clock at [`t0`].
pub fn manual_clock() -> ManualClock {
    ManualClock::new(t0())
}

/// The engine as the benches configure it: a [`WINDOW`], sized for
/// `expected_keys`, on `clock`; the caller adds its tier and batching.
pub fn engine_on(clock: &ManualClock, expected_keys: u64) -> DeduperBuilder {
    Deduper::builder()
        .window(WINDOW)
        .expected_keys(expected_keys)
        .clock(Clock::Manual(clock.clone()))
}

/// `TD_BENCH_LARGE=1`: run the largest sizes too.
pub fn large() -> bool {
    std::env::var("TD_BENCH_LARGE").is_ok_and(|v| v == "1")
}

/// A numeric `TD_BENCH_*` setting: `None` when unset or not a number.
pub fn env_number<T: FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Criterion's smoke mode (`cargo bench -- --test`): every benchmark once,
/// on a small stream.
pub fn smoke_test() -> bool {
    std::env::args().any(|a| a == "--test")
}

/// A key count as the benchmark names spell it: `1e7`, `1e6`, or the digits.
pub fn size_label(n: u64) -> String {
    match n {
        10_000_000 => "1e7".to_owned(),
        1_000_000 => "1e6".to_owned(),
        _ => n.to_string(),
    }
}

/// A shuffled stream of distinct keys and their repeats (engine, metrics).
pub struct Workload {
    /// Distinct keys in the stream.
    pub distinct: u64,
    /// The keys, repeats included, shuffled.
    pub stream: Vec<u64>,
    /// `n<distinct>_dup<percent>`, for benchmark group names.
    pub label: String,
}

impl Workload {
    /// `distinct` keys plus enough repeats that `dup_fraction` of the stream
    /// repeats an earlier key, the length rounded up to a multiple of
    /// `multiple_of`; shuffled with `seed` ([`shuffled_stream`]). Prints the
    /// counts to stderr under `[bench]`.
    pub fn shuffled(
        bench: &str,
        seed: u64,
        distinct: u64,
        dup_fraction: f64,
        multiple_of: u64,
    ) -> Workload {
        let total = ((distinct as f64 / (1.0 - dup_fraction)) / multiple_of as f64).ceil() as u64
            * multiple_of;
        let stream = shuffled_stream(seed, distinct, total);
        let label = format!(
            "n{}_dup{}",
            size_label(distinct),
            (dup_fraction * 100.0).round()
        );
        eprintln!(
            "[{bench}] stream: {} keys, {distinct} distinct, {} repeats",
            stream.len(),
            stream.len() as u64 - distinct
        );
        Workload {
            distinct,
            stream,
            label,
        }
    }
}

/// Where a [`growing_stream`] stops.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// Once it holds this many distinct keys.
    Distinct(u64),
    /// Once it holds this many keys.
    Keys(usize),
}

/// A stream in arrival order (pipeline, Redis): each key is, with
/// probability `repeat_tenths`/10, a repeat of a uniformly chosen earlier
/// key, else the next new one; ids are scattered by a bijection (a
/// multiplication by an odd constant). Seeded, so every run sees the same
/// keys. Returns the keys and the number of distinct ones.
pub fn growing_stream(repeat_tenths: u64, until: Until) -> (Vec<u64>, u64) {
    let mut rng = Rng::new(42);
    let mut out = Vec::with_capacity(match until {
        Until::Distinct(n) => (n as f64 * 1.43) as usize,
        Until::Keys(n) => n,
    });
    let mut next = 0u64;
    let done = |len: usize, next: u64| match until {
        Until::Distinct(n) => next >= n,
        Until::Keys(n) => len >= n,
    };
    while !done(out.len(), next) {
        if next > 0 && rng.next() % 10 < repeat_tenths {
            out.push(rng.next() % next);
        } else {
            out.push(next);
            next += 1;
        }
    }
    // Ids to scattered keys (a bijection).
    for k in &mut out {
        *k = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    (out, next)
}

/// The order of the passes within a paired round.
#[derive(Clone, Copy, Debug)]
pub enum Order {
    /// First to last in even rounds, last to first in odd ones.
    Alternate,
    /// Round `r` starts with pass `r mod n` and goes on in turn.
    Rotate,
}

/// Paired rounds: each round calls every pass once, in `order`, and hands
/// the round's results (in pass order) to `after_round`; returns each
/// pass's results, round by round. Passes that run next to each other see
/// the same machine: on a shared machine whose speed drifts over minutes,
/// ratios of adjacent passes are steadier than those of benchmarks run
/// minutes apart.
pub fn paired_rounds<T: Copy + Default>(
    rounds: usize,
    order: Order,
    passes: &mut [&mut dyn FnMut() -> T],
    mut after_round: impl FnMut(usize, &[T]),
) -> Vec<Vec<T>> {
    let n = passes.len();
    let mut results = vec![Vec::with_capacity(rounds); n];
    let mut round_results = vec![T::default(); n];
    for round in 0..rounds {
        for k in 0..n {
            let pass = match order {
                Order::Alternate if round % 2 == 0 => k,
                Order::Alternate => n - 1 - k,
                Order::Rotate => (round + k) % n,
            };
            round_results[pass] = passes[pass]();
        }
        for (all, &r) in results.iter_mut().zip(&round_results) {
            all.push(r);
        }
        after_round(round, &round_results);
    }
    results
}

/// The median, least and greatest of a set of figures (the median of an
/// even count is the upper middle one).
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The [`Spread`] of `values` (at least one).
pub fn spread(values: impl IntoIterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// The median of `values` (at least one; the upper middle of an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    spread(values).median
}
