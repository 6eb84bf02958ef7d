//! `RedisTier`: the shared, durable exact tier (feature `redis`).
//!
//! **Owned keys.** Each (namespace, shard, slice) is cut into `B`
//! buckets, Redis keys `{prefix}:{<namespace>:<shard>}:<slice>:<bucket>`
//! in hex, the bucket being the fingerprint's high half scaled onto `B`. A
//! mark is the 16 fingerprint bytes and the first-accepted time as 8
//! big-endian bytes, stored one of two ways:
//! - **record strings** (the default): a bucket is a string of 24-byte
//!   records, written with `APPEND` (all of a flush's marks for one bucket
//!   in one argument) and read whole with `MGET` (one command for a lookup
//!   batch); the newest record of a fingerprint wins. Redis does no search
//!   and no per-field work: in the Redis bench it spends 0.3–0.7 µs per key
//!   where small hashes cost 0.8–1.3, at about 31 bytes per key once a
//!   slice's strings are compacted (`APPEND` grows them by doubling
//!   meanwhile);
//!   The body of a committed claim (its payload fingerprint and result)
//!   goes to the slice's body hash `…:b:<slice>` in the same pipeline,
//!   before its record, which is flagged as having one: a lookup still
//!   reads strings of 24-byte records, then fetches the bodies of the
//!   records it found (one `HMGET` per slice) — see `records.rs`;
//! - **hashes** (`keys_per_hash: Some(0)`, or a namespace an older version
//!   wrote): fields are fingerprints, values times (and bodies).
//!
//! `B` is chosen for about 51 keys per bucket at the expected rate, so a
//! lookup reads about 1.2 kB. The first engine to use a shard writes its
//! layout (`B`, or `records:B`) to `{prefix}:{<namespace>:<shard>}:layout`;
//! every engine that connects later adopts it, so engines sized
//! differently (or a restart with another estimate) still look in the same
//! buckets.
//!
//! **Shared keys** (no key affinity: any engine may see any key) are kept
//! as one **log** per shard, `{prefix}:{<namespace>:<shard>}:log` (a Redis
//! stream), its layout `log:<window>:<span>`: every claim, check, commit,
//! release, extension and forget of a shard's batch is appended as one
//! entry, and the same request reads the log back from where this engine
//! stopped (one pipeline: the read, then a `MULTI`/`EXEC` transaction that
//! appends; on a cluster one script, `CLUSTER_LOG_SCRIPT`); each engine replays the log into a replica of
//! the shard's state in its own memory and answers its operations from
//! what they meet there. The log's order is the atomicity — every replica
//! that applied the same entries holds the same state — and Redis does no
//! work per key beyond storing and sending the bytes: 190 ns of Redis CPU
//! per key where the earlier claim script, which looked each key up in
//! every live slice's hash, took 5–7 µs (`docs/benchmarks.md`). A check
//! costs 25 bytes in the log. The costs move to the engines: each holds a
//! replica of its shards (the keys of every engine, about 30 bytes per key
//! in the window) and reads every engine's operations. Engines sharing
//! keys must agree on the window and lateness (they judge each other's
//! operations): the layout key says which, and an engine that differs is
//! refused with a message, as is a shared engine on an owned namespace and
//! the other way round. A committed result is stored in the hash of its
//! acquisition slice (`…:b:<slice>`), fenced by its lease's token.
//!
//! The hash tag `{<namespace>:<shard>}` puts all keys of one shard in one
//! Cluster slot, so every batch is slot-local. A slice's buckets (and its
//! results' hash) are deleted when the engine's rotation retires its slot
//! (engine time: processing or event time); a log is trimmed of entries
//! whose records have all left the window. Every key carries a TTL only as
//! a backstop for an engine that stopped, set when this process first
//! writes a bucket (renewed by every append to a log): by default twice the
//! span plus two slices, and at least an hour, so a clock slower than the
//! wall clock (an event-time replay) never loses a key early. Without a
//! window keys never expire: no TTL, unless [`RedisConfig::ttl`] sets a
//! retention (renewed by every write of a bucket).
//!
//! **Batches, never a round trip per key.** Lookups are one `MGET` (record
//! strings) or one pipeline of `HMGET`s (one per hash needed); marks one
//! pipeline of `APPEND`s or `HSET`s (one per bucket written, each followed
//! by a `PEXPIRE` if this process has not given that bucket a TTL yet). On
//! a single server, replies are read only until the first failure
//! (`Conn::pipeline_fail_fast`; the client's own pipelines read every
//! reply, so a stalled server cost one timeout per command — 17 s per batch
//! in the SIGSTOP tests); on a cluster the same commands run as one script
//! (`APPEND_SCRIPT`, `MARK_SCRIPT`, `LOOKUP_SCRIPT`: one reply; `MGET` is
//! one command there too). On a single server, marks go out on a
//! connection of their own and their replies are read with the next marks,
//! on a flush, or once the engine has been idle for the flush interval:
//! Redis stores one batch while the engine checks the next, and lookups do
//! not queue behind them. A check waits for Redis only for its own
//! requests (a lookup or shared-mode batch it needs, a full batch of
//! marks), up to [`RedisConfig::timeout`]; the engine's idle upkeep, which
//! holds a shard's lock with no check waiting for it, waits at most
//! [`RedisConfig::idle_timeout`] per request (`conn::Wait`). Marks in
//! flight stay indexed, so a lookup that overtakes them is answered from
//! the index. A failure on one connection leaves the other alone. Once a
//! slice stops filling, its record strings are rewritten at their exact
//! size (`COMPACT_SCRIPT`, a chunk per flush).
//!
//! **Servers that would lose keys.** Each connection first asks the
//! server's `maxmemory-policy` and role: a server that evicts keys or a
//! replica is refused, or used with a warning ([`UnsafeServer`]);
//! [`RedisTier::check`] runs the same check for the host at start.
//!
//! **Faults.** A failed call drops the connection; the next one reconnects
//! after an exponential backoff (10 ms … 1 s), failing fast meanwhile. The
//! lookup and mark connections back off on their own (`conn::Link`): a
//! failure of one never delays the other. What a failure means is the
//! [`FailurePolicy`]. Each write's reply says whether Redis stored its
//! marks; marks Redis refused (an error reply: out of memory, no
//! permission, read-only) or whose reply never came are kept in a bounded
//! buffer, still visible to lookups, and retried with the next marks and
//! [`crate::Deduper::flush`] (which returns once Redis has answered them);
//! past the bound they are dropped and counted (marks in flight do not
//! count against it). Until their slice leaves the window, kept and dropped
//! marks make [`crate::Deduper::flush`] fail with their exact count
//! ([`crate::FlushError::Unwritten`]). In shared mode, a key accepted
//! without Redis (fail open, fallback: judged from the replica as last
//! read) is kept the same way and appended to the log once Redis is back.
//! A shared-mode request whose answer was lost may still have run: when
//! the log shows it, a check it recorded is accepted by the caller's retry
//! (whose time then anchors the window), and a lease it acquired is
//! released (see `claims.rs`).

