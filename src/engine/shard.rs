//! One shard: a filter segment, an exact-tier partition and counters, used by
//! one thread at a time (the shard lock, or a pipeline worker).

use std::time::Duration;

use crate::exact::{ExactPartition, Mark};
use crate::filter::{GrowingBloom, Placement, Probe, WindowedFilter};
use crate::fingerprint::Fingerprint;
use crate::time::{slot_of, Timestamp, GENERATIONS};
use crate::verdict::Verdict;

use super::marks::MarkBatch;
use super::stats::ShardCounters;

/// What every shard of an engine shares: the window and the sizing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShardRules {
    /// The window in nanoseconds; `None`: keys never expire.
    pub(crate) window: Option<u64>,
    /// Keys one slot of one shard was sized for.
    pub(crate) slot_capacity: u64,
}

pub(crate) enum ShardFilter {
    /// A windowed engine: rotating generations, overflow layers on bursts.
    Windowed(WindowedFilter),
    /// No window: growing layers.
    Unbounded(GrowingBloom),
}

pub(crate) struct Shard {
    pub(crate) filter: ShardFilter,
    /// `None` in probabilistic mode.
    pub(crate) exact: Option<Box<dyn ExactPartition>>,
    /// Highest time this shard has seen (its processing clock never goes back).
    pub(crate) time: u64,
    /// Marks not yet written to the exact tier.
    pub(crate) pending: MarkBatch,
    pub(crate) counters: ShardCounters,
}

impl Shard {
    pub(crate) fn new(
        filter: ShardFilter,
        exact: Option<Box<dyn ExactPartition>>,
        mark_batch: usize,
    ) -> Self {
        Shard {
            filter,
            exact,
            time: 0,
            pending: MarkBatch::new(mark_batch),
            counters: ShardCounters::default(),
        }
    }

    /// Writes the pending marks to the exact tier.
    pub(crate) fn flush_marks(&mut self) {
        let Some(exact) = &mut self.exact else {
            return;
        };
        let n = self.pending.len() as u64;
        if n == 0 {
            return;
        }
        match exact.mark_batch(self.pending.marks()) {
            Ok(()) => self.counters.marks_flushed += n,
            Err(_) => self.counters.mark_errors += n,
        }
        self.counters.mark_flushes += 1;
        self.pending.clear();
    }

    /// Flushes the pending marks if the oldest has waited `interval`.
    pub(crate) fn flush_marks_if_due(&mut self, interval: Duration) {
        if self.pending.is_due(interval) {
            self.flush_marks();
        }
    }

    /// The filter probe of `fp`, for prefetching ahead of [`Shard::check`].
    #[inline]
    pub(crate) fn probe(&self, fp: Fingerprint) -> Option<Probe> {
        match &self.filter {
            ShardFilter::Windowed(f) => Some(f.probe(fp)),
            ShardFilter::Unbounded(_) => None,
        }
    }

