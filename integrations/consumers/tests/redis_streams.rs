//! The Redis Streams adapter against a private `redis-server`: repeats are
//! deduplicated, a failed handler's entry stays pending and is reclaimed
//! and done once, entries a dead consumer left pending are taken over with
//! `XAUTOCLAIM` (replayed when it had committed), bad entries are counted.
#![cfg(feature = "redis-streams")]

#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use tiered_dedup::consumer::{BatchConsumer, Delivery, Disposition};
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Deduper, ExactTier};
use tiered_dedup_consumers::redis_streams::{publish, RedisStreamConsumer, StreamEntry};
use tiered_dedup_consumers::{
    flush_blocking, process_blocking, process_pipelined_blocking, Batching,
};

type Handler = dyn Fn(&StreamEntry) -> Result<Vec<u8>, String> + Send + Sync;
type OnConflict = dyn Fn(&StreamEntry) + Send + Sync;

fn key_of(e: &StreamEntry) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(e.field("data")?).ok()?;
    Some(v.get("k")?.as_str()?.to_owned())
}

async fn member(server: &RedisServer, name: &str) -> RedisStreamConsumer {
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let batching = Batching {
        max: 64,
        wait: Duration::from_millis(50),
        ..Batching::default()
    };
    RedisStreamConsumer::new(
        conn,
        "orders",
        "dedup",
        name,
        batching,
        Duration::from_millis(300),
    )
    .await
    .unwrap()
}

async fn publish_keys(server: &RedisServer, keys: &[&str]) {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for k in keys {
        let data = format!("{{\"k\":\"{k}\"}}");
        publish(&mut conn, "orders", &[("data", data.as_bytes())])
            .await
            .unwrap();
    }
}

fn shared_engine(server: &RedisServer) -> Arc<BatchConsumer> {
    shared_engine_leasing(server, Duration::from_millis(250))
}

fn shared_engine_leasing(server: &RedisServer, lease: Duration) -> Arc<BatchConsumer> {
    let tier = RedisTier::new(RedisConfig::new(&server.url()));
    Arc::new(BatchConsumer::new(Arc::new(
        Deduper::builder()
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .affinity(Affinity::Shared)
            .shards(1)
            .lease_duration(lease)
            .build()
            .unwrap(),
    )))
}

fn recorder() -> (Arc<Mutex<Vec<String>>>, Arc<Handler>) {
    let effects = Arc::new(Mutex::new(Vec::new()));
    let e = Arc::clone(&effects);
    let handler: Arc<Handler> = Arc::new(move |m: &StreamEntry| {
        e.lock().unwrap().push(key_of(m).unwrap());
        Ok(Vec::new())
    });
    (effects, handler)
}

/// One batch: bad entries acked as rejected, the rest processed and settled
/// (unless `ack` is false: a crash after the commit).
async fn step(
    source: &mut RedisStreamConsumer,
    dedup: &Arc<BatchConsumer>,
    handler: &Arc<Handler>,
    ack: bool,
) -> (Vec<Disposition>, usize) {
    let batch = source.next_batch().await.unwrap();
    let (good, bad): (Vec<_>, Vec<_>) = batch.into_iter().partition(|e| key_of(e).is_some());
    let deliveries = good
        .into_iter()
        .map(|e| Delivery::new(key_of(&e).unwrap(), e))
        .collect();
    let none: Arc<OnConflict> = Arc::new(|_| panic!("no conflicts"));
    let settled = process_blocking(dedup, deliveries, handler, &none)
        .await
        .unwrap();
    let seen = settled.iter().map(|(_, d)| d.clone()).collect();
    if ack {
        source
            .settle(settled.iter().map(|(e, d)| (e, d)), &bad)
            .await
            .unwrap();
    }
    (seen, bad.len())
}

#[tokio::test]
async fn smoke() {
    let server = RedisServer::start();
    let mut source = member(&server, "c1").await;
    publish_keys(&server, &["a", "b", "a"]).await;
    let dedup = shared_engine(&server);
    let (effects, handler) = recorder();
    let (seen, _) = step(&mut source, &dedup, &handler, true).await;
    assert_eq!(seen.len(), 3);
    assert_eq!(*effects.lock().unwrap(), vec!["a", "b"]);
    assert_eq!(source.acked(), 3);
}

