//! `tracing` events: rotations and snapshots are reported to the host's
//! subscriber (feature `tracing`).
#![cfg(feature = "tracing")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tiered_dedup::{Clock, Deduper, ManualClock, Timestamp};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Records the message of every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        self.0.lock().unwrap().push(m.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn smoke() {
    let capture = Capture::default();
    tracing::subscriber::with_default(capture.clone(), || {
        let clock = ManualClock::new(Timestamp::from_secs(100));
        let d = Deduper::builder()
            .window(Duration::from_secs(6))
            .shards(1)
            .clock(Clock::Manual(clock.clone()))
            .build()
            .unwrap();
        d.check("a");
        clock.advance(Duration::from_secs(3));
        d.check("b");
        let mut bytes = Vec::new();
        d.snapshot(&mut bytes).unwrap();
        Deduper::builder()
            .window(Duration::from_secs(6))
            .shards(1)
            .clock(Clock::Manual(clock))
            .restore(&bytes[..])
            .unwrap();
    });
    let events = capture.0.lock().unwrap().clone();
    for expected in ["shard rotated", "snapshot written", "snapshot restored"] {
        assert!(
            events.iter().any(|e| e == expected),
            "no `{expected}` in {events:?}"
        );
    }
}
