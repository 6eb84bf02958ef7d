//! The JetStream adapter against a private `nats-server -js`: redeliveries
//! are deduplicated, a failed handler's message is redelivered and done
//! once, a held key is left for redelivery, conflicts go to the callback,
//! stored results replay, our window outlasts the stream's `Nats-Msg-Id`
//! window, a dead exact tier acks nothing unprocessed, and PostgreSQL
//! transactional effects are exactly once.
#![cfg(all(feature = "jetstream", feature = "postgres"))]

#[path = "support/nats_server.rs"]
mod nats_server;
#[path = "../../postgres/tests/support/pg_server.rs"]
mod pg_server;
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, stream, Context, Message};
use nats_server::NatsServer;
use tiered_dedup::consumer::{BatchConsumer, Delivery, Disposition};
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, ClaimRequest, Deduper, ExactTier, PayloadFingerprint};
use tiered_dedup_consumers::jetstream::{consumer_config, publish, JetStreamConsumer};
use tiered_dedup_consumers::transactional::TxConsumer;
use tiered_dedup_consumers::{process_blocking, Batching};

const SUBJECT: &str = "orders.new";

type Handler = dyn Fn(&Message) -> Result<Vec<u8>, String> + Send + Sync;
type OnConflict = dyn Fn(&Message) + Send + Sync;

async fn setup(
    server: &NatsServer,
    dup_window: Duration,
    ack_wait: Duration,
) -> (Context, PullConsumer) {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js
        .get_or_create_stream(stream::Config {
            name: "orders".into(),
            subjects: vec![SUBJECT.into()],
            duplicate_window: dup_window,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = stream
        .get_or_create_consumer("dedup", consumer_config("dedup", ack_wait))
        .await
        .unwrap();
    (js, consumer)
}

/// Deletes the durable consumer `setup` made, as an operator would.
async fn delete_consumer(js: &Context) {
    js.get_stream("orders")
        .await
        .unwrap()
        .delete_consumer("dedup")
        .await
        .unwrap();
}

fn json(key: &str, v: u64) -> Vec<u8> {
    format!("{{\"k\":\"{key}\",\"v\":{v}}}").into_bytes()
}

fn key_of(m: &Message) -> String {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    v["k"].as_str().unwrap().to_owned()
}

fn value_of(m: &Message) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    v["v"].as_u64().unwrap()
}

fn batching() -> Batching {
    Batching {
        max: 64,
        wait: Duration::from_millis(100),
        ..Batching::default()
    }
}

fn engine(lease: Duration) -> Arc<BatchConsumer> {
    Arc::new(BatchConsumer::new(Arc::new(
        Deduper::builder().lease_duration(lease).build().unwrap(),
    )))
}

/// Consumes until `done` says so (or `limit` passes), settling every batch
/// unless `settle` says otherwise; returns every disposition seen.
async fn drain(
    source: &mut JetStreamConsumer,
    consumer: &Arc<BatchConsumer>,
    handler: Arc<Handler>,
    on_conflict: Arc<OnConflict>,
    limit: Duration,
    mut done: impl FnMut(&[Disposition]) -> bool,
) -> Vec<Disposition> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < limit && !done(&seen) {
        let batch = source.next_batch().await.unwrap();
        let deliveries = batch
            .into_iter()
            .map(|m| Delivery::new(key_of(&m), m))
            .collect();
        let settled = process_blocking(consumer, deliveries, &handler, &on_conflict)
            .await
            .unwrap();
        seen.extend(settled.iter().map(|(_, d)| d.clone()));
        source.settle(settled).await.unwrap();
    }
    seen
}

fn recorder() -> (Arc<Mutex<Vec<String>>>, Arc<Handler>) {
    let effects = Arc::new(Mutex::new(Vec::new()));
    let e = Arc::clone(&effects);
    let handler: Arc<Handler> = Arc::new(move |m: &Message| {
        let k = key_of(m);
        e.lock().unwrap().push(k.clone());
        Ok(format!("done {k}").into_bytes())
    });
    (effects, handler)
}

fn no_conflicts() -> Arc<OnConflict> {
    Arc::new(|m: &Message| panic!("unexpected conflict: {:?}", m.payload))
}

fn counts(effects: &[String]) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for k in effects {
        *c.entry(k.clone()).or_insert(0) += 1;
    }
    c
}

