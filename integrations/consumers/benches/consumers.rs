//! Messages per second through each broker adapter, in one run, against
//! local brokers the bench starts (`nats-server -js` and `redis-server` on
//! free 127.0.0.1 ports): the same consumer loop without dedup, with dedup
//! on the memory tier (called on the runtime's worker, and through
//! `process_blocking`), with dedup on a Redis tier (shared keys, through
//! `process_blocking`, and pipelined: a batch's commits sent with the next
//! batch's claims), and the hand-written per-message `SET NX EX`
//! consumer. 20% of the messages
//! repeat an earlier business key (seeded).
//!
//! Paired rounds: each round runs every variant once per broker, the order
//! rotating from round to round; the report is the median rate of each
//! variant and the median of the per-round ratios.
//!
//! ```text
//! cargo bench -p tiered-dedup-consumers --bench consumers                 # 5 rounds of 50 000 messages
//! TD_BENCH_MESSAGES=100000 TD_BENCH_ROUNDS=3 cargo bench -p tiered-dedup-consumers --bench consumers
//! cargo bench -p tiered-dedup-consumers --bench consumers -- --test       # smoke: 2 000 messages, one round
//! TD_BENCH_BATCH=1024 cargo bench -p tiered-dedup-consumers --bench consumers   # batches of 1024 (default 256)
//! TD_BENCH_BROKER=redis-streams TD_BENCH_VARIANTS=NoDedup,Memory cargo bench … # a part, to profile
//! ```

#[path = "../tests/support/nats_server.rs"]
mod nats_server;
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream, Message};
use tiered_dedup::consumer::Held;
use tiered_dedup::consumer::{BatchConsumer, Delivery, Disposition};
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Deduper, ExactTier};
use tiered_dedup_consumers::jetstream::{consumer_config, JetStreamConsumer};
use tiered_dedup_consumers::redis_streams::{RedisStreamConsumer, StreamEntry};
use tiered_dedup_consumers::{
    flush_blocking, process_blocking, process_pipelined_blocking, Batching,
};

/// The consumer variants, measured on each broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Handler and ack, no dedup: the baseline.
    NoDedup,
    /// `BatchConsumer` on the memory tier, called on the runtime's worker
    /// (a tier without I/O, a handler that does not block).
    Memory,
    /// The same through `process_blocking` (a blocking thread per batch).
    MemoryBlocking,
    /// `BatchConsumer` on a Redis tier, shared keys, through
    /// `process_blocking`.
    Redis,
    /// The same, pipelined (`process_pipelined_blocking`): a batch's
    /// commits go with the next batch's claims, one round trip per batch.
    RedisPipelined,
    /// The hand-written peer: `SET key 1 NX EX window` per message, then the
    /// handler when it was new, then the ack.
    SetNx,
}

const VARIANTS: [Variant; 6] = [
    Variant::NoDedup,
    Variant::Memory,
    Variant::MemoryBlocking,
    Variant::Redis,
    Variant::RedisPipelined,
    Variant::SetNx,
];

/// The dedup window (the `SET NX` peer's `EX`).
const WINDOW: Duration = Duration::from_secs(86_400);

/// Batches of `TD_BENCH_BATCH` messages at most (default 256, the
/// adapters' default), 1 ms linger.
fn batching() -> Batching {
    Batching {
        max: env("TD_BENCH_BATCH", 256) as usize,
        ..Batching::default()
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Business keys: each one with probability 1/5 a repeat of a uniformly
/// chosen earlier one (seeded xorshift).
fn keys(n: u64) -> Vec<String> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut out: Vec<String> = Vec::with_capacity(n as usize);
    for i in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        if i > 0 && s % 5 == 0 {
            let k = out[(s >> 8) as usize % out.len()].clone();
            out.push(k);
        } else {
            out.push(format!("order-{i}"));
        }
    }
    out
}

