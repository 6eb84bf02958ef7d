//! The `metrics` facade: what an engine publishes matches its stats, and
//! the Redis tier's own counters match `RedisTier::stats()`.
#![cfg(feature = "metrics")]

use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;
use tiered_dedup::{Deduper, MetricsPublisher};

#[test]
fn smoke() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let d = Deduper::builder().namespace("orders").build().unwrap();
        d.check_batch(&["a", "b", "a"]);
        d.publish_metrics();
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let value = |name: &str| {
        snapshot
            .iter()
            .find(|(k, _, _, _)| k.key().name() == name)
            .map(|(k, _, _, v)| {
                (
                    k.key()
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect::<Vec<_>>(),
                    v,
                )
            })
    };
    let (labels, checks) = value("tiered_dedup_checks_total").expect("checks published");
    assert!(matches!(checks, DebugValue::Counter(3)));
    assert!(labels.contains(&("namespace".to_owned(), "orders".to_owned())));
    assert!(labels.contains(&("exact_tier".to_owned(), "memory".to_owned())));
    assert!(matches!(
        value("tiered_dedup_new_total").unwrap().1,
        DebugValue::Counter(2)
    ));
    assert!(matches!(
        value("tiered_dedup_duplicates_total").unwrap().1,
        DebugValue::Counter(1)
    ));
    // The embedded tier keeps no filter in front of its table: the gauge is
    // published and reads 0; the table's bytes are the memory.
    assert!(
        matches!(value("tiered_dedup_filter_bytes").unwrap().1, DebugValue::Gauge(b) if b.into_inner() == 0.0)
    );
    assert!(
        matches!(value("tiered_dedup_exact_bytes").unwrap().1, DebugValue::Gauge(b) if b.into_inner() > 0.0)
    );
    assert!(matches!(
        value("tiered_dedup_exact_entries").unwrap().1,
        DebugValue::Gauge(n) if n.into_inner() == 2.0
    ));
}

/// Claims publish their outcomes: acquired, in progress, completed,
/// conflicts, commits, releases, result bytes and live leases.
#[test]
fn claims_are_published() {
    use tiered_dedup::{ClaimRequest, PayloadFingerprint};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let d = Deduper::builder().build().unwrap();
        let a = d.claim("a").into_lease().unwrap();
        assert!(d.claim("a").is_in_progress());
        a.commit(b"12345").unwrap();
        assert!(d.claim("a").is_completed());
        let p = |n| ClaimRequest::new("b").payload(PayloadFingerprint(n));
        let b = d.claim_with(p(1)).into_lease().unwrap();
        assert!(d.claim_with(p(2)).is_conflict());
        let _held = d.claim("c").into_lease().unwrap();
        b.release().unwrap();
        d.publish_metrics();
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let value = |name: &str| {
        snapshot
            .iter()
            .find(|(k, _, _, _)| k.key().name() == name)
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(n) => *n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(_) => panic!("{name} is a histogram"),
            })
            .unwrap_or_else(|| panic!("{name} published"))
    };
    for (name, want) in [
        ("tiered_dedup_claims_total", 6.0),
        ("tiered_dedup_claims_acquired_total", 3.0),
        ("tiered_dedup_claims_in_progress_total", 1.0),
        ("tiered_dedup_claims_completed_total", 1.0),
        ("tiered_dedup_claims_conflicts_total", 1.0),
        ("tiered_dedup_claims_commits_total", 1.0),
        ("tiered_dedup_claims_releases_total", 1.0),
        ("tiered_dedup_claims_result_bytes_total", 5.0),
        ("tiered_dedup_claims_leases_live", 1.0),
    ] {
        assert_eq!(value(name), want, "{name}");
    }
}

/// The background publisher keeps the facade in step and publishes once
/// more when dropped.
#[test]
fn the_publisher_thread_tracks_the_engine() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The publisher's thread reads the global recorder.
    recorder
        .install()
        .expect("no other recorder in this test binary");
    let d = Arc::new(Deduper::builder().build().unwrap());
    let publisher = MetricsPublisher::start(Arc::clone(&d), Duration::from_millis(5));
    let keys: Vec<u64> = (0..10_000).collect();
    d.check_batch(&keys);
    d.check_batch(&keys);
    drop(publisher);
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str| {
        snapshot
            .iter()
            .find(|(k, _, _, _)| k.key().name() == name)
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(n) => *n,
                _ => panic!("{name} is not a counter"),
            })
    };
    assert_eq!(counter("tiered_dedup_checks_total"), Some(20_000));
    assert_eq!(counter("tiered_dedup_duplicates_total"), Some(10_000));
    assert_eq!(
        counter("tiered_dedup_batches_total"),
        Some(d.stats().batches)
    );
}