#[tokio::test]
async fn smoke() {
    let server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    for (i, k) in ["a", "b", "a"].iter().enumerate() {
        publish(&js, SUBJECT, &format!("m{i}"), json(k, i as u64))
            .await
            .unwrap();
    }
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    let dedup = engine(Duration::from_secs(5));
    let (effects, handler) = recorder();
    let seen = drain(
        &mut source,
        &dedup,
        handler,
        no_conflicts(),
        Duration::from_secs(10),
        |s| s.len() >= 3,
    )
    .await;
    assert_eq!(seen.len(), 3);
    assert_eq!(*effects.lock().unwrap(), vec!["a", "b"]);
    assert_eq!(source.ack_stats().acked, 3);
    assert_eq!(dedup.stats().replayed, 1);
}

/// A batch committed but never acked (a crash after the commit) is
/// redelivered after AckWait and answers `Completed`: acked, not re-run.
#[tokio::test]
async fn a_redelivery_after_the_commit_is_not_acted_on_again() {
    let server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_millis(800)).await;
    for i in 0..20u64 {
        publish(&js, SUBJECT, &format!("m{i}"), json(&format!("k{i}"), i))
            .await
            .unwrap();
    }
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    let dedup = engine(Duration::from_millis(500));
    let (effects, handler) = recorder();
    // Process without acking: the "crash" between commit and ack.
    let mut processed = 0;
    let start = Instant::now();
    while processed < 20 && start.elapsed() < Duration::from_secs(10) {
        let batch = source.next_batch().await.unwrap();
        let deliveries = batch
            .into_iter()
            .map(|m| Delivery::new(key_of(&m), m))
            .collect();
        let settled = process_blocking(&dedup, deliveries, &handler, &no_conflicts())
            .await
            .unwrap();
        processed += settled.len();
    }
    assert_eq!(processed, 20);
    let seen = drain(
        &mut source,
        &dedup,
        handler,
        no_conflicts(),
        Duration::from_secs(15),
        |s| s.len() >= 20,
    )
    .await;
    assert!(
        seen.iter()
            .all(|d| matches!(d, Disposition::Replayed { .. })),
        "{seen:?}"
    );
    assert_eq!(effects.lock().unwrap().len(), 20, "each effect once");
}

/// A handler error releases the claim and naks: the redelivery acts, once.
#[tokio::test]
async fn a_failed_handler_is_redelivered_and_done_once() {
    let server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    for i in 0..10u64 {
        publish(&js, SUBJECT, &format!("m{i}"), json(&format!("k{i}"), i))
            .await
            .unwrap();
    }
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    let dedup = engine(Duration::from_secs(5));
    let effects = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(0));
    let (e, f) = (Arc::clone(&effects), Arc::clone(&failures));
    let handler: Arc<Handler> = Arc::new(move |m: &Message| {
        let k = key_of(m);
        let mut f = f.lock().unwrap();
        // Every even key fails on its first try.
        if value_of(m) % 2 == 0 && !e.lock().unwrap().contains(&format!("tried {k}")) {
            e.lock().unwrap().push(format!("tried {k}"));
            *f += 1;
            return Err("temporary failure".into());
        }
        e.lock().unwrap().push(k);
        Ok(Vec::new())
    });
    let seen = drain(
        &mut source,
        &dedup,
        handler,
        no_conflicts(),
        Duration::from_secs(15),
        |s| s.iter().filter(|d| d.should_ack()).count() >= 10,
    )
    .await;
    assert_eq!(*failures.lock().unwrap(), 5);
    assert_eq!(
        seen.iter().filter(|d| **d == Disposition::Failed).count(),
        5
    );
    let done: Vec<String> = effects
        .lock()
        .unwrap()
        .iter()
        .filter(|k| !k.starts_with("tried"))
        .cloned()
        .collect();
    assert_eq!(done.len(), 10);
    assert!(counts(&done).values().all(|&n| n == 1));
}

