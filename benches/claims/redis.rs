//! Claims on the Redis tier (feature `redis`) against the idempotency
//! store services write by hand on Redis, on one private `redis-server`
//! (started on a free 127.0.0.1 port, stopped at the end) sharing the
//! machine's cores with the engine. The stream is the claims bench's: 10⁶
//! distinct keys, 10% repeats, every acquired key committed with a
//! 100-byte result.
//!
//! - ours, owned keys: `claim_batch` of 1024 and `commit_batch`, leases
//!   in the engine, records and results written to Redis in batches
//!   (32 768 marks per shard per flush), a warm filter (a window has
//!   passed since the engine started), final flush included;
//! - ours, shared keys: the same through the shards' logs (every claim
//!   and commit appended, results in the slice's hash);
//! - the per-request pattern: a Lua claim (`GET`, else `SET EX` an
//!   in-progress JSON record) then `SET EX` of the completed JSON record
//!   (`{"status":"completed","first_seen":…,"result":"<base64>"}`), one
//!   round trip each, on the first 20 000 keys;
//! - the same pipelined, 1 000 claims per round trip, then the commits
//!   of the acquired ones, 1 000 per round trip.
//!
//! Each pass starts from an empty Redis (`FLUSHALL`). Paired rounds
//! (`TD_BENCH_PAIRED`, default 3) print each pass's keys/s, then the
//! medians, the ratios, Redis CPU per key and Redis bytes per completed
//! record, and the same bytes with an empty result.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use redis::Value;
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Claim, ClaimRequest, Clock, Deduper, Key, Lease, Namespace};

use super::redis_meter::{used_memory, Meter};
use super::redis_server::RedisServer;
use super::support::{env_number, manual_clock, median, smoke_test, spread};
use super::{expect, run_threads, stream, Answers, BATCH, LEASE, RESULT, WINDOW};

const PIPELINE: usize = 1000;
const PER_KEY_SAMPLE: usize = 20_000;

/// The per-request pattern's claim: the stored record if there is one,
/// else the key is taken with an in-progress record (`nil`).
const CLAIM_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  return v
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
";

/// One pass: wall time, Redis CPU, and Redis bytes per completed record.
#[derive(Clone, Copy, Default)]
struct Pass {
    secs: f64,
    keys: usize,
    redis_cpu: f64,
    bytes: f64,
}

impl Pass {
    fn rate(&self) -> f64 {
        self.keys as f64 / self.secs
    }
    fn redis_ns(&self) -> f64 {
        self.redis_cpu * 1e9 / self.keys as f64
    }
}

