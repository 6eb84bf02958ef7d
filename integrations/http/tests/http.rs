//! The layer on the memory tier, over real loopback sockets: an axum server
//! and hyper's client.

#[path = "support/app.rs"]
mod app;

use std::sync::Arc;
use std::time::Duration;

use app::{eventually, pay, send, start};
use tiered_dedup::Deduper;
use tiered_dedup_http::{Dispatch, IdempotencyLayer, InFlight, Outcome, Scope};

/// Every test is bounded in time.
const LIMIT: Duration = Duration::from_secs(60);

fn engine() -> Arc<Deduper> {
    Arc::new(
        Deduper::builder()
            .window(Duration::from_secs(3600))
            .build()
            .unwrap(),
    )
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test over its time limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    bounded(async {
        let app = start(IdempotencyLayer::new(engine())).await;
        let first = pay(app.addr, "k-1", 42, &[]).await;
        assert_eq!(first.status, 201);
        assert_eq!(first.json()["amount"], 42);
        assert!(!first.is_replay());
        let again = pay(app.addr, "k-1", 42, &[]).await;
        assert_eq!(again.status, 201);
        assert!(again.is_replay());
        assert_eq!(again.body, first.body);
        assert_eq!(app.executed(), 1);
        let stats = app.layer.stats();
        assert_eq!(stats.count(Outcome::Stored), 1);
        assert_eq!(stats.count(Outcome::Replayed), 1);
    })
    .await;
}

/// 100 concurrent requests with one key: one handler run; every other
/// answer is a 409 or the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_requests_with_one_key_run_the_handler_once() {
    bounded(async {
        let app = start(IdempotencyLayer::new(engine())).await;
        let addr = app.addr;
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                tokio::spawn(async move { pay(addr, "same", 7, &[("x-delay-ms", "300")]).await })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        assert_eq!(app.executed(), 1);
        let first: Vec<_> = answers
            .iter()
            .filter(|a| a.status == 201 && !a.is_replay())
            .collect();
        assert_eq!(first.len(), 1, "one original response");
        let mut conflicts = 0;
        for a in &answers {
            match a.status.as_u16() {
                201 => assert_eq!(a.body, first[0].body),
                409 => {
                    assert_eq!(a.problem(), "in-progress");
                    assert_eq!(a.headers["retry-after"], "1");
                    conflicts += 1;
                }
                other => panic!("unexpected {other}: {a:?}"),
            }
        }
        assert!(conflicts > 0, "some requests arrived while the first ran");
        // The first is stored: a retry now is the replay.
        let after = pay(addr, "same", 7, &[]).await;
        assert!(after.is_replay());
        assert_eq!(after.body, first[0].body);
        assert_eq!(app.executed(), 1);
    })
    .await;
}

/// With `InFlight::Wait`, concurrent retries wait for the first and all
/// get its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_retries_get_the_first_response() {
    bounded(async {
        let layer = IdempotencyLayer::builder(engine())
            .in_flight(InFlight::Wait {
                timeout: Duration::from_secs(10),
                retry_after: Duration::from_secs(1),
            })
            .build()
            .unwrap();
        let app = start(layer).await;
        let addr = app.addr;
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                tokio::spawn(async move { pay(addr, "wait", 3, &[("x-delay-ms", "300")]).await })
            })
            .collect();
        let mut bodies = Vec::new();
        for t in tasks {
            let a = t.await.unwrap();
            assert_eq!(a.status, 201, "{a:?}");
            bodies.push(a.body);
        }
        assert_eq!(app.executed(), 1);
        assert!(bodies.iter().all(|b| *b == bodies[0]));
        // A wait that runs out is a 409.
        let short = IdempotencyLayer::builder(engine())
            .in_flight(InFlight::Wait {
                timeout: Duration::from_millis(100),
                retry_after: Duration::from_secs(2),
            })
            .build()
            .unwrap();
        let app = start(short).await;
        let addr = app.addr;
        let slow = tokio::spawn(async move { pay(addr, "w2", 1, &[("x-delay-ms", "800")]).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waited = pay(addr, "w2", 1, &[]).await;
        assert_eq!(waited.status, 409);
        assert_eq!(waited.headers["retry-after"], "2");
        assert_eq!(slow.await.unwrap().status, 201);
    })
    .await;
}

