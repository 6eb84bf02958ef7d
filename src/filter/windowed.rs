//! `WindowedFilter`: an engine shard's windowed filter — a
//! [`GenerationalBloom`] that grows under bursts instead of losing its rate.
//!
//! Each generation slot of the base filter is sized for the keys one slice
//! is expected to receive. A slot takes up to a quarter more than that (an
//! uneven stream; the rate rises a little, counted in `overflow_inserts`
//! only past it). When a burst brings more (a whole window's keys in one
//! slice: a file replayed, a backlog drained), further inserts for that
//! slice go to *overflow layers*: blocked filters of the same eight-slot
//! layout, into the same slot. The first is an eighth of the base: the
//! usual overshoot is small (an uneven stream, a slice a few percent past
//! its slack: on the engine bench, 0.7% of the keys), and a layer the size
//! of the base cost 36 of the filter's 73 MB there and a sixth of the
//! time, most of it the kernel zeroing its pages. Each further layer is
//! eight times the previous (the second is the base's size: a slice with
//! 2.4× its keys costs 1.125 bases; a whole window's keys in one slice
//! need three layers). A query
//! also reads one cache line per live layer. Rotation clears a slot in every
//! layer; a layer whose slots are all empty is freed. So the rate stays at
//! target, nothing is ever dropped early, and memory follows the keys that
//! are really inside the window. Used only under the shard lock.

use crate::fingerprint::Fingerprint;
use crate::time::{live_slots, slot_of, Timestamp, GENERATIONS};

use super::blocks::{BlockedBloom, Probe};
use super::generational::GenerationalBloom;

/// Most overflow layers (the last takes 8¹⁰× the base's capacity).
const MAX_LAYERS: usize = 12;
/// Each overflow layer after the first is this many times the previous one
/// (the first is this many times smaller than the base).
const GROWTH: u64 = 8;

pub(crate) struct OverflowLayer {
    pub(crate) bloom: BlockedBloom,
    /// Keys each slot of this layer is sized for.
    pub(crate) capacity: u64,
    /// Keys inserted into each slot since it was cleared.
    pub(crate) inserts: [u64; GENERATIONS],
    /// Slots holding keys (`inserts[s] > 0`): a query tests only these
    /// words of the layer's block (usually one: the slot of the burst).
    occupied: u8,
}

impl OverflowLayer {
    pub(crate) fn new(bloom: BlockedBloom, capacity: u64, inserts: [u64; GENERATIONS]) -> Self {
        let occupied = (0..GENERATIONS)
            .filter(|&s| inserts[s] > 0)
            .fold(0u8, |m, s| m | 1 << s);
        OverflowLayer {
            bloom,
            capacity,
            inserts,
            occupied,
        }
    }

    /// Occupied slots among `slots` holding every probe bit of `fp`.
    #[inline(always)]
    fn hits(&self, fp: Fingerprint, mask: u64, slots: u8) -> u8 {
        let mut todo = self.occupied & slots;
        if todo == 0 {
            return 0;
        }
        let probe = self.bloom.probe_with_mask(fp, mask);
        let mut hits = 0;
        while todo != 0 {
            let slot = todo.trailing_zeros() as usize;
            todo &= todo - 1;
            hits |= u8::from(self.bloom.holds(probe, slot)) << slot;
        }
        hits
    }
}

pub(crate) struct WindowedFilter {
    pub(crate) base: GenerationalBloom,
    /// Keys each base slot is sized for.
    pub(crate) capacity: u64,
    /// Keys inserted into each base slot since it was cleared.
    pub(crate) inserts: [u64; GENERATIONS],
    pub(crate) overflow: Vec<OverflowLayer>,
    /// The base's current slice (0 before the first), copied after every
    /// advance: read several times per key, and the base keeps it in an
    /// atomic for its concurrent users.
    current: u64,
}

/// Where an insert went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Into the base filter, within its sizing.
    Base,
    /// Into an overflow layer (the base slot was full).
    Overflow,
    /// Every layer is full and no more may be added (or allocated): into
    /// the base slot beyond its sizing (the rate rises; counted).
    OverCapacity,
}

