//! Claims on the Redis tier against the reference state machine of
//! `tests/claims.rs`: every answer of claim, commit, release, extend, drop,
//! check and forget over long random streams — a manual clock moving past
//! leases and windows, engines restarting on the same Redis — equals that
//! of a map from key to `Held { token, until, payload } | Done { at,
//! result, payload }`, with owned keys (leases in the engine, records and
//! results in Redis) and shared keys (everything in the shard's log), on a
//! private `redis-server` and on a private three-master Cluster. Then the
//! concurrency and fault contracts: two engines racing for one fresh key
//! acquire it once; a Redis killed or stopped in the middle of commits
//! never lets a key be committed twice.
#![cfg(feature = "redis")]

#[path = "support/redis_cluster.rs"]
mod redis_cluster;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};

use std::time::{Duration, Instant};

use redis_cluster::RedisCluster;
use redis_server::RedisServer;
use rng::Rng;
use tiered_dedup::exact::redis::{FailurePolicy, RedisConfig, RedisTier};
use tiered_dedup::{
    Affinity, Claim, ClaimRequest, Clock, CommitError, Deduper, DeduperBuilder, ExactTier, Lease,
    ManualClock, PayloadFingerprint, Timestamp, Verdict,
};

/// What the contract says a key is.
#[derive(Clone, Debug)]
enum State {
    Held {
        token: u64,
        acquired_at: u64,
        until: u64,
        payload: Option<u64>,
    },
    Done {
        at: u64,
        result: Vec<u8>,
        payload: Option<u64>,
    },
}

/// What the contract says a claim answers (tokens are the engine's; the
/// reference only checks that they grow).
#[derive(Debug, PartialEq)]
enum Expect {
    Acquired { acquired_at: u64, until: u64 },
    InProgress { until: u64 },
    Completed { at: u64, result: Vec<u8> },
    Conflict,
}

struct Reference {
    window: Option<u64>,
    keys: HashMap<u64, State>,
    last_token: HashMap<u64, u64>,
}

fn conflicts(a: Option<u64>, b: Option<u64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a != b)
}

impl Reference {
    fn live(&self, key: u64, now: u64) -> Option<&State> {
        match self.keys.get(&key)? {
            s @ State::Held { until, .. } if now < *until => Some(s),
            s @ State::Done { at, .. }
                if self.window.is_none_or(|w| now.saturating_sub(*at) < w) =>
            {
                Some(s)
            }
            _ => None,
        }
    }

    fn claim(&self, key: u64, payload: Option<u64>, now: u64, ttl: u64) -> Expect {
        match self.live(key, now) {
            Some(State::Held {
                until, payload: p, ..
            }) => {
                if conflicts(*p, payload) {
                    Expect::Conflict
                } else {
                    Expect::InProgress { until: *until }
                }
            }
            Some(State::Done {
                at,
                result,
                payload: p,
            }) => {
                if conflicts(*p, payload) {
                    Expect::Conflict
                } else {
                    Expect::Completed {
                        at: *at,
                        result: result.clone(),
                    }
                }
            }
            None => Expect::Acquired {
                acquired_at: now,
                until: now + ttl,
            },
        }
    }

    fn acquired(&mut self, key: u64, token: u64, payload: Option<u64>, now: u64, until: u64) {
        let last = self.last_token.insert(key, token);
        assert!(
            last.is_none_or(|l| token > l),
            "tokens grow per key: {last:?} then {token}"
        );
        self.keys.insert(
            key,
            State::Held {
                token,
                acquired_at: now,
                until,
                payload,
            },
        );
    }

    fn holds(&self, key: u64, token: u64, now: u64) -> bool {
        matches!(self.keys.get(&key), Some(State::Held { token: t, until, .. }) if *t == token && now < *until)
    }

    fn commit(&mut self, key: u64, token: u64, result: &[u8], now: u64) -> bool {
        if !self.holds(key, token, now) {
            return false;
        }
        let Some(State::Held {
            acquired_at,
            payload,
            ..
        }) = self.keys.get(&key).cloned()
        else {
            unreachable!()
        };
        self.keys.insert(
            key,
            State::Done {
                at: acquired_at,
                result: result.to_vec(),
                payload,
            },
        );
        true
    }

    fn release(&mut self, key: u64, token: u64, now: u64) -> bool {
        if !self.holds(key, token, now) {
            return false;
        }
        self.keys.remove(&key);
        true
    }

    fn extend(&mut self, key: u64, token: u64, now: u64, by: u64) -> Option<u64> {
        if !self.holds(key, token, now) {
            return None;
        }
        if let Some(State::Held { until, .. }) = self.keys.get_mut(&key) {
            *until = now + by;
        }
        Some(now + by)
    }

    fn check(&mut self, key: u64, now: u64) -> Verdict {
        match self.live(key, now) {
            Some(State::Held { until, .. }) => Verdict::InProgress {
                until: Timestamp::from_nanos(*until),
            },
            Some(State::Done { at, .. }) => Verdict::Duplicate {
                first_seen: Timestamp::from_nanos(*at),
            },
            None => {
                self.keys.insert(
                    key,
                    State::Done {
                        at: now,
                        result: Vec::new(),
                        payload: None,
                    },
                );
                Verdict::New
            }
        }
    }

    /// The engine stopped: leases kept in the engine die with it (owned
    /// keys: as if released); a shared store keeps them until they expire.
    fn restarted(&mut self, affinity: Affinity) {
        if affinity == Affinity::Owned {
            self.keys.retain(|_, s| matches!(s, State::Done { .. }));
        }
    }
}

/// Where the engines' Redis is.
enum Store {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl Store {
    /// Connections to every node.
    fn connections(&self) -> Vec<redis::Connection> {
        match self {
            Store::Server(s) => vec![s.connection()],
            Store::Cluster(c) => c.nodes.iter().map(RedisServer::connection).collect(),
        }
    }

    /// Shared mode: how many shards have a snapshot, and how many logs
    /// were trimmed behind one (their first entry is not the first ever).
    fn snapshots_and_trimmed_logs(&self) -> (usize, usize) {
        let (mut snapshots, mut trimmed) = (0, 0);
        for mut c in self.connections() {
            let keys: Vec<String> = redis::cmd("KEYS").arg("td:*").query(&mut c).unwrap();
            snapshots += keys.iter().filter(|k| k.ends_with(":snap")).count();
            for k in keys.iter().filter(|k| k.ends_with(":log")) {
                let first: Vec<redis::Value> = redis::cmd("XRANGE")
                    .arg(k)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query(&mut c)
                    .unwrap();
                let id = match first.first() {
                    Some(redis::Value::Array(e)) => match e.first() {
                        Some(redis::Value::BulkString(id)) => {
                            String::from_utf8_lossy(id).into_owned()
                        }
                        _ => String::new(),
                    },
                    _ => String::new(),
                };
                trimmed += usize::from(!id.is_empty() && id != "0-1");
            }
        }
        (snapshots, trimmed)
    }

