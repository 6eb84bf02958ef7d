//! One shard: a filter segment, an exact-tier partition and counters, used by
//! one thread at a time (the shard lock, or a pipeline worker).

use std::time::Duration;

use crate::error::ExactTierError;
use crate::exact::table::Within;
use crate::exact::{Claim, Lookup, Mark, MemoryPartition, Partition, Seen};
use crate::filter::{GrowingBloom, Placement, Probe, WindowedFilter};
use crate::fingerprint::Fingerprint;
use crate::time::{newest_slot, slot_of, Timestamp, GENERATIONS};
use crate::verdict::Verdict;

use super::leases::{first_token, LeaseBook, LeaseClock};
use super::marks::MarkBatch;
use super::stats::ShardCounters;

/// How far ahead of the key being judged [`Shard::check_batched`] starts
/// loading its filter block and pending-mark bucket.
const BATCHED_PREFETCH_AHEAD: usize = 16;

/// What every shard of an engine shares: the window and the sizing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShardRules {
    /// The window in nanoseconds; `None`: keys never expire.
    pub(crate) window: Option<u64>,
    /// Keys one slot of one shard was sized for.
    pub(crate) slot_capacity: u64,
    /// Whether a cold filter in front of a persistent tier becomes trusted
    /// once a span of the shard's own time has passed. True on processing
    /// time, where the tier holds nothing newer than the process's start.
    /// False on event time: a replay may meet records a previous run
    /// accepted at times after the replay's start, so a fresh filter is
    /// never trusted (every "definitely new" is confirmed in the tier)
    /// unless a snapshot made it warm.
    pub(crate) warm_up: bool,
}

pub(crate) enum ShardFilter {
    /// A windowed engine: rotating generations, overflow layers on bursts.
    Windowed(WindowedFilter),
    /// No window: growing layers.
    Unbounded(GrowingBloom),
    /// No window and the embedded memory tier: no filter at all. Every key
    /// costs one probe of the exact table anyway (its mark or its
    /// confirmation), and without slices there is no choice of table for a
    /// filter to narrow, so the table alone answers: check and mark in one
    /// probe ([`crate::exact::MemoryPartition::first_seen_or_mark`]).
    Direct,
}

pub(crate) struct Shard {
    pub(crate) filter: ShardFilter,
    /// `None` in probabilistic mode.
    pub(crate) exact: Option<Partition>,
    /// Highest time this shard has seen (its processing clock never goes back).
    pub(crate) time: u64,
    /// The time the last [`Shard::advance`] moved the generations to;
    /// `None` until the first, and after a restore replaced them.
    pub(crate) advanced_to: Option<u64>,
    /// Marks not yet written to the exact tier.
    pub(crate) pending: MarkBatch,
    /// When marks were last handed to a tier that may acknowledge them
    /// later (Redis), until it has: see [`Shard::flush_marks_if_due`].
    unsettled_since: Option<std::time::Instant>,
    /// Whether the filter knows everything the exact tier holds.
    pub(crate) warmth: Warmth,
    pub(crate) counters: ShardCounters,
    /// Live leases of claimed keys (owned keys and local tiers).
    pub(crate) leases: LeaseBook,
    /// The next fencing token this shard issues (strictly increasing).
    pub(crate) next_token: u64,
    pub(crate) lease_clock: LeaseClock,
    /// The empty result a completed key without a body replays (shared, so
    /// such answers allocate nothing).
    pub(crate) empty_result: std::sync::Arc<[u8]>,
    /// Claims sleeping in [`crate::Deduper::claim_wait`] for this shard.
    pub(crate) waiters: u32,
    /// Shared keys on a remote store: releases of dropped leases
    /// `(fingerprint, token, lease-clock time)`, sent with the next batch.
    pub(crate) queued_releases: Vec<(Fingerprint, u64, u64)>,
    /// A durable engine: the changes made under the lock since the last
    /// record was sealed (see [`crate::durability`]).
    pub(crate) log: Option<crate::durability::ShardLog>,
}

/// The filter's answer for a key, read ahead of its check by
/// [`Shard::stage`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Staged {
    /// Live slots holding every probe bit.
    hits: u8,
    /// The current slice when they were read.
    slice: u64,
}

/// Does the filter know every key the exact tier holds?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Warmth {
    /// Yes: a local tier, or a restored snapshot, or a window has passed.
    Warm,
    /// A persistent tier and a fresh filter; warm once the shard's time
    /// reaches the given nanosecond (its first time plus the span).
    ColdUntil(u64),
    /// A persistent tier and no time seen yet.
    ColdFresh,
}

