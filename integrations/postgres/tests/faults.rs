//! The PostgreSQL tier while its server crashes and comes back: each
//! failure policy does what it says, marks kept through the outage are
//! written once it is back (none lost, none doubled), and no key is ever
//! `New` twice under fail closed.

#[path = "support/pg_server.rs"]
mod pg_server;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_server::PgServer;
use tiered_dedup::{Affinity, Clock, Deduper, ExactTier, ManualClock, Timestamp, Verdict};
use tiered_dedup_postgres::{FailurePolicy, PgConfig, PgStats, PgTier};

const WINDOW: Duration = Duration::from_secs(60);

fn engine(
    server: &PgServer,
    clock: &ManualClock,
    policy: FailurePolicy,
    affinity: Affinity,
) -> (Deduper, Arc<PgStats>) {
    let tier = PgTier::connect(
        PgConfig::new(&server.url())
            .policy(policy)
            .timeout(Duration::from_secs(2)),
    )
    .unwrap();
    let stats = tier.stats();
    let d = Deduper::builder()
        .window(WINDOW)
        .expected_keys(20_000)
        .shards(4)
        .mark_batch(256)
        .affinity(affinity)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    (d, stats)
}

/// Retries a flush until the tier has reconnected (bounded).
fn flush_when_back(d: &Deduper) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = d.flush() {
        assert!(Instant::now() < deadline, "still failing: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keys `range` checked once, in batches; the ones answered `New`.
fn check_all(d: &Deduper, range: std::ops::Range<u64>) -> Vec<(u64, Verdict)> {
    let keys: Vec<u64> = range.collect();
    keys.chunks(500)
        .flat_map(|c| c.iter().copied().zip(d.check_batch(c)).collect::<Vec<_>>())
        .collect()
}

/// A warm engine (a span passed since its first key) with keys `0..2000`
/// accepted and stored.
fn warm(d: &Deduper, clock: &ManualClock) {
    for (_, v) in check_all(d, 0..2_000) {
        assert!(v.is_new());
    }
    flush_when_back(d);
    clock.advance(Duration::from_secs(71));
    // Accepted again (outside the window), and the filter is warm now.
    for (_, v) in check_all(d, 0..2_000) {
        assert!(v.is_new());
    }
    flush_when_back(d);
}

#[test]
fn fail_closed_never_accepts_twice_and_writes_kept_marks_once_back() {
    let mut server = PgServer::start_with(&["fsync=off"]);
    let clock = ManualClock::new(Timestamp::from_secs(10_000));
    let (d, stats) = engine(&server, &clock, FailurePolicy::FailClosed, Affinity::Owned);
    warm(&d, &clock);
    let mut new_ever: HashSet<u64> = HashSet::new();
    server.kill();
    clock.advance(Duration::from_secs(1));
    // Fresh keys: new (the filter has never seen them), their marks kept;
    // a filter false positive needs the database: unavailable.
    let mut false_positives = 0;
    for (k, v) in check_all(&d, 2_000..4_000) {
        match v {
            Verdict::New => assert!(new_ever.insert(k)),
            Verdict::Unavailable => false_positives += 1,
            other => panic!("{k}: {other:?}"),
        }
    }
    assert!(false_positives < 40, "{false_positives}");
    // Repeats of the new ones: duplicates from the marks still queued in
    // the engine, or unavailable (a lookup batch fails whole when one of
    // its keys needs the database) — never new.
    for (k, v) in check_all(&d, 2_000..4_000) {
        if new_ever.contains(&k) {
            assert!(v.is_duplicate() || v == Verdict::Unavailable, "{k}: {v:?}");
        }
    }
    // Keys stored before the crash: the filter matches them, the database
    // must confirm, and is down: unavailable, never new.
    let mut unavailable = 0;
    for (k, v) in check_all(&d, 0..2_000) {
        match v {
            Verdict::Unavailable => unavailable += 1,
            Verdict::Duplicate { .. } => {}
            other => panic!("{k}: {other:?} while the database is down"),
        }
    }
    assert!(unavailable > 1_900, "{unavailable}");
    assert!(d.flush().is_err(), "marks are not stored yet");
    assert!(stats.marks_unsent.load(Ordering::Relaxed) > 0);
    server.start_again();
    flush_when_back(&d);
    assert_eq!(stats.marks_unsent.load(Ordering::Relaxed), 0);
    // The kept marks are stored: duplicates now; the keys refused during
    // the outage are accepted now, once.
    for (k, v) in check_all(&d, 0..4_000) {
        match v {
            Verdict::New => assert!(k >= 2_000 && new_ever.insert(k), "{k} new twice"),
            other => assert!(other.is_duplicate(), "{k}: {other:?}"),
        }
    }
    d.flush().unwrap();
    let stored: i64 = server
        .client()
        .query_one("SELECT count(DISTINCT fp) FROM td_records", &[])
        .unwrap()
        .get(0);
    assert_eq!(stored, 4_000, "every accepted key stored once");
    // A new engine (cold) confirms against the database.
    let (fresh, _) = engine(&server, &clock, FailurePolicy::FailClosed, Affinity::Owned);
    assert!(check_all(&fresh, 0..4_000)
        .iter()
        .all(|(_, v)| v.is_duplicate()));
}

#[test]
fn fail_open_and_fallback_answer_without_the_database_and_count_it() {
    for policy in [FailurePolicy::FailOpen, FailurePolicy::FallbackToMemory] {
        let mut server = PgServer::start_with(&["fsync=off"]);
        let clock = ManualClock::new(Timestamp::from_secs(10_000));
        let (d, stats) = engine(&server, &clock, policy, Affinity::Owned);
        warm(&d, &clock);
        server.kill();
        clock.advance(Duration::from_secs(1));
        let answers = check_all(&d, 0..2_000);
        let new = answers.iter().filter(|(_, v)| v.is_new()).count();
        let unavailable = answers
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Unavailable))
            .count();
        assert_eq!(unavailable, 0, "{policy:?}");
        match policy {
            // Treated as new.
            FailurePolicy::FailOpen => assert!(new > 1_900, "{policy:?}: {new}"),
            // This process marked them: the memory tier knows.
            _ => assert_eq!(new, 0, "{policy:?}"),
        }
        assert!(stats.degraded_decisions.load(Ordering::Relaxed) > 0);
        server.start_again();
        flush_when_back(&d);
        assert!(check_all(&d, 0..2_000)
            .iter()
            .all(|(_, v)| v.is_duplicate()));
    }
}

