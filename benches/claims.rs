//! Claims on the memory tier against a hand-written `DashMap` store doing
//! the same state machine: 10⁶ distinct keys with 10% repeats (a seeded
//! stream in arrival order, each repeat a uniformly chosen earlier key),
//! every acquired key committed with a 100-byte result, on 1 and 2 threads.
//!
//! - ours: `claim_batch` of 1024 requests, then `commit_batch` of the
//!   acquired leases (one lock per shard per call); a one-hour window, a
//!   one-hour lease, `expected_keys(10⁶)`, a manual clock moved after every
//!   batch so the stream spans 99% of the window (as the engine bench);
//! - peer: `DashMap<u128, Record>` (pass-through hasher on the same
//!   xxh3-128 fingerprint), `Record = Held { token, until } | Done { at,
//!   result: Box<[u8]> }`, a claim per key through the entry API (held and
//!   live: in progress; done within the window: completed; else held), then
//!   a commit per acquired key (`get_mut`, token compared, the result
//!   boxed) — the per-request idempotency store a service writes by hand.
//!
//! Both answer the same: every pass asserts that exactly the distinct keys
//! were acquired and every repeat answered completed or (a repeat of a key
//! claimed earlier in the same batch, or by the other thread and not yet
//! committed) in progress. Passes alternate ours and the peer (`TD_BENCH_PAIRED=N`
//! rounds, default 5) and the ratio of each round's pair is printed; the
//! criterion groups time whole passes too.
//!
//! With the `redis` feature the bench also runs claims on the Redis tier
//! against the per-request Redis pattern (`benches/claims/redis.rs`);
//! a filter argument runs only the parts whose name holds it.
//!
//! ```text
//! cargo bench --bench claims
//! cargo bench --features redis --bench claims -- claims-redis
//! ```

#[cfg(feature = "redis")]
#[path = "claims/redis.rs"]
mod redis_part;
#[cfg(feature = "redis")]
#[path = "../tests/support/redis_server.rs"]
mod redis_server;
// The Redis part's meters (CPU of `redis-server`, its memory); not in
// `support`, which benches of other packages include too.
#[cfg(feature = "redis")]
#[path = "support/redis_meter.rs"]
#[allow(dead_code)] // the meter reads more than this bench prints
mod redis_meter;
mod support;
use support::{
    env_number, growing_stream, manual_clock, paired_rounds, smoke_test, spread, Order, Until,
};

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use dashmap::DashMap;
use tiered_dedup::{Claim, ClaimRequest, Clock, Deduper, Key, Lease, ManualClock, Namespace};

/// Requests per claim batch.
const BATCH: usize = 1024;
/// Bytes of every committed result.
const RESULT: [u8; 100] = [0x5A; 100];
const WINDOW: Duration = Duration::from_secs(3600);
/// Long enough that the other thread moving the manual clock never expires
/// a lease between its claim and its commit.
const LEASE: Duration = Duration::from_secs(3600);

/// The stream: 10⁶ distinct keys (10⁵ in smoke mode), 10% repeats.
fn stream() -> &'static (Vec<u64>, u64) {
    static S: OnceLock<(Vec<u64>, u64)> = OnceLock::new();
    S.get_or_init(|| {
        let distinct = if smoke_test() { 100_000 } else { 1_000_000 };
        let (keys, distinct) = growing_stream(1, Until::Distinct(distinct));
        eprintln!(
            "[claims] stream: {} keys, {distinct} distinct, {} repeats",
            keys.len(),
            keys.len() as u64 - distinct
        );
        (keys, distinct)
    })
}

/// What a pass answered: acquired (and committed), completed, in progress.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Answers {
    acquired: u64,
    completed: u64,
    in_progress: u64,
}

impl std::ops::AddAssign for Answers {
    fn add_assign(&mut self, o: Answers) {
        self.acquired += o.acquired;
        self.completed += o.completed;
        self.in_progress += o.in_progress;
    }
}

