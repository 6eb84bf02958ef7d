//! The exact tier: confirms what the filter only suspects.
//!
//! Each engine shard owns one [`ExactPartition`]; the shard's lock (or, in the
//! pipeline, its single worker) serialises every call on it, so a partition
//! needs no locking of its own. Entries are grouped by the same eight
//! generation slots as the filter: an entry lives in the slot of the slice it
//! was accepted in, a lookup only visits the slots the filter matched, and a
//! slot is dropped whole when its slice expires — no scan over live entries.
//!
//! Backends are trait objects (the I/O path); [`ExactTier`] picks one.

mod bodies;
mod dashmap_tier;
mod memory;
#[cfg(feature = "redis")]
pub mod redis;
pub(crate) mod table;

use std::sync::Arc;

use crate::claims::PayloadFingerprint;
use crate::error::{ConfigError, ExactTierError};
use crate::fingerprint::Fingerprint;
use crate::time::Timestamp;

pub use bodies::RecordBody;
pub use dashmap_tier::DashMapPartition;
pub use memory::MemoryPartition;
pub(crate) use memory::{Seen, FIRST_TABLE_ENTRIES};

/// A key accepted at `at`, to be recorded in generation slot `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The accepted key.
    pub fingerprint: Fingerprint,
    /// The generation slot of the slice it was accepted in.
    pub slot: usize,
    /// The slice it was accepted in (`slot == slice % 8`; 0 without a
    /// window).
    pub slice: u64,
    /// When it was accepted.
    pub at: Timestamp,
}

/// A batched lookup: the newest stored time of `fingerprint` among the
/// slots in `slots` (bit `g` = slot `g`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// The key.
    pub fingerprint: Fingerprint,
    /// The generation slots to search.
    pub slots: u8,
}

/// A batched claim (shared mode): record the key at `at` unless it was
/// accepted less than the window before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The key.
    pub fingerprint: Fingerprint,
    /// Its time.
    pub at: Timestamp,
}

/// One operation of a shared-mode claim batch
/// ([`ExactPartition::shared_claims`]): each is atomic in the store with
/// respect to every engine sharing it. Lease times (`now`, `until`) are on
/// the engines' common lease clock (wall-clock nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedOp<'a> {
    /// A claim at record time `at`: a live lease answers
    /// [`SharedAnswer::InProgress`] (or `Conflict`), a record within the
    /// window [`SharedAnswer::Completed`] (or `Conflict`); otherwise the
    /// store issues the next fencing token of the key's shard, holds the
    /// key until `until` and answers [`SharedAnswer::Acquired`].
    Claim {
        /// The key.
        fingerprint: Fingerprint,
        /// The claim's record time (the window's anchor if committed).
        at: Timestamp,
        /// Lease-clock time now.
        now: u64,
        /// When the lease expires if acquired.
        until: u64,
        /// The claim's payload fingerprint.
        payload: Option<PayloadFingerprint>,
    },
    /// A claim and commit in one step with no result (a check): answers
    /// `Acquired` (recorded at `at`), `InProgress` or `Completed`.
    Check {
        /// The key.
        fingerprint: Fingerprint,
        /// The check's time.
        at: Timestamp,
        /// Lease-clock time now.
        now: u64,
    },
    /// Commits the lease `token` if it still holds the key at `now`: the
    /// record keeps the claim's `at` and payload, and stores `result`.
    /// Answers [`SharedAnswer::Done`] or [`SharedAnswer::Lost`].
    Commit {
        /// The key.
        fingerprint: Fingerprint,
        /// The lease's token.
        token: u64,
        /// Lease-clock time now.
        now: u64,
        /// The result to store.
        result: &'a [u8],
    },
    /// Releases the lease `token` if it still holds the key at `now`:
    /// `Done` or `Lost`.
    Release {
        /// The key.
        fingerprint: Fingerprint,
        /// The lease's token.
        token: u64,
        /// Lease-clock time now.
        now: u64,
    },
    /// Extends the lease `token` to `until` if it still holds the key at
    /// `now`: `Done` or `Lost`.
    Extend {
        /// The key.
        fingerprint: Fingerprint,
        /// The lease's token.
        token: u64,
        /// Lease-clock time now.
        now: u64,
        /// The new expiry.
        until: u64,
    },
    /// Removes the key's lease and records: `Forgotten(found)`.
    Forget {
        /// The key.
        fingerprint: Fingerprint,
    },
}

