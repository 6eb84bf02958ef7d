//! The Redis exact tier under faults, against a private `redis-server`:
//! `kill -9` mid-stream then a restart, and `SIGSTOP` for a second then
//! `SIGCONT`. For each [`FailurePolicy`], in owned and shared modes:
//!
//! - every verdict keeps the policy's promise (fail closed: a key that
//!   needs Redis is `Unavailable`, never wrongly `New`; fail open: never
//!   `Unavailable`; fallback: this process's duplicates still caught);
//! - the tier reconnects once the server is back, within a deadline (no
//!   hang), and every call returns within a bound (no hang);
//! - after recovery every accepted key's mark is in Redis: the test counts
//!   the hash fields;
//! - the tier's counters say what happened.
//!
//! Servers that must keep what they held across `kill -9` run with
//! `--appendonly yes --appendfsync always`.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/rng.rs"]
mod rng;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use rng::Rng;
use tiered_dedup::exact::redis::{FailurePolicy, RedisConfig, RedisStats, RedisTier};
use tiered_dedup::{Affinity, Clock, Deduper, ExactTier, ManualClock, Timestamp, Verdict};

const SHARDS: usize = 4;
const WINDOW: Duration = Duration::from_secs(60);
/// The request timeout of every engine here.
const TIMEOUT: Duration = Duration::from_millis(100);
/// No single call may take longer (a hang).
const CALL_BOUND: Duration = Duration::from_secs(2);
/// The tier must be back this long after the server is.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(5);
/// The main stream runs in slice `MAIN_START / slice` (window 60 s: 10 s
/// slices), so every mark it makes lands in hashes named `…:120:<bucket>`.
const MAIN_START: u64 = 1_200;
const MAIN_SLICE: &str = "120";

const DURABLE: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// Redis up, before the fault.
    Before,
    /// Killed or stopped.
    Down,
    /// Restarted or resumed; the tier may not have noticed yet.
    Recovering,
    /// The tier answered a whole step without a failure.
    Up,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `kill -9`, then a restart on the same port.
    Kill,
    /// `SIGSTOP` for a second, then `SIGCONT`.
    Pause,
}

/// One engine on one server, a stream of batches and what the test knows
/// about every key.
struct Run {
    server: RedisServer,
    /// The server keeps its data across `kill -9` (append-only file).
    durable: bool,
    d: Deduper,
    stats: Arc<RedisStats>,
    clock: ManualClock,
    policy: FailurePolicy,
    affinity: Affinity,
    rng: Rng,
    next_id: u64,
    issued: Vec<u64>,
    /// Key → (time of its latest acceptance, phase it was accepted in).
    accepted: HashMap<u64, (u64, Phase)>,
    /// Keys answered `Unavailable`: the caller retries them.
    retry: Vec<u64>,
    phase: Phase,
    /// Verdicts per phase: (new, duplicate, unavailable).
    tally: HashMap<Phase, (u64, u64, u64)>,
}

impl Run {
    fn new(policy: FailurePolicy, affinity: Affinity, durable: bool) -> Run {
        Self::with_config(policy, affinity, durable, |c| c)
    }

    fn with_config(
        policy: FailurePolicy,
        affinity: Affinity,
        durable: bool,
        configure: impl FnOnce(RedisConfig) -> RedisConfig,
    ) -> Run {
        let server = if durable {
            RedisServer::start_with(DURABLE)
        } else {
            RedisServer::start()
        };
        let tier = RedisTier::new(configure(RedisConfig {
            policy,
            timeout: TIMEOUT,
            ..RedisConfig::new(&server.url())
        }));
        let stats = tier.stats();
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let d = Deduper::builder()
            .window(WINDOW)
            .expected_keys(100_000)
            .shards(SHARDS)
            .mark_batch(64)
            .affinity(affinity)
            .clock(Clock::Manual(clock.clone()))
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap();
        let mut run = Run {
            server,
            durable,
            d,
            stats,
            clock,
            policy,
            affinity,
            rng: Rng::new(policy as u64 * 10 + affinity as u64),
            next_id: 1_000_000,
            issued: Vec::new(),
            accepted: HashMap::new(),
            retry: Vec::new(),
            phase: Phase::Before,
            tally: HashMap::new(),
        };
        run.warm_up();
        run
    }

