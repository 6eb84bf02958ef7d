//! `publish_metrics` (feature `metrics`): the outcome counters reach the
//! host's recorder under the documented names and labels.
#![cfg(feature = "metrics")]

#[path = "support/app.rs"]
mod app;

use std::sync::Arc;
use std::time::Duration;

use app::{pay, start};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tiered_dedup::Deduper;
use tiered_dedup_http::IdempotencyLayer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        let engine = Arc::new(Deduper::builder().namespace("payments").build().unwrap());
        let app = start(IdempotencyLayer::new(engine)).await;
        pay(app.addr, "m", 1, &[]).await;
        pay(app.addr, "m", 1, &[]).await;
        pay(app.addr, "m", 2, &[]).await;
        pay(app.addr, "f", 1, &[("x-fail", "1")]).await;
        app.layer.publish_metrics();
        let mut seen = std::collections::HashMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            if let DebugValue::Counter(v) = value {
                seen.insert(format!("{}{{{}}}", key.name(), labels.join(",")), v);
            }
        }
        let get = |name: &str| {
            *seen
                .get(name)
                .unwrap_or_else(|| panic!("{name} not in {seen:?}"))
        };
        let outcome = |o: &str| {
            get(&format!(
                "tiered_dedup_http_requests_total{{namespace=payments,outcome={o}}}"
            ))
        };
        assert_eq!(outcome("stored"), 1);
        assert_eq!(outcome("replayed"), 1);
        assert_eq!(outcome("key_reused"), 1);
        assert_eq!(outcome("released"), 1);
        assert_eq!(outcome("in_progress"), 0);
        assert_eq!(
            get("tiered_dedup_http_handler_runs_total{namespace=payments}"),
            2
        );
        assert!(get("tiered_dedup_http_stored_bytes_total{namespace=payments}") > 0);
        // The engine's own series come along.
        assert!(seen
            .keys()
            .any(|k| k.starts_with("tiered_dedup_claims_total")));
    })
    .await
    .unwrap();
}