/// The store's answer to one [`SharedOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SharedAnswer {
    /// The claim holds the key with this fencing token (a `Check`: the key
    /// is recorded).
    Acquired {
        /// The lease's token.
        token: u64,
    },
    /// A claim holds the key with this fencing token, its record anchored
    /// at `at` rather than at the claim's time: a claim decided again past
    /// the window of a record whose result another engine's rotation had
    /// deleted (the Redis tier's shared claims).
    AcquiredAt {
        /// The lease's token.
        token: u64,
        /// The record time the store keeps for the key.
        at: Timestamp,
    },
    /// Another live lease holds the key until `until`.
    InProgress {
        /// The holder's expiry.
        until: u64,
    },
    /// Committed within the window.
    Completed {
        /// The record's time.
        first_seen: Timestamp,
        /// Its payload and result, if it has any.
        body: Option<RecordBody>,
    },
    /// Held or completed with another payload fingerprint.
    Conflict,
    /// The commit, release or extension was applied.
    Done,
    /// The lease no longer holds the key: nothing applied.
    Lost,
    /// A `Forget`: whether something was removed.
    Forgotten(bool),
}

/// The newest slot first: slots of slices `current, current−1, …`.
pub(crate) fn slots_newest_first(current: u64) -> impl Iterator<Item = (u64, usize)> {
    (0..crate::time::GENERATIONS as u64 - 1)
        .filter(move |&back| back <= current)
        .map(move |back| (current - back, crate::time::slot_of(current - back)))
}

/// One shard's share of an exact tier.
pub trait ExactPartition: Send {
    /// The first-accepted time of `fp` in generation slot `slot`, if stored.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot answer.
    fn lookup(&mut self, fp: Fingerprint, slot: usize)
        -> Result<Option<Timestamp>, ExactTierError>;

    /// Records that `fp` was accepted at `at`, in slot `slot`.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot record it.
    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError>;

    /// True for a remote backend: the engine then gathers a batch's filter
    /// matches and asks [`ExactPartition::lookup_batch`] once, instead of
    /// one [`ExactPartition::lookup`] per key. Default: false.
    fn prefers_batches(&self) -> bool {
        false
    }

    /// True when entries outlive the process (a remote tier): a fresh
    /// engine's filter is then cold — it does not know what was accepted
    /// before it started — and "definitely new" is confirmed here until a
    /// whole window has passed. Default: false.
    fn persistent(&self) -> bool {
        false
    }

    /// For each lookup, in order, the newest stored time of its fingerprint
    /// in its slots (the slice of slot `g` is the newest slice `≤ current`
    /// in that slot). Default: [`ExactPartition::lookup`] per slot.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot answer; `out` is then
    /// meaningless.
    fn lookup_batch(
        &mut self,
        current: u64,
        lookups: &[Lookup],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        out.clear();
        for q in lookups {
            let mut found = None;
            for (_, slot) in slots_newest_first(current) {
                if q.slots & (1 << slot) != 0 {
                    if let Some(t) = self.lookup(q.fingerprint, slot)? {
                        found = Some(t);
                        break;
                    }
                }
            }
            out.push(found);
        }
        Ok(())
    }

    /// Shared mode: for each claim in order, atomically with respect to
    /// every other engine on the same store: if its key was accepted at
    /// `t0` in a live slice with `at − t0 < window`, answer `Some(t0)`;
    /// otherwise record it at `at` in slice `current` and answer `None`.
    /// Default (local backends): lookups and marks.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot answer; nothing is then
    /// assumed recorded.
    fn claim_batch(
        &mut self,
        current: u64,
        window: Option<u64>,
        claims: &[Claim],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        out.clear();
        for c in claims {
            let mut newest = None;
            for (_, slot) in slots_newest_first(current) {
                if let Some(t) = self.lookup(c.fingerprint, slot)? {
                    newest = Some(t);
                    break;
                }
            }
            let inside = newest.filter(|t0| {
                window.is_none_or(|w| c.at.as_nanos().saturating_sub(t0.as_nanos()) < w)
            });
            if inside.is_none() {
                self.mark(c.fingerprint, crate::time::slot_of(current), c.at)?;
            }
            out.push(inside);
        }
        Ok(())
    }

