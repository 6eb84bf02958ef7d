//! `MemoryPartition`: one open-addressing table per generation slot.

use hashbrown::HashTable;

use crate::error::ExactTierError;
use crate::fingerprint::Fingerprint;
use crate::time::{Timestamp, GENERATIONS};

use super::{table_hash, ExactPartition};

/// 24 bytes: a fingerprint as two words (8-byte aligned, unlike `u128`) and
/// the first-accepted time.
#[derive(Clone, Copy)]
struct Entry {
    low: u64,
    high: u64,
    at: u64,
}

impl Entry {
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint(u128::from(self.low) | (u128::from(self.high) << 64))
    }
}

/// The embedded exact tier of one shard: `hashbrown` tables, one per slot,
/// owned by the shard (no locks, no atomics).
pub struct MemoryPartition {
    slots: [HashTable<Entry>; GENERATIONS],
    expected_per_slot: usize,
}

impl MemoryPartition {
    /// An empty partition expecting about `per_slot` entries per slot (tables
    /// are reserved on first use, so idle slots cost nothing).
    #[must_use]
    pub fn with_capacity(per_slot: usize) -> Self {
        MemoryPartition {
            slots: std::array::from_fn(|_| HashTable::new()),
            expected_per_slot: per_slot,
        }
    }
}

impl ExactPartition for MemoryPartition {
    #[inline]
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        let (low, high) = (fp.low(), fp.high());
        Ok(self.slots[slot]
            .find(table_hash(fp), |e| e.low == low && e.high == high)
            .map(|e| Timestamp::from_nanos(e.at)))
    }

    #[inline]
    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        let table = &mut self.slots[slot];
        if table.capacity() == 0 {
            table.reserve(self.expected_per_slot.min(1 << 20), |e| {
                table_hash(e.fingerprint())
            });
        }
        let (low, high) = (fp.low(), fp.high());
        let entry = Entry {
            low,
            high,
            at: at.as_nanos(),
        };
        match table.entry(
            table_hash(fp),
            |e| e.low == low && e.high == high,
            |e| table_hash(e.fingerprint()),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut o) => *o.get_mut() = entry,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(entry);
            }
        }
        Ok(())
    }

    fn clear_slots(&mut self, slots: u8) {
        for (g, table) in self.slots.iter_mut().enumerate() {
            if slots & (1 << g) != 0 {
                // Free the memory: dropping a table of `Copy` entries is one
                // deallocation, not a walk over its entries.
                *table = HashTable::new();
            }
        }
    }

    fn len(&self) -> u64 {
        self.slots.iter().map(|t| t.len() as u64).sum()
    }

    fn bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|t| t.capacity() * (std::mem::size_of::<Entry>() + 1))
            .sum()
    }

    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        let mut out = Vec::with_capacity(self.len() as usize);
        for (slot, table) in self.slots.iter().enumerate() {
            out.extend(
                table
                    .iter()
                    .map(|e| (slot, e.fingerprint(), Timestamp::from_nanos(e.at))),
            );
        }
        Some(out)
    }
}
