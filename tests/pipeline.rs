//! The worker pipeline: verdicts identical to the reference through random
//! batch sizes, shard/worker counts, flush intervals and mark batches; one
//! `New` per key across producers; nothing lost on shutdown; bounded
//! queues; a panicking worker surfaces as an error, never a hang.

#[path = "support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rng::Rng;
use tiered_dedup::exact::{ExactBackend, ExactPartition, MemoryPartition, PartitionSpec};
use tiered_dedup::{
    Clock, Deduper, ExactTier, ExactTierError, Fingerprint, ManualClock, Pipeline, PipelineError,
    Producer, Timestamp, Verdict,
};

fn reference_check(first: &mut HashMap<u64, u64>, window: u64, key: u64, t: u64) -> Verdict {
    match first.get(&key) {
        Some(&t0) if t < t0 + window => Verdict::Duplicate {
            first_seen: Timestamp::from_nanos(t0),
        },
        _ => {
            first.insert(key, t);
            Verdict::New
        }
    }
}

/// Submits batches from `next` (keys and the verdicts they must get) until
/// `ops` keys went in, keeping a random number of batches in flight, and
/// checks every reply in order.
fn drive(
    producer: &mut Producer,
    rng: &mut Rng,
    ops: usize,
    label: &str,
    mut next: impl FnMut(&mut Rng) -> (Vec<u64>, Vec<Verdict>),
) {
    let mut expected_in_flight = std::collections::VecDeque::new();
    let mut done = 0;
    while done < ops {
        let (keys, expected) = next(rng);
        producer.submit(&keys).unwrap();
        expected_in_flight.push_back(expected);
        done += keys.len();
        // Receive some, keep some in flight.
        while producer.in_flight() > rng.below(6) as usize {
            let want = expected_in_flight.pop_front().unwrap();
            assert_eq!(producer.recv().unwrap(), want, "{label} at op {done}");
        }
    }
    while let Some(want) = expected_in_flight.pop_front() {
        assert_eq!(producer.recv().unwrap(), want, "{label} at the end");
    }
    assert_eq!(producer.recv(), Err(PipelineError::NothingInFlight));
}

#[test]
fn smoke() {
    let p = Pipeline::builder(Deduper::builder())
        .workers(2)
        .build()
        .unwrap();
    let v = p.process(&["a", "b", "a"]).unwrap();
    assert!(v[0].is_new() && v[1].is_new() && v[2].is_duplicate());
    p.shutdown().unwrap();
}

/// One producer keeps several batches in flight; every batch is checked at
/// its submission's clock reading. Verdicts equal the reference's.
#[test]
fn pipelined_batches_match_the_reference() {
    let configs = [
        // (shards, workers, max message keys, mark batch, flush interval µs)
        (1, 1, 4096, 1, 1_000),
        (4, 2, 7, 64, 50),
        (16, 3, 100, 1000, 10_000),
        (64, 2, 4096, 5, 1),
    ];
    for (seed, &(shards, workers, message, mark_batch, flush_us)) in configs.iter().enumerate() {
        let window = Duration::from_millis(50);
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let p = Pipeline::builder(
            Deduper::builder()
                .window(window)
                .expected_keys(2_000)
                .shards(shards)
                .mark_batch(mark_batch)
                .flush_interval(Duration::from_micros(flush_us))
                .clock(Clock::Manual(clock.clone())),
        )
        .workers(workers)
        .max_message_keys(message)
        .max_in_flight(8)
        .build()
        .unwrap();
        let mut producer = p.producer();
        let mut first = HashMap::new();
        let label = format!("config {seed}");
        drive(
            &mut producer,
            &mut Rng::new(seed as u64),
            400_000,
            &label,
            |rng| {
                clock.advance(Duration::from_micros(rng.below(2_000)));
                let max = if rng.below(10) == 0 { 4096 } else { 50 };
                let len = 1 + rng.below(max) as usize;
                let keys: Vec<u64> = (0..len).map(|_| rng.below(5_000)).collect();
                let now = clock.now().as_nanos();
                let expected = keys
                    .iter()
                    .map(|&k| reference_check(&mut first, window.as_nanos() as u64, k, now))
                    .collect();
                (keys, expected)
            },
        );
        let stats = p.deduper().stats();
        assert!(
            stats.rotations >= 100,
            "config {seed}: {} rotations",
            stats.rotations
        );
        p.shutdown().unwrap();
    }
}