    /// Shared keys on a remote store: claims, checks, commits, releases,
    /// extensions and forgets, each atomic in the store with respect to
    /// every engine sharing it (see [`SharedOp`]), answered in order in
    /// `out`. The store keeps the leases (so every engine sees them) and
    /// issues the fencing tokens. Default: unsupported (a local tier's
    /// leases live in its engine).
    ///
    /// # Errors
    /// [`ExactTierError`] when the store cannot answer; `out` is then
    /// meaningless and nothing may be assumed applied.
    fn shared_claims(
        &mut self,
        current: u64,
        window: Option<u64>,
        ops: &[SharedOp<'_>],
        out: &mut Vec<SharedAnswer>,
    ) -> Result<(), ExactTierError> {
        let _ = (current, window, ops, out);
        Err(ExactTierError::Unsupported(
            "this exact tier does not hold shared claims",
        ))
    }

    /// Records many marks at once (a flushed [`Mark`] batch). The default
    /// calls [`ExactPartition::mark`] for each; remote backends send one
    /// request.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot record them; none of the
    /// marks is then assumed recorded.
    fn mark_batch(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        for m in marks {
            self.mark(m.fingerprint, m.slot, m.at)?;
        }
        Ok(())
    }

    /// Writes what the backend itself still holds for writing: marks kept
    /// for retry after a failure (a remote backend). The engine calls it on
    /// a forced flush ([`crate::Deduper::flush`], shutdown) when no batch is
    /// pending, so marks kept while the store was down are written once it
    /// is back even if no key arrives. Default: nothing.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend still cannot write them (they
    /// stay kept).
    fn flush(&mut self) -> Result<(), ExactTierError> {
        Ok(())
    }

    /// Stores the body of a committed claim (its payload fingerprint and
    /// result, not both empty) beside its mark, which [`ExactPartition::mark`] or
    /// [`ExactPartition::mark_batch`] has written or will write. A body
    /// lives and expires with its record. Default: unsupported.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot store it (nothing of the
    /// commit is then assumed stored).
    fn put_body(
        &mut self,
        mark: &Mark,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
    ) -> Result<(), ExactTierError> {
        let _ = (mark, payload, result);
        Err(ExactTierError::Unsupported(
            "this exact tier does not store claim results",
        ))
    }

    /// The body stored with `fp`'s record accepted at `at`, most likely in
    /// generation slot `slot`. `None` when the record has none (recorded
    /// by a check, or committed with no payload and no result). Default:
    /// none.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot answer.
    fn body(
        &mut self,
        fp: Fingerprint,
        slot: usize,
        at: Timestamp,
    ) -> Result<Option<RecordBody>, ExactTierError> {
        let _ = (fp, slot, at);
        Ok(None)
    }

    /// [`ExactPartition::body`] for many records `(fingerprint, likely
    /// slot, record time)`, answered in order in `out`: a remote tier reads
    /// them in one request. Default: `body` for each.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot answer; `out` is then
    /// meaningless.
    fn bodies_batch(
        &mut self,
        records: &[(Fingerprint, usize, Timestamp)],
        out: &mut Vec<Option<RecordBody>>,
    ) -> Result<(), ExactTierError> {
        out.clear();
        for &(fp, slot, at) in records {
            out.push(self.body(fp, slot, at)?);
        }
        Ok(())
    }

    /// Every stored body as `(slot, fingerprint, record time, body)`, for
    /// snapshots. Default: none.
    fn bodies(&self) -> Vec<(usize, Fingerprint, Timestamp, RecordBody)> {
        Vec::new()
    }

    /// The engine's current slice, named before a call that carries none
    /// ([`ExactPartition::forget`]): a tier that files records by slice
    /// then looks for them in the slices live now, even on an engine that
    /// has made no other call yet (under event time, the slice of the
    /// watermark, which is zero before any event). The default does
    /// nothing; a partition that wraps another must forward it.
    fn name_slice(&mut self, _current: u64) {}

    /// Removes whatever is recorded for `fp` in every slot (its marks and
    /// body): the next claim or check of it is new. True if something was.
    /// Default: unsupported.
    ///
    /// # Errors
    /// [`ExactTierError`] when the backend cannot remove it.
    fn forget(&mut self, fp: Fingerprint) -> Result<bool, ExactTierError> {
        let _ = fp;
        Err(ExactTierError::Unsupported(
            "this exact tier cannot forget a key",
        ))
    }

    /// [`ExactPartition::mark_batch`] from the engine's idle upkeep
    /// ([`crate::Deduper::maintain`], a pipeline worker between batches):
    /// the shard's lock is held although no check is waiting for this, so
    /// a remote backend must not wait long on a slow store — it keeps the
    /// marks for a retry instead. Default: [`ExactPartition::mark_batch`].
    ///
    /// # Errors
    /// As [`ExactPartition::mark_batch`].
    fn mark_batch_idle(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        self.mark_batch(marks)
    }

    /// [`ExactPartition::flush`] from the engine's idle upkeep (see
    /// [`ExactPartition::mark_batch_idle`]): settles what the store has
    /// answered and retries kept marks, without waiting long. Default:
    /// [`ExactPartition::flush`].
    ///
    /// # Errors
    /// As [`ExactPartition::flush`], or when the store did not answer in
    /// the short time allowed (the marks stay kept).
    fn flush_idle(&mut self) -> Result<(), ExactTierError> {
        self.flush()
    }

    /// Marks this partition accepted and has not stored yet: kept after a
    /// failure for a retry by the next [`ExactPartition::flush`] (a remote
    /// tier counts marks sent but not answered yet too). A local tier
    /// stores every mark at once. Default: 0.
    fn unwritten(&self) -> u64 {
        0
    }

    /// Marks of keys still inside the window that this partition accepted
    /// and gave up on (dropped past a bounded retry buffer): no flush will
    /// store them. While there are any, [`ExactPartition::flush`] fails.
    /// Default: 0.
    fn dropped(&self) -> u64 {
        0
    }

    /// Starts loading what a `lookup` or `mark` of `fp` in `slot` will touch
    /// (the batch path calls it a few keys ahead). Default: nothing.
    fn prefetch(&self, fp: Fingerprint, slot: usize) {
        let _ = (fp, slot);
    }

    /// Drops every entry of the slots in `slots` (bit `g` = slot `g`): their
    /// slices have expired.
    fn clear_slots(&mut self, slots: u8);

    /// Entries stored.
    fn len(&self) -> u64;

    /// True when no entry is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory used in this process.
    fn bytes(&self) -> usize;

    /// False for a partition that keeps fingerprints alone (the memory
    /// tier of an engine built with `first_seen_times(false)`): its
    /// [`ExactPartition::entries`] carry no real times. Default: true.
    fn keeps_times(&self) -> bool {
        true
    }

    /// Every stored entry as `(slot, fingerprint, first accepted)`, for
    /// snapshots; `None` when the state lives elsewhere (a remote backend).
    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>>;

    /// A restore is about to [`ExactPartition::mark`] about `entries`
    /// entries into this (empty) partition: a hint to size for them once.
    /// Default: nothing.
    fn reserve(&mut self, entries: u64) {
        let _ = entries;
    }
}

/// One of a backend's own figures (requests sent, failures, …), which
/// `Deduper::publish_metrics` (feature `metrics`) publishes next to
/// the engine's counters, with the same labels.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum TierMetric {
    /// A count that only grows over the backend's life (published as an
    /// absolute counter).
    Counter {
        /// The series name, e.g. `tiered_dedup_redis_requests_total`.
        name: &'static str,
        /// The count so far.
        value: u64,
    },
    /// A level that goes up and down (published as a gauge).
    Gauge {
        /// The series name, e.g. `tiered_dedup_redis_marks_unsent`.
        name: &'static str,
        /// The level now.
        value: f64,
    },
}

