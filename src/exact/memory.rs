//! `MemoryPartition`: one prefetchable open-addressing table per generation
//! slot.

use crate::claims::PayloadFingerprint;
use crate::error::ExactTierError;
use crate::fingerprint::Fingerprint;
use crate::time::{Timestamp, GENERATIONS};

use super::bodies::{BodyStore, RecordBody};
use super::table::{FingerprintTable, Untimed, Within};
use super::{ExactPartition, Mark};

/// Most entries a slot's first table is sized for (seven times that for
/// one table per shard): a generous estimate does not allocate a huge idle
/// table; more keys grow it.
pub(crate) const FIRST_TABLE_ENTRIES: usize = 1 << 20;

/// The embedded exact tier of one shard: one open-addressing table per
/// generation slot, owned by the shard (no locks, no atomics), 24 bytes per
/// entry (16 in an engine without first-seen times).
pub struct MemoryPartition {
    slots: [FingerprintTable; GENERATIONS],
    /// Set for an engine without first-seen times (no window, no filter):
    /// every entry is a fingerprint alone, 16 bytes, in this table instead
    /// of the slots.
    untimed: Option<FingerprintTable<Untimed>>,
    /// No window: every entry lives in slot 0.
    one_slot: bool,
    expected_per_slot: usize,
    /// Set when the shard keeps no filter but has a window: every entry
    /// lives in slot 0's table with its time, and expired entries are
    /// swept out a step at a time.
    expiry: Option<Expiry>,
    /// Payloads and results of committed claims, by the slot of their
    /// record (one-table mode: the slot of the slice they were accepted
    /// in), dropped with it.
    bodies: BodyStore,
}

/// The window of a one-table partition and the state of its sweep.
#[derive(Clone, Copy, Debug)]
struct Expiry {
    window: u64,
    /// Window plus lateness: an entry older than this behind the shard's
    /// time can match no event any more (later events are at most the
    /// lateness behind the watermark).
    span: u64,
    /// A sixth of the span (the slices of a filtered engine): time passes
    /// in these steps, and a sweep may start at each step.
    slice_nanos: u64,
    /// Start of the next slice (0: no time seen yet).
    next_slice_at: u64,
    /// No entry is older than this (a bound: lowered by every insert,
    /// raised by a complete sweep).
    earliest: u64,
    /// A sweep should start at the next [`MemoryPartition::sweep_step`].
    sweep_due: bool,
    sweep: Option<Sweep>,
}

#[derive(Clone, Copy, Debug)]
struct Sweep {
    cursor: usize,
    /// Entries at or before this time are removed.
    horizon: u64,
    /// Earliest time kept so far, and inserted since the sweep began.
    earliest: u64,
    /// The table's size in bytes when the sweep began (a growth moves
    /// entries, so it restarts the sweep).
    table_bytes: usize,
}

impl MemoryPartition {
    /// An empty partition expecting about `per_slot` entries per slot (tables
    /// are allocated on first use, so idle slots cost nothing).
    #[must_use]
    pub fn with_capacity(per_slot: usize) -> Self {
        MemoryPartition {
            slots: std::array::from_fn(|_| FingerprintTable::new()),
            untimed: None,
            one_slot: false,
            expected_per_slot: per_slot,
            expiry: None,
            bodies: BodyStore::default(),
        }
    }

    /// Without a window: every entry lives in slot 0 (what
    /// [`ExactPartition::reserve`] sizes).
    pub(crate) fn keep_all_in_slot_zero(&mut self) {
        self.one_slot = true;
    }

    /// Keeps fingerprints alone, without their times (an engine built with
    /// `first_seen_times(false)`: no window, no filter in front).
    pub(crate) fn keep_fingerprints_only(&mut self) {
        debug_assert!(self.expiry.is_none() && self.len() == 0);
        self.untimed = Some(FingerprintTable::new());
    }