/// Status, body and the replayable headers, byte for byte; other headers
/// (Set-Cookie, custom ones) are not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_is_byte_identical() {
    bounded(async {
        let app = start(IdempotencyLayer::new(engine())).await;
        let first = pay(app.addr, "bytes", 1999, &[("x-status", "202")]).await;
        let replay = pay(app.addr, "bytes", 1999, &[]).await;
        assert_eq!(first.status, 202);
        assert_eq!(replay.status, first.status);
        assert_eq!(replay.body, first.body);
        for name in ["content-type", "location"] {
            let a: Vec<_> = first.headers.get_all(name).iter().collect();
            let b: Vec<_> = replay.headers.get_all(name).iter().collect();
            assert_eq!(a, b, "{name}");
            assert!(!a.is_empty(), "{name}");
        }
        assert_eq!(
            replay.headers["content-length"],
            first.headers["content-length"]
        );
        assert!(first.headers.contains_key("set-cookie") && first.headers.contains_key("x-run"));
        assert!(!replay.headers.contains_key("set-cookie"));
        assert!(!replay.headers.contains_key("x-run"));
        assert_eq!(replay.headers["idempotent-replayed"], "true");
        // A stored 4xx (the request was judged) is replayed as well.
        let declined = pay(app.addr, "declined", 5, &[("x-status", "402")]).await;
        let again = pay(app.addr, "declined", 5, &[]).await;
        assert_eq!(again.status, 402);
        assert_eq!(again.body, declined.body);
        assert!(again.is_replay());
        assert_eq!(app.executed(), 2);
    })
    .await;
}

/// The same key with a different body, path or method is a 422, in flight
/// or completed; the handler does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_request_is_422() {
    bounded(async {
        let app = start(IdempotencyLayer::new(engine())).await;
        assert_eq!(pay(app.addr, "k", 10, &[]).await.status, 201);
        let changed = pay(app.addr, "k", 11, &[]).await;
        assert_eq!(changed.status, 422);
        assert_eq!(changed.problem(), "key-reused");
        let key: &[u8] = b"\"k\"";
        let patched = send(
            app.addr,
            "PATCH",
            "/payments",
            &[("idempotency-key", key)],
            b"{\"amount\":10}",
        )
        .await
        .unwrap();
        assert_eq!(patched.status, 422);
        let other_target = send(
            app.addr,
            "POST",
            "/payments?currency=EUR",
            &[("idempotency-key", key)],
            b"{\"amount\":10}",
        )
        .await
        .unwrap();
        assert_eq!(other_target.status, 422);
        // While the first is in flight, a different body is 422 too.
        let addr = app.addr;
        let slow =
            tokio::spawn(async move { pay(addr, "inflight", 1, &[("x-delay-ms", "400")]).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pay(addr, "inflight", 2, &[]).await.status, 422);
        assert_eq!(slow.await.unwrap().status, 201);
        assert_eq!(app.executed(), 2);
        assert_eq!(app.layer.stats().count(Outcome::KeyReused), 4);
    })
    .await;
}

