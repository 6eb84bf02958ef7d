//! Snapshots: a restored engine continues exactly like the reference, and a
//! truncated, corrupt, foreign or mismatched snapshot is refused.

#[path = "support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::time::Duration;

use rng::Rng;
use tiered_dedup::{
    Clock, Deduper, DeduperBuilder, ExactTier, Mode, SnapshotError, Timestamp, Verdict,
};

fn builder(window: Option<Duration>) -> DeduperBuilder {
    let b = Deduper::builder()
        .expected_keys(5_000)
        .shards(4)
        .clock(Clock::EventTime);
    match window {
        Some(w) => b.window(w),
        None => b.no_window(),
    }
}

/// Runs `ops` random event-time checks on `d` and the reference, asserting
/// equal verdicts; time starts at `*t`.
fn run(
    d: &Deduper,
    reference: &mut HashMap<u64, u64>,
    window: Option<u64>,
    rng: &mut Rng,
    t: &mut u64,
    ops: usize,
) {
    for op in 0..ops {
        *t += rng.below(2_000_000);
        let key = rng.below(20_000);
        let expected = match reference.get(&key) {
            Some(&t0) if window.is_none_or(|w| *t < t0 + w) => Verdict::Duplicate {
                first_seen: Timestamp::from_nanos(t0),
            },
            _ => {
                reference.insert(key, *t);
                Verdict::New
            }
        };
        assert_eq!(
            d.check_at(&key, Timestamp::from_nanos(*t)),
            expected,
            "op {op}"
        );
    }
}

fn snapshot(d: &Deduper) -> Vec<u8> {
    let mut bytes = Vec::new();
    d.snapshot(&mut bytes).unwrap();
    bytes
}

#[test]
fn smoke() {
    let d = builder(Some(Duration::from_secs(60))).build().unwrap();
    assert!(d.check_at("a", Timestamp::from_secs(10)).is_new());
    let restored = builder(Some(Duration::from_secs(60)))
        .restore(&snapshot(&d)[..])
        .unwrap();
    assert!(restored
        .check_at("a", Timestamp::from_secs(11))
        .is_duplicate());
    assert_eq!(restored.watermark(), Timestamp::from_secs(11));
}

#[test]
fn restored_engines_continue_like_the_reference() {
    for window in [Some(Duration::from_millis(300)), None] {
        let w = window.map(|w| w.as_nanos() as u64);
        let mut rng = Rng::new(9);
        let mut reference = HashMap::new();
        let mut t = 1_000_000_000u64;
        let mut d = builder(window).build().unwrap();
        // Snapshot and restore five times along the stream.
        for _ in 0..5 {
            run(&d, &mut reference, w, &mut rng, &mut t, 60_000);
            let bytes = snapshot(&d);
            let stats = d.stats();
            d = builder(window).restore(&bytes[..]).unwrap();
            let restored_stats = d.stats();
            assert_eq!(restored_stats.checks, stats.checks);
            assert_eq!(restored_stats.exact_entries, stats.exact_entries);
        }
        run(&d, &mut reference, w, &mut rng, &mut t, 60_000);
    }
}

#[test]
fn probabilistic_and_dashmap_engines_round_trip() {
    for b in [
        builder(Some(Duration::from_secs(60))).mode(Mode::Probabilistic),
        builder(Some(Duration::from_secs(60))).exact_tier(ExactTier::DashMap),
    ] {
        let d = b.clone().build().unwrap();
        for i in 0..10_000u64 {
            d.check_at(&i, Timestamp::from_millis(1_000 + i));
        }
        let restored = b.restore(&snapshot(&d)[..]).unwrap();
        for i in 0..10_000u64 {
            assert!(restored
                .check_at(&i, Timestamp::from_millis(20_000))
                .is_duplicate());
        }
    }
}

