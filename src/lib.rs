//! # tiered-dedup
//!
//! Exact, windowed deduplication at millions of keys per second: "has this
//! key been accepted before, within the window?" — answered without a false
//! negative or a false positive, mostly from cache.
//!
//! ```
//! use std::time::Duration;
//! use tiered_dedup::{Deduper, Verdict};
//!
//! let dedup = Deduper::builder()
//!     .window(Duration::from_secs(600))
//!     .expected_keys(100_000)
//!     .build()?;
//! assert_eq!(dedup.check("payment-7f3a"), Verdict::New);
//! assert!(dedup.check("payment-7f3a").is_duplicate());
//! # Ok::<(), tiered_dedup::ConfigError>(())
//! ```
//!
//! ## Semantics
//!
//! - A **key** is the bytes that identify one operation; a **namespace** is
//!   an independent key space. Every tier stores the 128-bit xxh3
//!   [`Fingerprint`] of (namespace, key), never the key (collision
//!   probability ≈ n²/2¹²⁹: 1.5·10⁻²¹ at 10⁹ keys).
//! - A key is a **duplicate** when an earlier occurrence was *accepted* less
//!   than the window `W` ago. The window is anchored at the accepted
//!   occurrence: duplicates do not extend it. A repeat exactly `W` later is
//!   [`Verdict::New`] again; one nanosecond earlier it is
//!   [`Verdict::Duplicate`].
//! - **Clock**: processing time by default ([`Clock::System`], monotonic), or
//!   event time ([`Clock::EventTime`], a timestamp per key through
//!   [`Deduper::check_at`]). Under event time "now" is the watermark, the
//!   highest timestamp seen; an event more than the allowed lateness behind it
//!   is [`Verdict::Late`] (neither accepted nor recorded), because its window
//!   is no longer kept. A repeat timestamped before its accepted occurrence is
//!   a duplicate.
//! - Without a window ([`DeduperBuilder::no_window`]) keys never expire. An
//!   engine that need not say *when* a key was first seen can keep its
//!   fingerprints alone ([`DeduperBuilder::first_seen_times`]`(false)`, 16
//!   bytes per key instead of 24): its duplicates are
//!   [`Verdict::DuplicateUntimed`].
//!
//! Guarantees, for every stream, shard count, batch size and thread count:
//! no false negative inside the window; no false positive (up to fingerprint
//! collisions); the verdicts equal those of a map from key to first-accepted
//! time (tested against one in `tests/model.rs`); memory bounded by the keys
//! inside the window (memory tier: 24-byte entries at 53–80% load, about 35
//! bytes per key as sized; a filter, where there is one: about 3.7 bytes per
//! key at the default 1% rate — see `docs/architecture.md` and
//! `docs/benchmarks.md`). A configuration whose expected keys would not fit
//! in the machine's memory (or `memory_limit`) is refused at build with what
//! to change.
//!
//! ## The tiers
//!
//! ```text
//! key ─▶ fingerprint ─▶ shard ─┬─ memory tier, owned keys (default): one probe of
//!                              │  the shard's table ─▶ Duplicate | New (recorded)
//!                              └─ any other tier: filter ──definitely new──▶ New (mark queued)
//!                                                   └─maybe seen─▶ exact tier ─▶ Duplicate | New
//! ```
//!
//! - **Memory tier, owned keys** (the default, [`ExactTier::Memory`] with
//!   [`Affinity::Owned`]): no filter. Each shard owns one open-addressing
//!   table of 24-byte entries (fingerprint and first-accepted time) for the
//!   whole window, and one probe both answers and records a key. An entry
//!   older than the window is never trusted (a repeat is accepted again in
//!   place), and expired entries are swept out a few buckets per check, so
//!   memory stays bounded without a stop-the-world scan. A filter in front
//!   could only add a second random access: every key costs a probe of the
//!   table anyway.
//! - **Filter tier** ([`GenerationalBloom`]): in front of every other exact
//!   tier (Redis, `DashMap`, a custom [`exact::ExactBackend`]), with shared
//!   keys, and alone in probabilistic mode. A rotating Bloom filter whose
//!   64-byte blocks hold one 64-bit word per generation, so a query reads one
//!   cache line for all generations. The window is cut into six slices; a
//!   generation is cleared only when every key in it is older than the window.
//! - **Exact tier behind the filter** ([`ExactTier`]): confirms the filter's
//!   matches; marks of new keys are queued per shard and written in batches
//!   (a shard reads its own queued marks). Redis (feature `redis`) is the
//!   shared, durable one; the memory tier behind a filter (shared keys)
//!   keeps a table per generation and drops it whole when its slice expires.
//! - **Shards**: fingerprints are routed to shards; a shard is used by one
//!   thread at a time, so two copies of one key never race.
//!   [`Deduper::check_batch`] takes each shard's lock once per batch and
//!   prefetches what each key will touch a few keys ahead.
//!
//! - **Pipeline** ([`Pipeline`]): for streams. Each shard is owned by one
//!   worker thread; producers submit batches over bounded queues
//!   (back-pressure) and receive each batch's verdicts in submission order.
//!   Marks of new keys are written to the exact tier after the verdicts are
//!   sent. Shutdown answers every batch accepted before it and writes every
//!   mark; a batch it refuses ([`PipelineError::Closed`]) recorded nothing,
//!   and marks a remote tier could not store are reported
//!   ([`PipelineError::Unwritten`]).
//!
//! [`Mode::Probabilistic`] drops the exact tier: about 3.7 bytes per key in
//! the window at the default 1% rate (3.71 measured in `tests/fpr.rs`), no
//! false negatives, and the configured false-positive rate.
//!
//! [`Deduper::snapshot`] and [`DeduperBuilder::restore`] carry the whole state
//! across a restart (versioned and checksummed).
//!
//! ## Durability
//!
//! Opened on a directory ([`DeduperBuilder::open`]), the memory tier
//! survives crashes: every batch's changes (keys accepted, claims acquired,
//! committed with their results, released, forgotten) go to an append-only
//! log before its verdicts are returned ([`Durability::Os`]: a killed
//! process loses no key whose verdict was returned), or are `fdatasync`ed in
//! groups first ([`Durability::Sync`]: nor does a power loss). Checkpoints
//! bound the log; a restart replays the log after the checkpoint, cutting a
//! torn tail and refusing damage before it; a full disk stops the log (calls
//! answer [`Verdict::Unavailable`]) without touching the last checkpoint.
//! See [`durability`].