struct Bench {
    server: RedisServer,
    conn: redis::Connection,
    /// The keys as the hand-written store names them.
    names: Vec<String>,
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Bench {
    fn new() -> Bench {
        let server = RedisServer::start();
        let conn = server.connection();
        let names = stream()
            .0
            .iter()
            .map(|k| format!("idem:{:032x}", k.fingerprint(Namespace::default()).0))
            .collect();
        Bench {
            server,
            conn,
            names,
        }
    }

    fn flush_all(&mut self) -> u64 {
        let _: () = redis::cmd("FLUSHALL").query(&mut self.conn).unwrap();
        used_memory(&mut self.conn)
    }

    fn finish(&mut self, meter: Meter, keys: usize, before: u64, records: u64) -> Pass {
        let m = meter.stop();
        Pass {
            secs: m.wall.as_secs_f64(),
            keys,
            redis_cpu: m.redis_cpu.map_or(f64::NAN, |d| d.as_secs_f64()),
            bytes: (used_memory(&mut self.conn).saturating_sub(before)) as f64 / records as f64,
        }
    }

    /// The whole stream through an engine on the Redis tier.
    fn ours(&mut self, affinity: Affinity, threads: usize, result: &'static [u8]) -> Pass {
        let (keys, distinct) = stream();
        let clock = manual_clock();
        let tier = Arc::new(RedisTier::new(RedisConfig::new(&self.server.url())));
        let tier_stats = tier.stats();
        let d = Deduper::builder()
            .window(WINDOW)
            .expected_keys(*distinct)
            .clock(Clock::Manual(clock.clone()))
            .lease_duration(LEASE)
            .max_result_bytes(RESULT.len())
            .mark_batch(32_768)
            .affinity(affinity)
            .exact_tier(tiered_dedup::ExactTier::Custom(tier))
            .build()
            .expect("bench configuration");
        if affinity == Affinity::Owned {
            // A fresh engine on a persistent tier confirms every key until
            // a window has passed: let it pass (steady state is measured).
            let warm: Vec<u64> = (0..BATCH as u64).map(|i| !i).collect();
            d.check_batch(&warm);
            d.flush().expect("a healthy tier stores every mark");
            clock.advance(WINDOW + Duration::from_secs(1));
            d.maintain();
        }
        let before = self.flush_all();
        let batches = keys.len().div_ceil(BATCH) as f64;
        let step = WINDOW.mul_f64(0.99 / batches);
        let meter = Meter::start(self.server.pid());
        let answers = run_threads(threads, &|batch| {
            clock.advance(step);
            let requests: Vec<ClaimRequest<u64>> =
                batch.iter().map(|&k| ClaimRequest::new(k)).collect();
            let mut answers = Answers::default();
            let mut commits: Vec<(Lease<&Deduper>, &[u8])> = Vec::with_capacity(batch.len());
            for claim in d.claim_batch(&requests) {
                match claim {
                    Claim::Acquired(lease) => commits.push((lease, result)),
                    Claim::Completed { .. } => answers.completed += 1,
                    Claim::InProgress { .. } => answers.in_progress += 1,
                    other => panic!("unexpected {other:?}: {:?}", tier_stats.last_error()),
                }
            }
            for committed in d.commit_batch(commits) {
                committed.expect("a live lease commits");
                answers.acquired += 1;
            }
            answers
        });
        d.flush().expect("a healthy tier stores every mark");
        let pass = self.finish(meter, keys.len(), before, *distinct);
        expect(answers, threads);
        pass
    }

    /// The per-request pattern over `names`, `pipeline` requests per round
    /// trip.
    fn peer(&mut self, count: usize, pipeline: usize, result: &[u8]) -> Pass {
        let before = self.flush_all();
        let claim = redis::Script::new(CLAIM_SCRIPT);
        let hash = claim.get_hash().to_owned();
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(CLAIM_SCRIPT)
            .query(&mut self.conn)
            .unwrap();
        let lease = LEASE.as_secs();
        let window = WINDOW.as_secs();
        let encoded = base64(result);
        let names = &self.names[..count];
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let meter = Meter::start(self.server.pid());
        let mut answers = Answers::default();
        let mut token = 0u64;
        for chunk in names.chunks(pipeline) {
            let mut p = redis::pipe();
            for name in chunk {
                token += 1;
                let held = format!(
                    "{{\"status\":\"in_progress\",\"token\":{token},\"locked_until\":{}}}",
                    started + u128::from(lease) * 1000
                );
                p.cmd("EVALSHA")
                    .arg(&hash)
                    .arg(1)
                    .arg(name)
                    .arg(held)
                    .arg(lease);
            }
            let replies: Vec<Value> = p.query(&mut self.conn).unwrap();
            let mut commits = redis::pipe();
            let mut acquired = 0;
            for (name, reply) in chunk.iter().zip(replies) {
                match reply {
                    Value::Nil => {
                        let done = format!(
                            "{{\"status\":\"completed\",\"first_seen\":{started},\"result\":\"{encoded}\"}}"
                        );
                        commits.cmd("SET").arg(name).arg(done).arg("EX").arg(window);
                        acquired += 1;
                    }
                    Value::BulkString(v) if v.starts_with(b"{\"status\":\"completed\"") => {
                        std::hint::black_box(&v);
                        answers.completed += 1;
                    }
                    Value::BulkString(_) => answers.in_progress += 1,
                    other => panic!("the claim script answered {other:?}"),
                }
            }
            if acquired > 0 {
                let _: Vec<Value> = commits.query(&mut self.conn).unwrap();
                answers.acquired += acquired;
            }
        }
        let distinct = {
            let mut seen: Vec<&String> = names.iter().collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len() as u64
        };
        assert_eq!(
            answers.acquired, distinct,
            "the peer acquired each key once"
        );
        self.finish(meter, count, before, distinct)
    }
}

/// Paired rounds of every pass, then the summary; a criterion group of
/// the 2-thread passes and the pipelined peer.
pub fn redis_claims(c: &mut Criterion) {
    let mut bench = Bench::new();
    let n = bench.names.len();
    let rounds = if smoke_test() {
        1
    } else {
        env_number("TD_BENCH_PAIRED").unwrap_or(3)
    };
    let names = [
        "ours, owned, 1 thread",
        "ours, owned, 2 threads",
        "ours, shared, 1 thread",
        "ours, shared, 2 threads",
        "per-request, pipelined 1000",
        "per-request, one round trip each",
    ];
    let mut all: Vec<Vec<Pass>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        let passes = [
            bench.ours(Affinity::Owned, 1, &RESULT),
            bench.ours(Affinity::Owned, 2, &RESULT),
            bench.ours(Affinity::Shared, 1, &RESULT),
            bench.ours(Affinity::Shared, 2, &RESULT),
            bench.peer(n, PIPELINE, &RESULT),
            bench.peer(PER_KEY_SAMPLE.min(n), 1, &RESULT),
        ];
        for ((name, pass), all) in names.iter().zip(passes).zip(&mut all) {
            eprintln!(
                "[claims-redis] round {round}: {name}: {:.0} k keys/s, Redis CPU {:.0} ns/key, {:.1} B/record",
                pass.rate() / 1e3,
                pass.redis_ns(),
                pass.bytes
            );
            all.push(pass);
        }
    }
    let rate = |i: usize| median(all[i].iter().map(Pass::rate));
    eprintln!(
        "\n[claims-redis] {} keys ({} distinct, 10% repeats), {}-byte results, medians of {rounds} rounds",
        n,
        stream().1,
        RESULT.len()
    );
    eprintln!(
        "  {:<34} {:>10} {:>13} {:>15}",
        "", "keys/s", "Redis CPU/key", "Redis B/record"
    );
    for (i, name) in names.iter().enumerate() {
        eprintln!(
            "  {name:<34} {:>10.0} {:>10.0} ns {:>15.1}",
            rate(i),
            median(all[i].iter().map(Pass::redis_ns)),
            median(all[i].iter().map(|p| p.bytes))
        );
    }
    for (i, name) in names.iter().enumerate().take(4) {
        let ratio = |peer: usize| {
            spread(
                all[i]
                    .iter()
                    .zip(&all[peer])
                    .map(|(o, p)| o.rate() / p.rate()),
            )
        };
        let (pipelined, per_key) = (ratio(4), ratio(5));
        eprintln!(
            "  {name}: {:.2}x pipelined ({:.2}–{:.2}), {:.1}x one round trip each ({:.1}–{:.1})",
            pipelined.median,
            pipelined.min,
            pipelined.max,
            per_key.median,
            per_key.min,
            per_key.max
        );
    }
    let empty: &'static [u8] = &[];
    let owned = bench.ours(Affinity::Owned, 2, empty);
    let shared = bench.ours(Affinity::Shared, 2, empty);
    let peer = bench.peer(n, PIPELINE, empty);
    eprintln!(
        "  Redis bytes per completed record, empty result: owned {:.1}, shared {:.1}, per-request JSON {:.1}",
        owned.bytes, shared.bytes, peer.bytes
    );

    let mut g = c.benchmark_group(format!("claims-redis/n{}_dup10_result100", stream().1));
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(n as u64));
    g.bench_function("ours-owned/2-threads", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| Duration::from_secs_f64(bench.ours(Affinity::Owned, 2, &RESULT).secs))
                .sum()
        });
    });
    g.bench_function("ours-shared/2-threads", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| Duration::from_secs_f64(bench.ours(Affinity::Shared, 2, &RESULT).secs))
                .sum()
        });
    });
    g.bench_function("per-request/pipelined-1000", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| Duration::from_secs_f64(bench.peer(n, PIPELINE, &RESULT).secs))
                .sum()
        });
    });
    g.finish();
}
