//! Claims against a reference state machine: every answer of claim,
//! commit, release, extend, drop, check and forget over long random
//! streams — with clock advances past leases and windows, and restarts
//! through snapshots — equals that of a map from key to
//! `Held { token, until, payload } | Done { at, result, payload }`, on
//! every local tier and path; plus the concurrency contracts.

#[path = "support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use rng::Rng;

use tiered_dedup::exact::{
    ExactBackend, ExactPartition, MemoryPartition, PartitionSpec, RecordBody,
};
use tiered_dedup::{
    Affinity, Claim, ClaimRequest, Clock, Deduper, DeduperBuilder, ExactTier, ExactTierError,
    Fingerprint, Lease, ManualClock, PayloadFingerprint, Timestamp, Verdict,
};

#[test]
fn smoke() {
    let dedup = Deduper::builder().build().unwrap();
    let Claim::Acquired(lease) = dedup.claim("order-1") else {
        panic!("a fresh key is acquired");
    };
    assert!(dedup.claim("order-1").is_in_progress());
    assert!(dedup.check("order-1").is_in_progress());
    lease.commit(b"receipt").unwrap();
    match dedup.claim("order-1") {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"receipt"),
        other => panic!("expected Completed, got {other:?}"),
    }
    assert!(dedup.check("order-1").is_duplicate());
    // Released or dropped: as if never claimed.
    let lease = dedup.claim("order-2").into_lease().unwrap();
    lease.release().unwrap();
    drop(dedup.claim("order-2").into_lease().unwrap());
    assert!(dedup.claim("order-2").is_acquired());
}

/// The memory tier presented as a remote, persistent one: claims take the
/// batched path (what a Redis tier gets), with local state.
struct RemoteLike;

struct RemoteLikePartition(MemoryPartition);

impl ExactPartition for RemoteLikePartition {
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        self.0.lookup(fp, slot)
    }
    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        self.0.mark(fp, slot, at)
    }
    fn put_body(
        &mut self,
        mark: &tiered_dedup::exact::Mark,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
    ) -> Result<(), ExactTierError> {
        self.0.put_body(mark, payload, result)
    }
    fn body(
        &mut self,
        fp: Fingerprint,
        slot: usize,
        at: Timestamp,
    ) -> Result<Option<RecordBody>, ExactTierError> {
        self.0.body(fp, slot, at)
    }
    fn forget(&mut self, fp: Fingerprint) -> Result<bool, ExactTierError> {
        self.0.forget(fp)
    }
    fn clear_slots(&mut self, slots: u8) {
        self.0.clear_slots(slots);
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn bytes(&self) -> usize {
        self.0.bytes()
    }
    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        self.0.entries()
    }
    fn bodies(&self) -> Vec<(usize, Fingerprint, Timestamp, RecordBody)> {
        self.0.bodies()
    }
    fn prefers_batches(&self) -> bool {
        true
    }
    fn persistent(&self) -> bool {
        true
    }
}

impl ExactBackend for RemoteLike {
    fn name(&self) -> &'static str {
        "remote-like"
    }
    fn partition(&self, spec: &PartitionSpec) -> Box<dyn ExactPartition> {
        Box::new(RemoteLikePartition(MemoryPartition::with_capacity(
            spec.keys_per_slot,
        )))
    }
}

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
    tier: fn() -> ExactTier,
    affinity: Affinity,
    mark_batch: usize,
    shards: usize,
    snapshots: bool,
    ops: usize,
    key_space: u64,
}

const LEASE: Duration = Duration::from_millis(400);