/// An engine without first-seen times behind the pipeline: random
/// messages, several in flight, against a set of the keys seen.
#[test]
fn an_untimed_engine_through_the_pipeline_matches_the_reference() {
    for (seed, &(shards, workers, message)) in [(4, 2, 100), (16, 3, 4096)].iter().enumerate() {
        let p = Pipeline::builder(
            Deduper::builder()
                .no_window()
                .first_seen_times(false)
                .expected_keys(1_000)
                .shards(shards),
        )
        .workers(workers)
        .max_message_keys(message)
        .max_in_flight(8)
        .build()
        .unwrap();
        let mut producer = p.producer();
        let mut seen = std::collections::HashSet::new();
        let label = format!("config {seed}");
        drive(
            &mut producer,
            &mut Rng::new(50 + seed as u64),
            300_000,
            &label,
            |rng| {
                let max = if rng.below(10) == 0 { 4096 } else { 50 };
                let len = 1 + rng.below(max) as usize;
                let keys: Vec<u64> = (0..len).map(|_| rng.below(100_000)).collect();
                let expected = keys
                    .iter()
                    .map(|&k| {
                        if seen.insert(k) {
                            Verdict::New
                        } else {
                            Verdict::DuplicateUntimed
                        }
                    })
                    .collect();
                (keys, expected)
            },
        );
        assert_eq!(p.deduper().stats().exact_entries, seen.len() as u64);
        p.shutdown().unwrap();
    }
}

#[test]
fn event_time_through_the_pipeline_matches_the_reference() {
    let window = Duration::from_secs(10);
    let p = Pipeline::builder(
        Deduper::builder()
            .window(window)
            .expected_keys(1_000)
            .shards(8)
            .mark_batch(16)
            .clock(Clock::EventTime)
            .allowed_lateness(Duration::from_secs(1)),
    )
    .workers(2)
    .build()
    .unwrap();
    let mut producer = p.producer();
    let mut rng = Rng::new(5);
    let mut first = HashMap::new();
    let mut watermark = 0u64;
    let mut t = 1_000_000_000_000u64;
    for _ in 0..2_000 {
        let batch: Vec<(u64, Timestamp)> = (0..1 + rng.below(200))
            .map(|_| {
                t += rng.below(20_000_000);
                let at = t.saturating_sub(rng.below(1_500_000_000));
                (rng.below(3_000), Timestamp::from_nanos(at))
            })
            .collect();
        let expected: Vec<Verdict> = batch
            .iter()
            .map(|&(k, at)| {
                let at = at.as_nanos();
                if at + 1_000_000_000 < watermark {
                    return Verdict::Late {
                        watermark: Timestamp::from_nanos(watermark),
                    };
                }
                watermark = watermark.max(at);
                reference_check(&mut first, window.as_nanos() as u64, k, at)
            })
            .collect();
        producer.submit_at(&batch).unwrap();
        assert_eq!(producer.recv().unwrap(), expected);
    }
}

