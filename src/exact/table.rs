//! `FingerprintTable`: an open-addressing table of (fingerprint, time), or
//! of fingerprints alone (an engine without first-seen times), that can be
//! prefetched.
//!
//! The exact tier never deletes single entries (a whole slot is dropped when
//! its slice expires), so the table is the simplest kind there is: linear
//! probing, no tombstones, growth by rehashing into half as many buckets
//! again. Any bucket count works (a key's home bucket is a multiply-high of
//! its hash, not a mask), so a table sized for its expected entries is not
//! rounded up to a power of two: at most 4/5 and, after a growth, at least
//! 8/15 of the buckets are used. What a
//! general-purpose map cannot offer is [`FingerprintTable::prefetch`]: the
//! batch path computes a key's bucket several keys ahead and starts loading
//! it, so the DRAM miss of a 10⁷-entry table overlaps other work.

use crate::fingerprint::Fingerprint;

/// Marks an empty timed bucket: times are stored plus one (saturating), so
/// a table is all-zero memory when new and can come straight from the OS.
const EMPTY: u64 = 0;

/// What a bucket holds: [`Timed`] (fingerprint and first-accepted time, the
/// default) or [`Untimed`] (the fingerprint alone, for engines built without
/// first-seen times). All-zero bytes are a free bucket for both.
pub(crate) trait Entry: Copy {
    /// A free bucket (all-zero bytes).
    const FREE: Self;
    /// Fingerprint 0 cannot be stored (it reads as free): the table keeps
    /// it in a flag instead.
    const ZERO_IN_FLAG: bool;
    fn is_free(&self) -> bool;
    /// The stored fingerprint's low and high words.
    fn words(&self) -> (u64, u64);
    /// A bucket holding `fp` accepted at `at` (an untimed bucket drops it).
    fn filled(fp: Fingerprint, at: u64) -> Self;

    #[inline(always)]
    fn holds(&self, low: u64, high: u64) -> bool {
        self.words() == (low, high)
    }

    /// The stored fingerprint, whole again.
    #[inline]
    fn fingerprint(&self) -> Fingerprint {
        let (low, high) = self.words();
        Fingerprint(u128::from(low) | (u128::from(high) << 64))
    }
}

/// 24 bytes: the fingerprint as two words (8-byte aligned, unlike `u128`)
/// and the first-accepted time plus one, `EMPTY` for a free bucket.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Timed {
    low: u64,
    high: u64,
    at: u64,
}

impl Timed {
    /// The stored time.
    #[inline]
    fn time(&self) -> u64 {
        self.at - 1
    }
}

impl Entry for Timed {
    const FREE: Self = Timed {
        low: 0,
        high: 0,
        at: EMPTY,
    };
    const ZERO_IN_FLAG: bool = false;

    #[inline(always)]
    fn is_free(&self) -> bool {
        self.at == EMPTY
    }

    #[inline(always)]
    fn words(&self) -> (u64, u64) {
        (self.low, self.high)
    }

    #[inline(always)]
    fn filled(fp: Fingerprint, at: u64) -> Self {
        Timed {
            low: fp.low(),
            high: fp.high(),
            at: encode(at),
        }
    }
}

/// 16 bytes: the fingerprint alone; both words zero is a free bucket (the
/// one fingerprint that reads so lives in [`FingerprintTable::zero`]).
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Untimed {
    low: u64,
    high: u64,
}

impl Entry for Untimed {
    const FREE: Self = Untimed { low: 0, high: 0 };
    const ZERO_IN_FLAG: bool = true;

    #[inline(always)]
    fn is_free(&self) -> bool {
        self.low | self.high == 0
    }

    #[inline(always)]
    fn words(&self) -> (u64, u64) {
        (self.low, self.high)
    }

    #[inline(always)]
    fn filled(fp: Fingerprint, _at: u64) -> Self {
        Untimed {
            low: fp.low(),
            high: fp.high(),
        }
    }
}

/// The stored form of a time (plus one; `u64::MAX`, 2554, saturates).
#[inline]
fn encode(at: u64) -> u64 {
    at.saturating_add(1)
}