impl WindowedFilter {
    pub(crate) fn new(base: GenerationalBloom, capacity: u64) -> Self {
        WindowedFilter {
            current: base.current_or_zero(),
            base,
            capacity: capacity.max(1),
            inserts: [0; GENERATIONS],
            overflow: Vec::new(),
        }
    }

    /// Moves to the slice of `t`; returns the slots cleared (in every layer).
    #[inline]
    pub(crate) fn advance(&mut self, t: Timestamp) -> u8 {
        let cleared = self.base.advance(t);
        self.current = self.base.current_or_zero();
        if cleared == 0 {
            return 0;
        }
        self.clear_layers(cleared)
    }

    #[cold]
    fn clear_layers(&mut self, cleared: u8) -> u8 {
        for slot in (0..GENERATIONS).filter(|s| cleared & (1 << s) != 0) {
            self.inserts[slot] = 0;
            for layer in &mut self.overflow {
                if layer.inserts[slot] > 0 {
                    layer.bloom.clear_slot(slot);
                    layer.inserts[slot] = 0;
                    layer.occupied &= !(1 << slot);
                }
            }
        }
        // Free the layers that hold nothing any more (the newest ones last:
        // keep the order, so capacities stay increasing).
        while self
            .overflow
            .last()
            .is_some_and(|l| l.inserts.iter().all(|&n| n == 0))
        {
            self.overflow.pop();
        }
        cleared
    }

    #[inline]
    pub(crate) fn probe(&self, fp: Fingerprint) -> Probe {
        self.base.bloom().probe(fp)
    }

