//! Errors: bad configuration, exact-tier failures, and refused snapshots.

use std::io;

/// A configuration the builder refuses, with what to change.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The window is zero.
    #[error(
        "the window is zero: give a positive duration, or `no_window()` for keys that never expire"
    )]
    ZeroWindow,
    /// The expected key count is zero.
    #[error("expected keys per window is zero: give the number of distinct keys you expect within one window (or per second with `expected_rate`)")]
    ZeroExpectedKeys,
    /// The false-positive target is not in (0, 1).
    #[error("false-positive target {0} is outside (0, 1): use e.g. 0.01 for 1%")]
    FalsePositiveRate(f64),
    /// The false-positive target is below what the blocked layout reaches.
    #[error(
        "false-positive target {0} is too small for the blocked filter layout: use 1e-6 or more"
    )]
    FalsePositiveRateTooSmall(f64),
    /// The shard count is zero.
    #[error("shard count is zero: use at least 1 (default: 4 per core, a power of two)")]
    ZeroShards,
    /// The filter would be larger than allowed.
    #[error("the filter would need {bytes} bytes: lower expected keys, raise the false-positive target, or shorten the window")]
    FilterTooLarge {
        /// Bytes the filter would need.
        bytes: u64,
    },
    /// The engine would need more memory than the configured limit
    /// (`memory_limit`): its filter and its memory tier's tables as sized.
    #[error("the engine would need {needed} bytes ({}: {filter} for the filter, {exact} for the memory tier's tables at the expected keys) but the memory limit is {limit} ({}): raise `memory_limit`, or {}", human_bytes(*.needed), human_bytes(*.limit), memory_fix(*.filter, *.exact))]
    MemoryLimit {
        /// Bytes the engine would need: `filter + exact`.
        needed: u64,
        /// The configured limit.
        limit: u64,
        /// Bytes of the filter (allocated at build).
        filter: u64,
        /// Bytes of the memory tier's tables, sized for the expected keys
        /// (allocated as keys arrive).
        exact: u64,
    },
    /// The engine would need more memory than the machine has (its
    /// physical memory, or the process's cgroup limit when lower).
    #[error("the engine would need {needed} bytes ({}: {filter} for the filter, {exact} for the memory tier's tables at the expected keys) but this machine has {physical} bytes ({}): {}", human_bytes(*.needed), human_bytes(*.physical), memory_fix(*.filter, *.exact))]
    PhysicalMemory {
        /// Bytes the engine would need: `filter + exact`.
        needed: u64,
        /// The memory this process may use.
        physical: u64,
        /// Bytes of the filter (allocated at build).
        filter: u64,
        /// Bytes of the memory tier's tables, sized for the expected keys
        /// (allocated as keys arrive).
        exact: u64,
    },
    /// Allocating the filter at build failed.
    #[error("allocating {bytes} bytes ({}) for the filter failed: lower expected keys, raise the false-positive target, or shorten the window or the allowed lateness", human_bytes(*.bytes))]
    OutOfMemory {
        /// Bytes asked for.
        bytes: u64,
    },
    /// A pipeline size (workers, queue depth, message size, in-flight
    /// batches) is zero.
    #[error(
        "pipeline workers, queue depth, message size and in-flight batches must all be at least 1"
    )]
    ZeroWorkers,
    /// Shared affinity needs an exact tier to claim keys in.
    #[error("shared affinity needs the exact tier: use Mode::Exact, or Affinity::Owned for a filter-only engine")]
    SharedWithoutExactTier,
    /// The mark batch size is zero.
    #[error("mark batch size is zero: use 1 to write each mark at once, or more to batch them")]
    ZeroMarkBatch,
    /// The default lease duration is zero.
    #[error("the lease duration is zero: give claims time to act (default: 30 s)")]
    ZeroLease,
    /// Allowed lateness is set without event time.
    #[error("allowed lateness only applies to event time: set `clock(Clock::EventTime)` or drop `allowed_lateness`")]
    LatenessWithoutEventTime,
    /// A durable engine was asked of [`crate::DeduperBuilder::build`].
    #[error("a durable engine needs a directory for its log: call `open(dir)` instead of `build()` (or keep Durability::None)")]
    DurabilityNeedsDirectory,
    /// Durability was asked of a configuration that cannot log its state.
    #[error("durability needs {0}; a remote tier (Redis) keeps its own state")]
    DurabilityNeeds(&'static str),
    /// An engine without first-seen times was asked for something that
    /// needs them, or for a tier that cannot drop them.
    #[error("first_seen_times(false) keeps fingerprints alone, so it needs no window (expiry needs the times), Mode::Exact, Affinity::Owned and the memory tier: {0}")]
    UntimedNeeds(&'static str),
    /// The exact tier's own configuration cannot keep the engine's
    /// contract ([`crate::exact::ExactBackend::check_spec`]).
    #[error("the {tier} tier's configuration is refused: {reason}")]
    ExactTierRefused {
        /// The backend's name.
        tier: &'static str,
        /// What to change.
        reason: String,
    },
}

/// `bytes` in the largest binary unit under which it is at least 1.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What to change when an engine needs too much memory, by what dominates.
fn memory_fix(filter: u64, exact: u64) -> &'static str {
    if exact >= filter {
        "lower `expected_keys` (the keys held within one window: the memory tier keeps about 30 bytes per key), shorten the window or the allowed lateness, or use a remote exact tier (Redis)"
    } else {
        "lower `expected_keys` (the keys held within one window), raise the false-positive target, or shorten the window or the allowed lateness (the filter is sized for both)"
    }
}

