//! `GenerationalBloom`: the rotating filter of a windowed engine.

use std::sync::PoisonError;
use std::time::Duration;

use crate::error::ConfigError;
use crate::fingerprint::Fingerprint;
use crate::sync::{fence, AtomicU64, Mutex, Ordering};
use crate::time::{duration_nanos, live_slots, slot_of, Slicing, Timestamp, GENERATIONS};

use super::blocks::{BlockedBloom, Probe, SlotOccupancy};
use super::sizing::shape_for;

/// `current` before the first advance: nothing inserted, nothing to clear.
const NOT_STARTED: u64 = u64::MAX;

/// Keys between a block's prefetch and its use in the batch paths: enough
/// misses in flight to cover a DRAM access (a power of two, so the ring
/// index is a mask). 64 rather than 16: at 10⁶ keys (a 12 MB filter, not
/// all of it cached for one core) a query took 5.1 ns instead of 8.2 in
/// paired runs against fastbloom; 10⁵ and 10⁸ keys were unchanged.
const BATCH_AHEAD: usize = 64;

/// `$recv.$method::<K>(args)` with `K` the hash count `$n` as a constant
/// (1 to 9, else [`super::sizing::MAX_HASHES`]): batch walks match the
/// count once per batch, then run code unrolled for it.
macro_rules! with_hash_count {
    ($n:expr, $recv:ident . $method:ident ($($arg:expr),*)) => {
        match $n {
            1 => $recv.$method::<1>($($arg),*),
            2 => $recv.$method::<2>($($arg),*),
            3 => $recv.$method::<3>($($arg),*),
            4 => $recv.$method::<4>($($arg),*),
            5 => $recv.$method::<5>($($arg),*),
            6 => $recv.$method::<6>($($arg),*),
            7 => $recv.$method::<7>($($arg),*),
            8 => $recv.$method::<8>($($arg),*),
            9 => $recv.$method::<9>($($arg),*),
            _ => $recv.$method::<{ super::sizing::MAX_HASHES }>($($arg),*),
        }
    };
}

/// What the filter says about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterAnswer {
    /// No live generation holds the key: it was not inserted within the
    /// window (filters have no false negatives). It has now been inserted.
    DefinitelyNew,
    /// Some live generation holds every probe bit of the key: it was seen,
    /// or this is a false positive. `slots` names the generation slots that
    /// matched (an exact tier only needs to look there).
    MaybeSeen {
        /// Bit `g` set: slot `g` matched.
        slots: u8,
    },
}

impl FilterAnswer {
    /// True for [`FilterAnswer::DefinitelyNew`].
    #[must_use]
    pub fn is_definitely_new(self) -> bool {
        matches!(self, FilterAnswer::DefinitelyNew)
    }
}

/// A rotating, cache-line-blocked Bloom filter over a time window.
///
/// The window is cut into six slices; each slice is a *generation* held in
/// one of the eight 64-bit words of every block (six full slices, the slice
/// now filling, and a spare cleared one slice ahead of its use). A query tests
/// the key's probe mask against all eight words of one cache line. A key is
/// kept for at least the window: a generation is cleared only when every key
/// in it is older than that.
///
/// Inserts go through `&self` from any number of threads (atomic bit sets).
/// Rotation happens inside the calls that see time cross a slice boundary,
/// under a lock no query takes; queries that overlap a rotation notice it and
/// retry, so a generation being cleared is never trusted.
///
/// ```
/// use std::time::Duration;
/// use tiered_dedup::{GenerationalBloom, Namespace, Timestamp};
///
/// let filter = GenerationalBloom::new(Duration::from_secs(60), 10_000, 0.01)?;
/// let key = Namespace::default().fingerprint(b"order-17");
/// let t = Timestamp::from_secs(1_000);
/// assert!(filter.check_and_insert(key, t).is_definitely_new());
/// assert!(filter.contains(key, t.saturating_add(Duration::from_secs(59))));
/// assert!(!filter.contains(key, t.saturating_add(Duration::from_secs(90))));
/// # Ok::<(), tiered_dedup::ConfigError>(())
/// ```
pub struct GenerationalBloom {
    bloom: BlockedBloom,
    slicing: Slicing,
    /// The slice now filling; its slot takes the inserts.
    current: AtomicU64,
    /// Start of the slice after `current` (nanoseconds): a time below it
    /// needs no rotation, so the common call skips the division.
    next_slice_at: AtomicU64,
    /// Held while publishing a new slice and clearing the spare.
    rotation: Mutex<()>,
}