mod claims;
mod config;
mod conn;
mod error;
mod layout;
mod log;
mod lookups;
mod marks;
mod partition;
mod records;
mod replies;
mod scripts;
mod server;
mod stats;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::table::FingerprintTable;
use super::{
    ExactBackend, ExactPartition, Mark, MemoryPartition, PartitionSpec, RecordBody, TierMetric,
};
use crate::error::ExactTierError;
use crate::fingerprint::FingerprintMap;
use crate::time::GENERATIONS;
use claims::SharedLog;
use conn::{Link, Wait};
use layout::{buckets_for, KEYS_PER_HASH};
use replies::InFlight;
use scripts::{APPEND_SCRIPT, COMPACT_SCRIPT, LOOKUP_SCRIPT, MARK_SCRIPT};

pub use config::{FailurePolicy, RedisConfig, UnsafeServer};
pub use server::{NodeInfo, ServerInfo};
pub use stats::RedisStats;

/// The Redis exact tier: give it to
/// [`crate::DeduperBuilder::exact_tier`] as `ExactTier::Custom(Arc::new(tier))`.
#[derive(Debug)]
pub struct RedisTier {
    config: Arc<RedisConfig>,
    stats: Arc<RedisStats>,
    /// How errors name the server (no password).
    server: Arc<str>,
}

