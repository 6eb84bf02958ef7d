//! What the two example consumers share: the command line, JSON keys, the
//! effects (an append-only file, or rows in PostgreSQL written in the
//! claim's transaction), the engine (memory or Redis claims), the publisher's
//! workload, and the summary printed at exit.
#![allow(dead_code)] // each example uses a different part

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tiered_dedup::consumer::{BatchConsumer, ConsumerStats, Delivery, Disposition, Held};
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Deduper, ExactTier};
use tiered_dedup_consumers::transactional::TxConsumer;
use tiered_dedup_consumers::{
    flush_blocking, process_blocking, process_pipelined_blocking, BadMessage,
};
use tiered_dedup_postgres::{PgClaims, PgConfig};

/// Consumes JSON messages keyed by a field, effectively once: claim, act
/// (record the effect), commit, then ack.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    /// The broker's URL (nats://… or redis://…).
    #[arg(long)]
    pub server: String,
    /// The stream's name.
    #[arg(long, default_value = "orders")]
    pub stream: String,
    /// JetStream: the subject published to and consumed.
    #[arg(long, default_value = "orders.new")]
    pub subject: String,
    /// The consumer group (JetStream: the durable pull consumer's name).
    #[arg(long, default_value = "dedup")]
    pub group: String,
    /// This consumer's name within the group.
    #[arg(long, default_value = "consumer-1")]
    pub consumer: String,
    /// The JSON field holding the business key.
    #[arg(long, default_value = "order_id")]
    pub key: String,
    /// Where effects go: `postgres://…` (an effect row and the claim in one
    /// transaction: exactly once) or a FILE (append-only; claims in memory,
    /// or in Redis with --redis).
    #[arg(long)]
    pub effects: Option<String>,
    /// Claims in Redis at this URL (shared by every consumer of the group),
    /// with file effects. Default: claims in this process's memory.
    #[arg(long)]
    pub redis: Option<String>,
    /// Publish N messages (20% repeat an earlier business key under a new
    /// broker message id), print `published N distinct D`, and exit.
    #[arg(long)]
    pub publish: Option<u64>,
    /// The publisher's seed (business keys are `order-<seed>-<i>`).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Claim lease, milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub lease_ms: u64,
    /// JetStream: AckWait; Redis Streams: idle time before XAUTOCLAIM takes
    /// a pending entry. Milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub ack_wait_ms: u64,
    /// JetStream: the stream's own duplicate window (Nats-Msg-Id), ms.
    #[arg(long, default_value_t = 120_000)]
    pub dup_window_ms: u64,
    /// The dedup window, seconds.
    #[arg(long, default_value_t = 86_400)]
    pub window_secs: u64,
    /// The most messages per batch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Exit once no message came for this long, ms (default: run forever).
    #[arg(long)]
    pub idle_exit_ms: Option<u64>,
    /// Sleep this long in the handler per message, µs (a slower effect).
    #[arg(long, default_value_t = 0)]
    pub effect_delay_us: u64,
    /// File effects: send each batch's commits with the next batch's
    /// claims (one request to the claims' tier per batch instead of two);
    /// a batch is acked once the next batch is claimed, or when a read
    /// comes back empty.
    #[arg(long)]
    pub pipelined: bool,
}

impl Args {
    /// Refuses flags that do not go together, before any connection.
    pub fn check(&self) -> Result<(), String> {
        let postgres = self
            .effects
            .as_deref()
            .is_some_and(|e| e.starts_with("postgres://") || e.starts_with("postgresql://"));
        if self.pipelined && postgres {
            return Err(
                "--pipelined applies to file effects: PostgreSQL commits each \
                        batch's claims in its own transaction"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The business key of a JSON message, or why there is none.
pub fn key_of(payload: &[u8], field: &str) -> Result<Vec<u8>, BadMessage> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| BadMessage(format!("not JSON: {e}")))?;
    match v.get(field) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone().into_bytes()),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string().into_bytes()),
        Some(other) => Err(BadMessage(format!("field {field:?} is not a key: {other}"))),
        None => Err(BadMessage(format!("no field {field:?}"))),
    }
}