impl GenerationalBloom {
    /// A filter that remembers keys for at least `window`, sized for
    /// `keys_per_window` keys per window at an overall false-positive rate of
    /// `false_positive_rate` (split evenly over the seven live generations).
    ///
    /// # Errors
    /// [`ConfigError`] when the window is zero, the rate is outside (0, 1) or
    /// too small for the layout, or the filter would not fit in memory.
    pub fn new(
        window: Duration,
        keys_per_window: u64,
        false_positive_rate: f64,
    ) -> Result<Self, ConfigError> {
        if window.is_zero() {
            return Err(ConfigError::ZeroWindow);
        }
        let slicing = Slicing::for_span(duration_nanos(window));
        let per_slice = keys_per_window
            .div_ceil(crate::time::SLICES_PER_SPAN)
            .max(1);
        let sizing = SlotSizing::new(per_slice, false_positive_rate, 1)?;
        Self::try_with_parts(slicing, sizing.num_blocks, sizing.hashes)
    }

    /// A filter of explicit shape: `keys_per_generation` keys per slice at
    /// `shape.bits_per_key` bits and `shape.hashes` probes (see
    /// [`super::sizing::shape_for`]); for benchmarks and experiments at a
    /// given bits-per-key.
    ///
    /// # Errors
    /// [`ConfigError::ZeroWindow`] for a zero window,
    /// [`ConfigError::OutOfMemory`] when the filter cannot be allocated.
    pub fn with_shape(
        window: Duration,
        keys_per_generation: u64,
        shape: super::sizing::FilterShape,
    ) -> Result<Self, ConfigError> {
        if window.is_zero() {
            return Err(ConfigError::ZeroWindow);
        }
        let blocks = (keys_per_generation as f64 * shape.bits_per_key / 64.0).ceil() as usize;
        Self::try_with_parts(
            Slicing::for_span(duration_nanos(window)),
            blocks.max(1),
            shape.hashes.clamp(1, super::sizing::MAX_HASHES),
        )
    }

    /// A filter of `num_blocks` blocks, or [`ConfigError::OutOfMemory`]
    /// when they cannot be allocated.
    pub(crate) fn try_with_parts(
        slicing: Slicing,
        num_blocks: usize,
        hashes: u32,
    ) -> Result<Self, ConfigError> {
        let bloom = BlockedBloom::try_new(num_blocks, hashes).ok_or(ConfigError::OutOfMemory {
            bytes: BlockedBloom::bytes_for(num_blocks),
        })?;
        Ok(GenerationalBloom {
            bloom,
            slicing,
            current: AtomicU64::new(NOT_STARTED),
            next_slice_at: AtomicU64::new(0),
            rotation: Mutex::new(()),
        })
    }

    /// Moves the filter to the slice of `now`, clearing the generations that
    /// expire on the way. Returns the mask of slots cleared. Called by every
    /// method that takes a time; time never moves backwards.
    #[inline]
    pub fn advance(&self, now: Timestamp) -> u8 {
        // Fast path: still inside the current slice. The bound only grows
        // and is published after `current` (release/acquire), so a caller
        // that passes it then reads a `current` at least as new; a stale
        // bound only sends the call down the slow path.
        if now.as_nanos() < self.next_slice_at.load(Ordering::Acquire) {
            return 0;
        }
        self.advance_slow(now)
    }

    #[cold]
    #[inline(never)]
    fn advance_slow(&self, now: Timestamp) -> u8 {
        let target = self.slicing.slice_of(now);
        let seen = self.current.load(Ordering::SeqCst);
        if seen != NOT_STARTED && target <= seen {
            return 0;
        }
        let _guard = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        let cur = self.current.load(Ordering::SeqCst);
        let result = self.advance_locked(cur, target);
        let cur = self.current.load(Ordering::SeqCst);
        self.next_slice_at.store(
            self.slicing.slice_start(cur.saturating_add(1)).as_nanos(),
            Ordering::Release,
        );
        result
    }