/// Entries a dead consumer left pending: those it committed are replayed,
/// those it only claimed are acted on once its lease expired; none lost.
#[tokio::test]
async fn a_dead_consumers_pending_entries_are_reclaimed() {
    let server = RedisServer::start();
    let mut dead = member(&server, "dead").await;
    let mut live = member(&server, "live").await;
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    publish_keys(
        &server,
        &keys.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let dedup_dead = shared_engine(&server);
    let dedup_live = shared_engine(&server);
    let (effects, handler) = recorder();
    // The dead one committed its batch but never acked.
    let (seen, _) = step(&mut dead, &dedup_dead, &handler, false).await;
    assert_eq!(seen.len(), 40);
    let start = Instant::now();
    let mut replayed = 0;
    while live.acked() < 40 && start.elapsed() < Duration::from_secs(10) {
        let (seen, _) = step(&mut live, &dedup_live, &handler, true).await;
        replayed += seen
            .iter()
            .filter(|d| matches!(d, Disposition::Replayed { .. }))
            .count();
    }
    assert_eq!(live.acked(), 40);
    assert!(live.reclaimed() >= 40, "taken over with XAUTOCLAIM");
    assert_eq!(replayed, 40, "not acted on again");
    assert_eq!(effects.lock().unwrap().len(), 40);
}

/// A failed handler releases the key; the entry stays pending, is reclaimed
/// after the idle time, and is done once. Bad entries are acked, counted.
#[tokio::test]
async fn a_failed_handler_is_reclaimed_and_done_once_and_bad_entries_are_counted() {
    let server = RedisServer::start();
    let mut source = member(&server, "c1").await;
    publish_keys(&server, &["x", "y"]).await;
    {
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        publish(&mut conn, "orders", &[("data", b"not json")])
            .await
            .unwrap();
    }
    let dedup = shared_engine(&server);
    let effects = Arc::new(Mutex::new(Vec::new()));
    let e = Arc::clone(&effects);
    let handler: Arc<Handler> = Arc::new(move |m: &StreamEntry| {
        let k = key_of(m).unwrap();
        let mut e = e.lock().unwrap();
        if k == "x" && !e.contains(&"tried x".to_owned()) {
            e.push("tried x".into());
            return Err("temporary".into());
        }
        e.push(k);
        Ok(Vec::new())
    });
    let mut bad = 0;
    let mut failed = 0;
    let start = Instant::now();
    while source.acked() < 3 && start.elapsed() < Duration::from_secs(10) {
        let (seen, b) = step(&mut source, &dedup, &handler, true).await;
        bad += b;
        failed += seen.iter().filter(|d| **d == Disposition::Failed).count();
    }
    assert_eq!((bad, failed, source.acked()), (1, 1, 3));
    assert_eq!(*effects.lock().unwrap(), vec!["tried x", "y", "x"]);
}

/// An idle stream: a blocking read longer than the client's default
/// response timeout (500 ms) answers an empty batch, not an error.
#[tokio::test]
async fn an_idle_stream_answers_an_empty_batch_after_the_wait() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let batching = Batching {
        wait: Duration::from_millis(900),
        ..Batching::default()
    };
    let mut source = RedisStreamConsumer::new(
        conn,
        "idle",
        "dedup",
        "c1",
        batching,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let start = std::time::Instant::now();
    let batch = source
        .next_batch()
        .await
        .expect("an empty batch, not an error");
    assert!(batch.is_empty());
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
}

/// The exact tier (a second Redis, the claims') killed mid-stream, fail
/// closed: its batches answer `Unavailable` and stay pending, nothing is
/// acked that was not processed; once it is back the pending entries are
/// reclaimed and every message is processed, once.
#[tokio::test]
async fn a_dead_exact_tier_acks_nothing_unprocessed() {
    let broker = RedisServer::start();
    let mut claims = RedisServer::start();
    let mut source = member(&broker, "c1").await;
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    publish_keys(&broker, &refs).await;
    let tier = RedisTier::new(RedisConfig {
        timeout: Duration::from_millis(500),
        ..RedisConfig::new(&claims.url())
    });
    let dedup = Arc::new(BatchConsumer::new(Arc::new(
        Deduper::builder()
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .affinity(Affinity::Shared)
            .shards(1)
            .lease_duration(Duration::from_secs(30))
            .build()
            .unwrap(),
    )));
    let (effects, handler) = recorder();
    let none: Arc<OnConflict> = Arc::new(|_| panic!("no conflicts"));
    let mut acked: Vec<String> = Vec::new();
    let mut unavailable = 0;
    let mut batches = 0;
    let start = Instant::now();
    while acked.len() < keys.len() && start.elapsed() < Duration::from_secs(60) {
        if batches == 1 {
            claims.kill();
        }
        if batches == 4 {
            claims.restart();
        }
        batches += 1;
        let batch = source.next_batch().await.unwrap();
        let deliveries = batch
            .into_iter()
            .map(|e| Delivery::new(key_of(&e).unwrap(), e))
            .collect();
        let settled = process_blocking(&dedup, deliveries, &handler, &none)
            .await
            .unwrap();
        for (e, d) in &settled {
            if d.should_ack() {
                acked.push(key_of(e).unwrap());
            }
            if *d == Disposition::Unavailable {
                unavailable += 1;
            }
        }
        source
            .settle(settled.iter().map(|(e, d)| (e, d)), std::iter::empty())
            .await
            .unwrap();
    }
    eprintln!(
        "{batches} batches, {unavailable} unavailable, {} acked in {:?}",
        acked.len(),
        start.elapsed()
    );
    assert!(unavailable > 0, "the tier was down for some batches");
    let done = effects.lock().unwrap().clone();
    for k in &acked {
        assert!(done.contains(k), "{k} acked without its effect");
    }
    let mut distinct = done.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        keys.len(),
        "every message processed once the tier was back"
    );
    assert_eq!(done.len(), keys.len(), "none processed twice");
    assert_eq!(
        source.acked(),
        keys.len() as u64,
        "every entry acked in the end"
    );
}