#[test]
fn truncated_corrupt_and_foreign_snapshots_are_refused() {
    let b = builder(Some(Duration::from_secs(60)));
    let d = b.clone().build().unwrap();
    for i in 0..3_000u64 {
        d.check_at(&i, Timestamp::from_secs(100 + i / 100));
    }
    let bytes = snapshot(&d);
    // Every truncation point in the header, then a spread through the body.
    let cuts = (0..200).chain((200..bytes.len()).step_by(bytes.len() / 500 + 1));
    for cut in cuts {
        match b.clone().restore(&bytes[..cut]) {
            Err(SnapshotError::Truncated | SnapshotError::NotASnapshot) => {}
            other => panic!(
                "truncated at {cut} of {}: {:?}",
                bytes.len(),
                other.map(|_| ())
            ),
        }
    }
    // Single bit flips anywhere.
    let mut rng = Rng::new(3);
    for _ in 0..300 {
        let mut flipped = bytes.clone();
        let i = rng.below(bytes.len() as u64) as usize;
        flipped[i] ^= 1 << rng.below(8);
        assert!(
            b.clone().restore(&flipped[..]).is_err(),
            "bit flip at byte {i} accepted"
        );
    }
    // Trailing garbage.
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(b.clone().restore(&longer[..]).is_err());
    // Foreign data and another version.
    assert!(matches!(
        b.clone().restore(&b"{\"json\": true}"[..]),
        Err(SnapshotError::NotASnapshot)
    ));
    let mut newer = bytes.clone();
    newer[8] = tiered_dedup::FORMAT_VERSION as u8 + 1;
    assert!(matches!(
        b.clone().restore(&newer[..]),
        Err(SnapshotError::Version { found, .. }) if found == tiered_dedup::FORMAT_VERSION + 1
    ));
    // Another configuration: the error names the field.
    let err = builder(Some(Duration::from_secs(61)))
        .restore(&bytes[..])
        .unwrap_err();
    assert!(err.to_string().contains("window"), "{err}");
    let err = b
        .clone()
        .namespace("other")
        .restore(&bytes[..])
        .unwrap_err();
    assert!(err.to_string().contains("namespace"), "{err}");
    // The intact snapshot still restores.
    assert!(b.restore(&bytes[..]).is_ok());
}