    /// First prefetch stage: start loading the key's filter block in every
    /// layer.
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint, probe: Probe) {
        if let ShardFilter::Windowed(f) = &self.filter {
            f.prefetch(fp, probe);
        }
    }

    /// Second prefetch stage, once the filter block is (nearly) in cache:
    /// start loading the exact-tier bucket the check will touch — the
    /// newest matching slot for a lookup, the current slot for a mark.
    #[inline]
    pub(crate) fn prefetch_exact(&self, fp: Fingerprint, probe: Option<Probe>) {
        let (Some(exact), ShardFilter::Windowed(f), Some(probe)) =
            (&self.exact, &self.filter, probe)
        else {
            return;
        };
        let cur = f.current();
        let hits = f.hits(fp, probe);
        let slot = (0..GENERATIONS as u64)
            .map(|back| slot_of(cur.wrapping_sub(back)))
            .find(|&slot| hits & (1 << slot) != 0)
            .unwrap_or(slot_of(cur));
        exact.prefetch(fp, slot);
    }

    /// Processing time: the later of the clock reading and the shard's time,
    /// so time never goes backwards inside a shard.
    #[inline]
    pub(crate) fn processing_time(&self, reading: Timestamp) -> Timestamp {
        Timestamp::from_nanos(reading.as_nanos().max(self.time))
    }

    /// Moves the shard's generations to `t`, dropping expired exact entries.
    #[inline]
    pub(crate) fn advance(&mut self, t: Timestamp) {
        self.time = self.time.max(t.as_nanos());
        if let ShardFilter::Windowed(f) = &mut self.filter {
            let cleared = f.advance(Timestamp::from_nanos(self.time));
            if cleared != 0 {
                self.counters.rotations += 1;
                // Pending marks may belong to a slot being cleared: write
                // them first, so the clear below drops them with the rest.
                self.flush_marks();
                if let Some(exact) = &mut self.exact {
                    exact.clear_slots(cleared);
                }
            }
        }
    }

    /// The verdict for `fp` at time `t` (not late; `advance` not required).
    /// `probe` is `self.probe(fp)` when the caller already computed it.
    #[inline]
    pub(crate) fn check(
        &mut self,
        fp: Fingerprint,
        probe: Option<Probe>,
        t: Timestamp,
        rules: &ShardRules,
    ) -> Verdict {
        self.advance(t);
        self.counters.checks += 1;
        let verdict = match &mut self.filter {
            ShardFilter::Windowed(f) => {
                let probe = probe.unwrap_or_else(|| f.probe(fp));
                let cur = f.current();
                let hits = f.hits(fp, probe);
                if hits == 0 {
                    self.accept(fp, Some(probe), t, rules)
                } else {
                    self.counters.maybe_seen += 1;
                    self.confirm(fp, Some(probe), hits, cur, t, rules)
                }
            }
            ShardFilter::Unbounded(g) => {
                if g.contains(fp) {
                    self.counters.maybe_seen += 1;
                    self.confirm(fp, None, 1, 0, t, rules)
                } else {
                    self.accept(fp, None, t, rules)
                }
            }
        };
        match verdict {
            Verdict::New => self.counters.new += 1,
            Verdict::Duplicate { .. } => self.counters.duplicates += 1,
            Verdict::LikelyDuplicate { .. } => self.counters.likely_duplicates += 1,
            Verdict::Unavailable => self.counters.unavailable += 1,
            Verdict::Late { .. } => {}
        }
        verdict
    }

    /// The filter matched slots `hits`: ask the exact tier, newest slot first.
    fn confirm(
        &mut self,
        fp: Fingerprint,
        probe: Option<Probe>,
        hits: u8,
        cur: u64,
        t: Timestamp,
        rules: &ShardRules,
    ) -> Verdict {
        if self.exact.is_none() {
            // Probabilistic mode: trust the filter.
            return self.likely_duplicate(hits, cur);
        }
        // A pending mark is newer than anything in the exact tier.
        if let Some(first_seen) = self.pending.get(fp) {
            return self.judge(fp, probe, first_seen, t, rules);
        }
        let exact = self.exact.as_mut().expect("exact mode");
        // Slots in recency order: the current slice's first, then older ones.
        let order = (0..GENERATIONS as u64).map(|back| slot_of(cur.wrapping_sub(back)));
        for slot in order {
            if hits & (1 << slot) == 0 {
                continue;
            }
            match exact.lookup(fp, slot) {
                Ok(Some(first_seen)) => return self.judge(fp, probe, first_seen, t, rules),
                Ok(None) => {}
                Err(_) => return Verdict::Unavailable,
            }
        }
        self.counters.false_positives += 1;
        self.accept(fp, probe, t, rules)
    }

    /// The newest accepted occurrence of `fp` was at `first_seen`.
    fn judge(
        &mut self,
        fp: Fingerprint,
        probe: Option<Probe>,
        first_seen: Timestamp,
        t: Timestamp,
        rules: &ShardRules,
    ) -> Verdict {
        let inside = match rules.window {
            None => true,
            // t − t0 < W, where an out-of-order repeat (t < t0) counts as
            // inside.
            Some(w) => t.as_nanos() < first_seen.as_nanos().saturating_add(w),
        };
        if inside {
            return Verdict::Duplicate { first_seen };
        }
        // The newest entry is expired; older ones are too.
        self.counters.reaccepted_after_window += 1;
        self.accept(fp, probe, t, rules)
    }

    /// Accepts `fp` at `t`: into the filter's current generation and the
    /// exact tier's matching slot.
    fn accept(
        &mut self,
        fp: Fingerprint,
        probe: Option<Probe>,
        t: Timestamp,
        rules: &ShardRules,
    ) -> Verdict {
        let _ = rules;
        let slot = match &mut self.filter {
            ShardFilter::Windowed(f) => {
                let probe = probe.unwrap_or_else(|| f.probe(fp));
                match f.insert(fp, probe) {
                    Placement::Base => {}
                    Placement::Overflow => self.counters.overflow_inserts += 1,
                    Placement::OverCapacity => self.counters.over_capacity += 1,
                }
                slot_of(f.current())
            }
            ShardFilter::Unbounded(g) => {
                if !g.insert(fp) {
                    self.counters.over_capacity += 1;
                }
                0
            }
        };
        if let Some(exact) = &mut self.exact {
            self.counters.marks_queued += 1;
            if self.pending.is_write_through() {
                match exact.mark(fp, slot, t) {
                    Ok(()) => self.counters.marks_flushed += 1,
                    Err(_) => self.counters.mark_errors += 1,
                }
            } else {
                let mark = Mark {
                    fingerprint: fp,
                    slot,
                    at: t,
                };
                if self.pending.push(mark) {
                    self.flush_marks();
                }
            }
        }
        Verdict::New
    }

    fn likely_duplicate(&self, hits: u8, cur: u64) -> Verdict {
        let since = match &self.filter {
            ShardFilter::Windowed(f) => {
                // The oldest matching live slice bounds when it was accepted.
                let oldest_back = (0..GENERATIONS as u64 - 1)
                    .rev()
                    .find(|&back| hits & (1 << slot_of(cur.wrapping_sub(back))) != 0)
                    .unwrap_or(0);
                f.base.slicing().slice_start(cur.saturating_sub(oldest_back))
            }
            ShardFilter::Unbounded(_) => Timestamp::ZERO,
        };
        Verdict::LikelyDuplicate { since }
    }

    pub(crate) fn filter_bytes(&self) -> usize {
        match &self.filter {
            ShardFilter::Windowed(f) => f.bytes(),
            ShardFilter::Unbounded(g) => g.bytes(),
        }
    }

    pub(crate) fn estimated_fpr(&self) -> f64 {
        match &self.filter {
            ShardFilter::Windowed(f) => f.estimated_fpr(),
            ShardFilter::Unbounded(g) => g.estimated_fpr(),
        }
    }
}
