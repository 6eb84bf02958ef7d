//! The engine: `Deduper` in exact mode against hash sets doing the same
//! dedup, on 10⁷ distinct keys with 30% duplicates (a stream of 14 285 714
//! `u64` keys in which 4 285 714 repeat an earlier key, shuffled with a seeded
//! SplitMix64), on 1 and 2 threads.
//!
//! - ours: `check_batch_into` in batches of 4096 and `check` per key, with
//!   the memory exact tier (the default) and the `DashMap` one; a one-hour
//!   window, `expected_keys(10⁷)`, a `ManualClock` moved forward after every
//!   4096 keys so the stream spans 99% of the window (keys arrive at the rate
//!   the filter was sized for: 10⁷ per window);
//! - peers: `DashSet<u128>` insert-if-absent (pass-through hasher on the
//!   fingerprint, and the default SipHash hasher), `hashbrown::HashSet<u128>`
//!   (one thread), and 64 `Mutex<hashbrown::HashSet<u128>>` shards. Peers hash
//!   every key to the same xxh3-128 fingerprint the engine uses, and are
//!   pre-sized for 10⁷ keys.
//!
//! One criterion iteration is one whole pass over the stream on a fresh
//! engine or set (built and dropped untimed), so `Throughput::Elements` is
//! the stream length. Every pass asserts that exactly the 10⁷ distinct keys
//! were answered `New`. Sizes (filter, exact tier, bytes per key) are printed
//! to stderr after the first pass of each benchmark.
//!
//! `TD_BENCH_PAIRED=N` first runs N rounds of whole passes alternating ours
//! and a peer (see [`paired`]), for drift-resistant ratios.
//!
//! With `--test` (criterion's smoke mode) the stream is cut to 10⁵ distinct
//! keys so the check takes seconds.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench engine
//! ```

mod support;
use support::{
    engine_on, env_number, manual_clock, paired_rounds, smoke_test, spread, Order, Workload, BATCH,
    STREAM_SPAN, WINDOW,
};

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use crossbeam_utils::CachePadded;
use dashmap::{DashMap, DashSet};
use tiered_dedup::{
    Deduper, DeduperBuilder, ExactTier, Key, ManualClock, Namespace, Pipeline, Stats,
};

/// Share of the stream that repeats an earlier key.
const DUP_FRACTION: f64 = 0.3;
const SEED: u64 = 0x5EED_E261_0E00_0002;
/// Shards of the `Mutex<HashSet>` peer.
const MUTEX_SHARDS: usize = 64;

/// The stream: 10⁷ distinct keys (10⁵ in smoke mode) with 30% repeats,
/// rounded up to whole segments (4 285 720 repeats: 30.0000%).
fn workload() -> &'static Workload {
    static W: OnceLock<Workload> = OnceLock::new();
    W.get_or_init(|| {
        let distinct: u64 = if smoke_test() { 100_000 } else { 10_000_000 };
        Workload::shuffled("engine", SEED, distinct, DUP_FRACTION, SEGMENTS as u64)
    })
}

/// Passes a fingerprint's high half through as the hash (the fingerprint is
/// already a uniform hash); the engine's exact tier hashes the same way.
#[derive(Default)]
struct FpHasher(u64);

impl Hasher for FpHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = (n >> 64) as u64;
    }
}

type FpBuild = BuildHasherDefault<FpHasher>;

/// The fingerprint every peer stores: the engine's own (xxh3-128 of the key
/// bytes in the default namespace).
#[inline]
fn fingerprint(key: u64) -> u128 {
    key.fingerprint(Namespace::default()).0
}

/// Splits the stream into batches dealt round-robin to `threads` workers and
/// runs `work(batch) -> new keys` on each; returns the total of new keys.
fn run_threads(stream: &[u64], threads: usize, work: &(dyn Fn(&[u64]) -> u64 + Sync)) -> u64 {
    if threads == 1 {
        return stream.chunks(BATCH).map(work).sum();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    stream
                        .chunks(BATCH)
                        .skip(t)
                        .step_by(threads)
                        .map(work)
                        .sum::<u64>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).sum()
    })
}

/// Criterion iterations per pass: one iteration is a tenth of the stream, so
/// ten samples of one iteration are one pass (a pass takes seconds here).
const SEGMENTS: usize = 10;

/// A pass over the stream in `SEGMENTS` timed pieces, on one engine or set.
/// Lives across criterion's calls of the benchmark closure; a fresh state is
/// built (untimed) whenever the previous one finished its pass.
struct Pass<S> {
    state: Option<S>,
    segment: usize,
    new: u64,
    reported: bool,
}

