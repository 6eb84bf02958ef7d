//! The PostgreSQL tier end to end against what a service would otherwise
//! write, on one private PostgreSQL cluster started here (default settings:
//! fsync and `synchronous_commit` on; a free 127.0.0.1 port; stopped at the
//! end) sharing the machine's cores with the engine. Paired rounds: each
//! round runs every pass once from empty tables, back to back, and the
//! report is the median of each pass and of the per-round ratios.
//!
//! Dedup of a stream (N keys, 10% repeats of an earlier key):
//! - `engine, owned`: `Deduper::check_batch` of 4096 keys on the tier,
//!   marks batched 32 768 per shard (one `INSERT … unnest … ON CONFLICT`
//!   per flush), warm filter, final flush included (1 and 2 threads);
//! - `engine, shared`: shared keys (every key claimed in the database, one
//!   transaction per shard per batch), on a tenth of the stream;
//! - `engine, owned, marks in the call`: the same on 1 thread with
//!   `PgConfig::pipeline_marks(false)` (each mark batch written in the
//!   engine's call), beside the pipelined default;
//! - `insert per message`: one `INSERT … ON CONFLICT DO NOTHING` per key in
//!   its own round trip and transaction — what a per-message dedup step
//!   does — on a sample (and the same with `synchronous_commit = off`);
//! - `insert batched`: the same statement over `unnest` of 4096 keys (what
//!   a careful service writes by hand, without the filter).
//!
//! Effects (one row each) under transactional claims, N per transaction,
//! beside the same effects written without dedup: the overhead of
//! exactly-once.
//!
//! Bytes per record on disk: the ring partitions' heap and index
//! (`pg_total_relation_size`) over the distinct keys.
//!
//! Expiry, once at the end: one slice's records removed by `TRUNCATE` of
//! its ring partition (the tier) against `DELETE` from a table sliced by an
//! index, and the `VACUUM` that follows: time and WAL bytes.
//!
//! `cargo bench -p tiered-dedup-postgres --bench postgres` (N = 10⁶, 3
//! rounds: `TD_BENCH_ROUNDS`); `-- --test` for a smoke run (N = 2·10⁴, one
//! round); `TD_BENCH_EXPIRY_ONLY=1` for the expiry measurement alone.

#[path = "../tests/support/pg_server.rs"]
mod pg_server;

#[path = "../../../benches/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use pg_server::PgServer;
use postgres::types::ToSql;
use postgres::Client;
use support::{
    engine_on, env_number, growing_stream, manual_clock, median, paired_rounds, smoke_test, Order,
    Until, BATCH, STREAM_SPAN, WINDOW,
};
use tiered_dedup::{Affinity, ClaimRequest, Deduper, ExactTier, Fingerprint};
use tiered_dedup_postgres::{complete_batch, PgClaims, PgConfig, PgTier, TxClaim};

const MARK_BATCH: usize = 32_768;

/// A fingerprint as a `uuid` parameter.
struct Uuid([u8; 16]);

impl std::fmt::Debug for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x?}", self.0)
    }
}

impl ToSql for Uuid {
    fn to_sql(
        &self,
        _: &postgres::types::Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(postgres::types::IsNull::No)
    }
    fn accepts(ty: &postgres::types::Type) -> bool {
        *ty == postgres::types::Type::UUID
    }
    postgres::types::to_sql_checked!();
}

struct Bench {
    server: PgServer,
    client: Client,
    keys: Vec<u64>,
    distinct: usize,
    fps: Vec<Fingerprint>,
}

impl Bench {
    fn reset(&mut self) {
        self.client
            .batch_execute(
                "DROP TABLE IF EXISTS td_records, td_leases, td_meta, peer, effects CASCADE; \
                 DROP SEQUENCE IF EXISTS td_tokens; \
                 CREATE TABLE peer (fp uuid PRIMARY KEY); \
                 CREATE TABLE effects (key bigint NOT NULL, amount bigint NOT NULL); \
                 CHECKPOINT",
            )
            .unwrap();
    }