    /// Starts loading the blocks of `fp` in the base and every overflow layer.
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint, probe: Probe) {
        self.base.bloom().prefetch(probe);
        for layer in &self.overflow {
            layer
                .bloom
                .prefetch(layer.bloom.probe_with_mask(fp, probe.mask));
        }
    }

    #[inline]
    pub(crate) fn current(&self) -> u64 {
        self.current
    }

    /// Sets the base's current slice (a snapshot being restored).
    pub(crate) fn restore_current(&mut self, current: Option<u64>) {
        self.base.restore_current(current);
        self.current = self.base.current_or_zero();
    }

    /// Live slots holding every probe bit of `fp`, over all layers.
    #[inline(always)]
    pub(crate) fn hits(&self, fp: Fingerprint, probe: Probe) -> u8 {
        let live = live_slots(self.current());
        let mut hits = self.base.bloom().hits(probe);
        for layer in &self.overflow {
            hits |= layer.hits(fp, probe.mask, live);
        }
        hits & live
    }

    /// The current slot's bit when it holds every probe bit of `fp` in some
    /// layer (the only slot inserts change between rotations).
    #[inline]
    pub(crate) fn current_slot_hit(&self, fp: Fingerprint, probe: Probe) -> u8 {
        let slot = slot_of(self.current());
        let mut hit = u8::from(self.base.bloom().holds(probe, slot)) << slot;
        for layer in &self.overflow {
            hit |= layer.hits(fp, probe.mask, 1 << slot);
        }
        hit
    }

    /// Inserts `fp` into the current slot of the first layer with room.
    pub(crate) fn insert(&mut self, fp: Fingerprint, probe: Probe) -> Placement {
        let slot = slot_of(self.current());
        // A quarter of slack before growing: a layer costs every query a
        // cache line, a little overfill only a little rate.
        if self.inserts[slot] < self.capacity + self.capacity / 4 {
            self.inserts[slot] += 1;
            self.base.bloom().insert_exclusive(probe, slot);
            return Placement::Base;
        }
        if let Some(layer) = self
            .overflow
            .iter_mut()
            .find(|l| l.inserts[slot] < l.capacity)
        {
            layer.inserts[slot] += 1;
            layer.occupied |= 1 << slot;
            layer
                .bloom
                .insert_exclusive(layer.bloom.probe_with_mask(fp, probe.mask), slot);
            return Placement::Overflow;
        }
        if self.overflow.len() < MAX_LAYERS {
            let (capacity, blocks) = match self.overflow.last() {
                None => (
                    (self.capacity / GROWTH).max(1),
                    (self.base.bloom().num_blocks() / GROWTH as usize).max(1),
                ),
                Some(l) => (
                    l.capacity.saturating_mul(GROWTH),
                    l.bloom.num_blocks().saturating_mul(GROWTH as usize),
                ),
            };
            // A layer the memory cannot be had for is a full filter (the
            // key goes over capacity below, counted), not an abort.
            if let Some(bloom) = BlockedBloom::try_new(blocks, self.base.bloom().hashes()) {
                let mut inserts = [0; GENERATIONS];
                inserts[slot] = 1;
                bloom.insert_exclusive(bloom.probe_with_mask(fp, probe.mask), slot);
                self.overflow
                    .push(OverflowLayer::new(bloom, capacity, inserts));
                return Placement::Overflow;
            }
        }
        self.inserts[slot] += 1;
        self.base.bloom().insert_exclusive(probe, slot);
        Placement::OverCapacity
    }

    pub(crate) fn bytes(&self) -> usize {
        self.base.bytes() + self.overflow.iter().map(|l| l.bloom.bytes()).sum::<usize>()
    }

    /// The estimated rate of a query now (a never-inserted key matching a
    /// live slot of any layer) and the fill of each live base generation,
    /// newest first, from one sampling pass over the base.
    pub(crate) fn estimated_fpr_and_fill(&self) -> (f64, [f64; GENERATIONS - 1]) {
        let cur = self.current();
        let live = live_slots(cur);
        let occupancy = self.base.occupancy();
        let fill =
            std::array::from_fn(|back| occupancy[slot_of(cur.wrapping_sub(back as u64))].fill);
        let mut miss = 1.0 - self.base.estimated_fpr_of(&occupancy);
        for layer in &self.overflow {
            let occupancy = layer.bloom.occupancies(4096);
            for slot in (0..GENERATIONS).filter(|s| live & (1 << s) != 0 && layer.inserts[*s] > 0) {
                miss *= 1.0 - occupancy[slot].estimated_fpr;
            }
        }
        (1.0 - miss, fill)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::fingerprint::Namespace;
    use std::time::Duration;

    #[test]
    fn the_cached_current_slice_follows_advance_and_restore() {
        let base = GenerationalBloom::new(Duration::from_secs(60), 6_000, 0.01).unwrap();
        let mut f = WindowedFilter::new(base, 1_000);
        f.advance(Timestamp::from_secs(1_000));
        assert_eq!(f.current(), f.base.current_or_zero());
        assert_ne!(f.current(), 0);
        f.restore_current(Some(7));
        assert_eq!(f.current(), 7);
        f.restore_current(None);
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn a_burst_grows_layers_keeps_the_rate_and_frees_them_later() {
        let base = GenerationalBloom::new(Duration::from_secs(60), 6_000, 0.01).unwrap();
        let mut f = WindowedFilter::new(base, 1_000);
        let ns = Namespace::default();
        let t = Timestamp::from_secs(1_000);
        f.advance(t);
        // Ten times the slice's capacity in one slice.
        for i in 0u64..10_000 {
            let fp = ns.fingerprint(&i.to_le_bytes());
            assert_ne!(f.insert(fp, f.probe(fp)), Placement::OverCapacity);
        }
        assert_eq!(f.overflow.len(), 3, "1250 + 125 + 1000 + 8000 ≥ 10000");
        for i in 0u64..10_000 {
            let fp = ns.fingerprint(&i.to_le_bytes());
            assert_ne!(f.hits(fp, f.probe(fp)), 0, "lost key {i}");
        }
        let fps = (10_000u64..110_000)
            .filter(|i| {
                let fp = ns.fingerprint(&i.to_le_bytes());
                f.hits(fp, f.probe(fp)) != 0
            })
            .count();
        assert!(
            fps < 2_000,
            "{fps} false positives in 100000 after a 10x burst"
        );
        // Seven slices later the burst's slot is cleared and the layers freed.
        f.advance(t.saturating_add(Duration::from_secs(70)));
        assert!(f.overflow.is_empty());
    }
}