/// The publisher's workload: `(message id, business key, JSON)` for `n`
/// messages, 20% of which repeat an earlier business key.
pub fn workload(n: u64, seed: u64) -> (Vec<(String, String, Vec<u8>)>, u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut keys: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let key = if i > 0 && next() % 5 == 0 {
            keys[(next() % keys.len() as u64) as usize].clone()
        } else {
            let k = format!("order-{seed}-{i}");
            keys.push(k.clone());
            k
        };
        let json = serde_json::json!({ "order_id": key, "seq": i, "amount": (i % 997) + 1 });
        out.push((
            format!("msg-{seed}-{i}"),
            key,
            json.to_string().into_bytes(),
        ));
    }
    (out, keys.len() as u64)
}

/// Where the handler records its effect.
pub enum Effects {
    /// Append-only lines: `E <pid> <key> <message id>` per effect, and
    /// `C <pid> <message id>…` once those messages' claims are committed
    /// (before their acks): an effect whose message no `C` of its process
    /// names, in a process that was killed, is in the documented
    /// effect-to-commit window.
    File {
        /// The file, opened for appending.
        file: Arc<Mutex<File>>,
        /// The engine's consumer (memory or Redis claims).
        consumer: Arc<BatchConsumer>,
        /// Commits ride with the next batch's claims (`--pipelined`).
        pipelined: bool,
    },
    /// An effect row per message, in the claim's transaction.
    Postgres(Box<TxConsumer>),
    /// Lent to the blocking task running a batch.
    Taken,
}

impl Effects {
    /// From the command line.
    pub fn open(args: &Args) -> Result<Self, Box<dyn std::error::Error>> {
        let target = args
            .effects
            .clone()
            .ok_or("--effects FILE or --effects postgres://… is required to consume")?;
        if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            let claims = PgClaims::builder(PgConfig::new(&target))
                .window(Duration::from_secs(args.window_secs))
                .namespace(&args.stream)
                .build()?;
            let mut client = postgres::Client::connect(&target, postgres::NoTls)?;
            client.batch_execute(
                "CREATE TABLE IF NOT EXISTS consumer_effects (
                    key text NOT NULL, msg_id text NOT NULL, consumer text NOT NULL,
                    at timestamptz NOT NULL DEFAULT now())",
            )?;
            return Ok(Effects::Postgres(Box::new(TxConsumer::new(claims, client))));
        }
        let file = OpenOptions::new().create(true).append(true).open(&target)?;
        let mut builder = Deduper::builder()
            .window(Duration::from_secs(args.window_secs))
            .namespace(&args.stream)
            .lease_duration(Duration::from_millis(args.lease_ms));
        if let Some(url) = &args.redis {
            builder = builder
                .exact_tier(ExactTier::Custom(Arc::new(RedisTier::new(
                    RedisConfig::new(url),
                ))))
                .affinity(Affinity::Shared)
                .shards(1);
        }
        let consumer = BatchConsumer::new(Arc::new(builder.build()?));
        Ok(Effects::File {
            file: Arc::new(Mutex::new(file)),
            consumer: Arc::new(consumer),
            pipelined: args.pipelined,
        })
    }
}

/// Appends one line with one `write` (O_APPEND: lines of concurrent
/// processes never interleave).
pub fn append(file: &Mutex<File>, line: &str) -> std::io::Result<()> {
    file.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .write_all(line.as_bytes())
}

/// Appends `C <pid> <message id>…` naming the messages whose commits were
/// stored (before they are acked); nothing when there are none.
fn mark_committed<M>(file: &Mutex<File>, pid: u32, settled: &[(Keyed<M>, Disposition)]) {
    let mut line = format!("C {pid}");
    let before = line.len();
    for (k, d) in settled {
        if matches!(d, Disposition::Processed) {
            line.push(' ');
            line.push_str(&k.id);
        }
    }
    if line.len() > before {
        line.push('\n');
        let _ = append(file, &line);
    }
}

/// What a consumer did, printed as one JSON line at exit.
pub fn summary(stats: ConsumerStats, bad: u64, acked: u64) -> String {
    serde_json::json!({
        "batches": stats.batches,
        "delivered": stats.delivered,
        "processed": stats.processed,
        "replayed": stats.replayed,
        "in_progress": stats.in_progress,
        "failed": stats.failed,
        "conflicts": stats.conflicts,
        "unavailable": stats.unavailable,
        "uncommitted": stats.uncommitted,
        "bad": bad,
        "acked": acked,
    })
    .to_string()
}