/// Consumes through `source` (errors while the broker is away tolerated)
/// until `done` keys have effects, or fails after 30 s.
async fn consume_until(
    source: &mut RedisStreamConsumer,
    dedup: &Arc<BatchConsumer>,
    handler: &Arc<Handler>,
    effects: &Mutex<Vec<String>>,
    done: usize,
) {
    let none: Arc<OnConflict> = Arc::new(|_| panic!("no conflicts"));
    let start = Instant::now();
    while effects.lock().unwrap().len() < done {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} of {done} effects, {} repairs",
            effects.lock().unwrap().len(),
            source.repairs()
        );
        let Ok(batch) = source.next_batch().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let deliveries = batch
            .into_iter()
            .map(|e| Delivery::new(key_of(&e).unwrap(), e))
            .collect();
        let settled = process_blocking(dedup, deliveries, handler, &none)
            .await
            .unwrap();
        let _ = source
            .settle(settled.iter().map(|(e, d)| (e, d)), std::iter::empty())
            .await;
    }
}

/// Claims on the memory tier: repeats across a broker restart are caught
/// in this process.
fn memory_engine() -> Arc<BatchConsumer> {
    Arc::new(BatchConsumer::new(Arc::new(
        Deduper::builder().build().unwrap(),
    )))
}

/// A consumer that reconnects through its client.
async fn reconnecting_member(server: &RedisServer) -> RedisStreamConsumer {
    let client = redis::Client::open(server.url()).unwrap();
    member(server, "c1").await.reconnect_with(client)
}

fn keys(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("k{i}")).collect()
}