/// Missing, malformed, empty, too long, repeated or non-ASCII keys: 400
/// problems, no handler run, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_keys_are_400() {
    bounded(async {
        let app = start(IdempotencyLayer::new(engine())).await;
        let body = b"{\"amount\":1}";
        let missing = send(app.addr, "POST", "/payments", &[], body)
            .await
            .unwrap();
        assert_eq!(missing.status, 400);
        assert_eq!(missing.problem(), "missing-key");
        assert!(missing.json()["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"));
        let long = format!("\"{}\"", "x".repeat(256));
        let bad: Vec<Vec<u8>> = vec![
            b"unquoted".to_vec(),
            b"\"\"".to_vec(),
            b"\"open".to_vec(),
            b"\"a\\nb\"".to_vec(),
            b"\"a\" trailing".to_vec(),
            b"\"a\";Bad=1".to_vec(),
            vec![b'"', 0xc3, 0xa9, b'"'],
            long.into_bytes(),
        ];
        for value in &bad {
            let a = send(
                app.addr,
                "POST",
                "/payments",
                &[("idempotency-key", value)],
                body,
            )
            .await
            .unwrap();
            assert_eq!(a.status, 400, "{:?}", String::from_utf8_lossy(value));
            assert_eq!(a.problem(), "invalid-key");
        }
        let repeated = send(
            app.addr,
            "POST",
            "/payments",
            &[("idempotency-key", b"\"a\""), ("idempotency-key", b"\"b\"")],
            body,
        )
        .await
        .unwrap();
        assert_eq!(repeated.status, 400);
        // 255 characters is fine; GET needs no key.
        let ok = format!("\"{}\"", "y".repeat(255));
        let a = send(
            app.addr,
            "POST",
            "/payments",
            &[("idempotency-key", ok.as_bytes())],
            body,
        )
        .await
        .unwrap();
        assert_eq!(a.status, 201);
        let get = send(app.addr, "GET", "/payments", &[], b"").await.unwrap();
        assert_eq!(get.status, 201);
        assert_eq!(app.executed(), 2);
        let stats = app.layer.stats();
        assert_eq!(stats.count(Outcome::MissingKey), 1);
        assert_eq!(stats.count(Outcome::InvalidKey), bad.len() as u64 + 1);
        assert_eq!(
            app.layer.engine().stats().claims.claims,
            1,
            "no claim for a bad key"
        );
    })
    .await;
}

/// A 500 releases the key: the retry runs the handler again and its 201 is
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_then_a_retry_runs_twice_and_stores_the_second() {
    bounded(async {
        let app = start(IdempotencyLayer::new(engine())).await;
        let failed = pay(app.addr, "flaky", 5, &[("x-fail", "1")]).await;
        assert_eq!(failed.status, 500);
        let retried = pay(app.addr, "flaky", 5, &[]).await;
        assert_eq!(retried.status, 201);
        assert!(!retried.is_replay());
        let replay = pay(app.addr, "flaky", 5, &[("x-fail", "1")]).await;
        assert_eq!(replay.status, 201);
        assert!(replay.is_replay());
        assert_eq!(replay.body, retried.body);
        assert_eq!(app.executed(), 2);
        let stats = app.layer.stats();
        assert_eq!(stats.count(Outcome::Released), 1);
        assert_eq!(stats.count(Outcome::Stored), 1);
        // 429 and 409 from the handler are "not now": released too.
        assert_eq!(
            pay(app.addr, "busy", 1, &[("x-status", "429")])
                .await
                .status,
            429
        );
        assert_eq!(pay(app.addr, "busy", 1, &[]).await.status, 201);
    })
    .await;
}

/// A panicking handler (no catch-panic layer: the connection drops)
/// releases the key; the retry runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_releases_the_key() {
    bounded(async {
        let app = start(IdempotencyLayer::new(engine())).await;
        let key: &[u8] = b"\"boom\"";
        let body = b"{\"amount\":3}";
        let panicked = send(
            app.addr,
            "POST",
            "/payments",
            &[("idempotency-key", key), ("x-panic", b"1")],
            body,
        )
        .await;
        assert!(panicked.is_err(), "the connection is dropped: {panicked:?}");
        let stats = app.layer.stats();
        assert!(
            eventually(Duration::from_secs(5), || stats.count(Outcome::Cancelled)
                == 1)
            .await
        );
        let retried = send(
            app.addr,
            "POST",
            "/payments",
            &[("idempotency-key", key)],
            body,
        )
        .await
        .unwrap();
        assert_eq!(retried.status, 201);
        assert!(!retried.is_replay());
        assert_eq!(app.executed(), 2);
    })
    .await;
}