    fn config(&self) -> RedisConfig {
        match self {
            Store::Server(s) => RedisConfig::new(&s.url()),
            Store::Cluster(c) => {
                let urls = c.urls();
                let seeds: Vec<&str> = urls.iter().map(String::as_str).collect();
                RedisConfig::cluster(&seeds)
            }
        }
    }
}

struct Setting {
    name: &'static str,
    affinity: Affinity,
    window: Option<Duration>,
    mark_batch: usize,
    shards: usize,
    ops: usize,
    key_space: u64,
}

const LEASE: Duration = Duration::from_millis(400);

fn builder(s: &Setting, store: &Store, clock: &ManualClock) -> DeduperBuilder {
    let tier = RedisTier::new(store.config());
    let b = Deduper::builder()
        .expected_keys(2_000)
        .shards(s.shards)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .affinity(s.affinity)
        .mark_batch(s.mark_batch)
        .lease_duration(LEASE)
        .max_result_bytes(200);
    match s.window {
        Some(w) => b.window(w),
        None => b.no_window(),
    }
}

fn engine_answer(claim: &Claim<Arc<Deduper>>) -> Expect {
    match claim {
        Claim::Acquired(lease) => Expect::Acquired {
            acquired_at: lease.info().acquired_at.as_nanos(),
            until: lease.expires_at().as_nanos(),
        },
        Claim::InProgress { until } => Expect::InProgress {
            until: until.as_nanos(),
        },
        Claim::Completed { first_seen, result } => Expect::Completed {
            at: first_seen.as_nanos(),
            result: result.to_vec(),
        },
        Claim::Conflict => Expect::Conflict,
        other => panic!("unexpected {other:?} from a healthy Redis"),
    }
}

/// Checks commit answers against the reference's (true: the lease was
/// live); the number lost.
fn commits_as_expected(
    expected: Vec<bool>,
    answers: Vec<Result<(), CommitError<Arc<Deduper>>>>,
    ctx: &dyn Fn(&str) -> String,
) -> usize {
    let mut lost = 0;
    for (ok, answer) in expected.into_iter().zip(answers) {
        match answer {
            Ok(()) => assert!(ok, "{}", ctx("commit accepted a lost lease")),
            Err(e) => {
                assert!(e.is_lease_lost(), "{}", ctx(&format!("{e}")));
                assert!(!ok, "{}", ctx("commit refused a live lease"));
                lost += 1;
            }
        }
    }
    lost
}

fn run(s: &Setting, store: &Store, seed: u64) {
    let mut rng = Rng::new(seed);
    let start = Timestamp::from_secs(1_700_000_000);
    let clock = ManualClock::new(start);
    let mut dedup = Arc::new(builder(s, store, &clock).build().unwrap());
    let mut reference = Reference {
        window: s.window.map(|w| w.as_nanos() as u64),
        keys: HashMap::new(),
        last_token: HashMap::new(),
    };
    let key_space = s.key_space;
    let lease_nanos = LEASE.as_nanos() as u64;
    let mut leases: Vec<(u64, Lease<Arc<Deduper>>)> = Vec::new();
    let (mut acquired, mut completed, mut lost, mut conflicts_seen, mut restarts) = (0, 0, 0, 0, 0);
    let (mut with_result, mut forgotten) = (0, 0);
    let payload = |rng: &mut Rng| match rng.below(4) {
        0 => None,
        p => Some(p),
    };
    let began = Instant::now();
    for op in 0..s.ops {
        let now = clock.now().as_nanos();
        let ctx = |what: &str| format!("{} seed {seed} op {op}: {what}", s.name);
        match rng.below(100) {
            // Claims, one at a time or in a batch.
            0..=29 => {
                let n = if rng.chance(0.3) {
                    1 + rng.below(8) as usize
                } else {
                    1
                };
                let requests: Vec<ClaimRequest<u64>> = (0..n)
                    .map(|_| {
                        let mut r = ClaimRequest::new(rng.below(key_space));
                        if let Some(p) = payload(&mut rng) {
                            r = r.payload(PayloadFingerprint(p));
                        }
                        if rng.chance(0.2) {
                            r = r.lease(Duration::from_millis(50 + rng.below(600)));
                        }
                        r
                    })
                    .collect();
                // Some batches commit leases in the same call (one round
                // trip per shard with shared keys): commits apply first.
                let committing = if n > 1 && !leases.is_empty() && rng.chance(0.4) {
                    (1 + rng.below(4) as usize).min(leases.len())
                } else {
                    0
                };
                let mut commits = Vec::new();
                let mut expected = Vec::new();
                for _ in 0..committing {
                    let (key, lease) = leases.swap_remove(rng.below(leases.len() as u64) as usize);
                    let result: Vec<u8> = (0..rng.below(120))
                        .map(|i| (i as u8) ^ (op as u8) ^ 0x5a)
                        .collect();
                    expected.push(reference.commit(key, lease.token(), &result, now));
                    commits.push((lease, result));
                }
                let answers = if n == 1 {
                    vec![dedup.claim_owned(requests[0])]
                } else if committing > 0 {
                    let (done, answers) = dedup.commit_and_claim_batch(commits, &requests);
                    assert_eq!(done.len(), committing, "{}", ctx("one answer per commit"));
                    lost += commits_as_expected(expected, done, &ctx);
                    answers
                } else {
                    dedup.claim_batch_owned(&requests)
                };
                for (r, answer) in requests.iter().zip(answers) {
                    let ttl = r.lease.map_or(lease_nanos, |d| d.as_nanos() as u64);
                    let want = reference.claim(r.key, r.payload.map(|p| p.0), now, ttl);
                    let got = engine_answer(&answer);
                    assert_eq!(got, want, "{}", ctx(&format!("claim of key {}", r.key)));
                    match answer {
                        Claim::Acquired(lease) => {
                            acquired += 1;
                            reference.acquired(
                                r.key,
                                lease.token(),
                                r.payload.map(|p| p.0),
                                now,
                                lease.expires_at().as_nanos(),
                            );
                            leases.push((r.key, lease));
                        }
                        Claim::Completed { result, .. } => {
                            completed += 1;
                            with_result += usize::from(!result.is_empty());
                        }
                        Claim::Conflict => conflicts_seen += 1,
                        _ => {}
                    }
                }
            }
            // Commit a lease, one or a batch.
            30..=44 if !leases.is_empty() => {
                let n = if rng.chance(0.2) {
                    (1 + rng.below(4) as usize).min(leases.len())
                } else {
                    1
                };
                let mut batch = Vec::new();
                for _ in 0..n {
                    let (key, lease) = leases.swap_remove(rng.below(leases.len() as u64) as usize);
                    let result: Vec<u8> = (0..rng.below(120))
                        .map(|i| (i as u8) ^ (op as u8))
                        .collect();
                    batch.push((key, lease, result));
                }
                let expected: Vec<bool> = batch
                    .iter()
                    .map(|(key, lease, result)| reference.commit(*key, lease.token(), result, now))
                    .collect();
                let answers: Vec<Result<(), CommitError<Arc<Deduper>>>> = if n == 1 {
                    let (_, lease, result) = batch.pop().unwrap();
                    vec![lease.commit(&result)]
                } else {
                    dedup.commit_batch(batch.into_iter().map(|(_, l, r)| (l, r)).collect())
                };
                lost += commits_as_expected(expected, answers, &ctx);
            }
            // Release, drop or extend a lease.
            45..=54 if !leases.is_empty() => {
                let i = rng.below(leases.len() as u64) as usize;
                let token = leases[i].1.token();
                let key = leases[i].0;
                match rng.below(3) {
                    0 => {
                        let (_, lease) = leases.swap_remove(i);
                        let ok = reference.release(key, token, now);
                        assert_eq!(lease.release().is_ok(), ok, "{}", ctx("release"));
                    }
                    1 => {
                        let (_, lease) = leases.swap_remove(i);
                        reference.release(key, token, now);
                        drop(lease);
                    }
                    _ => {
                        let by = Duration::from_millis(50 + rng.below(800));
                        let want = reference.extend(key, token, now, by.as_nanos() as u64);
                        let got = leases[i].1.extend(by).ok().map(Timestamp::as_nanos);
                        assert_eq!(got, want, "{}", ctx("extend"));
                    }
                }
            }
            // A commit over the cap stores nothing and hands the lease back.
            55 if !leases.is_empty() => {
                let i = rng.below(leases.len() as u64) as usize;
                let (key, lease) = leases.swap_remove(i);
                match lease.commit(&[7u8; 201]) {
                    Err(e) => {
                        let lease = e.into_lease().expect("too large hands the lease back");
                        leases.push((key, lease));
                    }
                    Ok(()) => panic!("{}", ctx("a result over the cap was stored")),
                }
            }
            // Checks, one at a time or in a batch.
            56..=84 => {
                let n = if rng.chance(0.3) {
                    1 + rng.below(16) as usize
                } else {
                    1
                };
                let keys: Vec<u64> = (0..n).map(|_| rng.below(key_space)).collect();
                let got = if n == 1 {
                    vec![dedup.check(&keys[0])]
                } else {
                    dedup.check_batch(&keys)
                };
                for (k, v) in keys.iter().zip(got) {
                    let before = reference.keys.get(k).cloned();
                    assert_eq!(
                        v,
                        reference.check(*k, now),
                        "{}",
                        ctx(&format!(
                            "check of key {k} at {now}, reference had {before:?}"
                        ))
                    );
                }
            }
            // Forget.
            85..=86 => {
                let key = rng.below(key_space);
                let live = reference.live(key, now).is_some();
                let had = reference.keys.get(&key).cloned();
                let removed = dedup.forget(&key).unwrap();
                assert!(
                    !live || removed,
                    "{}",
                    ctx(&format!(
                        "forget of live key {key} at {now} found nothing; reference had {had:?}"
                    ))
                );
                forgotten += usize::from(live);
                reference.keys.remove(&key);
            }
            // A restart on the same Redis: the engine's pending writes are
            // flushed, its holders die with it.
            87 if rng.chance(0.01) => {
                dedup.flush().expect("a healthy Redis stores everything");
                for (_, lease) in leases.drain(..) {
                    std::mem::forget(lease);
                }
                dedup = Arc::new(builder(s, store, &clock).build().unwrap());
                reference.restarted(s.affinity);
                restarts += 1;
            }
            // Time passes: mostly a little, sometimes past leases and windows.
            _ => {
                let step = match rng.below(20) {
                    0 => lease_nanos * 2,
                    1 => s.window.map_or(lease_nanos, |w| w.as_nanos() as u64 / 2),
                    _ => rng.below(lease_nanos / 8),
                };
                clock.advance(Duration::from_nanos(step));
            }
        }
    }
    eprintln!(
        "{}: {} ops in {:.1?}: {acquired} acquired, {completed} completed ({with_result} with a \
         result), {lost} lost, {conflicts_seen} conflicts, {forgotten} forgotten, {restarts} restarts",
        s.name,
        s.ops,
        began.elapsed()
    );
    assert!(acquired > s.ops / 50, "{}: {acquired} acquired", s.name);
    assert!(completed > s.ops / 200, "{}: {completed} completed", s.name);
    assert!(with_result > 0, "{}: no result replayed", s.name);
    assert!(
        lost > 0 && conflicts_seen > 0 && forgotten > 0,
        "{}: {lost} lost, {conflicts_seen} conflicts, {forgotten} forgotten",
        s.name
    );
    assert!(restarts > 0, "{}: no restart", s.name);
    if s.affinity == Affinity::Shared && s.window.is_some() {
        // Restarted engines started from snapshots, the logs trimmed
        // behind them.
        let (snapshots, trimmed) = store.snapshots_and_trimmed_logs();
        assert!(
            snapshots > 0 && trimmed > 0,
            "{}: {snapshots} snapshots, {trimmed} logs trimmed",
            s.name
        );
    }
}

fn setting(name: &'static str, affinity: Affinity, ops: usize) -> Setting {
    Setting {
        name,
        affinity,
        window: Some(Duration::from_secs(2)),
        mark_batch: 16,
        shards: 4,
        ops,
        key_space: 300,
    }
}

/// 10⁵ random operations on one server, owned keys.
#[test]
fn owned_claims_match_the_reference() {
    let store = Store::Server(RedisServer::start());
    run(
        &setting("Redis, owned keys", Affinity::Owned, 100_000),
        &store,
        0xC1A1_0001,
    );
}

/// The same with marks written one by one, and without a window.
#[test]
fn owned_claims_without_a_window_match_the_reference() {
    let store = Store::Server(RedisServer::start());
    let s = Setting {
        window: None,
        mark_batch: 1,
        key_space: 3_000,
        ..setting("Redis, owned keys, no window", Affinity::Owned, 30_000)
    };
    run(&s, &store, 0xC1A1_0002);
}

/// 10⁵ random operations on one server, shared keys (the log).
#[test]
fn shared_claims_match_the_reference() {
    let store = Store::Server(RedisServer::start());
    run(
        &setting("Redis, shared keys", Affinity::Shared, 100_000),
        &store,
        0xC1A1_0003,
    );
}

/// Shared keys without a window.
#[test]
fn shared_claims_without_a_window_match_the_reference() {
    let store = Store::Server(RedisServer::start());
    let s = Setting {
        window: None,
        key_space: 3_000,
        ..setting("Redis, shared keys, no window", Affinity::Shared, 30_000)
    };
    run(&s, &store, 0xC1A1_0004);
}

/// 10⁵ random operations in each mode on a three-master Cluster, the
/// shards spread over its masters.
#[test]
fn cluster_claims_match_the_reference() {
    let store = Store::Cluster(RedisCluster::start(3));
    for (i, (name, affinity)) in [
        ("Redis Cluster, shared keys", Affinity::Shared),
        ("Redis Cluster, owned keys", Affinity::Owned),
    ]
    .into_iter()
    .enumerate()
    {
        let s = Setting {
            shards: 16,
            ..setting(name, affinity, 100_000)
        };
        run(&s, &store, 0xC1A1_0010 + i as u64);
        if let Store::Cluster(c) = &store {
            assert!(
                c.dbsizes().iter().all(|&n| n > 0),
                "{name}: every master holds keys: {:?}",
                c.dbsizes()
            );
            c.flush_all();
        }
    }
}

/// An engine of `store` on the system clock (leases are real time).
fn live_engine(
    store: &Store,
    affinity: Affinity,
    lease: Duration,
    timeout: Duration,
) -> Arc<Deduper> {
    let tier = RedisTier::new(RedisConfig {
        timeout,
        policy: FailurePolicy::FailClosed,
        ..store.config()
    });
    Arc::new(
        Deduper::builder()
            .window(Duration::from_secs(600))
            .expected_keys(10_000)
            .shards(4)
            .affinity(affinity)
            .lease_duration(lease)
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap(),
    )
}

/// Two engines sharing keys, two threads each, claim one fresh key at
/// once, round after round: exactly one acquires it; the others see it in
/// progress, or completed once the winner has committed.
fn one_acquired_among_engines(store: &Store, rounds: u64) {
    let engines: Vec<Arc<Deduper>> = (0..2)
        .map(|_| {
            live_engine(
                store,
                Affinity::Shared,
                Duration::from_secs(60),
                Duration::from_secs(2),
            )
        })
        .collect();
    let threads = 4;
    for round in 0..rounds {
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let dedup = Arc::clone(&engines[t % 2]);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    match dedup.claim_owned(ClaimRequest::new(round)) {
                        Claim::Acquired(lease) => {
                            lease.commit(b"done").unwrap();
                            1
                        }
                        Claim::InProgress { .. } => 0,
                        Claim::Completed { result, .. } => {
                            assert_eq!(&result[..], b"done");
                            0
                        }
                        other => panic!("round {round}: unexpected {other:?}"),
                    }
                })
            })
            .collect();
        let acquired: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(acquired, 1, "round {round}");
    }
}