    fn tier(&self, pipelined: bool) -> PgTier {
        PgTier::connect(PgConfig::new(&self.server.url()).pipeline_marks(pipelined)).unwrap()
    }

    /// The stream through an engine on the tier (warm, owned or shared) on
    /// `threads` threads; keys per second.
    fn engine(&mut self, affinity: Affinity, threads: usize, n: usize, pipelined: bool) -> f64 {
        self.reset();
        let clock = manual_clock();
        let distinct = self.distinct as u64;
        let d = Arc::new(
            engine_on(&clock, distinct)
                .mark_batch(MARK_BATCH)
                .affinity(affinity)
                .exact_tier(ExactTier::Custom(Arc::new(self.tier(pipelined))))
                .build()
                .unwrap(),
        );
        // Warm: a span has passed since each shard's first key (keys
        // outside the stream's, enough to reach every shard).
        let warmup: Vec<u64> = (0..4_096u64).map(|i| u64::MAX - i).collect();
        let _ = d.check_batch(&warmup[..2_048]);
        clock.advance(WINDOW + WINDOW / 2);
        let _ = d.check_batch(&warmup[2_048..]);
        d.flush().unwrap();
        let keys = &self.keys[..n];
        let step = WINDOW.mul_f64(STREAM_SPAN / (n / BATCH + 1) as f64);
        let started = Instant::now();
        std::thread::scope(|s| {
            for part in keys.chunks(n.div_ceil(threads)) {
                let (d, clock) = (Arc::clone(&d), clock.clone());
                s.spawn(move || {
                    for batch in part.chunks(BATCH) {
                        let verdicts = d.check_batch(batch);
                        assert!(verdicts
                            .iter()
                            .all(|v| !matches!(v, tiered_dedup::Verdict::Unavailable)));
                        if threads == 1 {
                            clock.advance(step);
                        }
                    }
                });
            }
        });
        d.flush().unwrap();
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let st = d.stats();
        eprintln!(
            "[postgres] engine {affinity:?} x{threads}, pipelined {pipelined}: {} exact calls, {:.1} ms in them, {} rotations, {:.0} keys/s",
            st.exact_calls,
            st.exact_call_nanos as f64 / 1e6,
            st.rotations,
            rate
        );
        rate
    }

    /// One `INSERT … ON CONFLICT DO NOTHING` per key, its own round trip
    /// and transaction, on the first `sample` keys.
    fn per_message(&mut self, sample: usize, synchronous: bool) -> f64 {
        self.reset();
        self.client
            .batch_execute(if synchronous {
                "SET synchronous_commit = on"
            } else {
                "SET synchronous_commit = off"
            })
            .unwrap();
        let stmt = self
            .client
            .prepare("INSERT INTO peer VALUES ($1) ON CONFLICT DO NOTHING")
            .unwrap();
        let started = Instant::now();
        for fp in &self.fps[..sample] {
            self.client.execute(&stmt, &[&Uuid(fp.to_bytes())]).unwrap();
        }
        let rate = sample as f64 / started.elapsed().as_secs_f64();
        self.client
            .batch_execute("SET synchronous_commit = on")
            .unwrap();
        rate
    }

    /// The same statement over `unnest` of 4096 keys (answers from
    /// `RETURNING`), no filter.
    fn batched_insert(&mut self, n: usize) -> f64 {
        self.reset();
        let stmt = self
            .client
            .prepare("INSERT INTO peer SELECT * FROM unnest($1::uuid[]) ON CONFLICT DO NOTHING RETURNING fp")
            .unwrap();
        let started = Instant::now();
        for batch in self.fps[..n].chunks(BATCH) {
            let mut seen = std::collections::HashSet::new();
            let fps: Vec<Uuid> = batch
                .iter()
                .filter(|fp| seen.insert(**fp))
                .map(|fp| Uuid(fp.to_bytes()))
                .collect();
            let _new = self.client.query(&stmt, &[&fps]).unwrap();
        }
        n as f64 / started.elapsed().as_secs_f64()
    }

