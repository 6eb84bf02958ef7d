//! `Deduper`: the engine. Fingerprints are routed to shards; each shard is
//! used by one thread at a time (its lock), so two copies of one key never
//! race and the filter's "definitely new" needs no confirmation.

mod builder;
mod claim;
mod claims_api;
mod leases;
mod marks;
mod shard;
mod shared;
mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::error::FlushError;
use crate::exact::ExactTier;
use crate::filter::Probe;
use crate::fingerprint::{Fingerprint, Key, Namespace};
use crate::time::{ClockSource, Timestamp};
use crate::verdict::Verdict;

pub use builder::{Affinity, DeduperBuilder, Mode};
pub use stats::{ClaimStats, Stats};

pub(crate) use builder::Plan;
pub(crate) use claim::ShardClaim;
pub(crate) use leases::Held;
use leases::LeaseClock;
pub(crate) use shard::{Shard, ShardFilter, Staged, Warmth};
pub(crate) use stats::ShardCounters as ShardCountersView;
#[cfg(feature = "metrics")]
pub(crate) use stats::LATENCY_BUCKETS_MICROS;

/// How far ahead of the key being checked a batch starts loading its filter
/// block, and (half as far ahead) reads the block and starts loading its
/// exact-tier bucket: two pipelined prefetch stages, so both DRAM misses of a
/// key overlap other keys' work.
const PREFETCH_AHEAD: usize = 16;
const PREFETCH_EXACT_AHEAD: usize = 8;
/// Keys in flight between the stages (a power of two above
/// `PREFETCH_AHEAD`).
const RING: usize = 32;
/// How far ahead a shard without a filter starts loading a key's table
/// bucket (one stage, two cache lines: see `FingerprintTable::prefetch`).
/// Measured on 10⁷ keys with a window, one thread: 8 → 22.9 M keys/s,
/// 16 → 24.8, 32 → 25.5, 48 → 24.8, 64 → 22.9.
const DIRECT_AHEAD: usize = 32;

/// The deduplication engine: "was this key accepted within the window?"
///
/// `Send + Sync`: share it (`Arc<Deduper>`) between threads and call it
/// through `&self`. See the [crate documentation](crate) for the tiers and
/// the guarantees.
pub struct Deduper {
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    shard_mask: u64,
    plan: Plan,
    clock: ClockSource,
    /// Event time: highest timestamp seen (0 before any).
    watermark: CachePadded<AtomicU64>,
    late: AtomicU64,
    /// The clock claims' leases are measured on.
    lease_clock: LeaseClock,
    /// Per shard: claims waiting for a holder to commit or release
    /// ([`Deduper::claim_wait`]) sleep here, with the shard's lock.
    wakeups: Box<[CachePadded<Condvar>]>,
    /// The log and checkpoints of an engine opened on a directory.
    pub(crate) durable: Option<crate::durability::Durable>,
    /// The store holds the leases (shared keys on a remote tier).
    shared_leases: bool,
}

impl Deduper {
    /// A builder with the defaults (one-hour window, 10⁶ keys per window,
    /// 1% filter rate, processing time, exact mode, memory tier).
    pub fn builder() -> DeduperBuilder {
        DeduperBuilder::default()
    }

    pub(crate) fn from_parts(
        plan: Plan,
        shards: Box<[CachePadded<Mutex<Shard>>]>,
        clock: ClockSource,
        lease_clock: LeaseClock,
    ) -> Self {
        let shared_leases = shards[0]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shares_leases(plan.trust == shard::Trust::Shared);
        Deduper {
            shared_leases,
            wakeups: (0..shards.len())
                .map(|_| CachePadded::new(Condvar::new()))
                .collect(),
            lease_clock,
            shard_mask: shards.len() as u64 - 1,
            shards,
            plan,
            clock,
            watermark: CachePadded::new(AtomicU64::new(0)),
            late: AtomicU64::new(0),
            durable: None,
        }
    }

    /// Makes this engine log to `durable` (after its recovery).
    pub(crate) fn attach_durable(&mut self, durable: crate::durability::Durable) {
        self.durable = Some(durable);
    }

    /// The fingerprint of `key` in this engine's namespace.
    #[inline]
    pub fn fingerprint<K: Key + ?Sized>(&self, key: &K) -> Fingerprint {
        key.fingerprint(self.plan.namespace)
    }

    /// The namespace keys are hashed in.
    #[must_use]
    pub fn namespace(&self) -> Namespace {
        self.plan.namespace
    }

