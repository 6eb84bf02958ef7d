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

mod dashmap_tier;
mod memory;
pub(crate) mod table;

use std::sync::Arc;

use crate::error::ExactTierError;
use crate::fingerprint::Fingerprint;
use crate::time::Timestamp;

pub use dashmap_tier::DashMapPartition;
pub use memory::MemoryPartition;

/// A key accepted at `at`, to be recorded in generation slot `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The accepted key.
    pub fingerprint: Fingerprint,
    /// The generation slot of the slice it was accepted in.
    pub slot: usize,
    /// When it was accepted.
    pub at: Timestamp,
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

    /// Every stored entry as `(slot, fingerprint, first accepted)`, for
    /// snapshots; `None` when the state lives elsewhere (a remote backend).
    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>>;
}

/// Makes the partitions of a custom backend.
pub trait ExactBackend: Send + Sync {
    /// A short name for errors and metrics.
    fn name(&self) -> &'static str;

    /// The partition of shard `shard` out of `shards`, sized for about
    /// `keys_per_slot` entries per slot.
    fn partition(
        &self,
        shard: usize,
        shards: usize,
        keys_per_slot: usize,
    ) -> Box<dyn ExactPartition>;
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

    pub(crate) fn partition(
        &self,
        shard: usize,
        shards: usize,
        keys_per_slot: usize,
    ) -> Box<dyn ExactPartition> {
        match self {
            ExactTier::Memory => Box::new(MemoryPartition::with_capacity(keys_per_slot)),
            ExactTier::DashMap => Box::new(DashMapPartition::with_capacity(keys_per_slot)),
            ExactTier::Custom(b) => b.partition(shard, shards, keys_per_slot),
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