impl TierMetric {
    /// The series name.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            TierMetric::Counter { name, .. } | TierMetric::Gauge { name, .. } => name,
        }
    }

    /// True for a counter.
    #[must_use]
    pub fn is_counter(&self) -> bool {
        matches!(self, TierMetric::Counter { .. })
    }
}

/// Makes the partitions of a custom backend.
pub trait ExactBackend: Send + Sync {
    /// A short name for errors and metrics.
    fn name(&self) -> &'static str;

    /// The partition of one shard.
    fn partition(&self, spec: &PartitionSpec) -> Box<dyn ExactPartition>;

    /// Refuses a configuration of the backend that cannot keep the
    /// engine's contract for `spec` (e.g. a retention shorter than the
    /// window): the engine's builder fails with
    /// [`crate::ConfigError::ExactTierRefused`] and this reason, before any
    /// partition is made. Default: everything is accepted.
    ///
    /// # Errors
    /// What to change, in a sentence.
    fn check_spec(&self, spec: &PartitionSpec) -> Result<(), String> {
        let _ = spec;
        Ok(())
    }

    /// Hands each of the backend's own counters and gauges to `report`.
    /// Called once per `Deduper::publish_metrics` (feature `metrics`), never per key,
    /// so it may read atomics or take a lock; it must not block on I/O.
    /// Default: nothing to report.
    fn report_metrics(&self, report: &mut dyn FnMut(TierMetric)) {
        let _ = report;
    }
}

