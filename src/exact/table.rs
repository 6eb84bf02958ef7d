//! `FingerprintTable`: an open-addressing table of (fingerprint, time) that
//! can be prefetched.
//!
//! The exact tier never deletes single entries (a whole slot is dropped when
//! its slice expires), so the table is the simplest kind there is: linear
//! probing, no tombstones, growth by rehashing into twice the buckets. What a
//! general-purpose map cannot offer is [`FingerprintTable::prefetch`]: the
//! batch path computes a key's bucket several keys ahead and starts loading
//! it, so the DRAM miss of a 10⁷-entry table overlaps other work.

use crate::fingerprint::Fingerprint;

/// Marks an empty bucket: times are stored plus one (saturating), so a
/// table is all-zero memory when new and can come straight from the OS.
const EMPTY: u64 = 0;

/// 24 bytes: the fingerprint as two words (8-byte aligned, unlike `u128`)
/// and the first-accepted time plus one, `EMPTY` for a free bucket.
#[derive(Clone, Copy)]
#[repr(C)]
struct Bucket {
    low: u64,
    high: u64,
    at: u64,
}

const FREE: Bucket = Bucket {
    low: 0,
    high: 0,
    at: EMPTY,
};

/// The stored form of a time (plus one; `u64::MAX`, 2554, saturates).
#[inline]
fn encode(at: u64) -> u64 {
    at.saturating_add(1)
}

/// Fingerprint → first-accepted time, for one slot of one shard.
pub(crate) struct FingerprintTable {
    buckets: crate::hugealloc::ZeroedArray<Bucket>,
    len: usize,
    /// `64 − log2(buckets)`: the bucket of a key is its hash's top bits.
    shift: u32,
}

/// Grow when more than 7/8 of the buckets would be used.
const MAX_LOAD_NUM: usize = 7;
const MAX_LOAD_DEN: usize = 8;

impl FingerprintTable {
    /// An empty table that allocates nothing.
    pub(crate) fn new() -> Self {
        FingerprintTable {
            // SAFETY: all-zero bytes are a free `Bucket`.
            buckets: unsafe { crate::hugealloc::ZeroedArray::new(0) },
            len: 0,
            shift: 64,
        }
    }

    /// A table with room for `entries` before it grows.
    pub(crate) fn with_capacity(entries: usize) -> Self {
        let buckets = (entries.max(8) * MAX_LOAD_DEN / MAX_LOAD_NUM + 1).next_power_of_two();
        FingerprintTable {
            // SAFETY: all-zero bytes are a free `Bucket`.
            buckets: unsafe { crate::hugealloc::ZeroedArray::new(buckets) },
            len: 0,
            shift: 64 - buckets.trailing_zeros(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<Bucket>()
    }

    pub(crate) fn is_allocated(&self) -> bool {
        !self.buckets.is_empty()
    }

    /// The home bucket of `fp`: the top bits of its high half (the low half's
    /// low bits are the shard number, equal for every key here).
    #[inline]
    fn home(&self, fp: Fingerprint) -> usize {
        // shift is 64 only for the empty table, which has no buckets.
        fp.high().checked_shr(self.shift).unwrap_or(0) as usize
    }

    /// Starts loading the home bucket of `fp` into cache.
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint) {
        if self.buckets.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let ptr = std::ptr::from_ref(&self.buckets[self.home(fp)]).cast::<i8>();
            // SAFETY: prefetch is a hint; the pointer is in bounds.
            unsafe { std::arch::x86_64::_mm_prefetch(ptr, std::arch::x86_64::_MM_HINT_T0) };
        }
    }