impl RedisTier {
    /// A tier with `config`; connections are opened lazily.
    #[must_use]
    pub fn new(config: RedisConfig) -> Self {
        RedisTier {
            server: error::server_name(&config).into(),
            config: Arc::new(config),
            stats: Arc::new(RedisStats::default()),
        }
    }

    /// The tier's counters.
    #[must_use]
    pub fn stats(&self) -> Arc<RedisStats> {
        Arc::clone(&self.stats)
    }

    /// Connects now, as the host's start-up check: is the server there,
    /// are the credentials right, and will it keep accepted keys — its
    /// `maxmemory-policy` must not evict keys, and it must not be a replica
    /// (every master of a Cluster is checked). Connections are otherwise
    /// opened lazily, and each applies the same rule
    /// ([`RedisConfig::unsafe_server`]).
    ///
    /// # Errors
    /// [`ExactTierError::Remote`] when the server cannot be reached (its
    /// cause says why), or would lose accepted keys and the configuration
    /// refuses such a server ([`crate::FailureCause::UnsafeServer`], with
    /// the setting and what to change). What could not be checked (`CONFIG`
    /// disabled) is not an error: [`ServerInfo::unchecked`] says it; nor is
    /// a server without an append-only file: [`ServerInfo::warnings`].
    pub fn check(&self) -> Result<ServerInfo, ExactTierError> {
        let remote = |e: &redis::RedisError| {
            let err = error::remote(&self.server, e);
            self.stats.record(&err);
            err
        };
        let mut conn =
            conn::Conn::open(&self.config, self.config.timeout).map_err(|e| remote(&e))?;
        let info = server::inspect(&mut conn, &self.server).map_err(|e| remote(&e))?;
        server::judge(&info, self.config.unsafe_server, &self.stats, &self.server)
            .inspect_err(|e| self.stats.record(e))?;
        Ok(info)
    }
}

impl ExactBackend for RedisTier {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// The [`RedisStats`] counters, as `tiered_dedup_redis_*` series
    /// (`docs/metrics.md`).
    fn report_metrics(&self, report: &mut dyn FnMut(TierMetric)) {
        let s = &self.stats;
        let counters = [
            ("tiered_dedup_redis_requests_total", &s.requests),
            ("tiered_dedup_redis_failures_total", &s.failures),
            ("tiered_dedup_redis_connects_total", &s.connects),
            (
                "tiered_dedup_redis_degraded_decisions_total",
                &s.degraded_decisions,
            ),
            ("tiered_dedup_redis_marks_written_total", &s.marks_written),
            ("tiered_dedup_redis_marks_dropped_total", &s.marks_dropped),
            ("tiered_dedup_redis_marks_refused_total", &s.marks_refused),
            (
                "tiered_dedup_redis_server_warnings_total",
                &s.server_warnings,
            ),
            (
                "tiered_dedup_redis_server_unchecked_total",
                &s.server_unchecked,
            ),
            (
                "tiered_dedup_redis_server_volatile_total",
                &s.server_volatile,
            ),
            ("tiered_dedup_redis_snapshots_total", &s.snapshots),
            ("tiered_dedup_redis_rebuilds_total", &s.rebuilds),
            (
                "tiered_dedup_redis_own_entries_read_back_total",
                &s.own_entries_read_back,
            ),
        ];
        for (name, value) in counters {
            report(TierMetric::Counter {
                name,
                value: value.load(Ordering::Relaxed),
            });
        }
        report(TierMetric::Gauge {
            name: "tiered_dedup_redis_marks_unsent",
            value: s.marks_unsent.load(Ordering::Relaxed) as f64,
        });
    }

