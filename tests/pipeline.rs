//! The worker pipeline: verdicts identical to the reference through random
//! batch sizes, shard/worker counts, flush intervals and mark batches; one
//! `New` per key across producers; nothing lost on shutdown, and nothing
//! recorded of a batch refused at shutdown; marks a tier could not store
//! reported; bounded queues; a panicking worker surfaces as an error, never
//! a hang.

#[path = "support/rng.rs"]
mod rng;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rng::Rng;
use tiered_dedup::exact::{ExactBackend, ExactPartition, Mark, MemoryPartition, PartitionSpec};
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
    // The memory tier stores every mark: a second shutdown (a forced
    // flush) has nothing to report either.
    assert_eq!(p.shutdown(), Ok(()));
}

/// The keys of batch `id`: 200 keys no other batch has.
fn batch_keys(id: u64) -> Vec<u64> {
    (0..200).map(|i| (id << 10) | i).collect()
}

/// The event time of batch `id` of producer `tid` (its `b`-th): the
/// producers' batches interleave, one millisecond apart.
fn batch_time(tid: u64, b: u64) -> Timestamp {
    Timestamp::from_nanos(1_000_000_000_000 + (b * 3 + tid) * 1_000_000)
}

/// What one producer thread saw in one round.
#[derive(Default)]
struct Seen {
    /// Batches answered in full: `(id, time)`.
    answered: Vec<(u64, Timestamp)>,
    /// Batches refused with `Closed` (at submit or at receive).
    refused: Vec<(u64, Timestamp)>,
}

/// One producer: submits batches of fresh keys (processing or event time)
/// until the pipeline refuses one, receiving as it goes, then receives the
/// rest. Every answered batch must be all `New`.
fn produce_until_closed(p: &Pipeline, tid: u64, event_time: bool) -> Seen {
    let mut producer = p.producer();
    let mut seen = Seen::default();
    let mut in_flight = VecDeque::new();
    let receive =
        |producer: &mut Producer, seen: &mut Seen, batch: (u64, Timestamp)| match producer.recv() {
            Ok(verdicts) => {
                assert!(verdicts.iter().all(|v| v.is_new()), "fresh keys not new");
                assert_eq!(verdicts.len(), 200);
                seen.answered.push(batch);
            }
            Err(PipelineError::Closed) => seen.refused.push(batch),
            Err(e) => panic!("producer {tid}: {e}"),
        };
    for b in 0..1_000_000u64 {
        let id = (tid << 40) | b;
        let at = batch_time(tid, b);
        let keys = batch_keys(id);
        let submitted = if event_time {
            let timed: Vec<(u64, Timestamp)> = keys.iter().map(|&k| (k, at)).collect();
            producer.submit_at(&timed)
        } else {
            producer.submit(&keys)
        };
        match submitted {
            Ok(()) => in_flight.push_back((id, at)),
            Err(PipelineError::Closed) => {
                seen.refused.push((id, at));
                break;
            }
            Err(e) => panic!("producer {tid}: {e}"),
        }
        while in_flight.len() > 2 {
            let batch = in_flight.pop_front().expect("in flight");
            receive(&mut producer, &mut seen, batch);
        }
    }
    while let Some(batch) = in_flight.pop_front() {
        receive(&mut producer, &mut seen, batch);
    }
    seen
}

