//! The storage of the filter tier: cache-line blocks of eight 64-bit words,
//! one word per generation slot.
//!
//! A key maps to one block (from the fingerprint's low half, by 64-bit
//! multiply-high, so any block count up to 2⁶⁴ is uniform) and to one probe
//! mask of `k` bits (from the high half). The same mask is tested in every
//! slot of the block, so one query reads one cache line whatever the number of
//! live generations.

use crate::fingerprint::Fingerprint;
use crate::sync::{AtomicU64, Ordering};
use crate::time::GENERATIONS;

use super::sizing::MAX_HASHES;

/// One cache line: one 64-bit word per generation slot.
#[repr(C, align(64))]
pub(crate) struct Block(pub(crate) [AtomicU64; GENERATIONS]);

/// Where a key lives in the filter: its block and its probe mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Probe {
    pub(crate) block: usize,
    pub(crate) mask: u64,
}

/// Blocks of eight generation slots with atomic bit sets.
pub(crate) struct BlockedBloom {
    blocks: Blocks,
    hashes: u32,
}

impl BlockedBloom {
    /// [`BlockedBloom::try_new`] for tests, which abort on failure.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn new(num_blocks: usize, hashes: u32) -> Self {
        Self::try_new(num_blocks, hashes).expect("allocating a test filter")
    }

    /// A zeroed filter of `num_blocks` blocks (at least one) setting `hashes`
    /// bits per key, or `None` when the memory cannot be had (every caller
    /// turns that into an error or a counted fallback, never an abort).
    pub(crate) fn try_new(num_blocks: usize, hashes: u32) -> Option<Self> {
        assert!((1..=MAX_HASHES).contains(&hashes));
        Some(BlockedBloom {
            blocks: try_zeroed_blocks(num_blocks.max(1))?,
            hashes,
        })
    }

    /// Bytes of a filter of `num_blocks` blocks.
    pub(crate) fn bytes_for(num_blocks: usize) -> u64 {
        (num_blocks.max(1) as u64).saturating_mul(std::mem::size_of::<Block>() as u64)
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub(crate) fn hashes(&self) -> u32 {
        self.hashes
    }

    /// Bytes of filter memory.
    pub(crate) fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<Block>()
    }

    /// The block and probe mask of a fingerprint.
    #[inline(always)]
    pub(crate) fn probe(&self, fp: Fingerprint) -> Probe {
        let block = self.block_of(fp);
        let high = fp.high();
        // One unrolled loop per hash count (a jump on `hashes`, then
        // straight-line code): the mask is on every key's path.
        let mask = match self.hashes {
            1 => probe_mask::<1>(high),
            2 => probe_mask::<2>(high),
            3 => probe_mask::<3>(high),
            4 => probe_mask::<4>(high),
            5 => probe_mask::<5>(high),
            6 => probe_mask::<6>(high),
            7 => probe_mask::<7>(high),
            8 => probe_mask::<8>(high),
            9 => probe_mask::<9>(high),
            _ => probe_mask::<{ MAX_HASHES }>(high),
        };
        Probe { block, mask }
    }

    /// [`BlockedBloom::probe`] for a caller that knows the hash count `K`
    /// (it must equal [`BlockedBloom::hashes`]): batch paths dispatch on the
    /// count once per batch instead of once per key.
    #[inline(always)]
    pub(crate) fn probe_k<const K: u32>(&self, fp: Fingerprint) -> Probe {
        debug_assert_eq!(K, self.hashes);
        Probe {
            block: self.block_of(fp),
            mask: probe_mask::<K>(fp.high()),
        }
    }

    /// The probe of `fp` in this filter given its mask (which depends only on
    /// the fingerprint's high half and the hash count): the block only.
    #[inline]
    pub(crate) fn probe_with_mask(&self, fp: Fingerprint, mask: u64) -> Probe {
        Probe {
            block: self.block_of(fp),
            mask,
        }
    }

    #[inline]
    fn block_of(&self, fp: Fingerprint) -> usize {
        // Multiply-high maps the 64-bit low half uniformly onto [0, n) with
        // 64-bit arithmetic: no modulo bias, no collapse past 2³² blocks.
        ((u128::from(fp.low()) * self.blocks.len() as u128) >> 64) as usize
    }

    /// Bit `g` of the result is set when slot `g` holds every probe bit.
    #[inline]
    pub(crate) fn hits(&self, probe: Probe) -> u8 {
        let words = &self.blocks[probe.block].0;
        let mut hits = 0u8;
        for (slot, word) in words.iter().enumerate() {
            let w = word.load(Ordering::SeqCst);
            hits |= u8::from(w & probe.mask == probe.mask) << slot;
        }
        hits
    }

    /// [`BlockedBloom::hits`] with AVX2: the block's eight words in two
    /// 256-bit loads, one masked compare per half. About ten instructions
    /// where the scalar loop takes forty, which matters once the block is
    /// in cache.
    ///
    /// # Safety
    /// The CPU must support AVX2, and `probe` must be one of this filter's
    /// (its block in bounds: it is not tested here).
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn hits_avx2(&self, probe: Probe) -> u8 {
        use std::arch::x86_64::{
            __m256i, _mm256_and_si256, _mm256_castsi256_pd, _mm256_cmpeq_epi64, _mm256_movemask_pd,
            _mm256_set1_epi64x,
        };
        debug_assert!(probe.block < self.blocks.len());
        // SAFETY: the caller passes a probe of this filter, whose block is
        // in bounds (`block_of`).
        let words = unsafe { (*self.blocks.as_ptr().add(probe.block)).0.as_ptr() };
        let (low, high): (__m256i, __m256i);
        // SAFETY: `words` is a 64-byte aligned block of eight `AtomicU64`s,
        // so both 32-byte loads are aligned and in bounds. They are done in
        // assembly, which the compiler treats as opaque: to the memory model
        // this is the same hardware load as `hits`' eight atomic loads (x86
        // reads each aligned 8-byte word of a vector load atomically), not a
        // non-atomic Rust read racing with the inserts' atomic writes.
        unsafe {
            std::arch::asm!(
                "vmovdqa {low}, ymmword ptr [{words}]",
                "vmovdqa {high}, ymmword ptr [{words} + 32]",
                words = in(reg) words,
                low = out(ymm_reg) low,
                high = out(ymm_reg) high,
                options(nostack, preserves_flags, readonly),
            );
        }
        let mask = _mm256_set1_epi64x(probe.mask as i64);
        let low = _mm256_cmpeq_epi64(_mm256_and_si256(low, mask), mask);
        let high = _mm256_cmpeq_epi64(_mm256_and_si256(high, mask), mask);
        let low = _mm256_movemask_pd(_mm256_castsi256_pd(low));
        let high = _mm256_movemask_pd(_mm256_castsi256_pd(high));
        (low | (high << 4)) as u8
    }

    /// [`BlockedBloom::probe_k`] of four keys, the masks built in one AVX2
    /// register (four lanes, one shift, `and`, variable shift and `or` per
    /// probe bit: a quarter of the scalar loop's instructions); the blocks
    /// by scalar multiply-high (AVX2 has no 64-bit one).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn probes4_avx2<const K: u32>(&self, fps: &[Fingerprint; 4]) -> [Probe; 4] {
        use std::arch::x86_64::{
            __m256i, _mm256_and_si256, _mm256_or_si256, _mm256_set1_epi64x, _mm256_set_epi64x,
            _mm256_setzero_si256, _mm256_sllv_epi64, _mm256_srli_epi64, _mm256_storeu_si256,
        };
        debug_assert_eq!(K, self.hashes);
        let mut high = _mm256_set_epi64x(
            fps[3].high() as i64,
            fps[2].high() as i64,
            fps[1].high() as i64,
            fps[0].high() as i64,
        );
        let ones = _mm256_set1_epi64x(1);
        let low6 = _mm256_set1_epi64x(63);
        let mut mask = _mm256_setzero_si256();
        for _ in 0..K {
            mask = _mm256_or_si256(mask, _mm256_sllv_epi64(ones, _mm256_and_si256(high, low6)));
            high = _mm256_srli_epi64::<6>(high);
        }
        let mut m = [0u64; 4];
        // SAFETY: `m` is 32 writable bytes; the store is unaligned.
        unsafe { _mm256_storeu_si256(m.as_mut_ptr().cast::<__m256i>(), mask) };
        let probe = |fp: Fingerprint, mask: u64| Probe {
            block: self.block_of(fp),
            mask,
        };
        [
            probe(fps[0], m[0]),
            probe(fps[1], m[1]),
            probe(fps[2], m[2]),
            probe(fps[3], m[3]),
        ]
    }

    /// True when `slot` holds every probe bit.
    #[inline]
    pub(crate) fn holds(&self, probe: Probe, slot: usize) -> bool {
        let w = self.blocks[probe.block].0[slot].load(Ordering::SeqCst);
        w & probe.mask == probe.mask
    }

    /// Sets the probe bits in `slot`; true when at least one was clear before
    /// (so this call, and no concurrent one, made the key present).
    #[inline]
    pub(crate) fn insert(&self, probe: Probe, slot: usize) -> bool {
        let word = &self.blocks[probe.block].0[slot];
        if word.load(Ordering::Relaxed) & probe.mask == probe.mask {
            return false;
        }
        let before = word.fetch_or(probe.mask, Ordering::SeqCst);
        before & probe.mask != probe.mask
    }

    /// [`BlockedBloom::insert`] for a caller with exclusive access (an
    /// engine shard under its lock): a plain load and store instead of a
    /// locked read-modify-write, so the CPU can overlap the cache misses of
    /// many inserts. Concurrent inserts into the same word would lose bits:
    /// callers guarantee there are none.
    #[inline]
    pub(crate) fn insert_exclusive(&self, probe: Probe, slot: usize) {
        let word = &self.blocks[probe.block].0[slot];
        let w = word.load(Ordering::Relaxed);
        if w & probe.mask != probe.mask {
            word.store(w | probe.mask, Ordering::Relaxed);
        }
    }

    /// Starts loading the block of `probe` into cache.
    #[inline]
    pub(crate) fn prefetch(&self, probe: Probe) {
        #[cfg(target_arch = "x86_64")]
        {
            // No bounds test: a prefetch never faults, and `block_of` keeps
            // the block in bounds anyway.
            let ptr = self.blocks.as_ptr().wrapping_add(probe.block).cast::<i8>();
            // SAFETY: prefetch is a hint; it reads nothing.
            unsafe { std::arch::x86_64::_mm_prefetch(ptr, std::arch::x86_64::_MM_HINT_T0) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = probe;
    }

    /// Clears every word of `slot`. Concurrent queries may see a mix of old
    /// and cleared words; callers make the slot unreachable first.
    pub(crate) fn clear_slot(&self, slot: usize) {
        for block in &*self.blocks {
            block.0[slot].store(0, Ordering::Relaxed);
        }
    }

    /// For every slot, the fraction of its set bits and the false-positive
    /// rate it implies, estimated from up to `samples` evenly spaced blocks
    /// in one pass (one cache line gives all eight slots).
    pub(crate) fn occupancies(&self, samples: usize) -> [SlotOccupancy; GENERATIONS] {
        // A random probe bit is set with probability ones/64: the rate of a
        // word with `ones` bits set, for every possible count.
        let rate: [f64; 65] =
            std::array::from_fn(|ones| (ones as f64 / 64.0).powi(self.hashes as i32));
        let n = self.blocks.len();
        let step = (n / samples.max(1)).max(1);
        let mut set_bits = [0u64; GENERATIONS];
        let mut fpr = [0.0f64; GENERATIONS];
        let mut count = 0u64;
        for block in self.blocks.iter().step_by(step) {
            for (slot, word) in block.0.iter().enumerate() {
                let ones = word.load(Ordering::Relaxed).count_ones();
                set_bits[slot] += u64::from(ones);
                fpr[slot] += rate[ones as usize];
            }
            count += 1;
        }
        std::array::from_fn(|slot| SlotOccupancy {
            fill: set_bits[slot] as f64 / (count * 64) as f64,
            estimated_fpr: fpr[slot] / count as f64,
        })
    }

    /// Calls `f` with every word, block by block, slot by slot.
    pub(crate) fn for_each_word(&self, mut f: impl FnMut(u64)) {
        for block in &*self.blocks {
            for word in &block.0 {
                f(word.load(Ordering::Relaxed));
            }
        }
    }

    /// Overwrites the words in the order [`BlockedBloom::for_each_word`]
    /// produced them. `next` is called `num_blocks · 8` times.
    pub(crate) fn fill_words<E>(&self, mut next: impl FnMut() -> Result<u64, E>) -> Result<(), E> {
        for block in &*self.blocks {
            for word in &block.0 {
                word.store(next()?, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// The probe mask of `K` hashes: bit `(high >> 6i) & 63` for `i < K`.
#[inline(always)]
fn probe_mask<const K: u32>(high: u64) -> u64 {
    let mut mask = 0u64;
    for i in 0..K {
        mask |= 1u64 << ((high >> (6 * i)) & 63);
    }
    mask
}

/// How full one generation slot is.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct SlotOccupancy {
    /// Fraction of its bits that are set.
    pub fill: f64,
    /// The false-positive rate a never-inserted key meets in this slot.
    pub estimated_fpr: f64,
}

#[cfg(not(loom))]
type Blocks = crate::hugealloc::ZeroedArray<Block>;
#[cfg(loom)]
type Blocks = Box<[Block]>;

#[cfg(not(loom))]
fn try_zeroed_blocks(n: usize) -> Option<Blocks> {
    // SAFETY: all-zero bytes are a valid `[AtomicU64; 8]`. Zeroed allocation
    // lets the OS hand out untouched pages lazily for large filters.
    unsafe { crate::hugealloc::ZeroedArray::try_new(n) }
}

#[cfg(loom)]
fn try_zeroed_blocks(n: usize) -> Option<Blocks> {
    Some(
        (0..n)
            .map(|_| Block(std::array::from_fn(|_| AtomicU64::new(0))))
            .collect(),
    )
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::fingerprint::Namespace;

    /// The AVX2 and the scalar `hits` agree on every kind of block: empty,
    /// sparse, full, and words with some of the probe's bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_probes_match_scalar_probes() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: only the scalar path is used, nothing to compare");
            return;
        }
        fn check<const K: u32>() {
            let bloom = BlockedBloom::new(1000, K);
            let mut state = u64::from(K);
            let mut next = || {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z ^ (z >> 31)
            };
            for _ in 0..10_000 {
                let quad: [Fingerprint; 4] = std::array::from_fn(|_| {
                    Fingerprint(u128::from(next()) | (u128::from(next()) << 64))
                });
                // SAFETY: AVX2 was detected above.
                let fast = unsafe { bloom.probes4_avx2::<K>(&quad) };
                assert_eq!(fast, quad.map(|fp| bloom.probe(fp)), "K = {K}");
            }
        }
        check::<1>();
        check::<2>();
        check::<3>();
        check::<4>();
        check::<5>();
        check::<6>();
        check::<7>();
        check::<8>();
        check::<9>();
        check::<10>();
    }

    #[test]
    fn avx2_hits_match_scalar_hits() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: only the scalar path is used, nothing to compare");
            return;
        }
        let bloom = BlockedBloom::new(512, 5);
        let mut state = 0x1234_5678_9ABC_DEF0u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        // Fill slots to different densities: slot g gets 40·g keys.
        for slot in 0..GENERATIONS {
            for _ in 0..40 * slot {
                let fp = Fingerprint(u128::from(next()) | (u128::from(next()) << 64));
                bloom.insert(bloom.probe(fp), slot);
            }
        }
        let mut seen = [0usize; 256];
        for _ in 0..100_000 {
            let fp = Fingerprint(u128::from(next()) | (u128::from(next()) << 64));
            let probe = bloom.probe(fp);
            // SAFETY: AVX2 was detected above; the probe is the filter's.
            let fast = unsafe { bloom.hits_avx2(probe) };
            assert_eq!(fast, bloom.hits(probe), "{probe:?}");
            seen[usize::from(fast)] += 1;
        }
        // Both the all-miss answer and answers with several slots occurred.
        assert!(seen[0] > 0 && seen.iter().skip(2).filter(|&&n| n > 0).count() > 3);
    }

    #[test]
    fn insert_then_hit_in_that_slot_only() {
        let bloom = BlockedBloom::new(64, 6);
        let probe = bloom.probe(Namespace::default().fingerprint(b"k"));
        assert_eq!(bloom.hits(probe), 0);
        assert!(bloom.insert(probe, 3));
        assert!(!bloom.insert(probe, 3));
        assert_eq!(bloom.hits(probe) & (1 << 3), 1 << 3);
        bloom.clear_slot(3);
        assert_eq!(bloom.hits(probe) & (1 << 3), 0);
    }

    #[test]
    fn block_index_is_uniform_past_two_to_the_32() {
        // A filter of 2^34 blocks is not allocated: probe() only needs len().
        let n: u128 = 1 << 34;
        let top = ((u128::from(u64::MAX) * n) >> 64) as u64;
        assert_eq!(top, (1u64 << 34) - 1);
    }
}