/// A stalled server (SIGSTOP, past two idle heartbeats) is a missed
/// heartbeat: an empty batch, counted, and the pull goes on: what is
/// published once the server runs again is consumed, each key once.
#[tokio::test]
async fn a_missed_heartbeat_is_an_empty_batch_and_the_pull_goes_on() {
    let server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    let mut source = JetStreamConsumer::with_heartbeat(
        &consumer,
        Batching {
            wait: Duration::from_secs(5),
            ..batching()
        },
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    server.pause();
    let stalled = tokio::time::timeout(Duration::from_secs(10), source.next_batch()).await;
    server.resume();
    let batch = stalled
        .expect("next_batch answers within its wait")
        .expect("a missed heartbeat is not an error");
    assert!(batch.is_empty());
    assert!(source.missed_heartbeats() >= 1);
    for (i, k) in ["a", "b", "a", "c"].iter().enumerate() {
        publish(&js, SUBJECT, &format!("m{i}"), json(k, i as u64))
            .await
            .unwrap();
    }
    let dedup = engine(Duration::from_secs(5));
    let (effects, handler) = recorder();
    let seen = drain(
        &mut source,
        &dedup,
        handler,
        no_conflicts(),
        Duration::from_secs(20),
        |s| s.len() >= 4,
    )
    .await;
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(*effects.lock().unwrap(), vec!["a", "b", "c"]);
    assert_eq!(source.ack_stats().acked, 4);
}

/// A pull whose consumer is deleted fails, and keeps failing, instead of
/// answering empty batches for ever (a dead pull is not an idle stream).
#[tokio::test]
async fn a_deleted_consumer_ends_the_pull_with_an_error() {
    let server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    assert!(source.next_batch().await.unwrap().is_empty());
    delete_consumer(&js).await;
    let start = Instant::now();
    let mut failed = 0;
    while failed < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the deleted consumer's pull still answers batches"
        );
        if source.next_batch().await.is_err() {
            // Ended at the first error (ConsumerDeleted), not one call later.
            assert!(source.has_ended(), "error {failed} without has_ended");
            failed += 1;
        }
    }
    assert!(
        source.next_batch().await.is_err(),
        "an ended pull stays ended"
    );
}

/// A consumer deleted while this client was disconnected (the broker
/// restarted, and another client deleted it before this one was back):
/// no `ConsumerDeleted` reaches the pull, only missed heartbeats or no
/// responder, and the pull still ends with an error instead of answering
/// empty batches for ever.
#[tokio::test]
async fn a_consumer_deleted_while_disconnected_ends_the_pull() {
    let mut server = NatsServer::start();
    let (_js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    let mut source =
        JetStreamConsumer::with_heartbeat(&consumer, batching(), Duration::from_millis(300))
            .await
            .unwrap();
    assert!(source.next_batch().await.unwrap().is_empty());
    server.stop();
    // The client's reconnection attempts fail meanwhile: its back-off grows.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start_again();
    let admin = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    delete_consumer(&admin).await;
    let start = Instant::now();
    while !source.has_ended() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the pull of a consumer deleted while disconnected has not ended \
             ({} missed heartbeats)",
            source.missed_heartbeats()
        );
        let _ = source.next_batch().await;
    }
    assert!(
        source.next_batch().await.is_err(),
        "an ended pull stays ended"
    );
}

/// A broker killed and restarted mid-stream (same port and store): the
/// pull goes on once the client has reconnected, and what was published
/// before and after is each done once.
#[tokio::test]
async fn the_pull_goes_on_after_the_broker_restarts() {
    let mut server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    for (i, k) in ["a", "b"].iter().enumerate() {
        publish(&js, SUBJECT, &format!("m{i}"), json(k, i as u64))
            .await
            .unwrap();
    }
    let mut source =
        JetStreamConsumer::with_heartbeat(&consumer, batching(), Duration::from_millis(500))
            .await
            .unwrap();
    let dedup = engine(Duration::from_secs(5));
    let (effects, handler) = recorder();
    drain(
        &mut source,
        &dedup,
        Arc::clone(&handler),
        no_conflicts(),
        Duration::from_secs(10),
        |s| s.len() >= 2,
    )
    .await;
    server.restart();
    let start = Instant::now();
    let mut published = 0;
    while published < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "republish after the restart"
        );
        let k = ["c", "a", "d"][published];
        match publish(&js, SUBJECT, &format!("n{published}"), json(k, 9)).await {
            Ok(_) => published += 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let start = Instant::now();
    while effects.lock().unwrap().len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "after the restart: {:?}, ended {}",
            effects.lock().unwrap(),
            source.has_ended()
        );
        let batch: Vec<Message> = source.next_batch().await.unwrap_or_default();
        let deliveries = batch
            .into_iter()
            .map(|m| Delivery::new(key_of(&m), m))
            .collect();
        let settled = process_blocking(&dedup, deliveries, &handler, &no_conflicts())
            .await
            .unwrap();
        source.settle(settled).await.unwrap();
    }
    let mut done = effects.lock().unwrap().clone();
    done.sort();
    assert_eq!(done, vec!["a", "b", "c", "d"]);
}