#[test]
fn one_acquired_among_racing_engines() {
    one_acquired_among_engines(&Store::Server(RedisServer::start()), 300);
}

#[test]
fn one_acquired_among_racing_engines_on_a_cluster() {
    one_acquired_among_engines(&Store::Cluster(RedisCluster::start(3)), 100);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `kill -9`, then a restart (the server keeps an append-only file,
    /// fsynced at every write).
    Kill,
    /// `SIGSTOP`, then `SIGCONT`.
    Pause,
}

const DURABLE: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];
/// No call may take longer (a hang).
const CALL_BOUND: Duration = Duration::from_secs(3);

/// Retries `f` (a call that answers `None` while Redis cannot) until it
/// answers, for at most 10 s.
fn until_answered<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        let called = Instant::now();
        let answer = f();
        assert!(
            called.elapsed() < CALL_BOUND,
            "a call took {:?}",
            called.elapsed()
        );
        if let Some(v) = answer {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "Redis never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Shared keys, fail closed: engine A claims 1 500 keys and commits them
/// in batches while Redis is killed (or stopped) and comes back; commits
/// answered `Unavailable` may or may not have landed. Once A's leases
/// have expired, engine B claims every key: a key A's commit reached is
/// completed with A's result, any other is acquired and committed by B.
/// Then A retries its unanswered commits: fencing refuses those B
/// overtook. No key is committed twice: a fresh engine finds each with
/// exactly the result of the one commit that was answered `Ok`.
fn no_key_committed_twice(fault: Fault) {
    let server = match fault {
        Fault::Kill => RedisServer::start_with(DURABLE),
        Fault::Pause => RedisServer::start(),
    };
    let url = server.url();
    let server = Arc::new(std::sync::Mutex::new(server));
    let config = || RedisConfig::new(&url);
    let make = |lease: Duration| {
        let tier = RedisTier::new(RedisConfig {
            timeout: Duration::from_millis(150),
            ..config()
        });
        Arc::new(
            Deduper::builder()
                .window(Duration::from_secs(600))
                .expected_keys(10_000)
                .shards(4)
                .affinity(Affinity::Shared)
                .lease_duration(lease)
                .exact_tier(ExactTier::Custom(Arc::new(tier)))
                .build()
                .unwrap(),
        )
    };
    let lease = Duration::from_millis(400);
    let a = make(lease);
    let b = make(Duration::from_secs(60));
    let keys: Vec<u64> = (0..1_500).collect();
    let requests: Vec<ClaimRequest<u64>> = keys.iter().map(|&k| ClaimRequest::new(k)).collect();
    let mut leases: Vec<Lease<Arc<Deduper>>> = a
        .claim_batch_owned(&requests)
        .into_iter()
        .map(|c| c.into_lease().expect("fresh keys are acquired"))
        .collect();
    // The fault, while A commits 50 at a time.
    let faulter = {
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(15));
            match fault {
                Fault::Kill => server.lock().unwrap().kill(),
                Fault::Pause => server.lock().unwrap().pause(),
            }
            std::thread::sleep(Duration::from_millis(500));
            match fault {
                Fault::Kill => server.lock().unwrap().restart(),
                Fault::Pause => server.lock().unwrap().resume(),
            }
        })
    };
    let mut a_ok: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut unanswered: Vec<Lease<Arc<Deduper>>> = Vec::new();
    let mut lost_a = 0;
    while !leases.is_empty() {
        let n = leases.len().min(50);
        let chunk: Vec<(Lease<Arc<Deduper>>, &[u8])> =
            leases.drain(..n).map(|l| (l, &b"A"[..])).collect();
        let fps: Vec<_> = chunk.iter().map(|(l, _)| l.fingerprint()).collect();
        let started = Instant::now();
        let answers = a.commit_batch(chunk);
        assert!(
            started.elapsed() < CALL_BOUND,
            "a commit batch took {:?}",
            started.elapsed()
        );
        for (fp, answer) in fps.into_iter().zip(answers) {
            let key = keys
                .iter()
                .copied()
                .find(|k| a.fingerprint(k) == fp)
                .unwrap();
            match answer {
                Ok(()) => {
                    a_ok.insert(key);
                }
                Err(CommitError::Unavailable { lease, .. }) => unanswered.push(lease),
                Err(CommitError::LeaseLost(_)) => lost_a += 1,
                Err(other) => panic!("{other}"),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    faulter.join().unwrap();
    assert!(!unanswered.is_empty(), "{fault:?}: the fault hit no commit");
    // A's leases are over: B claims every key.
    std::thread::sleep(lease + Duration::from_millis(100));
    let mut b_ok = std::collections::HashSet::new();
    let mut completed_by_a = 0;
    for &k in &keys {
        let claim = until_answered(|| match b.claim_owned(ClaimRequest::new(k)) {
            Claim::Unavailable => None,
            other => Some(other),
        });
        match claim {
            Claim::Acquired(lease) => {
                assert!(
                    !a_ok.contains(&k),
                    "{fault:?}: key {k} committed by A, acquired by B"
                );
                // A loaded machine may time a request out: retried.
                let mut lease = Some(lease);
                until_answered(|| match lease.take().unwrap().commit(b"B") {
                    Err(CommitError::Unavailable { lease: back, .. }) => {
                        lease = Some(back);
                        None
                    }
                    other => Some(other),
                })
                .expect("B's live lease commits");
                b_ok.insert(k);
            }
            Claim::Completed { result, .. } => {
                assert_eq!(&result[..], b"A", "{fault:?}: key {k}");
                completed_by_a += 1;
            }
            other => panic!("{fault:?}: key {k}: {other:?}"),
        }
    }
    let mut landed_unanswered = 0;
    // A retries what was not answered: its lease ran out, so each retry
    // is done only if the first attempt landed (then B found it
    // completed), and lost where B took the key.
    for lease in unanswered {
        let fp = lease.fingerprint();
        let k = keys
            .iter()
            .copied()
            .find(|k| a.fingerprint(k) == fp)
            .unwrap();
        let mut lease = Some(lease);
        let answer = until_answered(|| match lease.take().unwrap().commit(b"A") {
            Err(CommitError::Unavailable { lease: back, .. }) => {
                lease = Some(back);
                None
            }
            other => Some(other),
        });
        match answer {
            Ok(()) => {
                assert!(
                    !b_ok.contains(&k),
                    "{fault:?}: key {k} committed by A and by B"
                );
                a_ok.insert(k);
                landed_unanswered += 1;
            }
            Err(e) => assert!(e.is_lease_lost(), "{fault:?}: {e}"),
        }
    }
    assert!(a_ok.is_disjoint(&b_ok), "{fault:?}: a key committed twice");
    assert_eq!(
        a_ok.len() + b_ok.len(),
        keys.len(),
        "{fault:?}: every key committed once"
    );
    assert_eq!(
        completed_by_a,
        a_ok.len(),
        "{fault:?}: B found every commit of A's"
    );
    // A fresh engine finds each key with the result of its one commit.
    let c = make(lease);
    for &k in &keys {
        let claim = until_answered(|| match c.claim_owned(ClaimRequest::new(k)) {
            Claim::Unavailable => None,
            other => Some(other),
        });
        match claim {
            Claim::Completed { result, .. } => {
                let by = if a_ok.contains(&k) {
                    &b"A"[..]
                } else {
                    &b"B"[..]
                };
                assert_eq!(&result[..], by, "{fault:?}: key {k}");
            }
            other => panic!("{fault:?}: key {k}: {other:?}"),
        }
    }
    eprintln!(
        "{fault:?}: {} committed by A ({landed_unanswered} of them by a commit whose answer was \
         lost; {lost_a} leases lost at once), {} by B",
        a_ok.len(),
        b_ok.len()
    );
    if fault == Fault::Pause {
        assert!(
            landed_unanswered > 0,
            "a stopped server runs the commits it read once resumed"
        );
    }
}

#[test]
fn no_key_is_committed_twice_across_a_kill() {
    no_key_committed_twice(Fault::Kill);
}

#[test]
fn no_key_is_committed_twice_across_a_pause() {
    no_key_committed_twice(Fault::Pause);
}

/// Owned keys, fail closed: the leases are the engine's, the commits its
/// marks. Redis is killed (or stopped) while engine A commits: a commit
/// is kept with its mark until Redis stores it, so once its lease has
/// expired A still finds every committed key completed — from what it
/// keeps, then from Redis — and never acquires it again; after recovery a
/// fresh engine finds each key with A's one result.
fn owned_commits_survive(fault: Fault) {
    let mut server = match fault {
        Fault::Kill => RedisServer::start_with(DURABLE),
        Fault::Pause => RedisServer::start(),
    };
    let url = server.url();
    let make = || {
        let tier = RedisTier::new(RedisConfig {
            timeout: Duration::from_millis(150),
            ..RedisConfig::new(&url)
        });
        Arc::new(
            Deduper::builder()
                .window(Duration::from_secs(600))
                .expected_keys(10_000)
                .shards(4)
                .mark_batch(50)
                .lease_duration(Duration::from_millis(300))
                .exact_tier(ExactTier::Custom(Arc::new(tier)))
                .build()
                .unwrap(),
        )
    };
    let a = make();
    let keys: Vec<u64> = (0..1_000).collect();
    let mut committed = std::collections::HashSet::new();
    for (i, chunk) in keys.chunks(100).enumerate() {
        if i == 3 {
            match fault {
                Fault::Kill => server.kill(),
                Fault::Pause => server.pause(),
            }
        }
        let requests: Vec<ClaimRequest<u64>> =
            chunk.iter().map(|&k| ClaimRequest::new(k)).collect();
        let claims = a.claim_batch_owned(&requests);
        let mut leases = Vec::new();
        for (&k, claim) in chunk.iter().zip(claims) {
            match claim {
                Claim::Acquired(lease) => leases.push((k, lease)),
                // A fresh key needs Redis while the filter is cold.
                Claim::Unavailable => {}
                other => panic!("{fault:?}: key {k}: {other:?}"),
            }
        }
        for (k, lease) in leases {
            let started = Instant::now();
            match lease.commit(format!("A{k}").as_bytes()) {
                Ok(()) => {
                    committed.insert(k);
                }
                Err(e) => panic!("{fault:?}: key {k}: {e}"),
            }
            assert!(started.elapsed() < CALL_BOUND);
        }
    }
    match fault {
        Fault::Kill => server.restart(),
        Fault::Pause => server.resume(),
    }
    std::thread::sleep(Duration::from_millis(400));
    // Every committed key stays completed; the others are acquired now.
    for &k in &keys {
        let claim = until_answered(|| match a.claim_owned(ClaimRequest::new(k)) {
            Claim::Unavailable => None,
            other => Some(other),
        });
        match claim {
            Claim::Completed { result, .. } => {
                assert!(committed.contains(&k), "{fault:?}: key {k} never committed");
                assert_eq!(result.as_ref(), format!("A{k}").as_bytes());
            }
            Claim::Acquired(lease) => {
                assert!(!committed.contains(&k), "{fault:?}: key {k} acquired again");
                lease.commit(format!("A{k}").as_bytes()).unwrap();
                committed.insert(k);
            }
            other => panic!("{fault:?}: key {k}: {other:?}"),
        }
    }
    until_answered(|| a.flush().ok());
    let fresh = make();
    for &k in &keys {
        let claim = until_answered(|| match fresh.claim_owned(ClaimRequest::new(k)) {
            Claim::Unavailable => None,
            other => Some(other),
        });
        match claim {
            Claim::Completed { result, .. } => {
                assert_eq!(result.as_ref(), format!("A{k}").as_bytes(), "{fault:?}");
            }
            other => panic!("{fault:?}: key {k}: {other:?}"),
        }
    }
    assert_eq!(committed.len(), keys.len());
}

#[test]
fn owned_commits_survive_a_kill() {
    owned_commits_survive(Fault::Kill);
}

#[test]
fn owned_commits_survive_a_pause() {
    owned_commits_survive(Fault::Pause);
}

/// An engine that only claims (an HTTP layer, a broker consumer) on a
/// persistent tier trusts its filter once a span has passed, as one that
/// checks does: from then on a fresh key is acquired without a request to
/// Redis, and a committed one is still found there. (Claims used to leave
/// the filter cold for ever: every key claimed was looked up in every live
/// slice.)
#[test]
fn an_engine_that_only_claims_warms_its_filter() {
    let server = RedisServer::start();
    let clock = tiered_dedup::ManualClock::new(tiered_dedup::Timestamp::from_secs(1_000));
    let tier = RedisTier::new(RedisConfig::new(&server.url()));
    let stats = tier.stats();
    let window = Duration::from_secs(60);
    let d = Deduper::builder()
        .window(window)
        .expected_keys(10_000)
        .shards(8)
        .clock(tiered_dedup::Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    let claim_and_commit = |keys: std::ops::Range<u64>| {
        let requests: Vec<ClaimRequest<u64>> = keys.map(ClaimRequest::new).collect();
        let commits: Vec<_> = d
            .claim_batch(&requests)
            .into_iter()
            .map(|c| (c.into_lease().expect("a fresh key is acquired"), b"done"))
            .collect();
        for committed in d.commit_batch(commits) {
            committed.unwrap();
        }
        d.flush().unwrap();
    };
    let requests = || stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    claim_and_commit(0..1_000);
    let before = requests();
    claim_and_commit(1_000..2_000);
    assert!(
        requests() >= before + 8,
        "cold: fresh keys are looked up, a request per shard"
    );
    // A span later (the window; no lateness) the filter is trusted.
    clock.advance(window + Duration::from_secs(1));
    claim_and_commit(2_000..3_000);
    let before = requests();
    let requests_of: Vec<ClaimRequest<u64>> = (3_000..4_000).map(ClaimRequest::new).collect();
    let claims = d.claim_batch(&requests_of);
    assert!(claims.iter().all(|c| matches!(c, Claim::Acquired(_))));
    // Only a filter false positive (about one in a thousand) is looked up.
    assert!(
        requests() <= before + 2,
        "warm: no lookup for fresh keys ({} requests)",
        requests() - before
    );
    drop(claims);
    // Committed keys are still found, with their results.
    let again: Vec<ClaimRequest<u64>> = (2_000..2_100).map(ClaimRequest::new).collect();
    for claim in d.claim_batch(&again) {
        match claim {
            Claim::Completed { result, .. } => assert_eq!(&result[..], b"done"),
            other => panic!("{other:?}"),
        }
    }
}

/// An engine whose replica is more than one read behind (another engine
/// appended 300 entries since it last read) reads the others' entries,
/// then its own, and answers from both: what the other committed is
/// completed with its result, a fresh key is acquired, a key it claimed
/// itself is in progress.
#[test]
fn a_replica_far_behind_reads_on_past_its_own_entries() {
    let server = RedisServer::start();
    let store = Store::Server(server);
    let lease = Duration::from_secs(60);
    let timeout = Duration::from_secs(5);
    let behind = live_engine(&store, Affinity::Shared, lease, timeout);
    let ahead = live_engine(&store, Affinity::Shared, lease, timeout);
    match behind.claim_owned(ClaimRequest::new(u64::MAX)) {
        Claim::Acquired(l) => l.commit(b"first").unwrap(),
        other => panic!("unexpected {other:?}"),
    }
    // One entry per call on the log of the key's shard: 4 shards, 1 200
    // claims and 1 200 commits, about 600 entries on each log (more than
    // one read's 256).
    for k in 0..1_200u64 {
        match ahead.claim_owned(ClaimRequest::new(k)) {
            Claim::Acquired(l) => l.commit(&k.to_le_bytes()).unwrap(),
            other => panic!("key {k}: unexpected {other:?}"),
        }
    }
    let requests: Vec<ClaimRequest<u64>> = (1_000..1_200u64)
        .chain(10_000..10_200)
        .map(ClaimRequest::new)
        .collect();
    let claims = behind.claim_batch_owned(&requests);
    let mut held = Vec::new();
    for (r, claim) in requests.iter().zip(claims) {
        let k = r.key;
        match claim {
            Claim::Completed { result, .. } if k < 10_000 => {
                assert_eq!(&result[..], &k.to_le_bytes(), "key {k}");
            }
            Claim::Acquired(l) if k >= 10_000 => held.push(l),
            other => panic!("key {k}: unexpected {other:?}"),
        }
    }
    assert_eq!(held.len(), 200);
    // Its own claims, read as the log has them: held by it.
    let again: Vec<ClaimRequest<u64>> = (10_000..10_200).map(ClaimRequest::new).collect();
    for claim in ahead.claim_batch_owned(&again) {
        assert!(matches!(claim, Claim::InProgress { .. }), "{claim:?}");
    }
    for claim in behind.claim_batch_owned(&again) {
        assert!(matches!(claim, Claim::InProgress { .. }), "{claim:?}");
    }
    match ahead.claim_owned(ClaimRequest::new(u64::MAX)) {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"first"),
        other => panic!("unexpected {other:?}"),
    }
}

/// Another engine's entry lands between a request's read and its append
/// (forced: writes are paused while both engines send, so both reads run
/// first and the appends wait in order): the second engine sees the gap,
/// reads its own entry back after the other's, and both answer as the
/// log's order says. The first engine applies its own entry as sent.
#[test]
fn an_entry_between_the_read_and_the_append_is_read_in_order() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let engine = || {
        let tier = RedisTier::new(RedisConfig {
            timeout: Duration::from_secs(10),
            ..RedisConfig::new(&server.url())
        });
        let stats = tier.stats();
        let d = Arc::new(
            Deduper::builder()
                .window(Duration::from_secs(600))
                .expected_keys(10_000)
                .shards(1)
                .affinity(Affinity::Shared)
                .lease_duration(Duration::from_secs(60))
                .exact_tier(ExactTier::Custom(Arc::new(tier)))
                .build()
                .unwrap(),
        );
        (d, stats)
    };
    let (first, first_stats) = engine();
    let (second, second_stats) = engine();
    // Both replicas start from the same point of the log.
    for d in [&first, &second] {
        let k = if Arc::ptr_eq(d, &first) { 1u64 } else { 2 };
        match d.claim_owned(ClaimRequest::new(k)) {
            Claim::Acquired(l) => l.commit(b"").unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    }
    let read_back = |s: &tiered_dedup::exact::redis::RedisStats| {
        s.own_entries_read_back
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let (first_before, second_before) = (read_back(&first_stats), read_back(&second_stats));
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5_000)
        .arg("WRITE")
        .query(&mut admin)
        .unwrap();
    let claim_in = |d: &Arc<Deduper>, key: u64| {
        let d = Arc::clone(d);
        std::thread::spawn(move || d.claim_owned(ClaimRequest::new(key)))
    };
    let held =
        |claim: Claim<Arc<Deduper>>, stats: &tiered_dedup::exact::redis::RedisStats| match claim {
            Claim::Acquired(l) => l,
            other => panic!("unexpected {other:?} ({:?})", stats.last_error()),
        };
    // Reads run at once; each script waits for the pause, in order.
    let a = claim_in(&first, 10);
    std::thread::sleep(Duration::from_millis(300));
    let b = claim_in(&second, 20);
    std::thread::sleep(Duration::from_millis(300));
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut admin)
        .unwrap();
    // The leases stay held (dropped, they would be released).
    let held_a = held(a.join().unwrap(), &first_stats);
    let held_b = held(b.join().unwrap(), &second_stats);
    let (a, b) = (held_a.info(), held_b.info());
    // The log's order: the first engine's claim, then the second's.
    assert!(a.token < b.token, "{a:?} {b:?}");
    assert_eq!(read_back(&first_stats) - first_before, 0);
    assert_eq!(read_back(&second_stats) - second_before, 1);
    // Both replicas hold both leases.
    for d in [&first, &second] {
        for key in [10u64, 20] {
            let claim = d.claim_owned(ClaimRequest::new(key));
            assert!(
                matches!(claim, Claim::InProgress { .. }),
                "{key}: {claim:?}"
            );
        }
    }
    held_a.commit(b"a").unwrap();
    held_b.commit(b"b").unwrap();
}

/// With shared keys, `commit_and_claim_batch` sends each shard's commits
/// and claims in one request to Redis (half the round trips of a commit
/// batch and a claim batch), and a claim of a key committed in the same
/// call finds it completed with its result; a multi-threaded
/// `ClaimBatcher` on such an engine gives every key to one caller.
#[test]
fn shared_commits_and_claims_share_a_round_trip() {
    let server = RedisServer::start();
    let tier = RedisTier::new(RedisConfig::new(&server.url()));
    let stats = tier.stats();
    let d = Arc::new(
        Deduper::builder()
            .window(Duration::from_secs(600))
            .expected_keys(10_000)
            .shards(2)
            .affinity(Affinity::Shared)
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap(),
    );
    assert!(d.shares_leases_remotely());
    let requests = || stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    let acquire =
        |keys: std::ops::Range<u64>| -> Vec<(tiered_dedup::Lease<Arc<Deduper>>, Vec<u8>)> {
            let batch: Vec<ClaimRequest<u64>> = keys.map(ClaimRequest::new).collect();
            d.claim_batch_owned(&batch)
                .into_iter()
                .map(|c| {
                    let lease = c.into_lease().expect("a fresh key is acquired");
                    let result = lease.token().to_le_bytes().to_vec();
                    (lease, result)
                })
                .collect()
        };
    let fresh = |keys: std::ops::Range<u64>| -> Vec<ClaimRequest<u64>> {
        keys.map(ClaimRequest::new).collect()
    };
    // Separate calls: a request per shard each.
    let commits = acquire(0..64);
    let before = requests();
    assert!(d.commit_batch(commits).iter().all(Result::is_ok));
    let claims = d.claim_batch_owned(&fresh(100..164));
    let separate = requests() - before;
    assert!(claims.iter().all(|c| c.is_acquired()));
    drop(claims);
    // One call: a request per shard for both.
    let commits = acquire(200..264);
    let before = requests();
    let (done, claims) = d.commit_and_claim_batch(commits, &fresh(300..364));
    let together = requests() - before;
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    assert!(claims.iter().all(|c| c.is_acquired()));
    drop(claims);
    assert_eq!(
        (separate, together),
        (4, 2),
        "requests to Redis: separate calls, then one call"
    );
    // Claims of the keys being committed in the same call: completed,
    // with the results just stored.
    let commits = acquire(400..464);
    let tokens: Vec<u64> = commits.iter().map(|(l, _)| l.token()).collect();
    let (done, claims) = d.commit_and_claim_batch(commits, &fresh(400..464));
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    for (k, claim) in claims.into_iter().enumerate() {
        match claim {
            Claim::Completed { result, .. } => {
                assert_eq!(&result[..], &tokens[k].to_le_bytes()[..], "key {k}");
            }
            other => panic!("key {k}: {other:?}"),
        }
    }

    // A lease of another engine on the same Redis commits before the
    // call's claims too.
    let other = Arc::new(
        Deduper::builder()
            .window(Duration::from_secs(600))
            .expected_keys(10_000)
            .shards(2)
            .affinity(Affinity::Shared)
            .exact_tier(ExactTier::Custom(Arc::new(RedisTier::new(
                RedisConfig::new(&server.url()),
            ))))
            .build()
            .unwrap(),
    );
    let foreign = other
        .claim_owned(ClaimRequest::new(500u64))
        .into_lease()
        .unwrap();
    let (done, claims) =
        d.commit_and_claim_batch(vec![(foreign, b"theirs".to_vec())], &fresh(500..501));
    assert!(done[0].is_ok(), "{done:?}");
    match &claims[0] {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"theirs"),
        other => panic!("{other:?}"),
    }

    // Threads of a multi-threaded batcher race for the same keys.
    let batcher = Arc::new(tiered_dedup::ClaimBatcher::with_threads(Arc::clone(&d), 3));
    let handles: Vec<_> = (0..6u64)
        .map(|t| {
            let batcher = Arc::clone(&batcher);
            std::thread::spawn(move || {
                let mut acquired = 0;
                for i in 0..200u64 {
                    let key = 10_000 + (t / 3) * 1_000 + i;
                    match batcher.claim(ClaimRequest::new(key)).wait() {
                        Claim::Acquired(lease) => {
                            batcher.commit(lease, b"ok".to_vec()).wait().unwrap();
                            acquired += 1;
                        }
                        Claim::InProgress { .. } | Claim::Completed { .. } => {}
                        other => panic!("{other:?}"),
                    }
                }
                acquired
            })
        })
        .collect();
    let acquired: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(acquired, 400, "each key acquired once");
}

