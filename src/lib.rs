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
//! inside the window (filter: about 2.7 bytes per key at a 1% rate per
//! generation, 3.7 at 1% per query; exact tier: 24-byte buckets at 53–80%
//! load, 30–45 bytes per key — see `docs/architecture.md` and
//! `docs/benchmarks.md`).
//!
//! ## The tiers
//!
//! ```text
//! key ─▶ fingerprint ─▶ shard ─▶ filter tier ──definitely new──▶ New (marked)
//!                                     │
//!                                     └─maybe seen─▶ exact tier ─▶ Duplicate | New
//! ```
//!
//! - **Filter tier** ([`GenerationalBloom`]): a rotating Bloom filter whose
//!   64-byte blocks hold one 64-bit word per generation, so a query reads one
//!   cache line for all generations. The window is cut into six slices; a
//!   generation is cleared only when every key in it is older than the window.
//! - **Exact tier** ([`ExactTier`]): confirms filter matches. The embedded
//!   default keeps one open-addressing table per generation per shard and
//!   drops a whole table when its slice expires.
//! - **Shards**: fingerprints are routed to shards; a shard is used by one
//!   thread at a time, so two copies of one key never race.
//!   [`Deduper::check_batch`] takes each shard's lock once per batch and
//!   prefetches filter blocks.
//!
//! - **Pipeline** ([`Pipeline`]): for streams. Each shard is owned by one
//!   worker thread; producers submit batches over bounded queues
//!   (back-pressure) and receive each batch's verdicts in submission order.
//!   Marks of new keys are queued per shard and written to the exact tier in
//!   batches after the verdicts are sent (a shard reads its own queued
//!   marks); shutdown finishes every queued batch and writes every mark.
//!
//! [`Mode::Probabilistic`] drops the exact tier: about 2 bytes per key, no
//! false negatives, and a configured false-positive rate.
//!
//! [`Deduper::snapshot`] and [`DeduperBuilder::restore`] carry the whole state
//! across a restart (versioned and checksummed).

#![warn(missing_docs)]

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

pub use engine::{Affinity, Deduper, DeduperBuilder, Mode, Sizing, Stats};
pub use error::{ConfigError, ExactTierError, FailureCause, FlushError, SnapshotError};
pub use exact::ExactTier;
pub use filter::{FilterAnswer, GenerationalBloom};
pub use fingerprint::{ContentKey, Fingerprint, Key, Namespace};
#[cfg(feature = "metrics")]
pub use metrics::MetricsPublisher;
pub use pipeline::{Pipeline, PipelineBuilder, PipelineError, Producer};
pub use snapshot::FORMAT_VERSION;
pub use time::{Clock, ManualClock, Timestamp, GENERATIONS};
pub use verdict::Verdict;

/// The README's examples, compiled and run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