/// Who writes marks, and so how long a remote exact tier may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upkeep {
    /// A check (a full batch, a rotation it caused): up to the tier's
    /// request timeout.
    Check,
    /// The engine's idle upkeep (`maintain`, a pipeline worker between
    /// batches): only briefly, since no check is waiting for it.
    Idle,
}

/// How the engine may trust its filter (see [`crate::Affinity`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trust {
    /// Owned keys: "definitely new" is final once the filter is warm.
    Owned,
    /// Shared keys: every key is claimed atomically in the exact tier.
    Shared,
}

impl Shard {
    /// Faults the memory tier's table in now (see
    /// [`crate::DeduperBuilder::prefault_tables`]); other tiers hold
    /// nothing to fault in.
    pub(crate) fn prefault_tables(&mut self) {
        if let Some(Partition::Memory(m)) = &mut self.exact {
            m.prefault();
        }
    }

    pub(crate) fn new(
        filter: ShardFilter,
        exact: Option<Partition>,
        mark_batch: usize,
        lease_clock: LeaseClock,
    ) -> Self {
        let warmth = if exact.as_ref().is_some_and(|e| e.persistent()) {
            Warmth::ColdFresh
        } else {
            Warmth::Warm
        };
        Shard {
            filter,
            exact,
            time: 0,
            advanced_to: None,
            pending: MarkBatch::new(mark_batch),
            unsettled_since: None,
            warmth,
            counters: ShardCounters::default(),
            leases: LeaseBook::default(),
            next_token: first_token(),
            lease_clock,
            empty_result: std::sync::Arc::from(&[][..]),
            waiters: 0,
            queued_releases: Vec::new(),
            log: None,
        }
    }

    /// Writes the pending marks to the exact tier; with none pending, lets
    /// the tier retry the marks it kept after a failure.
    pub(crate) fn flush_marks(&mut self) {
        self.write_marks(Upkeep::Check);
    }

    /// [`Shard::flush_marks`], waiting on a remote tier as `upkeep` allows.
    fn write_marks(&mut self, upkeep: Upkeep) {
        let Some(exact) = &mut self.exact else {
            return;
        };
        let n = self.pending.len() as u64;
        if n == 0 {
            // A retry, without waiting long (a forced flush waits next).
            // Still failing: the tier keeps (and counts) them.
            let _ = exact.flush_idle();
            return;
        }
        let started = std::time::Instant::now();
        let result = match upkeep {
            Upkeep::Check => exact.mark_batch(self.pending.marks()),
            Upkeep::Idle => exact.mark_batch_idle(self.pending.marks()),
        };
        if exact.prefers_batches() {
            self.counters
                .exact_call(started.elapsed().as_nanos() as u64);
            self.unsettled_since = Some(started);
        }
        match result {
            Ok(()) => self.counters.marks_flushed += n,
            Err(_) => self.counters.mark_errors += n,
        }
        self.counters.mark_flushes += 1;
        self.pending.clear();
    }

    /// Writes the pending marks and waits until the tier has them all (a
    /// remote tier may acknowledge a flush later, with the next one).
    ///
    /// # Errors
    /// The tier's error when some marks are still not stored (it keeps
    /// them for a retry: [`crate::exact::ExactPartition::unwritten`]).
    pub(crate) fn sync_marks(&mut self) -> Result<(), ExactTierError> {
        self.flush_marks();
        self.settle_marks()
    }

    /// Waits until the tier has every mark written so far (and retries the
    /// ones it kept after a failure); on success nothing is unsettled.
    fn settle_marks(&mut self) -> Result<(), ExactTierError> {
        let Some(exact) = &mut self.exact else {
            return Ok(());
        };
        // A failure leaves them kept (and counted) by the tier.
        exact.flush()?;
        self.unsettled_since = None;
        Ok(())
    }

    /// Marks accepted but not stored by the exact tier: (queued or kept
    /// for a retry, dropped by the tier).
    pub(crate) fn unwritten_marks(&self) -> (u64, u64) {
        let (kept, dropped) = self
            .exact
            .as_ref()
            .map_or((0, 0), |e| (e.unwritten(), e.dropped()));
        (self.pending.len() as u64 + kept, dropped)
    }