/// What a backend needs to know to make one shard's partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionSpec {
    /// This shard's index.
    pub shard: usize,
    /// Number of shards.
    pub shards: usize,
    /// Entries one slot is expected to hold.
    pub keys_per_slot: usize,
    /// The window in nanoseconds (`None`: keys never expire).
    pub window_nanos: Option<u64>,
    /// One slice in nanoseconds (`None` without a window).
    pub slice_nanos: Option<u64>,
    /// Window plus allowed lateness in nanoseconds.
    pub span_nanos: Option<u64>,
    /// The namespace's seed (part of remote key names).
    pub namespace_seed: u64,
    /// Keys are shared between engines ([`crate::Affinity::Shared`]): every
    /// key is claimed in the tier.
    pub shared: bool,
}

/// Which exact tier an engine confirms with.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum ExactTier {
    /// Prefetchable open-addressing tables owned by each shard (the embedded default: the
    /// fastest measured, see `docs/benchmarks.md`).
    #[default]
    Memory,
    /// `DashMap`s, one per slot per shard.
    DashMap,
    /// A backend of the caller's.
    Custom(Arc<dyn ExactBackend>),
}

impl ExactTier {
    /// The backend's name.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            ExactTier::Memory => "memory",
            ExactTier::DashMap => "dashmap",
            ExactTier::Custom(b) => b.name(),
        }
    }

    /// Hands the backend's own figures to `report` (see
    /// [`ExactBackend::report_metrics`]); the built-in local tiers have
    /// none beyond the engine's.
    pub fn report_metrics(&self, report: &mut dyn FnMut(TierMetric)) {
        match self {
            ExactTier::Memory | ExactTier::DashMap => {}
            ExactTier::Custom(b) => b.report_metrics(report),
        }
    }

    /// The backend's [`ExactBackend::check_spec`]; the built-in tiers
    /// accept every spec.
    pub(crate) fn check_spec(&self, spec: &PartitionSpec) -> Result<(), ConfigError> {
        match self {
            ExactTier::Memory | ExactTier::DashMap => Ok(()),
            ExactTier::Custom(b) => {
                b.check_spec(spec)
                    .map_err(|reason| ConfigError::ExactTierRefused {
                        tier: b.name(),
                        reason,
                    })
            }
        }
    }

    pub(crate) fn partition(&self, spec: &PartitionSpec) -> Partition {
        match self {
            ExactTier::Memory => {
                let mut m = MemoryPartition::with_capacity(spec.keys_per_slot);
                if spec.window_nanos.is_none() {
                    m.keep_all_in_slot_zero();
                }
                Partition::Memory(Box::new(m))
            }
            ExactTier::DashMap => Partition::Other(Box::new(DashMapPartition::with_capacity(
                spec.keys_per_slot,
            ))),
            ExactTier::Custom(b) => Partition::Other(b.partition(spec)),
        }
    }
}

/// A shard's exact-tier partition. The embedded memory tier is called
/// directly (its per-key calls — prefetch, lookup, mark — inline into the
/// engine's loop); any other backend through the trait object. Everything
/// else goes through [`ExactPartition`] by `Deref`.
pub(crate) enum Partition {
    Memory(Box<MemoryPartition>),
    Other(Box<dyn ExactPartition>),
}

impl Partition {
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint, slot: usize) {
        match self {
            Partition::Memory(m) => m.prefetch(fp, slot),
            Partition::Other(o) => o.prefetch(fp, slot),
        }
    }

    #[inline]
    pub(crate) fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        match self {
            Partition::Memory(m) => m.lookup(fp, slot),
            Partition::Other(o) => o.lookup(fp, slot),
        }
    }

    #[inline]
    pub(crate) fn mark(
        &mut self,
        fp: Fingerprint,
        slot: usize,
        at: Timestamp,
    ) -> Result<(), ExactTierError> {
        match self {
            Partition::Memory(m) => m.mark(fp, slot, at),
            Partition::Other(o) => o.mark(fp, slot, at),
        }
    }
}

impl std::ops::Deref for Partition {
    type Target = dyn ExactPartition;

    fn deref(&self) -> &Self::Target {
        match self {
            Partition::Memory(m) => m.as_ref(),
            Partition::Other(o) => o.as_ref(),
        }
    }
}

impl std::ops::DerefMut for Partition {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Partition::Memory(m) => m.as_mut(),
            Partition::Other(o) => o.as_mut(),
        }
    }
}

impl std::fmt::Debug for ExactTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The hash an exact-tier table uses for a fingerprint: its high half. The
/// low half chose the shard, so its low bits are equal within a shard.
#[inline]
pub(crate) fn table_hash(fp: Fingerprint) -> u64 {
    fp.high()
}