/// `forget` on an engine that has made no other call yet (just restarted)
/// finds what an earlier engine recorded: it names the current slice to
/// the tier first. It used to look in the slices of time zero and answer
/// `false`, leaving the record in place.
#[test]
fn a_restarted_engine_forgets_what_the_last_one_recorded() {
    let server = RedisServer::start();
    let clock = tiered_dedup::ManualClock::new(tiered_dedup::Timestamp::from_secs(1_000_000));
    let engine = || {
        Deduper::builder()
            .window(Duration::from_secs(60))
            .expected_keys(10_000)
            .shards(2)
            .clock(tiered_dedup::Clock::Manual(clock.clone()))
            .exact_tier(ExactTier::Custom(Arc::new(RedisTier::new(
                RedisConfig::new(&server.url()),
            ))))
            .build()
            .unwrap()
    };
    let first = engine();
    for key in 0..20u64 {
        assert!(first.check(&key).is_new());
    }
    first.flush().unwrap();
    drop(first);
    clock.advance(Duration::from_secs(1));
    let second = engine();
    for key in 0..20u64 {
        assert!(second.forget(&key).unwrap(), "key {key} was recorded");
    }
    for key in 0..20u64 {
        assert!(second.check(&key).is_new(), "key {key} was forgotten");
    }
}