/// The engine of a dedup variant, sized for the run's keys, its records
/// under a namespace of its own.
fn engine(variant: Variant, redis_url: &str, run: &str, n: u64) -> Arc<BatchConsumer> {
    let b = Deduper::builder()
        .namespace(run)
        .window(WINDOW)
        .expected_keys(n.max(10_000));
    let b = if matches!(variant, Variant::Redis | Variant::RedisPipelined) {
        b.exact_tier(ExactTier::Custom(Arc::new(RedisTier::new(
            RedisConfig::new(redis_url),
        ))))
        .affinity(Affinity::Shared)
        .shards(1)
    } else {
        b
    };
    Arc::new(BatchConsumer::new(Arc::new(b.build().unwrap())))
}

type Handler<M> = dyn Fn(&M) -> Result<Vec<u8>, ()> + Send + Sync;
type OnConflict<M> = dyn Fn(&M) + Send + Sync;

/// A connection whose commands may wait 10 s for their answer (the
/// client's default, 500 ms, fails a pass when the shared machine stalls
/// the server for a moment).
async fn connect(client: &redis::Client) -> redis::aio::MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// The `SET NX EX` peer's claim: true when the key was new.
async fn set_nx(redis: &mut redis::aio::MultiplexedConnection, key: String) -> bool {
    let fresh: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(WINDOW.as_secs())
        .query_async(redis)
        .await
        .unwrap();
    fresh.is_some()
}

/// One batch through a dedup variant: on the runtime's worker (memory),
/// through `process_blocking`, or pipelined, its commits held for the next
/// batch and flushed when `flush` (a short read, after which the next may
/// wait, or the last batch).
async fn dedup_batch<M: Send + 'static>(
    variant: Variant,
    dedup: &Arc<BatchConsumer>,
    held: &mut Held<M>,
    deliveries: Vec<Delivery<M>>,
    (handler, none): (&Arc<Handler<M>>, &Arc<OnConflict<M>>),
    flush: bool,
) -> Vec<(M, Disposition)> {
    match variant {
        Variant::Memory => dedup.process(deliveries, |m| handler(m), |m| none(m)),
        Variant::RedisPipelined => {
            let (mut settled, rest) =
                process_pipelined_blocking(dedup, std::mem::take(held), deliveries, handler, none)
                    .await
                    .unwrap();
            *held = rest;
            if flush {
                let flushed = flush_blocking(dedup, std::mem::take(held));
                settled.extend(flushed.await.unwrap());
            }
            settled
        }
        _ => process_blocking(dedup, deliveries, handler, none)
            .await
            .unwrap(),
    }
}

/// What one measured pass did: messages/s and handler runs.
struct Pass {
    rate: f64,
    effects: u64,
}