    /// The rotation itself, under the rotation lock.
    fn advance_locked(&self, cur: u64, target: u64) -> u8 {
        if cur == NOT_STARTED {
            // All slots are clean: start at `target`.
            self.current.store(target, Ordering::SeqCst);
            return 0;
        }
        if target <= cur {
            return 0;
        }
        if target - cur >= GENERATIONS as u64 {
            // Every key in the filter is older than the span: clear it all.
            // A query overlapping this is linearized after it (nothing is
            // live at `target`); an insert overlapping it re-validates below.
            for slot in 0..GENERATIONS {
                self.bloom.clear_slot(slot);
            }
            self.current.store(target, Ordering::SeqCst);
            return u8::MAX;
        }
        let mut cleared = 0u8;
        for s in cur + 1..=target {
            // Slot of `s` is the spare cleared one step ago: publish it.
            self.current.store(s, Ordering::SeqCst);
            // Publish before clearing: a reader that sees a cleared word also
            // sees the new `current` (this fence, the acquire fence in
            // readers) and retries instead of trusting the half-cleared slot.
            // SeqCst: also the store-buffering guard of `check_and_insert`.
            fence(Ordering::SeqCst);
            // The slot after `s` held slice s−7, all older than the span.
            let spare = slot_of(s + 1);
            self.bloom.clear_slot(spare);
            cleared |= 1 << spare;
        }
        cleared
    }

    /// Asks whether `fp` was inserted within the window, and inserts it if
    /// not. Of many threads inserting one fresh key at once, at most one gets
    /// [`FilterAnswer::DefinitelyNew`].
    pub fn check_and_insert(&self, fp: Fingerprint, now: Timestamp) -> FilterAnswer {
        self.advance(now);
        let probe = self.bloom.probe(fp);
        loop {
            let cur = self.current.load(Ordering::SeqCst);
            // Store-buffering guard, with the fence after publishing in
            // `advance` and the one after the insert below: a thread that
            // inserts a key in slice c and then reads `current == c` and a
            // thread that observed slice c+1 and then reads the slot of c
            // cannot both miss each other's write, so of two threads racing
            // one fresh key across a rotation at most one is told it is new.
            fence(Ordering::SeqCst);
            let hits = self.bloom.hits(probe) & live_slots(cur);
            let answer = if hits != 0 {
                FilterAnswer::MaybeSeen { slots: hits }
            } else if self.bloom.insert(probe, slot_of(cur)) {
                FilterAnswer::DefinitelyNew
            } else {
                // A concurrent insert of the same mask won the race.
                FilterAnswer::MaybeSeen {
                    slots: 1 << slot_of(cur),
                }
            };
            // Validate: no rotation overlapped the reads and the insert.
            fence(Ordering::SeqCst);
            if self.current.load(Ordering::SeqCst) == cur {
                return answer;
            }
        }
    }

    /// True when `fp` may have been inserted within the window of `now`.
    pub fn contains(&self, fp: Fingerprint, now: Timestamp) -> bool {
        self.advance(now);
        let probe = self.bloom.probe(fp);
        loop {
            let cur = self.current.load(Ordering::SeqCst);
            let hit = self.bloom.hits(probe) & live_slots(cur) != 0;
            fence(Ordering::Acquire);
            if self.current.load(Ordering::SeqCst) == cur {
                return hit;
            }
        }
    }

    /// Inserts `fp` into the generation of `now`.
    pub fn insert(&self, fp: Fingerprint, now: Timestamp) {
        self.advance(now);
        let probe = self.bloom.probe(fp);
        loop {
            let cur = self.current.load(Ordering::SeqCst);
            self.bloom.insert(probe, slot_of(cur));
            fence(Ordering::Acquire);
            if self.current.load(Ordering::SeqCst) == cur {
                return;
            }
        }
    }

    /// [`GenerationalBloom::contains`] for many keys, keeping several cache
    /// misses in flight. Writes one answer per key to `out` (cleared first).
    pub fn contains_batch(&self, fps: &[Fingerprint], now: Timestamp, out: &mut Vec<bool>) {
        self.advance(now);
        loop {
            out.clear();
            let cur = self.current.load(Ordering::SeqCst);
            let live = live_slots(cur);
            out.reserve(fps.len());
            self.walk_hits(fps, |hits| out.push(hits & live != 0));
            fence(Ordering::Acquire);
            if self.current.load(Ordering::SeqCst) == cur {
                return;
            }
        }
    }