    /// The window (`None`: keys never expire).
    #[must_use]
    pub fn window(&self) -> Option<Duration> {
        self.plan.window.map(Duration::from_nanos)
    }

    /// The length of one generation (window plus lateness, over six).
    #[must_use]
    pub fn slice_duration(&self) -> Option<Duration> {
        self.plan
            .slicing
            .map(|s| Duration::from_nanos(s.slice_nanos))
    }

    /// The event-time watermark: the highest timestamp passed so far.
    #[must_use]
    pub fn watermark(&self) -> Timestamp {
        Timestamp::from_nanos(self.watermark.load(Ordering::Acquire))
    }

    /// Number of shards.
    #[must_use]
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// How the filter was sized: bits per key and probes per generation,
    /// the rate per generation, and keys per generation slot per shard.
    #[must_use]
    pub fn sizing(&self) -> Sizing {
        let s = &self.plan.sizing;
        Sizing {
            bits_per_key_per_generation: s.bits_per_key,
            hashes: s.hashes,
            generation_fpr: s.generation_fpr,
            slot_capacity_per_shard: self.plan.rules.slot_capacity,
            namespace: self.plan.namespace_name.clone(),
        }
    }

    /// The exact tier's name (`memory`, `dashmap`, `redis`, …).
    #[must_use]
    pub fn exact_tier_name(&self) -> &'static str {
        self.plan.exact_name
    }

    /// The exact tier the engine was built with (its backend's own
    /// figures: [`ExactTier::report_metrics`]).
    #[must_use]
    pub fn exact_tier(&self) -> &ExactTier {
        &self.plan.exact
    }

    /// The mode the engine runs in.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.plan.mode
    }

    #[inline]
    fn shard_of(&self, fp: Fingerprint) -> usize {
        (fp.low() & self.shard_mask) as usize
    }

    /// Faults every shard's memory-tier table in
    /// ([`crate::DeduperBuilder::prefault_tables`]), one thread per core,
    /// each taking every so-manyth shard.
    pub(crate) fn prefault_tables(&self) {
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(self.shards.len());
        std::thread::scope(|scope| {
            for first in 1..threads {
                scope.spawn(move || self.prefault_every(first, threads));
            }
            self.prefault_every(0, threads);
        });
    }

    fn prefault_every(&self, first: usize, step: usize) {
        for s in (first..self.shards.len()).step_by(step) {
            self.lock(s).prefault_tables();
        }
    }

    /// Shard `s`, locked.
    pub(crate) fn lock_shard(&self, s: usize) -> MutexGuard<'_, Shard> {
        self.lock(s)
    }

    #[inline]
    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A shard's state is consistent between calls (a panic inside one
        // would be a bug of ours): keep serving after a poisoned lock.
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls `f(s, guard)` for each shard `s` for which `wanted(s)`, under
    /// its lock: the shards that are free first, in order, then the others,
    /// waiting for each. Threads batching at once would otherwise queue
    /// behind each other shard after shard (a convoy). `f` may drop the
    /// guard early (to wait for durability without the lock).
    pub(crate) fn for_wanted_shards_free_first(
        &self,
        wanted: impl Fn(usize) -> bool,
        mut f: impl FnMut(usize, MutexGuard<'_, Shard>),
    ) {
        let mut busy = Vec::new();
        for s in (0..self.shards.len()).filter(|&s| wanted(s)) {
            match self.shards[s].try_lock() {
                Ok(shard) => f(s, shard),
                Err(TryLockError::Poisoned(e)) => f(s, e.into_inner()),
                Err(TryLockError::WouldBlock) => busy.push(s),
            }
        }
        for s in busy {
            f(s, self.lock(s));
        }
    }

    /// The verdict for `key` now: [`Verdict::New`] (accepted now) or
    /// [`Verdict::Duplicate`] (accepted less than the window ago). Under
    /// [`crate::Clock::EventTime`], "now" is the watermark.
    ///
    /// A durable engine ([`DeduperBuilder::open`]) returns once the change
    /// is logged as its [`crate::Durability`] promises; after a log failure
    /// it answers [`Verdict::Unavailable`].
    #[inline]
    pub fn check<K: Key + ?Sized>(&self, key: &K) -> Verdict {
        let fp = self.fingerprint(key);
        if self.durability_failed() {
            return Verdict::Unavailable;
        }
        let s = self.shard_of(fp);
        let mut shard = self.lock(s);
        let t = match self.clock.read() {
            Some(reading) => shard.processing_time(reading),
            None => self.watermark(),
        };
        let verdict = self.check_one(&mut shard, fp, t);
        let need = self.seal(s, &mut shard);
        drop(shard);
        self.settled(need, verdict)
    }

    /// `verdict` once records below `need` are durable; `Unavailable` if
    /// the log failed.
    #[inline]
    fn settled(&self, need: u64, verdict: Verdict) -> Verdict {
        match self.settle(need) {
            Ok(()) => verdict,
            Err(_) => Verdict::Unavailable,
        }
    }

    /// One key under its shard's lock, by the batched path where the shard
    /// needs it (one round trip for one key is all a single check can do).
    #[inline]
    fn check_one(&self, shard: &mut Shard, fp: Fingerprint, t: Timestamp) -> Verdict {
        if shard.wants_batches(self.plan.trust) {
            let mut out = [Verdict::Unavailable];
            shard.check_batched(
                &[(0, fp, None, t)],
                &self.plan.rules,
                self.plan.trust,
                self.plan.span,
                &mut out,
            );
            out[0]
        } else {
            shard.check(fp, None, t, &self.plan.rules)
        }
    }

    /// The verdict for `key` at event time `t`: a duplicate when it was
    /// accepted at `t0` with `t − t0 < window` (a repeat timestamped before
    /// its accepted occurrence is a duplicate too). An event more than the
    /// allowed lateness behind the watermark is [`Verdict::Late`].
    #[inline]
    pub fn check_at<K: Key + ?Sized>(&self, key: &K, t: Timestamp) -> Verdict {
        if self.durability_failed() {
            return Verdict::Unavailable;
        }
        if let Some(late) = self.observe(t) {
            return late;
        }
        let fp = self.fingerprint(key);
        let s = self.shard_of(fp);
        let mut shard = self.lock(s);
        let verdict = self.check_one(&mut shard, fp, t);
        let need = self.seal(s, &mut shard);
        drop(shard);
        self.settled(need, verdict)
    }

    /// Moves the watermark to `t`, or returns `Late` when `t` is behind it by
    /// more than the allowed lateness.
    #[inline]
    fn observe(&self, t: Timestamp) -> Option<Verdict> {
        let wm = self.watermark.load(Ordering::Acquire);
        let t = t.as_nanos();
        if t.saturating_add(self.plan.lateness) < wm {
            self.late.fetch_add(1, Ordering::Relaxed);
            return Some(Verdict::Late {
                watermark: Timestamp::from_nanos(wm),
            });
        }
        if t > wm {
            self.watermark.fetch_max(t, Ordering::AcqRel);
        }
        None
    }

    /// Verdicts for many keys, in order: the same as calling
    /// [`Deduper::check`] on each in turn, at one clock reading. Keys are
    /// grouped by shard (one lock per shard per batch) and their filter
    /// blocks prefetched.
    pub fn check_batch<K: Key>(&self, keys: &[K]) -> Vec<Verdict> {
        let mut out = Vec::with_capacity(keys.len());
        self.check_batch_into(keys, &mut out);
        out
    }

    /// [`Deduper::check_batch`] into a caller's vector (cleared first).
    pub fn check_batch_into<K: Key>(&self, keys: &[K], out: &mut Vec<Verdict>) {
        let pending = self.check_batch_into_deferred(keys, out);
        if pending.wait(self).is_err() {
            // Not durable: no verdict of this batch may be acted on.
            out.fill(Verdict::Unavailable);
        }
    }

    /// Verdicts for many `(key, event time)` pairs, in order: the same as
    /// calling [`Deduper::check_at`] on each in turn.
    pub fn check_batch_at<K: Key>(&self, keys: &[(K, Timestamp)]) -> Vec<Verdict> {
        let mut out = Vec::with_capacity(keys.len());
        let pending = self.check_batch_at_deferred(keys, &mut out);
        if pending.wait(self).is_err() {
            out.fill(Verdict::Unavailable);
        }
        out
    }

    /// [`Deduper::check_batch_into`] without waiting for durability: the
    /// verdicts are in `out` at once, but on a durable engine they may be
    /// acted on only once [`Unsettled::wait`] (or any later wait of this
    /// engine that covers them, such as a [`Deduper::note`]) has returned
    /// `Ok`; until then a crash may lose the keys accepted. Lets a caller
    /// overlap the log's write or sync with other work, or cover several
    /// batches with one wait.
    pub fn check_batch_into_deferred<K: Key>(
        &self,
        keys: &[K],
        out: &mut Vec<Verdict>,
    ) -> Unsettled {
        if self.durability_failed() {
            out.clear();
            out.resize(keys.len(), Verdict::Unavailable);
            return Unsettled { need: 0 };
        }
        let fps: Vec<Fingerprint> = keys.iter().map(|k| self.fingerprint(k)).collect();
        let reading = self.clock.read();
        let wm = self.watermark();
        out.clear();
        out.resize(fps.len(), Verdict::New);
        let need = self.judge_batch(&fps, out, |shard, _| {
            Some(match reading {
                Some(r) => shard.processing_time(r),
                None => wm,
            })
        });
        Unsettled { need }
    }

    /// [`Deduper::check_batch_at`] without waiting for durability (see
    /// [`Deduper::check_batch_into_deferred`]); verdicts into `out`.
    pub fn check_batch_at_deferred<K: Key>(
        &self,
        keys: &[(K, Timestamp)],
        out: &mut Vec<Verdict>,
    ) -> Unsettled {
        if self.durability_failed() {
            out.clear();
            out.resize(keys.len(), Verdict::Unavailable);
            return Unsettled { need: 0 };
        }
        let late = self.screen_late(keys.iter().map(|(_, t)| *t), out);
        let fps: Vec<Fingerprint> = keys.iter().map(|(k, _)| self.fingerprint(k)).collect();
        let need = self.judge_batch(&fps, out, |_, i| (!late[i]).then_some(keys[i].1));
        Unsettled { need }
    }

    /// Decides lateness for a batch of event times up front, against the
    /// watermark each event would meet if checked one at a time, and moves
    /// the watermark. Fills `out` with `Late` or a placeholder `New` per
    /// event and returns which are late (late events are not routed).
    pub(crate) fn screen_late(
        &self,
        times: impl ExactSizeIterator<Item = Timestamp>,
        out: &mut Vec<Verdict>,
    ) -> Vec<bool> {
        out.clear();
        let mut late = Vec::with_capacity(times.len());
        let mut wm = self.watermark.load(Ordering::Acquire);
        let mut late_count = 0;
        for t in times {
            let t = t.as_nanos();
            if t.saturating_add(self.plan.lateness) < wm {
                late_count += 1;
                late.push(true);
                out.push(Verdict::Late {
                    watermark: Timestamp::from_nanos(wm),
                });
            } else {
                wm = wm.max(t);
                late.push(false);
                out.push(Verdict::New);
            }
        }
        self.watermark.fetch_max(wm, Ordering::AcqRel);
        self.late.fetch_add(late_count, Ordering::Relaxed);
        late
    }

    /// The processing-clock reading for a batch (`None` under event time).
    pub(crate) fn clock_reading(&self) -> Option<Timestamp> {
        self.clock.read()
    }

    /// The shard a fingerprint belongs to.
    pub(crate) fn shard_index(&self, fp: Fingerprint) -> usize {
        self.shard_of(fp)
    }

    /// Groups `fps` by shard, takes each shard's lock once, and writes the
    /// verdicts in input order into `out` (which has one slot per key).
    /// `time(shard, i)` is the time of key `i`, or `None` to leave `out[i]`.
    /// Returns what the verdicts wait for to be durable.
    fn judge_batch(
        &self,
        fps: &[Fingerprint],
        out: &mut [Verdict],
        time: impl Fn(&Shard, usize) -> Option<Timestamp>,
    ) -> u64 {
        debug_assert_eq!(fps.len(), out.len());
        let (starts, order) = group_by(fps.len(), self.shards.len(), |i| self.shard_of(fps[i]));
        let group = |s: usize| &order[starts[s] as usize..starts[s + 1] as usize];
        // Threads batching at once would queue behind each other shard after
        // shard (a convoy): take the shards that are free first, then wait
        // for the others. Keys of one shard stay in input order either way.
        let mut busy = Vec::new();
        let mut need = 0;
        for s in 0..self.shards.len() {
            if group(s).is_empty() {
                continue;
            }
            let n = match self.shards[s].try_lock() {
                Ok(mut shard) => self.check_group_locked(s, &mut shard, fps, group(s), &time, out),
                Err(TryLockError::Poisoned(e)) => {
                    self.check_group_locked(s, &mut e.into_inner(), fps, group(s), &time, out)
                }
                Err(TryLockError::WouldBlock) => {
                    busy.push(s);
                    0
                }
            };
            need = need.max(n);
        }
        for s in busy {
            need = need.max(self.check_group(s, fps, group(s), &time, out));
        }
        need
    }

    /// Checks the keys `group` (indices into `fps`, all of shard `s`, in
    /// input order) under one lock of shard `s`, with two prefetch stages.
    /// Returns what the verdicts wait for to be durable
    /// ([`Deduper::seal`]).
    pub(crate) fn check_group(
        &self,
        s: usize,
        fps: &[Fingerprint],
        group: &[u32],
        time: &impl Fn(&Shard, usize) -> Option<Timestamp>,
        out: &mut [Verdict],
    ) -> u64 {
        if group.is_empty() {
            return 0;
        }
        self.check_group_locked(s, &mut self.lock(s), fps, group, time, out)
    }

    /// [`Deduper::check_group`] with the shard's lock held.
    fn check_group_locked(
        &self,
        s: usize,
        shard: &mut Shard,
        fps: &[Fingerprint],
        group: &[u32],
        time: &impl Fn(&Shard, usize) -> Option<Timestamp>,
        out: &mut [Verdict],
    ) -> u64 {
        self.judge_group(shard, fps, group, time, out);
        self.seal(s, shard)
    }

    fn judge_group(
        &self,
        shard: &mut Shard,
        fps: &[Fingerprint],
        group: &[u32],
        time: &impl Fn(&Shard, usize) -> Option<Timestamp>,
        out: &mut [Verdict],
    ) {
        shard.counters.batches += 1;
        shard.counters.batch_keys += group.len() as u64;
        if shard.wants_batches(self.plan.trust) {
            let items: Vec<_> = group
                .iter()
                .filter_map(|&i| {
                    let i = i as usize;
                    time(shard, i).map(|t| (i, fps[i], shard.probe(fps[i]), t))
                })
                .collect();
            shard.check_batched(
                &items,
                &self.plan.rules,
                self.plan.trust,
                self.plan.span,
                out,
            );
            return;
        }
        match shard.filter {
            ShardFilter::Windowed(_) => self.check_group_staged(shard, fps, group, time, out),
            ShardFilter::Unbounded(_) | ShardFilter::Direct => {
                self.check_group_unbounded(shard, fps, group, time, out);
            }
        }
    }

    /// [`Deduper::check_group`] for a shard without a window that judges
    /// keys one by one: the growing filter's blocks are prefetched
    /// `PREFETCH_AHEAD` keys ahead, the exact-tier bucket (slot 0)
    /// `PREFETCH_EXACT_AHEAD` ahead. Without a filter the first stage
    /// loads the bucket and there is no second.
    fn check_group_unbounded(
        &self,
        shard: &mut Shard,
        fps: &[Fingerprint],
        group: &[u32],
        time: &impl Fn(&Shard, usize) -> Option<Timestamp>,
        out: &mut [Verdict],
    ) {
        if matches!(shard.filter, ShardFilter::Direct) && shard.leases.is_empty() {
            shard.check_direct_group(fps, group, time, &self.plan.rules, DIRECT_AHEAD, out);
            return;
        }
        let fp_at = |j: usize| fps[group[j] as usize];
        let n = group.len();
        // Without a filter, stage one has loaded the bucket already.
        let exact_stage = if matches!(shard.filter, ShardFilter::Direct) {
            0
        } else {
            n
        };
        for j in 0..n.min(PREFETCH_AHEAD) {
            shard.prefetch(fp_at(j), None);
        }
        for j in 0..exact_stage.min(PREFETCH_EXACT_AHEAD) {
            shard.prefetch_exact_unbounded(fp_at(j));
        }
        for (j, &i) in group.iter().enumerate() {
            if j + PREFETCH_AHEAD < n {
                shard.prefetch(fp_at(j + PREFETCH_AHEAD), None);
            }
            if j + PREFETCH_EXACT_AHEAD < exact_stage {
                shard.prefetch_exact_unbounded(fp_at(j + PREFETCH_EXACT_AHEAD));
            }
            let i = i as usize;
            if let Some(t) = time(shard, i) {
                out[i] = shard.check(fps[i], None, t, &self.plan.rules);
            }
        }
    }

    /// [`Deduper::check_group`] for a windowed shard that judges keys one by
    /// one (a local exact tier, or none): three stages over a ring of the
    /// next `RING` keys — compute the probe and prefetch the filter block
    /// (`PREFETCH_AHEAD` keys ahead), read the block and prefetch the exact
    /// bucket (`PREFETCH_EXACT_AHEAD` ahead), check.
    fn check_group_staged(
        &self,
        shard: &mut Shard,
        fps: &[Fingerprint],
        group: &[u32],
        time: &impl Fn(&Shard, usize) -> Option<Timestamp>,
        out: &mut [Verdict],
    ) {
        // The ring holds, for the next `RING` keys, each one's fingerprint
        // and probe (stage one) and its filter answer (stage two).
        let mut ring_fps = [Fingerprint(0); RING];
        let mut probes = [Probe::default(); RING];
        let mut staged = [Staged::default(); RING];
        let n = group.len();
        for j in 0..n.min(PREFETCH_AHEAD) {
            let fp = fps[group[j] as usize];
            ring_fps[j] = fp;
            probes[j] = shard.load_probe(fp);
        }
        for j in 0..n.min(PREFETCH_EXACT_AHEAD) {
            staged[j] = shard.stage(ring_fps[j], probes[j]);
        }
        for j in 0..n {
            if j + PREFETCH_AHEAD < n {
                let fp = fps[group[j + PREFETCH_AHEAD] as usize];
                let a = (j + PREFETCH_AHEAD) % RING;
                ring_fps[a] = fp;
                probes[a] = shard.load_probe(fp);
            }
            let b = (j + PREFETCH_EXACT_AHEAD) % RING;
            if j + PREFETCH_EXACT_AHEAD < n {
                staged[b] = shard.stage(ring_fps[b], probes[b]);
            }
            let i = group[j] as usize;
            if let Some(t) = time(shard, i) {
                let r = j % RING;
                out[i] = shard.check_staged(ring_fps[r], probes[r], staged[r], t, &self.plan.rules);
            }
        }
    }

    /// Writes shard `s`'s pending marks if the oldest has waited the flush
    /// interval (`force`: whatever their age).
    ///
    /// # Errors
    /// A forced flush returns the tier's error when marks of this shard are
    /// still not stored, and how many.
    pub(crate) fn flush_shard(&self, s: usize, force: bool) -> Result<(), FlushError> {
        let mut shard = self.lock(s);
        if force {
            shard.send_queued_releases(&self.plan.rules);
            shard.sync_marks().map_err(|source| {
                let (kept, dropped) = shard.unwritten_marks();
                FlushError::Unwritten {
                    marks: kept + dropped,
                    dropped,
                    source,
                }
            })
        } else {
            shard.flush_marks_if_due(self.plan.flush_interval);
            Ok(())
        }
    }

    pub(crate) fn flush_interval(&self) -> Duration {
        self.plan.flush_interval
    }

    /// Rotates every shard to the current time (processing time) or the
    /// watermark (event time), freeing expired generations of shards that
    /// have seen no key for a while (on the memory tier's one table: sweeping
    /// up to 2¹⁶ buckets of expired entries per shard and call), and writes
    /// pending marks older than the flush interval. Checks rotate their own
    /// shard; call this periodically when some shards may sit idle for
    /// longer than a window.
    pub fn maintain(&self) {
        for s in 0..self.shards.len() {
            let mut shard = self.lock(s);
            let t = match self.clock.read() {
                Some(r) => shard.processing_time(r),
                None => self.watermark(),
            };
            shard.advance_idle(t);
            shard.sweep_expired(1 << 16);
            shard.flush_marks_if_due(self.plan.flush_interval);
        }
    }

    /// Writes every shard's pending marks to the exact tier now, and waits
    /// until the tier has them.
    ///
    /// # Errors
    /// [`FlushError::Unwritten`] when the tier has not stored some
    /// accepted keys: how many, how many of them it dropped past its retry
    /// buffer, and the first failing shard's error. The others stay kept
    /// for a retry (the next `flush`, [`Deduper::maintain`] or check); a
    /// caller about to exit must not treat any of them as recorded.
    /// Dropped keys are reported by every flush until their slice leaves
    /// the window.
    pub fn flush(&self) -> Result<(), FlushError> {
        let (mut unwritten, mut lost) = (0, 0);
        let mut first = None;
        for s in 0..self.shards.len() {
            let mut shard = self.lock(s);
            shard.send_queued_releases(&self.plan.rules);
            if let Err(e) = shard.sync_marks() {
                let (kept, dropped) = shard.unwritten_marks();
                unwritten += kept + dropped;
                lost += dropped;
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(source) => Err(FlushError::Unwritten {
                marks: unwritten,
                dropped: lost,
                source,
            }),
        }
    }

    /// Counters and sizes, summed over shards (each shard read under its
    /// lock, one after another).
    #[must_use]
    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            late: self.late.load(Ordering::Relaxed),
            ..Stats::default()
        };
        let mut fpr_sum = 0.0;
        for s in 0..self.shards.len() {
            let shard = self.lock(s);
            stats.add(&shard.counters);
            stats.marks_pending += shard.pending.len() as u64;
            stats.claims.leases_live += shard.leases.len() as u64;
            stats.exact_bytes += shard.leases.bytes() as u64;
            stats.filter_bytes += shard.filter_bytes() as u64;
            if let ShardFilter::Windowed(f) = &shard.filter {
                stats.overflow_layers += f.overflow.len() as u64;
            }
            if let Some(exact) = &shard.exact {
                stats.exact_entries += exact.len();
                stats.exact_bytes += exact.bytes() as u64;
            }
            let (fpr, fill) = shard.estimated_fpr_and_fill();
            fpr_sum += fpr;
            if let Some(fill) = fill {
                for (sum, f) in stats.generation_fill.iter_mut().zip(fill) {
                    *sum += f / self.shards.len() as f64;
                }
            }
        }
        stats.estimated_fpr = fpr_sum / self.shards.len() as f64;
        stats
    }

    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    pub(crate) fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        (0..self.shards.len()).map(|s| self.lock(s)).collect()
    }

    pub(crate) fn restore_watermark(&self, wm: u64, late: u64) {
        self.watermark.store(wm, Ordering::Release);
        self.late.store(late, Ordering::Relaxed);
    }

    pub(crate) fn late_count(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }
}

