//! Requests per second through the idempotency layer, over loopback, with
//! its peers in the same run (see "HTTP idempotency layer" in
//! `docs/benchmarks.md`).
//!
//! One axum server and one load generator (hyper's HTTP/1.1 client, C
//! keep-alive connections, a fixed number of requests split between them)
//! share one tokio runtime of two workers. Every request is a `POST
//! /payments` with a fresh `Idempotency-Key` (the claim → handler → commit
//! path) and a small JSON body; the handler answers `201` with a small JSON
//! document. Each pass starts a fresh server on the variant's engine (built
//! once, warmed by a first pass, kept over the rounds as a server keeps
//! it); only the requests are timed.
//!
//! - memory: the service without the layer, with the layer on the memory
//!   tier called directly (`Dispatch::Direct`, the default there), and with
//!   claims through the `ClaimBatcher` (`Dispatch::Batched`).
//! - Redis (a private `redis-server` on a free loopback port): the layer on
//!   the Redis tier with shared keys (through the batcher), and the peer, a
//!   hand-written per-request store (`support/lua_store.rs`: a Lua claim of
//!   a JSON record, then `SET … EX` of the response).
//!
//! Paired rounds: each round runs every variant once, the order rotating;
//! the figures are the medians of the rounds' requests/s and of the
//! per-round ratios.
//!
//! ```sh
//! cargo bench -p tiered-dedup-http --bench http                 # 7 rounds
//! TD_BENCH_ROUNDS=3 TD_BENCH_REQUESTS=10000 TD_BENCH_CONNECTIONS=16 cargo bench -p tiered-dedup-http --bench http
//! cargo bench -p tiered-dedup-http --bench http -- --test       # smoke: one short round
//! ```

#[path = "support/lua_store.rs"]
mod lua_store;
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Deduper, ExactTier};
use tiered_dedup_http::{Dispatch, IdempotencyLayer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Plain,
    MemoryDirect,
    MemoryBatched,
    RedisOurs,
    RedisPeer,
}

impl Variant {
    /// The variant's name in `TD_BENCH_VARIANTS`.
    fn flag(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::MemoryDirect => "memory-direct",
            Variant::MemoryBatched => "memory-batched",
            Variant::RedisOurs => "redis-ours",
            Variant::RedisPeer => "redis-peer",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "no layer",
            Variant::MemoryDirect => "layer, memory, direct",
            Variant::MemoryBatched => "layer, memory, batched",
            Variant::RedisOurs => "layer, Redis shared, batched",
            Variant::RedisPeer => "peer: Lua claim + SET EX per request",
        }
    }
}

struct Settings {
    rounds: usize,
    requests: usize,
    connections: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn create_payment(
    State(runs): State<Arc<AtomicU64>>,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let run = runs.fetch_add(1, Ordering::Relaxed);
    let amount = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("amount").cloned())
        .unwrap_or(Value::Null);
    (
        StatusCode::CREATED,
        Json(json!({"id": run, "amount": amount})),
    )
}

/// What one pass measured.
struct Pass {
    per_second: f64,
    /// Answers other than the first-run `201`.
    other: usize,
    /// CPU time per request of this process (server and load generator)
    /// and of `redis-server`, in µs.
    cpu_us: f64,
    redis_us: f64,
}

/// The bench's `redis-server`, once started: its CPU is read per pass.
static REDIS_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// CPU time (user + system) a process has used, in seconds, from
/// `/proc/<pid>/stat` (0 where that cannot be read).
fn cpu_seconds(pid: &str) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let hz = *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    });
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name: utime and stime are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / hz
}

fn redis_seconds() -> f64 {
    REDIS_PID
        .get()
        .map_or(0.0, |pid| cpu_seconds(&pid.to_string()))
}

/// The engine a variant claims in: built once per variant and kept over its
/// passes, as a server keeps its engine (a fresh one per pass would time
/// the first touch of its tables' pages).
fn engine_for(variant: Variant, redis: Option<&str>) -> Option<Arc<Deduper>> {
    // Sized for the keys the run makes (`TD_BENCH_EXPECTED_KEYS`, default
    // 200 000: 7 rounds of 20 000 and the warm-ups), as a service sizes its
    // engine for the keys of its window; the builder's default is 10^6.
    let builder = Deduper::builder()
        .window(Duration::from_secs(3600))
        .expected_keys(env_usize("TD_BENCH_EXPECTED_KEYS", 200_000) as u64);
    match variant {
        Variant::Plain | Variant::RedisPeer => None,
        Variant::MemoryDirect | Variant::MemoryBatched => Some(Arc::new(builder.build().unwrap())),
        Variant::RedisOurs => {
            let tier = RedisTier::new(RedisConfig::new(redis.expect("a Redis URL")));
            Some(Arc::new(
                builder
                    .shards(env_usize("TD_BENCH_SHARDS", 0).max(1))
                    .affinity(Affinity::Shared)
                    .exact_tier(ExactTier::Custom(Arc::new(tier)))
                    .build()
                    .unwrap(),
            ))
        }
    }
}

