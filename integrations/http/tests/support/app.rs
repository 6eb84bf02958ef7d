//! A payments service behind the layer on a loopback port, and a real
//! HTTP/1.1 client (hyper's), for the tests.
#![allow(dead_code)] // each test crate uses a different part

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tiered_dedup_http::IdempotencyLayer;
use tokio::net::TcpStream;

/// One server: its address, its handler-run counter, its layer.
pub struct TestApp {
    pub addr: SocketAddr,
    pub executed: Arc<AtomicU64>,
    pub layer: IdempotencyLayer,
    task: tokio::task::JoinHandle<()>,
}

impl TestApp {
    pub fn executed(&self) -> u64 {
        self.executed.load(Ordering::SeqCst)
    }

    /// Stops serving (open connections are dropped).
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `POST /payments`: `201`, `Location`, `Set-Cookie` (never replayed),
/// `{"id", "amount"}`. Headers: `X-Delay-Ms`, `X-Fail: 1` (500), `X-Status`
/// (answer that status), `X-Panic: 1`, `X-Big: N` (a body of N bytes).
async fn create_payment(
    axum::extract::State(executed): axum::extract::State<Arc<AtomicU64>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = executed.fetch_add(1, Ordering::SeqCst) + 1;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header("x-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if header("x-panic") == Some("1") {
        panic!("handler panics on request (X-Panic: 1)");
    }
    if header("x-fail") == Some("1") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "failed").into_response();
    }
    if let Some(n) = header("x-big").and_then(|v| v.parse::<usize>().ok()) {
        let body: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
        return (StatusCode::CREATED, body).into_response();
    }
    let status = header("x-status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    let amount = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("amount").cloned())
        .unwrap_or(serde_json::Value::Null);
    let json = serde_json::json!({"id": format!("pay_{run}"), "amount": amount}).to_string();
    let mut response = (status, json).into_response();
    let h = response.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        "location",
        HeaderValue::from_str(&format!("/payments/pay_{run}")).unwrap(),
    );
    h.insert(
        "set-cookie",
        HeaderValue::from_str(&format!("session=s{run}")).unwrap(),
    );
    h.insert("x-run", HeaderValue::from(run));
    response
}

pub fn router(executed: Arc<AtomicU64>) -> Router {
    Router::new()
        .route(
            "/payments",
            post(create_payment)
                .patch(create_payment)
                .get(create_payment),
        )
        .route(
            "/stats",
            get(
                |axum::extract::State(e): axum::extract::State<Arc<AtomicU64>>| async move {
                    format!("{{\"executed\":{}}}", e.load(Ordering::SeqCst))
                },
            ),
        )
        .with_state(executed)
}

/// Serves the payments router behind `layer` on a free loopback port.
pub async fn start(layer: IdempotencyLayer) -> TestApp {
    let executed = Arc::new(AtomicU64::new(0));
    let app = router(Arc::clone(&executed)).layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    TestApp {
        addr,
        executed,
        layer,
        task,
    }
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn is_replay(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// A problem document: checks the media type and returns its `type`'s
    /// last segment.
    pub fn problem(&self) -> String {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "{self:?}"
        );
        let v = self.json();
        assert_eq!(v["status"], self.status.as_u16(), "{v}");
        assert!(v["title"].is_string() && v["detail"].is_string(), "{v}");
        v["type"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned()
    }
}

/// Sends one request on a new connection.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, HeaderValue::from_bytes(value)?);
    }
    let request = request.body(Full::new(Bytes::copy_from_slice(body)))?;
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `POST /payments` with `key` (quoted) and a JSON body, plus `extra` headers.
pub async fn pay(addr: SocketAddr, key: &str, amount: u64, extra: &[(&str, &str)]) -> Answer {
    let quoted = format!("\"{key}\"");
    let body = format!("{{\"amount\":{amount}}}");
    let mut headers: Vec<(&str, &[u8])> = vec![
        ("idempotency-key", quoted.as_bytes()),
        ("content-type", b"application/json"),
    ];
    headers.extend(extra.iter().map(|(n, v)| (*n, v.as_bytes())));
    send(addr, "POST", "/payments", &headers, body.as_bytes())
        .await
        .expect("request")
}

/// Polls `cond` every 10 ms for at most `limit`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
