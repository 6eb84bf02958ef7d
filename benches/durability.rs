//! Durability: the engine logging to a directory (`os`; `sync` with a 10 ms
//! group commit) against the same engine in memory (`none`), and redb used
//! as a set, on the engine bench's stream — 10⁷ distinct keys with 30%
//! repeats (14 285 720 `u64` keys, shuffled with a seeded SplitMix64), 2
//! threads taking batches of 4096 round-robin, a one-hour window on a
//! `ManualClock` moved after every batch so the stream spans 99% of it.
//!
//! - `none`: `check_batch_into`, no directory;
//! - `os`: `open(dir)` with `Durability::Os`, `check_batch_into`: each
//!   batch's records are written (one `write`) before its verdicts return;
//! - `sync_10ms`: `Durability::sync(10 ms)`; each thread keeps up to 128
//!   batches in flight (`check_batch_into_deferred`; 2 × 0.5 M keys, about
//!   70 ms of the in-memory engine's work) and waits for a batch's group
//!   commit (write + `fdatasync`) when it is 128 batches old, as a stream
//!   processor acknowledging upstream after durability does;
//! - peers: redb 2.6 (a copy-on-write B-tree, pure Rust) as a set of the
//!   same 128-bit fingerprints: one write transaction per batch (`insert`
//!   answers whether the key was there), committed with
//!   `Durability::Immediate` (`fsync` per commit, the `sync` anchor) or
//!   `Durability::Eventual` (written, not synced: the `os` anchor; its
//!   `None` never frees a page and filled the disk). Its writes serialize
//!   (one write transaction at a time), and a copy-on-write B-tree copies a
//!   leaf per random key, so a whole pass takes minutes: redb is measured on
//!   the stream's first tenth (1.43 M keys, 10⁶ distinct, its table growing
//!   to 10⁶ keys, faster per key than at 10⁷), one hundredth per iteration.
//!
//! Checkpoints are automatic at their defaults (due at 256 MiB of log): a
//! pass over 10⁷ keys (170 MB of log) takes none, so the figures are the
//! log's own cost; after the first pass of each durable mode the cost of a
//! checkpoint of its 10⁷ keys, and the time to reopen from it, are printed.
//! `TD_BENCH_CHECKPOINT_MIB=64` makes passes take one (at 64 MiB of log). One criterion
//! iteration is a tenth of the stream on a fresh engine or store every ten
//! (ten samples are one pass). Every pass asserts that exactly the distinct
//! keys were new. After the first pass of each durable mode, its log bytes
//! per key, checkpoints, and the time to reopen it (checkpoint + log replay)
//! are printed to stderr.
//!
//! `TD_BENCH_PAIRED=N` first runs N rounds of whole passes of `none`, `os`
//! and `sync_10ms` next to each other (order rotating) and prints each
//! round's keys/s and the median ratios to `none`: on a shared machine
//! whose speed drifts, adjacent passes compare better than benchmarks run
//! minutes apart.
//!
//! With `--test` (criterion's smoke mode) the stream is cut to 10⁵ distinct
//! keys.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench durability
//! ```

mod support;
use support::{
    engine_on, env_number, manual_clock, paired_rounds, smoke_test, spread, Order, Workload, BATCH,
    STREAM_SPAN, WINDOW,
};

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use tiered_dedup::{Deduper, Durability, Key, ManualClock, Namespace, Verdict};

const DUP_FRACTION: f64 = 0.3;
const SEED: u64 = 0x5EED_E261_0E00_0002;
const THREADS: usize = 2;
/// Batches a `sync` thread keeps in flight before it waits for the oldest.
const IN_FLIGHT: usize = 128;
/// Criterion iterations per pass.
const SEGMENTS: usize = 10;

fn workload() -> &'static Workload {
    static W: OnceLock<Workload> = OnceLock::new();
    W.get_or_init(|| {
        let distinct: u64 = if smoke_test() { 100_000 } else { 10_000_000 };
        Workload::shuffled("durability", SEED, distinct, DUP_FRACTION, SEGMENTS as u64)
    })
}