impl<S: Sync> Pass<S> {
    fn new() -> Self {
        Pass {
            state: None,
            segment: 0,
            new: 0,
            reported: false,
        }
    }

    /// Times `iters` segments with `threads` workers, each taking batches of
    /// 4096 keys round-robin. When a pass completes, asserts that exactly the
    /// distinct keys were new and (once) reports.
    fn time(
        &mut self,
        iters: u64,
        threads: usize,
        make: impl Fn() -> S,
        work: impl Fn(&S, &[u64]) -> u64 + Sync,
        report: impl Fn(&S),
    ) -> Duration {
        self.time_segments(
            iters,
            make,
            |state, seg| run_threads(seg, threads, &|batch| work(state, batch)),
            report,
        )
    }

    /// Times `iters` segments, each given whole to `work` (which returns the
    /// number of new keys).
    fn time_segments(
        &mut self,
        iters: u64,
        make: impl Fn() -> S,
        work: impl Fn(&S, &[u64]) -> u64,
        report: impl Fn(&S),
    ) -> Duration {
        let w = workload();
        let seg_len = w.stream.len() / SEGMENTS;
        // Criterion's smoke mode runs one iteration: make it a whole pass.
        let per_iter = if smoke_test() { SEGMENTS } else { 1 };
        let mut total = Duration::ZERO;
        for _ in 0..iters as usize * per_iter {
            let state = self.state.get_or_insert_with(&make);
            let seg = &w.stream[self.segment * seg_len..(self.segment + 1) * seg_len];
            let start = Instant::now();
            self.new += work(state, seg);
            total += start.elapsed();
            self.segment += 1;
            if self.segment == SEGMENTS {
                let done = self.state.take().expect("running");
                assert_eq!(
                    self.new, w.distinct,
                    "every distinct key is New exactly once"
                );
                if !self.reported {
                    report(&done);
                    self.reported = true;
                }
                drop(done);
                self.segment = 0;
                self.new = 0;
            }
        }
        total
    }
}

/// Our engine with its manual clock and the clock step per key.
struct Engine {
    dedup: Deduper,
    clock: ManualClock,
    step_nanos: u64,
}

/// The engine's configuration: one-hour window, 10⁷ expected keys, a manual
/// clock, the given exact tier and mark batch.
fn engine_builder(clock: &ManualClock, tier: &ExactTier, mark_batch: usize) -> DeduperBuilder {
    engine_on(clock, workload().distinct)
        .exact_tier(tier.clone())
        .mark_batch(mark_batch)
}

/// Clock step per key: the stream spans 99% of the window, so every repeat
/// is inside it.
fn step_nanos() -> u64 {
    (WINDOW.as_nanos() as f64 * STREAM_SPAN / workload().stream.len() as f64) as u64
}

fn engine(tier: &ExactTier, mark_batch: usize) -> Engine {
    let clock = manual_clock();
    let dedup = engine_builder(&clock, tier, mark_batch)
        .build()
        .expect("valid engine");
    let step_nanos = step_nanos();
    Engine {
        dedup,
        clock,
        step_nanos,
    }
}

fn report_engine(name: &str, d: &Deduper) {
    d.flush().expect("a local tier stores every mark");
    let s: Stats = d.stats();
    let z = d.sizing();
    let keys = s.exact_entries.max(1) as f64;
    eprintln!(
        "[engine {name}] shards {}, new {}, duplicates {}, filter maybe-seen {}, false positives caught {}, \
         over capacity {}, rotations {}; sizing {:.2} bits/key/generation k={} slot capacity/shard {}; \
         filter {} B ({:.2} B/key), exact {} B for {} entries ({:.2} B/key), total {:.2} B/key",
        d.shard_count(),
        s.new,
        s.duplicates,
        s.filter_maybe_seen,
        s.false_positives_caught,
        s.over_capacity,
        s.rotations,
        z.bits_per_key_per_generation,
        z.hashes,
        z.slot_capacity_per_shard,
        s.filter_bytes,
        s.filter_bytes as f64 / keys,
        s.exact_bytes,
        s.exact_entries,
        s.exact_bytes as f64 / keys,
        (s.filter_bytes + s.exact_bytes) as f64 / keys,
    );
}