    /// A TTL ([`RedisConfig::ttl`]) under the window plus lateness plus a
    /// slice is refused: a key accepted at the end of a bucket's slice
    /// would leave Redis while still inside the window, and be accepted
    /// twice.
    fn check_spec(&self, spec: &PartitionSpec) -> Result<(), String> {
        let (Some(ttl), Some(span)) = (self.config.ttl, spec.span_nanos) else {
            return Ok(());
        };
        let needed = Duration::from_nanos(span.saturating_add(spec.slice_nanos.unwrap_or(0)));
        if ttl < needed {
            return Err(format!(
                "RedisConfig::ttl of {ttl:?} is shorter than the window plus lateness plus \
                 one slice ({needed:?}): keys would leave Redis inside their window and be \
                 accepted twice; set at least {needed:?}, or leave it None (twice that, at \
                 least an hour)"
            ));
        }
        Ok(())
    }

    fn partition(&self, spec: &PartitionSpec) -> Box<dyn ExactPartition> {
        Box::new(RedisPartition::new(
            Arc::clone(&self.config),
            Arc::clone(&self.stats),
            Arc::clone(&self.server),
            spec,
        ))
    }
}

/// One shard's share of the tier: its connections, the marks not yet
/// stored, and what it knows of the shard's layout. The methods live by
/// concern: `layout.rs` (key names, the agreed layout), `conn.rs`
/// (connections and backoff), `error.rs` (failures with their cause), `marks.rs` (writing marks), `lookups.rs`,
/// `claims.rs` (shared mode), `records.rs` (record strings),
/// `partition.rs` (the [`ExactPartition`] the engine calls).
struct RedisPartition {
    config: Arc<RedisConfig>,
    stats: Arc<RedisStats>,
    /// How errors name the server (no password).
    server: Arc<str>,
    key_base: String,
    /// Where the shard's hash count is agreed (see the module docs).
    layout_key: String,
    /// Hashes per slice: this engine's choice until a connection adopts the
    /// count agreed in Redis.
    buckets: u64,
    /// The slice's buckets are strings of records (owned keys), not hashes:
    /// this engine's choice until a connection adopts the agreed layout.
    records: bool,
    /// Keys are claimed in Redis (shared mode): needs hashes.
    shared: bool,
    /// Hashes (slice, bucket) this process has given a TTL.
    expiring: HashSet<(u64, u64)>,
    window: Option<u64>,
    /// The TTL given to buckets, in ms: with a window a backstop, set at
    /// this process's first write of each; without one, none by default,
    /// or a retention renewed by every write (`renew_ttl`).
    ttl_ms: Option<u64>,
    /// Every write of a bucket renews its TTL (a retention without a
    /// window), not only the first.
    renew_ttl: bool,
    /// Lookups, claims, the layout and deletes (and, on a cluster, marks).
    lookups: Link,
    /// Marks dropped past `max_unsent_marks`, per slot, until the slot's
    /// slice leaves the window: accepted keys Redis will not hold.
    dropped: [u64; GENERATIONS],
    /// Marks not yet written, oldest first, and their index for lookups.
    unsent: Vec<Mark>,
    unsent_index: FingerprintTable,
    /// Bodies of committed claims (fingerprint → record time, body) whose
    /// marks Redis has not acknowledged: written with their marks, read
    /// from here meanwhile.
    bodies: FingerprintMap<(u64, RecordBody)>,
    /// Bodies the last lookup found with its records, for the claim that
    /// asks for them next (`bodies_batch`).
    found_bodies: FingerprintMap<(u64, RecordBody)>,
    /// Records the last lookup found whose bodies are in a body hash
    /// (fingerprint → record time, slice), fetched by `bodies_batch`.
    apart_bodies: FingerprintMap<(u64, u64)>,
    /// Single server: the connection marks are written on. Their replies
    /// are read when the next marks are sent (or on a flush), so Redis
    /// stores one batch while the engine checks the next; lookups use
    /// `lookups` and do not wait behind them, nor for its backoff.
    marks: Link,
    /// Who is waiting for the requests being made (see [`Wait`]).
    wait: Wait,
    /// Marks sent on `marks` whose replies are not read yet: still
    /// "not yet written" (indexed for lookups, retried on a failure).
    in_flight: InFlight,
    /// Single server: retired slices whose buckets are deleted (`UNLINK`)
    /// on the mark connection with the next marks (it was down).
    unlinks: Vec<u64>,
    /// Record strings: slices this process appended to that are still
    /// filling, and finished slices whose strings are being rewritten at
    /// their exact size (`COMPACT_SCRIPT`), with the next bucket to do.
    appended: BTreeSet<u64>,
    compacting: VecDeque<u64>,
    compact_cursor: u64,
    fallback: Option<MemoryPartition>,
    /// Shared mode: the shard's log and its replica (see `claims.rs`).
    log: Option<Box<SharedLog>>,
    /// Shared mode: the batches of the last failed request, if it was
    /// sent (see `claims.rs`, `remember_lost`).
    unanswered: Vec<(u64, Vec<log::LogOp>)>,
    /// One slice, and window plus lateness, in nanoseconds (`None`
    /// without a window).
    slice_nanos: Option<u64>,
    span_nanos: Option<u64>,
    /// The newest slice the engine has named (maps slots to slices).
    current: u64,
    mark_script: redis::Script,
    append_script: redis::Script,
    compact_script: redis::Script,
    lookup_script: redis::Script,
}