    /// Flushes the pending marks if the oldest has waited `interval`; with
    /// none pending, settles the marks written (and retries the kept ones)
    /// once the last write is `interval` old, so an idle engine's last
    /// batch is acknowledged and counted.
    ///
    /// This is idle upkeep: a remote tier waits only briefly
    /// ([`crate::exact::ExactPartition::mark_batch_idle`]), so checks on
    /// this shard are not held up behind a slow store.
    pub(crate) fn flush_marks_if_due(&mut self, interval: Duration) {
        if self.pending.is_due(interval) {
            self.write_marks(Upkeep::Idle);
        } else if self.pending.len() == 0
            && self
                .unsettled_since
                .is_some_and(|t| t.elapsed() >= interval)
        {
            self.unsettled_since = Some(std::time::Instant::now());
            if let Some(exact) = &mut self.exact {
                // A failure leaves them kept (and counted) by the tier; a
                // forced flush reports it.
                if exact.flush_idle().is_ok() {
                    self.unsettled_since = None;
                }
            }
        }
    }

    /// The filter probe of `fp`, for prefetching ahead of [`Shard::check`].
    #[inline]
    pub(crate) fn probe(&self, fp: Fingerprint) -> Option<Probe> {
        match &self.filter {
            ShardFilter::Windowed(f) => Some(f.probe(fp)),
            ShardFilter::Unbounded(_) | ShardFilter::Direct => None,
        }
    }