fn bench_ours(
    g: &mut BenchmarkGroup<'_, WallTime>,
    threads: usize,
    tier: &ExactTier,
    tier_name: &str,
    mark_batch: usize,
    batched: bool,
) {
    let name = format!(
        "ours_{tier_name}{}/{}",
        if mark_batch > 1 {
            format!("_markbatch{mark_batch}")
        } else {
            String::new()
        },
        if batched { "check_batch" } else { "check" }
    );
    let report_name = format!("{name} t{threads}");
    let mut pass = Pass::new();
    g.bench_function(&name, |b| {
        b.iter_custom(|iters| {
            pass.time(
                iters,
                threads,
                || engine(tier, mark_batch),
                |e, batch| {
                    let new = if batched {
                        let mut out = Vec::with_capacity(batch.len());
                        e.dedup.check_batch_into(batch, &mut out);
                        out.iter().filter(|v| v.is_new()).count() as u64
                    } else {
                        batch.iter().filter(|k| e.dedup.check(*k).is_new()).count() as u64
                    };
                    e.clock
                        .advance(Duration::from_nanos(e.step_nanos * batch.len() as u64));
                    new
                },
                |e| report_engine(&report_name, &e.dedup),
            )
        });
    });
}

/// Our `Pipeline`: `workers` threads own the shards; the benchmark thread
/// is the one producer (submitting batches of 4096 with up to 32 in flight),
/// so the process runs `workers + 1` threads.
fn bench_pipeline(g: &mut BenchmarkGroup<'_, WallTime>, workers: usize) {
    let name = format!("ours_memory_pipeline_w{workers}/submit");
    let report_name = format!("{name} (producer + {workers} workers)");
    let mut pass = Pass::new();
    g.bench_function(&name, |b| {
        b.iter_custom(|iters| {
            pass.time_segments(
                iters,
                || {
                    let clock = manual_clock();
                    let pipeline = Pipeline::builder(engine_builder(&clock, &ExactTier::Memory, 1))
                        .workers(workers)
                        .build()
                        .expect("valid pipeline");
                    (pipeline, clock)
                },
                |(pipeline, clock), seg| {
                    let step = step_nanos();
                    let mut producer = pipeline.producer();
                    let mut new = 0u64;
                    let mut count = |v: Vec<tiered_dedup::Verdict>| {
                        new += v.iter().filter(|v| v.is_new()).count() as u64;
                    };
                    for batch in seg.chunks(BATCH) {
                        producer.submit(batch).expect("pipeline running");
                        clock.advance(Duration::from_nanos(step * batch.len() as u64));
                        while producer.in_flight() >= 32 {
                            count(producer.recv().expect("pipeline running"));
                        }
                    }
                    while producer.in_flight() > 0 {
                        count(producer.recv().expect("pipeline running"));
                    }
                    new
                },
                |(pipeline, _)| report_engine(&report_name, pipeline.deduper()),
            )
        });
    });
}

/// Bytes of a hash set of `u128` with `capacity`: 16-byte buckets and one
/// control byte each (a lower bound: tables round their bucket count up).
fn set_bytes(capacity: usize) -> usize {
    capacity * (std::mem::size_of::<u128>() + 1)
}

fn bench_dashset<H>(g: &mut BenchmarkGroup<'_, WallTime>, threads: usize, name: &str)
where
    H: std::hash::BuildHasher + Default + Clone + Send + Sync,
{
    let w = workload();
    let mut pass = Pass::new();
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            pass.time(
                iters,
                threads,
                || DashSet::<u128, H>::with_capacity_and_hasher(w.distinct as usize, H::default()),
                |set, batch| {
                    batch
                        .iter()
                        .filter(|&&k| set.insert(fingerprint(k)))
                        .count() as u64
                },
                |set| {
                    eprintln!(
                        "[engine {name} t{threads}] {} entries, capacity {}, >= {:.2} B/key",
                        set.len(),
                        set.capacity(),
                        set_bytes(set.capacity()) as f64 / set.len() as f64
                    );
                },
            )
        });
    });
}

type HashbrownSet = hashbrown::HashSet<u128, FpBuild>;

fn hashbrown_set(capacity: usize) -> HashbrownSet {
    HashbrownSet::with_capacity_and_hasher(capacity, FpBuild::default())
}

/// One thread: the set sits in a `Mutex` only to be shared with the pass
/// runner; it is locked once per batch of 4096 keys (uncontended).
fn bench_hashbrown(g: &mut BenchmarkGroup<'_, WallTime>) {
    let w = workload();
    let mut pass = Pass::new();
    g.bench_function("hashbrown_u128/insert", |b| {
        b.iter_custom(|iters| {
            pass.time(
                iters,
                1,
                || Mutex::new(hashbrown_set(w.distinct as usize)),
                |set, batch| {
                    let mut set = set.lock().expect("unpoisoned");
                    batch
                        .iter()
                        .filter(|&&k| set.insert(fingerprint(k)))
                        .count() as u64
                },
                |set| {
                    let set = set.lock().expect("unpoisoned");
                    eprintln!(
                        "[engine hashbrown_u128 t1] {} entries, {} B allocated ({:.2} B/key)",
                        set.len(),
                        set.allocation_size(),
                        set.allocation_size() as f64 / set.len() as f64
                    );
                },
            )
        });
    });
}