impl RedisPartition {
    fn new(
        config: Arc<RedisConfig>,
        stats: Arc<RedisStats>,
        server: Arc<str>,
        spec: &PartitionSpec,
    ) -> Self {
        let slice_ms = spec.slice_nanos.map_or(0, |n| n.div_ceil(1_000_000));
        let span_ms = spec.span_nanos.map_or(0, |n| n.div_ceil(1_000_000));
        let key_base = format!(
            "{}:{{{:x}:{}}}:",
            config.prefix, spec.namespace_seed, spec.shard
        );
        let log = spec.shared.then(|| {
            Box::new(SharedLog::new(
                &key_base,
                spec.shard,
                spec.span_nanos,
                spec.slice_nanos,
                spec.keys_per_slot.saturating_mul(GENERATIONS - 1),
            ))
        });
        RedisPartition {
            stats,
            server,
            layout_key: format!("{key_base}layout"),
            key_base,
            buckets: buckets_for(
                spec.keys_per_slot,
                config
                    .keys_per_hash
                    .unwrap_or(if spec.shared { 0 } else { KEYS_PER_HASH }),
            ),
            records: !spec.shared && config.keys_per_hash != Some(0),
            shared: spec.shared,
            expiring: HashSet::new(),
            window: spec.window_nanos,
            ttl_ms: match (spec.window_nanos, config.ttl) {
                (_, Some(ttl)) => Some((ttl.as_millis() as u64).max(1)),
                (Some(_), None) => Some((2 * (span_ms + 2 * slice_ms)).max(3_600_000)),
                (None, None) => None,
            },
            renew_ttl: spec.window_nanos.is_none(),
            lookups: Link::new(),
            unsent: Vec::new(),
            unsent_index: FingerprintTable::new(),
            bodies: FingerprintMap::default(),
            found_bodies: FingerprintMap::default(),
            apart_bodies: FingerprintMap::default(),
            marks: Link::new(),
            wait: Wait::Check,
            unlinks: Vec::new(),
            appended: BTreeSet::new(),
            compacting: VecDeque::new(),
            compact_cursor: 0,
            in_flight: InFlight::new(),
            dropped: [0; GENERATIONS],
            fallback: (config.policy == FailurePolicy::FallbackToMemory)
                .then(|| MemoryPartition::with_capacity(spec.keys_per_slot)),
            log,
            unanswered: Vec::new(),
            slice_nanos: spec.slice_nanos,
            span_nanos: spec.span_nanos,
            current: 0,
            mark_script: redis::Script::new(MARK_SCRIPT),
            compact_script: redis::Script::new(COMPACT_SCRIPT),
            append_script: redis::Script::new(APPEND_SCRIPT),
            lookup_script: redis::Script::new(LOOKUP_SCRIPT),
            config,
        }
    }
}