    /// A fresh engine on a persistent tier has a cold filter: every key is
    /// confirmed by Redis until a whole window has passed. Check some keys,
    /// then move past the window so the owned-mode filter may answer alone.
    fn warm_up(&mut self) {
        let keys: Vec<u64> = (0..400).collect();
        assert!(self.d.check_batch(&keys).iter().all(|v| v.is_new()));
        let _ = self.d.flush();
        self.clock.set(Timestamp::from_secs(MAIN_START));
        assert_eq!(self.failures(), 0, "Redis failed before any fault");
    }

    fn failures(&self) -> u64 {
        self.stats.failures.load(Ordering::Relaxed)
    }

    fn degraded(&self) -> u64 {
        self.stats.degraded_decisions.load(Ordering::Relaxed)
    }

    fn unsent(&self) -> u64 {
        self.stats.marks_unsent.load(Ordering::Relaxed)
    }

    /// One batch: the keys to retry, then 200 keys, a fifth of them repeats
    /// of keys issued before. Checks every verdict against what the policy
    /// promises; returns whether the tier failed during the batch.
    fn step(&mut self) -> bool {
        self.clock.advance(Duration::from_millis(1));
        let now = self.clock.now().as_nanos();
        let mut keys: Vec<u64> = std::mem::take(&mut self.retry);
        for _ in 0..200 {
            if !self.issued.is_empty() && self.rng.chance(0.2) {
                keys.push(self.issued[self.rng.below(self.issued.len() as u64) as usize]);
            } else {
                keys.push(self.next_id);
                self.issued.push(self.next_id);
                self.next_id += 1;
            }
        }
        let failures = self.failures();
        let start = Instant::now();
        let verdicts = self.d.check_batch(&keys);
        let took = start.elapsed();
        assert!(
            took < CALL_BOUND,
            "{:?}/{:?}: a batch took {took:?} in phase {:?}",
            self.policy,
            self.affinity,
            self.phase
        );
        let failed = self.failures() > failures;
        // Where Redis may have failed (a fault, or a timeout at any time),
        // the policy's rules apply; otherwise verdicts are exact.
        let degraded = failed || self.phase != Phase::Before;
        for (&k, v) in keys.iter().zip(verdicts) {
            self.judge(k, v, now, degraded);
        }
        failed
    }

    fn judge(&mut self, k: u64, v: Verdict, now: u64, degraded: bool) {
        let what = format!(
            "{:?}/{:?}, phase {:?}, key {k}: {v:?}",
            self.policy, self.affinity, self.phase
        );
        let tally = self.tally.entry(self.phase).or_default();
        match v {
            Verdict::Unavailable => {
                tally.2 += 1;
                assert_eq!(self.policy, FailurePolicy::FailClosed, "{what}");
                assert!(degraded, "{what}: Redis did not fail");
                self.retry.push(k);
            }
            Verdict::New => {
                tally.0 += 1;
                if let Some(&(_, accepted_in)) = self.accepted.get(&k) {
                    // Accepted again: only fail open may, only while its
                    // earlier mark is out of reach (in a Redis that is
                    // down, or that lost it to kill -9 without a log).
                    let lost =
                        accepted_in == Phase::Before && (self.phase != Phase::Up || !self.durable);
                    assert!(
                        self.policy == FailurePolicy::FailOpen && degraded && lost,
                        "{what}: accepted again (first accepted in {accepted_in:?})"
                    );
                }
                self.accepted.insert(k, (now, self.phase));
            }
            Verdict::Duplicate { first_seen } => {
                tally.1 += 1;
                let Some(&(t0, _)) = self.accepted.get(&k) else {
                    panic!("{what}: never accepted");
                };
                assert_eq!(first_seen.as_nanos(), t0, "{what}");
            }
            other => panic!("{what}: unexpected {other:?}"),
        }
    }

    fn tally(&self, phase: Phase) -> (u64, u64, u64) {
        self.tally.get(&phase).copied().unwrap_or_default()
    }