    /// Switches to one table for the whole window (the shard keeps no
    /// filter): entries expire by time, checked on every hit, and are
    /// removed by [`MemoryPartition::sweep_step`]. `expected` entries fit
    /// before the table grows.
    pub(crate) fn use_one_table(&mut self, window: u64, span: u64, expected: usize) {
        self.expected_per_slot = expected;
        // `body_slot` files each body by its record's time.
        self.bodies.file_by_time();
        self.expiry = Some(Expiry {
            window,
            span,
            slice_nanos: span.div_ceil(6).max(1),
            next_slice_at: 0,
            earliest: u64::MAX,
            sweep_due: false,
            sweep: None,
        });
    }

    /// Allocates now the table that the first key would (without a
    /// window, or one table for the window) and faults its pages in, so
    /// that no check pays for the memory's first touch. Slot tables (a
    /// filter in front) come and go with their slices and are left lazy.
    pub(crate) fn prefault(&mut self) {
        if let Some(set) = &mut self.untimed {
            if !set.is_allocated() {
                self.allocate_untimed();
            }
            if let Some(set) = &mut self.untimed {
                set.populate();
            }
        } else if self.one_slot || self.expiry.is_some() {
            if !self.slots[0].is_allocated() {
                self.allocate(0);
            }
            self.slots[0].populate();
        }
    }

    /// One-table mode: moves to shard time `now`. True when `now` entered
    /// a new slice (the shard counts a rotation); a sweep is then due if
    /// some entry may have expired.
    #[inline(always)]
    pub(crate) fn pass_time(&mut self, now: u64) -> bool {
        let Some(e) = &mut self.expiry else {
            return false;
        };
        if now < e.next_slice_at {
            return false;
        }
        let first = e.next_slice_at == 0;
        let previous = (e.next_slice_at / e.slice_nanos).checked_sub(1);
        let current = now / e.slice_nanos;
        e.next_slice_at = current.saturating_add(1).saturating_mul(e.slice_nanos);
        // Bodies live in the slot of the slice their record was accepted
        // in: entering slice `c` drops slot `(c+1) % 8` (slice `c − 7`,
        // older than six slices ≥ the span), for every slice entered.
        if !self.bodies.is_empty() {
            let from = previous
                .map_or(current, |p| p + 1)
                .max(current.saturating_sub(7));
            let mut clear = 0u8;
            for c in from..=current {
                clear |= 1 << crate::time::slot_of(c + 1);
            }
            self.bodies.clear_slots(clear);
        }
        // Before the first span has passed nothing can have expired (and a
        // saturated horizon of 0 would remove entries stamped 0).
        if now
            .checked_sub(e.span)
            .is_some_and(|horizon| horizon >= e.earliest)
        {
            e.sweep_due = true;
        }
        !first
    }

    /// Keeps `Expiry::earliest` and a running sweep's bound below `at`.
    #[inline(always)]
    fn note_insert(&mut self, at: u64) {
        if let Some(e) = &mut self.expiry {
            e.earliest = e.earliest.min(at);
            if let Some(s) = &mut e.sweep {
                s.earliest = s.earliest.min(at);
            }
        }
    }

    /// One-table mode: the time `fp` was accepted if that is less than the
    /// window before `at`; otherwise records `at` for it.
    #[inline(always)]
    pub(crate) fn check_within(&mut self, fp: Fingerprint, at: Timestamp) -> Within {
        let Some(Expiry { window, sweep, .. }) = &self.expiry else {
            unreachable!("check_within needs use_one_table");
        };
        let (window, sweeping) = (*window, sweep.is_some());
        if !self.slots[0].is_allocated() {
            self.allocate(0);
        }
        if sweeping && self.slots[0].is_full() {
            // Make room by finishing the sweep before growing.
            self.sweep_step(0, usize::MAX);
        }
        let at = at.as_nanos();
        let within = self.slots[0].get_or_insert_within(fp, at, window);
        if !matches!(within, Within::Inside(_)) {
            self.note_insert(at);
        }
        within
    }

    /// True while a sweep is running or due.
    #[inline(always)]
    pub(crate) fn wants_sweep(&self) -> bool {
        self.expiry
            .is_some_and(|e| e.sweep_due || e.sweep.is_some())
    }

