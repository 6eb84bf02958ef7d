//! The broker-neutral consumer step against a trivial reference: random
//! batches with repeats, handler failures and redeliveries of whatever was
//! not acked; every key acted on exactly once (the memory tier has no
//! crash window), and every disposition the one the reference predicts.

#[path = "support/rng.rs"]
mod rng;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use rng::Rng;
use tiered_dedup::consumer::{BatchConsumer, Delivery, Disposition};
use tiered_dedup::Deduper;

#[test]
fn smoke() {
    let c = BatchConsumer::new(Arc::new(Deduper::builder().build().unwrap()));
    let out = c.process(
        vec![Delivery::new("k", ())],
        |()| Ok::<_, ()>(b"r".to_vec()),
        |()| {},
    );
    assert_eq!(out[0].1, Disposition::Processed);
    assert_eq!(c.stats().processed, 1);
}

#[test]
fn randomized_against_a_reference() {
    for seed in 0..20u64 {
        let mut rng = Rng::new(seed);
        let c = BatchConsumer::new(Arc::new(Deduper::builder().build().unwrap()));
        let keys = 1 + rng.below(200);
        let messages = 50 + rng.below(1_000);
        let fail_p = rng.below(40) as f64 / 100.0;
        let mut queue: VecDeque<(u64, u64)> = (0..messages).map(|i| (i, rng.below(keys))).collect();
        let mut done: HashSet<u64> = HashSet::new();
        let mut effects: HashMap<u64, u32> = HashMap::new();
        let mut acked = 0u64;
        let mut rounds = 0;
        while !queue.is_empty() {
            rounds += 1;
            assert!(rounds < 100_000, "seed {seed}: does not drain");
            let n = 1 + rng.below(64) as usize;
            let batch: Vec<(u64, u64)> = (0..n).filter_map(|_| queue.pop_front()).collect();
            // The handler's outcome per message, decided up front.
            let fails: HashMap<u64, bool> = batch
                .iter()
                .map(|&(id, _)| (id, rng.chance(fail_p)))
                .collect();
            // The reference: the first delivery of a key not done acts; a
            // later one in the batch follows it.
            let mut expect = Vec::new();
            let mut first: HashMap<u64, bool> = HashMap::new();
            for &(id, k) in &batch {
                let d = if done.contains(&k) {
                    "replayed"
                } else if let Some(&ok) = first.get(&k) {
                    if ok {
                        "replayed"
                    } else {
                        "failed"
                    }
                } else {
                    let ok = !fails[&id];
                    first.insert(k, ok);
                    if ok {
                        "processed"
                    } else {
                        "failed"
                    }
                };
                expect.push(d);
            }
            let out = c.process(
                batch
                    .iter()
                    .map(|&(id, k)| Delivery::new(k.to_le_bytes(), (id, k)))
                    .collect(),
                |&(id, k): &(u64, u64)| {
                    if fails[&id] {
                        Err("handler failed")
                    } else {
                        *effects.entry(k).or_default() += 1;
                        Ok(k.to_le_bytes().to_vec())
                    }
                },
                |_| panic!("no payloads, no conflicts"),
            );
            for (((id, k), d), want) in out.into_iter().zip(expect) {
                let got = match &d {
                    Disposition::Processed => "processed",
                    Disposition::Replayed { .. } => "replayed",
                    Disposition::Failed => "failed",
                    other => panic!("seed {seed}: {other:?}"),
                };
                assert_eq!(got, want, "seed {seed}: message {id} key {k}");
                if let Disposition::Replayed { result } = &d {
                    assert_eq!(&result[..], &k.to_le_bytes()[..], "the first run's result");
                }
                if d == Disposition::Processed {
                    done.insert(k);
                }
                if d.should_ack() {
                    acked += 1;
                } else {
                    queue.push_back((id, k)); // redelivered
                }
            }
        }
        assert_eq!(acked, messages);
        assert!(
            effects.values().all(|&n| n == 1),
            "seed {seed}: an effect twice"
        );
        assert_eq!(effects.len(), done.len());
        let s = c.stats();
        assert_eq!(s.processed as usize, done.len());
        assert_eq!(s.processed + s.replayed, messages);
    }
}
