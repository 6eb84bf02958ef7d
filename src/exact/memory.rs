//! `MemoryPartition`: one prefetchable open-addressing table per generation
//! slot.

use crate::error::ExactTierError;
use crate::fingerprint::Fingerprint;
use crate::time::{Timestamp, GENERATIONS};

use super::table::FingerprintTable;
use super::{ExactPartition, Mark};

/// The embedded exact tier of one shard: one open-addressing table per
/// generation slot, owned by the shard (no locks, no atomics), 24 bytes per
/// entry.
pub struct MemoryPartition {
    slots: [FingerprintTable; GENERATIONS],
    expected_per_slot: usize,
}

impl MemoryPartition {
    /// An empty partition expecting about `per_slot` entries per slot (tables
    /// are allocated on first use, so idle slots cost nothing).
    #[must_use]
    pub fn with_capacity(per_slot: usize) -> Self {
        MemoryPartition {
            slots: std::array::from_fn(|_| FingerprintTable::new()),
            expected_per_slot: per_slot,
        }
    }
}

impl MemoryPartition {
    /// A slot's table, sized up front for the keys expected in a slot (the
    /// engine asks for what the filter lets into a slot before it grows: its
    /// sizing and a quarter more, so about 64% of the buckets are used at
    /// the expected count), capped at 2²⁰ entries so a generous estimate
    /// does not allocate a huge idle table.
    /// Gives `slot` its table (once per slice).
    #[cold]
    #[inline(never)]
    fn allocate(&mut self, slot: usize) {
        self.slots[slot] = self.fresh_table();
    }

    fn fresh_table(&self) -> FingerprintTable {
        FingerprintTable::with_capacity(self.expected_per_slot.min(1 << 20))
    }
}

impl MemoryPartition {
    /// Without a window (every entry in slot 0), the check and the mark in
    /// one probe: the first-accepted time of `fp`, or `None` after recording
    /// `at` as its first acceptance.
    #[inline(always)]
    pub(crate) fn first_seen_or_mark(
        &mut self,
        fp: Fingerprint,
        at: Timestamp,
    ) -> Option<Timestamp> {
        if !self.slots[0].is_allocated() {
            self.allocate(0);
        }
        self.slots[0]
            .get_or_insert(fp, at.as_nanos())
            .map(Timestamp::from_nanos)
    }
}

impl ExactPartition for MemoryPartition {
    #[inline]
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        Ok(self.slots[slot].get(fp).map(Timestamp::from_nanos))
    }

    #[inline(always)]
    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        if !self.slots[slot].is_allocated() {
            self.allocate(slot);
        }
        self.slots[slot].insert(fp, at.as_nanos());
        Ok(())
    }

    fn mark_batch(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        // Allocate first, so prefetches hit the tables the inserts will use.
        for m in marks {
            if !self.slots[m.slot].is_allocated() {
                self.slots[m.slot] = self.fresh_table();
            }
        }
        const AHEAD: usize = 8;
        for m in marks.iter().take(AHEAD) {
            self.slots[m.slot].prefetch(m.fingerprint);
        }
        for (i, m) in marks.iter().enumerate() {
            if let Some(ahead) = marks.get(i + AHEAD) {
                self.slots[ahead.slot].prefetch(ahead.fingerprint);
            }
            self.slots[m.slot].insert(m.fingerprint, m.at.as_nanos());
        }
        Ok(())
    }

    #[inline]
    fn prefetch(&self, fp: Fingerprint, slot: usize) {
        self.slots[slot].prefetch(fp);
    }

    fn clear_slots(&mut self, slots: u8) {
        for (g, table) in self.slots.iter_mut().enumerate() {
            if slots & (1 << g) != 0 {
                // Free the memory: one deallocation, no walk over entries.
                *table = FingerprintTable::new();
            }
        }
    }

    fn len(&self) -> u64 {
        self.slots.iter().map(|t| t.len() as u64).sum()
    }

    fn bytes(&self) -> usize {
        self.slots.iter().map(FingerprintTable::bytes).sum()
    }

    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        let mut out = Vec::with_capacity(self.len() as usize);
        for (slot, table) in self.slots.iter().enumerate() {
            out.extend(
                table
                    .iter()
                    .map(|(fp, at)| (slot, fp, Timestamp::from_nanos(at))),
            );
        }
        Some(out)
    }
}
