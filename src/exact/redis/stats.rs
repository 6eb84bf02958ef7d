//! [`RedisStats`]: the counters a [`super::RedisTier`]'s partitions share.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};

use crate::error::ExactTierError;

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
    /// Marks Redis answered with an error (out of memory, no permission,
    /// read-only): kept for a retry, so a mark refused several times is
    /// counted each time.
    pub marks_refused: AtomicU64,
    /// Connections made, under [`super::UnsafeServer::Warn`], to a server
    /// that would lose accepted keys (it evicts keys, or is a replica).
    pub server_warnings: AtomicU64,
    /// Connections made to a server whose eviction policy or role could
    /// not be checked (`CONFIG` or `ROLE` disabled, renamed or not
    /// allowed).
    pub server_unchecked: AtomicU64,
    /// Connections made to a server without an append-only file: a
    /// restart of it forgets accepted keys ([`super::ServerInfo::warnings`]).
    pub server_volatile: AtomicU64,
    /// Shared mode: snapshots of a shard's state this tier stored (the
    /// log is trimmed behind them; see the module docs).
    pub snapshots: AtomicU64,
    /// Shared mode: replicas rebuilt from Redis because the log was lost
    /// (a server that restarted without its data), or trimmed past what
    /// the replica had read (it fell a snapshot behind).
    pub rebuilds: AtomicU64,
    /// Shared mode: entries this tier appended and then read back from the
    /// log to answer them, because another engine appended between the
    /// request's read and its append (or the read had not caught up), or
    /// on a cluster, whose script appends before it reads. On one server
    /// with no such race an entry is applied as sent, not read back.
    pub own_entries_read_back: AtomicU64,
    /// The last failure of any partition (see [`RedisStats::last_error`]).
    last_error: Mutex<Option<ExactTierError>>,
}

impl RedisStats {
    /// The last failure of any of the tier's partitions, with its cause
    /// and server ([`ExactTierError::cause`], [`ExactTierError::server`]):
    /// what a program prints after a run that had failures (`None` if
    /// there was none).
    #[must_use]
    pub fn last_error(&self) -> Option<ExactTierError> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Remembers `e` as the last failure.
    pub(super) fn record(&self, e: &ExactTierError) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e.clone());
    }
}
