//! What publishing metrics costs the engine: the same pass over the same
//! stream with no metrics at all, and with the Prometheus recorder (the one
//! `dedup --metrics-addr` serves) installed and a `MetricsPublisher`
//! publishing every 100 ms, and every 1 ms (a stress case: a hundred times
//! more often than any scrape needs). The goal (issue 6): ≤ 5% of engine
//! throughput.
//!
//! Workload: 10⁷ distinct `u64` keys with 30% duplicates (14 285 715 keys,
//! shuffled with a seeded SplitMix64), one thread calling `check_batch` in
//! batches of 4096 on an `Arc<Deduper>` (exact mode, memory tier, one-hour
//! window, `expected_keys(10⁷)`, a `ManualClock` moved forward after every
//! batch so the stream spans 99% of the window). The publisher runs on its
//! own thread; every publish locks each shard briefly, one after another,
//! which is the only contact with the hot path: the engine never calls the
//! facade itself, so whether a recorder is installed makes no difference to
//! it unless something publishes.
//!
//! One criterion iteration is one whole pass on a fresh engine (built, and
//! its publisher started and stopped, untimed); every pass asserts that
//! exactly the distinct keys were `New`, and a publishing pass that the
//! rendered `tiered_dedup_checks_total` equals the stream length.
//! `none` runs first, before the recorder is installed (it can only be
//! installed once per process).
//!
//! `metrics_publish_*` then times one `stats()` and one `publish_metrics()`
//! on an engine holding the whole stream: the cost per publish, which the
//! publisher's interval turns into a share of a core.
//!
//! Then (unless `TD_BENCH_ROUNDS=0`) `TD_BENCH_ROUNDS` rounds (default 7)
//! of one pass of each variant, in a rotating order, print each round's
//! throughputs and the median ratio of each publishing variant to `none`:
//! drift-resistant on a shared machine.
//!
//! `TD_BENCH_KEYS=N` sets the distinct keys (default 10⁷): shorter passes
//! allow more paired rounds in the same time.
//!
//! With `--test` (criterion's smoke mode) the stream is cut to 10⁵ distinct
//! keys and one round.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench TD_BENCH_ROUNDS=9 cargo bench --features metrics --bench metrics
//! # paired rounds only (the name filter matches no criterion benchmark), 10⁶ keys
//! TD_BENCH_KEYS=1000000 TD_BENCH_ROUNDS=21 cargo bench --features metrics --bench metrics -- paired-only
//! ```

mod support;
use support::{
    engine_on, env_number, manual_clock, paired_rounds, smoke_test, spread, Order, Workload, BATCH,
    STREAM_SPAN, WINDOW,
};

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tiered_dedup::{ExactTier, MetricsPublisher};

/// Share of the stream that repeats an earlier key.
const DUP_FRACTION: f64 = 0.3;
const SEED: u64 = 0x5EED_E261_0E00_0006;

/// The stream: `TD_BENCH_KEYS` distinct keys (10⁷ by default, 10⁵ in smoke
/// mode) with 30% repeats.
fn workload() -> &'static Workload {
    static W: OnceLock<Workload> = OnceLock::new();
    W.get_or_init(|| {
        let distinct: u64 = if smoke_test() {
            100_000
        } else {
            env_number("TD_BENCH_KEYS")
                .filter(|&n| n > 0)
                .unwrap_or(10_000_000)
        };
        Workload::shuffled("metrics", SEED, distinct, DUP_FRACTION, 1)
    })
}

/// How a pass publishes.
#[derive(Clone, Copy, Debug)]
enum Publishing {
    /// No publisher.
    None,
    /// A `MetricsPublisher` at this interval, into the installed recorder.
    Every(Duration),
}

impl Publishing {
    const ALL: [Publishing; 3] = [
        Publishing::None,
        Publishing::Every(Duration::from_millis(100)),
        Publishing::Every(Duration::from_millis(1)),
    ];

    fn name(self) -> String {
        match self {
            Publishing::None => "none".to_owned(),
            Publishing::Every(i) => format!("prometheus_every_{}ms", i.as_millis()),
        }
    }
}

/// The Prometheus recorder, installed globally on first use (the
/// publisher's thread reads the global recorder).
fn recorder() -> &'static PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("no other recorder in this bench")
    })
}

/// Clock step per batch: the stream spans 99% of the window, so every
/// repeat is inside it.
fn step() -> Duration {
    let w = workload();
    Duration::from_nanos(
        (WINDOW.as_nanos() as f64 * STREAM_SPAN / w.stream.len() as f64 * BATCH as f64) as u64,
    )
}

