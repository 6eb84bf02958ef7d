//! A payments API behind the idempotency layer.
//!
//! ```sh
//! cargo run --release -p tiered-dedup-http --example idempotent_api -- --listen 127.0.0.1:8080 [--redis redis://127.0.0.1:6379]
//! ```
//!
//! - `POST /payments` with a JSON body → `201` and `{"id": <unique per
//!   handler run>, "amount": <the body's amount>}`. Request headers:
//!   `X-Delay-Ms: N` sleeps N ms before answering; `X-Fail: 1` answers
//!   `500`. Needs an `Idempotency-Key` (the layer's defaults).
//! - `GET /stats` → `{"executed": N}`: handler runs, failing ones included.
//!
//! Prints `listening on ADDR` once ready. Without `--redis` the store is the
//! memory tier (this process only); with it, the Redis tier with shared
//! keys, so several instances on one Redis run each key's handler once
//! between them and a restarted instance still replays.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Deduper, ExactTier};
use tiered_dedup_http::IdempotencyLayer;

struct App {
    executed: AtomicU64,
    /// Distinguishes this process's ids from any other instance's.
    instance: String,
}

async fn create_payment(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let run = app.executed.fetch_add(1, Ordering::SeqCst) + 1;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header("x-delay-ms").and_then(|v| v.trim().parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
    }
    if header("x-fail").is_some_and(|v| v.trim() == "1") {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "failed on request (X-Fail: 1)"})),
        );
    }
    let amount = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("amount").cloned())
        .unwrap_or(Value::Null);
    let id = format!("pay_{}_{run}", app.instance);
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "amount": amount})),
    )
}

async fn stats(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"executed": app.executed.load(Ordering::SeqCst)}))
}

fn usage() -> ! {
    eprintln!("usage: idempotent_api --listen ADDR [--redis redis://HOST:PORT]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen: Option<SocketAddr> = None;
    let mut redis: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = Some(args.next().unwrap_or_else(|| usage()).parse()?),
            "--redis" => redis = Some(args.next().unwrap_or_else(|| usage())),
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other}");
                usage()
            }
        }
    }
    let listen = listen.unwrap_or_else(|| usage());

    let mut engine = Deduper::builder()
        .namespace("idempotent_api")
        .window(Duration::from_secs(24 * 3600))
        .lease_duration(Duration::from_secs(60));
    if let Some(url) = &redis {
        // Replicas behind a load balancer have no key affinity: shared keys,
        // each claim atomic in Redis.
        engine = engine
            .exact_tier(ExactTier::Custom(Arc::new(RedisTier::new(
                RedisConfig::new(url),
            ))))
            .affinity(Affinity::Shared);
    }
    let layer = IdempotencyLayer::new(Arc::new(engine.build()?));

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let app = Arc::new(App {
        executed: AtomicU64::new(0),
        instance: format!("{:x}{:x}", std::process::id(), nanos & 0xff_ffff_ffff),
    });
    let router = Router::new()
        .route("/payments", post(create_payment))
        .route("/stats", get(stats))
        .with_state(app)
        .layer(layer);

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