    /// One-table mode: advances the sweep by up to `budget` buckets,
    /// starting one if [`MemoryPartition::pass_time`] made it due: it
    /// removes the entries at or before shard time `now` minus the span.
    pub(crate) fn sweep_step(&mut self, now: u64, budget: usize) {
        let Some(e) = &mut self.expiry else { return };
        let table = &mut self.slots[0];
        if e.sweep.is_none() {
            if !e.sweep_due || now < e.span {
                return;
            }
            e.sweep_due = false;
            e.sweep = Some(Sweep {
                cursor: 0,
                horizon: now - e.span,
                earliest: u64::MAX,
                table_bytes: 0,
            });
        }
        let s = e.sweep.as_mut().expect("a sweep is running");
        if s.table_bytes != table.bytes() {
            // Just started, or the table grew (entries moved): from the top.
            s.cursor = 0;
            s.table_bytes = table.bytes();
        }
        let (next, kept) = table.sweep(s.cursor, budget, s.horizon);
        s.earliest = s.earliest.min(kept);
        match next {
            Some(cursor) => s.cursor = cursor,
            None => {
                e.earliest = s.earliest;
                e.sweep = None;
                crate::trace::event!(debug, entries = table.len(), "exact-tier sweep done");
            }
        }
    }
}

impl MemoryPartition {
    /// A slot's table, sized up front for the keys expected in a slot (the
    /// engine asks for what the filter lets into a slot before it grows: its
    /// sizing and a quarter more, so about 64% of the buckets are used at
    /// the expected count), capped at 2²⁰ entries so a generous estimate
    /// does not allocate a huge idle table.
    /// Gives `slot` its table (once per slice).
    #[cold]
    #[inline(never)]
    fn allocate(&mut self, slot: usize) {
        self.slots[slot] = self.fresh_table();
    }

    /// Gives the untimed partition its table (once).
    #[cold]
    #[inline(never)]
    fn allocate_untimed(&mut self) {
        self.untimed = Some(FingerprintTable::with_capacity(self.table_capacity()));
    }

    fn fresh_table(&self) -> FingerprintTable {
        FingerprintTable::with_capacity(self.table_capacity())
    }

    /// Entries a new table has room for.
    fn table_capacity(&self) -> usize {
        // One table for a window stands for seven slots.
        let cap = if self.expiry.is_some() {
            7 * FIRST_TABLE_ENTRIES
        } else {
            FIRST_TABLE_ENTRIES
        };
        self.expected_per_slot.min(cap)
    }
}

impl MemoryPartition {
    /// Hands every entry to `f` as [`ExactPartition::entries`] lists them
    /// (untimed ones at slot 0 and time 0), [`ExactPartition::len`] of
    /// them, without collecting them: a snapshot of `dedup`'s 3.5·10⁶
    /// keys took 48 bytes per key more while it was written.
    pub(crate) fn try_for_each_entry<E>(
        &self,
        mut f: impl FnMut(usize, Fingerprint, Timestamp) -> Result<(), E>,
    ) -> Result<(), E> {
        if let Some(set) = &self.untimed {
            return set
                .fingerprints()
                .try_for_each(|fp| f(0, fp, Timestamp::ZERO));
        }
        for (slot, table) in self.slots.iter().enumerate() {
            table
                .iter()
                .try_for_each(|(fp, at)| f(slot, fp, Timestamp::from_nanos(at)))?;
        }
        Ok(())
    }
}

/// What [`MemoryPartition::first_seen_or_mark`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Accepted before, at this time.
    At(Timestamp),
    /// Accepted before; the partition keeps no times.
    Untimed,
    /// Not accepted before: recorded now.
    No,
}

impl MemoryPartition {
    /// Without a window (every entry in slot 0, or in the untimed table),
    /// the check and the mark in one probe: when `fp` was first accepted,
    /// or [`Seen::No`] after recording `at` as its first acceptance.
    #[inline(always)]
    pub(crate) fn first_seen_or_mark(&mut self, fp: Fingerprint, at: Timestamp) -> Seen {
        if self.untimed.as_ref().is_some_and(|set| !set.is_allocated()) {
            self.allocate_untimed();
        }
        if let Some(set) = &mut self.untimed {
            return if set.contains_or_insert(fp) {
                Seen::Untimed
            } else {
                Seen::No
            };
        }
        if !self.slots[0].is_allocated() {
            self.allocate(0);
        }
        match self.slots[0].get_or_insert(fp, at.as_nanos()) {
            Some(first) => Seen::At(Timestamp::from_nanos(first)),
            None => Seen::No,
        }
    }
}