/// A key held by another consumer's lease is `InProgress`: nakked with the
/// lease's remaining time, redelivered, and processed once the holder let go.
#[tokio::test]
async fn a_held_key_is_left_for_redelivery() {
    let server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    let dedup = engine(Duration::from_secs(5));
    let lease = dedup
        .engine()
        .claim_owned(ClaimRequest::new("held").lease(Duration::from_millis(700)))
        .into_lease()
        .unwrap();
    publish(&js, SUBJECT, "m0", json("held", 0)).await.unwrap();
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    let (effects, handler) = recorder();
    let start = Instant::now();
    let seen = drain(
        &mut source,
        &dedup,
        handler,
        no_conflicts(),
        Duration::from_secs(10),
        |s| s.iter().any(|d| d.should_ack()),
    )
    .await;
    assert!(
        matches!(seen[0], Disposition::InProgress { .. }),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&Disposition::Processed));
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "redelivered after the lease"
    );
    assert_eq!(*effects.lock().unwrap(), vec!["held"]);
    assert!(
        lease.commit(b"late").unwrap_err().is_lease_lost(),
        "fenced out"
    );
}

/// The same key with another payload fingerprint goes to the callback
/// (dead letter) and is acked; the first's stored result replays.
#[tokio::test]
async fn conflicts_go_to_the_callback_and_results_replay() {
    let server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    publish(&js, SUBJECT, "m0", json("pay", 100)).await.unwrap();
    publish(&js, SUBJECT, "m1", json("pay", 100)).await.unwrap();
    publish(&js, SUBJECT, "m2", json("pay", 999)).await.unwrap();
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    let dedup = engine(Duration::from_secs(5));
    let (effects, handler) = recorder();
    let dead = Arc::new(Mutex::new(Vec::new()));
    let d = Arc::clone(&dead);
    let on_conflict: Arc<OnConflict> =
        Arc::new(move |m: &Message| d.lock().unwrap().push(value_of(m)));
    let mut seen = Vec::new();
    let start = Instant::now();
    while seen.len() < 3 && start.elapsed() < Duration::from_secs(10) {
        let batch = source.next_batch().await.unwrap();
        let deliveries = batch
            .into_iter()
            .map(|m| {
                let fp = PayloadFingerprint(value_of(&m));
                Delivery::new(key_of(&m), m).payload(fp)
            })
            .collect();
        let settled = process_blocking(&dedup, deliveries, &handler, &on_conflict)
            .await
            .unwrap();
        seen.extend(settled.iter().map(|(_, d)| d.clone()));
        source.settle(settled).await.unwrap();
    }
    assert_eq!(seen[0], Disposition::Processed);
    assert_eq!(
        seen[1],
        Disposition::Replayed {
            result: Arc::from(&b"done pay"[..])
        }
    );
    assert_eq!(seen[2], Disposition::Conflict);
    assert_eq!(*dead.lock().unwrap(), vec![999]);
    assert_eq!(effects.lock().unwrap().len(), 1);
    assert_eq!(source.ack_stats().acked, 3);
}

/// `Nats-Msg-Id` drops a re-publish within the stream's window only; the
/// engine's window (an hour here) catches the repeat after it, and a
/// repeat of the business key under a new message id.
#[tokio::test]
async fn our_window_outlasts_the_streams_duplicate_window() {
    let server = NatsServer::start();
    let (js, consumer) = setup(&server, Duration::from_millis(500), Duration::from_secs(5)).await;
    assert!(!publish(&js, SUBJECT, "m0", json("a", 0)).await.unwrap());
    assert!(
        publish(&js, SUBJECT, "m0", json("a", 0)).await.unwrap(),
        "dropped by the stream"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !publish(&js, SUBJECT, "m0", json("a", 0)).await.unwrap(),
        "past the stream's window"
    );
    assert!(
        !publish(&js, SUBJECT, "m1", json("a", 1)).await.unwrap(),
        "a new message id"
    );
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    let dedup = engine(Duration::from_secs(5));
    let (effects, handler) = recorder();
    let seen = drain(
        &mut source,
        &dedup,
        handler,
        no_conflicts(),
        Duration::from_secs(10),
        |s| s.len() >= 3,
    )
    .await;
    assert_eq!(seen.len(), 3, "the stream kept three");
    assert_eq!(
        seen.iter()
            .filter(|d| matches!(d, Disposition::Replayed { .. }))
            .count(),
        2
    );
    assert_eq!(*effects.lock().unwrap(), vec!["a"]);
}