/// A delivery for a keyed message.
pub fn delivery<M>(key: Vec<u8>, message: M) -> Delivery<M> {
    Delivery::new(key, message)
}

/// A message with its business key and broker id.
pub struct Keyed<M> {
    /// The broker's message (acked after the batch).
    pub message: M,
    /// The business key.
    pub key: String,
    /// The broker's message id.
    pub id: String,
}

/// The handler's extra time (`--effect-delay-us`).
fn pause(us: u64) {
    if us > 0 {
        std::thread::sleep(Duration::from_micros(us));
    }
}

impl Effects {
    /// Claims, acts and commits one batch on a blocking thread; answers each
    /// message with its disposition (ack after this returns). Pipelined
    /// (file effects), the batch's commits wait in `held` for the next call
    /// (or [`Effects::flush`]), and the messages answered now are the
    /// previous batch's with this batch's repeats.
    pub async fn run_batch<M: Send + 'static>(
        &mut self,
        batch: Vec<Keyed<M>>,
        held: &mut Held<Keyed<M>>,
        consumer_name: &str,
        delay_us: u64,
    ) -> Result<Vec<(Keyed<M>, Disposition)>, tiered_dedup_consumers::ConsumerError> {
        let deliveries: Vec<Delivery<Keyed<M>>> = batch
            .into_iter()
            .map(|k| Delivery::new(k.key.clone(), k))
            .collect();
        let name = consumer_name.to_owned();
        let pid = std::process::id();
        match self {
            Effects::File {
                file,
                consumer,
                pipelined,
            } => {
                let writer = Arc::clone(file);
                let handler = Arc::new(move |k: &Keyed<M>| {
                    pause(delay_us);
                    append(&writer, &format!("E {pid} {} {}\n", k.key, k.id))
                        .map(|()| k.id.clone().into_bytes())
                });
                let on_conflict = Arc::new(|k: &Keyed<M>| {
                    eprintln!("conflict: key {} (message {})", k.key, k.id);
                });
                let out = if *pipelined {
                    let carried = std::mem::take(held);
                    let (out, rest) = process_pipelined_blocking(
                        consumer,
                        carried,
                        deliveries,
                        &handler,
                        &on_conflict,
                    )
                    .await?;
                    *held = rest;
                    out
                } else {
                    process_blocking(consumer, deliveries, &handler, &on_conflict).await?
                };
                tokio::task::block_in_place(|| mark_committed(file, pid, &out));
                Ok(out)
            }
            Effects::Postgres(_) => {
                let Effects::Postgres(mut tx) = std::mem::replace(self, Effects::Taken) else {
                    unreachable!()
                };
                let (tx, out) = tokio::task::spawn_blocking(move || {
                    let out = tx.process(
                        deliveries,
                        |t, k: &Keyed<M>| {
                            pause(delay_us);
                            t.execute(
                                "INSERT INTO consumer_effects (key, msg_id, consumer) VALUES ($1, $2, $3)",
                                &[&k.key, &k.id, &name],
                            )
                            .map(|_| k.id.clone().into_bytes())
                        },
                        |k: &Keyed<M>| eprintln!("conflict: key {} (message {})", k.key, k.id),
                    );
                    (tx, out)
                })
                .await
                .map_err(|e| tiered_dedup_consumers::ConsumerError::Task(e.to_string()))?;
                *self = Effects::Postgres(tx);
                out
            }
            Effects::Taken => unreachable!("a batch at a time"),
        }
    }

    /// Commits what `held` holds (pipelined file effects: the last batch)
    /// on its own; those messages with their dispositions, to ack.
    pub async fn flush<M: Send + 'static>(
        &mut self,
        held: &mut Held<Keyed<M>>,
    ) -> Result<Vec<(Keyed<M>, Disposition)>, tiered_dedup_consumers::ConsumerError> {
        let Effects::File { file, consumer, .. } = self else {
            return Ok(Vec::new());
        };
        let out = flush_blocking(consumer, std::mem::take(held)).await?;
        tokio::task::block_in_place(|| mark_committed(file, std::process::id(), &out));
        Ok(out)
    }

    /// The counters so far.
    pub fn stats(&self) -> ConsumerStats {
        match self {
            Effects::File { consumer, .. } => consumer.stats(),
            Effects::Postgres(tx) => tx.stats(),
            Effects::Taken => ConsumerStats::default(),
        }
    }
}