/// An exact tier that could not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExactTierError {
    /// The backend is unreachable or failed (a backend's own message).
    Unavailable(String),
    /// The backend does not offer the operation (e.g. storing claim
    /// results).
    Unsupported(&'static str),
    /// A remote store (Redis) failed: why, where, and the store's or the
    /// client's own words. `Display` says all three, e.g. "the exact tier
    /// at redis://127.0.0.1:6379 failed: connection refused (is the server
    /// running, and is the port right?): Connection refused (os error 111)".
    Remote {
        /// The server: its URL without the password (`***` in its place),
        /// or a cluster's seeds.
        server: String,
        /// What went wrong.
        cause: FailureCause,
        /// The store's or the client's message.
        detail: String,
    },
}

impl ExactTierError {
    /// What went wrong, for a remote store.
    #[must_use]
    pub fn cause(&self) -> Option<FailureCause> {
        match self {
            ExactTierError::Unavailable(_) | ExactTierError::Unsupported(_) => None,
            ExactTierError::Remote { cause, .. } => Some(*cause),
        }
    }

    /// The server that failed (no password), for a remote store.
    #[must_use]
    pub fn server(&self) -> Option<&str> {
        match self {
            ExactTierError::Unavailable(_) | ExactTierError::Unsupported(_) => None,
            ExactTierError::Remote { server, .. } => Some(server),
        }
    }
}

impl std::fmt::Display for ExactTierError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExactTierError::Unavailable(what) => write!(f, "exact tier unavailable: {what}"),
            ExactTierError::Unsupported(what) => write!(f, "exact tier cannot do this: {what}"),
            ExactTierError::Remote {
                server,
                cause,
                detail,
            } => {
                write!(f, "the exact tier at {server} failed: {cause}")?;
                if !detail.is_empty() {
                    write!(f, ": {detail}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ExactTierError {}

/// Why a remote exact tier failed ([`ExactTierError::Remote`]). Its
/// `Display` says it in a few words, with what to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureCause {
    /// Nothing listens at the address: the server is down, or the host or
    /// port is wrong.
    ConnectionRefused,
    /// No answer within the timeout: the server is stalled, overloaded or
    /// unreachable.
    Timeout,
    /// The connection was closed or reset.
    ConnectionLost,
    /// The server refused the credentials (wrong or missing password or
    /// user).
    AuthenticationFailed,
    /// The user may not run a command or touch a key the tier needs (an
    /// ACL).
    PermissionDenied,
    /// The server is a read-only replica.
    ReadOnly,
    /// The server is loading its data set.
    Loading,
    /// The server is out of memory (`maxmemory` reached with the
    /// `noeviction` policy) and refuses writes.
    OutOfMemory,
    /// A server-side script failed.
    Script,
    /// A Redis Cluster could not serve the request (down, or slots on the
    /// move).
    Cluster,
    /// The server would lose accepted keys (it evicts keys, or it is a
    /// replica), and the tier is configured to refuse such a server.
    UnsafeServer,
    /// Marks were dropped because the retry buffer was full.
    RetryBufferFull,
    /// The store answered what the tier did not expect (data it did not
    /// write, a protocol error).
    UnexpectedReply,
    /// The tier's configuration is invalid (a malformed URL).
    InvalidConfig,
    /// Any other failure: the detail says what.
    Other,
}

impl std::fmt::Display for FailureCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureCause::ConnectionRefused => {
                "connection refused (is the server running, and are the host and port right?)"
            }
            FailureCause::Timeout => {
                "no answer within the timeout (the server is stalled, overloaded or unreachable)"
            }
            FailureCause::ConnectionLost => "connection lost",
            FailureCause::AuthenticationFailed => {
                "authentication failed (wrong or missing user or password)"
            }
            FailureCause::PermissionDenied => {
                "permission denied (the user's ACL forbids a command or key the tier needs)"
            }
            FailureCause::ReadOnly => "the server is read-only (a replica: use its master)",
            FailureCause::Loading => "the server is loading its data set (retry once it has)",
            FailureCause::OutOfMemory => {
                "out of memory (maxmemory reached, and the noeviction policy refuses writes: raise maxmemory or shorten the window)"
            }
            FailureCause::Script => "a server-side script failed",
            FailureCause::Cluster => "the cluster cannot serve the request",
            FailureCause::UnsafeServer => "refused: the server would lose accepted keys",
            FailureCause::RetryBufferFull => "marks dropped: the retry buffer was full",
            FailureCause::UnexpectedReply => "unexpected reply",
            FailureCause::InvalidConfig => "invalid configuration",
            FailureCause::Other => "request failed",
        })
    }
}