impl MemoryPartition {
    /// Without a filter in front (one table, or no window): what is
    /// recorded for `fp`, without recording anything.
    #[inline]
    pub(crate) fn first_seen(&self, fp: Fingerprint) -> Seen {
        if let Some(set) = &self.untimed {
            return if set.contains(fp) {
                Seen::Untimed
            } else {
                Seen::No
            };
        }
        match self.slots[0].get(fp) {
            Some(at) => Seen::At(Timestamp::from_nanos(at)),
            None => Seen::No,
        }
    }

    /// Starts loading what a commit of `fp`, accepted at `at`, touches: its
    /// bucket of the one table (or slot 0's), and its body's index bucket.
    #[inline]
    pub(crate) fn prefetch_commit(&self, fp: Fingerprint, at: Timestamp) {
        self.slots[0].prefetch(fp);
        self.bodies.prefetch(self.body_slot(0, at), fp);
    }

    /// The slot a body of a record accepted at `at` in `slot` lives in:
    /// one-table mode files bodies by the slice of their acceptance.
    fn body_slot(&self, slot: usize, at: Timestamp) -> usize {
        match &self.expiry {
            Some(e) => crate::time::slot_of(at.as_nanos() / e.slice_nanos),
            None => slot,
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
        // An untimed partition sits behind no filter: nothing looks keys up
        // (`first_seen_or_mark` answers them; the builder refuses every
        // configuration that would). Its slots are empty: answering from
        // them would accept a repeat again.
        assert!(
            self.untimed.is_none(),
            "lookup in a partition without first-seen times"
        );
        Ok(self.slots[slot].get(fp).map(Timestamp::from_nanos))
    }

    #[inline(always)]
    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        if self.untimed.is_some() {
            // A restored state: the time is dropped.
            self.first_seen_or_mark(fp, at);
            return Ok(());
        }
        if self.expiry.is_some() {
            // One table (a restored state): the newest acceptance counts.
            if !self.slots[0].is_allocated() {
                self.allocate(0);
            }
            let at = at.as_nanos();
            self.slots[0].insert_newest(fp, at);
            self.note_insert(at);
            return Ok(());
        }
        if !self.slots[slot].is_allocated() {
            self.allocate(slot);
        }
        self.slots[slot].insert(fp, at.as_nanos());
        Ok(())
    }

    fn mark_batch(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        if self.expiry.is_some() || self.untimed.is_some() {
            for m in marks {
                self.mark(m.fingerprint, m.slot, m.at)?;
            }
            return Ok(());
        }
        // Allocate first, so prefetches hit the tables the inserts will use.
        for m in marks {
            if !self.slots[m.slot].is_allocated() {
                self.slots[m.slot] = self.fresh_table();
            }
        }
        const AHEAD: usize = 8;
        for m in marks.iter().take(AHEAD) {
            self.slots[m.slot].prefetch(m.fingerprint);
        }
        for (i, m) in marks.iter().enumerate() {
            if let Some(ahead) = marks.get(i + AHEAD) {
                self.slots[ahead.slot].prefetch(ahead.fingerprint);
            }
            self.slots[m.slot].insert(m.fingerprint, m.at.as_nanos());
        }
        Ok(())
    }

    #[inline]
    fn prefetch(&self, fp: Fingerprint, slot: usize) {
        match &self.untimed {
            Some(set) => set.prefetch(fp),
            None => self.slots[slot].prefetch(fp),
        }
    }

    fn put_body(
        &mut self,
        mark: &Mark,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
    ) -> Result<(), ExactTierError> {
        let slot = self.body_slot(mark.slot, mark.at);
        // One table stands for seven slices' slots; otherwise a slot's
        // table is sized for that slot's keys.
        let per_slot = match self.expiry {
            Some(_) => self.table_capacity() / 7,
            None => self.table_capacity(),
        };
        self.bodies.expect_per_slot(per_slot);
        let at = if self.untimed.is_some() {
            0
        } else {
            mark.at.as_nanos()
        };
        self.bodies.put(slot, mark.fingerprint, at, payload, result);
        Ok(())
    }

