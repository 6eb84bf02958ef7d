//! Claims against the PostgreSQL tier, judged by the reference state
//! machine of `tests/claims.rs` (copied here: a map from key to
//! `Held { token, until, payload } | Done { at, result, payload }`): every
//! answer of claim, commit, release, extend, drop, check and forget over
//! long random streams, with the clock passing leases and windows — owned
//! keys (leases in the engine, records and results in PostgreSQL) and
//! shared keys (leases, tokens and records in PostgreSQL).

#[path = "support/pg_server.rs"]
mod pg_server;
#[path = "../../../tests/support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pg_server::PgServer;
use rng::Rng;
use tiered_dedup::{
    Affinity, Claim, ClaimRequest, Clock, Deduper, DeduperBuilder, ExactTier, Lease, ManualClock,
    PayloadFingerprint, Timestamp, Verdict,
};
use tiered_dedup_postgres::{PgConfig, PgTier};

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

    /// Whether `token` is `key`'s live lease at `now`.
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
}

struct Setting {
    name: &'static str,
    window: Option<Duration>,
    tier: ExactTier,
    affinity: Affinity,
    mark_batch: usize,
    shards: usize,
    snapshots: bool,
    ops: usize,
    key_space: u64,
    /// The tier's counters (its last error is printed on a failure).
    stats: Arc<tiered_dedup_postgres::PgStats>,
}

const LEASE: Duration = Duration::from_millis(400);

fn builder(s: &Setting, clock: &ManualClock) -> DeduperBuilder {
    let mut b = Deduper::builder()
        .expected_keys(2_000)
        .shards(s.shards)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(s.tier.clone())
        .affinity(s.affinity)
        .mark_batch(s.mark_batch)
        .lease_duration(LEASE)
        .max_result_bytes(200);
    b = match s.window {
        Some(w) => b.window(w),
        None => b.no_window(),
    };
    b
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
        other => panic!("unexpected {other:?} from the PostgreSQL tier"),
    }
}

fn run(s: &Setting, seed: u64) {
    let mut rng = Rng::new(seed);
    let start = Timestamp::from_secs(1_700_000_000);
    let clock = ManualClock::new(start);
    let mut dedup = Arc::new(builder(s, &clock).build().unwrap());
    let mut reference = Reference {
        window: s.window.map(|w| w.as_nanos() as u64),
        keys: HashMap::new(),
        last_token: HashMap::new(),
    };
    let key_space = s.key_space;
    let lease_nanos = LEASE.as_nanos() as u64;
    let mut leases: Vec<(u64, Lease<Arc<Deduper>>)> = Vec::new();
    let (mut acquired, mut completed, mut lost, mut conflicts_seen, mut restarts) = (0, 0, 0, 0, 0);
    let payload = |rng: &mut Rng| match rng.below(4) {
        0 => None,
        p => Some(p),
    };
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
                let answers = if n == 1 {
                    vec![dedup.claim_owned(requests[0])]
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
                        Claim::Completed { .. } => completed += 1,
                        Claim::Conflict => conflicts_seen += 1,
                        _ => {}
                    }
                }
            }
            // Commit a lease.
            30..=44 if !leases.is_empty() => {
                let (key, lease) = leases.swap_remove(rng.below(leases.len() as u64) as usize);
                let token = lease.token();
                let result: Vec<u8> = (0..rng.below(120))
                    .map(|i| (i as u8) ^ (op as u8))
                    .collect();
                let ok = reference.commit(key, token, &result, now);
                match lease.commit(&result) {
                    Ok(()) => assert!(ok, "{}", ctx("commit accepted a lost lease")),
                    Err(e) => {
                        assert!(e.is_lease_lost(), "{}", ctx(&format!("{e}")));
                        assert!(!ok, "{}", ctx("commit refused a live lease"));
                        lost += 1;
                    }
                }
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
                    assert_eq!(
                        v,
                        reference.check(*k, now),
                        "{}",
                        ctx(&format!("check of key {k}"))
                    );
                }
            }
            // Forget.
            85..=86 => {
                let key = rng.below(key_space);
                let live = reference.live(key, now).is_some();
                let removed = dedup.forget(&key).unwrap();
                assert!(
                    !live || removed,
                    "{}",
                    ctx("forget of a live key found nothing")
                );
                reference.keys.remove(&key);
            }
            // Restart through a snapshot: live leases and results survive.
            87 if s.snapshots && rng.chance(0.01) => {
                let mut state = Vec::new();
                dedup.snapshot(&mut state).unwrap();
                // The holders die with the process.
                for (_, lease) in leases.drain(..) {
                    std::mem::forget(lease);
                }
                dedup = Arc::new(builder(s, &clock).restore(&state[..]).unwrap());
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
    assert!(acquired > s.ops / 50, "{}: {acquired} acquired", s.name);
    assert!(completed > s.ops / 200, "{}: {completed} completed", s.name);
    assert!(
        lost > 0 && conflicts_seen > 0,
        "{}: {lost} lost, {conflicts_seen} conflicts",
        s.name
    );
    assert!(!s.snapshots || restarts > 0, "{}: no restart", s.name);
    let stats = dedup.stats();
    assert!(stats.claims.claims > 0);
}

fn settings(server: &PgServer) -> Vec<Setting> {
    let tier = |prefix: &str| {
        let tier = PgTier::connect(PgConfig::new(&server.url()).prefix(prefix)).unwrap();
        let stats = tier.stats();
        (ExactTier::Custom(Arc::new(tier)), stats)
    };
    let (owned, owned_stats) = tier("owned");
    let (shared, shared_stats) = tier("shared");
    let (unwindowed, unwindowed_stats) = tier("unwindowed");
    vec![
        Setting {
            name: "postgres tier, owned keys (leases in the engine)",
            window: Some(Duration::from_secs(2)),
            tier: owned,
            stats: owned_stats,
            affinity: Affinity::Owned,
            mark_batch: 16,
            shards: 2,
            snapshots: false,
            ops: 100_000,
            key_space: 300,
        },
        Setting {
            name: "postgres tier, shared keys (leases in the database)",
            window: Some(Duration::from_secs(2)),
            tier: shared,
            stats: shared_stats,
            affinity: Affinity::Shared,
            mark_batch: 16,
            shards: 2,
            snapshots: false,
            ops: 100_000,
            key_space: 300,
        },
        Setting {
            name: "postgres tier, shared keys, no window",
            window: None,
            tier: unwindowed,
            stats: unwindowed_stats,
            affinity: Affinity::Shared,
            mark_batch: 16,
            shards: 2,
            snapshots: false,
            ops: 30_000,
            key_space: 3_000,
        },
    ]
}

#[test]
fn claims_match_the_reference_state_machine() {
    let server = PgServer::start_with(&["fsync=off", "synchronous_commit=off"]);
    let settings = settings(&server);
    std::thread::scope(|scope| {
        for (i, s) in settings.iter().enumerate() {
            scope.spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(s, 0xC1A1_5000 + i as u64);
                }));
                if let Err(panic) = outcome {
                    eprintln!(
                        "{}: {} failures, last error: {:?}",
                        s.name,
                        s.stats.failures.load(std::sync::atomic::Ordering::Relaxed),
                        s.stats.last_error.lock().unwrap()
                    );
                    std::panic::resume_unwind(panic);
                }
            });
        }
    });
}
