//! Manual smoke run against `redis-server` on 127.0.0.1:$1 (not documented).
use std::sync::Arc;
use std::time::Duration;
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Deduper, ExactTier};
fn main() {
    let port = std::env::args().nth(1).unwrap();
    for affinity in [Affinity::Owned, Affinity::Shared] {
        let tier = Arc::new(RedisTier::new(RedisConfig::new(&format!(
            "redis://127.0.0.1:{port}"
        ))));
        let build = || {
            Deduper::builder()
                .window(Duration::from_secs(60))
                .shards(4)
                .mark_batch(100)
                .affinity(affinity)
                .exact_tier(ExactTier::Custom(tier.clone()))
                .build()
                .unwrap()
        };
        let a = build();
        let keys: Vec<String> = (0..10_000).map(|i| format!("{affinity:?}-{i}")).collect();
        let v = a.check_batch(&keys);
        println!(
            "{affinity:?} a: new {}",
            v.iter().filter(|v| v.is_new()).count()
        );
        let v = a.check_batch(&keys);
        println!(
            "{affinity:?} a again: dup {}",
            v.iter().filter(|v| v.is_duplicate()).count()
        );
        a.flush();
        drop(a);
        let b = build();
        let v = b.check_batch(&keys);
        println!(
            "{affinity:?} b (cold): dup {} unavailable {}",
            v.iter().filter(|v| v.is_duplicate()).count(),
            v.iter().filter(|v| v.is_unavailable()).count()
        );
        let s = tier.stats();
        println!("requests {:?} failures {:?}", s.requests, s.failures);
    }
}