/// An engine without first-seen times writes its fingerprints alone
/// (format version 2) and restores them; a state with times restores into
/// it (the times are dropped); its own state is refused by an engine that
/// keeps times, and a truncated one by any.
#[test]
fn an_engine_without_times_round_trips_and_refuses_the_other_kind() {
    let untimed = || builder(None).first_seen_times(false);
    let keys = |range: std::ops::Range<u64>| range.map(|i| i * 7919).collect::<Vec<_>>();
    let d = untimed().build().unwrap();
    for &k in &keys(0..20_000) {
        assert!(d.check_at(&k, Timestamp::from_secs(k)).is_new());
    }
    let bytes = snapshot(&d);
    assert_eq!(bytes[8], 2, "untimed states are version 2");
    let restored = untimed().restore(&bytes[..]).unwrap();
    assert_eq!(restored.stats().exact_entries, 20_000);
    for (i, &k) in keys(0..25_000).iter().enumerate() {
        let expected = if i < 20_000 {
            Verdict::DuplicateUntimed
        } else {
            Verdict::New
        };
        assert_eq!(
            restored.check_at(&k, Timestamp::from_secs(1 << 40)),
            expected
        );
    }

    // A state with times (version 1) restores into an untimed engine.
    let timed = builder(None).build().unwrap();
    for &k in &keys(0..5_000) {
        timed.check_at(&k, Timestamp::from_secs(k));
    }
    let timed_bytes = snapshot(&timed);
    assert_eq!(timed_bytes[8], 1, "states with times stay version 1");
    let dropped = untimed().restore(&timed_bytes[..]).unwrap();
    for &k in &keys(0..5_000) {
        assert_eq!(
            dropped.check_at(&k, Timestamp::from_secs(1 << 40)),
            Verdict::DuplicateUntimed
        );
    }

    // Fingerprints alone cannot answer when a key was first seen.
    let err = builder(None).restore(&bytes[..]).unwrap_err();
    assert!(
        matches!(err, SnapshotError::Mismatch(m) if m.contains("first_seen_times")),
        "{err}"
    );
    for cut in [bytes.len() - 1, bytes.len() - 9, bytes.len() / 2, 40] {
        assert!(untimed().restore(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    // Version 1 knows no fingerprint-only entries, even with a checksum
    // that matches.
    let mut v1 = bytes.clone();
    v1[8] = 1;
    let body = v1.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64(&v1[..body]);
    v1[body..].copy_from_slice(&sum.to_le_bytes());
    let err = untimed().restore(&v1[..]).unwrap_err();
    assert!(matches!(err, SnapshotError::Malformed(_)), "{err}");
    // A state of the memory tier (no filter) into an engine with a filter.
    let err = builder(None)
        .exact_tier(ExactTier::DashMap)
        .restore(&timed_bytes[..])
        .unwrap_err();
    assert!(
        matches!(err, SnapshotError::Mismatch(m) if m.contains("exact tier")),
        "{err}"
    );
}

/// A restore sizes a one-table partition for the entries it holds once,
/// whatever the sizing: entries come in bucket order, and marked into a
/// table with fewer buckets than entries they piled into one probe run
/// (300 000 entries over a sizing of 100 000 took 10 s to restore).
#[test]
fn a_restore_sizes_the_table_for_the_entries_in_the_state() {
    const KEYS: u64 = 30_000;
    // Room for 30 000 entries at 4/5 load: 37 500 buckets.
    let buckets = KEYS.div_ceil(4) * 5;
    for (b, bucket_bytes) in [
        (builder(None).first_seen_times(false), 16),
        (builder(None), 24),
        (builder(Some(Duration::from_secs(3600))), 24),
    ] {
        let b = b.shards(1).expected_keys(1_000);
        let d = b.clone().build().unwrap();
        for k in 0..KEYS {
            d.check_at(&k, Timestamp::from_secs(1_000 + k / 100));
        }
        let restored = b.restore(&snapshot(&d)[..]).unwrap();
        let stats = restored.stats();
        assert_eq!(stats.exact_entries, KEYS);
        assert_eq!(stats.exact_bytes, buckets * bucket_bytes, "{stats:?}");
        for k in (0..KEYS).step_by(97) {
            assert!(restored
                .check_at(&k, Timestamp::from_secs(1_400))
                .is_duplicate());
        }
    }
}

/// A count of entries far beyond the data (a corrupt file) is refused with
/// an error: the table sized ahead for it is a hint, never an abort.
#[test]
fn an_absurd_entry_count_is_refused_not_allocated() {
    for b in [
        builder(None).first_seen_times(false).shards(1),
        builder(None).shards(1),
    ] {
        // Few entries: each one marked into the table sized ahead touches
        // (and zeroes) a 2 MiB page of it before the data runs out.
        let d = b.clone().build().unwrap();
        for k in 0..40u64 {
            d.check_at(&k, Timestamp::from_secs(1));
        }
        let mut bytes = snapshot(&d);
        let count = 40u64.to_le_bytes();
        // The exact tier's tag (1 or 2) follows the filter's (3: none).
        let at = (1..bytes.len() - 9)
            .find(|&i| {
                bytes[i - 1] == 3 && matches!(bytes[i], 1 | 2) && bytes[i + 1..i + 9] == count
            })
            .expect("the exact tier's entry count");
        bytes[at + 1..at + 9].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(b.restore(&bytes[..]).is_err());
    }
}

/// Claims survive a restore: live leases (still in progress, expiring on
/// time), results and payload fingerprints of committed claims, and the
/// fencing tokens keep growing. Such a state is format version 3; one
/// without claims stays version 1. A truncated or flipped claims section
/// is refused.
#[test]
fn claims_round_trip_and_a_damaged_claims_state_is_refused() {
    use tiered_dedup::{Claim, ClaimRequest, ManualClock, PayloadFingerprint, FORMAT_VERSION};
    let clock = ManualClock::new(Timestamp::from_secs(5_000));
    let b = || {
        Deduper::builder()
            .expected_keys(1_000)
            .shards(2)
            .window(Duration::from_secs(60))
            .lease_duration(Duration::from_secs(10))
            .clock(Clock::Manual(clock.clone()))
    };
    let d = b().build().unwrap();
    d.check("checked");
    let plain = snapshot(&d);
    assert_eq!(u32::from_le_bytes(plain[8..12].try_into().unwrap()), 1);

    let held = d.claim("held").into_lease().unwrap();
    let paid = d
        .claim_with(ClaimRequest::new("paid").payload(PayloadFingerprint(7)))
        .into_lease()
        .unwrap();
    paid.commit(b"receipt-7").unwrap();
    let token = held.token();
    let bytes = snapshot(&d);
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        FORMAT_VERSION
    );
    std::mem::forget(held); // the holder dies with the process

    let r = b().restore(&bytes[..]).unwrap();
    assert!(
        matches!(r.claim("held"), Claim::InProgress { until } if until == Timestamp::from_secs(5_010))
    );
    match r.claim_with(ClaimRequest::new("paid").payload(PayloadFingerprint(7))) {
        Claim::Completed { result, first_seen } => {
            assert_eq!(&result[..], b"receipt-7");
            assert_eq!(first_seen, Timestamp::from_secs(5_000));
        }
        other => panic!("{other:?}"),
    }
    assert!(r
        .claim_with(ClaimRequest::new("paid").payload(PayloadFingerprint(8)))
        .is_conflict());
    assert!(r.check("checked").is_duplicate());
    clock.advance(Duration::from_secs(11));
    let again = r.claim("held").into_lease().expect("the lease expired");
    assert!(again.token() > token);
    drop(again);

    for cut in (bytes.len() - 200..bytes.len()).step_by(3) {
        assert!(b().restore(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let mut rng = Rng::new(99);
    for _ in 0..200 {
        let mut flipped = bytes.clone();
        let i = bytes.len() - 1 - rng.below(120) as usize;
        flipped[i] ^= 1 << rng.below(8);
        assert!(b().restore(&flipped[..]).is_err(), "flip at {i}");
    }
}