/// Producers on three threads submit batches of fresh keys (each split into
/// many messages over both workers) while another thread shuts the
/// pipeline down, for 40 rounds (at most a minute), half of them under
/// event time. A batch refused with `Closed` must have left no trace in the
/// engine `into_deduper` hands back — none of its keys recorded, the
/// watermark not moved by it — and every batch submitted `Ok` must be
/// answered in full, with all of its keys recorded. (Before the gate, 202
/// of 842 refused batches had 63–133 of their 200 keys recorded.)
#[test]
fn a_batch_refused_at_shutdown_left_no_trace() {
    let started = Instant::now();
    let mut rng = Rng::new(0x5EED_0015);
    let (mut refused, mut answered) = (0usize, 0usize);
    for round in 0..40u64 {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let event_time = round % 2 == 1;
        let mut config = Deduper::builder()
            .expected_keys(100_000)
            .shards(16)
            .mark_batch(64);
        if event_time {
            config = config
                .clock(Clock::EventTime)
                .allowed_lateness(Duration::from_secs(3600));
        }
        let p = Arc::new(
            Pipeline::builder(config)
                .workers(2)
                .queue_depth(2)
                .max_message_keys(16)
                .max_in_flight(4)
                .build()
                .unwrap(),
        );
        let producers: Vec<_> = (0..3u64)
            .map(|tid| {
                let p = Arc::clone(&p);
                thread::spawn(move || produce_until_closed(&p, tid, event_time))
            })
            .collect();
        thread::sleep(Duration::from_micros(rng.below(3_000)));
        let stopper = {
            let p = Arc::clone(&p);
            thread::spawn(move || p.shutdown())
        };
        assert_eq!(stopper.join().unwrap(), Ok(()));
        let seen: Vec<Seen> = producers.into_iter().map(|h| h.join().unwrap()).collect();
        let engine = Arc::try_unwrap(p)
            .expect("producers dropped")
            .into_deduper()
            .unwrap();
        if event_time {
            let highest_answered = seen
                .iter()
                .flat_map(|s| s.answered.iter().map(|&(_, at)| at))
                .max()
                .unwrap_or(Timestamp::ZERO);
            assert_eq!(
                engine.watermark(),
                highest_answered,
                "round {round}: a refused batch moved the watermark"
            );
        }
        let recorded = |id: u64, at: Timestamp| -> usize {
            batch_keys(id)
                .iter()
                .filter(|&&k| {
                    let v = if event_time {
                        engine.check_at(&k, at)
                    } else {
                        engine.check(&k)
                    };
                    v.is_duplicate()
                })
                .count()
        };
        for s in &seen {
            for &(id, at) in &s.refused {
                assert_eq!(
                    recorded(id, at),
                    0,
                    "round {round}: keys of batch {id:#x}, refused with Closed, were recorded"
                );
            }
            for &(id, at) in &s.answered {
                assert_eq!(
                    recorded(id, at),
                    200,
                    "round {round}: keys of answered batch {id:#x} were not recorded"
                );
            }
            refused += s.refused.len();
            answered += s.answered.len();
        }
    }
    eprintln!("{refused} refused, {answered} answered batches");
    assert!(
        refused >= 10 && answered >= 10,
        "{refused} refused and {answered} answered batches: the race was not exercised"
    );
}

/// An exact tier whose store can be down: while it is, marks are kept
/// (visible to lookups, counted by `unwritten`) and every write fails; once
/// it is up, the next flush stores them. A real backend of the test's, not
/// a mock: the kept marks are what a remote tier keeps for a retry.
struct Switchable {
    up: Arc<AtomicBool>,
}

struct SwitchablePartition {
    stored: MemoryPartition,
    kept: Vec<Mark>,
    up: Arc<AtomicBool>,
}

impl ExactPartition for SwitchablePartition {
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        let kept = self
            .kept
            .iter()
            .rev()
            .find(|m| m.fingerprint == fp && m.slot == slot);
        match kept {
            Some(m) => Ok(Some(m.at)),
            None => self.stored.lookup(fp, slot),
        }
    }
    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        self.mark_batch(&[Mark {
            fingerprint: fp,
            slot,
            slice: 0,
            at,
        }])
    }
    fn mark_batch(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        self.kept.extend_from_slice(marks);
        self.flush()
    }
    fn flush(&mut self) -> Result<(), ExactTierError> {
        if !self.up.load(Ordering::SeqCst) {
            return Err(ExactTierError::Unavailable("store down".into()));
        }
        for m in self.kept.drain(..) {
            self.stored.mark(m.fingerprint, m.slot, m.at)?;
        }
        Ok(())
    }
    fn unwritten(&self) -> u64 {
        self.kept.len() as u64
    }
    fn clear_slots(&mut self, slots: u8) {
        self.kept.retain(|m| slots & (1 << m.slot) == 0);
        self.stored.clear_slots(slots);
    }
    fn len(&self) -> u64 {
        self.stored.len()
    }
    fn bytes(&self) -> usize {
        self.stored.bytes()
    }
    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        self.stored.entries()
    }
}

impl ExactBackend for Switchable {
    fn name(&self) -> &'static str {
        "switchable"
    }
    fn partition(&self, spec: &PartitionSpec) -> Box<dyn ExactPartition> {
        Box::new(SwitchablePartition {
            stored: MemoryPartition::with_capacity(spec.keys_per_slot),
            kept: Vec::new(),
            up: Arc::clone(&self.up),
        })
    }
}

