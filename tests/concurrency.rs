//! Many threads at once: overlapping keys, one fresh key raced by all
//! threads, and the standalone filter's atomic inserts racing rotation.

#[path = "support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use rng::Rng;
use tiered_dedup::{Clock, Deduper, GenerationalBloom, ManualClock, Namespace, Timestamp, Verdict};

const THREADS: usize = 4;

#[test]
fn smoke() {
    let d = Arc::new(Deduper::builder().build().unwrap());
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let d = Arc::clone(&d);
            thread::spawn(move || d.check("same").is_new())
        })
        .collect();
    let news = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|&new| new)
        .count();
    assert_eq!(news, 1);
}

/// Threads check overlapping random keys (singly and in batches) at one
/// fixed time: every key must be `New` exactly once overall, and every
/// duplicate must name the time of that acceptance — what the reference
/// model gives for any interleaving.
#[test]
fn overlapping_keys_give_one_new_per_key() {
    for shards in [1, 4, 64] {
        let clock = ManualClock::new(Timestamp::from_secs(50));
        let d = Arc::new(
            Deduper::builder()
                .window(Duration::from_secs(60))
                .expected_keys(50_000)
                .shards(shards)
                .clock(Clock::Manual(clock))
                .build()
                .unwrap(),
        );
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|tid| {
                let d = Arc::clone(&d);
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    let mut rng = Rng::new(tid as u64);
                    let mut verdicts: Vec<(u64, Verdict)> = Vec::new();
                    barrier.wait();
                    for round in 0..400 {
                        let keys: Vec<u64> = (0..64).map(|_| rng.below(20_000)).collect();
                        if round % 2 == 0 {
                            verdicts.extend(keys.iter().map(|&k| (k, d.check(&k))));
                        } else {
                            verdicts.extend(keys.iter().copied().zip(d.check_batch(&keys)));
                        }
                    }
                    verdicts
                })
            })
            .collect();
        let mut news: HashMap<u64, usize> = HashMap::new();
        let mut seen = 0;
        for h in handles {
            for (k, v) in h.join().unwrap() {
                seen += 1;
                match v {
                    Verdict::New => *news.entry(k).or_default() += 1,
                    Verdict::Duplicate { first_seen } => {
                        assert_eq!(first_seen, Timestamp::from_secs(50));
                        news.entry(k).or_default();
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(seen, THREADS * 400 * 64);
        for (k, n) in news {
            assert_eq!(n, 1, "key {k} was new {n} times with {shards} shards");
        }
    }
}

/// All threads submit the same fresh key at the same moment: exactly one
/// `New`, many times over.
#[test]
fn a_raced_fresh_key_is_new_exactly_once() {
    let d = Arc::new(Deduper::builder().shards(8).build().unwrap());
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let d = Arc::clone(&d);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                (0..2_000u64)
                    .map(|round| {
                        barrier.wait();
                        u32::from(d.check(&round).is_new())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let per_thread: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for round in 0..2_000 {
        let news: u32 = per_thread.iter().map(|v| v[round]).sum();
        assert_eq!(news, 1, "round {round}: {news} threads got New");
    }
}

/// Threads insert into and query the standalone filter while time moves
/// through many rotations: no key is ever lost inside its window, and of
/// the threads inserting one fresh key at most one is told it was new.
#[test]
fn filter_inserts_race_rotation_without_losing_keys() {
    let window = Duration::from_millis(600);
    let filter = Arc::new(GenerationalBloom::new(window, 200_000, 0.01).unwrap());
    let clock = ManualClock::new(Timestamp::from_secs(10));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = {
        let progress = Arc::clone(&progress);
        let clock = clock.clone();
        let stop = Arc::clone(&stop);
        let filter = Arc::clone(&filter);
        thread::spawn(move || {
            // 3000 ticks of 20 ms through 100 ms slices: ~600 rotations,
            // one tick per 100 keys checked, so inserts and rotations
            // interleave whatever the scheduler does.
            for tick in 0..3_000u64 {
                while progress.load(std::sync::atomic::Ordering::Relaxed) < tick * 100 {
                    thread::yield_now();
                }
                clock.advance(Duration::from_millis(20));
                filter.advance(clock.now());
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            filter.current_slice().unwrap()
        })
    };
    let ns = Namespace::default();
    const KEYS: u64 = 50_000_000;
    let handles: Vec<_> = (0..3u64)
        .map(|tid| {
            let filter = Arc::clone(&filter);
            let clock = clock.clone();
            let stop = Arc::clone(&stop);
            let progress = Arc::clone(&progress);
            thread::spawn(move || {
                let mut definitely_new = Vec::new();
                for i in 0..KEYS {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Keys shared by all threads: each fresh key raced.
                    let key = ns.fingerprint(&i.to_le_bytes());
                    let t = clock.now();
                    if filter.check_and_insert(key, t).is_definitely_new() {
                        definitely_new.push((i, t, clock.now()));
                        // A key inserted at `t` is there until `t + window`
                        // (a `MaybeSeen` answer inserts nothing: duplicates
                        // do not extend the window).
                        // The filter answers at its own time, which the
                        // ticker may move on during the query: judge the
                        // elapsed time with a clock read after it.
                        let found = filter.contains(key, clock.now());
                        let after = clock.now();
                        assert!(
                            found || after.saturating_since(t) >= window,
                            "thread {tid} lost key {i}"
                        );
                    }
                }
                definitely_new
            })
        })
        .collect();
    // (time before, time after) of every `DefinitelyNew`, per key.
    let mut news: HashMap<u64, Vec<(Timestamp, Timestamp)>> = HashMap::new();
    for h in handles {
        for (i, before, after) in h.join().unwrap() {
            news.entry(i).or_default().push((before, after));
        }
    }
    let last_slice = ticker.join().unwrap();
    let first_slice = 10_000 / 100;
    assert!(
        last_slice - first_slice >= 500,
        "only {} rotations",
        last_slice - first_slice
    );
    // The threads share keys but not their pace: a key may be new again once
    // its first insert has expired, never twice within one window.
    for (i, mut calls) in news {
        calls.sort();
        for pair in calls.windows(2) {
            // Each call takes effect at some instant inside its own
            // [before, after]: a violation is two calls with no choice of
            // instants a window apart.
            let ((a1, a2), (b1, b2)) = (pair[0], pair[1]);
            let widest = b2.saturating_since(a1).max(a2.saturating_since(b1));
            assert!(
                widest >= window,
                "key {i} was definitely new twice within the window: {pair:?}"
            );
        }
    }
}
