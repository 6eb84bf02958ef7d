//! The layer on the Redis tier: a private `redis-server` per test on a free
//! loopback port (never a server the test did not start), real sockets.

#[path = "support/app.rs"]
mod app;
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use app::{eventually, pay, send, start};
use redis_server::RedisServer;
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Deduper, ExactTier};
use tiered_dedup_http::{IdempotencyLayer, OnUnavailable, Outcome};

const LIMIT: Duration = Duration::from_secs(90);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test over its time limit")
}

/// An engine on `server` (one per app instance, as separate processes
/// would have).
fn engine(server: &RedisServer, affinity: Affinity) -> Arc<Deduper> {
    let tier = RedisTier::new(RedisConfig::new(&server.url()));
    Arc::new(
        Deduper::builder()
            .namespace("http-tests")
            .window(Duration::from_secs(3600))
            .expected_keys(10_000)
            .shards(2)
            .affinity(affinity)
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    bounded(async {
        let server = RedisServer::start();
        let layer = IdempotencyLayer::new(engine(&server, Affinity::Owned));
        assert!(!layer.is_direct(), "a remote tier goes through the batcher");
        let app = start(layer).await;
        let first = pay(app.addr, "redis-1", 5, &[]).await;
        assert_eq!(first.status, 201);
        assert_eq!(app.executed(), 1);
    })
    .await;
}

/// Two app instances on one Redis, keys shared (no affinity between
/// replicas): 40 concurrent requests with one key, spread over both, run
/// the handler once; both then replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_run_a_key_once() {
    bounded(async {
        let server = RedisServer::start();
        let a = start(IdempotencyLayer::new(engine(&server, Affinity::Shared))).await;
        let b = start(IdempotencyLayer::new(engine(&server, Affinity::Shared))).await;
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let addr = if i % 2 == 0 { a.addr } else { b.addr };
                tokio::spawn(async move { pay(addr, "across", 12, &[("x-delay-ms", "300")]).await })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        assert_eq!(
            a.executed() + b.executed(),
            1,
            "one run across both instances"
        );
        let original = answers
            .iter()
            .find(|x| x.status == 201 && !x.is_replay())
            .expect("the run's own response")
            .clone();
        for x in &answers {
            match x.status.as_u16() {
                201 => assert_eq!(x.body, original.body),
                409 => assert_eq!(x.problem(), "in-progress"),
                other => panic!("{other}: {x:?}"),
            }
        }
        for addr in [a.addr, b.addr] {
            let replay = pay(addr, "across", 12, &[]).await;
            assert!(replay.is_replay(), "{replay:?}");
            assert_eq!(replay.body, original.body);
            assert_eq!(pay(addr, "across", 13, &[]).await.status, 422);
        }
        assert_eq!(a.executed() + b.executed(), 1);
    })
    .await;
}

/// An app restarted on the same Redis (a new engine, cold) still replays
/// what the previous one stored, in both affinities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_app_replays_from_redis() {
    bounded(async {
        let server = RedisServer::start();
        for (i, affinity) in [Affinity::Owned, Affinity::Shared].into_iter().enumerate() {
            let key = format!("restart-{i}");
            let first_app = start(IdempotencyLayer::new(engine(&server, affinity))).await;
            let first = pay(first_app.addr, &key, 77, &[]).await;
            assert_eq!(first.status, 201);
            assert_eq!(first_app.layer.stats().count(Outcome::Stored), 1);
            first_app.stop();
            let restarted = start(IdempotencyLayer::new(engine(&server, affinity))).await;
            let replay = pay(restarted.addr, &key, 77, &[]).await;
            assert!(replay.is_replay(), "{affinity:?}: {replay:?}");
            assert_eq!(replay.body, first.body);
            assert_eq!(restarted.executed(), 0);
        }
    })
    .await;
}