type ShardedSet = Vec<CachePadded<Mutex<HashbrownSet>>>;

fn bench_mutex_shards(g: &mut BenchmarkGroup<'_, WallTime>, threads: usize) {
    let w = workload();
    let mut pass = Pass::new();
    g.bench_function("mutex_hashbrown_64shards/insert", |b| {
        b.iter_custom(|iters| {
            pass.time(
                iters,
                threads,
                || -> ShardedSet {
                    let per_shard = (w.distinct as usize / MUTEX_SHARDS) * 9 / 8;
                    (0..MUTEX_SHARDS)
                        .map(|_| CachePadded::new(Mutex::new(hashbrown_set(per_shard))))
                        .collect()
                },
                |shards, batch| {
                    batch
                        .iter()
                        .filter(|&&k| {
                            let fp = fingerprint(k);
                            let shard = &shards[(fp as usize) & (MUTEX_SHARDS - 1)];
                            shard.lock().expect("unpoisoned").insert(fp)
                        })
                        .count() as u64
                },
                |shards| {
                    let (len, bytes) = shards.iter().fold((0, 0), |(l, b), s| {
                        let s = s.lock().expect("unpoisoned");
                        (l + s.len(), b + s.allocation_size())
                    });
                    eprintln!(
                        "[engine mutex_hashbrown_64shards t{threads}] {len} entries, {bytes} B allocated ({:.2} B/key)",
                        bytes as f64 / len as f64
                    );
                },
            )
        });
    });
}

fn group(c: &mut Criterion, threads: usize) {
    let w = workload();
    let mut g = c.benchmark_group(format!("engine_exact_{}_t{threads}", w.label));
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements((w.stream.len() / SEGMENTS) as u64));
    bench_ours(&mut g, threads, &ExactTier::Memory, "memory", 1, true);
    bench_ours(&mut g, threads, &ExactTier::Memory, "memory", 1, false);
    bench_ours(&mut g, threads, &ExactTier::Memory, "memory", 64, true);
    bench_ours(&mut g, threads, &ExactTier::DashMap, "dashmap", 1, true);
    bench_ours(&mut g, threads, &ExactTier::DashMap, "dashmap", 1, false);
    if threads > 1 {
        bench_pipeline(&mut g, threads);
    }
    bench_dashset::<FpBuild>(&mut g, threads, "dashset_u128/insert");
    bench_dashset::<std::hash::RandomState>(&mut g, threads, "dashset_u128_siphash/insert");
    if threads == 1 {
        bench_hashbrown(&mut g);
    }
    bench_mutex_shards(&mut g, threads);
    g.finish();
}

/// One timed pass over the whole stream on a fresh state (built untimed).
fn one_pass<S: Sync>(
    threads: usize,
    make: impl Fn() -> S,
    work: impl Fn(&S, &[u64]) -> u64 + Sync,
) -> Duration {
    let w = workload();
    let state = make();
    let start = Instant::now();
    let new = run_threads(&w.stream, threads, &|batch| work(&state, batch));
    let elapsed = start.elapsed();
    assert_eq!(new, w.distinct);
    elapsed
}

/// Whether a paired pass's table is touched before the timed part: `Warm`
/// builds ours with `prefault_tables(true)` and fills each peer with as
/// many other keys as the pass will insert, then clears it (the sets keep
/// their memory). `Cold` leaves every table lazy, so each pass also pays
/// the first touch of its pages — on this VM 0.084 ms/MB when the guest
/// used the memory recently and 2.1–2.4 ms/MB when the host had taken it
/// back, whichever a pass happens to get (`docs/cost-model.md`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Memory {
    Warm,
    Cold,
}

/// Keys that are not in the stream (the stream's are SplitMix64 outputs;
/// these count down from the top), as many as it has distinct.
fn touch_keys() -> impl Iterator<Item = u128> {
    (0..workload().distinct).map(|i| fingerprint(u64::MAX - i))
}