    /// [`GenerationalBloom::insert`] for many keys, keeping several cache
    /// misses in flight: each key's block is loaded 16 keys before its bits
    /// are set, so the locked `or` of one insert no longer waits for DRAM.
    pub fn insert_batch(&self, fps: &[Fingerprint], now: Timestamp) {
        self.advance(now);
        loop {
            let cur = self.current.load(Ordering::SeqCst);
            let slot = slot_of(cur);
            self.walk_prefetched(fps, |probe| {
                self.bloom.insert(probe, slot);
            });
            // A rotation during the walk may have cleared the slot: insert
            // again into the new one (setting bits twice is harmless).
            fence(Ordering::Acquire);
            if self.current.load(Ordering::SeqCst) == cur {
                return;
            }
        }
    }

    /// Calls `f` with the hits ([`BlockedBloom::hits`]) of each key in
    /// order, through [`GenerationalBloom::walk_prefetched`]; with AVX2
    /// when the CPU has it (checked once per batch).
    #[inline(always)]
    fn walk_hits(&self, fps: &[Fingerprint], mut f: impl FnMut(u8)) {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2.
            unsafe { self.walk_hits_avx2(fps, f) };
            return;
        }
        self.walk_prefetched(fps, |probe| f(self.bloom.hits(probe)));
    }

    /// [`GenerationalBloom::walk_hits`] compiled for AVX2 (the walk is
    /// inlined here, so its loop is built with the feature too).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    #[target_feature(enable = "avx2")]
    unsafe fn walk_hits_avx2(&self, fps: &[Fingerprint], f: impl FnMut(u8)) {
        // SAFETY (each arm): the caller checked for AVX2.
        unsafe { with_hash_count!(self.bloom.hashes(), self.walk_hits_avx2_k(fps, f)) }
    }

    /// The AVX2 walk for `K` hashes: [`GenerationalBloom::walk_prefetched_k`]
    /// four keys at a time — the probes of four keys [`BATCH_AHEAD`] ahead
    /// are built in one register ([`BlockedBloom::probes4_avx2`]) and
    /// prefetched, then four waiting keys are judged. (Filling a whole
    /// buffer of prefetches before judging any issued more misses than the
    /// core keeps in flight: 11 ns a query at n = 10⁶ against 5.)
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn walk_hits_avx2_k<const K: u32>(&self, fps: &[Fingerprint], mut f: impl FnMut(u8)) {
        const { assert!(BATCH_AHEAD % 4 == 0) };
        let mut ring = [Probe::default(); BATCH_AHEAD];
        // Four probes into `slots`, prefetched.
        let fill4 = |quad: &[Fingerprint], slots: &mut [Probe]| {
            let quad: &[Fingerprint; 4] = quad.try_into().expect("four keys");
            // SAFETY: the caller checked for AVX2.
            let probes = unsafe { self.bloom.probes4_avx2::<K>(quad) };
            for &p in &probes {
                self.bloom.prefetch(p);
            }
            slots.copy_from_slice(&probes);
        };
        // SAFETY (every `hits_avx2` below): the caller checked for AVX2;
        // the probes are the filter's own.
        let lead = fps.len().min(BATCH_AHEAD);
        let quads = lead / 4 * 4;
        for (quad, slots) in fps[..quads].chunks_exact(4).zip(ring.chunks_exact_mut(4)) {
            fill4(quad, slots);
        }
        for (&fp, slot) in fps[quads..lead].iter().zip(&mut ring[quads..lead]) {
            *slot = self.bloom.probe_k::<K>(fp);
            self.bloom.prefetch(*slot);
        }
        // Keys i..i+4 take the ring slots of keys i-64..i-60 once those are
        // judged (i is a multiple of 4, so the four slots are adjacent).
        let mut i = BATCH_AHEAD;
        while i + 4 <= fps.len() {
            let slots = &mut ring[i % BATCH_AHEAD..i % BATCH_AHEAD + 4];
            for &p in slots.iter() {
                f(unsafe { self.bloom.hits_avx2(p) });
            }
            fill4(&fps[i..i + 4], slots);
            i += 4;
        }
        for (j, &fp) in fps.iter().enumerate().skip(i) {
            let slot = &mut ring[j % BATCH_AHEAD];
            f(unsafe { self.bloom.hits_avx2(*slot) });
            *slot = self.bloom.probe_k::<K>(fp);
            self.bloom.prefetch(*slot);
        }
        // The last keys have nothing behind them.
        for j in fps.len().saturating_sub(BATCH_AHEAD)..fps.len() {
            f(unsafe { self.bloom.hits_avx2(ring[j % BATCH_AHEAD]) });
        }
    }

    /// Calls `f` with the probe of each key in order, its block prefetched
    /// [`BATCH_AHEAD`] keys earlier. The probes of the keys ahead wait in a
    /// ring on the stack (no allocation per batch), and the hash count is
    /// matched once per batch, not per key.
    #[inline(always)]
    fn walk_prefetched(&self, fps: &[Fingerprint], f: impl FnMut(Probe)) {
        with_hash_count!(self.bloom.hashes(), self.walk_prefetched_k(fps, f))
    }

    #[inline(always)]
    fn walk_prefetched_k<const K: u32>(&self, fps: &[Fingerprint], mut f: impl FnMut(Probe)) {
        let mut ring = [Probe::default(); BATCH_AHEAD];
        for (r, &fp) in ring.iter_mut().zip(fps) {
            *r = self.bloom.probe_k::<K>(fp);
            self.bloom.prefetch(*r);
        }
        // Key i's probe waits in ring[i % BATCH_AHEAD] until key i is
        // judged; then the key BATCH_AHEAD further takes its place. The last
        // BATCH_AHEAD keys have nothing behind them: a second loop, so the
        // first needs no bounds test.
        let behind = fps.len().saturating_sub(BATCH_AHEAD);
        for (i, &ahead) in fps.get(BATCH_AHEAD..).unwrap_or(&[]).iter().enumerate() {
            let slot = &mut ring[i % BATCH_AHEAD];
            let probe = *slot;
            *slot = self.bloom.probe_k::<K>(ahead);
            self.bloom.prefetch(*slot);
            f(probe);
        }
        for i in behind..fps.len() {
            f(ring[i % BATCH_AHEAD]);
        }
    }

    /// The slice now filling (`None` before the first call with a time).
    #[must_use]
    pub fn current_slice(&self) -> Option<u64> {
        let cur = self.current.load(Ordering::SeqCst);
        (cur != NOT_STARTED).then_some(cur)
    }

    /// The duration of one slice (one generation's span of time).
    #[must_use]
    pub fn slice_duration(&self) -> Duration {
        Duration::from_nanos(self.slicing.slice_nanos)
    }

    /// Bytes of filter memory.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bloom.bytes()
    }

    /// Fill and estimated false-positive rate of each generation slot,
    /// sampled from up to 4096 blocks.
    #[must_use]
    pub fn occupancy(&self) -> [SlotOccupancy; GENERATIONS] {
        self.bloom.occupancies(4096)
    }

    /// The estimated false-positive rate of a query now: the chance that a
    /// never-inserted key matches some live generation.
    #[must_use]
    pub fn estimated_fpr(&self) -> f64 {
        self.estimated_fpr_of(&self.occupancy())
    }

    /// [`GenerationalBloom::estimated_fpr`] from an [`occupancy`](Self::occupancy)
    /// the caller already sampled.
    pub(crate) fn estimated_fpr_of(&self, occupancy: &[SlotOccupancy; GENERATIONS]) -> f64 {
        let Some(cur) = self.current_slice() else {
            return 0.0;
        };
        let live = live_slots(cur);
        let miss_all: f64 = occupancy
            .iter()
            .enumerate()
            .filter(|(slot, _)| live & (1 << slot) != 0)
            .map(|(_, o)| 1.0 - o.estimated_fpr)
            .product();
        1.0 - miss_all
    }

    // Exclusive-access path for engine shards, which hold the shard lock
    // across advance, query and insert: no rotation can overlap, so the
    // validation loop is not needed.

    pub(crate) fn bloom(&self) -> &BlockedBloom {
        &self.bloom
    }

    pub(crate) fn slicing(&self) -> Slicing {
        self.slicing
    }

    /// The current slice, or 0 before the first advance.
    pub(crate) fn current_or_zero(&self) -> u64 {
        self.current_slice().unwrap_or(0)
    }

    pub(crate) fn restore_current(&self, current: Option<u64>) {
        self.current
            .store(current.unwrap_or(NOT_STARTED), Ordering::SeqCst);
        let next = current.map_or(0, |c| {
            self.slicing.slice_start(c.saturating_add(1)).as_nanos()
        });
        self.next_slice_at.store(next, Ordering::Release);
    }
}