async fn serve(
    variant: Variant,
    engine: Option<&Arc<Deduper>>,
    redis: Option<&str>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let runs = Arc::new(AtomicU64::new(0));
    let router = Router::new()
        .route("/payments", post(create_payment))
        .with_state(runs);
    let layer = |dispatch| {
        IdempotencyLayer::builder(Arc::clone(engine.expect("an engine")))
            .dispatch(dispatch)
            .build()
            .unwrap()
    };
    let router = match variant {
        Variant::Plain => router,
        Variant::MemoryDirect => router.layer(layer(Dispatch::Direct)),
        Variant::MemoryBatched | Variant::RedisOurs => router.layer(layer(Dispatch::Batched)),
        Variant::RedisPeer => {
            router.layer(lua_store::LuaStoreLayer::connect(redis.expect("a Redis URL")).await)
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router).await.unwrap();
    });
    (addr, task)
}

/// `requests` POSTs with fresh keys over `connections` keep-alive
/// connections; the time from the first request to the last answer.
async fn pass(
    variant: Variant,
    engine: Option<&Arc<Deduper>>,
    s: &Settings,
    redis: Option<&str>,
    tag: &str,
) -> Pass {
    let (addr, server) = serve(variant, engine, redis).await;
    let mut senders = Vec::new();
    for _ in 0..s.connections {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(sender);
    }
    let per = s.requests / s.connections;
    let cpu_before = (cpu_seconds("self"), redis_seconds());
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(c, mut sender)| {
            let tag = tag.to_owned();
            tokio::spawn(async move {
                let mut other = 0;
                for i in 0..per {
                    let key = format!("\"{tag}-{c}-{i}\"");
                    let body = format!("{{\"amount\":{i},\"currency\":\"EUR\"}}");
                    let request = http::Request::post("/payments")
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .header("idempotency-key", key)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    sender.ready().await.unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    let status = response.status();
                    let replayed = response.headers().contains_key("idempotent-replayed");
                    let _ = response.into_body().collect().await.unwrap();
                    if status != StatusCode::CREATED || replayed {
                        other += 1;
                    }
                }
                other
            })
        })
        .collect();
    let mut other = 0;
    for t in tasks {
        other += t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let done = (per * s.connections) as f64;
    let cpu_us = (cpu_seconds("self") - cpu_before.0) * 1e6 / done;
    let redis_us = (redis_seconds() - cpu_before.1) * 1e6 / done;
    server.abort();
    Pass {
        per_second: done / elapsed.as_secs_f64(),
        other,
        cpu_us,
        redis_us,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Paired rounds of `variants`; prints each one's median requests/s and
/// the median per-round ratio of each to `baseline`.
async fn rounds(
    title: &str,
    variants: &[Variant],
    baseline: Variant,
    s: &Settings,
    redis: Option<&str>,
) {
    // `TD_BENCH_VARIANTS=memory-batched,…` runs only those (for a
    // profile of one variant); the baseline is then the first of them.
    let only: Option<Vec<Variant>> = std::env::var("TD_BENCH_VARIANTS").ok().map(|list| {
        variants
            .iter()
            .copied()
            .filter(|v| list.split(',').any(|name| name.trim() == v.flag()))
            .collect()
    });
    let (variants, baseline) = match &only {
        Some(kept) if kept.is_empty() => return,
        Some(kept) => (
            &kept[..],
            if kept.contains(&baseline) {
                baseline
            } else {
                kept[0]
            },
        ),
        None => (variants, baseline),
    };
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut others = vec![0usize; variants.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut redis_cpu: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let engines: Vec<_> = variants.iter().map(|&v| engine_for(v, redis)).collect();
    // Warm-up (connections, allocator, Redis scripts), not counted.
    for (&v, engine) in variants.iter().zip(&engines) {
        let warm = Settings {
            rounds: 1,
            requests: (s.requests / 10).max(s.connections),
            connections: s.connections,
        };
        pass(v, engine.as_ref(), &warm, redis, &format!("warm-{v:?}")).await;
    }
    for round in 0..s.rounds {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let tag = format!("r{round}-{:?}", variants[i]);
            let p = pass(variants[i], engines[i].as_ref(), s, redis, &tag).await;
            rates[i].push(p.per_second);
            others[i] += p.other;
            cpu[i].push(p.cpu_us);
            redis_cpu[i].push(p.redis_us);
        }
    }
    let b = variants.iter().position(|&v| v == baseline).unwrap();
    println!(
        "\n{title}: {} requests over {} connections, {} rounds",
        s.requests, s.connections, s.rounds
    );
    println!(
        "{:<40} {:>12} {:>14} {:>10} {:>14} {:>14}",
        "variant", "requests/s", "vs baseline", "non-201", "CPU µs/req", "Redis µs/req"
    );
    for (i, &v) in variants.iter().enumerate() {
        let ratios: Vec<f64> = rates[i].iter().zip(&rates[b]).map(|(x, y)| x / y).collect();
        println!(
            "{:<40} {:>12.0} {:>13.3}x {:>10} {:>14.2} {:>14.2}",
            v.name(),
            median(rates[i].clone()),
            median(ratios),
            others[i],
            median(cpu[i].clone()),
            median(redis_cpu[i].clone()),
        );
    }
    if others.iter().any(|&o| o > 0) {
        println!(
            "(non-201: answers other than a first run's 201 — with Redis before the tier stores claim results, the layer answers 503)"
        );
    }
}

/// The layer's CPU cost per request without sockets: the same router
/// called through `tower::ServiceExt::oneshot` in a loop on one task, with
/// and without the layer (memory tier, direct), fresh keys; medians of
/// paired rounds.
async fn in_process(rounds: usize, requests: usize) {
    use tower::ServiceExt;
    let engine = engine_for(Variant::MemoryDirect, None).unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let plain = Router::new()
        .route("/payments", post(create_payment))
        .with_state(runs);
    let layered = plain.clone().layer(
        IdempotencyLayer::builder(engine)
            .dispatch(Dispatch::Direct)
            .build()
            .unwrap(),
    );
    let time = |router: Router, tag: String| async move {
        let started = Instant::now();
        for i in 0..requests {
            let request = http::Request::post("/payments")
                .header("content-type", "application/json")
                .header("idempotency-key", format!("\"{tag}-{i}\""))
                .body(axum::body::Body::from(format!(
                    "{{\"amount\":{i},\"currency\":\"EUR\"}}"
                )))
                .unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            let _ = response.into_body().collect().await.unwrap();
        }
        started.elapsed().as_secs_f64() * 1e6 / requests as f64
    };
    time(layered.clone(), "warm".to_owned()).await;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        without.push(time(plain.clone(), format!("p{round}")).await);
        with.push(time(layered.clone(), format!("l{round}")).await);
    }
    let (a, b) = (median(without), median(with));
    println!(
        "\nin process (oneshot, no sockets), {requests} requests, {rounds} rounds: no layer {a:.2} µs, layer {b:.2} µs per request: the layer costs {:.2} µs",
        b - a
    );
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let s = if smoke {
        Settings {
            rounds: 1,
            requests: 400,
            connections: 8,
        }
    } else {
        Settings {
            rounds: env_usize("TD_BENCH_ROUNDS", 7),
            requests: env_usize("TD_BENCH_REQUESTS", 20_000),
            connections: env_usize("TD_BENCH_CONNECTIONS", 32),
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if std::env::var("TD_BENCH_SKIP_MEMORY").is_err() {
            in_process(s.rounds, s.requests).await;
            rounds(
                "memory tier",
                &[
                    Variant::Plain,
                    Variant::MemoryDirect,
                    Variant::MemoryBatched,
                ],
                Variant::Plain,
                &s,
                None,
            )
            .await;
        }
        if std::env::var("TD_BENCH_SKIP_REDIS").is_ok() {
            return;
        }
        let server = redis_server::RedisServer::start();
        let _ = REDIS_PID.set(server.pid());
        let url = server.url();
        let redis = Settings {
            requests: env_usize("TD_BENCH_REDIS_REQUESTS", s.requests / 2),
            ..s
        };
        rounds(
            "Redis tier",
            // The service without the layer, in the same rounds: the
            // ceiling of any layer's ratio to the peer on this machine.
            &[Variant::Plain, Variant::RedisOurs, Variant::RedisPeer],
            Variant::RedisPeer,
            &redis,
            Some(&url),
        )
        .await;
    });
}