/// Three engines sharing keys on one server, their clocks 0, 2 and 4 ms
/// apart (hosts kept in step by NTP), a 300 ms window (50 ms slices: each
/// engine retires a slice's results every 50 ms by its own clock), twelve
/// threads (four per engine) claiming and committing 256 overlapping keys
/// in rounds: between rounds the three clocks move 2 ms together, so the
/// skews hold whatever the machine's load. Four windows of rounds: every claim is
/// answered (acquired, in progress, or completed with the result
/// committed), none `Unavailable`, and no key is acquired twice within a
/// window.
#[test]
fn racing_engines_on_skewed_clocks_are_answered() {
    racing_engines_on_clocks([0, 2, 4]);
}

/// The same with clocks 0, 60 and 130 ms apart (more than two slices):
/// every claim is still answered, since a result is deleted only after
/// the log shows the clock that retired it; acquisitions of a key lie at
/// least the window less the largest skew apart (a skew of ε moves a
/// window's edge by up to ε).
#[test]
fn racing_engines_slices_apart_are_answered() {
    racing_engines_on_clocks([0, 60, 130]);
}

/// Three engines on clocks `skews` ms behind the first's, racing as
/// [`racing_engines_on_skewed_clocks_are_answered`] says.
fn racing_engines_on_clocks(skews: [u64; 3]) {
    let server = RedisServer::start();
    let window = Duration::from_millis(300);
    let start = Timestamp::from_secs(1_000);
    let clocks: Vec<ManualClock> = skews
        .iter()
        .map(|ms| ManualClock::new(Timestamp::from_nanos(start.as_nanos() - ms * 1_000_000)))
        .collect();
    let engines: Vec<(Arc<Deduper>, Arc<tiered_dedup::exact::redis::RedisStats>)> = clocks
        .iter()
        .map(|clock| {
            let tier = RedisTier::new(RedisConfig {
                timeout: Duration::from_secs(5),
                policy: FailurePolicy::FailClosed,
                ..RedisConfig::new(&server.url())
            });
            let stats = tier.stats();
            let d = Deduper::builder()
                .window(window)
                .expected_keys(10_000)
                .shards(2)
                .affinity(Affinity::Shared)
                .lease_duration(Duration::from_secs(60))
                .clock(Clock::Manual(clock.clone()))
                .exact_tier(ExactTier::Custom(Arc::new(tier)))
                .build()
                .unwrap();
            (Arc::new(d), stats)
        })
        .collect();
    const THREADS: usize = 12;
    const ROUNDS: u64 = 600; // 2 ms each: four windows
    const PER_ROUND: u64 = 8;
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (d, stats) = engines[t % 3].clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut rng = Rng::new(0x5EED_0000 + t as u64);
                let mut unavailable = Vec::new();
                // (key, acquired at) of every acquisition.
                let mut acquired = Vec::new();
                for _ in 0..ROUNDS {
                    barrier.wait();
                    for _ in 0..PER_ROUND {
                        let key = rng.below(256);
                        match d.claim_owned(ClaimRequest::new(key)) {
                            Claim::Acquired(lease) => {
                                acquired.push((key, lease.info().acquired_at));
                                lease.commit(format!("r{key}").as_bytes()).unwrap();
                            }
                            Claim::Completed { result, .. } => {
                                assert_eq!(&result[..], format!("r{key}").as_bytes());
                            }
                            Claim::InProgress { .. } => {}
                            other => {
                                unavailable.push(format!("{other:?}: {:?}", stats.last_error()))
                            }
                        }
                    }
                    barrier.wait();
                }
                (unavailable, acquired)
            })
        })
        .collect();
    for _ in 0..ROUNDS {
        barrier.wait();
        barrier.wait();
        for clock in &clocks {
            clock.advance(Duration::from_millis(2));
        }
    }
    let mut failed = Vec::new();
    let mut acquired: Vec<(u64, Timestamp)> = Vec::new();
    for h in handles {
        let (u, a) = h.join().unwrap();
        failed.extend(u);
        acquired.extend(a);
    }
    assert!(
        failed.is_empty(),
        "{} claims unanswered: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    // Acquisitions of one key lie a window apart, less the skew (the
    // anchors the leases report are the ones the store keeps).
    let skew = Duration::from_millis(skews.iter().copied().max().unwrap_or(0));
    let apart = window.saturating_sub(skew).as_nanos() as u64;
    acquired.sort();
    for pair in acquired.windows(2) {
        if pair[0].0 == pair[1].0 {
            let gap = pair[1].1.as_nanos() - pair[0].1.as_nanos();
            assert!(
                gap >= apart,
                "key {} acquired at {:?} and {:?}",
                pair[0].0,
                pair[0].1,
                pair[1].1
            );
        }
    }
    assert!(acquired.len() > 256, "{} acquisitions", acquired.len());
}

