//! The `metrics` facade: what an engine publishes matches its stats.
#![cfg(feature = "metrics")]

use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
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
    assert!(
        matches!(value("tiered_dedup_filter_bytes").unwrap().1, DebugValue::Gauge(b) if b.into_inner() > 0.0)
    );
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
