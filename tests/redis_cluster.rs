//! The Redis exact tier on a real three-master Redis Cluster, started by
//! the test on loopback ports: verdicts equal the reference in owned and
//! shared modes, and the shards' hashes spread over every master.
#![cfg(feature = "redis")]

#[path = "support/redis_cluster.rs"]
mod redis_cluster;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis_cluster::RedisCluster;
use rng::Rng;
use tiered_dedup::exact::redis::{RedisConfig, RedisStats, RedisTier};
use tiered_dedup::{
    Affinity, Clock, Deduper, DeduperBuilder, ExactTier, ManualClock, Timestamp, Verdict,
};

const SHARDS: usize = 16;

fn engine(
    cluster: &RedisCluster,
    clock: &ManualClock,
    affinity: Affinity,
    window: Duration,
) -> (DeduperBuilder, Arc<RedisStats>) {
    let urls = cluster.urls();
    let seeds: Vec<&str> = urls.iter().map(String::as_str).collect();
    let tier = RedisTier::new(RedisConfig::cluster(&seeds));
    let stats = tier.stats();
    let builder = Deduper::builder()
        .window(window)
        .expected_keys(10_000)
        .shards(SHARDS)
        .mark_batch(64)
        .affinity(affinity)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(tier)));
    (builder, stats)
}

fn reference(first: &mut HashMap<u64, u64>, window: u64, key: u64, t: u64) -> Verdict {
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

#[test]
fn smoke() {
    let cluster = RedisCluster::start(3);
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (builder, _) = engine(&cluster, &clock, Affinity::Owned, Duration::from_secs(60));
    let d = builder.build().unwrap();
    assert!(d.check("a").is_new());
    assert!(d.check("a").is_duplicate());
}

/// Random batches through the cluster, time crossing many slices: verdicts
/// equal the reference in both modes, no request fails, and every master
/// holds some of the shards' hashes.
#[test]
fn verdicts_match_the_reference_on_a_three_master_cluster() {
    let cluster = RedisCluster::start(3);
    for affinity in [Affinity::Owned, Affinity::Shared] {
        cluster.flush_all();
        let window = Duration::from_millis(200);
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let (builder, stats) = engine(&cluster, &clock, affinity, window);
        let d = builder.build().unwrap();
        let mut rng = Rng::new(7);
        let mut first = HashMap::new();
        let mut ops = 0;
        let mut duplicates = 0;
        while ops < 100_000 {
            clock.advance(Duration::from_micros(rng.below(2_000)));
            let keys: Vec<u64> = (0..1 + rng.below(300)).map(|_| rng.below(20_000)).collect();
            let now = clock.now().as_nanos();
            let expected: Vec<Verdict> = keys
                .iter()
                .map(|&k| reference(&mut first, window.as_nanos() as u64, k, now))
                .collect();
            duplicates += expected.iter().filter(|v| v.is_duplicate()).count();
            assert_eq!(d.check_batch(&keys), expected, "{affinity:?} at op {ops}");
            ops += keys.len();
        }
        d.flush().expect("a healthy tier stores every mark");
        assert!(
            d.stats().rotations >= 50,
            "{affinity:?}: time crossed slices"
        );
        assert!(duplicates > 10_000, "{affinity:?}: the stream repeats keys");
        let failures = stats.failures.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(failures, 0, "{affinity:?}: a request to the cluster failed");
        // 16 shards' hashes (one hash tag each) over 3 masters' slot ranges.
        let sizes = cluster.dbsizes();
        assert!(
            sizes.iter().all(|&n| n > 0),
            "{affinity:?}: a master holds no key: {sizes:?}"
        );
    }
}

/// `RedisTier::check` asks every master of the cluster for its eviction
/// policy.
#[test]
fn the_check_asks_every_master() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let seeds: Vec<&str> = urls.iter().map(String::as_str).collect();
    let info = RedisTier::new(RedisConfig::cluster(&seeds[..1]))
        .check()
        .expect("three masters that never evict");
    assert_eq!(info.nodes.len(), 3, "{info:?}");
    assert!(info
        .nodes
        .iter()
        .all(|n| n.maxmemory_policy.as_deref() == Some("noeviction")));
    assert!(info.problems().is_empty() && info.unchecked().is_empty());
}
