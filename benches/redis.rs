//! The Redis exact tier end to end against the Redis dedup its peers do, on
//! one private `redis-server` (started here on a free 127.0.0.1 port,
//! stopped at the end) sharing the machine's cores with the engine:
//!
//! - `engine/owned`: `Deduper::check_batch` of 4096 keys, marks batched
//!   32768 per shard (one pipeline per flush), warm filter, final flush
//!   included; the manual clock advances so the stream spans 99% of the
//!   window (the slices' hashes get the keys they were sized for);
//! - `engine/shared`: the same in shared mode (one claim script per shard
//!   per batch: the verdict waits for Redis);
//! - `engine/owned-2-threads`, `engine/shared-2-threads`: the same with two
//!   threads sharing one engine, each over half the stream;
//! - `set-nx/per-key`: one `SET key 1 NX PX` per round trip (Redpanda
//!   Connect's `dedupe`), on a subsample;
//! - `set-nx/pipelined-1000`: pipelined batches of 1000 `SET NX PX`.
//!
//! Workload: N keys, 10% of them repeats of an earlier key (uniform), keys
//! are 64-bit ids scattered by a bijection; the peers store the key's
//! 16-byte fingerprint (no prefix) so keys cost the same bytes. Each
//! iteration starts from an empty Redis. After criterion's figures a
//! summary prints keys/s (median of the iterations), the ratios, and Redis
//! `used_memory` per key for each layout.
//!
//! `cargo bench --features redis --bench redis` (N = 10⁶);
//! `TD_BENCH_LARGE=1` for N = 10⁷; `TD_BENCH_KEYS_PER_HASH=0` for one Redis
//! hash per slice instead of the default record strings; `TD_BENCH_MARK_BATCH=N`
//! for N marks per shard per flush instead of 32768.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

mod support;
use support::{
    engine_on, env_number, growing_stream, large, manual_clock, median, Until, BATCH, STREAM_SPAN,
    WINDOW,
};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use redis::Value;
use redis_server::RedisServer;
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Deduper, ExactTier};

/// Marks queued per shard before a flush: `TD_BENCH_MARK_BATCH`, default
/// 32768 (Redis's cost per key falls with the marks per bucket per flush).
fn mark_batch() -> usize {
    env_number("TD_BENCH_MARK_BATCH").unwrap_or(32_768)
}
const PIPELINE: usize = 1000;
const PER_KEY_SAMPLE: usize = 50_000;

fn stream_len() -> usize {
    if large() {
        10_000_000
    } else {
        1_000_000
    }
}

/// `n` keys, each a repeat of a uniformly chosen earlier key with
/// probability 1/10; returns the keys and the number of distinct ones.
fn stream(n: usize) -> (Vec<u64>, usize) {
    let (keys, distinct) = growing_stream(1, Until::Keys(n));
    (keys, distinct as usize)
}

/// What each measurement saw: per-key seconds (wall, client CPU, Redis
/// CPU) of every iteration, and Redis bytes per distinct key after it.
#[derive(Default)]
struct Findings {
    secs_per_key: BTreeMap<&'static str, Vec<[f64; 3]>>,
    bytes_per_key: BTreeMap<&'static str, f64>,
}

struct Bench {
    server: RedisServer,
    conn: redis::Connection,
    keys: Vec<u64>,
    distinct: usize,
    /// The keys as the peers store them.
    fingerprints: Vec<[u8; 16]>,
    findings: Arc<Mutex<Findings>>,
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
#[cfg(target_os = "linux")]
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(Duration::from_secs_f64(ticks as f64 / hz.max(1) as f64))
}

#[cfg(not(target_os = "linux"))]
fn cpu_time(_: &str) -> Option<Duration> {
    None
}

/// Wall time and the CPU time of this process and of `redis-server` over
/// one measurement.
struct Meter {
    redis_pid: String,
    start: Instant,
    client: Option<Duration>,
    server: Option<Duration>,
}

/// What a [`Meter`] read.
struct Measured {
    wall: Duration,
    client_cpu: Option<Duration>,
    redis_cpu: Option<Duration>,
}

impl Meter {
    fn start(redis_pid: u32) -> Meter {
        let redis_pid = redis_pid.to_string();
        Meter {
            client: cpu_time("self"),
            server: cpu_time(&redis_pid),
            redis_pid,
            start: Instant::now(),
        }
    }

    fn stop(self) -> Measured {
        let wall = self.start.elapsed();
        let since = |before: Option<Duration>, now: Option<Duration>| Some(now? - before?);
        Measured {
            wall,
            client_cpu: since(self.client, cpu_time("self")),
            redis_cpu: since(self.server, cpu_time(&self.redis_pid)),
        }
    }
}

