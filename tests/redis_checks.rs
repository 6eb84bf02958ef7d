//! Servers that would lose accepted keys, against private `redis-server`s:
//! one whose `maxmemory-policy` evicts keys, and a replica (started with
//! `--replicaof` a private master). `RedisTier::check` (the host's start-up
//! check) and every connection a partition opens refuse them by default,
//! with a message naming the setting and what to change; under
//! `UnsafeServer::Warn` the tier runs on them and counts it. A server whose
//! `CONFIG` is disabled is not refused: the tier says it could not check.
#![cfg(feature = "redis")]

#[path = "support/redis_cluster.rs"]
mod redis_cluster;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis_server::RedisServer;
use tiered_dedup::exact::redis::{FailurePolicy, RedisConfig, RedisStats, RedisTier, UnsafeServer};
use tiered_dedup::{Clock, Deduper, ExactTier, FailureCause, ManualClock, Timestamp};

fn tier(url: &str, rule: UnsafeServer) -> RedisTier {
    RedisTier::new(RedisConfig {
        timeout: Duration::from_millis(500),
        policy: FailurePolicy::FailClosed,
        unsafe_server: rule,
        ..RedisConfig::new(url)
    })
}

fn engine(tier: RedisTier) -> (Deduper, Arc<RedisStats>) {
    let stats = tier.stats();
    let d = Deduper::builder()
        .window(Duration::from_secs(60))
        .expected_keys(10_000)
        .shards(2)
        .clock(Clock::Manual(ManualClock::new(Timestamp::from_secs(1_000))))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    (d, stats)
}

/// A fresh engine on a server the rule refuses: its keys (which need
/// Redis: the filter is cold) are refused (fail closed), and the tier's
/// last error says why.
fn assert_engine_refused(url: &str, what: &str) {
    let (d, stats) = engine(tier(url, UnsafeServer::Refuse));
    assert!(d.check("k").is_unavailable());
    let e = stats.last_error().expect("the refusal is remembered");
    assert_eq!(e.cause(), Some(FailureCause::UnsafeServer), "{e}");
    assert!(e.to_string().contains(what), "{e}");
}

#[test]
fn smoke() {
    let server = RedisServer::start();
    let info = tier(&server.url(), UnsafeServer::Refuse)
        .check()
        .expect("a master that never evicts");
    assert_eq!(info.nodes.len(), 1);
    let node = &info.nodes[0];
    assert_eq!(node.address, server.url());
    assert_eq!(node.maxmemory_policy.as_deref(), Some("noeviction"));
    assert_eq!(node.role.as_deref(), Some("master"));
    assert!(info.problems().is_empty() && info.unchecked().is_empty());
}

/// A server without an append-only file (the test servers run with
/// `--appendonly no --save ""`) is a warning, counted, never a refusal;
/// one with it is not.
#[test]
fn a_server_without_an_append_only_file_is_a_warning() {
    let volatile = RedisServer::start();
    let t = tier(&volatile.url(), UnsafeServer::Refuse);
    let stats = t.stats();
    let info = t.check().expect("a warning, not a refusal");
    assert_eq!(info.nodes[0].appendonly, Some(false));
    assert_eq!(info.nodes[0].save.as_deref(), Some(""));
    let warnings = info.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("keeps nothing on disk") && warnings[0].contains("appendonly yes"),
        "{warnings:?}"
    );
    assert_eq!(stats.server_volatile.load(Ordering::Relaxed), 1);
    let durable = RedisServer::start_with(&["--appendonly", "yes"]);
    let t = tier(&durable.url(), UnsafeServer::Refuse);
    let info = t.check().unwrap();
    assert_eq!(info.nodes[0].appendonly, Some(true));
    assert!(info.warnings().is_empty(), "{:?}", info.warnings());
    assert_eq!(t.stats().server_volatile.load(Ordering::Relaxed), 0);
}