/// An engine of the window-edge tests: shared keys on `server`, a
/// 300 ms window (50 ms slices), one shard, 60 s leases, fail-closed,
/// on `clock`; with its Redis tier's stats.
fn edge_engine(
    server: &RedisServer,
    clock: &ManualClock,
) -> (Deduper, Arc<tiered_dedup::exact::redis::RedisStats>) {
    edge_engine_on(&server.url(), Clock::Manual(clock.clone()), |b| b)
}

/// [`edge_engine`] on `clock`, its builder changed by `tweak`.
fn edge_engine_on(
    url: &str,
    clock: Clock,
    tweak: impl FnOnce(DeduperBuilder) -> DeduperBuilder,
) -> (Deduper, Arc<tiered_dedup::exact::redis::RedisStats>) {
    let tier = RedisTier::new(RedisConfig {
        policy: FailurePolicy::FailClosed,
        ..RedisConfig::new(url)
    });
    let stats = tier.stats();
    let builder = Deduper::builder()
        .window(Duration::from_millis(300))
        .expected_keys(1_000)
        .shards(1)
        .affinity(Affinity::Shared)
        .lease_duration(Duration::from_secs(60))
        .clock(clock)
        .exact_tier(ExactTier::Custom(Arc::new(tier)));
    (tweak(builder).build().unwrap(), stats)
}

/// Sets ACL user `user` (password `<user>-pw`) to every key and command,
/// then `rule` (e.g. `-unlink`; a user already connected is held to it at
/// once); the URL that logs in as it.
fn all_but(server: &RedisServer, admin: &mut redis::Connection, user: &str, rule: &str) -> String {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg("on")
        .arg(format!(">{user}-pw"))
        .arg("~*")
        .arg("+@all")
        .arg(rule)
        .query(admin)
        .unwrap();
    format!("redis://{user}:{user}-pw@127.0.0.1:{}", server.port)
}

/// Claims `request` on `d`, which must acquire it, and commits `result`.
fn commit_first<K: tiered_dedup::Key>(d: &Deduper, request: ClaimRequest<K>, result: &[u8]) {
    match d.claim_with(request) {
        Claim::Acquired(lease) => lease.commit(result).unwrap(),
        other => panic!("{other:?}"),
    };
}

/// Shared keys, engines on clocks a few milliseconds apart: keys
/// committed in the last millisecond of a slice, then claimed and checked
/// by the engines whose clocks are behind just after the one ahead
/// rotated and deleted that slice's results (its clock passed the
/// slice's end plus the window), a millisecond before the window closes
/// by their own readings. The replica finds the record inside the window
/// but its result is gone: the claim used to answer `Unavailable` ("a
/// committed result is missing from Redis"). The record has left the
/// window by the clock that deleted it: the key is acquired once, through
/// the log (the other engine behind finds it in progress), and a check
/// answers a duplicate (it needs no result).
#[test]
fn a_claim_at_the_window_edge_after_another_engine_rotated() {
    let server = RedisServer::start();
    let window = Duration::from_millis(300);
    // 50 ms slices; slice 20 000 starts at 1 000 s.
    let start = Timestamp::from_secs(1_000);
    let behind = ManualClock::new(start);
    let ahead = ManualClock::new(start);
    let engine = |clock: &ManualClock| edge_engine(&server, clock);
    let (a, a_stats) = engine(&behind);
    let (c, c_stats) = engine(&behind);
    let (b, _) = engine(&ahead);
    // Committed at 1 000.049 s, the last millisecond of slice 20 000 (B
    // names that slice to its tier too).
    behind.advance(Duration::from_millis(49));
    ahead.advance(Duration::from_millis(49));
    for (d, key) in [(&a, 1u64), (&a, 2), (&b, 3)] {
        commit_first(d, ClaimRequest::new(key), b"first");
    }
    // B at 1 000.350 s, slice 20 007: its rotation deletes slice 20 000's
    // results.
    ahead.advance(Duration::from_millis(301));
    commit_first(&b, ClaimRequest::new(4u64), b"other");
    // A and C at 1 000.348 s: 299 ms after the commits.
    behind.advance(Duration::from_millis(299));
    let lease = match a.claim(&1u64) {
        Claim::Acquired(lease) => lease,
        other => panic!("{other:?} ({:?})", a_stats.last_error()),
    };
    match c.claim(&1u64) {
        Claim::InProgress { .. } => {}
        other => panic!("acquired twice? {other:?} ({:?})", c_stats.last_error()),
    };
    assert!(
        matches!(c.check(&2u64), Verdict::Duplicate { .. }),
        "{:?}",
        c_stats.last_error()
    );
    // The new record is anchored where the old one left the window
    // (1 000.349 s), and the lease says so: its window's anchor.
    let anchor = start.saturating_add(Duration::from_millis(349));
    assert_eq!(lease.info().acquired_at, anchor);
    lease.commit(b"second").unwrap();
    // B finds it, with its result and that anchor.
    match b.claim(&1u64) {
        Claim::Completed { result, first_seen } => {
            assert_eq!(&result[..], b"second");
            assert_eq!(first_seen, anchor);
        }
        other => panic!("{other:?}"),
    };
    match c.claim(&1u64) {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"second"),
        other => panic!("{other:?}"),
    };
    assert_eq!(a_stats.last_error(), None);
    assert_eq!(c_stats.last_error(), None);
    // One window after that anchor the key is new again, not before.
    behind.set(anchor.saturating_add(window - Duration::from_millis(1)));
    assert!(matches!(a.claim(&1u64), Claim::Completed { .. }));
    behind.set(anchor.saturating_add(window));
    ahead.set(anchor.saturating_add(window));
    match a.claim(&1u64) {
        Claim::Acquired(lease) => lease.release().unwrap(),
        other => panic!("one window after the anchor: {other:?}"),
    };
}

/// Shared keys, clocks three slices apart (150 ms, for 50 ms slices): the
/// engine ahead retires a record's result when its clock passes the
/// window; the engines behind, 151 ms after the commit by their clocks,
/// find the record inside the window and its result gone. The log shows
/// the clock that retired it, so the claim is decided again past the
/// window, as for a skew under a slice: acquired once (it used to answer
/// `Unavailable` beyond a slice of skew).
#[test]
fn a_claim_slices_behind_the_clock_that_retired_its_result_acquires() {
    let server = RedisServer::start();
    let start = Timestamp::from_secs(1_000);
    let behind = ManualClock::new(start);
    let ahead = ManualClock::new(start);
    let (a, a_stats) = edge_engine(&server, &behind);
    let (c, c_stats) = edge_engine(&server, &behind);
    let (b, _) = edge_engine(&server, &ahead);
    // Committed at 1 000.049 s, the last millisecond of slice 20 000.
    behind.advance(Duration::from_millis(49));
    ahead.advance(Duration::from_millis(49));
    commit_first(&a, ClaimRequest::new(1u64), b"first");
    assert!(matches!(b.claim(&9u64), Claim::Acquired(_)));
    // B at 1 000.350 s retires slice 20 000 and proves its clock.
    ahead.advance(Duration::from_millis(301));
    assert!(matches!(b.claim(&10u64), Claim::Acquired(_)));
    // A and C at 1 000.200 s.
    behind.advance(Duration::from_millis(151));
    let lease = match a.claim(&1u64) {
        Claim::Acquired(lease) => lease,
        other => panic!("{other:?} ({:?})", a_stats.last_error()),
    };
    match c.claim(&1u64) {
        Claim::InProgress { .. } => {}
        other => panic!("acquired twice? {other:?} ({:?})", c_stats.last_error()),
    };
    // Anchored where the record left the window, as the clock ahead saw.
    let anchor = start.saturating_add(Duration::from_millis(349));
    assert_eq!(lease.info().acquired_at, anchor);
    lease.commit(b"second").unwrap();
    for d in [&b, &c] {
        match d.claim(&1u64) {
            Claim::Completed { result, first_seen } => {
                assert_eq!(&result[..], b"second");
                assert_eq!(first_seen, anchor);
            }
            other => panic!("{other:?}"),
        };
    }
    assert_eq!(a_stats.last_error(), None);
    assert_eq!(c_stats.last_error(), None);
}