/// What [`FingerprintTable::get_or_insert_within`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Within {
    /// Stored less than the window before: its time.
    Inside(u64),
    /// Stored a window or more before: replaced by the new time.
    Expired,
    /// Not stored: inserted.
    Absent,
}

/// Grow when more than 4/5 of the buckets would be used (linear probing
/// then inspects about 13 buckets to insert a new key, 3 to find one). An
/// untimed table (4 buckets per cache line) kept 7/8 in a trial: 8% less
/// memory for `dedup`'s workload, but 14% slower on all-distinct keys.
const MAX_LOAD_NUM: usize = 4;
const MAX_LOAD_DEN: usize = 5;

/// Fingerprint → first-accepted time ([`Timed`]), or a set of fingerprints
/// ([`Untimed`]), for one slot of one shard.
pub(crate) struct FingerprintTable<E: Entry = Timed> {
    buckets: crate::hugealloc::ZeroedArray<E>,
    len: usize,
    /// [`Untimed`] only: fingerprint 0 is stored (it cannot be in a
    /// bucket, where it reads as free).
    zero: bool,
}

impl<E: Entry> FingerprintTable<E> {
    /// An empty table that allocates nothing.
    pub(crate) fn new() -> Self {
        Self::with_buckets(0)
    }

    /// A table with room for `entries` before it grows.
    pub(crate) fn with_capacity(entries: usize) -> Self {
        Self::with_buckets(Self::buckets_for(entries))
    }

    /// [`FingerprintTable::with_capacity`], or `None` when the memory
    /// cannot be had (a count read from a file).
    pub(crate) fn try_with_capacity(entries: usize) -> Option<Self> {
        Some(FingerprintTable {
            // SAFETY: all-zero bytes are a free bucket (`Entry::FREE`).
            buckets: unsafe {
                crate::hugealloc::ZeroedArray::try_for_probing(Self::buckets_for(entries))?
            },
            len: 0,
            zero: false,
        })
    }

    /// Bytes of a table with room for `entries` (what
    /// [`FingerprintTable::with_capacity`] allocates).
    pub(crate) fn bytes_for(entries: usize) -> u64 {
        (Self::buckets_for(entries) as u64).saturating_mul(std::mem::size_of::<E>() as u64)
    }

    /// Buckets with room for `entries`.
    fn buckets_for(entries: usize) -> usize {
        entries
            .max(8)
            .div_ceil(MAX_LOAD_NUM)
            .saturating_mul(MAX_LOAD_DEN)
    }