/// Nanoseconds the clock moves per key: the stream spans 99% of the window.
fn step() -> u64 {
    (WINDOW.as_nanos() as f64 * STREAM_SPAN / workload().stream.len() as f64) as u64
}

/// The system under test for one pass.
enum Subject {
    Engine {
        engine: Box<Deduper>,
        clock: ManualClock,
        deferred: bool,
        dir: Option<tempfile::TempDir>,
    },
    Redb {
        db: redb::Database,
        durability: redb::Durability,
        _dir: tempfile::TempDir,
    },
}

const TABLE: redb::TableDefinition<u128, u64> = redb::TableDefinition::new("keys");

#[derive(Clone, Copy)]
enum Kind {
    Ours(Durability, bool),
    Redb(redb::Durability),
}

fn make(kind: Kind) -> Subject {
    let distinct = workload().distinct;
    match kind {
        Kind::Ours(durability, deferred) => {
            let clock = manual_clock();
            let mut builder = engine_on(&clock, distinct).durability(durability);
            if let Some(mib) = env_number::<u64>("TD_BENCH_CHECKPOINT_MIB") {
                builder = builder.checkpoint_log_bytes(mib << 20);
            }
            let (engine, dir) = if durability.is_none() {
                (builder.build().expect("engine"), None)
            } else {
                let dir = tempfile::tempdir_in(bench_dir()).expect("scratch directory");
                (builder.open(dir.path()).expect("open"), Some(dir))
            };
            Subject::Engine {
                engine: Box::new(engine),
                clock,
                deferred,
                dir,
            }
        }
        Kind::Redb(durability) => {
            let dir = tempfile::tempdir_in(bench_dir()).expect("scratch directory");
            let db = redb::Database::create(dir.path().join("set.redb")).expect("redb");
            Subject::Redb {
                db,
                durability,
                _dir: dir,
            }
        }
    }
}

/// Scratch directories on the disk the target directory is on (not a
/// tmpfs /tmp, which would make `fdatasync` free).
fn bench_dir() -> PathBuf {
    let dir = std::env::var_os("TD_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target").join("bench-durability"));
    std::fs::create_dir_all(&dir).expect("bench directory");
    dir
}

/// One thread's share of a segment: its batches, in order; new keys.
fn work(subject: &Subject, batches: &[&[u64]]) -> u64 {
    let mut new = 0u64;
    match subject {
        Subject::Engine {
            engine,
            clock,
            deferred,
            ..
        } => {
            let mut verdicts = Vec::with_capacity(BATCH);
            let mut waiting: VecDeque<(tiered_dedup::Unsettled, u64)> = VecDeque::new();
            for batch in batches {
                clock.advance(Duration::from_nanos(step() * batch.len() as u64));
                if *deferred {
                    let u = engine.check_batch_into_deferred(batch, &mut verdicts);
                    let n = verdicts.iter().filter(|v| v.is_new()).count() as u64;
                    waiting.push_back((u, n));
                    if waiting.len() > IN_FLIGHT {
                        let (u, n) = waiting.pop_front().expect("in flight");
                        u.wait(engine).expect("durable");
                        new += n;
                    }
                } else {
                    engine.check_batch_into(batch, &mut verdicts);
                    new += verdicts.iter().filter(|v| **v == Verdict::New).count() as u64;
                }
            }
            for (u, n) in waiting {
                u.wait(engine).expect("durable");
                new += n;
            }
        }
        Subject::Redb { db, durability, .. } => {
            for batch in batches {
                let mut txn = db.begin_write().expect("transaction");
                txn.set_durability(*durability);
                {
                    let mut table = txn.open_table(TABLE).expect("table");
                    for &k in *batch {
                        let fp = k.fingerprint(Namespace::default()).0;
                        if table.insert(fp, 1).expect("insert").is_none() {
                            new += 1;
                        }
                    }
                }
                txn.commit().expect("commit");
            }
        }
    }
    new
}