/// The Redis exact tier killed mid-stream (fail closed): `Unavailable`,
/// nakked, nothing acked that was not processed; once Redis is back every
/// message is processed.
#[tokio::test]
async fn a_dead_exact_tier_acks_nothing_unprocessed() {
    let server = NatsServer::start();
    let mut redis = redis_server::RedisServer::start();
    let (js, consumer) = setup(&server, Duration::from_secs(60), Duration::from_secs(5)).await;
    let tier = RedisTier::new(RedisConfig::new(&redis.url()));
    let dedup = Arc::new(BatchConsumer::new(Arc::new(
        Deduper::builder()
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .affinity(Affinity::Shared)
            .shards(1)
            .build()
            .unwrap(),
    )));
    for i in 0..50u64 {
        publish(&js, SUBJECT, &format!("m{i}"), json(&format!("k{i}"), i))
            .await
            .unwrap();
    }
    let mut source = JetStreamConsumer::new(
        &consumer,
        Batching {
            max: 10,
            ..batching()
        },
    )
    .await
    .unwrap();
    let (effects, handler) = recorder();
    let acked_keys = Arc::new(Mutex::new(Vec::new()));
    let mut batches = 0;
    let start = Instant::now();
    let mut unavailable = 0;
    while acked_keys.lock().unwrap().len() < 50 && start.elapsed() < Duration::from_secs(30) {
        if batches == 2 {
            redis.kill();
        }
        if batches == 6 {
            redis.restart();
        }
        batches += 1;
        let batch = source.next_batch().await.unwrap();
        let deliveries = batch
            .into_iter()
            .map(|m| Delivery::new(key_of(&m), m))
            .collect();
        let settled = process_blocking(&dedup, deliveries, &handler, &no_conflicts())
            .await
            .unwrap();
        for (m, d) in &settled {
            if d.should_ack() {
                acked_keys.lock().unwrap().push(key_of(m));
            }
            if *d == Disposition::Unavailable {
                unavailable += 1;
            }
        }
        source.settle(settled).await.unwrap();
    }
    assert!(unavailable > 0, "the tier was down for some batches");
    let done = effects.lock().unwrap().clone();
    for k in acked_keys.lock().unwrap().iter() {
        assert!(done.contains(k), "{k} acked without its effect");
    }
    assert_eq!(
        counts(&done).len(),
        50,
        "every message processed once Redis was back"
    );
}

/// Effects in the claim's PostgreSQL transaction: a batch committed but not
/// acked is redelivered and replayed; every key's effect row exactly once.
#[test]
fn transactional_effects_are_exactly_once() {
    // The PostgreSQL client is synchronous: set it up outside the runtime.
    let server = NatsServer::start();
    let pg = pg_server::PgServer::start();
    let mut c = pg.client();
    c.batch_execute("CREATE TABLE effects (key text NOT NULL)")
        .unwrap();
    let claims =
        tiered_dedup_postgres::PgClaims::builder(tiered_dedup_postgres::PgConfig::new(&pg.url()))
            .build()
            .unwrap();
    let tx = TxConsumer::new(claims, pg.client());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tx = runtime.block_on(transactional_run(&server, tx));
    let rows: Vec<(String, i64)> = c
        .query("SELECT key, count(*) FROM effects GROUP BY key", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 150, "none missing");
    assert!(rows.iter().all(|(_, n)| *n == 1), "none twice");
    assert_eq!(tx.stats().processed, 150);
}

async fn transactional_run(server: &NatsServer, tx: TxConsumer) -> TxConsumer {
    let (js, consumer) = setup(server, Duration::from_secs(60), Duration::from_millis(800)).await;
    for i in 0..200u64 {
        publish(
            &js,
            SUBJECT,
            &format!("m{i}"),
            json(&format!("k{}", i % 150), i),
        )
        .await
        .unwrap();
    }
    let mut tx = Some(tx);
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    let mut settled_count = 0;
    let mut round = 0;
    let start = Instant::now();
    while settled_count < 200 && start.elapsed() < Duration::from_secs(20) {
        round += 1;
        let batch = source.next_batch().await.unwrap();
        let deliveries: Vec<_> = batch
            .into_iter()
            .map(|m| Delivery::new(key_of(&m), m))
            .collect();
        let mut t = tx.take().unwrap();
        let (t, out) = tokio::task::spawn_blocking(move || {
            let out = t.process(
                deliveries,
                |tx, m: &Message| {
                    tx.execute("INSERT INTO effects VALUES ($1)", &[&key_of(m)])
                        .map(|_| Vec::new())
                },
                |_| panic!("no conflicts"),
            );
            (t, out)
        })
        .await
        .unwrap();
        tx = Some(t);
        let out = out.unwrap();
        // The first batch is committed but never acked: redelivered later.
        if round == 1 {
            continue;
        }
        settled_count += out.iter().filter(|(_, d)| d.should_ack()).count();
        source.settle(out).await.unwrap();
    }
    assert_eq!(settled_count, 200);
    tx.unwrap()
}