    fn with_buckets(buckets: usize) -> Self {
        FingerprintTable {
            // SAFETY: all-zero bytes are a free bucket (`Entry::FREE`).
            // Every probe reads a bucket before filling it.
            buckets: unsafe { crate::hugealloc::ZeroedArray::for_probing(buckets) },
            len: 0,
            zero: false,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<E>()
    }

    /// Faults the buckets' pages in now (see
    /// [`crate::hugealloc::ZeroedArray::populate`]).
    pub(crate) fn populate(&mut self) {
        self.buckets.populate();
    }

    pub(crate) fn is_allocated(&self) -> bool {
        !self.buckets.is_empty()
    }

    /// The home bucket of `fp`: its high half scaled onto the buckets by a
    /// multiply-high (the low half's low bits are the shard number, equal
    /// for every key here). 0 for the empty table.
    #[inline]
    fn home(&self, fp: Fingerprint) -> usize {
        ((u128::from(fp.high()) * self.buckets.len() as u128) >> 64) as usize
    }

    /// The bucket after `i`, wrapping at the end.
    #[inline]
    fn next(&self, i: usize) -> usize {
        let j = i + 1;
        if j == self.buckets.len() {
            0
        } else {
            j
        }
    }

    /// Fingerprint 0 in an [`Untimed`] table: kept in a flag, not a bucket.
    #[inline(always)]
    fn in_flag(fp: Fingerprint) -> bool {
        E::ZERO_IN_FLAG && fp.0 == 0
    }

    /// Starts loading the home bucket of `fp` into cache, and the cache
    /// line after it: a 24-byte bucket may straddle two lines, and a probe
    /// that does not stop at home walks on into the next (at 70% load a
    /// miss reads about 5.7 buckets). One line: 17.9 M keys/s on 10⁷ keys
    /// with a window, one thread; two: 24.8 M; three: 22.8 M.
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint) {
        if self.buckets.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let ptr = std::ptr::from_ref(&self.buckets[self.home(fp)]).cast::<i8>();
            // SAFETY: prefetch is a hint and never faults; the first
            // pointer is in bounds, the second at most one line past it.
            unsafe {
                std::arch::x86_64::_mm_prefetch(ptr, std::arch::x86_64::_MM_HINT_T0);
                std::arch::x86_64::_mm_prefetch(
                    ptr.wrapping_add(64),
                    std::arch::x86_64::_MM_HINT_T0,
                );
            }
        }
    }

    /// The bucket holding `fp`, if any.
    #[inline]
    fn find(&self, fp: Fingerprint) -> Option<&E> {
        if self.buckets.is_empty() {
            return None;
        }
        let (low, high) = (fp.low(), fp.high());
        let mut i = self.home(fp);
        // Invariant: the table is never full, so the probe meets a free
        // bucket; no key lies past a free bucket from its home (removal
        // shifts the run back, see `remove_at`).
        loop {
            let b = &self.buckets[i];
            if b.is_free() {
                return None;
            }
            if b.holds(low, high) {
                return Some(b);
            }
            i = self.next(i);
        }
    }

    /// The bucket holding `fp` (`true`), or the free bucket where it
    /// belongs (`false`), once the table has room for one more entry.
    #[inline]
    fn find_or_free(&mut self, fp: Fingerprint) -> (usize, bool) {
        if self.is_full() {
            self.grow();
        }
        let (low, high) = (fp.low(), fp.high());
        let mut i = self.home(fp);
        loop {
            let b = &self.buckets[i];
            if b.is_free() {
                return (i, false);
            }
            if b.holds(low, high) {
                return (i, true);
            }
            i = self.next(i);
        }
    }

    /// Stores `fp` at `at` in the free bucket `i`.
    #[inline]
    fn fill(&mut self, i: usize, fp: Fingerprint, at: u64) {
        self.buckets[i] = E::filled(fp, at);
        self.len += 1;
    }

    /// True when the next new entry makes the table grow.
    pub(crate) fn is_full(&self) -> bool {
        (self.len + 1) * MAX_LOAD_DEN > self.buckets.len() * MAX_LOAD_NUM
    }

    /// Empties bucket `i` and moves later entries of its probe run back so
    /// every entry stays reachable from its home (backward-shift deletion).
    fn remove_at(&mut self, mut hole: usize) {
        let mut j = hole;
        loop {
            j = self.next(j);
            let b = self.buckets[j];
            if b.is_free() {
                break;
            }
            let home = self.home(b.fingerprint());
            // The entry at j may fill the hole unless its home lies
            // cyclically after the hole, up to j.
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = E::FREE;
        self.len -= 1;
    }

    /// Removes `fp`; true if it was stored.
    pub(crate) fn remove(&mut self, fp: Fingerprint) -> bool {
        if E::ZERO_IN_FLAG && Self::in_flag(fp) {
            let was = self.zero;
            if was {
                self.zero = false;
                self.len -= 1;
            }
            return was;
        }
        if self.buckets.is_empty() {
            return false;
        }
        let (low, high) = (fp.low(), fp.high());
        let mut i = self.home(fp);
        loop {
            let b = &self.buckets[i];
            if b.is_free() {
                return false;
            }
            if b.holds(low, high) {
                self.remove_at(i);
                return true;
            }
            i = self.next(i);
        }
    }

    /// Empties the table, keeping its buckets.
    pub(crate) fn clear(&mut self) {
        if self.len > 0 {
            self.buckets.fill(E::FREE);
            self.len = 0;
            self.zero = false;
        }
    }

    /// Grows the buckets by half (a burst that doubles a slot's keys costs
    /// two growths; doubling would leave a table a quarter full) and
    /// re-inserts every entry.
    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let buckets = (self.buckets.len() + self.buckets.len() / 2).max(10);
        let mut bigger = Self::with_buckets(buckets);
        for b in self.buckets.iter().filter(|b| !b.is_free()) {
            // Copy the bucket as it is (a stored time is already encoded).
            let mut i = bigger.home(b.fingerprint());
            while !bigger.buckets[i].is_free() {
                i = bigger.next(i);
            }
            bigger.buckets[i] = *b;
        }
        bigger.len = self.len;
        bigger.zero = self.zero;
        *self = bigger;
    }
}