fn builder(s: &Setting, clock: &ManualClock) -> DeduperBuilder {
    let mut b = Deduper::builder()
        .expected_keys(2_000)
        .shards(s.shards)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier((s.tier)())
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
        other => panic!("unexpected {other:?} from a local tier"),
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
                // Batches up to 24 give each shard several claims, with
                // copies of one key among them.
                let n = if rng.chance(0.3) {
                    1 + rng.below(24) as usize
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

fn settings() -> Vec<Setting> {
    let memory = || ExactTier::Memory;
    vec![
        Setting {
            name: "memory tier, window (one table)",
            window: Some(Duration::from_secs(3)),
            tier: memory,
            affinity: Affinity::Owned,
            mark_batch: 1,
            shards: 4,
            snapshots: true,
            ops: 700_000,
            key_space: 300,
        },
        Setting {
            name: "memory tier, no window",
            window: None,
            tier: memory,
            affinity: Affinity::Owned,
            mark_batch: 1,
            shards: 2,
            snapshots: true,
            ops: 200_000,
            key_space: 30_000,
        },
        Setting {
            name: "memory tier, shared keys (filter, slot tables, batched)",
            window: Some(Duration::from_secs(2)),
            tier: memory,
            affinity: Affinity::Shared,
            mark_batch: 32,
            shards: 4,
            snapshots: true,
            ops: 200_000,
            key_space: 300,
        },
        Setting {
            name: "dashmap tier, queued marks",
            window: Some(Duration::from_secs(2)),
            tier: || ExactTier::DashMap,
            affinity: Affinity::Owned,
            mark_batch: 64,
            shards: 2,
            snapshots: true,
            ops: 200_000,
            key_space: 300,
        },
        Setting {
            name: "remote-like tier (batched, cold)",
            window: Some(Duration::from_secs(2)),
            tier: || ExactTier::Custom(Arc::new(RemoteLike)),
            affinity: Affinity::Owned,
            mark_batch: 16,
            shards: 2,
            snapshots: false,
            ops: 100_000,
            key_space: 300,
        },
    ]
}

#[test]
fn claims_match_the_reference_state_machine() {
    for (i, s) in settings().iter().enumerate() {
        run(s, 0xC1A1_0000 + i as u64);
    }
}

/// N threads claim one fresh key at once: exactly one acquires, every
/// time; the others see it in progress (or completed, once committed).
#[test]
fn one_acquired_among_racing_claims() {
    let dedup = Arc::new(Deduper::builder().shards(4).build().unwrap());
    let threads = 8;
    for round in 0..300u64 {
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let dedup = Arc::clone(&dedup);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    match dedup.claim_owned(ClaimRequest::new(round)) {
                        Claim::Acquired(lease) => {
                            lease.commit(b"done").unwrap();
                            1
                        }
                        Claim::InProgress { .. } | Claim::Completed { .. } => 0,
                        other => panic!("unexpected {other:?}"),
                    }
                })
            })
            .collect();
        let acquired: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(acquired, 1, "round {round}");
    }
}

/// A holder that outlives its lease and then commits is refused; the new
/// holder's result is the one stored.
#[test]
fn a_holder_past_its_lease_loses_to_the_next() {
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let dedup = Deduper::builder()
        .clock(Clock::Manual(clock.clone()))
        .lease_duration(Duration::from_secs(5))
        .build()
        .unwrap();
    let slow = dedup.claim("job").into_lease().unwrap();
    clock.advance(Duration::from_secs(6));
    let fast = dedup.claim("job").into_lease().unwrap();
    assert!(fast.token() > slow.token());
    fast.commit(b"fast").unwrap();
    let err = slow.commit(b"slow").unwrap_err();
    assert!(err.is_lease_lost());
    match dedup.claim("job") {
        Claim::Completed { result, first_seen } => {
            assert_eq!(&result[..], b"fast");
            assert_eq!(first_seen, Timestamp::from_secs(1_006));
        }
        other => panic!("{other:?}"),
    }
    let stats = dedup.stats();
    assert_eq!(stats.claims.lease_lost, 1);
    assert_eq!(stats.claims.commits, 1);
}