    /// Steps for `duration` of real time, a step every 10 ms.
    fn run_for(&mut self, duration: Duration) {
        let start = Instant::now();
        while start.elapsed() < duration {
            self.step();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Steps until one whole step and a flush go through without a failure
    /// (every shard reconnected, nothing left to retry): the tier is back.
    fn recover(&mut self) {
        self.phase = Phase::Recovering;
        let start = Instant::now();
        loop {
            let failures = self.failures();
            let degraded = self.degraded();
            let failed = self.step();
            let _ = self.d.flush();
            if !failed
                && self.failures() == failures
                && self.degraded() == degraded
                && self.retry.is_empty()
                && self.unsent() == 0
            {
                break;
            }
            assert!(
                start.elapsed() < RECOVERY_DEADLINE,
                "{:?}/{:?}: the tier did not recover within {RECOVERY_DEADLINE:?} \
                 (failures {}, unsent marks {}, keys to retry {})",
                self.policy,
                self.affinity,
                self.failures(),
                self.unsent(),
                self.retry.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.phase = Phase::Up;
    }

    /// The whole scenario: a stream, the fault mid-stream, recovery, more
    /// stream, then everything the engine accepted is counted in Redis.
    fn play(mut self, fault: Fault) -> Run {
        for _ in 0..20 {
            self.step();
        }
        assert_eq!(self.failures(), 0, "Redis failed before the fault");
        let connects = self.stats.connects.load(Ordering::Relaxed);
        self.phase = Phase::Down;
        match fault {
            Fault::Kill => {
                self.server.kill();
                self.run_for(Duration::from_millis(300));
                self.server.restart();
            }
            Fault::Pause => {
                self.server.pause();
                self.run_for(Duration::from_secs(1));
                self.server.resume();
            }
        }
        self.recover();
        for _ in 0..20 {
            self.step();
        }
        let _ = self.d.flush();
        assert!(self.retry.is_empty(), "every retried key was judged");
        assert!(self.failures() > 0, "the fault was noticed");
        assert!(
            self.stats.connects.load(Ordering::Relaxed) > connects,
            "the tier reconnected"
        );
        assert_eq!(self.unsent(), 0, "marks left unsent");
        assert_eq!(self.stats.marks_dropped.load(Ordering::Relaxed), 0);
        let degraded = self.degraded();
        if self.policy == FailurePolicy::FailClosed {
            assert_eq!(degraded, 0, "fail closed decides nothing without Redis");
        } else {
            assert!(degraded > 0, "degraded decisions are counted");
            let (_, _, unavailable) = self.tally(Phase::Down);
            assert_eq!(unavailable, 0);
        }
        self.assert_marks_in_redis();
        self
    }

    /// Counts the main stream's marks in Redis (owned: the fields of its
    /// slice's hashes; shared: the keys its checks recorded in the logs)
    /// against the keys the engine accepted.
    fn assert_marks_in_redis(&self) {
        let mut conn = self.server.connection();
        let hashes = redis_server::mark_hashes(&mut conn);
        let mut fields = 0;
        let mut stored = HashSet::new();
        for h in &hashes {
            let names: Vec<Vec<u8>> = if self.affinity == Affinity::Shared {
                let main = Duration::from_secs(MAIN_START).as_nanos() as u64;
                let mut fps: Vec<Vec<u8>> = redis_server::log_checks(&mut conn, h)
                    .into_iter()
                    .filter(|&(_, at)| at >= main)
                    .map(|(fp, _)| fp)
                    .collect();
                fps.sort_unstable();
                fps.dedup();
                fps
            } else if redis_server::slice_of(h) == MAIN_SLICE {
                redis_server::stored_fingerprints(&mut conn, h)
            } else {
                continue;
            };
            fields += names.len() as u64;
            stored.extend(names);
        }
        let fp = |k: u64| self.d.fingerprint(&k).to_bytes().to_vec();
        let accepted: HashSet<Vec<u8>> = self.accepted.keys().map(|&k| fp(k)).collect();
        assert!(
            stored.is_subset(&accepted),
            "{:?}/{:?}: Redis holds marks of keys never accepted",
            self.policy,
            self.affinity
        );
        // Everything accepted since the fault; everything, if the server
        // kept its data across the fault.
        let must: Vec<u64> = self
            .accepted
            .iter()
            .filter(|(_, &(_, phase))| self.durable || phase != Phase::Before)
            .map(|(&k, _)| k)
            .collect();
        let missing = must.iter().filter(|&&k| !stored.contains(&fp(k))).count();
        assert_eq!(
            missing,
            0,
            "{:?}/{:?}: {missing} of {} accepted keys have no mark in Redis",
            self.policy,
            self.affinity,
            must.len()
        );
        if self.durable {
            assert_eq!(fields, self.accepted.len() as u64, "one field per key");
        }
        let after: usize = self
            .accepted
            .values()
            .filter(|(_, p)| *p != Phase::Before)
            .count();
        assert!(after > 100, "keys were accepted after the fault");
    }
}

#[test]
fn smoke() {
    let mut run = Run::new(FailurePolicy::FailClosed, Affinity::Owned, false);
    assert!(run.d.check(&7u64).is_new());
    let _ = run.d.flush();
    assert!(run.d.check(&7u64).is_duplicate());
    run.server.kill();
    // The filter matches 7; Redis cannot confirm it.
    assert!(run.d.check(&7u64).is_unavailable());
    // The warm filter has never seen 8: new without Redis, its mark kept.
    assert!(run.d.check(&8u64).is_new());
    let _ = run.d.flush();
    assert!(run.d.check(&8u64).is_unavailable());
    run.server.restart();
    let start = Instant::now();
    let verdict = loop {
        match run.d.check(&8u64) {
            Verdict::Unavailable => {
                assert!(start.elapsed() < RECOVERY_DEADLINE, "no reconnect");
                std::thread::sleep(Duration::from_millis(10));
            }
            v => break v,
        }
    };
    assert!(verdict.is_duplicate(), "8's mark was written on reconnect");
}

// ---- kill -9 mid-stream, then restart ---------------------------------

#[test]
fn fail_closed_owned_survives_kill() {
    let run = Run::new(FailurePolicy::FailClosed, Affinity::Owned, true).play(Fault::Kill);
    let (new, _, unavailable) = run.tally(Phase::Down);
    assert!(
        unavailable > 0,
        "repeats needed Redis and were refused: {unavailable}"
    );
    assert!(new > 0, "a warm filter still accepts new keys: {new}");
}

#[test]
fn fail_closed_shared_survives_kill() {
    let run = Run::new(FailurePolicy::FailClosed, Affinity::Shared, true).play(Fault::Kill);
    let (new, dup, unavailable) = run.tally(Phase::Down);
    assert_eq!((new, dup), (0, 0), "shared mode needs Redis for every key");
    assert!(unavailable > 0);
}

#[test]
fn fail_open_owned_survives_kill() {
    // No append-only file: the restarted server is empty. Counted in
    // Redis afterwards: what the engine accepted after the kill.
    let run = Run::new(FailurePolicy::FailOpen, Affinity::Owned, false).play(Fault::Kill);
    let (new, _, _) = run.tally(Phase::Down);
    assert!(new > 0);
}

#[test]
fn fail_open_shared_survives_kill() {
    let run = Run::new(FailurePolicy::FailOpen, Affinity::Shared, true).play(Fault::Kill);
    let (new, dup, _) = run.tally(Phase::Down);
    assert!(new > 0);
    assert!(dup > 0, "repeats of keys accepted in the outage are caught");
}

#[test]
fn fallback_owned_survives_kill() {
    let run = Run::new(FailurePolicy::FallbackToMemory, Affinity::Owned, true).play(Fault::Kill);
    let (new, dup, _) = run.tally(Phase::Down);
    assert!(
        new > 0 && dup > 0,
        "the memory tier judges: {new} new, {dup} dup"
    );
}

#[test]
fn fallback_shared_survives_kill() {
    let run = Run::new(FailurePolicy::FallbackToMemory, Affinity::Shared, true).play(Fault::Kill);
    let (new, dup, _) = run.tally(Phase::Down);
    assert!(
        new > 0 && dup > 0,
        "the memory tier judges: {new} new, {dup} dup"
    );
}

// ---- SIGSTOP for a second, then SIGCONT --------------------------------

#[test]
fn fail_closed_owned_survives_pause() {
    let run = Run::new(FailurePolicy::FailClosed, Affinity::Owned, false).play(Fault::Pause);
    let (_, _, unavailable) = run.tally(Phase::Down);
    assert!(unavailable > 0, "requests timed out");
}

#[test]
fn fail_closed_shared_survives_pause() {
    let run = Run::new(FailurePolicy::FailClosed, Affinity::Shared, false).play(Fault::Pause);
    let (_, _, unavailable) = run.tally(Phase::Down);
    assert!(unavailable > 0, "requests timed out");
}

#[test]
fn fail_open_owned_survives_pause() {
    let run = Run::new(FailurePolicy::FailOpen, Affinity::Owned, false).play(Fault::Pause);
    assert!(run.tally(Phase::Down).0 > 0);
}

#[test]
fn fallback_shared_survives_pause() {
    let run = Run::new(FailurePolicy::FallbackToMemory, Affinity::Shared, false).play(Fault::Pause);
    let (new, dup, _) = run.tally(Phase::Down);
    assert!(
        new > 0 && dup > 0,
        "the memory tier judges: {new} new, {dup} dup"
    );
}

// ---- the retry buffer ---------------------------------------------------

/// Marks accepted while Redis is down wait in the tier's buffer; with no
/// further traffic, `Deduper::flush` after the restart writes them.
#[test]
fn flush_after_recovery_writes_marks_kept_while_down() {
    let mut run = Run::new(FailurePolicy::FailClosed, Affinity::Owned, false);
    run.server.kill();
    let keys: Vec<u64> = (5_000_000..5_001_000).collect();
    // A warm filter accepts new keys without Redis.
    assert!(run.d.check_batch(&keys).iter().all(|v| v.is_new()));
    let _ = run.d.flush();
    assert_eq!(run.unsent(), 1_000, "kept for retry");
    run.server.restart();
    let start = Instant::now();
    while run.unsent() > 0 {
        assert!(
            start.elapsed() < RECOVERY_DEADLINE,
            "flush did not write the {} marks kept while Redis was down",
            run.unsent()
        );
        std::thread::sleep(Duration::from_millis(20));
        let _ = run.d.flush();
    }
    let mut conn = run.server.connection();
    let hashes = redis_server::mark_hashes(&mut conn);
    let fields = redis_server::count_marks(&mut conn, &hashes);
    assert_eq!(fields, 1_000);
    assert_eq!(run.stats.marks_written.load(Ordering::Relaxed), 1_400);
}

/// Past `max_unsent_marks` per shard, marks are dropped, and counted: in
/// the tier's `marks_dropped` and the engine's `mark_errors`. The rest are
/// written after recovery.
#[test]
fn a_full_retry_buffer_counts_what_it_drops() {
    let mut run = Run::with_config(FailurePolicy::FailOpen, Affinity::Owned, false, |c| {
        RedisConfig {
            max_unsent_marks: 100,
            ..c
        }
    });
    run.server.kill();
    let keys: Vec<u64> = (5_000_000..5_002_000).collect();
    assert!(run.d.check_batch(&keys).iter().all(|v| v.is_new()));
    let _ = run.d.flush();
    let dropped = run.stats.marks_dropped.load(Ordering::Relaxed);
    let unsent = run.unsent();
    // Each shard keeps its bound, plus the one batch of 64 that was in
    // flight when the failure showed.
    assert!(
        (SHARDS as u64 * 100..=SHARDS as u64 * (100 + 64)).contains(&unsent),
        "each shard keeps its bound: {unsent} kept"
    );
    assert_eq!(dropped + unsent, 2_000, "every mark kept or counted");
    // The flush says so: every accepted key is missing, and how many of
    // them no retry will store.
    let err = run.d.flush().expect_err("Redis is down");
    assert_eq!((err.unwritten(), err.dropped()), (2_000, dropped), "{err}");
    // Every flush that failed is counted: all but the first batch of each
    // shard, whose send went through before the failure showed (its
    // replies failed with the next flush, which is counted).
    assert!(
        run.d.stats().mark_errors >= 2_000 - SHARDS as u64 * 64,
        "every failed flush counted: {}",
        run.d.stats().mark_errors
    );
    run.server.restart();
    let start = Instant::now();
    while run.unsent() > 0 {
        assert!(start.elapsed() < RECOVERY_DEADLINE, "no recovery");
        std::thread::sleep(Duration::from_millis(20));
        let _ = run.d.flush();
    }
    let mut conn = run.server.connection();
    let hashes = redis_server::mark_hashes(&mut conn);
    let fields = redis_server::count_marks(&mut conn, &hashes);
    assert_eq!(fields, unsent);
    // The dropped ones are still missing: every flush says so, while they
    // are inside the window.
    let err = run.d.flush().expect_err("dropped marks are missing");
    assert_eq!(
        (err.unwritten(), err.dropped()),
        (dropped, dropped),
        "{err}"
    );
}

/// Shared mode, fail open: a key accepted while Redis was down is kept, to
/// be appended to the shard's log once Redis answers. If it still cannot
/// be (here the engine's connection is cut again), the key's next check is
/// judged from what was kept, not accepted a second time.
#[test]
fn a_kept_mark_that_cannot_be_written_still_answers_claims() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let tier = RedisTier::new(RedisConfig {
        policy: FailurePolicy::FailOpen,
        timeout: TIMEOUT,
        ..RedisConfig::new(&server.url())
    });
    let d = Deduper::builder()
        .window(WINDOW)
        .expected_keys(10_000)
        .shards(1)
        .affinity(Affinity::Shared)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    let pause = |admin: &mut redis::Connection| {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(400)
            .arg("ALL")
            .query(admin)
            .unwrap();
    };
    assert!(d.check("warm").is_new());
    // An outage: k1 is accepted and kept; once Redis is back its mark is
    // written on the mark connection.
    pause(&mut admin);
    clock.advance(Duration::from_millis(1));
    assert!(d.check("k1").is_new());
    std::thread::sleep(Duration::from_millis(500));
    clock.advance(Duration::from_millis(1));
    assert!(d.check("k1").is_duplicate());
    // Another outage: k2 is accepted and kept.
    pause(&mut admin);
    clock.advance(Duration::from_millis(1));
    assert!(d.check("k2").is_new());
    std::thread::sleep(Duration::from_millis(500));
    // Redis is back, and stops answering again before the kept check is
    // appended.
    pause(&mut admin);
    clock.advance(Duration::from_millis(1));
    let again = d.check("k2");
    assert!(again.is_duplicate(), "k2 accepted twice: {again:?}");
    // The mark reaches Redis once the tier recovers.
    let start = Instant::now();
    loop {
        let _ = d.flush();
        let keys = redis_server::mark_hashes(&mut admin);
        let fps: HashSet<Vec<u8>> = keys
            .iter()
            .flat_map(|k| redis_server::stored_fingerprints(&mut admin, k))
            .collect();
        if fps.contains(d.fingerprint(&"k2").to_bytes().as_slice()) {
            break;
        }
        assert!(
            start.elapsed() < RECOVERY_DEADLINE,
            "k2's mark never written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- the two connections -------------------------------------------------

/// An owned engine on one shard whose filter is warm (a window has passed
/// since it started), so a new key is accepted without asking Redis (bar a
/// false positive of the filter, 10⁻³), and
/// both of its connections are open: lookups (a repeat of key 0 was
/// confirmed) and marks (keys `u64::MAX` and 0 were written).
fn warm_engine(server: &RedisServer, clock: &ManualClock, config: RedisConfig) -> Deduper {
    let d = Deduper::builder()
        .window(WINDOW)
        .expected_keys(10_000)
        // A new key is a filter miss (it needs no Redis) all but 10⁻³ of the time.
        .false_positive_rate(1e-3)
        .shards(1)
        .mark_batch(100_000)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(RedisTier::new(config))))
        .build()
        .unwrap();
    assert!(d.check(&u64::MAX).is_new());
    d.flush().expect("Redis is up");
    clock.advance(WINDOW + Duration::from_secs(1));
    d.maintain();
    assert!(d.check(&0u64).is_new());
    d.flush().expect("Redis is up");
    assert!(d.check(&0u64).is_duplicate(), "confirmed in Redis");
    let _ = server;
    d
}

/// Ids of the engine's connections other than `me`: (lookups, marks), told
/// apart by their last command.
fn engine_connections(admin: &mut redis::Connection) -> (Vec<u64>, Vec<u64>) {
    let me: u64 = redis::cmd("CLIENT").arg("ID").query(admin).unwrap();
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(admin).unwrap();
    let (mut lookups, mut marks) = (Vec::new(), Vec::new());
    for line in clients.lines() {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or("")
                .to_owned()
        };
        let id: u64 = field("id=").parse().unwrap();
        if id == me {
            continue;
        }
        match field("cmd=").as_str() {
            "append" | "hset" | "pexpire" | "eval" => marks.push(id),
            _ => lookups.push(id),
        }
    }
    (lookups, marks)
}

fn kill_client(admin: &mut redis::Connection, id: u64) {
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query(admin)
        .unwrap();
}

/// Each connection backs off on its own: while the lookups' connection
/// cannot be opened again (the server takes no more clients), marks are
/// still written on theirs, and every flush stores them.
#[test]
fn marks_do_not_wait_for_the_lookup_connection() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let d = warm_engine(
        &server,
        &clock,
        RedisConfig {
            timeout: TIMEOUT,
            ..RedisConfig::new(&server.url())
        },
    );
    let (lookups, marks) = engine_connections(&mut admin);
    assert_eq!((lookups.len(), marks.len()), (1, 1), "two connections");
    let info: String = redis::cmd("INFO").arg("clients").query(&mut admin).unwrap();
    let connected = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .unwrap()
        .trim()
        .to_owned();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(&connected)
        .query(&mut admin)
        .unwrap();
    kill_client(&mut admin, lookups[0]);
    let mut accepted = 2u64;
    let start = Instant::now();
    let mut next = 1_000_000u64;
    while start.elapsed() < Duration::from_millis(300) {
        clock.advance(Duration::from_millis(1));
        // A repeat needs a lookup: refused (fail closed), not lost.
        assert!(!d.check(&0u64).is_new());
        let keys: Vec<u64> = (next..next + 100).collect();
        next += 100;
        assert!(d.check_batch(&keys).iter().all(|v| v.is_new()));
        accepted += 100;
        if let Err(e) = d.flush() {
            panic!(
                "{:?} after the lookup connection failed: marks waited for it: {e}",
                start.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(10_000)
        .query(&mut admin)
        .unwrap();
    let keys = redis_server::mark_hashes(&mut admin);
    assert_eq!(redis_server::count_marks(&mut admin, &keys), accepted);
}

// ---- idle upkeep under a stalled server ----------------------------------

/// While Redis is stopped (`SIGSTOP`), the engine's idle upkeep — a host
/// calling `maintain` every 5 ms, as a pipeline worker does between
/// batches — retries the marks under the shard's lock. A check of a new
/// key needs no Redis (a warm filter, owned keys), so it must never wait
/// behind that retry for long: here at most 200 ms, against a request
/// timeout of 1 s (a key the filter matches needs Redis, and may wait for
/// it). Once Redis resumes, every accepted key is stored.
#[test]
fn an_idle_retry_never_holds_checks_for_long() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let d = warm_engine(
        &server,
        &clock,
        RedisConfig {
            timeout: Duration::from_secs(1),
            ..RedisConfig::new(&server.url())
        },
    );
    // Marks in flight when Redis stops: sent by an idle flush.
    let first: Vec<u64> = (1_000_000..1_001_000).collect();
    assert!(d.check_batch(&first).iter().all(|v| v.is_new()));
    std::thread::sleep(Duration::from_millis(20));
    d.maintain();
    server.pause();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut slowest = Duration::ZERO;
    let mut verdicts = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(10) {
                d.maintain();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let start = Instant::now();
        let mut key = 2_000_000u64;
        while start.elapsed() < Duration::from_secs(2) {
            let t = Instant::now();
            let verdict = d.check(&key);
            // A filter false positive needs Redis: it may wait for the
            // timeout, and is refused (fail closed).
            if verdict.is_new() {
                slowest = slowest.max(t.elapsed());
            }
            verdicts.push(verdict);
            key += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
    });
    server.resume();
    let checks = verdicts.len();
    let accepted_now = verdicts.iter().filter(|v| v.is_new()).count();
    eprintln!(
        "{checks} checks while Redis was stopped ({accepted_now} new): the slowest took {slowest:?}"
    );
    assert!(
        verdicts.iter().all(|v| v.is_new() || v.is_unavailable()) && accepted_now + 5 >= checks,
        "{verdicts:?}"
    );
    let accepted = 1_002 + accepted_now as u64;
    assert!(
        slowest < Duration::from_millis(200),
        "a check waited {slowest:?} behind an idle retry"
    );
    let start = Instant::now();
    while let Err(e) = d.flush() {
        assert!(start.elapsed() < RECOVERY_DEADLINE, "no recovery: {e}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut conn = server.connection();
    let keys = redis_server::mark_hashes(&mut conn);
    assert_eq!(redis_server::count_marks(&mut conn, &keys), accepted);
}
