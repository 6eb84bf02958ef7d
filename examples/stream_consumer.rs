//! A stream consumer fed by a simulated at-least-once source: the broker
//! redelivers unacknowledged messages, producers retry sends, and partitions
//! interleave so messages arrive out of order. The consumer passes each
//! polled batch through the pipeline and acts only on `New` verdicts.
//!
//! `cargo run --release --example stream_consumer`

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tiered_dedup::{Clock, Deduper, Pipeline, Timestamp, Verdict};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One delivery: the message's id and its producer timestamp.
struct Delivery {
    id: String,
    at: Timestamp,
}

/// Yields polls of deliveries: every message once, plus producer retries
/// (sent twice within a second), broker redeliveries (a batch replayed after
/// a consumer "crash"), and out-of-order arrival across 8 partitions.
fn at_least_once_source(messages: u64, rng: &mut Rng) -> (Vec<Vec<Delivery>>, u64) {
    let start = 1_700_000_000_000_000_000u64;
    let mut partitions: Vec<Vec<Delivery>> = (0..8).map(|_| Vec::new()).collect();
    let mut extra = 0;
    for n in 0..messages {
        let at = Timestamp::from_nanos(start + n * 200_000); // 5000 messages/s
        let p = rng.below(8) as usize;
        partitions[p].push(Delivery {
            id: format!("order-{n}"),
            at,
        });
        if rng.below(100) < 3 {
            // Producer retry: the same message sent again up to 1 s later.
            let retry_at = Timestamp::from_nanos(at.as_nanos() + rng.below(1_000_000_000));
            partitions[p].push(Delivery {
                id: format!("order-{n}"),
                at: retry_at,
            });
            extra += 1;
        }
    }
    // Interleave partitions in random chunks: out-of-order arrival.
    let mut polls = Vec::new();
    let mut cursors = [0usize; 8];
    while cursors.iter().zip(&partitions).any(|(c, p)| *c < p.len()) {
        let mut poll = Vec::new();
        for _ in 0..4 {
            let p = rng.below(8) as usize;
            let take = (rng.below(200) as usize).min(partitions[p].len() - cursors[p]);
            for d in &partitions[p][cursors[p]..cursors[p] + take] {
                poll.push(Delivery {
                    id: d.id.clone(),
                    at: d.at,
                });
            }
            cursors[p] += take;
        }
        if poll.is_empty() {
            continue;
        }
        // Broker redelivery: 1% of polls are delivered twice (the consumer
        // "crashed" before acknowledging).
        if rng.below(100) == 0 {
            let again: Vec<Delivery> = poll
                .iter()
                .map(|d| Delivery {
                    id: d.id.clone(),
                    at: d.at,
                })
                .collect();
            extra += again.len() as u64;
            polls.push(poll);
            polls.push(again);
        } else {
            polls.push(poll);
        }
    }
    (polls, extra)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let messages = 1_000_000;
    let mut rng = Rng(7);
    let (polls, redundant) = at_least_once_source(messages, &mut rng);

    // Event time from the producer timestamps; a 10-minute window; arrival
    // may lag the newest timestamp by up to 5 minutes.
    let pipeline = Pipeline::builder(
        Deduper::builder()
            .window(Duration::from_secs(600))
            .expected_rate(5_000.0)
            .clock(Clock::EventTime)
            .allowed_lateness(Duration::from_secs(300))
            .mark_batch(512),
    )
    .build()?;
    let mut producer = pipeline.producer();

    let started = Instant::now();
    let (mut acted, mut duplicates, mut late) = (0u64, 0u64, 0u64);
    let mut acted_on: HashSet<String> = HashSet::new();
    let mut in_flight = std::collections::VecDeque::new();
    for poll in &polls {
        let batch: Vec<(&str, Timestamp)> = poll.iter().map(|d| (d.id.as_str(), d.at)).collect();
        producer.submit_at(&batch)?;
        in_flight.push_back(poll);
        // Keep a few polls in flight, handle answers in order.
        while in_flight.len() > 4 {
            let poll = in_flight.pop_front().expect("in flight");
            for (d, v) in poll.iter().zip(producer.recv()?) {
                match v {
                    Verdict::New => {
                        acted += 1;
                        assert!(acted_on.insert(d.id.clone()), "acted twice on {}", d.id);
                    }
                    Verdict::Duplicate { .. } => duplicates += 1,
                    Verdict::Late { .. } => late += 1,
                    other => return Err(format!("unexpected {other:?}").into()),
                }
            }
        }
    }
    while let Some(poll) = in_flight.pop_front() {
        for (d, v) in poll.iter().zip(producer.recv()?) {
            match v {
                Verdict::New => {
                    acted += 1;
                    assert!(acted_on.insert(d.id.clone()), "acted twice on {}", d.id);
                }
                Verdict::Duplicate { .. } => duplicates += 1,
                _ => late += 1,
            }
        }
    }
    let elapsed = started.elapsed();
    pipeline.shutdown()?;
    let deliveries: u64 = polls.iter().map(|p| p.len() as u64).sum();
    println!("deliveries           {deliveries} ({messages} messages + {redundant} retries and redeliveries)");
    println!("acted on             {acted}");
    println!("duplicates caught    {duplicates}");
    println!("late (not judged)    {late}");
    println!(
        "throughput           {:.1} M deliveries/s through {} workers",
        deliveries as f64 / elapsed.as_secs_f64() / 1e6,
        pipeline.workers()
    );
    if acted != messages || duplicates != redundant {
        return Err(format!("expected {messages} acted on and {redundant} duplicates").into());
    }
    println!("every message acted on exactly once");
    Ok(())
}
