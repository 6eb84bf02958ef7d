//! `RedisTier`: the shared, durable exact tier (feature `redis`).
//!
//! **Layout.** Each (namespace, shard, slice) is cut into `B` buckets,
//! Redis keys `{prefix}:{<namespace>:<shard>}:<slice>:<bucket>` in hex, the
//! bucket being the fingerprint's high half scaled onto `B`. A mark is the
//! 16 fingerprint bytes and the first-accepted time as 8 big-endian bytes,
//! stored one of two ways:
//! - **record strings** (owned keys, the default): a bucket is a string of
//!   24-byte records, written with `APPEND` (all of a flush's marks for one
//!   bucket in one argument) and read whole with `MGET` (one command for a
//!   lookup batch); the newest record of a fingerprint wins. Redis does no
//!   search and no per-field work: in the Redis bench it spends 0.3–0.7 µs
//!   per key where small hashes cost 0.8–1.3, at about 31 bytes per key
//!   once a slice's strings are compacted (`APPEND` grows them by doubling
//!   meanwhile);
//! - **hashes** (shared keys, whose claim script checks and sets one field
//!   atomically; or `keys_per_hash: Some(0)`): fields are fingerprints,
//!   values times.
//!
//! `B` is chosen for about 51 keys per bucket at the expected rate (shared
//! keys keep one hash per slice by default: see
//! [`RedisConfig::keys_per_hash`]), so a lookup reads about 1.2 kB and
//! small hashes would stay in Redis's compact listpack encoding (up to
//! `hash-max-listpack-entries`, 128 by default; one large hash costs 89
//! bytes per key and `SET key 1 NX PX` 115). The first engine to use a
//! shard writes its layout (`B`, or `records:B`) to
//! `{prefix}:{<namespace>:<shard>}:layout`; every engine that connects
//! later adopts it, so engines sized differently (or a restart with another
//! estimate) still look in the same buckets, an owned engine reads and
//! writes the hashes an earlier one left, and a shared engine refuses
//! record strings (its requests fail with a message that says so).
//!
//! The hash tag `{<namespace>:<shard>}` puts all hashes of one shard in one
//! Cluster slot, so every batch is slot-local. A slice's hashes are deleted
//! when the engine's rotation retires its slot (engine time: processing or
//! event time), and carry a TTL only as a backstop for keys of an engine
//! that stopped, set when this process first writes a hash (and refreshed
//! by every shared-mode claim): by default twice the span plus two slices,
//! and at least an hour, so a clock slower than the wall clock (an
//! event-time replay) never loses a key early.
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
//! not queue behind them. Marks in flight stay indexed, so a lookup that
//! overtakes them is answered from the index; a shared-mode claim waits for
//! their replies (and follows the failure policy if they cannot be
//! written). A failure on one connection leaves the other alone. Once a
//! slice stops filling, its record strings are rewritten at their exact
//! size (`COMPACT_SCRIPT`, a chunk per flush).
//! Shared-mode claims are one `EVALSHA` of a script that, per
//! key, checks the live slices and records the key unless it is inside the
//! window — atomically, so two engines never both accept one key.
//!
//! **Faults.** A failed call drops the connection; the next one reconnects
//! after an exponential backoff (10 ms … 1 s), failing fast meanwhile. What a
//! failure means is the [`FailurePolicy`]. Marks that cannot be written are
//! kept in a bounded buffer, still visible to lookups, and retried with the
//! next marks, every shared-mode claim and [`crate::Deduper::flush`] (which
//! returns once Redis has answered them); past the bound they are counted
//! as dropped (marks in flight do not count against it). In shared mode, a key accepted without Redis (fail
//! open, fallback) gets such a mark too, so Redis holds it once it is back.
//! A shared-mode claim whose answer was lost may still have run: its retry
//! recognises the claim's own time and accepts the key (see
//! `UnansweredClaims`).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Cmd, ConnectionLike, Value};

use super::table::FingerprintTable;
use super::{
    slots_newest_first, Claim, ExactBackend, ExactPartition, Lookup, Mark, MemoryPartition,
    TierMetric,
};
use crate::error::ExactTierError;
use crate::fingerprint::Fingerprint;
use crate::time::{slot_of, Timestamp, GENERATIONS};

/// What a Redis failure does to a verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Keys that need Redis get [`crate::Verdict::Unavailable`]: the caller
    /// retries them later. Nothing is accepted that could be a duplicate.
    #[default]
    FailClosed,
    /// Keys that need Redis are treated as new (counted in
    /// [`RedisStats::degraded_decisions`]): availability over exactness.
    FailOpen,
    /// Keys are judged by a local memory tier that holds every mark this
    /// process made (counted in [`RedisStats::degraded_decisions`]); exact
    /// for this process's own keys, blind to other engines' while Redis is
    /// down.
    FallbackToMemory,
}