/// Shared keys under event time with a lateness of a slice or more: an
/// engine whose events ran ahead retires a record's result, and a claim of
/// an engine behind it (inside the window by its event time, more than a
/// slice behind the events that retired it, as a lateness of a slice or
/// more allows) finds the proof in the log and is decided again past the
/// window: acquired once (it used to answer `Unavailable` whenever the
/// lateness was a slice or more).
#[test]
fn an_event_time_claim_a_lateness_behind_is_decided_again() {
    let server = RedisServer::start();
    let engine = || {
        edge_engine_on(&server.url(), Clock::EventTime, |b| {
            b.allowed_lateness(Duration::from_millis(300))
        })
    };
    let (a, a_stats) = engine();
    let (c, c_stats) = engine();
    let (b, _) = engine();
    let at = |ms: u64| Timestamp::from_secs(1_000).saturating_add(Duration::from_millis(ms));
    // Span 600 ms: slices of 100 ms. Committed at 1 000.050 s; B names
    // that slice to its tier too.
    assert!(matches!(
        b.claim_with(ClaimRequest::new(8u64).at(at(50))),
        Claim::Acquired(_)
    ));
    commit_first(&a, ClaimRequest::new(1u64).at(at(50)), b"first");
    // B's events reach 1 000.700 s (slice 10 007): its rotation retires
    // slice 10 000, and its claim there proves that clock.
    match b.claim_with(ClaimRequest::new(9u64).at(at(700))) {
        Claim::Acquired(lease) => lease.release().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        b.claim_with(ClaimRequest::new(10u64).at(at(701))),
        Claim::Acquired(_)
    ));
    // A and C at event time 1 000.340 s, 290 ms after the commit.
    let lease = match a.claim_with(ClaimRequest::new(1u64).at(at(340))) {
        Claim::Acquired(lease) => lease,
        other => panic!("{other:?} ({:?})", a_stats.last_error()),
    };
    match c.claim_with(ClaimRequest::new(1u64).at(at(340))) {
        Claim::InProgress { .. } => {}
        other => panic!("acquired twice? {other:?} ({:?})", c_stats.last_error()),
    };
    assert_eq!(lease.info().acquired_at, at(350));
    lease.commit(b"second").unwrap();
    match c.claim_with(ClaimRequest::new(1u64).at(at(345))) {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"second"),
        other => panic!("{other:?}"),
    };
    assert_eq!(a_stats.last_error(), None);
    assert_eq!(c_stats.last_error(), None);
}

/// Shared keys under an ACL user that may not `UNLINK` (a real server's
/// `NOPERM`): deleting retired results is upkeep, so its refusal never
/// fails a call. The engine that retired a slice goes on claiming, the
/// hash stays (left to its TTL), and an engine behind replays the result.
#[test]
fn a_refused_delete_of_retired_results_fails_no_claim() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let url = all_but(&server, &mut admin, "nounlink", "-unlink");
    let start = Timestamp::from_secs(1_000);
    let behind = ManualClock::new(start);
    let ahead = ManualClock::new(start);
    let (a, a_stats) = edge_engine_on(&url, Clock::Manual(behind.clone()), |b| b);
    let (b, b_stats) = edge_engine_on(&url, Clock::Manual(ahead.clone()), |b| b);
    behind.advance(Duration::from_millis(49));
    ahead.advance(Duration::from_millis(49));
    commit_first(&a, ClaimRequest::new(1u64), b"first");
    assert!(matches!(b.claim(&9u64), Claim::Acquired(_)));
    // B at 1 000.350 s retires slice 20 000 and proves its clock; its
    // delete is refused, and each of its claims is still answered.
    ahead.advance(Duration::from_millis(301));
    for key in 10u64..20 {
        match b.claim(&key) {
            Claim::Acquired(lease) => lease.commit(b"b").unwrap(),
            other => panic!("{key}: {other:?} ({:?})", b_stats.last_error()),
        }
    }
    let hashes: Vec<String> = redis::cmd("KEYS").arg("*b:*").query(&mut admin).unwrap();
    assert!(hashes.len() >= 2, "the retired hash stays: {hashes:?}");
    behind.advance(Duration::from_millis(299));
    match a.claim(&1u64) {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"first"),
        other => panic!("{other:?} ({:?})", a_stats.last_error()),
    };
}

/// Shared keys: a commit's result goes to its slice's hash before the
/// transaction that appends the commit to the log. When that transaction
/// never runs (here the server refuses its `XADD`: the user lost the
/// right between the claim and the commit), the commit fails, and the
/// hash it wrote still carries a TTL: it expires even if no engine ever
/// retires its slice (the TTL used to be set inside the transaction, so
/// such a hash stayed forever).
#[test]
fn a_result_whose_append_never_ran_still_expires() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let url = all_but(&server, &mut admin, "writer", "+xadd");
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = edge_engine_on(&url, Clock::Manual(clock.clone()), |b| b);
    let Claim::Acquired(lease) = d.claim(&1u64) else {
        panic!("a fresh key ({:?})", stats.last_error());
    };
    all_but(&server, &mut admin, "writer", "-xadd");
    let err = lease.commit(b"result").expect_err("the append is refused");
    assert!(
        err.to_string().contains("permission denied"),
        "{err} ({:?})",
        stats.last_error()
    );
    let hashes: Vec<String> = redis::cmd("KEYS").arg("*b:*").query(&mut admin).unwrap();
    assert_eq!(hashes.len(), 1, "the result was written: {hashes:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&hashes[0])
        .query(&mut admin)
        .unwrap();
    assert!(
        ttl > 0,
        "the hash of a commit never appended expires: {ttl}"
    );
}

/// Shared keys: an engine whose shard rotates without appending to the
/// log (idle upkeep, `maintain`) leaves no proof there that its clock
/// passed a record's window, so it deletes no result yet: an engine whose
/// clock is behind, a millisecond inside the window, replays the result
/// (it used to answer `Unavailable`, "a committed result is missing").
/// The results go once the rotating engine appends an entry that carries
/// its clock; a claim behind it then finds the proof and acquires.
#[test]
fn a_rotation_that_appends_nothing_deletes_no_result() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let start = Timestamp::from_secs(1_000);
    let behind = ManualClock::new(start);
    let ahead = ManualClock::new(start);
    let (a, a_stats) = edge_engine(&server, &behind);
    let (b, _) = edge_engine(&server, &ahead);
    // Committed at 1 000.049 s, the last millisecond of slice 20 000.
    behind.advance(Duration::from_millis(49));
    ahead.advance(Duration::from_millis(49));
    for key in [1u64, 2] {
        commit_first(&a, ClaimRequest::new(key), b"first");
    }
    // B names slice 20 000 to its tier, then idles to 1 000.350 s (slice
    // 20 007): its upkeep rotates past slice 20 000 without appending.
    assert!(matches!(b.claim(&9u64), Claim::Acquired(_)));
    ahead.advance(Duration::from_millis(301));
    b.maintain();
    let hashes = |admin: &mut redis::Connection| -> Vec<String> {
        redis::cmd("KEYS").arg("*b:*").query(admin).unwrap()
    };
    assert_eq!(hashes(&mut admin).len(), 1, "kept until a clock is proven");
    // A at 1 000.348 s: inside the window by its clock, and the result is
    // there to replay.
    behind.advance(Duration::from_millis(299));
    match a.claim(&1u64) {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"first"),
        other => panic!("{other:?} ({:?})", a_stats.last_error()),
    };
    // B's next claim appends its clock; the results go with the proof in
    // the log, and A's claim of the other key behind it acquires.
    assert!(matches!(b.claim(&10u64), Claim::Acquired(_)));
    assert!(hashes(&mut admin).is_empty(), "{:?}", hashes(&mut admin));
    match a.claim(&2u64) {
        Claim::Acquired(lease) => lease.release().unwrap(),
        other => panic!("{other:?} ({:?})", a_stats.last_error()),
    };
    assert_eq!(a_stats.last_error(), None);
}

/// Shared keys: a result missing from Redis that no engine's rotation
/// explains (its hash deleted behind the engines' backs, well inside the
/// window by every clock) is still an error: the claim answers
/// `Unavailable`, never acquires a key whose record is live in the log.
#[test]
fn a_result_lost_inside_the_window_is_not_taken_for_expired() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = edge_engine(&server, &clock);
    commit_first(&d, ClaimRequest::new(1u64), b"first");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*b:*").query(&mut admin).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut admin).unwrap();
    clock.advance(Duration::from_millis(100));
    match d.claim(&1u64) {
        Claim::Unavailable => {}
        other => panic!("{other:?}"),
    };
    let e = stats.last_error().expect("remembered");
    assert!(e.to_string().contains("missing from Redis"), "{e}");
}

/// The same in the last slice of the record's window, where a clock a
/// slice ahead could have retired it: no entry in the log shows a clock
/// that far, so the result was lost, not retired, and the claim answers
/// `Unavailable` (found by review: this claim used to acquire the key).
#[test]
fn a_result_lost_in_the_last_slice_is_not_taken_for_expired() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = edge_engine(&server, &clock);
    // Committed at 1 000.049 s, the last millisecond of slice 20 000.
    clock.advance(Duration::from_millis(49));
    commit_first(&d, ClaimRequest::new(1u64), b"first");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*b:*").query(&mut admin).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut admin).unwrap();
    // 1 000.320 s, slice 20 006: before any clock reaches 1 000.350 s.
    clock.advance(Duration::from_millis(271));
    match d.claim(&1u64) {
        Claim::Unavailable => {}
        other => panic!(
            "a record live by every clock: {other:?} ({:?})",
            stats.last_error()
        ),
    };
    let e = stats.last_error().expect("remembered");
    assert!(e.to_string().contains("missing from Redis"), "{e}");
}

/// Shared keys: a batch whose call fails after its entries reached the
/// log (here: one key's result lost, which is an error) answers
/// `Unavailable` for every claim, also for the ones the log acquired:
/// nobody holds those leases, so the next request releases them, and the
/// key is acquirable again at once instead of in progress for the
/// lease's 60 s (found by review).
#[test]
fn a_failed_batch_leaves_no_lease_held_by_nobody() {
    a_failing_batch_leaves_no_lease_held_by_nobody(|admin, hash| {
        let _: () = redis::cmd("DEL").arg(hash).query(admin).unwrap();
    });
}