#[test]
fn an_evicting_server_is_refused() {
    for policy in ["allkeys-lru", "volatile-ttl"] {
        let server = RedisServer::start_with(&["--maxmemory-policy", policy]);
        let e = tier(&server.url(), UnsafeServer::Refuse)
            .check()
            .expect_err("keys would be evicted");
        assert_eq!(e.cause(), Some(FailureCause::UnsafeServer), "{e}");
        let said = e.to_string();
        for needed in [
            &server.url(),
            policy,
            "maxmemory-policy noeviction",
            "UnsafeServer::Warn",
        ] {
            assert!(said.contains(needed), "{needed:?} not in: {said}");
        }
        assert_engine_refused(&server.url(), policy);
    }
}

#[test]
fn a_replica_is_refused() {
    let master = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let e = tier(&replica.url(), UnsafeServer::Refuse)
        .check()
        .expect_err("a replica is read-only");
    assert_eq!(e.cause(), Some(FailureCause::UnsafeServer), "{e}");
    assert!(e.to_string().contains("is a replica"), "{e}");
    assert_engine_refused(&replica.url(), "is a replica");
    // Its master is fine.
    tier(&master.url(), UnsafeServer::Refuse)
        .check()
        .expect("the master");
}

/// Under `UnsafeServer::Warn` the tier runs on an evicting server, and
/// counts every connection it made there.
#[test]
fn warn_runs_on_an_evicting_server_and_counts_it() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let t = tier(&server.url(), UnsafeServer::Warn);
    let info = t.check().expect("allowed with a warning");
    assert_eq!(info.problems().len(), 1, "{info:?}");
    let (d, stats) = engine(t);
    assert!(stats.server_warnings.load(Ordering::Relaxed) >= 1);
    assert!(d.check("k").is_new());
    d.flush().expect("stored");
    assert!(d.check("k").is_duplicate());
    // The check, and each partition's connections: two shards, lookups
    // and marks.
    assert!(
        stats.server_warnings.load(Ordering::Relaxed) >= 3,
        "{}",
        stats.server_warnings.load(Ordering::Relaxed)
    );
    assert_eq!(stats.last_error(), None);
}

/// Under `UnsafeServer::Warn` a replica is used, and refuses writes:
/// `READONLY`, and the error says so.
#[test]
fn a_replica_used_anyway_is_read_only() {
    let master = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let (d, stats) = engine(tier(&replica.url(), UnsafeServer::Warn));
    assert!(
        d.check("k").is_unavailable(),
        "its layout cannot be written"
    );
    let e = stats.last_error().expect("remembered");
    assert_eq!(e.cause(), Some(FailureCause::ReadOnly), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
}

/// `CONFIG` renamed away (as managed services do): the tier cannot check
/// the eviction policy, says so, and runs.
#[test]
fn a_server_without_config_is_run_but_not_checked() {
    let server = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let t = tier(&server.url(), UnsafeServer::Refuse);
    let info = t.check().expect("not refused for what it cannot check");
    assert_eq!(info.nodes[0].maxmemory_policy, None);
    assert_eq!(info.nodes[0].role.as_deref(), Some("master"));
    let unchecked = info.unchecked();
    assert_eq!(unchecked.len(), 1, "{unchecked:?}");
    assert!(unchecked[0].contains("could not check maxmemory-policy"));
    let (d, stats) = engine(t);
    assert!(d.check("k").is_new());
    d.flush().expect("stored");
    assert!(stats.server_unchecked.load(Ordering::Relaxed) >= 2);
}

/// On a Cluster every master is asked: three masters without an
/// append-only file are three warnings; with it, none.
#[test]
fn every_cluster_master_is_checked_for_its_append_only_file() {
    for (extra, warned) in [(&[][..], 3), (&["--appendonly", "yes"][..], 0)] {
        let cluster = redis_cluster::RedisCluster::start_with(3, extra);
        let urls = cluster.urls();
        let seeds: Vec<&str> = urls.iter().map(String::as_str).collect();
        let info = RedisTier::new(RedisConfig::cluster(&seeds))
            .check()
            .unwrap();
        assert_eq!(info.nodes.len(), 3, "{info:?}");
        assert!(info
            .nodes
            .iter()
            .all(|n| n.maxmemory_policy.as_deref() == Some("noeviction")));
        assert_eq!(
            info.warnings().len(),
            warned,
            "{extra:?}: {:?}",
            info.warnings()
        );
    }
}