async fn jetstream_pass(
    js: &jetstream::Context,
    variant: Variant,
    redis_url: &str,
    n: u64,
    run: &str,
) -> Pass {
    let stream = js.get_stream("bench").await.unwrap();
    let consumer = stream
        .create_consumer(consumer_config(run, Duration::from_secs(30)))
        .await
        .unwrap();
    let mut source = JetStreamConsumer::new(&consumer, batching()).await.unwrap();
    let dedup = engine(variant, redis_url, run, n);
    let effects = Arc::new(AtomicU64::new(0));
    let e = Arc::clone(&effects);
    let handler: Arc<Handler<Message>> = Arc::new(move |_m: &Message| {
        e.fetch_add(1, Ordering::Relaxed);
        Ok(Vec::new())
    });
    let none: Arc<OnConflict<Message>> = Arc::new(|_| {});
    let mut redis = connect(&redis::Client::open(redis_url).unwrap()).await;
    let limit = Duration::from_secs(300);
    let max = batching().max;
    let mut held = Held::new();
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        assert!(
            start.elapsed() < limit,
            "jetstream {variant:?}: {done} of {n} in {limit:?}"
        );
        let batch = source.next_batch().await.unwrap();
        done += batch.len() as u64;
        match variant {
            Variant::NoDedup => {
                for m in &batch {
                    handler(m).unwrap();
                    m.ack().await.unwrap();
                }
            }
            Variant::SetNx => {
                for m in &batch {
                    let key = format!("{run}:{}", String::from_utf8_lossy(&m.payload));
                    if set_nx(&mut redis, key).await {
                        handler(m).unwrap();
                    }
                    m.ack().await.unwrap();
                }
            }
            Variant::Memory
            | Variant::MemoryBlocking
            | Variant::Redis
            | Variant::RedisPipelined => {
                let short = batch.len() < max;
                let deliveries = batch
                    .into_iter()
                    .map(|m| Delivery::new(m.payload.clone(), m))
                    .collect();
                let settled = dedup_batch(
                    variant,
                    &dedup,
                    &mut held,
                    deliveries,
                    (&handler, &none),
                    short || done >= n,
                )
                .await;
                source.settle(settled).await.unwrap();
            }
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    stream.delete_consumer(run).await.unwrap();
    Pass {
        rate,
        effects: effects.load(Ordering::Relaxed),
    }
}

async fn streams_pass(redis_url: &str, variant: Variant, n: u64, run: &str) -> Pass {
    let client = redis::Client::open(redis_url).unwrap();
    let conn = connect(&client).await;
    let mut source = RedisStreamConsumer::new(
        conn,
        "bench",
        run,
        "c1",
        batching(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let dedup = engine(variant, redis_url, run, n);
    let effects = Arc::new(AtomicU64::new(0));
    let e = Arc::clone(&effects);
    let handler: Arc<Handler<StreamEntry>> = Arc::new(move |_m: &StreamEntry| {
        e.fetch_add(1, Ordering::Relaxed);
        Ok(Vec::new())
    });
    let none: Arc<OnConflict<StreamEntry>> = Arc::new(|_| {});
    let mut redis = connect(&client).await;
    let limit = Duration::from_secs(300);
    let max = batching().max;
    let mut held = Held::new();
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        assert!(
            start.elapsed() < limit,
            "redis streams {variant:?}: {done} of {n} in {limit:?}"
        );
        let batch = source.next_batch().await.unwrap();
        done += batch.len() as u64;
        match variant {
            Variant::NoDedup => {
                for m in &batch {
                    handler(m).unwrap();
                }
                source.settle(std::iter::empty(), &batch).await.unwrap();
            }
            Variant::SetNx => {
                for m in &batch {
                    let key = format!("{run}:{}", String::from_utf8_lossy(m.field("k").unwrap()));
                    if set_nx(&mut redis, key).await {
                        handler(m).unwrap();
                    }
                }
                source.settle(std::iter::empty(), &batch).await.unwrap();
            }
            Variant::Memory
            | Variant::MemoryBlocking
            | Variant::Redis
            | Variant::RedisPipelined => {
                let short = batch.len() < max;
                let deliveries = batch
                    .into_iter()
                    .map(|m| {
                        let key = m.field("k").unwrap().to_vec();
                        Delivery::new(key, m)
                    })
                    .collect();
                let settled = dedup_batch(
                    variant,
                    &dedup,
                    &mut held,
                    deliveries,
                    (&handler, &none),
                    short || done >= n,
                )
                .await;
                source
                    .settle(settled.iter().map(|(m, d)| (m, d)), std::iter::empty())
                    .await
                    .unwrap();
            }
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _: redis::Value = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg("bench")
        .arg(run)
        .query_async(&mut redis)
        .await
        .unwrap();
    Pass {
        rate,
        effects: effects.load(Ordering::Relaxed),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Per variant, one rate per round.
struct Rounds {
    broker: &'static str,
    rates: Vec<[f64; 6]>,
}

impl Rounds {
    fn index(v: Variant) -> usize {
        VARIANTS.iter().position(|&w| w == v).unwrap()
    }

    fn median_rate(&self, v: Variant) -> f64 {
        median(self.rates.iter().map(|r| r[Self::index(v)]).collect())
    }

    /// The median over rounds of `a`'s rate over `b`'s.
    fn ratio(&self, a: Variant, b: Variant) -> f64 {
        median(
            self.rates
                .iter()
                .map(|r| r[Self::index(a)] / r[Self::index(b)])
                .collect(),
        )
    }

    fn report(&self) {
        use Variant::*;
        println!(
            "{:<14} {:<14} {:>11}  {:>9}  {:>8}",
            "broker", "variant", "msg/s", "/no-dedup", "/SET NX"
        );
        for v in VARIANTS {
            println!(
                "{:<14} {:<14} {:>11.0}  {:>8.3}x  {:>7.2}x",
                self.broker,
                format!("{v:?}"),
                self.median_rate(v),
                self.ratio(v, NoDedup),
                self.ratio(v, SetNx),
            );
        }
        println!(
            "{:<14} goals: memory {:.3}x no-dedup ({:.3}x blocking) (>= 0.85), Redis {:.3}x ({:.3}x pipelined) (>= 0.70), Redis {:.2}x SET NX (>= 5)",
            self.broker,
            self.ratio(Memory, NoDedup),
            self.ratio(MemoryBlocking, NoDedup),
            self.ratio(Redis, NoDedup),
            self.ratio(RedisPipelined, NoDedup),
            self.ratio(Redis, SetNx),
        );
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let smoke = args.iter().any(|a| a == "--test");
    let n = if smoke {
        2_000
    } else {
        env("TD_BENCH_MESSAGES", 50_000)
    };
    let rounds = if smoke {
        1
    } else {
        env("TD_BENCH_ROUNDS", 5).max(1)
    };
    // Profiling: one broker (`TD_BENCH_BROKER=jetstream|redis-streams`),
    // some variants (`TD_BENCH_VARIANTS=NoDedup,Memory`).
    let broker = std::env::var("TD_BENCH_BROKER").unwrap_or_default();
    let only: Vec<String> = std::env::var("TD_BENCH_VARIANTS")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let nats = nats_server::NatsServer::start();
    let redis = redis_server::RedisServer::start();
    let redis_url = redis.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let keys = keys(n);
        let distinct = keys.iter().collect::<std::collections::HashSet<_>>().len() as u64;
        // JetStream: one stream, a fresh durable consumer per pass.
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client);
        js.create_stream(stream::Config {
            name: "bench".into(),
            subjects: vec!["bench".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        for chunk in keys.chunks(1000) {
            let mut acks = Vec::with_capacity(chunk.len());
            for k in chunk {
                acks.push(js.publish("bench", k.clone().into()).await.unwrap());
            }
            for a in acks {
                a.await.unwrap();
            }
        }
        // Redis Streams: one stream, a fresh group per pass.
        let mut conn = connect(&redis::Client::open(redis_url.as_str()).unwrap()).await;
        for chunk in keys.chunks(1000) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("XADD")
                    .arg("bench")
                    .arg("*")
                    .arg("k")
                    .arg(k)
                    .ignore();
            }
            let () = pipe.query_async(&mut conn).await.unwrap();
        }
        println!(
            "{n} messages, {distinct} distinct keys, batches of {}; {rounds} paired rounds; load {}",
            batching().max,
            load()
        );
        let mut js_rounds = Rounds {
            broker: "jetstream",
            rates: Vec::new(),
        };
        let mut rs_rounds = Rounds {
            broker: "redis-streams",
            rates: Vec::new(),
        };
        for round in 0..rounds {
            let mut js_rates = [0.0; 6];
            let mut rs_rates = [0.0; 6];
            for k in 0..VARIANTS.len() {
                let i = (k + round as usize) % VARIANTS.len();
                let v = VARIANTS[i];
                if !only.is_empty() && !only.contains(&format!("{v:?}")) {
                    continue;
                }
                let expected = if v == Variant::NoDedup { n } else { distinct };
                if broker != "redis-streams" {
                    let p =
                        jetstream_pass(&js, v, &redis_url, n, &format!("js-{v:?}-{round}")).await;
                    assert_eq!(p.effects, expected, "{v:?}: handler runs");
                    js_rates[i] = p.rate;
                }
                if broker != "jetstream" {
                    let p = streams_pass(&redis_url, v, n, &format!("rs-{v:?}-{round}")).await;
                    assert_eq!(p.effects, expected, "{v:?}: handler runs");
                    rs_rates[i] = p.rate;
                }
            }
            println!(
                "round {round}: jetstream {:?}  redis-streams {:?}  (msg/s, {VARIANTS:?})",
                js_rates.map(|r| r.round()),
                rs_rates.map(|r| r.round()),
            );
            js_rounds.rates.push(js_rates);
            rs_rounds.rates.push(rs_rates);
        }
        js_rounds.report();
        rs_rounds.report();
        println!("load at the end {}", load());
    });
}