/// The same when reading the stored results fails after the batch's
/// entries reached the log (each results hash replaced by a string, so the
/// read answers `WRONGTYPE`).
#[test]
fn a_failed_result_read_leaves_no_lease_held_by_nobody() {
    a_failing_batch_leaves_no_lease_held_by_nobody(|admin, hash| {
        let _: () = redis::cmd("DEL").arg(hash).query(admin).unwrap();
        let _: () = redis::cmd("SET").arg(hash).arg("x").query(admin).unwrap();
    });
}

/// Key 1 committed with a result, its results hash spoiled by `spoil`,
/// then keys 1 and 2 claimed in one batch: every claim answers
/// `Unavailable` although the batch reached the log, and key 2, which the
/// log acquired, is acquirable by the next request.
fn a_failing_batch_leaves_no_lease_held_by_nobody(spoil: impl Fn(&mut redis::Connection, &str)) {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, _) = edge_engine(&server, &clock);
    commit_first(&d, ClaimRequest::new(1u64), b"first");
    let hashes: Vec<String> = redis::cmd("KEYS").arg("*b:*").query(&mut admin).unwrap();
    assert!(!hashes.is_empty(), "the result is stored in a hash");
    for hash in &hashes {
        spoil(&mut admin, hash);
    }
    let log_before = log_entries(&mut admin);
    clock.advance(Duration::from_millis(100));
    let answers = d.claim_batch(&[ClaimRequest::new(1u64), ClaimRequest::new(2u64)]);
    assert!(
        answers.iter().all(|c| matches!(c, Claim::Unavailable)),
        "{answers:?}"
    );
    assert!(
        log_entries(&mut admin) > log_before,
        "the batch reached the log before it failed"
    );
    drop(answers);
    // A failed request may drop the connection, which reconnects after a
    // backoff (10 ms for a first failure): until then, `Unavailable`.
    clock.advance(Duration::from_millis(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let again = loop {
        match d.claim(&2u64) {
            Claim::Unavailable if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => break other,
        }
    };
    match again {
        Claim::Acquired(lease) => lease.release().unwrap(),
        other => panic!("key 2, told Unavailable, is held by nobody: {other:?}"),
    };
}

/// Entries in every claims log stream on the server.
fn log_entries(admin: &mut redis::Connection) -> u64 {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(admin).unwrap();
    let mut entries = 0;
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query(admin).unwrap();
        if kind == "stream" {
            entries += redis::cmd("XLEN").arg(&key).query::<u64>(admin).unwrap();
        }
    }
    entries
}

/// An engine of the stopped-Redis consumer tests: shared keys on `url`,
/// 200 ms timeouts, fail-closed, `shards` shards, 60 s leases.
fn pausable_engine(url: &str, shards: usize) -> Arc<Deduper> {
    let tier = RedisTier::new(RedisConfig {
        timeout: Duration::from_millis(200),
        policy: FailurePolicy::FailClosed,
        ..RedisConfig::new(url)
    });
    Arc::new(
        Deduper::builder()
            .window(Duration::from_secs(600))
            .expected_keys(1_000)
            .shards(shards)
            .affinity(Affinity::Shared)
            .lease_duration(Duration::from_secs(60))
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap(),
    )
}

/// A batch consumer whose commit meets a stopped Redis (`SIGSTOP` while
/// its handler runs, `SIGCONT` 600 ms later; requests time out after
/// 200 ms) tries the commit again and learns that it is stored: the
/// message is `Processed` and a repeat of its key replays the result.
/// Without the retry the commit answers `Uncommitted` although Redis
/// applied it once it ran again (the repeat replays it all the same), so
/// the consumer's counters report an effect unrecorded that is recorded.
#[test]
fn a_consumer_commit_rides_out_a_stopped_redis() {
    use tiered_dedup::consumer::{BatchConsumer, Delivery, Disposition};
    let server = Arc::new(std::sync::Mutex::new(RedisServer::start()));
    let url = server.lock().unwrap().url();
    for (budget, key) in [
        (Duration::from_secs(3), "retried"),
        (Duration::ZERO, "not-retried"),
    ] {
        let engine = pausable_engine(&url, 2);
        let consumer = BatchConsumer::new(engine).commit_retry(budget);
        let mut resumer = None;
        let out = consumer.process(
            vec![Delivery::new(key, 1u32)],
            |_| {
                server.lock().unwrap().pause();
                let server = Arc::clone(&server);
                resumer = Some(std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(600));
                    server.lock().unwrap().resume();
                }));
                Ok::<_, ()>(b"effect".to_vec())
            },
            |_| panic!("no conflict"),
        );
        resumer.take().unwrap().join().unwrap();
        // Redis answers again; a reconnection may take a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        let repeat = loop {
            let r = consumer.process(
                vec![Delivery::new(key, 2u32)],
                |_| Ok::<_, ()>(b"again".to_vec()),
                |_| panic!("no conflict"),
            );
            match &r[0].1 {
                Disposition::Unavailable if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                d => break d.clone(),
            }
        };
        let stats = consumer.stats();
        if budget.is_zero() {
            assert_eq!(out[0].1, Disposition::Uncommitted, "{key}");
            assert_eq!((stats.commit_retries, stats.uncommitted), (0, 1));
        } else {
            assert_eq!(out[0].1, Disposition::Processed, "{key}: {stats:?}");
            assert!(stats.commit_retries >= 1, "{stats:?}");
            assert_eq!(stats.uncommitted, 0, "{stats:?}");
        }
        // Either way Redis has the commit: the repeat replays it.
        assert_eq!(
            repeat,
            Disposition::Replayed {
                result: Arc::from(&b"effect"[..])
            },
            "{key}"
        );
    }
}

/// The same for pipelined batches: the held commits go with the next
/// batch's claims, and Redis is stopped (`SIGSTOP`, 600 ms, 200 ms
/// timeouts) just before that call. The call fails; with a retry budget
/// the held commit is tried again and stored (`Processed`), without one it
/// is `Uncommitted`; either way Redis ends up with it and a repeat
/// replays the first result.
#[test]
fn a_pipelined_consumers_held_commit_rides_out_a_stopped_redis() {
    use tiered_dedup::consumer::{BatchConsumer, Delivery, Disposition, Held};
    let server = Arc::new(std::sync::Mutex::new(RedisServer::start()));
    let url = server.lock().unwrap().url();
    for (budget, key) in [
        (Duration::from_secs(3), "retried"),
        (Duration::ZERO, "not-retried"),
    ] {
        let engine = pausable_engine(&url, 1);
        let consumer = BatchConsumer::new(engine).commit_retry(budget);
        let mut held = Held::new();
        let first = consumer.process_pipelined(
            &mut held,
            vec![Delivery::new(key, 1u32)],
            |_| Ok::<_, ()>(b"effect".to_vec()),
            |_| panic!("no conflict"),
        );
        assert!(first.is_empty() && held.len() == 1);
        server.lock().unwrap().pause();
        let resumer = {
            let server = Arc::clone(&server);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(600));
                server.lock().unwrap().resume();
            })
        };
        let other = format!("{key}-next");
        let out = consumer.process_pipelined(
            &mut held,
            vec![Delivery::new(&other, 2u32)],
            |_| Ok::<_, ()>(b"next".to_vec()),
            |_| panic!("no conflict"),
        );
        resumer.join().unwrap();
        let out_first = out
            .iter()
            .find(|(m, _)| *m == 1)
            .expect("settled")
            .1
            .clone();
        let stats = consumer.stats();
        if budget.is_zero() {
            assert_eq!(out_first, Disposition::Uncommitted, "{key}");
            assert_eq!(stats.commit_retries, 0);
        } else {
            assert_eq!(out_first, Disposition::Processed, "{key}: {stats:?}");
            assert!(stats.commit_retries >= 1, "{stats:?}");
        }
        let _ = consumer.flush(&mut held);
        // Redis answers again; a reconnection may take a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        let repeat = loop {
            let r = consumer.process(
                vec![Delivery::new(key, 3u32)],
                |_| Ok::<_, ()>(b"again".to_vec()),
                |_| panic!("no conflict"),
            );
            match &r[0].1 {
                Disposition::Unavailable if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                d => break d.clone(),
            }
        };
        assert_eq!(
            repeat,
            Disposition::Replayed {
                result: Arc::from(&b"effect"[..])
            },
            "{key}"
        );
    }
}

/// A claim whose answer was lost (Redis stopped past the request timeout,
/// then resumed: the request ran all the same) leaves a lease nobody
/// holds. The engine finds it in the log with its next request and
/// releases it; the retry of that claim, in that same request, acquires
/// the key rather than meeting the orphaned lease — which answered
/// `InProgress` until the lease expired (a broker consumer waited the
/// whole lease out before redelivering).
#[test]
fn a_claim_retried_after_its_answer_was_lost_acquires() {
    let server = RedisServer::start();
    let tier = RedisTier::new(RedisConfig {
        timeout: Duration::from_millis(200),
        policy: FailurePolicy::FailClosed,
        ..RedisConfig::new(&server.url())
    });
    let engine = Deduper::builder()
        .window(Duration::from_secs(600))
        .expected_keys(1_000)
        .shards(1)
        .affinity(Affinity::Shared)
        .lease_duration(Duration::from_secs(60))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    // The log read once, so the replica is current.
    match engine.claim(&0u64) {
        Claim::Acquired(lease) => lease.commit(b"").unwrap(),
        other => panic!("{other:?}"),
    }
    server.pause();
    let lost = engine.claim_batch(&[ClaimRequest::new(1u64), ClaimRequest::new(2u64)]);
    assert!(
        lost.iter().all(|c| matches!(c, Claim::Unavailable)),
        "{lost:?}"
    );
    drop(lost);
    server.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        let answers = engine.claim_batch(&[ClaimRequest::new(1u64), ClaimRequest::new(3u64)]);
        if answers.iter().any(|c| matches!(c, Claim::Unavailable)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        break answers;
    };
    for (key, claim) in [1u64, 3].iter().zip(again) {
        match claim {
            Claim::Acquired(lease) => lease.commit(b"done").unwrap(),
            other => panic!("key {key}, claimed by a request whose answer was lost: {other:?}"),
        }
    }
    // Key 2's orphaned lease was released too.
    match engine.claim(&2u64) {
        Claim::Acquired(lease) => lease.release().unwrap(),
        other => panic!("key 2: {other:?}"),
    };
}