fn used_memory(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("memory").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO memory has used_memory")
}

impl Bench {
    fn new() -> Bench {
        let server = RedisServer::start();
        let conn = server.connection();
        let (keys, distinct) = stream(stream_len());
        let namespace = Deduper::builder().build().unwrap();
        let fingerprints = keys
            .iter()
            .map(|k| namespace.fingerprint(k).to_bytes())
            .collect();
        Bench {
            server,
            conn,
            keys,
            distinct,
            fingerprints,
            findings: Arc::default(),
        }
    }

    fn flush_all(&mut self) -> u64 {
        let _: () = redis::cmd("FLUSHALL").query(&mut self.conn).unwrap();
        used_memory(&mut self.conn)
    }

    fn meter(&self) -> Meter {
        Meter::start(self.server.pid())
    }

    fn record(&self, name: &'static str, m: &Measured, keys: usize, bytes: Option<f64>) {
        let per_key = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() / keys as f64);
        let mut f = self.findings.lock().unwrap();
        f.secs_per_key.entry(name).or_default().push([
            m.wall.as_secs_f64() / keys as f64,
            per_key(m.client_cpu),
            per_key(m.redis_cpu),
        ]);
        if let Some(b) = bytes {
            f.bytes_per_key.insert(name, b);
        }
    }

    /// The whole stream through an engine on the Redis tier; returns the
    /// time from the first batch to the last mark written.
    fn engine(&mut self, affinity: Affinity) -> Duration {
        self.engine_threads(affinity, 1)
    }

    fn engine_threads(&mut self, affinity: Affinity, threads: usize) -> Duration {
        let clock = manual_clock();
        let mut config = RedisConfig::new(&self.server.url());
        if let Some(n) = env_number("TD_BENCH_KEYS_PER_HASH") {
            config.keys_per_hash = Some(n);
        }
        let tier = RedisTier::new(config);
        let stats = tier.stats();
        let d = engine_on(&clock, self.distinct as u64)
            .mark_batch(mark_batch())
            .affinity(affinity)
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap();
        if affinity == Affinity::Owned {
            // A fresh engine on a persistent tier has a cold filter until a
            // window has passed: let it pass (steady state is measured).
            let warm: Vec<u64> = (0..BATCH as u64).map(|i| !i).collect();
            d.check_batch(&warm);
            d.flush().expect("a healthy tier stores every mark");
            clock.advance(WINDOW + Duration::from_secs(1));
            d.maintain();
        }
        let before = self.flush_all();
        // Keys arrive at the rate the engine was sized for: the stream
        // spans 99% of the window, so its marks spread over the slices
        // (each slice's hashes then hold what they were sized for).
        let step = WINDOW.mul_f64(STREAM_SPAN) / self.keys.len().div_ceil(BATCH) as u32;
        let meter = self.meter();
        let new: usize = std::thread::scope(|s| {
            let d = &d;
            let clock = &clock;
            let handles: Vec<_> = self
                .keys
                .chunks(self.keys.len().div_ceil(threads))
                .map(|part| {
                    s.spawn(move || {
                        let mut out = Vec::with_capacity(BATCH);
                        let mut new = 0;
                        for chunk in part.chunks(BATCH) {
                            clock.advance(step);
                            d.check_batch_into(chunk, &mut out);
                            new += out.iter().filter(|v| v.is_new()).count();
                        }
                        new
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        d.flush().expect("a healthy tier stores every mark");
        let m = meter.stop();
        assert_eq!(
            new,
            self.distinct,
            "{affinity:?}: verdicts ({} Redis failures, last: {:?})",
            stats.failures.load(std::sync::atomic::Ordering::Relaxed),
            stats.last_error()
        );
        assert_eq!(
            stats.failures.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{affinity:?}: a Redis request failed"
        );
        let bytes = (used_memory(&mut self.conn) - before) as f64 / self.distinct as f64;
        let name = match (affinity, threads) {
            (Affinity::Owned, 1) => "engine/owned",
            (Affinity::Shared, 1) => "engine/shared",
            (Affinity::Owned, _) => "engine/owned-2-threads",
            (Affinity::Shared, _) => "engine/shared-2-threads",
        };
        self.record(name, &m, self.keys.len(), Some(bytes));
        m.wall
    }

    /// One `SET fp 1 NX PX` per round trip over the first
    /// `PER_KEY_SAMPLE` keys.
    fn set_nx_per_key(&mut self) -> Duration {
        self.flush_all();
        let sample = &self.fingerprints[..PER_KEY_SAMPLE.min(self.fingerprints.len())];
        let ttl = WINDOW.as_millis() as u64;
        let meter = self.meter();
        let mut new = 0;
        for fp in sample {
            let set: Option<String> = redis::cmd("SET")
                .arg(&fp[..])
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ttl)
                .query(&mut self.conn)
                .unwrap();
            new += usize::from(set.is_some());
        }
        let m = meter.stop();
        assert!(new > 0 && new <= sample.len());
        self.record("set-nx/per-key", &m, sample.len(), None);
        m.wall
    }

    /// Pipelined batches of `PIPELINE` `SET fp 1 NX PX` over the stream.
    fn set_nx_pipelined(&mut self) -> Duration {
        let before = self.flush_all();
        let ttl = WINDOW.as_millis() as u64;
        let meter = self.meter();
        let mut new = 0;
        for chunk in self.fingerprints.chunks(PIPELINE) {
            let mut p = redis::pipe();
            for fp in chunk {
                p.cmd("SET")
                    .arg(&fp[..])
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl);
            }
            let replies: Vec<Value> = p.query(&mut self.conn).unwrap();
            new += replies.iter().filter(|v| matches!(v, Value::Okay)).count();
        }
        let m = meter.stop();
        assert_eq!(new, self.distinct, "SET NX verdicts");
        let bytes = (used_memory(&mut self.conn) - before) as f64 / self.distinct as f64;
        self.record("set-nx/pipelined-1000", &m, self.keys.len(), Some(bytes));
        m.wall
    }
}

fn summary(bench: &Bench) {
    let f = bench.findings.lock().unwrap();
    let secs = |name: &str, i: usize| {
        f.secs_per_key
            .get(name)
            .map(|s| median(s.iter().map(|m| m[i])))
    };
    eprintln!(
        "\nredis summary: {} keys ({} distinct, 10% repeats), medians of {} iterations",
        bench.keys.len(),
        bench.distinct,
        f.secs_per_key.values().map(Vec::len).min().unwrap_or(0)
    );
    eprintln!(
        "  {:<24} {:>10} {:>9} {:>12} {:>12} {:>9}",
        "", "keys/s", "ns/key", "client CPU", "Redis CPU", "Redis"
    );
    for name in f.secs_per_key.keys() {
        let [wall, client, server] = [0, 1, 2].map(|i| secs(name, i).unwrap_or(f64::NAN));
        let bytes = f
            .bytes_per_key
            .get(name)
            .map_or(String::new(), |b| format!("{b:.1} B/key"));
        eprintln!(
            "  {name:<24} {:>10.0} {:>9.0} {:>9.0} ns {:>9.0} ns {bytes:>9}",
            1.0 / wall,
            wall * 1e9,
            client * 1e9,
            server * 1e9
        );
    }
    let rate = |name: &str| secs(name, 0).map(|s| 1.0 / s);
    for engine in f.secs_per_key.keys().filter(|n| n.starts_with("engine/")) {
        for peer in ["set-nx/per-key", "set-nx/pipelined-1000"] {
            if let (Some(e), Some(p)) = (rate(engine), rate(peer)) {
                eprintln!("  {engine} / {peer}: {:.2}x", e / p);
            }
        }
    }
}

fn benches(c: &mut Criterion, bench: &mut Bench) {
    let n = bench.keys.len();
    let mut group = c.benchmark_group(format!("redis/{n}-keys/10pct-dup/uniform"));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(n as u64));
    for (name, affinity) in [("owned", Affinity::Owned), ("shared", Affinity::Shared)] {
        group.bench_function(BenchmarkId::new("engine", name), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| bench.engine(affinity)).sum());
        });
    }
    for (name, affinity) in [
        ("owned-2-threads", Affinity::Owned),
        ("shared-2-threads", Affinity::Shared),
    ] {
        group.bench_function(BenchmarkId::new("engine", name), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| bench.engine_threads(affinity, 2)).sum());
        });
    }
    group.bench_function(BenchmarkId::new("set-nx", "pipelined-1000"), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| bench.set_nx_pipelined()).sum());
    });
    group.throughput(Throughput::Elements(PER_KEY_SAMPLE.min(n) as u64));
    group.bench_function(BenchmarkId::new("set-nx", "per-key"), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| bench.set_nx_per_key()).sum());
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut bench = Bench::new();
    benches(&mut c, &mut bench);
    c.final_summary();
    summary(&bench);
}