/// A waiting claim gets the holder's result once it commits, or the key
/// once it releases, without polling.
#[test]
fn a_waiting_claim_gets_the_result_or_the_key() {
    let dedup = Arc::new(Deduper::builder().build().unwrap());
    let lease = dedup
        .claim_owned(ClaimRequest::new("k"))
        .into_lease()
        .unwrap();
    let waiter = {
        let dedup = Arc::clone(&dedup);
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let answer = dedup.claim_wait(ClaimRequest::new("k"), Duration::from_secs(20));
            (
                answer.kind(),
                started.elapsed(),
                match answer {
                    Claim::Completed { result, .. } => result.to_vec(),
                    _ => Vec::new(),
                },
            )
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    lease.commit(b"42").unwrap();
    let (kind, waited, result) = waiter.join().unwrap();
    assert_eq!(kind, tiered_dedup::ClaimKind::Completed);
    assert_eq!(result, b"42");
    assert!(
        waited < Duration::from_secs(10),
        "woken, not timed out: {waited:?}"
    );

    let lease = dedup
        .claim_owned(ClaimRequest::new("j"))
        .into_lease()
        .unwrap();
    let waiter = {
        let dedup = Arc::clone(&dedup);
        std::thread::spawn(move || {
            dedup
                .claim_wait(ClaimRequest::new("j"), Duration::from_secs(20))
                .is_acquired()
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    lease.release().unwrap();
    assert!(
        waiter.join().unwrap(),
        "a released key is acquired by the waiter"
    );

    // Nobody finishes: the wait ends at its deadline, still in progress.
    let _held = dedup.claim("h").into_lease().unwrap();
    let started = std::time::Instant::now();
    let answer = dedup.claim_wait(ClaimRequest::new("h"), Duration::from_millis(100));
    assert!(answer.is_in_progress());
    assert!(started.elapsed() >= Duration::from_millis(100));
}

/// A conflict is found on every path: against a live lease, against a
/// completed record with its payload, and never without a fingerprint.
#[test]
fn conflicts_need_two_different_fingerprints() {
    let dedup = Deduper::builder().build().unwrap();
    let a = PayloadFingerprint::of(b"{\"amount\":10}");
    let b = PayloadFingerprint::of(b"{\"amount\":11}");
    let lease = dedup
        .claim_with(ClaimRequest::new("pay-1").payload(a))
        .into_lease()
        .unwrap();
    assert!(dedup
        .claim_with(ClaimRequest::new("pay-1").payload(b))
        .is_conflict());
    assert!(dedup
        .claim_with(ClaimRequest::new("pay-1").payload(a))
        .is_in_progress());
    assert!(dedup.claim("pay-1").is_in_progress());
    lease.commit(b"ok").unwrap();
    assert!(dedup
        .claim_with(ClaimRequest::new("pay-1").payload(b))
        .is_conflict());
    assert!(dedup
        .claim_with(ClaimRequest::new("pay-1").payload(a))
        .is_completed());
    assert!(dedup.claim("pay-1").is_completed());
    // Recorded by a check: no payload, never a conflict.
    assert!(dedup.check("pay-2").is_new());
    assert!(dedup
        .claim_with(ClaimRequest::new("pay-2").payload(b))
        .is_completed());
    assert_eq!(dedup.stats().claims.conflicts, 2);
}

/// `commit_batch` answers like a commit of each lease in turn: leases of
/// another engine, results over the cap, lost leases, in any order.
#[test]
fn a_batch_of_commits_answers_each_lease() {
    let clock = ManualClock::new(Timestamp::from_secs(100));
    let b = || {
        Deduper::builder()
            .shards(4)
            .clock(Clock::Manual(clock.clone()))
            .lease_duration(Duration::from_secs(10))
            .max_result_bytes(8)
    };
    let ours = b().build().unwrap();
    let theirs = b().build().unwrap();
    let early = ours.claim("early").into_lease().unwrap();
    clock.advance(Duration::from_secs(11));
    let _taken = ours.claim("early").into_lease().unwrap();
    let mut batch = vec![(early, b"x".to_vec())];
    for k in 0..40u64 {
        batch.push((
            ours.claim(&k).into_lease().unwrap(),
            k.to_le_bytes().to_vec(),
        ));
    }
    batch.push((theirs.claim("t").into_lease().unwrap(), b"theirs".to_vec()));
    batch.push((ours.claim("big").into_lease().unwrap(), vec![0; 9]));
    let answers = ours.commit_batch(batch);
    assert!(answers[0].as_ref().unwrap_err().is_lease_lost());
    assert!(answers[1..41].iter().all(Result::is_ok));
    assert!(answers[41].is_ok());
    let too_large = answers.into_iter().last().unwrap().unwrap_err();
    let lease = too_large.into_lease().expect("handed back");
    lease.commit(b"small").unwrap();
    for k in 0..40u64 {
        match ours.claim(&k) {
            Claim::Completed { result, .. } => assert_eq!(&result[..], k.to_le_bytes()),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        matches!(theirs.claim("t"), Claim::Completed { ref result, .. } if &result[..] == b"theirs")
    );
    assert!(
        matches!(ours.claim("big"), Claim::Completed { ref result, .. } if &result[..] == b"small")
    );
}