    /// First prefetch stage: start loading the key's filter block in every
    /// layer (without a filter, its exact-tier bucket).
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint, probe: Option<Probe>) {
        match (&self.filter, probe) {
            (ShardFilter::Windowed(f), Some(probe)) => f.prefetch(fp, probe),
            (ShardFilter::Unbounded(g), _) => g.prefetch(fp),
            (ShardFilter::Direct, _) => self.prefetch_exact_unbounded(fp),
            (ShardFilter::Windowed(_), None) => {}
        }
    }

    /// Without a window every entry lives in slot 0: starts loading the
    /// exact-tier bucket a check of `fp` touches.
    #[inline]
    pub(crate) fn prefetch_exact_unbounded(&self, fp: Fingerprint) {
        if let Some(exact) = &self.exact {
            exact.prefetch(fp, 0);
        }
    }

    /// Stage one of the grouped path ([`crate::Deduper`]'s `check_group`):
    /// the probe of `fp`, its filter blocks prefetched. Windowed filters
    /// only.
    #[inline(always)]
    pub(crate) fn load_probe(&self, fp: Fingerprint) -> Probe {
        let ShardFilter::Windowed(f) = &self.filter else {
            unreachable!("staged checks are for windowed filters");
        };
        let probe = f.probe(fp);
        f.prefetch(fp, probe);
        probe
    }

    /// Stage two of the grouped path ([`crate::Deduper`]'s `check_group`),
    /// once the key's filter block is (nearly) in cache: the filter's answer
    /// for `fp` now and a prefetch of the exact-tier bucket the check will
    /// touch (the newest matching slot for a lookup, the current slot for a
    /// mark). Windowed filters only.
    #[inline(always)]
    pub(crate) fn stage(&self, fp: Fingerprint, probe: Probe) -> Staged {
        let ShardFilter::Windowed(f) = &self.filter else {
            unreachable!("staged checks are for windowed filters");
        };
        let slice = f.current();
        let hits = f.hits(fp, probe);
        if let Some(exact) = &self.exact {
            let slot = newest_slot(hits, slice).unwrap_or(slot_of(slice));
            exact.prefetch(fp, slot);
        }
        Staged { hits, slice }
    }

    /// [`Shard::check`] with the filter's answer staged a few keys earlier
    /// by [`Shard::stage`]. Between the two, keys accepted in between may
    /// have set bits in the current slot (re-read here: one word per
    /// layer), and a rotation may have cleared slots (then everything is
    /// re-read). Bits are never cleared otherwise, so the staged answer plus
    /// the current slot's is the answer now.
    #[inline]
    pub(crate) fn check_staged(
        &mut self,
        fp: Fingerprint,
        probe: Probe,
        staged: Staged,
        t: Timestamp,
        rules: &ShardRules,
    ) -> Verdict {
        self.advance(t);
        self.counters.checks += 1;
        if let Some(held) = self.held_verdict(fp) {
            self.count(held);
            return held;
        }
        let ShardFilter::Windowed(f) = &self.filter else {
            unreachable!("staged checks are for windowed filters");
        };
        let cur = f.current();
        let hits = if cur == staged.slice {
            staged.hits | f.current_slot_hit(fp, probe)
        } else {
            f.hits(fp, probe)
        };
        self.decide(fp, Some(probe), hits, cur, t, rules)
    }

    /// The verdict once the filter answered: `hits` are the live slots
    /// holding every probe bit (slot 0 without a window), `cur` the
    /// current slice. Counted.
    #[inline]
    fn decide(
        &mut self,
        fp: Fingerprint,
        probe: Option<Probe>,
        hits: u8,
        cur: u64,
        t: Timestamp,
        rules: &ShardRules,
    ) -> Verdict {
        let verdict = if hits == 0 {
            self.accept(fp, probe, t, rules)
        } else {
            self.counters.maybe_seen += 1;
            self.confirm(fp, probe, hits, cur, t, rules)
        };
        self.count(verdict);
        verdict
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
        self.advance_with(t, Upkeep::Check);
    }

    /// [`Shard::advance`] from the engine's idle upkeep: marks written
    /// before a rotation wait on a remote tier only briefly.
    pub(crate) fn advance_idle(&mut self, t: Timestamp) {
        self.advance_with(t, Upkeep::Idle);
    }

    #[inline]
    fn advance_with(&mut self, t: Timestamp, upkeep: Upkeep) {
        // Time that does not move past the last advance changes nothing
        // below (every step is a function of `self.time`): a batch's keys
        // share one time, so most calls stop here (about 50 instructions
        // per claim and per commit, measured).
        if self.advanced_to.is_some_and(|done| t.as_nanos() <= done) {
            return;
        }
        self.time = self.time.max(t.as_nanos());
        self.advanced_to = Some(self.time);
        if let ShardFilter::Direct = self.filter {
            // One table for the window: count the slices time passes
            // through, and let a sweep of expired entries become due.
            let mut rotated = false;
            if let Some(Partition::Memory(table)) = &mut self.exact {
                if table.pass_time(self.time) {
                    self.counters.rotations += 1;
                    rotated = true;
                    crate::trace::event!(
                        debug,
                        time_nanos = self.time,
                        sweep_due = table.wants_sweep(),
                        "shard rotated"
                    );
                }
            }
            if rotated {
                self.drop_expired_leases();
            }
            return;
        }
        if let ShardFilter::Windowed(f) = &mut self.filter {
            let cleared = f.advance(Timestamp::from_nanos(self.time));
            if cleared != 0 {
                self.counters.rotations += 1;
                crate::trace::event!(
                    debug,
                    slice = f.current(),
                    cleared_slots = cleared,
                    overflow_layers = f.overflow.len(),
                    "shard rotated"
                );
                self.drop_expired_leases();
                // Pending marks may belong to a slot being cleared: write
                // them first, so the clear below drops them with the rest.
                self.write_marks(upkeep);
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
        if let Some(held) = self.held_verdict(fp) {
            self.count(held);
            return held;
        }
        let (probe, hits, cur) = match &self.filter {
            ShardFilter::Windowed(f) => {
                let probe = probe.unwrap_or_else(|| f.probe(fp));
                (Some(probe), f.hits(fp, probe), f.current())
            }
            ShardFilter::Unbounded(g) => (None, u8::from(g.contains(fp)), 0),
            ShardFilter::Direct => return self.check_direct(fp, t, rules),
        };
        self.decide(fp, probe, hits, cur, t, rules)
    }

    /// [`Shard::check`] without a filter: one probe of the memory tier's
    /// table finds the key or records it.
    #[inline(always)]
    fn check_direct(&mut self, fp: Fingerprint, t: Timestamp, rules: &ShardRules) -> Verdict {
        if rules.window.is_some() {
            // A table at its expected size holds 7/6 of a window's keys at
            // 80% load: about 8.75 buckets per key a slice brings. 16 per
            // key checked finishes a sweep in about half a slice at the
            // expected rate, before the next may start.
            self.sweep_expired(16);
        }
        let Some(Partition::Memory(table)) = &mut self.exact else {
            unreachable!("a shard without a filter has the memory tier");
        };
        let (verdict, reaccepted) = probe_direct(table, fp, t, rules.window.is_some());
        if reaccepted {
            self.counters.reaccepted_after_window += 1;
        }
        if verdict == Verdict::New {
            self.counters.marks_queued += 1;
            self.counters.marks_flushed += 1;
            if let Some(log) = &mut self.log {
                log.accept(fp, t.as_nanos());
            }
        }
        self.count(verdict);
        verdict
    }

    /// [`Shard::check`] of the keys `group` (indices into `fps`, in input
    /// order) on a shard without a filter and without live leases: the
    /// same verdicts, counters and log records as one `check` per key, in
    /// one loop that reads the table's buckets `ahead` keys early and
    /// moves the shard's time only when a key's time differs from the
    /// previous key's (a batch at one clock reading moves it once).
    /// `time(shard, i)` is key `i`'s time, `None` to leave `out[i]`.
    ///
    /// Checks never create leases, so a shard with none at the start has
    /// none throughout (`held_verdict` would answer `None` for every key).
    pub(crate) fn check_direct_group(
        &mut self,
        fps: &[Fingerprint],
        group: &[u32],
        time: &impl Fn(&Shard, usize) -> Option<Timestamp>,
        rules: &ShardRules,
        ahead: usize,
        out: &mut [Verdict],
    ) {
        debug_assert!(matches!(self.filter, ShardFilter::Direct));
        debug_assert!(self.leases.is_empty());
        if rules.window.is_some() {
            self.check_direct_group_as::<true>(fps, group, time, ahead, out);
        } else {
            self.check_direct_group_as::<false>(fps, group, time, ahead, out);
        }
    }

    #[inline(always)]
    fn check_direct_group_as<const WINDOW: bool>(
        &mut self,
        fps: &[Fingerprint],
        group: &[u32],
        time: &impl Fn(&Shard, usize) -> Option<Timestamp>,
        ahead: usize,
        out: &mut [Verdict],
    ) {
        let fp_at = |j: usize| fps[group[j] as usize];
        let n = group.len();
        for j in 0..n.min(ahead) {
            self.prefetch_exact_unbounded(fp_at(j));
        }
        let (mut checked, mut new, mut duplicates, mut reaccepted) = (0u64, 0u64, 0u64, 0u64);
        // The time the shard was last moved to by this loop, and whether a
        // sweep of expired entries is running or due since.
        let mut moved_to = None;
        let mut sweeping = false;
        for (j, &i) in group.iter().enumerate() {
            if j + ahead < n {
                self.prefetch_exact_unbounded(fp_at(j + ahead));
            }
            let i = i as usize;
            let Some(t) = time(self, i) else { continue };
            if moved_to != Some(t) {
                self.advance(t);
                moved_to = Some(t);
                sweeping = WINDOW && self.wants_sweep();
            }
            if WINDOW && sweeping {
                // As `check_direct`: 16 buckets of a running sweep per key.
                self.sweep_expired(16);
                sweeping = self.wants_sweep();
            }
            let fp = fps[i];
            let Some(Partition::Memory(table)) = &mut self.exact else {
                unreachable!("a shard without a filter has the memory tier");
            };
            checked += 1;
            let (verdict, again) = probe_direct(table, fp, t, WINDOW);
            reaccepted += u64::from(again);
            if verdict == Verdict::New {
                new += 1;
                if let Some(log) = &mut self.log {
                    log.accept(fp, t.as_nanos());
                }
            } else {
                duplicates += 1;
            }
            out[i] = verdict;
        }
        let c = &mut self.counters;
        c.checks += checked;
        c.new += new;
        c.duplicates += duplicates;
        c.marks_queued += new;
        c.marks_flushed += new;
        c.reaccepted_after_window += reaccepted;
    }

    /// True while the memory tier's one table has a sweep running or due.
    #[inline]
    fn wants_sweep(&self) -> bool {
        matches!(&self.exact, Some(Partition::Memory(table)) if table.wants_sweep())
    }

    /// Without a filter but with a window: advances a due or running sweep
    /// of the memory tier's expired entries by up to `buckets`.
    pub(crate) fn sweep_expired(&mut self, buckets: usize) {
        if let Some(Partition::Memory(table)) = &mut self.exact {
            if table.wants_sweep() {
                table.sweep_step(self.time, buckets);
            }
        }
    }

    /// True when this shard must use [`Shard::check_batched`]: a remote
    /// exact tier, a cold filter, or shared keys.
    #[inline]
    pub(crate) fn wants_batches(&self, trust: Trust) -> bool {
        trust == Trust::Shared
            || self.warmth != Warmth::Warm
            || self.exact.as_ref().is_some_and(|e| e.prefers_batches())
    }

    pub(crate) fn update_warmth(&mut self, span: u64, warm_up: bool) {
        match self.warmth {
            Warmth::Warm => {}
            Warmth::ColdFresh if !warm_up => {}
            Warmth::ColdFresh => {
                self.warmth = Warmth::ColdUntil(self.time.saturating_add(span));
            }
            Warmth::ColdUntil(until) => {
                if self.time >= until {
                    self.warmth = Warmth::Warm;
                }
            }
        }
    }

    /// Verdicts for `items` (`(position, fingerprint, probe, time)`, in
    /// input order, none late) with the exact tier asked once per run:
    ///
    /// 1. In order, the filter decides what it can: a key it has never seen
    ///    (and the filter is warm, the keys owned) is accepted at once; a key
    ///    with a queued mark is judged from it; any other key waits. (A later
    ///    copy of a waiting key waits too: it meets the same filter bits, or
    ///    the same cold filter, since a run never spans a rotation.)
    /// 2. One [`ExactPartition::lookup_batch`] answers the waiting keys,
    ///    which are then judged in order (a copy accepted earlier in this
    ///    step is seen through the queued marks).
    ///
    /// Shared keys skip the filter: one [`ExactPartition::claim_batch`]
    /// judges and records them atomically. A run ends before any rotation,
    /// so all of its keys see the same slices.
    pub(crate) fn check_batched(
        &mut self,
        items: &[(usize, Fingerprint, Option<Probe>, Timestamp)],
        rules: &ShardRules,
        trust: Trust,
        span: u64,
        out: &mut [Verdict],
    ) {
        let mut waiting: Vec<(usize, Fingerprint, Option<Probe>, Timestamp, u8)> = Vec::new();
        // Owned keys read the pending marks' index and the filter: start
        // loading both `BATCHED_PREFETCH_AHEAD` keys ahead (shared keys
        // read neither).
        let prefetch = trust == Trust::Owned;
        if prefetch {
            for &(_, fp, probe, _) in items.iter().take(BATCHED_PREFETCH_AHEAD) {
                self.prefetch_batched(fp, probe);
            }
        }
        for (j, &(pos, fp, probe, t)) in items.iter().enumerate() {
            if prefetch {
                if let Some(&(_, ahead, probe, _)) = items.get(j + BATCHED_PREFETCH_AHEAD) {
                    self.prefetch_batched(ahead, probe);
                }
            }
            if self.would_rotate(t) && !waiting.is_empty() {
                self.resolve(&mut waiting, rules, trust, out);
            }
            self.advance(t);
            self.update_warmth(span, rules.warm_up);
            self.counters.checks += 1;
            if let Some(held) = self.held_verdict(fp) {
                out[pos] = held;
                self.count(held);
                continue;
            }
            if trust == Trust::Shared {
                waiting.push((pos, fp, probe, t, u8::MAX));
                continue;
            }
            if let Some(first_seen) = self.pending.get(fp) {
                out[pos] = self.judge(fp, probe, first_seen, t, rules);
                self.count(out[pos]);
                continue;
            }
            let hits = self.filter_hits(fp, probe);
            if hits == 0 && self.warmth == Warmth::Warm {
                out[pos] = self.accept(fp, probe, t, rules);
                self.count(out[pos]);
                continue;
            }
            if hits != 0 {
                self.counters.maybe_seen += 1;
            }
            if self.exact.is_none() {
                out[pos] = self.likely_duplicate(hits, self.current_slice());
                self.count(out[pos]);
                continue;
            }
            // Cold: the exact tier may hold it in any live slot.
            let slots = if self.warmth == Warmth::Warm {
                hits
            } else {
                u8::MAX
            };
            waiting.push((pos, fp, probe, t, slots));
        }
        self.resolve(&mut waiting, rules, trust, out);
    }

    /// What step 1 of [`Shard::check_batched`] reads for `fp`: its pending
    /// mark's index bucket and its filter block.
    #[inline]
    fn prefetch_batched(&self, fp: Fingerprint, probe: Option<Probe>) {
        self.pending.prefetch(fp);
        self.prefetch(fp, probe);
    }

    fn current_slice(&self) -> u64 {
        match &self.filter {
            ShardFilter::Windowed(f) => f.current(),
            ShardFilter::Unbounded(_) | ShardFilter::Direct => 0,
        }
    }

    fn would_rotate(&self, t: Timestamp) -> bool {
        match &self.filter {
            ShardFilter::Windowed(f) => {
                let target = f
                    .base
                    .slicing()
                    .slice_of(Timestamp::from_nanos(t.as_nanos().max(self.time)));
                f.base.current_slice().is_some_and(|c| target > c)
            }
            ShardFilter::Unbounded(_) | ShardFilter::Direct => false,
        }
    }

    fn filter_hits(&self, fp: Fingerprint, probe: Option<Probe>) -> u8 {
        match &self.filter {
            ShardFilter::Windowed(f) => f.hits(fp, probe.unwrap_or_else(|| f.probe(fp))),
            ShardFilter::Unbounded(g) => u8::from(g.contains(fp)),
            // No filter: every key is "maybe seen", confirmed in slot 0.
            ShardFilter::Direct => 1,
        }
    }

    #[inline]
    fn count(&mut self, v: Verdict) {
        match v {
            Verdict::New => self.counters.new += 1,
            Verdict::Duplicate { .. } | Verdict::DuplicateUntimed => self.counters.duplicates += 1,
            Verdict::LikelyDuplicate { .. } => self.counters.likely_duplicates += 1,
            Verdict::Unavailable => self.counters.unavailable += 1,
            Verdict::InProgress { .. } => self.counters.in_progress += 1,
            Verdict::Late { .. } => {}
        }
    }

    /// Step 2 of [`Shard::check_batched`]: one round trip for every waiting
    /// key, then their verdicts in order.
    fn resolve(
        &mut self,
        waiting: &mut Vec<(usize, Fingerprint, Option<Probe>, Timestamp, u8)>,
        rules: &ShardRules,
        trust: Trust,
        out: &mut [Verdict],
    ) {
        if waiting.is_empty() {
            return;
        }
        if trust == Trust::Shared && self.shares_leases(true) {
            // The store holds the leases: checks are claims committed at
            // once, atomic in the store.
            let items: Vec<(usize, Fingerprint, Timestamp)> = waiting
                .iter()
                .map(|&(pos, fp, _, t, _)| (pos, fp, t))
                .collect();
            let now = self.lease_clock.now();
            if self.check_shared(&items, now, rules, out).is_some() {
                for &(pos, fp, probe, _, _) in waiting.iter() {
                    if out[pos].is_new() {
                        if let ShardFilter::Windowed(f) = &mut self.filter {
                            let probe = probe.unwrap_or_else(|| f.probe(fp));
                            let _ = f.insert(fp, probe);
                        }
                    }
                    self.count(out[pos]);
                }
                waiting.clear();
                return;
            }
        }
        let current = self.current_slice();
        let exact = self.exact.as_mut().expect("only exact mode waits");
        let mut answers = Vec::with_capacity(waiting.len());
        if trust == Trust::Shared {
            let claims: Vec<Claim> = waiting
                .iter()
                .map(|&(_, fp, _, t, _)| Claim {
                    fingerprint: fp,
                    at: t,
                })
                .collect();
            let started = std::time::Instant::now();
            let result = exact.claim_batch(current, rules.window, &claims, &mut answers);
            self.counters
                .exact_call(started.elapsed().as_nanos() as u64);
            for (i, &(pos, fp, probe, t, _)) in waiting.iter().enumerate() {
                out[pos] = match (&result, answers.get(i)) {
                    (Ok(()), Some(Some(first_seen))) => Verdict::Duplicate {
                        first_seen: *first_seen,
                    },
                    (Ok(()), Some(None)) => {
                        // Recorded by the claim: keep the local filter in step.
                        if let ShardFilter::Windowed(f) = &mut self.filter {
                            let probe = probe.unwrap_or_else(|| f.probe(fp));
                            let _ = f.insert(fp, probe);
                        }
                        let _ = t;
                        Verdict::New
                    }
                    _ => Verdict::Unavailable,
                };
                self.count(out[pos]);
            }
            waiting.clear();
            return;
        }
        let lookups: Vec<Lookup> = waiting
            .iter()
            .map(|&(_, fp, _, _, slots)| Lookup {
                fingerprint: fp,
                slots,
            })
            .collect();
        let started = std::time::Instant::now();
        let result = exact.lookup_batch(current, &lookups, &mut answers);
        self.counters
            .exact_call(started.elapsed().as_nanos() as u64);
        // Keys accepted below, in this step: the answers above predate them,
        // and the queued marks may be flushed in between.
        let mut accepted_here = crate::exact::table::FingerprintTable::new();
        for (i, &(pos, fp, probe, t, slots)) in waiting.iter().enumerate() {
            let newest = accepted_here
                .get(fp)
                .map(Timestamp::from_nanos)
                .or_else(|| self.pending.get(fp));
            out[pos] = if result.is_err() {
                Verdict::Unavailable
            } else if let Some(first_seen) = newest {
                // Accepted by an earlier copy in this batch.
                self.judge(fp, probe, first_seen, t, rules)
            } else {
                match answers.get(i).copied().flatten() {
                    Some(first_seen) => self.judge(fp, probe, first_seen, t, rules),
                    None => {
                        // Matched by the filter but absent: a false
                        // positive caught (a cold lookup is not one).
                        if slots != u8::MAX {
                            self.counters.false_positives += 1;
                        }
                        self.accept(fp, probe, t, rules)
                    }
                }
            };
            if out[pos].is_new() {
                accepted_here.insert(fp, t.as_nanos());
            }
            self.count(out[pos]);
        }
        waiting.clear();
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
        let mut todo = hits;
        while let Some(slot) = newest_slot(todo, cur) {
            todo &= !(1 << slot);
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
            // inside. (Not `t < t0 + W`: a time stored at u64::MAX reads
            // back one less, and `MAX < MAX` would re-accept it forever.)
            Some(w) => t.as_nanos().saturating_sub(first_seen.as_nanos()) < w,
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
    pub(crate) fn accept(
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
            ShardFilter::Direct => 0,
        };
        if let Some(exact) = &mut self.exact {
            self.counters.marks_queued += 1;
            let slice = match &self.filter {
                ShardFilter::Windowed(f) => f.current(),
                ShardFilter::Unbounded(_) | ShardFilter::Direct => 0,
            };
            let mark = Mark {
                fingerprint: fp,
                slot,
                slice,
                at: t,
            };
            if self.pending.is_write_through() {
                // A remote tier files a mark under its slice, which a slot
                // alone does not name (`mark` would guess it from the last
                // slice the tier heard of, an older one once the filter
                // rotated without a lookup): pass it.
                let result = if exact.prefers_batches() {
                    exact.mark_batch(std::slice::from_ref(&mark))
                } else {
                    exact.mark(fp, slot, t)
                };
                match result {
                    Ok(()) => self.counters.marks_flushed += 1,
                    Err(_) => self.counters.mark_errors += 1,
                }
            } else {
                if self.pending.push(mark) {
                    self.flush_marks();
                }
            }
        }
        Verdict::New
    }

    pub(crate) fn likely_duplicate(&self, hits: u8, cur: u64) -> Verdict {
        let since = match &self.filter {
            ShardFilter::Windowed(f) => {
                // The oldest matching live slice bounds when it was accepted.
                let oldest_back = (0..GENERATIONS as u64 - 1)
                    .rev()
                    .find(|&back| hits & (1 << slot_of(cur.wrapping_sub(back))) != 0)
                    .unwrap_or(0);
                f.base
                    .slicing()
                    .slice_start(cur.saturating_sub(oldest_back))
            }
            ShardFilter::Unbounded(_) | ShardFilter::Direct => Timestamp::ZERO,
        };
        Verdict::LikelyDuplicate { since }
    }

    pub(crate) fn filter_bytes(&self) -> usize {
        match &self.filter {
            ShardFilter::Windowed(f) => f.bytes(),
            ShardFilter::Unbounded(g) => g.bytes(),
            ShardFilter::Direct => 0,
        }
    }

    /// The filter's estimated rate now and, with a window, the fill of each
    /// live generation (newest first).
    pub(crate) fn estimated_fpr_and_fill(&self) -> (f64, Option<[f64; GENERATIONS - 1]>) {
        match &self.filter {
            ShardFilter::Windowed(f) => {
                let (fpr, fill) = f.estimated_fpr_and_fill();
                (fpr, Some(fill))
            }
            ShardFilter::Unbounded(g) => (g.estimated_fpr(), None),
            ShardFilter::Direct => (0.0, None),
        }
    }
}

/// The memory tier's one probe of `fp` at `t` as a verdict — within the
/// window (`window`) or untimed — and whether it re-accepted a key whose
/// window had passed. Shared by [`Shard::check_direct`] and
/// [`Shard::check_direct_group`], so both answer alike.
#[inline(always)]
fn probe_direct(
    table: &mut MemoryPartition,
    fp: Fingerprint,
    t: Timestamp,
    window: bool,
) -> (Verdict, bool) {
    if window {
        match table.check_within(fp, t) {
            Within::Inside(first_seen) => (
                Verdict::Duplicate {
                    first_seen: Timestamp::from_nanos(first_seen),
                },
                false,
            ),
            Within::Expired => (Verdict::New, true),
            Within::Absent => (Verdict::New, false),
        }
    } else {
        let verdict = match table.first_seen_or_mark(fp, t) {
            Seen::At(first_seen) => Verdict::Duplicate { first_seen },
            Seen::Untimed => Verdict::DuplicateUntimed,
            Seen::No => Verdict::New,
        };
        (verdict, false)
    }
}