/// A client that goes away mid-request: hyper drops the request's future,
/// the lease with it; a retry runs the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_releases_the_key() {
    use tokio::io::AsyncWriteExt;
    bounded(async {
        let app = start(IdempotencyLayer::new(engine())).await;
        let mut raw = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let body = "{\"amount\":9}";
        let request = format!(
            "POST /payments HTTP/1.1\r\nhost: x\r\nidempotency-key: \"gone\"\r\nx-delay-ms: 2000\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        raw.write_all(request.as_bytes()).await.unwrap();
        let stats = app.layer.stats();
        let executed = Arc::clone(&app.executed);
        assert!(
            eventually(Duration::from_secs(5), || executed.load(std::sync::atomic::Ordering::SeqCst) == 1).await
        );
        // In flight: a retry is a 409.
        assert_eq!(pay(app.addr, "gone", 9, &[]).await.status, 409);
        drop(raw);
        assert!(
            eventually(Duration::from_secs(5), || stats.count(Outcome::Cancelled) == 1).await,
            "the dropped request released its key"
        );
        let retried = pay(app.addr, "gone", 9, &[]).await;
        assert_eq!(retried.status, 201);
        assert!(!retried.is_replay());
        assert_eq!(app.executed(), 2);
    })
    .await;
}

/// Keys are per scope: two tenants with the same key each run; within a
/// tenant it is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_scoped_per_principal() {
    bounded(async {
        let layer = IdempotencyLayer::builder(engine())
            .scope(|parts| {
                parts
                    .headers
                    .get("x-tenant")
                    .map_or_else(Scope::global, |v| Scope::from(v.as_bytes()))
            })
            .build()
            .unwrap();
        let app = start(layer).await;
        let a = pay(app.addr, "shared-key", 1, &[("x-tenant", "acme")]).await;
        let b = pay(app.addr, "shared-key", 1, &[("x-tenant", "globex")]).await;
        assert!(!a.is_replay() && !b.is_replay());
        assert_ne!(a.body, b.body);
        let a2 = pay(app.addr, "shared-key", 1, &[("x-tenant", "acme")]).await;
        assert!(a2.is_replay());
        assert_eq!(a2.body, a.body);
        // Another tenant with a different body is its own key, not a 422.
        assert_eq!(
            pay(app.addr, "shared-key", 2, &[("x-tenant", "initech")])
                .await
                .status,
            201
        );
        assert_eq!(app.executed(), 3);
    })
    .await;
}

/// A response body over the cap is sent whole; the key completes without
/// a replayable body and a retry gets a 410 problem naming the first
/// status. Request bodies over their cap are 413, unread past the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_caps() {
    bodies_over_the_caps_with(Dispatch::Direct).await;
}

/// The same through the batcher (the store's thread commits, the request
/// awaits it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_caps_batched() {
    bodies_over_the_caps_with(Dispatch::Batched).await;
}

async fn bodies_over_the_caps_with(dispatch: Dispatch) {
    bounded(async {
        let layer = IdempotencyLayer::builder(engine())
            .dispatch(dispatch)
            .max_response_body(1000)
            .max_request_body(2000)
            .build()
            .unwrap();
        let app = start(layer).await;
        let big = pay(app.addr, "big", 1, &[("x-big", "300000")]).await;
        assert_eq!(big.status, 201);
        assert_eq!(big.body.len(), 300_000);
        assert!(big
            .body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == b'a' + (i % 26) as u8));
        let retry = pay(app.addr, "big", 1, &[("x-big", "300000")]).await;
        assert_eq!(retry.status, 410);
        assert_eq!(retry.problem(), "response-not-stored");
        assert_eq!(retry.json()["first_status"], 201);
        // Exactly at the cap: stored.
        let fits = pay(app.addr, "fits", 1, &[("x-big", "1000")]).await;
        let replay = pay(app.addr, "fits", 1, &[]).await;
        assert!(replay.is_replay());
        assert_eq!(replay.body, fits.body);
        assert_eq!(app.executed(), 2);
        let stats = app.layer.stats();
        assert_eq!(stats.count(Outcome::StoredWithoutBody), 1);
        assert_eq!(stats.count(Outcome::NotReplayable), 1);

        let key: &[u8] = b"\"large-request\"";
        let huge = vec![b'x'; 2001];
        let a = send(
            app.addr,
            "POST",
            "/payments",
            &[("idempotency-key", key)],
            &huge,
        )
        .await
        .unwrap();
        assert_eq!(a.status, 413);
        assert_eq!(a.problem(), "request-too-large");
        // Without a Content-Length (chunked): the same, found while reading.
        let stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let chunks = futures_chunks(vec![vec![b'y'; 1500], vec![b'y'; 1500]]);
        let request = http::Request::post("/payments")
            .header("host", "x")
            .header("idempotency-key", "\"chunked\"")
            .body(chunks)
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(app.executed(), 2);
        assert_eq!(stats.count(Outcome::RequestTooLarge), 2);
    })
    .await;
}

