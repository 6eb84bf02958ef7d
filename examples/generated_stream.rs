//! The main job on the embedded default (memory tier), on a generated
//! at-least-once stream: deliveries, redeliveries and producer retries of
//! message ids, some arriving late. Prints what was caught and how fast.
//!
//! `cargo run --release --example generated_stream [MESSAGES]`

use std::time::{Duration, Instant};

use tiered_dedup::{Clock, Deduper, Timestamp, Verdict};

/// SplitMix64: a seeded, dependency-free stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let messages: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(5_000_000), |s| s.parse())?;
    // The stream spans one hour of event time, at the rate the engine is
    // sized for: `messages` distinct ids per one-hour window.
    let window = Duration::from_secs(3600);
    let dedup = Deduper::builder()
        .window(window)
        .expected_keys(messages)
        .clock(Clock::EventTime)
        .build()?;

    // 30% of deliveries repeat an earlier message id (a redelivery or a
    // retry), at a random distance back in the stream.
    let mut rng = Rng(42);
    let mut stream: Vec<String> = Vec::with_capacity((messages as f64 * 1.43) as usize);
    let mut next_id = 0u64;
    let mut repeats = 0u64;
    while next_id < messages {
        if next_id > 0 && rng.next() % 10 < 3 {
            let back = 1 + rng.next() % next_id.min(100_000);
            stream.push(format!("msg-{:016x}", next_id - back));
            repeats += 1;
        } else {
            stream.push(format!("msg-{next_id:016x}"));
            next_id += 1;
        }
    }

    let t0 = Timestamp::from_secs(1_700_000_000);
    let step = window.as_nanos() as u64 / stream.len() as u64;
    let timed: Vec<(&str, Timestamp)> = stream
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.as_str(),
                Timestamp::from_nanos(t0.as_nanos() + i as u64 * step),
            )
        })
        .collect();

    let start = Instant::now();
    let (mut new, mut duplicates) = (0u64, 0u64);
    for batch in timed.chunks(4096) {
        for verdict in dedup.check_batch_at(batch) {
            match verdict {
                Verdict::New => new += 1,
                Verdict::Duplicate { .. } => duplicates += 1,
                other => return Err(format!("unexpected verdict {other:?}").into()),
            }
        }
    }
    let elapsed = start.elapsed();
    let stats = dedup.stats();

    println!("deliveries        {}", stream.len());
    println!("new (acted on)    {new}");
    println!("duplicates caught {duplicates}");
    println!(
        "throughput        {:.1} M keys/s ({:.0} ns/key, one thread, batches of 4096)",
        stream.len() as f64 / elapsed.as_secs_f64() / 1e6,
        elapsed.as_nanos() as f64 / stream.len() as f64
    );
    println!(
        "filter            {:.1} MB ({:.2} bytes per key), answered {:.1}% of keys alone",
        stats.filter_bytes as f64 / 1e6,
        stats.filter_bytes as f64 / new as f64,
        100.0 * (1.0 - stats.filter_maybe_seen as f64 / stats.checks as f64)
    );
    println!(
        "exact tier        {:.1} MB ({:.1} bytes per key), {} false positives caught",
        stats.exact_bytes as f64 / 1e6,
        stats.exact_bytes as f64 / stats.exact_entries.max(1) as f64,
        stats.false_positives_caught
    );
    // The stream was built with a known answer: check it.
    if new != messages || duplicates != repeats {
        return Err(format!("expected {messages} new and {repeats} duplicates").into());
    }
    println!("verdicts exact: every id new once, every repeat caught");
    Ok(())
}