#![warn(missing_docs)]

pub mod claims;
pub mod consumer;
pub mod durability;
mod engine;
mod error;
pub mod exact;
pub mod filter;
mod fingerprint;
mod hugealloc;
#[cfg(feature = "metrics")]
mod metrics;
mod pipeline;
mod snapshot;
mod sync;
mod time;
mod trace;
mod verdict;

pub use claims::{
    Claim, ClaimBatcher, ClaimKind, ClaimRequest, CommitError, Lease, LeaseInfo, LeaseLost,
    PayloadFingerprint, Reply,
};
pub use durability::{Durability, DurabilityError, DurabilityStats, Recovery};
pub use engine::{Affinity, ClaimStats, Deduper, DeduperBuilder, Mode, Sizing, Stats, Unsettled};
pub use error::{ConfigError, ExactTierError, FailureCause, FlushError, SnapshotError};
pub use exact::ExactTier;
pub use filter::{FilterAnswer, GenerationalBloom};
pub use fingerprint::{ContentKey, Fingerprint, Key, Namespace};
#[cfg(feature = "metrics")]
pub use metrics::MetricsPublisher;
pub use pipeline::{
    IntoDeduperError, Pipeline, PipelineBuilder, PipelineEngine, PipelineError, Producer,
};
pub use snapshot::FORMAT_VERSION;
pub use time::{Clock, ManualClock, Timestamp, GENERATIONS};
pub use verdict::Verdict;

/// The README's examples, compiled and run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