    /// `effects` one-row effects, `per_tx` per transaction: under
    /// transactional claims, or without dedup. Effects per second.
    fn effects(&mut self, effects: usize, per_tx: usize, claimed: bool) -> f64 {
        self.reset();
        let claims = claimed.then(|| {
            PgClaims::builder(PgConfig::new(&self.server.url()))
                .window(WINDOW)
                .build()
                .unwrap()
        });
        let insert = self
            .client
            .prepare("INSERT INTO effects SELECT k, 100 FROM unnest($1::int8[]) AS k")
            .unwrap();
        let started = Instant::now();
        for chunk in (0..effects as u64).collect::<Vec<_>>().chunks(per_tx) {
            let mut tx = self.client.transaction().unwrap();
            let keys: Vec<i64> = match &claims {
                Some(claims) => {
                    let requests: Vec<ClaimRequest<u64>> =
                        chunk.iter().map(|&k| ClaimRequest::new(k)).collect();
                    let answers = claims.claim_batch(&mut tx, &requests).unwrap();
                    let mut keys = Vec::new();
                    let mut leases = Vec::new();
                    for (k, a) in chunk.iter().zip(answers) {
                        if let TxClaim::Acquired(lease) = a {
                            keys.push(*k as i64);
                            leases.push((lease, b"ok"));
                        }
                    }
                    tx.execute(&insert, &[&keys]).unwrap();
                    complete_batch(&mut tx, leases).unwrap();
                    keys
                }
                None => {
                    let keys: Vec<i64> = chunk.iter().map(|&k| k as i64).collect();
                    tx.execute(&insert, &[&keys]).unwrap();
                    keys
                }
            };
            assert_eq!(keys.len(), chunk.len());
            tx.commit().unwrap();
        }
        effects as f64 / started.elapsed().as_secs_f64()
    }

    /// Expiring `n` records of one slice, measured once: `TRUNCATE` of a
    /// ring partition (what the tier does) against `DELETE` of the slice's
    /// rows from a table that keeps other slices (with an index on the
    /// slice, and the `VACUUM` it leaves behind). Milliseconds and WAL
    /// bytes of each.
    fn expiry(&mut self, n: usize) -> [(f64, i64); 3] {
        self.reset();
        let c = &mut self.client;
        c.batch_execute(
            "DROP TABLE IF EXISTS ring_t, sliced_d; \
             CREATE TABLE ring_t (fp uuid PRIMARY KEY, slice bigint NOT NULL, at bigint NOT NULL); \
             CREATE TABLE sliced_d (fp uuid NOT NULL, slice bigint NOT NULL, at bigint NOT NULL, PRIMARY KEY (fp, slice)); \
             CREATE INDEX ON sliced_d (slice)",
        )
        .unwrap();
        for table in ["ring_t", "sliced_d"] {
            c.execute(
                &format!(
                    "INSERT INTO {table} SELECT md5(i::text)::uuid, 7, i FROM generate_series(1, $1::int8) AS i"
                ),
                &[&(n as i64)],
            )
            .unwrap();
        }
        // The other, live slice of the sliced table (kept).
        c.execute(
            "INSERT INTO sliced_d SELECT md5(i::text)::uuid, 8, i FROM generate_series(1, $1::int8) AS i",
            &[&(n as i64)],
        )
        .unwrap();
        c.batch_execute("CHECKPOINT").unwrap();
        let timed = |c: &mut Client, sql: &str| {
            let lsn = |c: &mut Client| -> i64 {
                c.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[])
                    .unwrap()
                    .get(0)
            };
            let before = lsn(c);
            let started = Instant::now();
            c.batch_execute(sql).unwrap();
            let ms = started.elapsed().as_secs_f64() * 1e3;
            (ms, lsn(c) - before)
        };
        let truncate = timed(c, "TRUNCATE ring_t");
        let delete = timed(c, "DELETE FROM sliced_d WHERE slice = 7");
        let vacuum = timed(c, "VACUUM sliced_d");
        [truncate, delete, vacuum]
    }

    /// Bytes on disk per distinct key: the records' ring partitions (heap,
    /// index, TOAST) after an owned pass; and the peer table's.
    fn bytes_per_key(&mut self) -> (f64, f64) {
        let records: i64 = self
            .client
            .query_one(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c \
                 WHERE c.relname LIKE 'td\\_records\\_%' AND c.relkind = 'r'",
                &[],
            )
            .unwrap()
            .get(0);
        let peer: i64 = self
            .client
            .query_one("SELECT pg_total_relation_size('peer')", &[])
            .unwrap()
            .get(0);
        (
            records as f64 / self.distinct as f64,
            peer as f64 / self.distinct as f64,
        )
    }
}