/// Runs `segment` on `THREADS` threads, batches dealt round-robin.
fn run_segment(subject: &Subject, segment: &[u64]) -> u64 {
    let batches: Vec<&[u64]> = segment.chunks(BATCH).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let mine: Vec<&[u64]> = batches.iter().skip(t).step_by(THREADS).copied().collect();
                s.spawn(move || work(subject, &mine))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).sum()
    })
}

/// A pass in `SEGMENTS` timed pieces on one subject (see `benches/engine.rs`).
struct Pass {
    subject: Option<Subject>,
    segment: usize,
    new: u64,
    reported: bool,
}

/// redb's iterations: a hundredth of the stream each, a pass ten of them
/// (the stream's first tenth).
const REDB_SEGMENTS: usize = 100;

impl Pass {
    fn time(&mut self, iters: u64, kind: Kind, name: &str) -> Duration {
        let w = workload();
        let (seg_len, pass_segments, distinct) = match kind {
            Kind::Ours(..) => (w.stream.len() / SEGMENTS, SEGMENTS, w.distinct),
            Kind::Redb(_) => {
                let len = w.stream.len() / REDB_SEGMENTS;
                (len, SEGMENTS, distinct_in(&w.stream[..len * SEGMENTS]))
            }
        };
        let per_iter = if smoke_test() { pass_segments } else { 1 };
        let mut total = Duration::ZERO;
        for _ in 0..iters as usize * per_iter {
            let subject = self.subject.get_or_insert_with(|| make(kind));
            let seg = &w.stream[self.segment * seg_len..(self.segment + 1) * seg_len];
            let start = Instant::now();
            self.new += run_segment(subject, seg);
            total += start.elapsed();
            self.segment += 1;
            if self.segment == pass_segments {
                let done = self.subject.take().expect("running");
                assert_eq!(self.new, distinct, "{name}: every distinct key New once");
                if !self.reported {
                    // Reported after every measurement: the reopens and the
                    // checkpoint write hundreds of MB, whose write-back
                    // would slow the passes timed next.
                    if let Subject::Engine { dir: Some(_), .. } = done {
                        lock(&FINISHED).push((name.to_owned(), done));
                    }
                    self.reported = true;
                }
                self.segment = 0;
                self.new = 0;
            }
        }
        total
    }
}

/// The first finished pass of each durable mode, reported at the end.
static FINISHED: std::sync::Mutex<Vec<(String, Subject)>> = std::sync::Mutex::new(Vec::new());

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Distinct keys in `keys`.
fn distinct_in(keys: &[u64]) -> u64 {
    keys.iter().collect::<std::collections::HashSet<_>>().len() as u64
}

/// Prints a durable engine's log bytes per key, checkpoints and the time to
/// reopen its directory.
fn report(subject: Subject, name: &str) {
    let Subject::Engine {
        engine,
        dir: Some(dir),
        ..
    } = subject
    else {
        return;
    };
    let distinct = workload().distinct;
    let stats = engine.durability_stats().expect("durable");
    let durability = engine.durability();
    drop(engine);
    let clock = manual_clock();
    let started = Instant::now();
    let engine = engine_on(&clock, distinct)
        .durability(durability)
        .open(dir.path())
        .expect("reopen");
    let restart = started.elapsed();
    let recovery = engine.recovery().expect("durable").clone();
    let held = engine.stats().exact_entries;
    // A checkpoint of everything, and a reopen from it alone.
    let started = Instant::now();
    engine.checkpoint().expect("checkpoint");
    let checkpoint = started.elapsed();
    let checkpoint_bytes = engine.durability_stats().expect("durable").checkpoint_bytes;
    drop(engine);
    let started = Instant::now();
    let engine = engine_on(&clock, distinct)
        .durability(durability)
        .open(dir.path())
        .expect("reopen");
    let from_checkpoint = started.elapsed();
    eprintln!(
        "[durability] {name}: a checkpoint of {held} keys: {checkpoint_bytes} bytes ({:.1} per \
         key) in {:.0} ms; reopen from it {:.0} ms = {:.0} ms per million keys",
        checkpoint_bytes as f64 / held as f64,
        checkpoint.as_secs_f64() * 1e3,
        from_checkpoint.as_secs_f64() * 1e3,
        from_checkpoint.as_secs_f64() * 1e3 / (held as f64 / 1e6),
    );
    drop(engine);
    eprintln!(
        "[durability] {name}: log {:.2} bytes per accepted key ({} bytes, {} frames, {} syncs), \
         {} checkpoints (last {} bytes, {:.0} ms); reopen {:.0} ms for {held} keys = {:.0} ms per \
         million keys (checkpoint + {} records of the log replayed, {} ops)",
        stats.bytes_written as f64 / distinct as f64,
        stats.bytes_written,
        stats.frames_written,
        stats.syncs,
        stats.checkpoints,
        stats.checkpoint_bytes,
        stats.last_checkpoint.as_secs_f64() * 1e3,
        restart.as_secs_f64() * 1e3,
        restart.as_secs_f64() * 1e3 / (held as f64 / 1e6),
        recovery.records,
        recovery.operations,
    );
}