/// Verdicts returned before they are durable
/// ([`Deduper::check_batch_into_deferred`]): wait before acting on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "the verdicts may be acted on only once `wait` returned Ok"]
pub struct Unsettled {
    need: u64,
}

impl Unsettled {
    /// Returns once the batch's changes are as durable as the engine's
    /// [`crate::Durability`] promises (at once without a directory), then
    /// takes a checkpoint if one is due and automatic.
    ///
    /// # Errors
    /// [`crate::DurabilityError::Failed`] when the log has failed: the
    /// verdicts must not be acted on (the engine answers `Unavailable` from
    /// then on).
    pub fn wait(self, engine: &Deduper) -> Result<(), crate::DurabilityError> {
        engine.settle(self.need)
    }

    /// The later of two (waiting for it covers both).
    pub fn max(self, other: Unsettled) -> Unsettled {
        Unsettled {
            need: self.need.max(other.need),
        }
    }
}

/// How an engine's filter was sized (see [`Deduper::sizing`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Sizing {
    /// Filter bits per key in one generation.
    pub bits_per_key_per_generation: f64,
    /// Probe bits per key.
    pub hashes: u32,
    /// Target false-positive rate of one full generation.
    pub generation_fpr: f64,
    /// Keys one generation slot of one shard holds at its rate.
    pub slot_capacity_per_shard: u64,
    /// The namespace's name.
    pub namespace: String,
}

/// A counting sort of `0..n` by `key(i) < buckets`: returns bucket starts
/// (`buckets + 1` offsets) and the indices, in input order within a bucket.
pub(crate) fn group_by(
    n: usize,
    buckets: usize,
    key: impl Fn(usize) -> usize,
) -> (Vec<u32>, Vec<u32>) {
    let mut starts = vec![0u32; buckets + 1];
    for i in 0..n {
        starts[key(i) + 1] += 1;
    }
    for b in 0..buckets {
        starts[b + 1] += starts[b];
    }
    let mut cursor = starts.clone();
    let mut order = vec![0u32; n];
    for i in 0..n {
        let b = key(i);
        order[cursor[b] as usize] = i as u32;
        cursor[b] += 1;
    }
    (starts, order)
}

impl std::fmt::Debug for Deduper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deduper")
            .field("window", &self.window())
            .field("shards", &self.shards.len())
            .field("mode", &self.plan.mode)
            .field("exact_tier", &self.plan.exact_name)
            .finish_non_exhaustive()
    }
}