/// Several producers on overlapping keys: each key is `New` exactly once.
#[test]
fn producers_on_overlapping_keys_get_one_new_per_key() {
    let p = Arc::new(
        Pipeline::builder(
            Deduper::builder()
                .expected_keys(100_000)
                .shards(16)
                .mark_batch(256),
        )
        .workers(2)
        .build()
        .unwrap(),
    );
    let handles: Vec<_> = (0..4u64)
        .map(|tid| {
            let p = Arc::clone(&p);
            thread::spawn(move || {
                let mut producer = p.producer();
                let mut rng = Rng::new(tid);
                let mut news = Vec::new();
                for _ in 0..200 {
                    let keys: Vec<u64> = (0..256).map(|_| rng.below(30_000)).collect();
                    let verdicts = producer.process(&keys).unwrap();
                    news.extend(
                        keys.iter()
                            .zip(verdicts)
                            .filter(|(_, v)| v.is_new())
                            .map(|(k, _)| *k),
                    );
                }
                news
            })
        })
        .collect();
    let mut count: HashMap<u64, u32> = HashMap::new();
    for h in handles {
        for k in h.join().unwrap() {
            *count.entry(k).or_default() += 1;
        }
    }
    assert!(
        count.values().all(|&n| n == 1),
        "a key was new more than once"
    );
    let stats = p.deduper().stats();
    assert_eq!(stats.new, count.len() as u64);
}

/// Shutdown with batches in flight: every submitted key still gets its
/// verdict, and every mark is written.
#[test]
fn shutdown_drains_queues_and_marks() {
    let p = Pipeline::builder(
        Deduper::builder()
            .expected_keys(100_000)
            .shards(8)
            .mark_batch(100_000)
            .flush_interval(Duration::from_secs(3600)),
    )
    .workers(2)
    .queue_depth(64)
    .max_in_flight(64)
    .build()
    .unwrap();
    let mut producer = p.producer();
    for b in 0..50u64 {
        let keys: Vec<u64> = (b * 1_000..(b + 1) * 1_000).collect();
        producer.submit(&keys).unwrap();
    }
    p.shutdown().unwrap();
    let mut answered = 0;
    while producer.in_flight() > 0 {
        let verdicts = producer.recv().unwrap();
        assert!(verdicts.iter().all(|v| v.is_new()));
        answered += verdicts.len();
    }
    assert_eq!(answered, 50_000);
    let stats = p.deduper().stats();
    assert_eq!(stats.marks_queued, 50_000);
    assert_eq!(
        stats.marks_flushed, 50_000,
        "pending marks lost at shutdown"
    );
    assert_eq!(stats.marks_pending, 0);
    assert_eq!(stats.exact_entries, 50_000);
    assert_eq!(producer.submit(&[1u64]), Err(PipelineError::Closed));
    assert_eq!(p.process(&[1u64]), Err(PipelineError::Closed));
}

/// A producer far faster than the workers stays within the queue bound.
#[test]
fn back_pressure_bounds_the_queues() {
    let p = Arc::new(
        Pipeline::builder(Deduper::builder().expected_keys(1_000_000).shards(4))
            .workers(1)
            .queue_depth(3)
            .max_message_keys(512)
            .max_in_flight(4)
            .build()
            .unwrap(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let p = Arc::clone(&p);
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(p.queued_messages());
                thread::yield_now();
            }
            peak
        })
    };
    let mut producer = p.producer();
    let mut peak_in_flight = 0;
    for b in 0..300u64 {
        let keys: Vec<u64> = (b * 4_096..(b + 1) * 4_096).collect();
        producer.submit(&keys).unwrap();
        peak_in_flight = peak_in_flight.max(producer.unanswered());
    }
    while producer.in_flight() > 0 {
        producer.recv().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let peak_queue = watcher.join().unwrap();
    assert!(
        peak_queue <= p.queue_bound(),
        "{peak_queue} > {}",
        p.queue_bound()
    );
    assert!(peak_in_flight <= 4);
    assert!(
        peak_queue > 0,
        "the producer never got ahead: the test measured nothing"
    );
}

/// An exact tier whose partitions panic on the 1000th mark.
struct Exploding;

struct ExplodingPartition {
    inner: MemoryPartition,
    marks: u32,
}

impl ExactPartition for ExplodingPartition {
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        self.inner.lookup(fp, slot)
    }
    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        self.marks += 1;
        assert!(self.marks < 1_000, "injected failure");
        self.inner.mark(fp, slot, at)
    }
    fn clear_slots(&mut self, slots: u8) {
        self.inner.clear_slots(slots);
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        self.inner.entries()
    }
}