/// One whole pass of `kind` on a fresh subject: keys/s.
fn whole_pass(kind: Kind) -> f64 {
    let w = workload();
    let subject = make(kind);
    let seg_len = w.stream.len() / SEGMENTS;
    let start = Instant::now();
    let new: u64 = (0..SEGMENTS)
        .map(|i| run_segment(&subject, &w.stream[i * seg_len..(i + 1) * seg_len]))
        .sum();
    let rate = w.stream.len() as f64 / start.elapsed().as_secs_f64();
    assert_eq!(new, w.distinct);
    rate
}

/// `TD_BENCH_PAIRED` rounds (see the module docs).
fn paired() {
    let Some(rounds) = env_number::<usize>("TD_BENCH_PAIRED") else {
        return;
    };
    let mut none = || whole_pass(Kind::Ours(Durability::None, false));
    let mut os = || whole_pass(Kind::Ours(Durability::Os, false));
    let mut sync = || {
        whole_pass(Kind::Ours(
            Durability::sync(Duration::from_millis(10)),
            true,
        ))
    };
    let results = paired_rounds(
        rounds,
        Order::Rotate,
        &mut [&mut none, &mut os, &mut sync],
        |round, r| {
            eprintln!(
                "[durability] paired round {round}: none {:.2} M/s, os {:.2} M/s ({:.0}%), sync_10ms {:.2} M/s ({:.0}%)",
                r[0] / 1e6,
                r[1] / 1e6,
                100.0 * r[1] / r[0],
                r[2] / 1e6,
                100.0 * r[2] / r[0]
            );
        },
    );
    for (name, k) in [("os", 1), ("sync_10ms", 2)] {
        let ratios = spread((0..rounds).map(|r| results[k][r] / results[0][r]));
        eprintln!(
            "[durability] paired, {rounds} rounds: {name} / none = {:.2} (min {:.2}, max {:.2})",
            ratios.median, ratios.min, ratios.max
        );
    }
}

fn bench(c: &mut Criterion) {
    paired();
    let w = workload();
    let mut g = c.benchmark_group(format!("durability/{}_t{THREADS}", w.label));
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(SEGMENTS);
    g.warm_up_time(Duration::from_millis(1));
    let kinds: [(&str, Kind); 5] = [
        ("none", Kind::Ours(Durability::None, false)),
        ("os", Kind::Ours(Durability::Os, false)),
        (
            "sync_10ms",
            Kind::Ours(Durability::sync(Duration::from_millis(10)), true),
        ),
        ("redb_eventual", Kind::Redb(redb::Durability::Eventual)),
        ("redb_immediate", Kind::Redb(redb::Durability::Immediate)),
    ];
    for (name, kind) in kinds {
        let per_iteration = match kind {
            Kind::Ours(..) => w.stream.len() / SEGMENTS,
            Kind::Redb(_) => w.stream.len() / REDB_SEGMENTS,
        };
        g.throughput(Throughput::Elements(per_iteration as u64));
        let mut pass = Pass {
            subject: None,
            segment: 0,
            new: 0,
            reported: false,
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| pass.time(iters, kind, name))
        });
    }
    g.finish();
    for (name, subject) in lock(&FINISHED).drain(..) {
        report(subject, &name);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