/// The broker killed and restarted (with its append-only file): the
/// consumer reconnects, and what was published before and after is done
/// once each — a repeat published after the restart too.
#[tokio::test]
async fn the_consumer_reconnects_after_the_broker_restarts() {
    let mut broker = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut source = reconnecting_member(&broker).await;
    let dedup = memory_engine();
    let (effects, handler) = recorder();
    let before = keys(0..10);
    publish_keys(
        &broker,
        &before.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    consume_until(&mut source, &dedup, &handler, &effects, 10).await;
    broker.restart();
    let mut after = keys(10..20);
    after.push("k3".to_owned());
    publish_keys(
        &broker,
        &after.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    consume_until(&mut source, &dedup, &handler, &effects, 20).await;
    assert!(source.repairs() >= 1, "reconnected");
    let mut done = effects.lock().unwrap().clone();
    done.sort();
    let mut want = keys(0..20);
    want.sort();
    assert_eq!(done, want, "each key once");
}

/// A broker restarted without persistence has lost the stream and the
/// group: the consumer creates the group again and reads what comes next.
#[tokio::test]
async fn a_lost_group_is_created_again() {
    let mut broker = RedisServer::start();
    let mut source = reconnecting_member(&broker).await;
    let dedup = memory_engine();
    let (effects, handler) = recorder();
    publish_keys(&broker, &["a", "b"]).await;
    consume_until(&mut source, &dedup, &handler, &effects, 2).await;
    broker.restart();
    publish_keys(&broker, &["c", "a", "d"]).await;
    consume_until(&mut source, &dedup, &handler, &effects, 4).await;
    assert!(
        source.repairs() >= 1,
        "reconnected and re-created the group"
    );
    assert_eq!(*effects.lock().unwrap(), vec!["a", "b", "c", "d"]);
}

/// A broker that stops answering without closing the socket (SIGSTOP: a
/// half-open connection, as a vanished host leaves): after three timeouts
/// in a row the consumer reconnects, and consumption goes on once the
/// broker answers again.
#[tokio::test]
async fn a_connection_that_only_times_out_is_replaced() {
    let broker = RedisServer::start();
    let mut source = reconnecting_member(&broker).await;
    let dedup = memory_engine();
    let (effects, handler) = recorder();
    publish_keys(&broker, &["a"]).await;
    consume_until(&mut source, &dedup, &handler, &effects, 1).await;
    broker.pause();
    let mut failures = 0;
    while failures < 3 {
        if source.next_batch().await.is_err() {
            failures += 1;
        }
    }
    broker.resume();
    publish_keys(&broker, &["b", "a", "c"]).await;
    consume_until(&mut source, &dedup, &handler, &effects, 3).await;
    assert!(
        source.repairs() >= 1,
        "the timing-out connection was replaced"
    );
    // A read abandoned by its timeout may still be served once the broker
    // runs again: that entry waits in the pending list and is reclaimed
    // (so the order may change), never lost nor done twice.
    let mut done = effects.lock().unwrap().clone();
    done.sort();
    assert_eq!(done, vec!["a", "b", "c"]);
}

/// Pipelined (`process_pipelined_blocking`): each batch's commits go to
/// Redis with the next batch's claims, one transaction per batch instead
/// of two; a short read flushes what is held. Every key acted on once,
/// every entry acked, nothing left pending.
#[tokio::test]
async fn a_pipelined_consumer_sends_one_request_per_batch_and_acts_once() {
    let server = RedisServer::start();
    let mut source = member(&server, "c1").await;
    // 600 entries: every third repeats a key one to several batches back.
    let keys: Vec<String> = (0..600)
        .map(|i| {
            if i % 3 == 2 {
                format!("k{}", i / 3)
            } else {
                format!("k{i}")
            }
        })
        .collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    publish_keys(&server, &refs).await;
    let dedup = shared_engine_leasing(&server, Duration::from_secs(30));
    let (effects, handler) = recorder();
    let none: Arc<OnConflict> = Arc::new(|_| panic!("no conflicts"));
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    let mut held = tiered_dedup::consumer::Held::new();
    let (mut batches, mut flushes) = (0, 0);
    let start = Instant::now();
    while source.acked() < 600 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} of 600 acked",
            source.acked()
        );
        let batch = source.next_batch().await.unwrap();
        let short = batch.len() < 64;
        if !batch.is_empty() {
            batches += 1;
        }
        let deliveries = batch
            .into_iter()
            .map(|e| Delivery::new(key_of(&e).unwrap(), e))
            .collect();
        let (mut settled, rest) =
            process_pipelined_blocking(&dedup, held, deliveries, &handler, &none)
                .await
                .unwrap();
        held = rest;
        if short && !held.is_empty() {
            flushes += 1;
            settled.extend(
                flush_blocking(&dedup, std::mem::take(&mut held))
                    .await
                    .unwrap(),
            );
        }
        assert!(settled.iter().all(|(_, d)| d.should_ack()));
        source
            .settle(settled.iter().map(|(e, d)| (e, d)), std::iter::empty())
            .await
            .unwrap();
    }
    let mut distinct = keys.clone();
    distinct.sort();
    distinct.dedup();
    let mut done = effects.lock().unwrap().clone();
    done.sort();
    assert_eq!(done, distinct, "each key acted on once");
    let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg("orders")
        .arg("dedup")
        .query(&mut admin)
        .unwrap();
    assert_eq!(pending.0, 0, "nothing left pending");
    // One transaction per batch (its claims and the last batch's commits)
    // and one per flush; one batch at a time would take two per batch.
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut admin)
        .unwrap();
    let execs: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_exec:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("EXEC counted");
    assert!(
        execs <= batches + flushes + 1,
        "{execs} transactions for {batches} batches and {flushes} flushes"
    );
    assert!(batches >= 9, "{batches} batches of at most 64");
}