/// One whole pass on a fresh engine; returns the time of the checks alone.
fn pass(publishing: Publishing) -> Duration {
    let w = workload();
    let clock = manual_clock();
    let engine = Arc::new(
        engine_on(&clock, w.distinct)
            .exact_tier(ExactTier::Memory)
            .build()
            .expect("valid engine"),
    );
    let step = step();
    let publisher = match publishing {
        Publishing::None => None,
        Publishing::Every(interval) => {
            recorder();
            Some(MetricsPublisher::start(Arc::clone(&engine), interval))
        }
    };
    let mut verdicts = Vec::with_capacity(BATCH);
    let mut new = 0u64;
    let start = Instant::now();
    for batch in w.stream.chunks(BATCH) {
        engine.check_batch_into(batch, &mut verdicts);
        new += verdicts.iter().filter(|v| v.is_new()).count() as u64;
        clock.advance(step);
    }
    let elapsed = start.elapsed();
    // Dropping the publisher publishes once more.
    drop(publisher);
    assert_eq!(new, w.distinct, "every distinct key is New exactly once");
    if let Publishing::Every(_) = publishing {
        let text = recorder().render();
        let checks = text
            .lines()
            .find(|l| l.starts_with("tiered_dedup_checks_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok());
        assert_eq!(
            checks,
            Some(w.stream.len() as u64),
            "the last publish reached the recorder"
        );
    }
    elapsed
}

fn throughput(c: &mut Criterion) {
    let w = workload();
    let mut g = c.benchmark_group(format!("metrics_engine_memory_{}_t1", w.label));
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(w.stream.len() as u64));
    // `none` first: before the recorder is installed.
    for publishing in Publishing::ALL {
        g.bench_function(publishing.name(), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| pass(publishing)).sum());
        });
    }
    g.finish();
}

/// What one publish costs on an engine that holds the whole stream (10⁷
/// keys): `stats()` alone (the shard walk: counters, sizes and the sampled
/// fill of every live filter generation, each shard locked meanwhile), and
/// `publish_metrics()` (that plus the facade calls into the Prometheus
/// recorder). At an interval `I`, the publisher thread is busy `cost / I`
/// of its time, and each shard is locked for about `cost / shards`.
fn publish_cost(c: &mut Criterion) {
    let w = workload();
    let clock = manual_clock();
    let engine = engine_on(&clock, w.distinct).build().expect("valid engine");
    for batch in w.stream.chunks(BATCH) {
        engine.check_batch(batch);
        clock.advance(step());
    }
    recorder();
    eprintln!(
        "[metrics publish] engine of {} shards, {} entries",
        engine.shard_count(),
        engine.stats().exact_entries
    );
    let mut g = c.benchmark_group(format!("metrics_publish_memory_{}", w.label));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.bench_function("stats", |b| b.iter(|| engine.stats()));
    g.bench_function("publish_metrics", |b| b.iter(|| engine.publish_metrics()));
    g.finish();
}

/// Rounds of one pass of each variant in a rotating order; medians of the
/// throughput ratios to `none`.
fn paired(_c: &mut Criterion) {
    let rounds = if smoke_test() {
        1
    } else {
        env_number("TD_BENCH_ROUNDS").unwrap_or(7)
    };
    if rounds == 0 {
        return;
    }
    let keys = workload().stream.len() as f64;
    let variants = Publishing::ALL;
    let mut run = variants.map(|v| move || keys / pass(v).as_secs_f64());
    let [none, every_100ms, every_1ms] = &mut run;
    let rates = paired_rounds(
        rounds,
        Order::Rotate,
        &mut [none, every_100ms, every_1ms],
        |round, rate| {
            eprintln!(
                "[metrics paired] round {round}: {}",
                variants
                    .iter()
                    .zip(rate)
                    .map(|(v, r)| format!("{} {:.2} Melem/s", v.name(), r / 1e6))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        },
    );
    for v in 1..variants.len() {
        let r = spread(rates[v].iter().zip(&rates[0]).map(|(p, n)| p / n));
        eprintln!(
            "[metrics paired] {} / none: median {:.4} (min {:.4}, max {:.4}, {rounds} rounds)",
            variants[v].name(),
            r.median,
            r.min,
            r.max
        );
    }
}

criterion_group!(benches, throughput, publish_cost, paired);
criterion_main!(benches);