/// A body of several frames with no length (sent chunked).
fn futures_chunks(chunks: Vec<Vec<u8>>) -> Chunks {
    Chunks(chunks.into_iter().map(bytes::Bytes::from).collect())
}

struct Chunks(std::collections::VecDeque<bytes::Bytes>);

impl http_body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// A seeded random sequence of requests (8 keys, 3 amounts, failures,
/// stored and released statuses) against a trivial reference: a map from
/// key to the stored (amount, response).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_match_a_reference_model() {
    random_requests_match_a_reference_model_with(Dispatch::Direct).await;
}

/// The same through the batcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_match_a_reference_model_batched() {
    random_requests_match_a_reference_model_with(Dispatch::Batched).await;
}

async fn random_requests_match_a_reference_model_with(dispatch: Dispatch) {
    bounded(async {
        let layer = IdempotencyLayer::builder(engine())
            .dispatch(dispatch)
            .build()
            .unwrap();
        let app = start(layer).await;
        let mut model: std::collections::HashMap<u64, (u64, app::Answer)> = Default::default();
        let mut runs = 0;
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            // SplitMix64.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        };
        for step in 0..300 {
            let key = next(8);
            let amount = next(3);
            let status = match next(10) {
                0 | 1 => "500",
                2 => "429",
                3 => "402",
                _ => "201",
            };
            let extra: Vec<(&str, &str)> = if status == "500" {
                vec![("x-fail", "1")]
            } else {
                vec![("x-status", status)]
            };
            let got = pay(app.addr, &format!("m{key}"), amount, &extra).await;
            match model.get(&key) {
                Some((stored_amount, _)) if *stored_amount != amount => {
                    assert_eq!(got.status, 422, "step {step}");
                }
                Some((_, stored)) => {
                    assert!(got.is_replay(), "step {step}: {got:?}");
                    assert_eq!(
                        (got.status, &got.body),
                        (stored.status, &stored.body),
                        "step {step}"
                    );
                }
                None => {
                    runs += 1;
                    assert!(!got.is_replay(), "step {step}");
                    assert_eq!(got.status.as_str(), status, "step {step}");
                    if status == "201" || status == "402" {
                        model.insert(key, (amount, got));
                    }
                }
            }
        }
        assert_eq!(app.executed(), runs);
    })
    .await;
}

/// Methods not covered pass through; with `MissingKey::PassThrough` a
/// covered request without a key does too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncovered_requests_pass_through() {
    bounded(async {
        let layer = IdempotencyLayer::builder(engine())
            .missing_key(tiered_dedup_http::MissingKey::PassThrough)
            .methods([http::Method::POST])
            .build()
            .unwrap();
        let app = start(layer).await;
        for _ in 0..2 {
            let a = send(app.addr, "POST", "/payments", &[], b"{}")
                .await
                .unwrap();
            assert_eq!(a.status, 201);
            let key: &[u8] = b"\"p\"";
            let a = send(
                app.addr,
                "PATCH",
                "/payments",
                &[("idempotency-key", key)],
                b"{}",
            )
            .await
            .unwrap();
            assert!(!a.is_replay());
        }
        assert_eq!(app.executed(), 4);
        assert_eq!(app.layer.stats().count(Outcome::Passthrough), 4);
    })
    .await;
}