/// Batches dealt round-robin to `threads` workers.
fn run_threads(threads: usize, work: &(dyn Fn(&[u64]) -> Answers + Sync)) -> Answers {
    let (keys, _) = stream();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut total = Answers::default();
                    for batch in keys.chunks(BATCH).skip(t).step_by(threads) {
                        total += work(batch);
                    }
                    total
                })
            })
            .collect();
        let mut total = Answers::default();
        for h in handles {
            total += h.join().expect("worker");
        }
        total
    })
}

/// The engine on a manual clock that a stream moves through 99% of the
/// window (keys arrive at the rate it was sized for, spread over its
/// slices, as in the engine bench).
fn ours() -> (Deduper, ManualClock) {
    let clock = manual_clock();
    let dedup = Deduper::builder()
        .window(WINDOW)
        .expected_keys(stream().1)
        .clock(Clock::Manual(clock.clone()))
        .lease_duration(LEASE)
        .max_result_bytes(RESULT.len())
        .build()
        .expect("bench configuration");
    (dedup, clock)
}

/// The clock's step per batch: the stream spans 99% of the window.
fn step() -> Duration {
    let batches = stream().0.len().div_ceil(BATCH) as f64;
    WINDOW.mul_f64(0.99 / batches)
}

/// One batch through the engine: claim all, commit the acquired.
fn ours_batch(dedup: &Deduper, batch: &[u64]) -> Answers {
    let requests: Vec<ClaimRequest<u64>> = batch.iter().map(|&k| ClaimRequest::new(k)).collect();
    let mut answers = Answers::default();
    let mut commits: Vec<(Lease<&Deduper>, &[u8])> = Vec::with_capacity(batch.len());
    for claim in dedup.claim_batch(&requests) {
        match claim {
            Claim::Acquired(lease) => commits.push((lease, &RESULT)),
            Claim::Completed { .. } => answers.completed += 1,
            Claim::InProgress { .. } => answers.in_progress += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    for committed in dedup.commit_batch(commits) {
        committed.expect("a live lease commits");
        answers.acquired += 1;
    }
    answers
}

/// Passes a fingerprint's high half through as the hash.
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

/// The hand-written store's record.
enum Record {
    Held { token: u64, until: u64 },
    Done { at: u64, result: Box<[u8]> },
}

/// The hand-written per-request store: a `DashMap` of records.
struct Peer {
    map: DashMap<u128, Record, BuildHasherDefault<FpHasher>>,
    tokens: AtomicU64,
    started: Instant,
}

impl Peer {
    fn new() -> Self {
        Peer {
            map: DashMap::with_capacity_and_hasher(stream().1 as usize, Default::default()),
            tokens: AtomicU64::new(1),
            started: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn batch(&self, batch: &[u64]) -> Answers {
        let mut answers = Answers::default();
        let mut acquired = Vec::with_capacity(batch.len());
        let window = WINDOW.as_nanos() as u64;
        let lease = LEASE.as_nanos() as u64;
        for &k in batch {
            let fp = k.fingerprint(Namespace::default()).0;
            let mut entry = self
                .map
                .entry(fp)
                .or_insert_with(|| Record::Held { token: 0, until: 0 });
            // Read under the entry's lock: a time read before it can be
            // older than the `at` another thread has just committed.
            let now = self.now();
            let take = match &*entry {
                Record::Held { until, .. } if now < *until => {
                    answers.in_progress += 1;
                    false
                }
                Record::Done { at, result } if now.saturating_sub(*at) < window => {
                    // The stored result is what a retry replays.
                    std::hint::black_box(&result[..]);
                    answers.completed += 1;
                    false
                }
                _ => true,
            };
            if take {
                let token = self.tokens.fetch_add(1, Ordering::Relaxed);
                *entry = Record::Held {
                    token,
                    until: now + lease,
                };
                acquired.push((fp, token, now));
            }
        }
        for (fp, token, at) in acquired {
            let mut entry = self.map.get_mut(&fp).expect("held");
            match &*entry {
                Record::Held { token: t, until } if *t == token && self.now() < *until => {
                    *entry = Record::Done {
                        at,
                        result: Box::from(&RESULT[..]),
                    };
                    answers.acquired += 1;
                }
                _ => panic!("the peer lost a lease"),
            }
        }
        answers
    }
}

fn expect(answers: Answers, threads: usize) {
    let (keys, distinct) = stream();
    assert_eq!(
        answers.acquired, *distinct,
        "every distinct key acquired once"
    );
    assert_eq!(
        answers.completed + answers.in_progress,
        keys.len() as u64 - distinct
    );
    let _ = threads;
}

fn ours_pass(threads: usize) -> Duration {
    let (dedup, clock) = ours();
    let step = step();
    let start = Instant::now();
    let answers = run_threads(threads, &|batch| {
        clock.advance(step);
        ours_batch(&dedup, batch)
    });
    let elapsed = start.elapsed();
    expect(answers, threads);
    elapsed
}

fn peer_pass(threads: usize) -> Duration {
    let peer = Peer::new();
    let start = Instant::now();
    let answers = run_threads(threads, &|batch| peer.batch(batch));
    let elapsed = start.elapsed();
    expect(answers, threads);
    elapsed
}

/// True unless a filter argument was given that `name` does not hold.
fn wanted(name: &str) -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .is_none_or(|filter| name.contains(&filter))
}

/// Paired rounds: ours and the peer alternate, each round's ratio printed,
/// then the medians.
fn paired(_c: &mut Criterion) {
    if !wanted("claims/paired") {
        return;
    }
    let rounds = if smoke_test() {
        1
    } else {
        env_number("TD_BENCH_PAIRED").unwrap_or(5)
    };
    let keys = stream().0.len() as f64;
    for threads in [1, 2] {
        let mut ours_run = || ours_pass(threads).as_secs_f64();
        let mut peer_run = || peer_pass(threads).as_secs_f64();
        let results = paired_rounds(
            rounds,
            Order::Alternate,
            &mut [&mut ours_run, &mut peer_run],
            |round, r| {
                eprintln!(
                    "[claims] {threads} thread(s) round {round}: ours {:.2} M keys/s, DashMap store {:.2} M keys/s, ratio {:.2}",
                    keys / r[0] / 1e6,
                    keys / r[1] / 1e6,
                    r[1] / r[0]
                );
            },
        );
        let ours_rate = spread(results[0].iter().map(|s| keys / s / 1e6));
        let peer_rate = spread(results[1].iter().map(|s| keys / s / 1e6));
        let ratio = spread(results[0].iter().zip(&results[1]).map(|(o, p)| p / o));
        eprintln!(
            "[claims] {threads} thread(s), median of {rounds}: ours {:.2} M keys/s ({:.2}–{:.2}), DashMap store {:.2} M keys/s, ratio {:.2} ({:.2}–{:.2})",
            ours_rate.median, ours_rate.min, ours_rate.max, peer_rate.median, ratio.median, ratio.min, ratio.max
        );
    }
    let (dedup, clock) = ours();
    let step = step();
    run_threads(1, &|batch| {
        clock.advance(step);
        ours_batch(&dedup, batch)
    });
    let stats = dedup.stats();
    eprintln!(
        "[claims] memory: {} entries, {} bytes of exact tier ({:.1} B per completed record with a {}-byte result)",
        stats.exact_entries,
        stats.exact_bytes,
        stats.exact_bytes as f64 / stats.exact_entries as f64,
        RESULT.len()
    );
}

fn timed(c: &mut Criterion) {
    let keys = stream().0.len() as u64;
    let mut g = c.benchmark_group(format!("claims/n{}_dup10_result100", stream().1));
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Elements(keys));
    for threads in [1, 2] {
        g.bench_function(format!("ours/{threads}-threads"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| ours_pass(threads)).sum());
        });
        g.bench_function(format!("dashmap-store/{threads}-threads"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| peer_pass(threads)).sum());
        });
    }
    g.finish();
}

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    if wanted("claims-redis") {
        redis_part::redis_claims(c);
    }
}

#[cfg(feature = "redis")]
criterion_group!(benches, paired, timed, redis);
#[cfg(not(feature = "redis"))]
criterion_group!(benches, paired, timed);
criterion_main!(benches);