/// Shared keys: while the database is down, fail closed answers
/// `Unavailable` and accepts nothing; once back, every key is new once.
#[test]
fn shared_keys_fail_closed_through_a_restart() {
    let mut server = PgServer::start_with(&["fsync=off"]);
    let clock = ManualClock::new(Timestamp::from_secs(10_000));
    let (d, _) = engine(&server, &clock, FailurePolicy::FailClosed, Affinity::Shared);
    let mut new_ever: HashSet<u64> = HashSet::new();
    for (k, v) in check_all(&d, 0..1_000) {
        assert!(v.is_new());
        new_ever.insert(k);
    }
    server.restart();
    server.kill();
    for (k, v) in check_all(&d, 0..2_000) {
        assert_eq!(v, Verdict::Unavailable, "{k}");
    }
    assert!(d.claim("x").kind() == tiered_dedup::ClaimKind::Unavailable);
    server.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pending: Vec<u64> = (0..2_000).collect();
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "still unavailable");
        let answers = d.check_batch(&pending);
        let mut still = Vec::new();
        for (k, v) in pending.iter().zip(answers) {
            match v {
                Verdict::New => assert!(new_ever.insert(*k), "{k} new twice"),
                Verdict::Duplicate { .. } => assert!(new_ever.contains(k), "{k}"),
                Verdict::Unavailable => still.push(*k),
                other => panic!("{k}: {other:?}"),
            }
        }
        pending = still;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(new_ever.len(), 2_000);
}

/// Past `max_unsent_marks` kept marks, further ones are counted dropped
/// (and the flush says how many are unwritten), never silently lost.
#[test]
fn the_retry_buffer_is_bounded_and_counted() {
    let mut server = PgServer::start_with(&["fsync=off"]);
    let clock = ManualClock::new(Timestamp::from_secs(10_000));
    let tier = PgTier::connect(
        PgConfig::new(&server.url())
            .max_unsent_marks(100)
            .timeout(Duration::from_secs(1)),
    )
    .unwrap();
    let stats = tier.stats();
    let d = Deduper::builder()
        .window(WINDOW)
        .shards(1)
        .mark_batch(10)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    assert!(d.check(&0u64).is_new());
    d.flush().unwrap();
    clock.advance(Duration::from_secs(71));
    assert!(d.check(&0u64).is_new());
    server.kill();
    let _ = check_all(&d, 1..1_001);
    assert!(stats.marks_dropped.load(Ordering::Relaxed) > 0);
    assert!(stats.marks_unsent.load(Ordering::Relaxed) <= 100);
    match d.flush() {
        Err(tiered_dedup::FlushError::Unwritten { marks, .. }) => assert!(marks > 0),
        other => panic!("{other:?}"),
    }
}
