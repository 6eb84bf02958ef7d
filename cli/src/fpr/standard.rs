//! A plain (unblocked) Bloom filter for experiment (a): `m` bits, `k`
//! positions per key anywhere in the array, so the textbook formula
//! `(1 − e^{−k/b})^k` applies. Written for the experiment, not the engine.

use std::sync::atomic::{AtomicU64, Ordering};

use tiered_dedup::Fingerprint;

/// `bits` bits; each key sets `hashes` of them.
pub(crate) struct StandardBloom {
    words: Vec<AtomicU64>,
    bits: u64,
    hashes: u32,
}

impl StandardBloom {
    pub(crate) fn new(bits: u64, hashes: u32) -> Self {
        assert!(bits > 0 && hashes > 0);
        StandardBloom {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            bits,
            hashes,
        }
    }

    /// The `k` bit positions of a key: double hashing `h₁ + i·h₂` (Kirsch and
    /// Mitzenmacher) over the two 64-bit halves of its xxh3-128 fingerprint,
    /// each reduced onto `[0, m)` by a 64-bit multiply-high (uniform for any
    /// `m`, no modulo bias). `h₂` is made odd so that no two probes of a key
    /// coincide because of it.
    fn positions(&self, fp: Fingerprint) -> impl Iterator<Item = u64> + '_ {
        let (h1, h2) = (fp.low(), fp.high() | 1);
        (0..u64::from(self.hashes)).map(move |i| {
            let h = h1.wrapping_add(i.wrapping_mul(h2));
            ((u128::from(h) * u128::from(self.bits)) >> 64) as u64
        })
    }

    /// Sets the key's bits (atomically: inserts may run in parallel).
    pub(crate) fn insert(&self, fp: Fingerprint) {
        for bit in self.positions(fp) {
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    /// True when every bit of the key is set.
    pub(crate) fn contains(&self, fp: Fingerprint) -> bool {
        self.positions(fp).all(|bit| {
            self.words[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiered_dedup::Namespace;

    #[test]
    fn no_false_negatives_and_k_bits_per_key() {
        let bloom = StandardBloom::new(10_000, 7);
        let ns = Namespace::new("standard");
        for i in 0u64..1_000 {
            bloom.insert(ns.fingerprint(&i.to_le_bytes()));
        }
        assert!((0u64..1_000).all(|i| bloom.contains(ns.fingerprint(&i.to_le_bytes()))));
        let one = StandardBloom::new(1 << 20, 7);
        one.insert(ns.fingerprint(b"x"));
        let set: u32 = one
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum();
        assert_eq!(set, 7);
    }
}