impl std::fmt::Debug for GenerationalBloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationalBloom")
            .field("blocks", &self.bloom.num_blocks())
            .field("hashes", &self.bloom.hashes())
            .field("slice", &self.slice_duration())
            .field("current", &self.current_slice())
            .finish_non_exhaustive()
    }
}

/// Blocks and probe count for one generation slot of `capacity` keys at a
/// per-generation rate of `overall / live_generations`, split over `parts`
/// filters (shards).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotSizing {
    pub(crate) num_blocks: usize,
    pub(crate) hashes: u32,
    pub(crate) bits_per_key: f64,
    pub(crate) generation_fpr: f64,
}

/// Largest filter accepted: 1 TiB.
const MAX_FILTER_BYTES: f64 = (1u64 << 40) as f64;

impl SlotSizing {
    pub(crate) fn new(capacity: u64, overall_fpr: f64, parts: usize) -> Result<Self, ConfigError> {
        Self::for_generation_rate(capacity, overall_fpr / 7.0, overall_fpr, parts)
    }

    pub(crate) fn for_generation_rate(
        capacity: u64,
        generation_fpr: f64,
        overall_fpr: f64,
        parts: usize,
    ) -> Result<Self, ConfigError> {
        if !(overall_fpr > 0.0 && overall_fpr < 1.0) {
            return Err(ConfigError::FalsePositiveRate(overall_fpr));
        }
        let shape =
            shape_for(generation_fpr).ok_or(ConfigError::FalsePositiveRateTooSmall(overall_fpr))?;
        let bits = capacity as f64 * shape.bits_per_key;
        let bytes = bits / 8.0 * GENERATIONS as f64;
        if bytes > MAX_FILTER_BYTES {
            return Err(ConfigError::FilterTooLarge {
                bytes: bytes as u64,
            });
        }
        let num_blocks = ((bits / 64.0 / parts as f64).ceil() as usize).max(1);
        Ok(SlotSizing {
            num_blocks,
            hashes: shape.hashes,
            bits_per_key: shape.bits_per_key,
            generation_fpr,
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::fingerprint::Namespace;

    fn fp(i: u64) -> Fingerprint {
        Namespace::default().fingerprint(&i.to_le_bytes())
    }

    #[test]
    fn keeps_keys_for_the_window_and_forgets_them_later() {
        let window = Duration::from_secs(60);
        // 6000 keys per window: 1000 per slice; insert half of that.
        let f = GenerationalBloom::new(window, 6_000, 0.01).unwrap();
        let t0 = Timestamp::from_secs(1_000_000);
        let new = (0..500)
            .filter(|&i| f.check_and_insert(fp(i), t0).is_definitely_new())
            .count();
        assert!(new >= 495, "{new}");
        let almost = t0.saturating_add(window - Duration::from_nanos(1));
        for i in 0..500 {
            assert!(f.contains(fp(i), almost), "lost key {i} inside the window");
        }
        // 7 slices later, the generation of t0 is cleared.
        let later = t0.saturating_add(f.slice_duration() * 7);
        assert!((0..500).filter(|&i| f.contains(fp(i), later)).count() == 0);
    }

    #[test]
    fn a_big_jump_clears_everything() {
        let f = GenerationalBloom::new(Duration::from_secs(6), 100, 0.01).unwrap();
        f.insert(fp(1), Timestamp::from_secs(10));
        assert_eq!(f.advance(Timestamp::from_secs(1_000)), u8::MAX);
        assert!(!f.contains(fp(1), Timestamp::from_secs(1_000)));
    }

    #[test]
    fn batch_matches_single_queries() {
        let f = GenerationalBloom::new(Duration::from_secs(60), 10_000, 0.01).unwrap();
        let t = Timestamp::from_secs(5);
        for i in (0..20_000).step_by(2) {
            f.insert(fp(i), t);
        }
        let keys: Vec<_> = (0..20_000).map(fp).collect();
        let mut out = Vec::new();
        f.contains_batch(&keys, t, &mut out);
        for (k, &hit) in keys.iter().zip(&out) {
            assert_eq!(hit, f.contains(*k, t));
        }
        assert!(out.iter().step_by(2).all(|&h| h));
    }

    /// Every word of the filter, block by block.
    fn words(f: &GenerationalBloom) -> Vec<u64> {
        let mut w = Vec::new();
        f.bloom().for_each_word(|x| w.push(x));
        w
    }

    #[test]
    fn batch_inserts_set_the_bits_single_inserts_set() {
        let window = Duration::from_secs(60);
        let single = GenerationalBloom::new(window, 5_000, 0.01).unwrap();
        let batched = GenerationalBloom::new(window, 5_000, 0.01).unwrap();
        // Batches shorter and longer than the prefetch distance, empty ones,
        // and time crossing slice boundaries between batches.
        let lengths = [0usize, 1, 7, 63, 64, 65, 127, 128, 129, 1000, 3];
        let mut next = 0u64;
        let mut t = Timestamp::from_secs(100);
        for round in 0..40 {
            let n = lengths[round % lengths.len()];
            let keys: Vec<_> = (next..next + n as u64).map(fp).collect();
            next += n as u64;
            // A batch moves time even when empty; so does `advance`.
            single.advance(t);
            for &k in &keys {
                single.insert(k, t);
            }
            batched.insert_batch(&keys, t);
            assert_eq!(single.current_slice(), batched.current_slice());
            assert_eq!(words(&single), words(&batched), "round {round}");
            t = t.saturating_add(Duration::from_secs(3));
        }
        assert!(words(&single).iter().any(|&w| w != 0));
    }

    #[test]
    fn short_batches_query_like_single_keys() {
        let f = GenerationalBloom::new(Duration::from_secs(60), 1_000, 0.01).unwrap();
        let t = Timestamp::from_secs(5);
        let keys: Vec<_> = (0..200).map(fp).collect();
        f.insert_batch(&keys[..20], t);
        let mut out = Vec::new();
        for n in [0usize, 1, 5, 63, 64, 65, 127, 128, 129, 200] {
            f.contains_batch(&keys[..n], t, &mut out);
            let single: Vec<bool> = keys[..n].iter().map(|&k| f.contains(k, t)).collect();
            assert_eq!(out, single, "batch of {n}");
        }
        assert!(out[..20].iter().all(|&h| h));
    }

    /// Every hash count (the false-positive target picks it), batch lengths
    /// around the walks' chunks of four and of [`BATCH_AHEAD`].
    #[test]
    fn batch_queries_match_single_keys_for_every_hash_count() {
        let t = Timestamp::from_secs(5);
        let keys: Vec<_> = (0..600).map(fp).collect();
        let mut counts = std::collections::BTreeSet::new();
        for fpr in [0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 5e-3, 3e-3, 2e-3, 1e-3] {
            let f = GenerationalBloom::new(Duration::from_secs(60), 400, fpr).unwrap();
            counts.insert(f.bloom.hashes());
            f.insert_batch(&keys[..300], t);
            let mut out = Vec::new();
            for n in [
                0usize, 1, 2, 3, 4, 5, 7, 63, 64, 65, 66, 67, 127, 128, 129, 131, 257, 600,
            ] {
                f.contains_batch(&keys[..n], t, &mut out);
                let single: Vec<bool> = keys[..n].iter().map(|&k| f.contains(k, t)).collect();
                assert_eq!(out, single, "batch of {n}, target {fpr}");
                assert!(out.iter().take(300).all(|&h| h), "a false negative");
            }
        }
        assert!(counts.len() >= 6, "hash counts covered: {counts:?}");
    }

    #[test]
    fn rejects_bad_configuration() {
        assert!(matches!(
            GenerationalBloom::new(Duration::ZERO, 10, 0.01),
            Err(ConfigError::ZeroWindow)
        ));
        assert!(GenerationalBloom::new(Duration::from_secs(1), 10, 1.5).is_err());
        assert!(GenerationalBloom::new(Duration::from_secs(1), 10, 0.0).is_err());
    }
}