/// Configures a [`RedisTier`].
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` of a single server, or several seed nodes of
    /// a Redis Cluster (with `cluster: true`).
    pub urls: Vec<String>,
    /// Connect to a Redis Cluster.
    pub cluster: bool,
    /// Prefix of every key. Default: `td`.
    pub prefix: String,
    /// What a failure means. Default: fail closed.
    pub policy: FailurePolicy,
    /// Connect, read and write timeout. Default: 500 ms.
    pub timeout: Duration,
    /// Marks kept for retry while Redis is unreachable, per shard (one
    /// flush in flight comes on top). Default: 100 000.
    pub max_unsent_marks: usize,
    /// Keys one bucket of a slice is sized for (see the module docs): owned
    /// keys' buckets are record strings; `Some(0)` keeps one hash per slice
    /// instead (89–99 bytes per key, 1.1–1.25 µs of Redis CPU per key). The
    /// first engine's choice is stored per shard and adopted by the others.
    /// Default (`None`): 64 for owned keys (about 51 per bucket at the
    /// expected rate); one hash per slice for shared keys, whose claims look
    /// every new key up in each live slice — a full scan of a compact hash,
    /// which made shared mode 2.2× slower (60 against 126 thousand keys/s).
    pub keys_per_hash: Option<usize>,
    /// TTL of a slice's hashes, set when this process first writes each
    /// (refreshed by shared-mode claims); a backstop: slices are deleted
    /// when they expire in engine time. Default: twice the span plus two
    /// slices, at least one hour.
    pub ttl: Option<Duration>,
}

impl RedisConfig {
    /// A single server at `url`, with the defaults.
    #[must_use]
    pub fn new(url: &str) -> Self {
        RedisConfig {
            urls: vec![url.to_owned()],
            cluster: false,
            prefix: "td".to_owned(),
            policy: FailurePolicy::FailClosed,
            timeout: Duration::from_millis(500),
            max_unsent_marks: 100_000,
            keys_per_hash: None,
            ttl: None,
        }
    }

    /// A Redis Cluster reached through `seeds`, with the defaults.
    #[must_use]
    pub fn cluster(seeds: &[&str]) -> Self {
        RedisConfig {
            urls: seeds.iter().map(|s| (*s).to_owned()).collect(),
            cluster: true,
            ..RedisConfig::new("")
        }
    }
}

/// Counters of a Redis tier, shared by its partitions.
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Requests sent (pipelines and scripts).
    pub requests: AtomicU64,
    /// Requests that failed.
    pub failures: AtomicU64,
    /// Connections (re)established.
    pub connects: AtomicU64,
    /// Verdicts decided without Redis under `FailOpen` or `FallbackToMemory`.
    pub degraded_decisions: AtomicU64,
    /// Marks Redis has acknowledged.
    pub marks_written: AtomicU64,
    /// Marks not acknowledged yet: kept for retry while Redis is down, or
    /// one flush in flight (settled by the next flush, or after the flush
    /// interval when idle).
    pub marks_unsent: AtomicU64,
    /// Marks dropped because the retry buffer was full.
    pub marks_dropped: AtomicU64,
}

/// The Redis exact tier: give it to
/// [`crate::DeduperBuilder::exact_tier`] as `ExactTier::Custom(Arc::new(tier))`.
#[derive(Debug)]
pub struct RedisTier {
    config: Arc<RedisConfig>,
    stats: Arc<RedisStats>,
}

impl RedisTier {
    /// A tier with `config`; connections are opened lazily.
    #[must_use]
    pub fn new(config: RedisConfig) -> Self {
        RedisTier {
            config: Arc::new(config),
            stats: Arc::new(RedisStats::default()),
        }
    }

    /// The tier's counters.
    #[must_use]
    pub fn stats(&self) -> Arc<RedisStats> {
        Arc::clone(&self.stats)
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

    fn partition(&self, spec: &super::PartitionSpec) -> Box<dyn ExactPartition> {
        let slice_ms = spec.slice_nanos.map_or(0, |n| n.div_ceil(1_000_000));
        let span_ms = spec.span_nanos.map_or(0, |n| n.div_ceil(1_000_000));
        let key_base = format!(
            "{}:{{{:x}:{}}}:",
            self.config.prefix, spec.namespace_seed, spec.shard
        );
        Box::new(RedisPartition {
            config: Arc::clone(&self.config),
            stats: Arc::clone(&self.stats),
            layout_key: format!("{key_base}layout"),
            key_base,
            buckets: buckets_for(
                spec.keys_per_slot,
                self.config
                    .keys_per_hash
                    .unwrap_or(if spec.shared { 0 } else { KEYS_PER_HASH }),
            ),
            records: !spec.shared && self.config.keys_per_hash != Some(0),
            shared: spec.shared,
            expiring: HashSet::new(),
            window: spec.window_nanos,
            ttl_ms: self
                .config
                .ttl
                .map_or((2 * (span_ms + 2 * slice_ms)).max(3_600_000), |t| {
                    (t.as_millis() as u64).max(1)
                }),
            conn: None,
            retry_at: Instant::now(),
            backoff: Duration::from_millis(10),
            unsent: Vec::new(),
            unsent_index: FingerprintTable::new(),
            mark_conn: None,
            appended: BTreeSet::new(),
            compacting: VecDeque::new(),
            compact_cursor: 0,
            in_flight: InFlight {
                marks: Vec::new(),
                index: FingerprintTable::new(),
                replies: 0,
                fresh: HashSet::new(),
            },
            fallback: (self.config.policy == FailurePolicy::FallbackToMemory)
                .then(|| MemoryPartition::with_capacity(spec.keys_per_slot)),
            unanswered: UnansweredClaims {
                times: HashMap::new(),
                len: 0,
                max: self.config.max_unsent_marks,
                oldest: u64::MAX,
            },
            current: 0,
            script: redis::Script::new(CLAIM_SCRIPT),
            mark_script: redis::Script::new(MARK_SCRIPT),
            compact_script: redis::Script::new(COMPACT_SCRIPT),
            append_script: redis::Script::new(APPEND_SCRIPT),
            lookup_script: redis::Script::new(LOOKUP_SCRIPT),
        })
    }
}

/// Keys one hash of a slice is sized for by default. The engine's slot
/// sizing already has a quarter to spare, so a hash holds about 51 keys at
/// the expected rate and stays in Redis's compact encoding up to 2.5 times
/// that (`hash-max-listpack-entries`, 128 by default; past it Redis
/// converts that one hash, costing memory, not verdicts). Measured with
/// the Redis bench (marks as scripts then): 16 keys per hash cost 2.4–2.8
/// µs of Redis CPU per key (more `HSET` calls), 40 and 100 cost 1.7–1.8 µs,
/// at 37 and 33 B per key.
const KEYS_PER_HASH: usize = 64;

/// Most hashes per slice of a shard (and the most a layout key may name).
const MAX_BUCKETS: u64 = 1 << 20;

/// Hashes per slice for `keys_per_slot` expected keys, `keys_per_hash` in
/// each (`0`: one hash).
fn buckets_for(keys_per_slot: usize, keys_per_hash: usize) -> u64 {
    if keys_per_hash == 0 {
        return 1;
    }
    (keys_per_slot.div_ceil(keys_per_hash) as u64).clamp(1, MAX_BUCKETS)
}

/// On a cluster, writes marks into many hashes in one request (one reply:
/// the cluster client's pipeline of one command per hash would wait out a
/// timeout per command when a server stalls). KEYS: the hashes. ARGV: ttl ms, then per hash: its number
/// of marks `n`, `1` to give it the TTL (else `0`), `n` pairs (fingerprint,
/// time). Arguments go to `HSET` in runs that fit Lua's stack.
const MARK_SCRIPT: &str = r"
local ttl = ARGV[1]
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  local expire = ARGV[i + 1] == '1'
  local j, last = i + 2, i + 1 + 2 * n
  while j <= last do
    local e = math.min(j + 999, last)
    redis.call('HSET', KEYS[k], unpack(ARGV, j, e))
    j = e + 1
  end
  if expire then
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
  i = last + 1
end
return #KEYS
";

/// On a cluster, appends marks to many record strings in one request (one
/// reply, as [`MARK_SCRIPT`]). KEYS: the strings. ARGV: ttl ms, then per
/// string: its records (24 bytes each), `1` to give it the TTL (else `0`).
const APPEND_SCRIPT: &str = r"
local ttl = ARGV[1]
for k = 1, #KEYS do
  redis.call('APPEND', KEYS[k], ARGV[2 * k])
  if ARGV[2 * k + 1] == '1' then
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
end
return #KEYS
";

/// Rewrites record strings of a finished slice at their exact size: `APPEND`
/// grows a string by doubling, so a string written over many flushes holds
/// up to twice its bytes (46 against 30 bytes per key at 10⁷ keys in the
/// Redis bench). Same bytes, same TTL (`KEEPTTL`, Redis ≥ 6.0); absent keys
/// and other types are skipped (`pcall`: a compaction never fails the
/// marks it travels with). KEYS: the strings.
const COMPACT_SCRIPT: &str = r"
for _, k in ipairs(KEYS) do
  local v = redis.pcall('GET', k)
  if type(v) == 'string' then
    redis.pcall('SET', k, v, 'KEEPTTL')
  end
end
return #KEYS
";

/// Buckets one flush compacts (one script per flush).
const COMPACT_CHUNK: u64 = 1024;

/// Reads many hashes in one request (one reply, as [`MARK_SCRIPT`]). KEYS:
/// the hashes. ARGV: per hash, its number of fields `n`, then the `n`
/// fields. Returns every value in order (nil where absent).
const LOOKUP_SCRIPT: &str = r"
local out = {}
local i = 1
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  local j, last = i + 1, i + n
  while j <= last do
    local e = math.min(j + 999, last)
    local values = redis.call('HMGET', KEYS[k], unpack(ARGV, j, e))
    for v = 1, e - j + 1 do
      out[#out + 1] = values[v]
    end
    j = e + 1
  end
  i = last + 1
end
return out
";

/// Claims keys atomically. KEYS: per bucket the claims use, the live slice
/// hashes of that bucket, newest (current) first. ARGV: ttl ms, the number
/// of live slices `L`, then per key: the offset of its bucket's hashes in
/// KEYS, fingerprint, time (8 bytes BE), threshold (8 bytes BE: the oldest
/// first-accepted time still inside the window, or 0 without one). Returns
/// per key the stored time (a duplicate) or `false` (recorded now). Times
/// are compared as two 32-bit halves: Lua numbers are doubles. Redis is
/// asked in bulk — one `HMGET` per live slice (newest first, only for keys
/// no newer slice holds) and one `HSET` per bucket — since a Redis call
/// from Lua costs about a microsecond: a call per key and slice made
/// shared mode 126 thousand keys/s at 10⁷ keys.
const CLAIM_SCRIPT: &str = r"
local ttl = tonumber(ARGV[1])
local live = tonumber(ARGV[2])
local n = (#ARGV - 2) / 4
-- Claim j's arguments: base ARGV[4j - 1], fingerprint ARGV[4j], time
-- ARGV[4j + 1], threshold ARGV[4j + 2]. Claims by bucket (its base).
local groups, bases = {}, {}
for j = 1, n do
  local b = tonumber(ARGV[4 * j - 1])
  local g = groups[b]
  if not g then
    g = {}
    groups[b] = g
    bases[#bases + 1] = b
  end
  g[#g + 1] = j
end
-- The newest stored time of each claim's key: one HMGET per live slice
-- (newest first) for the keys not found in a newer one.
local stored = {}
for _, b in ipairs(bases) do
  local pending = groups[b]
  for k = b + 1, b + live do
    if #pending == 0 then
      break
    end
    local still = {}
    local s = 1
    while s <= #pending do
      local e = math.min(s + 999, #pending)
      local fields = {}
      for q = s, e do
        fields[#fields + 1] = ARGV[4 * pending[q]]
      end
      local values = redis.call('HMGET', KEYS[k], unpack(fields))
      for q = s, e do
        local v = values[q - s + 1]
        if v then
          stored[pending[q]] = v
        else
          still[#still + 1] = pending[q]
        end
      end
      s = e + 1
    end
    pending = still
  end
end
-- In order: a key is inside the window if its newest time (a copy
-- claimed earlier in this batch counts) reaches the threshold.
local out, claimed, writes = {}, {}, {}
for j = 1, n do
  local fp, at, threshold = ARGV[4 * j], ARGV[4 * j + 1], ARGV[4 * j + 2]
  local v = claimed[fp] or stored[j]
  local found = false
  if v then
    local th_hi, th_lo = struct.unpack('>I4>I4', threshold)
    local hi, lo = struct.unpack('>I4>I4', v)
    if hi > th_hi or (hi == th_hi and lo >= th_lo) then
      found = v
    end
  end
  out[j] = found
  if not found then
    claimed[fp] = at
    local b = tonumber(ARGV[4 * j - 1])
    local w = writes[b]
    if not w then
      w = {}
      writes[b] = w
    end
    w[#w + 1] = fp
    w[#w + 1] = at
  end
end
for b, w in pairs(writes) do
  local s = 1
  while s <= #w do
    local e = math.min(s + 999, #w)
    redis.call('HSET', KEYS[b + 1], unpack(w, s, e))
    s = e + 1
  end
  redis.call('PEXPIRE', KEYS[b + 1], ttl)
end
return out
";

enum Conn {
    Single(redis::Connection),
    /// Boxed: a cluster connection is four times a single one.
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn open(config: &RedisConfig) -> redis::RedisResult<Conn> {
        if config.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(config.urls.clone())
                .connection_timeout(config.timeout)
                .build()?;
            let conn = client.get_connection()?;
            conn.set_read_timeout(Some(config.timeout))?;
            conn.set_write_timeout(Some(config.timeout))?;
            Ok(Conn::Cluster(Box::new(conn)))
        } else {
            let client = redis::Client::open(config.urls.first().map_or("", String::as_str))?;
            let conn = client.get_connection_with_timeout(config.timeout)?;
            conn.set_read_timeout(Some(config.timeout))?;
            conn.set_write_timeout(Some(config.timeout))?;
            Ok(Conn::Single(conn))
        }
    }

    /// Runs `cmds` as one pipeline (one round trip; slot-local keys).
    fn pipeline(&mut self, cmds: Vec<Cmd>) -> redis::RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c)
            }
            Conn::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c)
            }
        }
    }

    /// Runs `cmds` in one round trip on a single server, reading replies
    /// only until the first failure: a stalled server costs one timeout,
    /// not one per command (the client's own pipelines read every reply).
    /// `None` on a cluster connection (a script does the job there).
    fn pipeline_fail_fast(&mut self, cmds: &[Cmd]) -> Option<redis::RedisResult<Vec<Value>>> {
        let Conn::Single(c) = self else {
            return None;
        };
        let mut run = || {
            let mut packed = Vec::new();
            for cmd in cmds {
                cmd.write_packed_command(&mut packed);
            }
            c.send_packed_command(&packed)?;
            let mut replies = Vec::with_capacity(cmds.len());
            for _ in cmds {
                match c.recv_response()? {
                    Value::ServerError(e) => return Err(e.into()),
                    v => replies.push(v),
                }
            }
            Ok(replies)
        };
        Some(run())
    }

    fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => &mut **c,
        }
    }
}

struct RedisPartition {
    config: Arc<RedisConfig>,
    stats: Arc<RedisStats>,
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
    ttl_ms: u64,
    conn: Option<Conn>,
    /// No reconnect before this instant.
    retry_at: Instant,
    backoff: Duration,
    /// Marks not yet written, oldest first, and their index for lookups.
    unsent: Vec<Mark>,
    unsent_index: FingerprintTable,
    /// Single server: the connection marks are written on. Their replies
    /// are read when the next marks are sent (or on a flush), so Redis
    /// stores one batch while the engine checks the next; lookups use
    /// `conn` and do not wait behind them.
    mark_conn: Option<Conn>,
    /// Marks sent on `mark_conn` whose replies are not read yet: still
    /// "not yet written" (indexed for lookups, retried on a failure).
    in_flight: InFlight,
    /// Record strings: slices this process appended to that are still
    /// filling, and finished slices whose strings are being rewritten at
    /// their exact size (`COMPACT_SCRIPT`), with the next bucket to do.
    appended: BTreeSet<u64>,
    compacting: VecDeque<u64>,
    compact_cursor: u64,
    fallback: Option<MemoryPartition>,
    /// Claims sent whose answer was lost (fail closed).
    unanswered: UnansweredClaims,
    /// The newest slice the engine has named (maps slots to slices).
    current: u64,
    script: redis::Script,
    mark_script: redis::Script,
    append_script: redis::Script,
    compact_script: redis::Script,
    lookup_script: redis::Script,
}

/// Marks written to a single server whose replies are not read yet.
struct InFlight {
    marks: Vec<Mark>,
    index: FingerprintTable,
    /// Replies owed on the mark connection.
    replies: usize,
    /// Hashes whose first `PEXPIRE` went with these marks.
    fresh: HashSet<(u64, u64)>,
}

/// Shared mode, fail closed: claims that were sent but whose answer was
/// lost (a timeout, a connection cut mid-request). The caller got
/// `Unavailable` and will retry, yet the script may have run — at once, or
/// when a stopped server resumes — and recorded the key at the claim's
/// time. A later claim that finds exactly that time is the retry of that
/// claim: the key is accepted then, not refused as a duplicate of a claim
/// nobody acted on. (Another engine claiming the same key at the same
/// nanosecond would be taken for ours.) Bounded by `max_unsent_marks`;
/// entries older than the window are forgotten.
struct UnansweredClaims {
    /// Fingerprint → times of its unanswered claims.
    times: HashMap<Fingerprint, Vec<u64>>,
    len: usize,
    max: usize,
    /// No time held is older (`u64::MAX` when empty).
    oldest: u64,
}

impl UnansweredClaims {
    fn remember(&mut self, claims: &[Claim]) {
        for c in claims {
            if self.len >= self.max {
                return;
            }
            self.times
                .entry(c.fingerprint)
                .or_default()
                .push(c.at.as_nanos());
            self.len += 1;
            self.oldest = self.oldest.min(c.at.as_nanos());
        }
    }

    /// Forgets `fp`: a claim recorded it now, so no earlier one of ours can
    /// record it any more.
    fn forget(&mut self, fp: Fingerprint) {
        if self.len > 0 {
            if let Some(times) = self.times.remove(&fp) {
                self.len -= times.len();
            }
        }
    }

    /// True (and forgotten) when `fp` has an unanswered claim at `at`.
    fn take(&mut self, fp: Fingerprint, at: Timestamp) -> bool {
        if self.len == 0 {
            return false;
        }
        let Some(times) = self.times.get(&fp) else {
            return false;
        };
        if !times.contains(&at.as_nanos()) {
            return false;
        }
        self.len -= times.len();
        self.times.remove(&fp);
        true
    }

    /// Forgets claims made before `t` (outside the window: a claim's
    /// record no longer counts then).
    fn forget_before(&mut self, t: u64) {
        if self.len == 0 || self.oldest >= t {
            return;
        }
        let (mut len, mut oldest) = (0, u64::MAX);
        self.times.retain(|_, times| {
            times.retain(|&at| at >= t);
            len += times.len();
            oldest = times.iter().copied().fold(oldest, u64::min);
            !times.is_empty()
        });
        self.len = len;
        self.oldest = oldest;
    }
}

fn unavailable(e: &redis::RedisError) -> ExactTierError {
    ExactTierError::Unavailable(e.to_string())
}

fn decode(v: &[u8]) -> Option<Timestamp> {
    let bytes: [u8; 8] = v.try_into().ok()?;
    Some(Timestamp::from_nanos(u64::from_be_bytes(bytes)))
}

/// The marks of one bucket's run of `(slice, bucket, index)` in mark
/// order, as Redis stores them: (fingerprint, time as 8 big-endian bytes).
fn stored_marks<'a>(
    unsent: &'a [Mark],
    run: &'a [(u64, u64, u32)],
) -> impl Iterator<Item = ([u8; 16], [u8; 8])> + 'a {
    run.iter().map(|&(_, _, i)| {
        let m = &unsent[i as usize];
        (m.fingerprint.to_bytes(), m.at.as_nanos().to_be_bytes())
    })
}

/// Bytes of one record in a record string: the fingerprint, then the time
/// (8 bytes big-endian).
const RECORD: usize = 24;

/// The time of the last (newest) record of `fp` in a record string; `Err`
/// for a string that is not whole records.
fn find_record(records: &[u8], fp: &[u8; 16]) -> Result<Option<Timestamp>, ExactTierError> {
    if records.len() % RECORD != 0 {
        return Err(ExactTierError::Unavailable(format!(
            "a record string of {} bytes is not whole {RECORD}-byte records",
            records.len()
        )));
    }
    Ok(records
        .chunks_exact(RECORD)
        .rev()
        .find(|r| r[..16] == fp[..])
        .and_then(|r| decode(&r[16..])))
}

impl RedisPartition {
    fn key(&self, slice: u64, bucket: u64) -> String {
        format!("{}{slice}:{bucket:x}", self.key_base)
    }

    /// The hash of a slice that holds `fp`.
    fn bucket(&self, fp: Fingerprint) -> u64 {
        ((u128::from(fp.high()) * u128::from(self.buckets)) >> 64) as u64
    }

    /// Proposes this engine's layout for the shard (`<count>` of hashes,
    /// or `records:<count>` of record strings) and adopts the one Redis
    /// holds (the first engine's).
    fn agree_layout(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        let ours = if self.records {
            format!("records:{}", self.buckets)
        } else {
            self.buckets.to_string()
        };
        let mut set = redis::cmd("SET");
        set.arg(&self.layout_key).arg(ours).arg("NX");
        let mut get = redis::cmd("GET");
        get.arg(&self.layout_key);
        let replies = conn.pipeline(vec![set, get])?;
        let agreed = match replies.get(1) {
            Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(|s| {
                let (records, count) = match s.strip_prefix("records:") {
                    Some(count) => (true, count),
                    None => (false, s),
                };
                let n = count.parse::<u64>().ok()?;
                (1..=MAX_BUCKETS).contains(&n).then_some((records, n))
            }),
            _ => None,
        };
        let Some((records, agreed)) = agreed else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the shard's layout key does not hold a hash count",
                self.layout_key.clone(),
            )));
        };
        if records && self.shared {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "owned-mode engines keep this namespace's keys as record strings; \
                 shared mode needs hashes: use another namespace or key prefix",
                self.layout_key.clone(),
            )));
        }
        if (records, agreed) != (self.records, self.buckets) {
            crate::trace::event!(
                info,
                key_base = %self.key_base,
                ours = self.buckets,
                agreed,
                records,
                "adopted the layout another engine chose"
            );
            self.buckets = agreed;
            self.records = records;
            self.expiring.clear();
        }
        Ok(())
    }

    /// Runs `f` on a connection, reconnecting with backoff; a failure drops
    /// the connection.
    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Conn, &mut Self) -> redis::RedisResult<T>,
    ) -> Result<T, ExactTierError> {
        self.connect()?;
        let mut conn = self.conn.take().expect("connected above");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        match f(&mut conn, self) {
            Ok(v) => {
                self.conn = Some(conn);
                Ok(v)
            }
            Err(e) => {
                self.fail();
                Err(unavailable(&e))
            }
        }
    }

    /// Connects unless connected (or in backoff), adopting the agreed hash
    /// count: call it before grouping keys by hash.
    fn connect(&mut self) -> Result<(), ExactTierError> {
        if self.conn.is_none() {
            if Instant::now() < self.retry_at {
                return Err(ExactTierError::Unavailable("reconnect backoff".to_owned()));
            }
            match Conn::open(&self.config).and_then(|mut c| {
                self.agree_layout(&mut c)?;
                Ok(c)
            }) {
                Ok(c) => {
                    let n = self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    if n > 0 {
                        crate::trace::event!(info, key_base = %self.key_base, "reconnected to Redis");
                    }
                    self.conn = Some(c);
                    self.backoff = Duration::from_millis(10);
                }
                Err(e) => {
                    self.fail();
                    return Err(unavailable(&e));
                }
            }
        }
        Ok(())
    }

    /// A request on the main connection (lookups, claims, layout) failed:
    /// drops it and backs off. The mark connection keeps its own state.
    fn fail(&mut self) {
        self.conn = None;
        self.failed("Redis request failed; connection dropped");
    }

    /// Writing marks or reading their replies failed: drops the mark
    /// connection and backs off.
    fn fail_marks(&mut self) {
        self.mark_conn = None;
        self.failed("writing marks to Redis failed; mark connection dropped");
    }

    fn failed(&mut self, what: &'static str) {
        #[cfg(not(feature = "tracing"))]
        let _ = what;
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        crate::trace::event!(
            warn,
            key_base = %self.key_base,
            retry_in_ms = self.backoff.as_millis() as u64,
            unsent_marks = self.unsent.len(),
            "{what}"
        );
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
    }

    /// Writes every unsent mark (oldest first) in one pipeline. On a
    /// single server the replies are read by the next call (or by
    /// [`Self::settle`]); a cluster's script is answered at once.
    fn send_unsent(&mut self) -> Result<(), ExactTierError> {
        // The previous marks' replies first: a failure puts them back
        // before these, in order.
        self.settle()?;
        if self.unsent.is_empty() {
            return Ok(());
        }
        // Connect first: the hash count may change when a connection
        // adopts the agreed one.
        self.connect()?;
        // Marks by hash, in mark order within each (a later mark of a key
        // wins): sorted by (slice, bucket, position), no map, no vector per
        // hash; a TTL for hashes this process has not given one yet.
        let mut order: Vec<(u64, u64, u32)> = (0u32..)
            .zip(&self.unsent)
            .map(|(i, m)| (m.slice, self.bucket(m.fingerprint), i))
            .collect();
        order.sort_unstable();
        let by_hash = || order.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1));
        let fresh: HashSet<(u64, u64)> = by_hash()
            .map(|run| (run[0].0, run[0].1))
            .filter(|h| !self.expiring.contains(h))
            .collect();
        if self.records {
            let current = self.current;
            self.appended
                .extend(by_hash().map(|run| run[0].0).filter(|&s| s >= current));
        }
        // A chunk of a finished slice's strings rides along (see
        // `COMPACT_SCRIPT`).
        let compaction = if self.records {
            self.next_compaction()
        } else {
            Vec::new()
        };
        // A record string's marks, appended in mark order.
        let records = |run: &[(u64, u64, u32)]| {
            let mut blob = Vec::with_capacity(run.len() * RECORD);
            for (fp, at) in stored_marks(&self.unsent, run) {
                blob.extend_from_slice(&fp);
                blob.extend_from_slice(&at);
            }
            blob
        };
        let is_fresh = |run: &[(u64, u64, u32)]| fresh.contains(&(run[0].0, run[0].1));
        if self.config.cluster {
            // One script: one reply, whatever the number of hashes.
            let script = if self.records {
                self.append_script.clone()
            } else {
                self.mark_script.clone()
            };
            let mut invocation = script.prepare_invoke();
            invocation.arg(self.ttl_ms);
            for run in by_hash() {
                invocation.key(self.key(run[0].0, run[0].1));
                let fresh = u8::from(is_fresh(run));
                if self.records {
                    invocation.arg(records(run)).arg(fresh);
                    continue;
                }
                invocation.arg(run.len()).arg(fresh);
                for (fp, at) in stored_marks(&self.unsent, run) {
                    invocation.arg(&fp[..]).arg(&at[..]);
                }
            }
            self.with_conn(|c, _| invocation.invoke::<Value>(c.like()))?;
            if !compaction.is_empty() {
                let script = self.compact_script.clone();
                let mut invocation = script.prepare_invoke();
                for k in &compaction {
                    invocation.key(k);
                }
                // Best effort: the marks are written either way.
                let _ = self.with_conn(|c, _| invocation.invoke::<Value>(c.like()));
            }
            self.expiring.extend(fresh);
            self.written(self.unsent.len());
            self.unsent.clear();
            self.unsent_index.clear();
        } else {
            // Plain commands cost Redis less than a script's calls (no Lua
            // strings per argument): one APPEND or HSET per string or hash,
            // a PEXPIRE per fresh one, read until the first failure.
            // Each fresh bucket's PEXPIRE right after its write: a
            // pipeline cut short leaves no bucket written without a TTL.
            let mut cmds = Vec::with_capacity(2 * fresh.len());
            for run in by_hash() {
                let key = self.key(run[0].0, run[0].1);
                let mut cmd = redis::cmd(if self.records { "APPEND" } else { "HSET" });
                cmd.arg(&key);
                if self.records {
                    cmd.arg(records(run));
                } else {
                    for (fp, at) in stored_marks(&self.unsent, run) {
                        cmd.arg(&fp[..]).arg(&at[..]);
                    }
                }
                cmds.push(cmd);
                if is_fresh(run) {
                    let mut expire = redis::cmd("PEXPIRE");
                    expire.arg(&key).arg(self.ttl_ms);
                    cmds.push(expire);
                }
            }
            if !compaction.is_empty() {
                let mut eval = redis::cmd("EVAL");
                eval.arg(COMPACT_SCRIPT)
                    .arg(compaction.len())
                    .arg(&compaction);
                cmds.push(eval);
            }
            let mut packed = Vec::new();
            for cmd in &cmds {
                cmd.write_packed_command(&mut packed);
            }
            // A connection opened by an earlier flush may have been closed
            // since (a server's idle `timeout`): one more try on a new one.
            let mut tries = if self.mark_conn.is_some() { 2 } else { 1 };
            loop {
                if self.mark_conn.is_none() {
                    if Instant::now() < self.retry_at {
                        return Err(ExactTierError::Unavailable("reconnect backoff".to_owned()));
                    }
                    match Conn::open(&self.config) {
                        Ok(c) => self.mark_conn = Some(c),
                        Err(e) => {
                            self.fail_marks();
                            return Err(unavailable(&e));
                        }
                    }
                }
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let Some(Conn::Single(c)) = &mut self.mark_conn else {
                    unreachable!("a single server's mark connection")
                };
                match c.send_packed_command(&packed) {
                    Ok(()) => break,
                    Err(_) if tries > 1 => {
                        tries -= 1;
                        self.mark_conn = None;
                    }
                    Err(e) => {
                        // Not known to be stored: the marks stay unsent
                        // (those Redis did read are written again: an
                        // `HSET` the same, a record string gains a copy).
                        self.fail_marks();
                        return Err(unavailable(&e));
                    }
                }
            }
            // In flight until their replies are read; still indexed.
            std::mem::swap(&mut self.in_flight.marks, &mut self.unsent);
            std::mem::swap(&mut self.in_flight.index, &mut self.unsent_index);
            self.in_flight.replies = cmds.len();
            self.in_flight.fresh = fresh;
        }
        Ok(())
    }

    /// Reads the replies of the marks in flight (single server): on
    /// success they are written; on a failure they go back to the front of
    /// the unsent marks (older than those), for the next retry.
    fn settle(&mut self) -> Result<(), ExactTierError> {
        if self.in_flight.replies == 0 {
            return Ok(());
        }
        let result = match &mut self.mark_conn {
            Some(Conn::Single(c)) => (0..self.in_flight.replies)
                .try_for_each(|_| match c.recv_response()? {
                    Value::ServerError(e) => Err(e.into()),
                    _ => Ok(()),
                })
                .map_err(|e: redis::RedisError| unavailable(&e)),
            _ => Err(ExactTierError::Unavailable(
                "the connection marks were sent on was dropped".to_owned(),
            )),
        };
        self.in_flight.replies = 0;
        match result {
            Ok(()) => {
                self.expiring.extend(self.in_flight.fresh.drain());
                self.written(self.in_flight.marks.len());
                self.in_flight.marks.clear();
                self.in_flight.index.clear();
                Ok(())
            }
            Err(e) => {
                if self.mark_conn.is_some() {
                    self.fail_marks();
                }
                self.in_flight.fresh.clear();
                // Unsent marks are newer: they stay indexed over these.
                for m in &self.in_flight.marks {
                    if self.unsent_index.get(m.fingerprint).is_none() {
                        self.unsent_index.insert(m.fingerprint, m.at.as_nanos());
                    }
                }
                self.in_flight.index.clear();
                self.in_flight.marks.append(&mut self.unsent);
                std::mem::swap(&mut self.in_flight.marks, &mut self.unsent);
                Err(e)
            }
        }
    }

    /// Answers `lookups` after Redis failed them (`e`), as the policy says.
    fn lookups_failed(
        &mut self,
        e: ExactTierError,
        current: u64,
        lookups: &[Lookup],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        out.clear();
        match self.config.policy {
            FailurePolicy::FailClosed => Err(e),
            FailurePolicy::FailOpen => {
                self.degraded(lookups.len());
                out.extend(
                    lookups
                        .iter()
                        .map(|q| self.pending_time(q.fingerprint).map(Timestamp::from_nanos)),
                );
                Ok(())
            }
            FailurePolicy::FallbackToMemory => {
                self.degraded(lookups.len());
                let fallback = self.fallback.as_mut().expect("fallback policy");
                fallback.lookup_batch(current, lookups, out)
            }
        }
    }

    /// The engine named slice `slice`: record strings of the slices before
    /// it stop growing and are queued for compaction.
    fn advance(&mut self, slice: u64) {
        if slice <= self.current {
            return;
        }
        self.current = slice;
        while let Some(&done) = self.appended.first().filter(|&&s| s < slice) {
            self.appended.remove(&done);
            self.compacting.push_back(done);
        }
    }

    /// The next chunk of record strings to compact (at most
    /// [`COMPACT_CHUNK`]), as the keys of one `COMPACT_SCRIPT` call; empty
    /// when nothing is queued. Slices already retired are dropped.
    fn next_compaction(&mut self) -> Vec<String> {
        let oldest_live = self.current.saturating_sub(GENERATIONS as u64 - 1);
        while let Some(&slice) = self.compacting.front() {
            if slice < oldest_live || self.compact_cursor >= self.buckets {
                self.compacting.pop_front();
                self.compact_cursor = 0;
                continue;
            }
            let end = (self.compact_cursor + COMPACT_CHUNK).min(self.buckets);
            let keys = (self.compact_cursor..end)
                .map(|b| self.key(slice, b))
                .collect();
            self.compact_cursor = end;
            return keys;
        }
        Vec::new()
    }

    /// Counts `n` marks as written (no longer unsent).
    fn written(&self, n: usize) {
        let n = n as u64;
        self.stats.marks_written.fetch_add(n, Ordering::Relaxed);
        self.stats.marks_unsent.fetch_sub(n, Ordering::Relaxed);
    }

    /// The time of the newest mark of `fp` not yet known to be in Redis.
    fn pending_time(&self, fp: Fingerprint) -> Option<u64> {
        self.unsent_index
            .get(fp)
            .or_else(|| self.in_flight.index.get(fp))
    }

    fn degraded(&self, n: usize) {
        self.stats
            .degraded_decisions
            .fetch_add(n as u64, Ordering::Relaxed);
        crate::trace::event!(
            warn,
            keys = n,
            policy = ?self.config.policy,
            "decided without Redis (degraded mode)"
        );
    }

    /// Keeps `marks` for writing, indexed for lookups, up to
    /// `max_unsent_marks`; returns how many did not fit (counted dropped).
    fn keep(&mut self, marks: &[Mark]) -> usize {
        let room = self
            .config
            .max_unsent_marks
            .saturating_sub(self.unsent.len());
        let dropped = marks.len().saturating_sub(room);
        for m in &marks[..marks.len() - dropped] {
            self.unsent.push(*m);
            self.unsent_index.insert(m.fingerprint, m.at.as_nanos());
        }
        self.stats
            .marks_unsent
            .fetch_add((marks.len() - dropped) as u64, Ordering::Relaxed);
        if dropped > 0 {
            self.stats
                .marks_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        dropped
    }

    /// A mark of a key this partition accepted in slice `current`.
    fn mark_now(fingerprint: Fingerprint, current: u64, at: Timestamp) -> Mark {
        Mark {
            fingerprint,
            slot: slot_of(current),
            slice: current,
            at,
        }
    }

    /// Shared mode without Redis, under a policy that accepts keys: judges
    /// `claims` in order from the marks this partition keeps (fail open) or
    /// its memory tier (fallback), and keeps a mark of every key accepted,
    /// so that Redis holds it once it is back.
    fn claim_degraded(
        &mut self,
        current: u64,
        window: Option<u64>,
        claims: &[Claim],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        self.degraded(claims.len());
        out.clear();
        if let Some(fallback) = &mut self.fallback {
            fallback.claim_batch(current, window, claims, out)?;
        } else {
            for c in claims {
                // Kept marks are written in order: a copy accepted earlier
                // in this batch is seen here.
                let inside = self
                    .pending_time(c.fingerprint)
                    .filter(|&t0| window.is_none_or(|w| c.at.as_nanos().saturating_sub(t0) < w));
                if inside.is_none() {
                    self.keep(&[Self::mark_now(c.fingerprint, current, c.at)]);
                }
                out.push(inside.map(Timestamp::from_nanos));
            }
            return Ok(());
        }
        let accepted: Vec<Mark> = claims
            .iter()
            .zip(out.iter())
            .filter(|(_, r)| r.is_none())
            .map(|(c, _)| Self::mark_now(c.fingerprint, current, c.at))
            .collect();
        self.keep(&accepted);
        Ok(())
    }
}

impl ExactPartition for RedisPartition {
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        let mut out = Vec::new();
        let lookup = Lookup {
            fingerprint: fp,
            slots: 1 << slot,
        };
        self.lookup_batch(self.current, &[lookup], &mut out)?;
        Ok(out.pop().flatten())
    }

    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        let slice = slots_newest_first(self.current)
            .find(|&(_, s)| s == slot)
            .map_or(self.current, |(slice, _)| slice);
        self.mark_batch(&[Mark {
            fingerprint: fp,
            slot,
            slice,
            at,
        }])
    }

    fn mark_batch(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        if let Some(newest) = marks.iter().map(|m| m.slice).max() {
            self.advance(newest);
        }
        if let Some(fallback) = &mut self.fallback {
            fallback.mark_batch(marks)?;
        }
        let dropped = self.keep(marks);
        // Kept for retry whatever happens now; report the failure.
        self.send_unsent()?;
        if dropped > 0 {
            return Err(ExactTierError::Unavailable(format!(
                "{dropped} marks dropped: the retry buffer is full"
            )));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ExactTierError> {
        self.send_unsent()?;
        self.settle()
    }

    fn prefers_batches(&self) -> bool {
        true
    }

    fn persistent(&self) -> bool {
        true
    }

    fn lookup_batch(
        &mut self,
        current: u64,
        lookups: &[Lookup],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        self.advance(current);
        out.clear();
        // Marks not yet in Redis stay queued: their index answers for them
        // below (read-your-writes without a flush per lookup).
        // Failing here fails the request below at once.
        let _ = self.connect();
        let live: Vec<(u64, usize)> = slots_newest_first(current).collect();
        // One HMGET per (slice, bucket) some lookup needs.
        let mut by_hash: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
        for &(slice, slot) in &live {
            for (i, q) in lookups.iter().enumerate() {
                if q.slots & (1 << slot) != 0 {
                    by_hash
                        .entry((slice, self.bucket(q.fingerprint)))
                        .or_default()
                        .push(i);
                }
            }
        }
        // Newest slice first, so the first value found per lookup is the
        // newest.
        let mut asked: Vec<((u64, u64), Vec<usize>)> = by_hash.into_iter().collect();
        asked.sort_unstable_by_key(|&((slice, _), _)| std::cmp::Reverse(slice));
        // Record strings: one MGET of every string asked (one slot on a
        // cluster), one value per string. Hashes: one value per lookup.
        let result = if asked.is_empty() {
            Ok(Vec::new())
        } else if self.records {
            let mut mget = redis::cmd("MGET");
            for ((slice, bucket), _) in &asked {
                mget.arg(self.key(*slice, *bucket));
            }
            let cluster = self.config.cluster;
            self.with_conn(|c, _| {
                if cluster {
                    mget.query::<Vec<Value>>(c.like())
                } else {
                    let mut replies = c
                        .pipeline_fail_fast(std::slice::from_ref(&mget))
                        .expect("a single server")?;
                    match replies.pop() {
                        Some(Value::Array(values)) => Ok(values),
                        _ => Err(redis::RedisError::from((
                            redis::ErrorKind::UnexpectedReturnType,
                            "unexpected MGET reply",
                        ))),
                    }
                }
            })
        } else if self.config.cluster {
            let script = self.lookup_script.clone();
            let mut invocation = script.prepare_invoke();
            for ((slice, bucket), which) in &asked {
                invocation.key(self.key(*slice, *bucket)).arg(which.len());
                for &i in which {
                    invocation.arg(&lookups[i].fingerprint.to_bytes()[..]);
                }
            }
            self.with_conn(|c, _| invocation.invoke::<Vec<Value>>(c.like()))
        } else {
            let cmds: Vec<Cmd> = asked
                .iter()
                .map(|((slice, bucket), which)| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(self.key(*slice, *bucket));
                    for &i in which {
                        cmd.arg(&lookups[i].fingerprint.to_bytes()[..]);
                    }
                    cmd
                })
                .collect();
            // Each reply is one HMGET's values: flatten them in order.
            self.with_conn(|c, _| c.pipeline_fail_fast(&cmds).expect("a single server"))
                .and_then(|replies| {
                    let mut values = Vec::new();
                    for reply in replies {
                        let Value::Array(v) = reply else {
                            return Err(ExactTierError::Unavailable(
                                "unexpected HMGET reply".to_owned(),
                            ));
                        };
                        values.extend(v);
                    }
                    Ok(values)
                })
        };
        let replies = match result {
            Ok(r) => r,
            Err(e) => return self.lookups_failed(e, current, lookups, out),
        };
        // Newest slice first: the first value found per lookup wins.
        out.resize(lookups.len(), None);
        let expected = if self.records {
            asked.len()
        } else {
            asked.iter().map(|(_, which)| which.len()).sum::<usize>()
        };
        if replies.len() != expected {
            return Err(ExactTierError::Unavailable(
                "unexpected lookup reply".to_owned(),
            ));
        }
        let mut values = replies.into_iter();
        for (_, which) in &asked {
            if self.records {
                let Some(Value::BulkString(records)) = values.next() else {
                    continue;
                };
                for &i in which {
                    if out[i].is_none() {
                        match find_record(&records, &lookups[i].fingerprint.to_bytes()) {
                            Ok(found) => out[i] = found,
                            Err(e) => return self.lookups_failed(e, current, lookups, out),
                        }
                    }
                }
                continue;
            }
            for (&i, v) in which.iter().zip(values.by_ref()) {
                if out[i].is_none() {
                    if let Value::BulkString(bytes) = v {
                        out[i] = decode(&bytes);
                    }
                }
            }
        }
        for (i, q) in lookups.iter().enumerate() {
            if let Some(at) = self.pending_time(q.fingerprint) {
                out[i] = Some(Timestamp::from_nanos(at));
            }
        }
        Ok(())
    }

    fn claim_batch(
        &mut self,
        current: u64,
        window: Option<u64>,
        claims: &[Claim],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        self.advance(current);
        out.clear();
        let window = window.or(self.window);
        // Marks kept through an outage first: the script must see them.
        // Written means answered: the script runs on another connection.
        // If they cannot be written, the claims cannot be made either (the
        // script would accept their keys again): the policy decides.
        if let Err(e) = self.send_unsent().and_then(|()| self.settle()) {
            return match self.config.policy {
                FailurePolicy::FailClosed => Err(e),
                FailurePolicy::FailOpen | FailurePolicy::FallbackToMemory => {
                    self.claim_degraded(current, window, claims, out)
                }
            };
        }
        let script = self.script.clone();
        let mut sent = false;
        let result: Result<Vec<Value>, ExactTierError> = {
            let live: Vec<u64> = slots_newest_first(current)
                .map(|(slice, _)| slice)
                .collect();
            let ttl = self.ttl_ms;
            let sent = &mut sent;
            // Built once connected: the hash count may change when a
            // connection adopts the agreed one.
            self.with_conn(move |c, p| {
                // Per bucket used, its live hashes; per claim, where its
                // bucket's hashes start.
                let mut keys: Vec<String> = Vec::new();
                let mut base: HashMap<u64, usize> = HashMap::new();
                let mut args: Vec<Vec<u8>> = Vec::with_capacity(claims.len() * 4);
                for c in claims {
                    let bucket = p.bucket(c.fingerprint);
                    let offset = *base.entry(bucket).or_insert_with(|| {
                        let offset = keys.len();
                        keys.extend(live.iter().map(|&slice| p.key(slice, bucket)));
                        offset
                    });
                    let threshold =
                        window.map_or(0, |w| c.at.as_nanos().saturating_sub(w).saturating_add(1));
                    args.push(offset.to_string().into_bytes());
                    args.push(c.fingerprint.to_bytes().to_vec());
                    args.push(c.at.as_nanos().to_be_bytes().to_vec());
                    args.push(threshold.to_be_bytes().to_vec());
                }
                *sent = true;
                let mut invocation = script.prepare_invoke();
                for k in &keys {
                    invocation.key(k);
                }
                invocation.arg(ttl).arg(live.len());
                for a in &args {
                    invocation.arg(&a[..]);
                }
                invocation.invoke(c.like())
            })
        };
        let values = match result {
            Ok(values) => values,
            Err(e) => {
                return match self.config.policy {
                    FailurePolicy::FailClosed => {
                        if sent {
                            // The script may still run (a reply lost, a
                            // stopped server resumed): remember what it
                            // would record, so the caller's retry is not
                            // taken for a duplicate of its own claim.
                            self.unanswered.remember(claims);
                        }
                        Err(e)
                    }
                    FailurePolicy::FailOpen | FailurePolicy::FallbackToMemory => {
                        self.claim_degraded(current, window, claims, out)
                    }
                };
            }
        };
        // Keys whose stored time is that of a claim of ours answered
        // `Unavailable`: recorded by that claim, never accepted by the
        // caller. Accept them now, and record the time they are accepted.
        let mut reclaimed: Vec<Mark> = Vec::new();
        for (c, v) in claims.iter().zip(values) {
            let found = match v {
                Value::BulkString(bytes) => decode(&bytes),
                _ => None,
            };
            let found = match found {
                Some(t0) if self.unanswered.take(c.fingerprint, t0) => {
                    reclaimed.push(Self::mark_now(c.fingerprint, current, c.at));
                    None
                }
                // A later copy of a key reclaimed in this batch.
                Some(t0) => Some(
                    reclaimed
                        .iter()
                        .find(|m| m.fingerprint == c.fingerprint)
                        .map_or(t0, |m| m.at),
                ),
                None => {
                    self.unanswered.forget(c.fingerprint);
                    None
                }
            };
            out.push(found);
        }
        if let Some(fallback) = &mut self.fallback {
            for (c, r) in claims.iter().zip(out.iter()) {
                if r.is_none() {
                    fallback.mark(c.fingerprint, slot_of(current), c.at)?;
                }
            }
        }
        if !reclaimed.is_empty() {
            self.keep(&reclaimed);
            let _ = self.send_unsent();
        }
        if let Some(at) = claims.iter().map(|c| c.at.as_nanos()).max() {
            self.unanswered
                .forget_before(window.map_or(0, |w| at.saturating_sub(w)));
        }
        Ok(())
    }

    fn clear_slots(&mut self, slots: u8) {
        // The slot's retiring slice is the newest one in it up to the last
        // slice the engine named: delete those hashes now (best effort; the
        // TTL is the backstop).
        let expired: Vec<u64> = (0..GENERATIONS as u64)
            .filter_map(|back| self.current.checked_sub(back))
            .filter(|&slice| slots & (1 << slot_of(slice)) != 0)
            .collect();
        if !expired.is_empty() {
            // Marks in flight to these buckets land before the UNLINK (a
            // bucket created after it would have no TTL). If their replies
            // are lost, so is the order: the buckets are left to their TTL.
            // (A pipeline abandoned on an earlier failure may still run in
            // a server that was stopped; its buckets can outlive an UNLINK
            // the same way: memory until the TTL, never a verdict.)
            let settled = self.settle().is_ok();
            self.expiring.retain(|(slice, _)| !expired.contains(slice));
            if settled {
                let _ = self.with_conn(|c, p| {
                    let mut del = redis::cmd("UNLINK");
                    for &slice in &expired {
                        for bucket in 0..p.buckets {
                            del.arg(p.key(slice, bucket));
                        }
                    }
                    c.pipeline(vec![del])
                });
            }
        }
        if let Some(fallback) = &mut self.fallback {
            fallback.clear_slots(slots);
        }
    }

    fn len(&self) -> u64 {
        (self.unsent.len() + self.in_flight.marks.len()) as u64
    }

    fn bytes(&self) -> usize {
        self.fallback.as_ref().map_or(0, MemoryPartition::bytes)
            + (self.unsent.capacity() + self.in_flight.marks.capacity()) * 48
            + self.unsent_index.bytes()
            + self.in_flight.index.bytes()
    }

    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(fp: u128, at: u64) -> Claim {
        Claim {
            fingerprint: Fingerprint(fp),
            at: Timestamp::from_nanos(at),
        }
    }

    #[test]
    fn a_record_string_answers_with_its_newest_record() {
        let record = |fp: u128, at: u64| {
            let mut r = Fingerprint(fp).to_bytes().to_vec();
            r.extend_from_slice(&at.to_be_bytes());
            r
        };
        let fp = |v: u128| Fingerprint(v).to_bytes();
        let blob = [record(1, 10), record(2, 20), record(1, 30)].concat();
        assert_eq!(
            find_record(&blob, &fp(1)).unwrap(),
            Some(Timestamp::from_nanos(30))
        );
        assert_eq!(
            find_record(&blob, &fp(2)).unwrap(),
            Some(Timestamp::from_nanos(20))
        );
        assert_eq!(find_record(&blob, &fp(3)).unwrap(), None);
        assert_eq!(find_record(&[], &fp(3)).unwrap(), None);
        assert!(find_record(&blob[..30], &fp(1)).is_err());
    }

    #[test]
    fn unanswered_claims_are_recognised_once_and_forgotten_with_age() {
        let mut u = UnansweredClaims {
            times: HashMap::new(),
            len: 0,
            max: 3,
            oldest: u64::MAX,
        };
        u.remember(&[claim(1, 10), claim(1, 20), claim(2, 30), claim(3, 40)]);
        assert_eq!(u.len, 3, "bounded");
        assert!(!u.take(Fingerprint(1), Timestamp::from_nanos(15)));
        assert!(u.take(Fingerprint(1), Timestamp::from_nanos(20)));
        assert!(!u.take(Fingerprint(1), Timestamp::from_nanos(10)), "once");
        assert!(
            !u.take(Fingerprint(3), Timestamp::from_nanos(40)),
            "never held"
        );
        u.remember(&[claim(4, 50)]);
        u.forget_before(31);
        assert_eq!((u.len, u.oldest), (1, 50));
        assert!(!u.take(Fingerprint(2), Timestamp::from_nanos(30)));
        u.forget(Fingerprint(4));
        assert_eq!(u.len, 0);
    }
}
