//! The pipeline against direct engine calls and a plain `DashSet` doing the
//! same dedup, on one stream: N distinct keys with 30% duplicates
//! (1.43·N keys), memory tier; and, run first, per-batch latency (p50/p99)
//! and the cost of the channel hop per key.
//!
//! `cargo bench --bench pipeline` (N = 10⁶); `TD_BENCH_LARGE=1` for N = 10⁷.

mod support;
use support::{growing_stream, large, Until, WINDOW};

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dashmap::DashSet;
use tiered_dedup::{Deduper, DeduperBuilder, Pipeline};

fn distinct() -> u64 {
    if large() {
        10_000_000
    } else {
        1_000_000
    }
}

/// `n` distinct keys, each repeated with probability 3/7 (30% of the
/// stream are repeats), repeats of a uniformly chosen earlier key.
fn stream(n: u64) -> Vec<u64> {
    growing_stream(3, Until::Distinct(n)).0
}

fn engine(n: u64) -> DeduperBuilder {
    Deduper::builder().window(WINDOW).expected_keys(n)
}

/// Runs `f(part)` on `threads` threads, each over its share of `keys`.
fn split<F: Fn(&[u64]) + Sync>(keys: &[u64], threads: usize, f: F) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in keys.chunks(keys.len().div_ceil(threads)) {
            let f = &f;
            s.spawn(move || f(part));
        }
    });
    start.elapsed()
}

fn throughput(c: &mut Criterion) {
    let n = distinct();
    let keys = stream(n);
    let mut group = c.benchmark_group(format!("dedup/{n}-distinct/30pct-dup"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(keys.len() as u64));
    for threads in [1usize, 2] {
        for batch in [64usize, 4096] {
            group.bench_with_input(
                BenchmarkId::new(format!("pipeline/{threads}-producers"), batch),
                &batch,
                |b, &batch| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let p = Pipeline::builder(engine(n)).workers(2).build().unwrap();
                            total += split(&keys, threads, |part| {
                                let mut producer = p.producer();
                                for chunk in part.chunks(batch) {
                                    producer.submit(chunk).unwrap();
                                    while producer.unanswered() > 4 || producer.in_flight() > 8 {
                                        producer.recv().unwrap();
                                    }
                                }
                                while producer.in_flight() > 0 {
                                    producer.recv().unwrap();
                                }
                            });
                        }
                        total
                    });
                },
            );
        }
        group.bench_function(
            BenchmarkId::new(format!("check_batch/{threads}-threads"), 4096),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let d = engine(n).build().unwrap();
                        total += split(&keys, threads, |part| {
                            let mut out = Vec::new();
                            for chunk in part.chunks(4096) {
                                d.check_batch_into(chunk, &mut out);
                            }
                        });
                    }
                    total
                });
            },
        );
        group.bench_function(
            BenchmarkId::new(format!("check/{threads}-threads"), 1),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let d = engine(n).build().unwrap();
                        total += split(&keys, threads, |part| {
                            for k in part {
                                std::hint::black_box(d.check(k));
                            }
                        });
                    }
                    total
                });
            },
        );
        group.bench_function(
            BenchmarkId::new(format!("dashset/{threads}-threads"), 1),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let set: Arc<DashSet<u64>> = Arc::new(DashSet::with_capacity(n as usize));
                        total += split(&keys, threads, |part| {
                            for k in part {
                                std::hint::black_box(set.insert(*k));
                            }
                        });
                    }
                    total
                });
            },
        );
    }
    group.finish();
}

/// Per-batch latency through the pipeline (one producer, one batch in
/// flight), against `check_batch` on the same batches: the difference per
/// key is the channel hop.
fn latency(_: &mut Criterion) {
    let n = distinct();
    let keys = stream(n);
    for batch in [1usize, 64, 4096] {
        let sample = &keys[..keys.len().min(batch * 2_000)];
        let p = Pipeline::builder(engine(n)).workers(2).build().unwrap();
        let mut producer = p.producer();
        let mut lat: Vec<Duration> = sample
            .chunks(batch)
            .map(|chunk| {
                let t = Instant::now();
                std::hint::black_box(producer.process(chunk).unwrap());
                t.elapsed()
            })
            .collect();
        let d = engine(n).build().unwrap();
        let direct_start = Instant::now();
        for chunk in sample.chunks(batch) {
            std::hint::black_box(d.check_batch(chunk));
        }
        let direct = direct_start.elapsed();
        let through: Duration = lat.iter().sum();
        lat.sort();
        let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
        eprintln!(
            "latency batch={batch:>4}: p50 {:>9.1?} p99 {:>9.1?} | per key: pipeline {:>6.1} ns, check_batch {:>6.1} ns, hop {:>6.1} ns",
            pct(0.5),
            pct(0.99),
            through.as_nanos() as f64 / sample.len() as f64,
            direct.as_nanos() as f64 / sample.len() as f64,
            (through.as_nanos() as f64 - direct.as_nanos() as f64) / sample.len() as f64,
        );
    }
}

criterion_group!(benches, latency, throughput);
criterion_main!(benches);