/// The Redis tier's own counters are published next to the engine's, with
/// the same labels, and equal `RedisTier::stats()`: before a fault
/// (requests, connects, marks written) and after one (failures, degraded
/// decisions under fail-open, marks kept unsent).
#[cfg(feature = "redis")]
#[test]
fn the_redis_tier_publishes_its_own_counters() {
    use std::sync::atomic::Ordering;

    use tiered_dedup::exact::redis::{FailurePolicy, RedisConfig, RedisTier};
    use tiered_dedup::{Clock, ExactTier, ManualClock, Timestamp};

    let mut server = redis_server::RedisServer::start();
    let tier = RedisTier::new(RedisConfig {
        policy: FailurePolicy::FailOpen,
        timeout: Duration::from_millis(200),
        ..RedisConfig::new(&server.url())
    });
    let stats = tier.stats();
    // A fresh engine on a persistent tier has a cold filter for a window:
    // every key is confirmed by Redis, so every key needs it.
    let d = Deduper::builder()
        .namespace("orders")
        .window(Duration::from_secs(600))
        .expected_keys(10_000)
        .shards(4)
        .mark_batch(64)
        .clock(Clock::Manual(ManualClock::new(Timestamp::from_secs(1_000))))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let publish_and_compare = |d: &Deduper| {
        metrics::with_local_recorder(&recorder, || d.publish_metrics());
        let snapshot = snapshotter.snapshot().into_vec();
        let series = |name: &str| {
            let (key, _, _, value) = snapshot
                .iter()
                .find(|(k, _, _, _)| k.key().name() == name)
                .unwrap_or_else(|| panic!("{name} published"));
            let labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            assert!(labels.contains(&("namespace".to_owned(), "orders".to_owned())));
            assert!(labels.contains(&("exact_tier".to_owned(), "redis".to_owned())));
            value
        };
        let counter = |name: &str| match series(name) {
            DebugValue::Counter(n) => *n,
            v => panic!("{name} is not a counter: {v:?}"),
        };
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let expected = [
            ("tiered_dedup_redis_requests_total", load(&stats.requests)),
            ("tiered_dedup_redis_failures_total", load(&stats.failures)),
            ("tiered_dedup_redis_connects_total", load(&stats.connects)),
            (
                "tiered_dedup_redis_degraded_decisions_total",
                load(&stats.degraded_decisions),
            ),
            (
                "tiered_dedup_redis_marks_written_total",
                load(&stats.marks_written),
            ),
            (
                "tiered_dedup_redis_marks_dropped_total",
                load(&stats.marks_dropped),
            ),
        ];
        for (name, value) in expected {
            assert_eq!(counter(name), value, "{name}");
        }
        let unsent = match series("tiered_dedup_redis_marks_unsent") {
            DebugValue::Gauge(g) => g.into_inner(),
            v => panic!("marks_unsent is not a gauge: {v:?}"),
        };
        assert_eq!(unsent, load(&stats.marks_unsent) as f64);
        expected.map(|(_, v)| v)
    };

    let keys: Vec<u64> = (0..1_000).collect();
    assert!(d.check_batch(&keys).iter().all(|v| v.is_new()));
    d.flush().expect("a healthy tier stores every mark");
    let [requests, failures, connects, degraded, written, dropped] = publish_and_compare(&d);
    assert!(requests > 0 && connects > 0);
    assert_eq!((failures, degraded, dropped), (0, 0, 0));
    assert_eq!(written, 1_000, "every accepted key's mark was written");

    server.kill();
    let more: Vec<u64> = (1_000..1_500).collect();
    assert!(d.check_batch(&more).iter().all(|v| v.is_new()));
    let [_, failures, _, degraded, written, _] = publish_and_compare(&d);
    assert!(failures > 0, "the kill was seen");
    assert!(degraded > 0, "fail-open decided without Redis");
    assert_eq!(written, 1_000);
    assert!(
        stats.marks_unsent.load(Ordering::Relaxed) > 0,
        "marks kept for retry"
    );
}

/// `tiered_dedup_generation_fill{generation}`: the current slice's
/// generation is 0, the one before it 1; empty generations read 0; the
/// gauges equal `Stats::generation_fill`. (The `DashMap` tier keeps a
/// filter; the embedded table needs none.)
#[test]
fn generation_fill_follows_the_slices() {
    use tiered_dedup::{Clock, ExactTier, ManualClock, Timestamp};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let clock = ManualClock::new(Timestamp::from_secs(1_000_000));
    let d = Deduper::builder()
        .window(Duration::from_secs(60))
        .expected_keys(6_000)
        .shards(1)
        .exact_tier(ExactTier::DashMap)
        .clock(Clock::Manual(clock.clone()))
        .build()
        .unwrap();
    let slice = d.slice_duration().unwrap();
    let keys: Vec<u64> = (0..1_000).collect();
    d.check_batch(&keys);
    clock.advance(slice);
    let keys: Vec<u64> = (1_000..1_300).collect();
    d.check_batch(&keys);
    let stats = d.stats();
    metrics::with_local_recorder(&recorder, || d.publish_metrics());
    let fill = stats.generation_fill;
    assert!(fill[1] > fill[0] && fill[0] > 0.0, "{fill:?}");
    assert!(fill[1] > 0.2 && fill[1] < 0.8, "{fill:?}");
    assert!(fill[2..].iter().all(|&f| f == 0.0), "{fill:?}");
    let mut published = [f64::NAN; 7];
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "tiered_dedup_generation_fill" {
            continue;
        }
        let age: usize = key
            .key()
            .labels()
            .find(|l| l.key() == "generation")
            .expect("generation label")
            .value()
            .parse()
            .unwrap();
        let DebugValue::Gauge(v) = value else {
            panic!("generation fill is not a gauge: {value:?}");
        };
        published[age] = v.into_inner();
    }
    assert_eq!(published, fill);
}