impl FingerprintTable<Timed> {
    /// The time stored for `fp`.
    #[inline]
    pub(crate) fn get(&self, fp: Fingerprint) -> Option<u64> {
        self.find(fp).map(Timed::time)
    }

    /// Stores `at` for `fp`, replacing an earlier time.
    #[inline]
    pub(crate) fn insert(&mut self, fp: Fingerprint, at: u64) {
        match self.find_or_free(fp) {
            (i, true) => self.buckets[i].at = encode(at),
            (i, false) => self.fill(i, fp, at),
        }
    }

    /// Stores `at` for `fp` unless a later time is stored already (the
    /// newest acceptance counts). One probe sequence.
    #[inline]
    pub(crate) fn insert_newest(&mut self, fp: Fingerprint, at: u64) {
        match self.find_or_free(fp) {
            (i, true) => {
                if self.buckets[i].time() < at {
                    self.buckets[i].at = encode(at);
                }
            }
            (i, false) => self.fill(i, fp, at),
        }
    }

    /// The time stored for `fp`; when there is none, stores `at` and
    /// answers `None`. One probe sequence does both (a [`Self::get`] and then
    /// an [`Self::insert`] would walk it twice).
    #[inline]
    pub(crate) fn get_or_insert(&mut self, fp: Fingerprint, at: u64) -> Option<u64> {
        match self.find_or_free(fp) {
            (i, true) => Some(self.buckets[i].time()),
            (i, false) => {
                self.fill(i, fp, at);
                None
            }
        }
    }

    /// The time stored for `fp` if it is less than `window` before `at`
    /// ([`Within::Inside`]; a time after `at`, an out-of-order repeat, is
    /// inside too). Otherwise `at` is stored as its time: [`Within::Expired`]
    /// when an older time was replaced, [`Within::Absent`] when the key was
    /// not in the table. One probe sequence.
    #[inline]
    pub(crate) fn get_or_insert_within(&mut self, fp: Fingerprint, at: u64, window: u64) -> Within {
        match self.find_or_free(fp) {
            (i, true) => {
                let first = self.buckets[i].time();
                // at − first < window; an out-of-order `at` (before
                // `first`) is inside.
                if at.saturating_sub(first) < window {
                    Within::Inside(first)
                } else {
                    self.buckets[i].at = encode(at);
                    Within::Expired
                }
            }
            (i, false) => {
                self.fill(i, fp, at);
                Within::Absent
            }
        }
    }

    /// One step of a sweep: looks at the buckets from `cursor` on, up to
    /// `budget` of them, and removes every entry whose time is at or before
    /// `horizon`. Returns where to resume (`None`: the sweep reached the
    /// last bucket) and the earliest time among the entries it kept.
    ///
    /// Removal shifts later entries of the probe run back into the hole
    /// (no tombstones), so the bucket at the cursor is looked at again
    /// after a removal. An entry that wraps from the table's start into a
    /// hole near its end is looked at again too; entries never move below
    /// the cursor, so one sweep from 0 to the end sees every entry present
    /// throughout it — unless the table grows in between (entries move):
    /// the caller then starts again from 0.
    pub(crate) fn sweep(
        &mut self,
        cursor: usize,
        budget: usize,
        horizon: u64,
    ) -> (Option<usize>, u64) {
        let n = self.buckets.len();
        let end = cursor.saturating_add(budget).min(n);
        let mut i = cursor;
        let mut earliest = u64::MAX;
        while i < end {
            let b = self.buckets[i];
            if !b.is_free() {
                if b.time() <= horizon {
                    self.remove_at(i);
                    continue;
                }
                earliest = earliest.min(b.time());
            }
            i += 1;
        }
        ((end < n).then_some(end), earliest)
    }