/// Marks the exact tier cannot store by the end are reported by
/// `shutdown` (how many, and why), again by a second `shutdown` while the
/// store is down, and not once it is back; `into_deduper` hands the
/// engine back with the error, still holding them for its own `flush`.
#[test]
fn shutdown_reports_marks_the_tier_could_not_store() {
    let up = Arc::new(AtomicBool::new(false));
    let pipeline = || {
        Pipeline::builder(
            Deduper::builder()
                .shards(4)
                .mark_batch(1_000)
                .flush_interval(Duration::from_secs(3600))
                .exact_tier(ExactTier::Custom(Arc::new(Switchable {
                    up: Arc::clone(&up),
                }))),
        )
        .workers(2)
        .build()
        .unwrap()
    };
    let keys: Vec<u64> = (0..500).collect();

    let p = pipeline();
    assert!(p.process(&keys).unwrap().iter().all(|v| v.is_new()));
    let unwritten = PipelineError::Unwritten {
        marks: 500,
        reason: "exact tier unavailable: store down".into(),
    };
    let err = p.shutdown().unwrap_err();
    assert_eq!(err, unwritten);
    assert!(
        err.to_string()
            .starts_with("500 accepted keys are not stored in the exact tier"),
        "{err}"
    );
    assert_eq!(p.shutdown(), Err(unwritten.clone()), "still down");
    up.store(true, Ordering::SeqCst);
    assert_eq!(p.shutdown(), Ok(()), "the retry stored them");
    let engine = p.into_deduper().unwrap();
    assert_eq!(engine.stats().exact_entries, 500);

    up.store(false, Ordering::SeqCst);
    let p = pipeline();
    assert!(p.process(&keys).unwrap().iter().all(|v| v.is_new()));
    let err = p.into_deduper().unwrap_err();
    assert_eq!(err.error(), &unwritten);
    let engine = err.into_deduper().expect("the engine comes back");
    assert_eq!(engine.flush().unwrap_err().unwritten(), 500);
    assert!(engine.check(&7u64).is_duplicate(), "kept marks answer");
    up.store(true, Ordering::SeqCst);
    engine.flush().unwrap();
    assert_eq!(engine.stats().exact_entries, 500);
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
    let err = second.into_deduper().unwrap_err();
    assert_eq!(
        err.error(),
        &PipelineError::ProducersAlive,
        "a live producer keeps the engine"
    );
    assert!(err.into_deduper().is_none());
    drop(producer);
}

/// Claims through the pipeline answer as the engine's own `claim_batch` on
/// a twin engine fed the same batches at the same times: acquired, in
/// progress, completed with the committed result, conflicts; leases from
/// the pipeline commit through its engine; batches of checks and claims
/// interleave and are received by kind.
#[test]
fn claims_through_the_pipeline_answer_as_the_engine() {
    use tiered_dedup::{Claim, ClaimRequest, PayloadFingerprint};
    let clock = ManualClock::new(Timestamp::from_secs(10_000));
    let b = || {
        Deduper::builder()
            .window(Duration::from_secs(60))
            .expected_keys(5_000)
            .shards(8)
            .lease_duration(Duration::from_secs(5))
            .clock(Clock::Manual(clock.clone()))
    };
    let twin = b().build().unwrap();
    let pipeline = Pipeline::builder(b())
        .workers(3)
        .max_message_keys(50)
        .build()
        .unwrap();
    let mut producer = pipeline.producer();
    let mut rng = Rng::new(17);
    fn kind<D: AsRef<Deduper>>(c: &Claim<D>) -> (String, Vec<u8>) {
        match c {
            Claim::Completed { result, .. } => ("completed".into(), result.to_vec()),
            other => (format!("{:?}", other.kind()), Vec::new()),
        }
    }
    for round in 0..300 {
        let requests: Vec<ClaimRequest<u64>> = (0..rng.below(200) + 1)
            .map(|_| {
                let r = ClaimRequest::new(rng.below(400));
                match rng.below(3) {
                    0 => r.payload(PayloadFingerprint(rng.below(2))),
                    _ => r,
                }
            })
            .collect();
        producer.submit_claims(&requests).unwrap();
        // A check batch behind it, received after it.
        producer.submit(&[1_000_000 + round]).unwrap();
        assert!(matches!(producer.recv(), Err(PipelineError::OtherKind(_))));
        let ours = producer.recv_claims().unwrap();
        assert!(producer.recv().unwrap()[0].is_new());
        let theirs = twin.claim_batch(&requests);
        for (i, (a, b)) in ours.into_iter().zip(theirs).enumerate() {
            assert_eq!(kind(&a), kind(&b), "round {round} request {i}");
            // Commit about half, the same way on both; release the rest.
            let commit = rng.chance(0.5);
            let result = round.to_le_bytes();
            if let (Claim::Acquired(a), Claim::Acquired(b)) = (a, b) {
                if commit {
                    a.commit(&result).unwrap();
                    b.commit(&result).unwrap();
                }
            }
        }
        clock.advance(Duration::from_millis(rng.below(3_000)));
    }
    let stats = pipeline.deduper().stats().claims;
    assert!(
        stats.acquired > 1_000 && stats.completed > 1_000 && stats.conflicts > 0,
        "{stats:?}"
    );
    assert_eq!(stats, twin.stats().claims);
}