    /// The time stored for `fp`.
    #[inline]
    pub(crate) fn get(&self, fp: Fingerprint) -> Option<u64> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.buckets.len() - 1;
        let (low, high) = (fp.low(), fp.high());
        let mut i = self.home(fp);
        // Invariant: the table is never full, so the probe meets a free
        // bucket; keys are never removed, so no key lies past a free bucket.
        loop {
            let b = &self.buckets[i];
            if b.at == EMPTY {
                return None;
            }
            if b.low == low && b.high == high {
                return Some(b.at - 1);
            }
            i = (i + 1) & mask;
        }
    }

    /// Stores `at` for `fp`, replacing an earlier time.
    #[inline]
    pub(crate) fn insert(&mut self, fp: Fingerprint, at: u64) {
        let at = encode(at);
        if (self.len + 1) * MAX_LOAD_DEN > self.buckets.len() * MAX_LOAD_NUM {
            self.grow();
        }
        let mask = self.buckets.len() - 1;
        let (low, high) = (fp.low(), fp.high());
        let mut i = self.home(fp);
        loop {
            let b = &mut self.buckets[i];
            if b.at == EMPTY {
                *b = Bucket { low, high, at };
                self.len += 1;
                return;
            }
            if b.low == low && b.high == high {
                b.at = at;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Empties the table, keeping its buckets.
    pub(crate) fn clear(&mut self) {
        if self.len > 0 {
            self.buckets.fill(FREE);
            self.len = 0;
        }
    }

    /// Doubles the buckets (exactly: sizing by entries would round up to
    /// four times) and re-inserts every entry.
    fn grow(&mut self) {
        let buckets = (self.buckets.len() * 2).max(8);
        let mut bigger = FingerprintTable {
            // SAFETY: all-zero bytes are a free `Bucket`.
            buckets: unsafe { crate::hugealloc::ZeroedArray::new(buckets) },
            len: 0,
            shift: 64 - buckets.trailing_zeros(),
        };
        for b in self.buckets.iter().filter(|b| b.at != EMPTY) {
            // Stored times are already encoded: copy the bucket as it is.
            let fp = Fingerprint(u128::from(b.low) | (u128::from(b.high) << 64));
            let mask = bigger.buckets.len() - 1;
            let mut i = bigger.home(fp);
            while bigger.buckets[i].at != EMPTY {
                i = (i + 1) & mask;
            }
            bigger.buckets[i] = *b;
            bigger.len += 1;
        }
        *self = bigger;
    }

    /// Every entry as (fingerprint, time).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Fingerprint, u64)> + '_ {
        self.buckets.iter().filter(|b| b.at != EMPTY).map(|b| {
            (
                Fingerprint(u128::from(b.low) | (u128::from(b.high) << 64)),
                b.at - 1,
            )
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn matches_a_hashmap_through_growth() {
        let mut table = FingerprintTable::new();
        let mut reference = HashMap::new();
        let ns = crate::fingerprint::Namespace::default();
        let mut x = 1u64;
        for i in 0..200_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = (x >> 33) % 50_000;
            let fp = if k % 10 == 0 {
                // A tenth of the keys share their top bits: long probe runs.
                Fingerprint(u128::from(k) | 0xABCD << 112)
            } else {
                ns.fingerprint(&k.to_le_bytes())
            };
            assert_eq!(table.get(fp), reference.get(&fp).copied(), "step {i}");
            table.insert(fp, i);
            reference.insert(fp, i);
        }
        assert_eq!(table.len(), reference.len());
        assert_eq!(table.iter().count(), reference.len());
        for (fp, at) in table.iter() {
            assert_eq!(reference[&fp], at);
        }
    }

    #[test]
    fn growth_doubles_the_buckets() {
        let mut table = FingerprintTable::with_capacity(7);
        let start = table.bytes();
        let ns = crate::fingerprint::Namespace::default();
        let mut i = 0u64;
        while table.bytes() == start {
            table.insert(ns.fingerprint(&i.to_le_bytes()), i);
            i += 1;
        }
        assert_eq!(table.bytes(), 2 * start);
        for j in 0..i {
            assert_eq!(table.get(ns.fingerprint(&j.to_le_bytes())), Some(j));
        }
    }

    #[test]
    fn empty_table_answers_none() {
        let table = FingerprintTable::new();
        assert_eq!(table.get(Fingerprint(7)), None);
        table.prefetch(Fingerprint(7));
    }
}