/// Accepted keys whose marks the exact tier has not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// `marks` accepted keys (still inside the window) are not stored in
    /// the tier: `dropped` of them were dropped past the tier's retry
    /// buffer and are lost for good (until their slice leaves the window,
    /// every flush reports them again); the others are kept for a retry by
    /// the next flush. `source` says why (the first failing shard's error).
    #[error("{marks} accepted keys are not stored in the exact tier{}: {source}", dropped_note(*.dropped, *.marks))]
    Unwritten {
        /// Accepted keys not stored: kept for a retry, plus `dropped`.
        marks: u64,
        /// Of `marks`, those dropped past the retry buffer: never retried.
        dropped: u64,
        /// The tier's error (the first failing shard's).
        source: ExactTierError,
    },
}

fn dropped_note(dropped: u64, marks: u64) -> String {
    match dropped {
        0 => " (kept for a retry)".to_owned(),
        d if d == marks => " (dropped: the retry buffer was full)".to_owned(),
        d => {
            format!(" ({d} of them dropped: the retry buffer was full; the rest kept for a retry)")
        }
    }
}

impl FlushError {
    /// Accepted keys not stored (kept for a retry, and dropped).
    #[must_use]
    pub fn unwritten(&self) -> u64 {
        match self {
            FlushError::Unwritten { marks, .. } => *marks,
        }
    }

    /// Of [`FlushError::unwritten`], the keys whose marks were dropped past
    /// the retry buffer: no flush will store them.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        match self {
            FlushError::Unwritten { dropped, .. } => *dropped,
        }
    }

    /// Why (the first failing shard's error).
    #[must_use]
    pub fn cause(&self) -> &ExactTierError {
        match self {
            FlushError::Unwritten { source, .. } => source,
        }
    }
}

/// A snapshot that was not written, or was refused on restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Reading or writing failed.
    #[error("snapshot I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The data does not start with the snapshot magic bytes.
    #[error("not a tiered-dedup snapshot (bad magic bytes)")]
    NotASnapshot,
    /// Written by an incompatible format version.
    #[error(
        "snapshot format version {found} is not supported (this build reads versions 1 to {supported})"
    )]
    Version {
        /// Version in the file.
        found: u32,
        /// Newest version this build reads (it reads every one from 1 on).
        supported: u32,
    },
    /// The data ends early.
    #[error("snapshot is truncated")]
    Truncated,
    /// The checksum does not match: the data is corrupt.
    #[error("snapshot checksum mismatch: the file is corrupt")]
    Checksum,
    /// The data is well-formed but inconsistent.
    #[error("snapshot is malformed: {0}")]
    Malformed(&'static str),
    /// The snapshot was taken with another configuration.
    #[error("snapshot was taken with a different {0}: restore it with the configuration it was written with")]
    Mismatch(&'static str),
    /// The builder's configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(ConfigError),
    /// The exact-tier backend keeps no local state to snapshot.
    #[error("the exact tier `{0}` cannot be snapshotted")]
    Unsupported(&'static str),
}