    fn body(
        &mut self,
        fp: Fingerprint,
        slot: usize,
        at: Timestamp,
    ) -> Result<Option<RecordBody>, ExactTierError> {
        if self.bodies.is_empty() {
            return Ok(None);
        }
        // An engine without times keeps a key's one record forever.
        let at_filter = self.untimed.is_none().then_some(at.as_nanos());
        Ok(self.bodies.get(self.body_slot(slot, at), fp, at_filter))
    }

    fn bodies_batch(
        &mut self,
        records: &[(Fingerprint, usize, Timestamp)],
        out: &mut Vec<Option<RecordBody>>,
    ) -> Result<(), ExactTierError> {
        // An engine without times keeps a key's one record forever.
        let timed = self.untimed.is_none();
        let wanted: Vec<(usize, Fingerprint, Option<u64>)> = records
            .iter()
            .map(|&(fp, slot, at)| (self.body_slot(slot, at), fp, timed.then_some(at.as_nanos())))
            .collect();
        self.bodies.get_batch(&wanted, out);
        Ok(())
    }

    fn bodies(&self) -> Vec<(usize, Fingerprint, Timestamp, RecordBody)> {
        self.bodies
            .iter()
            .map(|(slot, fp, at, body)| (slot, fp, Timestamp::from_nanos(at), body))
            .collect()
    }

    fn forget(&mut self, fp: Fingerprint) -> Result<bool, ExactTierError> {
        let mut found = self.bodies.remove(fp);
        if let Some(set) = &mut self.untimed {
            found |= set.remove(fp);
        }
        for table in &mut self.slots {
            found |= table.remove(fp);
        }
        Ok(found)
    }

    fn clear_slots(&mut self, slots: u8) {
        self.bodies.clear_slots(slots);
        for (g, table) in self.slots.iter_mut().enumerate() {
            if slots & (1 << g) != 0 {
                // Free the memory: one deallocation, no walk over entries.
                *table = FingerprintTable::new();
            }
        }
    }

    fn len(&self) -> u64 {
        let untimed = self.untimed.as_ref().map_or(0, FingerprintTable::len);
        self.slots.iter().map(FingerprintTable::len).sum::<usize>() as u64 + untimed as u64
    }

    fn bytes(&self) -> usize {
        let untimed = self.untimed.as_ref().map_or(0, FingerprintTable::bytes);
        self.slots
            .iter()
            .map(FingerprintTable::bytes)
            .sum::<usize>()
            + untimed
            + self.bodies.bytes()
    }

    fn keeps_times(&self) -> bool {
        self.untimed.is_none()
    }

    /// Sizes the one table of a partition without slots (no window, or one
    /// table for the window) for `entries`. A snapshot lists entries in
    /// bucket order, i.e. sorted by home bucket: marked into a table with
    /// fewer buckets than entries, their homes advance more slowly than
    /// the inserts and they pile into one probe run until the table grows
    /// (300 000 entries into a table sized for 100 000 took 10 s to
    /// restore). Slot tables (a filter in front) are left as they are.
    fn reserve(&mut self, entries: u64) {
        // The count comes from a file: a bound on what it may ask for, and
        // a table that cannot be had is only a hint not taken (the marks
        // grow the table, and a corrupt file is refused by the checksum).
        let entries = usize::try_from(entries.min(1 << 28)).unwrap_or(usize::MAX);
        let capacity = self.table_capacity().max(entries);
        if let Some(set) = &mut self.untimed {
            if set.len() == 0 {
                if let Some(table) = FingerprintTable::try_with_capacity(capacity) {
                    *set = table;
                }
            }
        } else if (self.one_slot || self.expiry.is_some()) && self.slots[0].len() == 0 {
            if let Some(table) = FingerprintTable::try_with_capacity(capacity) {
                self.slots[0] = table;
            }
        }
    }

    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        let mut out = Vec::with_capacity(self.len() as usize);
        self.try_for_each_entry(|slot, fp, at| {
            out.push((slot, fp, at));
            Ok::<(), ()>(())
        })
        .ok()?;
        Some(out)
    }
}