fn main() {
    let smoke = smoke_test();
    let n: usize = if smoke {
        20_000
    } else {
        env_number("TD_BENCH_KEYS").unwrap_or(1_000_000)
    };
    let rounds: usize = if smoke {
        1
    } else {
        env_number("TD_BENCH_ROUNDS").unwrap_or(3)
    };
    let (keys, distinct) = growing_stream(1, Until::Keys(n));
    let namespace = Deduper::builder().build().unwrap();
    let fps = keys.iter().map(|k| namespace.fingerprint(k)).collect();
    // TD_BENCH_PG_LOG=<ms>: the server logs statements slower than that,
    // printed at the end (where the time goes).
    let slow_log: Option<u64> = env_number("TD_BENCH_PG_LOG");
    let server = match slow_log {
        Some(ms) => PgServer::start_with(&[
            &format!("log_min_duration_statement={ms}"),
            "shared_preload_libraries=auto_explain",
            &format!("auto_explain.log_min_duration={}", ms * 4),
            "auto_explain.log_analyze=on",
        ]),
        None => PgServer::start(),
    };
    let client = server.client();
    let mut bench = Bench {
        server,
        client,
        keys,
        distinct: distinct as usize,
        fps,
    };
    eprintln!(
        "[postgres] stream: {n} keys, {distinct} distinct; {rounds} rounds; PostgreSQL {}",
        bench
            .client
            .query_one("SHOW server_version", &[])
            .unwrap()
            .get::<_, String>(0)
    );
    if env_number::<u8>("TD_BENCH_EXPIRY_ONLY") == Some(1) {
        let e = bench.expiry(distinct as usize);
        println!(
            "expiring one slice of {distinct} records: TRUNCATE {:.1} ms, {} B of WAL; \
             DELETE {:.1} ms, {} B of WAL, then VACUUM {:.1} ms, {} B",
            e[0].0, e[0].1, e[1].0, e[1].1, e[2].0, e[2].1
        );
        return;
    }
    let sample = (n / 50).clamp(1_000, 20_000);
    let shared_n = n / 10;
    let effects = (n / 10).max(2_000);
    let names = [
        "engine, owned, 1 thread",
        "engine, owned, 2 threads",
        "engine, shared, 1 thread",
        "insert per message (sync commit on)",
        "insert per message (sync commit off)",
        "insert batched by 4096",
        "effects, claimed, 100 per tx",
        "effects, no dedup, 100 per tx",
        "effects, claimed, 1 per tx",
        "effects, no dedup, 1 per tx",
        "engine, owned, 1 thread, marks in the call",
    ];
    let bytes = (std::cell::Cell::new(0.0), std::cell::Cell::new(0.0));
    let b = std::cell::RefCell::new(&mut bench);
    let mut passes: Vec<Box<dyn FnMut() -> f64 + '_>> = vec![
        Box::new(|| {
            let mut b = b.borrow_mut();
            let r = b.engine(Affinity::Owned, 1, n, true);
            bytes.0.set(b.bytes_per_key().0);
            r
        }),
        Box::new(|| b.borrow_mut().engine(Affinity::Owned, 2, n, true)),
        Box::new(|| b.borrow_mut().engine(Affinity::Shared, 1, shared_n, true)),
        Box::new(|| b.borrow_mut().per_message(sample.min(2_000), true)),
        Box::new(|| b.borrow_mut().per_message(sample, false)),
        Box::new(|| {
            let mut b = b.borrow_mut();
            let r = b.batched_insert(n);
            bytes.1.set(b.bytes_per_key().1);
            r
        }),
        Box::new(|| b.borrow_mut().effects(effects, 100, true)),
        Box::new(|| b.borrow_mut().effects(effects, 100, false)),
        Box::new(|| b.borrow_mut().effects(effects / 50, 1, true)),
        Box::new(|| b.borrow_mut().effects(effects / 50, 1, false)),
        Box::new(|| b.borrow_mut().engine(Affinity::Owned, 1, n, false)),
    ];
    let mut refs: Vec<&mut dyn FnMut() -> f64> = passes
        .iter_mut()
        .map(|p| p.as_mut() as &mut dyn FnMut() -> f64)
        .collect();
    let results = paired_rounds(rounds, Order::Alternate, &mut refs, |round, r| {
        eprintln!(
            "[postgres] round {round}: {}",
            r.iter()
                .map(|v| format!("{:.0}", v))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    });
    drop(refs);
    drop(passes);
    println!("\nPostgreSQL tier, {n} keys ({distinct} distinct), medians of {rounds} rounds (per second):");
    for (name, r) in names.iter().zip(&results) {
        println!("  {name:<40} {:>12.0}", median(r.iter().copied()));
    }
    let ratio = |a: usize, b: usize| median((0..rounds).map(|i| results[a][i] / results[b][i]));
    if slow_log.is_some() {
        let b = b.borrow();
        let log = b.server.log();
        let _ = std::fs::write(std::env::temp_dir().join("td-pg-bench.log"), &log);
        let mut by_statement: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
        for line in log.lines() {
            if let Some((_, rest)) = line.split_once("duration: ") {
                let ms: f64 = rest
                    .split(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                let what: String = rest
                    .split_once(": ")
                    .map_or(rest, |x| x.1)
                    .chars()
                    .take(90)
                    .collect();
                let e = by_statement.entry(what).or_default();
                e.0 += 1;
                e.1 += ms;
            }
        }
        let mut v: Vec<_> = by_statement.into_iter().collect();
        v.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        for (what, (n, ms)) in v.iter().take(15) {
            println!("  slow: {n:>5} x, {ms:>9.1} ms  {what}");
        }
    }
    let expiry = b.borrow_mut().expiry(distinct as usize);
    println!(
        "expiring one slice of {distinct} records: TRUNCATE of its ring partition {:.1} ms, {} B of WAL; \
         DELETE of its rows from a table sliced by an index {:.1} ms, {} B of WAL, then VACUUM {:.1} ms, {} B",
        expiry[0].0, expiry[0].1, expiry[1].0, expiry[1].1, expiry[2].0, expiry[2].1
    );
    println!("ratios (median of per-round ratios):");
    println!(
        "  owned 1 / 2 threads vs insert per message, sync on:  {:.1}x / {:.1}x",
        ratio(0, 3),
        ratio(1, 3)
    );
    println!(
        "  owned 1 / 2 threads vs insert per message, sync off: {:.1}x / {:.1}x",
        ratio(0, 4),
        ratio(1, 4)
    );
    println!(
        "  owned 1 / 2 threads vs insert batched by 4096:       {:.2}x / {:.2}x",
        ratio(0, 5),
        ratio(1, 5)
    );
    println!(
        "  owned 1 thread, marks in the call: vs pipelined {:.2}x, vs insert batched {:.2}x",
        ratio(10, 0),
        ratio(10, 5)
    );
    println!(
        "  shared vs insert per message, sync on / off:          {:.1}x / {:.1}x",
        ratio(2, 3),
        ratio(2, 4)
    );
    println!(
        "  claimed effects over unclaimed, 100 / 1 per tx:       {:.2} / {:.2} (throughput ratio)",
        ratio(6, 7),
        ratio(8, 9)
    );
    println!(
        "bytes on disk per distinct key: records {:.1} (heap + primary key), peer table {:.1}",
        bytes.0.get(),
        bytes.1.get()
    );
}