    /// Every entry as (fingerprint, time).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Fingerprint, u64)> + '_ {
        self.buckets
            .iter()
            .filter(|b| !b.is_free())
            .map(|b| (b.fingerprint(), b.time()))
    }
}

impl FingerprintTable<Untimed> {
    /// True when `fp` is stored.
    pub(crate) fn contains(&self, fp: Fingerprint) -> bool {
        if Self::in_flag(fp) {
            return self.zero;
        }
        self.find(fp).is_some()
    }

    /// True when `fp` was stored already; otherwise stores it and answers
    /// false. One probe sequence.
    #[inline]
    pub(crate) fn contains_or_insert(&mut self, fp: Fingerprint) -> bool {
        if Self::in_flag(fp) {
            let was = self.zero;
            if !was {
                self.zero = true;
                self.len += 1;
            }
            return was;
        }
        match self.find_or_free(fp) {
            (_, true) => true,
            (i, false) => {
                self.fill(i, fp, 0);
                false
            }
        }
    }

    /// Every stored fingerprint.
    pub(crate) fn fingerprints(&self) -> impl Iterator<Item = Fingerprint> + '_ {
        self.zero.then_some(Fingerprint(0)).into_iter().chain(
            self.buckets
                .iter()
                .filter(|b| !b.is_free())
                .map(Untimed::fingerprint),
        )
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `steps` fingerprints drawn from `space` keys (seeded LCG); keys that
    /// are multiples of `clustered` share their top bits: long probe runs.
    fn stream(seed: u64, steps: u64, space: u64, clustered: u64) -> Vec<Fingerprint> {
        let ns = crate::fingerprint::Namespace::default();
        let mut x = seed;
        (0..steps)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let k = (x >> 33) % space;
                if k % clustered == 0 {
                    Fingerprint(u128::from(k) | 0xABCD << 112)
                } else {
                    ns.fingerprint(&k.to_le_bytes())
                }
            })
            .collect()
    }

    #[test]
    fn matches_a_hashmap_through_growth() {
        let mut table = FingerprintTable::new();
        let mut reference = HashMap::new();
        for (i, fp) in (0u64..).zip(stream(1, 200_000, 50_000, 10)) {
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
    fn get_or_insert_matches_a_hashmap_through_growth() {
        let mut table = FingerprintTable::with_capacity(100);
        let mut reference = HashMap::new();
        for (i, fp) in (0u64..).zip(stream(7, 100_000, 30_000, 8)) {
            let expected = reference.get(&fp).copied();
            reference.entry(fp).or_insert(i);
            assert_eq!(table.get_or_insert(fp, i), expected, "step {i}");
        }
        assert_eq!(table.len(), reference.len());
        for (fp, at) in table.iter() {
            assert_eq!(reference[&fp], at);
        }
    }

    /// Windowed checks and sweeps against a map of key → time: between
    /// sweep steps of random budgets (clustered keys make long runs, so
    /// removals shift entries, some across the table's end), every answer
    /// matches the map with expiry by time; after each complete sweep the
    /// table holds exactly the entries newer than its horizon.
    #[test]
    fn windowed_checks_and_sweeps_match_a_hashmap() {
        const WINDOW: u64 = 1_000;
        let mut table = FingerprintTable::with_capacity(64);
        let mut reference: HashMap<Fingerprint, u64> = HashMap::new();
        let keys = stream(11, 400_000, 5_000, 7);
        let mut sweep: Option<(usize, u64)> = None;
        let mut budget_rng = 12345u64;
        let mut completed = 0;
        for (step, fp) in keys.into_iter().enumerate() {
            let now = step as u64 / 4;
            let expected = match reference.get(&fp) {
                Some(&t0) if now < t0 + WINDOW => Within::Inside(t0),
                Some(_) => Within::Expired,
                None => Within::Absent,
            };
            if !matches!(expected, Within::Inside(_)) {
                reference.insert(fp, now);
            }
            // An expired entry the sweep removed already answers `Absent`:
            // either way the key is accepted anew.
            let got = table.get_or_insert_within(fp, now, WINDOW);
            match (got, expected) {
                (Within::Expired, Within::Absent) => panic!("step {step}: {got:?}"),
                (Within::Absent, Within::Expired) => {}
                _ => assert_eq!(got, expected, "step {step}"),
            }
            // A sweep's horizon is behind every time inserted while it runs.
            if step % 50 == 0 && (sweep.is_some() || now > WINDOW) {
                budget_rng = budget_rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let budget = 1 + (budget_rng >> 40) as usize % 300;
                let (cursor, horizon) = sweep.unwrap_or((0, now - WINDOW - 1));
                match table.sweep(cursor, budget, horizon) {
                    (Some(next), _) => sweep = Some((next, horizon)),
                    (None, _) => {
                        sweep = None;
                        completed += 1;
                        // Entries at or before the horizon are gone; the
                        // reference drops them too (they are expired).
                        reference.retain(|_, t| *t > horizon);
                        assert_eq!(table.len(), reference.len(), "step {step}");
                        for (fp, at) in table.iter() {
                            assert_eq!(reference.get(&fp), Some(&at));
                        }
                    }
                }
            }
        }
        assert!(completed > 20, "{completed} sweeps completed");
    }

    /// A removal in a run that wraps past the last bucket moves the entries
    /// from the table's start back into the hole at its end.
    #[test]
    fn removal_shifts_a_run_across_the_end() {
        let mut table = FingerprintTable::with_buckets(10);
        // Fingerprints whose home is the last bucket: high half near 2⁶⁴.
        let at_end = |i: u64| Fingerprint(u128::from(i) | (u128::from(u64::MAX - i) << 64));
        for i in 0..4 {
            table.insert(at_end(i), 10 + i);
        }
        // Buckets 9, 0, 1, 2 hold the run; remove the first (time 10).
        assert_eq!(table.sweep(0, 10, 10), (None, 11));
        assert_eq!(table.len(), 3);
        for i in 1..4 {
            assert_eq!(table.get(at_end(i)), Some(10 + i));
        }
        assert_eq!(table.get(at_end(0)), None);
    }

    #[test]
    fn sized_for_its_entries_and_grows_by_half() {
        let mut table = FingerprintTable::with_capacity(1000);
        let start = table.bytes();
        assert_eq!(start, 1250 * std::mem::size_of::<Timed>());
        let ns = crate::fingerprint::Namespace::default();
        let mut i = 0u64;
        while table.bytes() == start {
            table.insert(ns.fingerprint(&i.to_le_bytes()), i);
            i += 1;
        }
        assert_eq!(i, 1001, "room for exactly the entries asked for");
        assert_eq!(table.bytes(), start / 2 * 3);
        for j in 0..i {
            assert_eq!(table.get(ns.fingerprint(&j.to_le_bytes())), Some(j));
        }
    }

    /// The untimed table against a `HashSet`, through growth, with
    /// fingerprint 0 (which reads as a free bucket) among the keys.
    #[test]
    fn untimed_table_matches_a_hashset_through_growth() {
        let mut table = FingerprintTable::<Untimed>::with_capacity(100);
        let mut reference = std::collections::HashSet::new();
        let keys = stream(3, 150_000, 40_000, 9);
        for (i, fp) in keys.into_iter().enumerate() {
            let fp = if i % 997 == 0 { Fingerprint(0) } else { fp };
            assert_eq!(table.contains(fp), reference.contains(&fp), "step {i}");
            assert_eq!(
                table.contains_or_insert(fp),
                !reference.insert(fp),
                "step {i}"
            );
        }
        assert_eq!(table.len(), reference.len());
        let stored: std::collections::HashSet<_> = table.fingerprints().collect();
        assert_eq!(stored, reference);
        assert_eq!(table.fingerprints().count(), reference.len());
        assert!(
            table.bytes() < reference.len() * 16 * 2,
            "{}",
            table.bytes()
        );
    }

    #[test]
    fn an_untimed_bucket_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Untimed>(), 16);
        assert_eq!(std::mem::size_of::<Timed>(), 24);
    }

    #[test]
    fn empty_table_answers_none() {
        let table = FingerprintTable::new();
        assert_eq!(table.get(Fingerprint(7)), None);
        table.prefetch(Fingerprint(7));
    }
}