impl ExactBackend for Exploding {
    fn name(&self) -> &'static str {
        "exploding"
    }
    fn partition(&self, spec: &PartitionSpec) -> Box<dyn ExactPartition> {
        Box::new(ExplodingPartition {
            inner: MemoryPartition::with_capacity(spec.keys_per_slot),
            marks: 0,
        })
    }
}

#[test]
fn a_panicking_worker_is_an_error_not_a_hang() {
    let p = Pipeline::builder(
        Deduper::builder()
            .shards(1)
            .exact_tier(ExactTier::Custom(Arc::new(Exploding))),
    )
    .workers(1)
    .build()
    .unwrap();
    let mut producer = p.producer();
    let keys: Vec<u64> = (0..5_000).collect();
    let err = producer.process(&keys).unwrap_err();
    assert!(
        matches!(&err, PipelineError::WorkerPanicked(msg) if msg.contains("injected failure")),
        "{err:?}"
    );
    assert!(matches!(
        producer.submit(&[1u64]),
        Err(PipelineError::WorkerPanicked(_))
    ));
    assert!(matches!(
        p.shutdown(),
        Err(PipelineError::WorkerPanicked(_))
    ));
}

/// A partial mark batch is written within the flush interval, even when no
/// further key arrives.
#[test]
fn partial_mark_batches_are_flushed_within_the_interval() {
    let p = Pipeline::builder(
        Deduper::builder()
            .shards(4)
            .mark_batch(10_000)
            .flush_interval(Duration::from_millis(20)),
    )
    .workers(2)
    .build()
    .unwrap();
    let keys: Vec<u64> = (0..100).collect();
    p.process(&keys).unwrap();
    let start = std::time::Instant::now();
    while p.deduper().stats().marks_pending > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "marks held for 5 s with a 20 ms interval"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let stats = p.deduper().stats();
    assert_eq!(stats.marks_flushed, 100);
    assert!(start.elapsed() >= Duration::ZERO);
}

/// A stream processor restarts: the first pipeline's engine is snapshotted
/// after shutdown, restored, and run by a second pipeline
/// (`Pipeline::from_deduper`), whose verdicts continue the reference's as if
/// nothing had stopped; `into_deduper` hands the engine back only once no
/// producer holds it.
#[test]
fn a_restored_engine_keeps_its_window_in_a_new_pipeline() {
    let window = Duration::from_secs(60);
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let config = || {
        Deduper::builder()
            .window(window)
            .shards(8)
            .expected_keys(10_000)
            .mark_batch(64)
            .clock(Clock::Manual(clock.clone()))
    };
    let mut rng = Rng::new(0x5EED_0003);
    let mut reference = HashMap::new();
    let mut run = |p: &Pipeline, batches: usize, reference: &mut HashMap<u64, u64>| {
        let mut producer = p.producer();
        for _ in 0..batches {
            let keys: Vec<u64> = (0..1 + rng.below(300)).map(|_| rng.below(5_000)).collect();
            let t = clock.now().as_nanos();
            let expected: Vec<Verdict> = keys
                .iter()
                .map(|&k| reference_check(reference, window.as_nanos() as u64, k, t))
                .collect();
            producer.submit(&keys).unwrap();
            assert_eq!(producer.recv().unwrap(), expected);
            clock.advance(Duration::from_millis(1 + rng.below(500)));
        }
    };

    let first = Pipeline::builder(config()).workers(2).build().unwrap();
    run(&first, 200, &mut reference);
    let engine = first.into_deduper().unwrap();
    let checks = engine.stats().checks;
    let mut saved = Vec::new();
    engine.snapshot(&mut saved).unwrap();
    drop(engine);

    let restored = config().restore(saved.as_slice()).unwrap();
    assert_eq!(restored.stats().checks, checks);
    let second = Pipeline::from_deduper(restored).workers(3).build().unwrap();
    run(&second, 200, &mut reference);

    let producer = second.producer();
    assert_eq!(
        second.into_deduper().err(),
        Some(PipelineError::ProducersAlive),
        "a live producer keeps the engine"
    );
    drop(producer);
}