/// Redis down: fail closed, `503` + `Retry-After`, the handler not run;
/// back up: served again.
async fn redis_down_fails_closed(affinity: Affinity) {
    let mut server = RedisServer::start();
    let app = start(IdempotencyLayer::new(engine(&server, affinity))).await;
    assert_eq!(pay(app.addr, "up", 1, &[]).await.status, 201);
    server.kill();
    let down = pay(app.addr, "while-down", 1, &[]).await;
    assert_eq!(down.status, 503, "{down:?}");
    assert_eq!(down.problem(), "store-unavailable");
    assert_eq!(down.headers["retry-after"], "1");
    assert_eq!(app.executed(), 1, "nothing runs while the store is down");
    assert!(app.layer.stats().count(Outcome::Unavailable) >= 1);
    server.restart();
    // Reconnects back off up to 1 s: a bounded number of retries.
    let mut served = None;
    for attempt in 0..50 {
        let a = pay(app.addr, "after", 1, &[]).await;
        if a.status == 201 {
            served = Some(attempt);
            break;
        }
        assert_eq!(a.status, 503, "{a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served.is_some(), "served again once Redis is back");
    assert_eq!(app.executed(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_owned() {
    bounded(redis_down_fails_closed(Affinity::Owned)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_shared() {
    bounded(redis_down_fails_closed(Affinity::Shared)).await;
}

/// Redis goes down while the handler runs: the response is still sent,
/// and while the lease lasts a retry never runs the handler again (the
/// commit is retried in the background, or was kept locally; the retry
/// is answered 409, the replay, or 503 while Redis is down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_redis_cannot_take_never_reruns_the_handler() {
    bounded(async {
        let mut server = RedisServer::start();
        let app = start(IdempotencyLayer::new(engine(&server, Affinity::Owned))).await;
        assert_eq!(pay(app.addr, "warm", 1, &[]).await.status, 201);
        let addr = app.addr;
        let slow = tokio::spawn(async move { pay(addr, "mid", 4, &[("x-delay-ms", "400")]).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.kill();
        let first = slow.await.unwrap();
        assert_eq!(first.status, 201, "the client gets the handler's response");
        let retry = pay(app.addr, "mid", 4, &[]).await;
        // With Redis still down the claim cannot read the record: 503
        // (fail closed, nothing done) is as safe as 409 or the replay.
        assert!(
            retry.status == 409 || retry.status == 503 || retry.is_replay(),
            "no second run while the lease lasts: {retry:?}"
        );
        assert_eq!(app.executed(), 2);
    })
    .await;
}

/// `OnUnavailable::Proceed`: with Redis down the handler runs unprotected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_proceeds_when_configured() {
    bounded(async {
        let mut server = RedisServer::start();
        let layer = IdempotencyLayer::builder(engine(&server, Affinity::Owned))
            .on_unavailable(OnUnavailable::Proceed)
            .build()
            .unwrap();
        let app = start(layer).await;
        server.kill();
        let a = pay(app.addr, "open", 1, &[]).await;
        assert_eq!(a.status, 201);
        assert_eq!(app.layer.stats().count(Outcome::Unprotected), 1);
        assert_eq!(app.executed(), 1);
    })
    .await;
}

/// A claim waiting on a stalled Redis never blocks the runtime: on a
/// one-worker runtime, other requests are answered while it waits.
#[test]
fn a_stalled_redis_does_not_block_the_runtime() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bounded(async {
        let server = RedisServer::start();
        let app = start(IdempotencyLayer::new(engine(&server, Affinity::Owned))).await;
        assert_eq!(pay(app.addr, "warm", 1, &[]).await.status, 201);
        server.pause();
        let addr = app.addr;
        let stalled = tokio::spawn(async move { pay(addr, "stalled", 1, &[]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let stats = send(app.addr, "GET", "/stats", &[], b"").await.unwrap();
        assert_eq!(stats.status, 200);
        let took = started.elapsed();
        server.resume();
        let stalled = stalled.await.unwrap();
        assert!(
            took < Duration::from_millis(300),
            "GET /stats took {took:?} while a claim waited on Redis"
        );
        // The stalled claim ended one way or the other (served, or 503
        // after the tier's 500 ms timeout).
        assert!(matches!(stalled.status.as_u16(), 201 | 503), "{stalled:?}");
        assert!(eventually(Duration::from_secs(1), || true).await);
    }));
}
