//! What a [`super::RedisTier`] connects to and how it behaves when Redis
//! fails: [`RedisConfig`] and [`FailurePolicy`].

use std::time::Duration;

/// What a Redis failure does to a verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Keys that need Redis get [`crate::Verdict::Unavailable`]: the caller
    /// retries them later. Nothing is accepted that could be a duplicate.
    #[default]
    FailClosed,
    /// Keys that need Redis are treated as new (counted in
    /// [`RedisStats::degraded_decisions`](super::RedisStats::degraded_decisions)): availability over exactness.
    FailOpen,
    /// Keys are judged by a local memory tier that holds every mark this
    /// process made (counted in [`RedisStats::degraded_decisions`](super::RedisStats::degraded_decisions)); exact
    /// for this process's own keys, blind to other engines' while Redis is
    /// down.
    FallbackToMemory,
}

/// What the tier does with a server that would lose accepted keys: one
/// whose `maxmemory-policy` evicts keys, or a replica (see
/// [`super::ServerInfo::problems`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnsafeServer {
    /// Refuse it: [`super::RedisTier::check`] and every connection fail
    /// with [`crate::FailureCause::UnsafeServer`] and a message naming the
    /// setting and what to change.
    #[default]
    Refuse,
    /// Use it anyway, counted in [`super::RedisStats::server_warnings`] and
    /// reported (a `tracing` warning): a key Redis evicts is accepted again
    /// later.
    Warn,
}

/// Configures a [`RedisTier`](super::RedisTier).
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
    /// Connect, read and write timeout of a request a caller waits for (a
    /// lookup or claim a check needs, a full batch of marks, a flush).
    /// Default: 500 ms.
    pub timeout: Duration,
    /// The longest the engine's idle upkeep ([`crate::Deduper::maintain`],
    /// a pipeline worker between batches) waits on Redis per request: it
    /// holds a shard's lock, so a check of that shard may wait that long
    /// behind it. Marks not answered in time are kept for the next retry.
    /// At most `timeout`. Default: 20 ms.
    pub idle_timeout: Duration,
    /// Marks kept for retry while Redis is unreachable, per shard (one
    /// flush in flight comes on top). Default: 100 000.
    pub max_unsent_marks: usize,
    /// A server that would lose accepted keys (an evicting
    /// `maxmemory-policy`, a replica) is refused, or used with a warning.
    /// Default: refused.
    pub unsafe_server: UnsafeServer,
    /// Keys one bucket of a slice is sized for (owned keys, see the module
    /// docs): buckets are record strings; `Some(0)` keeps one hash per
    /// slice instead (89–99 bytes per key, 1.1–1.25 µs of Redis CPU per
    /// key). The first engine's choice is stored per shard and adopted by
    /// the others. Shared keys keep a log per shard whatever this says.
    /// Default (`None`): 64 (about 51 per bucket at the expected rate).
    pub keys_per_hash: Option<usize>,
    /// With a window: the TTL of a slice's buckets, set when this process
    /// first writes each (and of a shared-mode log, renewed by every
    /// append); a backstop, since slices are deleted when they expire in
    /// engine time. One shorter than the window plus lateness plus a slice
    /// would forget keys inside their window: the builder refuses it
    /// ([`crate::ConfigError::ExactTierRefused`]). Default: twice the span
    /// plus two slices, at least one hour.
    ///
    /// Without a window keys never expire by default: no TTL. `Some(d)`
    /// is a retention instead: every write of a bucket renews its TTL to
    /// `d`, so a key is kept at least `d` after it was accepted (others of
    /// its bucket written later keep it longer).
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
            idle_timeout: Duration::from_millis(20),
            max_unsent_marks: 100_000,
            unsafe_server: UnsafeServer::Refuse,
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