fn pass_ours(threads: usize, memory: Memory) -> Duration {
    one_pass(
        threads,
        || {
            let clock = manual_clock();
            let dedup = engine_builder(&clock, &ExactTier::Memory, 1)
                .prefault_tables(memory == Memory::Warm)
                .build()
                .expect("valid engine");
            Engine {
                dedup,
                clock,
                step_nanos: step_nanos(),
            }
        },
        |e, batch| {
            let mut out = Vec::with_capacity(batch.len());
            e.dedup.check_batch_into(batch, &mut out);
            e.clock
                .advance(Duration::from_nanos(e.step_nanos * batch.len() as u64));
            out.iter().filter(|v| v.is_new()).count() as u64
        },
    )
}

/// The paired passes' `DashSet` peer, as the map it wraps
/// (`DashSet<K>` is a `DashMap<K, ()>`; the map's shards can be cleared
/// without tombstones).
fn pass_dashset(threads: usize, memory: Memory) -> Duration {
    one_pass(
        threads,
        || {
            let mut set = DashMap::<u128, (), FpBuild>::with_capacity_and_hasher(
                workload().distinct as usize,
                FpBuild::default(),
            );
            if memory == Memory::Warm {
                let capacity = set.capacity();
                touch_keys().for_each(|fp| {
                    set.insert(fp, ());
                });
                // `DashMap::clear` erases entry by entry and leaves
                // tombstones that a later insert rehashes away; a shard's
                // own `clear` marks every bucket empty and keeps the memory.
                for shard in set.shards_mut() {
                    shard.get_mut().clear();
                }
                assert_eq!(set.capacity(), capacity, "the touch changed the set");
            }
            set
        },
        |set, batch| {
            batch
                .iter()
                .filter(|&&k| set.insert(fingerprint(k), ()).is_none())
                .count() as u64
        },
    )
}

fn pass_hashbrown(memory: Memory) -> Duration {
    one_pass(
        1,
        || {
            let mut set = hashbrown_set(workload().distinct as usize);
            if memory == Memory::Warm {
                let capacity = set.capacity();
                set.extend(touch_keys());
                set.clear();
                assert_eq!(set.capacity(), capacity, "the touch grew the set");
            }
            Mutex::new(set)
        },
        |set, batch| {
            let mut set = set.lock().expect("unpoisoned");
            batch
                .iter()
                .filter(|&&k| set.insert(fingerprint(k)))
                .count() as u64
        },
    )
}

/// `TD_BENCH_PAIRED=N`: before the criterion groups, N rounds of whole
/// passes alternating ours (memory tier, `check_batch`) with a peer (order
/// flipped every round), printing each round's ratio and the median. On a
/// shared machine whose speed drifts over minutes, ratios of adjacent
/// passes are steadier than ratios of criterion benchmarks run minutes apart.
fn paired(_c: &mut Criterion) {
    let Some(rounds) = env_number::<usize>("TD_BENCH_PAIRED").filter(|&n| n > 0) else {
        return;
    };
    let memories: &[Memory] = match std::env::var("TD_BENCH_MEMORY").as_deref() {
        Ok("warm") => &[Memory::Warm],
        Ok("cold") => &[Memory::Cold],
        _ => &[Memory::Warm, Memory::Cold],
    };
    let keys = workload().stream.len() as f64;
    for &memory in memories {
        let peers: [(&str, usize, &dyn Fn() -> Duration); 3] = [
            ("hashbrown_u128 t1", 1, &|| pass_hashbrown(memory)),
            ("dashset_u128 t1", 1, &|| pass_dashset(1, memory)),
            ("dashset_u128 t2", 2, &|| pass_dashset(2, memory)),
        ];
        for (peer, threads, run_peer) in peers {
            let mut ratios = Vec::new();
            paired_rounds(
                rounds,
                Order::Alternate,
                &mut [&mut || pass_ours(threads, memory), &mut || run_peer()],
                |round, times| {
                    let (o, p) = (keys / times[0].as_secs_f64(), keys / times[1].as_secs_f64());
                    eprintln!(
                        "[paired {memory:?}] round {round}: ours_memory/check_batch t{threads} {:.2} Melem/s, {peer} {:.2} Melem/s, ratio {:.2}",
                        o / 1e6,
                        p / 1e6,
                        o / p
                    );
                    ratios.push(o / p);
                },
            );
            let r = spread(ratios);
            eprintln!(
                "[paired {memory:?}] ours_memory/check_batch t{threads} / {peer}: median {:.2}x (min {:.2}, max {:.2}, {rounds} rounds)",
                r.median, r.min, r.max
            );
        }
    }
}

fn one_thread(c: &mut Criterion) {
    group(c, 1);
}

fn two_threads(c: &mut Criterion) {
    group(c, 2);
}

criterion_group!(benches, paired, one_thread, two_threads);
criterion_main!(benches);
