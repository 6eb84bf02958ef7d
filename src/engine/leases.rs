//! `LeaseBook`: the live leases of one shard's owned keys, and the clock
//! leases are measured on.
//!
//! A held key lives here only, never in the exact tier: a release or an
//! expiry leaves nothing behind, and only a commit writes a record (with
//! the acquisition time as the window's anchor). The book holds the keys
//! being acted on right now, so it stays small; expired leases are dropped
//! when met and at every rotation.

use std::time::Instant;

use crate::claims::PayloadFingerprint;
use crate::fingerprint::Fingerprint;
use crate::time::{duration_nanos, Clock, ClockSource, ManualClock, Timestamp};

/// A key held by a live (or expired, not yet dropped) lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) token: u64,
    /// Engine time of the claim: the record's time once committed.
    pub(crate) acquired_at: u64,
    /// Lease-clock time the lease expires at.
    pub(crate) until: u64,
    pub(crate) payload: Option<PayloadFingerprint>,
}

/// The live leases of one shard: an open-addressing table (linear
/// probing from the fingerprint's high word, deletion by backward shift,
/// so no tombstones), one 64-byte slot per lease.
///
/// A claim asks it first and a commit or release removes from it, so its
/// three operations are on every claim's path: a general-purpose map took
/// about 80 instructions per insert and 35 per removal (callgrind), this
/// one a third of that. The book stays small (the keys being acted on
/// now): at most half full, grown by doubling, and rebuilt for what is
/// left (a quarter full) when a sweep drops expired leases.
#[derive(Default)]
pub(crate) struct LeaseBook {
    slots: Vec<Slot>,
    len: usize,
}

/// One slot of a [`LeaseBook`]: `full` false is a free slot.
#[derive(Clone, Copy)]
struct Slot {
    low: u64,
    high: u64,
    held: Held,
    full: bool,
}

const FREE: Slot = Slot {
    low: 0,
    high: 0,
    held: Held {
        token: 0,
        acquired_at: 0,
        until: 0,
        payload: None,
    },
    full: false,
};

/// Slots of a book's first allocation.
const FIRST_SLOTS: usize = 16;

impl LeaseBook {
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The home slot of `high` (the fingerprint's high word, a uniform
    /// hash) in a table of `slots` (a power of two).
    #[inline]
    fn home(high: u64, slots: usize) -> usize {
        (high as usize) & (slots - 1)
    }

    /// The slot holding `fp`, if any.
    #[inline]
    fn find(&self, fp: Fingerprint) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let (low, high) = (fp.low(), fp.high());
        let mask = self.slots.len() - 1;
        let mut i = Self::home(high, self.slots.len());
        loop {
            let slot = &self.slots[i];
            if !slot.full {
                return None;
            }
            if slot.low == low && slot.high == high {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    pub(crate) fn get(&self, fp: Fingerprint) -> Option<&Held> {
        self.find(fp).map(|i| &self.slots[i].held)
    }

    pub(crate) fn get_mut(&mut self, fp: Fingerprint) -> Option<&mut Held> {
        self.find(fp).map(|i| &mut self.slots[i].held)
    }

    /// Holds `fp` by `held` (replacing a lease it had).
    pub(crate) fn insert(&mut self, fp: Fingerprint, held: Held) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.resize((self.slots.len() * 2).max(FIRST_SLOTS));
        }
        let (low, high) = (fp.low(), fp.high());
        let mask = self.slots.len() - 1;
        let mut i = Self::home(high, self.slots.len());
        loop {
            let slot = &mut self.slots[i];
            if !slot.full {
                *slot = Slot {
                    low,
                    high,
                    held,
                    full: true,
                };
                self.len += 1;
                return;
            }
            if slot.low == low && slot.high == high {
                slot.held = held;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Removes `fp`'s lease; it, if there was one.
    pub(crate) fn remove(&mut self, fp: Fingerprint) -> Option<Held> {
        let i = self.find(fp)?;
        let held = self.slots[i].held;
        self.vacate(i);
        Some(held)
    }

    /// Frees slot `i`, moving back the slots after it that would no longer
    /// be found past the gap (backward shift), so probes never meet a
    /// tombstone.
    fn vacate(&mut self, mut gap: usize) {
        let mask = self.slots.len() - 1;
        let mut i = gap;
        loop {
            i = (i + 1) & mask;
            let (full, high) = (self.slots[i].full, self.slots[i].high);
            if !full {
                break;
            }
            // The slot may fill the gap unless its home lies cyclically in
            // (gap, i]: then the gap is before its home.
            let home = (high as usize) & mask;
            let between = if gap <= i {
                gap < home && home <= i
            } else {
                gap < home || home <= i
            };
            if !between {
                self.slots[gap] = self.slots[i];
                gap = i;
            }
        }
        self.slots[gap].full = false;
        self.len -= 1;
    }

    /// Rebuilds the table with `slots` slots (a power of two, more than
    /// twice the leases).
    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![FREE; slots]);
        self.len = 0;
        for slot in old.into_iter().filter(|s| s.full) {
            self.insert(Fingerprint::from_words(slot.low, slot.high), slot.held);
        }
    }

    /// Drops the leases expired at lease-clock time `now`; how many.
    pub(crate) fn drop_expired(&mut self, now: u64) -> u64 {
        let before = self.len;
        if before == 0 {
            return 0;
        }
        if self.slots.iter().all(|s| !s.full || now < s.held.until) {
            return 0;
        }
        let old = std::mem::take(&mut self.slots);
        let live: Vec<Slot> = old
            .into_iter()
            .filter(|s| s.full && now < s.held.until)
            .collect();
        self.len = 0;
        if !live.is_empty() {
            let slots = (live.len() * 4).next_power_of_two().max(FIRST_SLOTS);
            self.slots = vec![FREE; slots];
            for slot in live {
                self.insert(Fingerprint::from_words(slot.low, slot.high), slot.held);
            }
        }
        (before - self.len) as u64
    }

    /// Every lease as `(fingerprint, held)`, for snapshots.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Fingerprint, &Held)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.full)
            .map(|s| (Fingerprint::from_words(s.low, s.high), &s.held))
    }

    /// Bytes of memory used.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
    }
}

/// The clock leases are measured on: the engine's processing clock (the
/// system's monotonic clock anchored to wall-clock time, or the caller's
/// [`ManualClock`]); under event time, the system clock, since event
/// timestamps say nothing about how long a holder has been acting.
#[derive(Clone, Debug)]
pub(crate) enum LeaseClock {
    System { wall_anchor: u64, anchor: Instant },
    Manual(ManualClock),
}

impl LeaseClock {
    pub(crate) fn new(clock: &Clock) -> Self {
        match clock {
            Clock::Manual(m) => LeaseClock::Manual(m.clone()),
            Clock::System | Clock::EventTime => LeaseClock::System {
                wall_anchor: Timestamp::now().as_nanos(),
                anchor: Instant::now(),
            },
        }
    }

    /// The lease clock of an engine whose clock is `source`: for the
    /// system and manual clocks the same clock (one anchor), so that a
    /// reading of the engine's clock is a lease-clock reading too
    /// ([`LeaseClock::now_at`]); under event time, the system clock.
    pub(crate) fn for_source(source: &ClockSource) -> Self {
        match source {
            ClockSource::System {
                wall_anchor,
                anchor,
            } => LeaseClock::System {
                wall_anchor: *wall_anchor,
                anchor: *anchor,
            },
            ClockSource::Manual(m) => LeaseClock::Manual(m.clone()),
            ClockSource::EventTime => LeaseClock::new(&Clock::EventTime),
        }
    }

    /// Lease-clock nanoseconds at `reading`, a reading of the engine's
    /// clock just taken (no second clock read: on the system clock each
    /// costs about 50 ns on these machines, and a claim and its commit
    /// read it twice each); now when there is none (event time). Valid
    /// for a lease clock made by [`LeaseClock::for_source`] of that clock.
    #[inline]
    pub(crate) fn now_at(&self, reading: Option<Timestamp>) -> u64 {
        match reading {
            Some(r) => r.as_nanos(),
            None => self.now(),
        }
    }

    /// Lease-clock nanoseconds now.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        match self {
            LeaseClock::System {
                wall_anchor,
                anchor,
            } => wall_anchor.saturating_add(duration_nanos(anchor.elapsed())),
            LeaseClock::Manual(m) => m.now().as_nanos(),
        }
    }

    /// True for a caller's manual clock (time moves only when told, so a
    /// waiter must look again now and then rather than sleep to an expiry).
    pub(crate) fn is_manual(&self) -> bool {
        matches!(self, LeaseClock::Manual(_))
    }
}

/// The first fencing token a fresh shard issues: wall-clock nanoseconds, so
/// an engine restarted without its state still issues larger tokens than
/// the one before it (which would have had to issue more than one token per
/// nanosecond to catch up).
pub(crate) fn first_token() -> u64 {
    Timestamp::now().as_nanos().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random walk of inserts, removals, lookups, renewals and sweeps,
    /// checked against a `HashMap` after every step. Keys share a handful
    /// of high words (so they collide into long probe runs, which wrap
    /// around the table's end: the backward shift's hard cases), and the
    /// whole book is compared now and then.
    #[test]
    fn the_book_agrees_with_a_map_through_a_random_walk() {
        use std::collections::HashMap;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let highs = [
            0u64,
            1,
            2,
            15,
            16,
            31,
            u64::MAX,
            u64::MAX - 1,
            0x8000_0000_0000_0000,
        ];
        let mut book = LeaseBook::default();
        let mut model: HashMap<Fingerprint, Held> = HashMap::new();
        for step in 0..200_000u64 {
            let r = next();
            let key = (r >> 8) % 300;
            let high = highs[(key % highs.len() as u64) as usize];
            let fp = Fingerprint::from_words(key, high);
            match r % 8 {
                0..=2 => {
                    let held = Held {
                        token: step + 1,
                        acquired_at: step,
                        until: step + (r >> 40) % 5_000,
                        payload: (r & 16 != 0).then_some(PayloadFingerprint(r >> 32)),
                    };
                    book.insert(fp, held);
                    model.insert(fp, held);
                }
                3 | 4 => assert_eq!(book.remove(fp), model.remove(&fp), "remove at {step}"),
                5 => assert_eq!(book.get(fp), model.get(&fp), "get at {step}"),
                6 => {
                    if let (Some(b), Some(m)) = (book.get_mut(fp), model.get_mut(&fp)) {
                        b.until += 7;
                        m.until += 7;
                    } else {
                        assert_eq!(book.get(fp), model.get(&fp), "get_mut at {step}");
                    }
                }
                _ if r % 512 == 7 => {
                    let now = step.saturating_sub(2_000);
                    let before = model.len();
                    model.retain(|_, h| now < h.until);
                    assert_eq!(book.drop_expired(now), (before - model.len()) as u64);
                }
                _ => {}
            }
            assert_eq!(book.len(), model.len());
            if step % 997 == 0 {
                let mut all: Vec<(Fingerprint, Held)> =
                    book.iter().map(|(fp, h)| (fp, *h)).collect();
                all.sort_by_key(|(fp, _)| *fp);
                let mut want: Vec<(Fingerprint, Held)> =
                    model.iter().map(|(fp, h)| (*fp, *h)).collect();
                want.sort_by_key(|(fp, _)| *fp);
                assert_eq!(all, want, "whole book at {step}");
                for (fp, h) in &want {
                    assert_eq!(book.get(*fp), Some(h));
                }
            }
        }
    }

    #[test]
    fn expired_leases_are_dropped_and_counted() {
        let mut book = LeaseBook::default();
        for i in 0..10u64 {
            book.insert(
                Fingerprint(u128::from(i)),
                Held {
                    token: i,
                    acquired_at: 0,
                    until: i * 10,
                    payload: None,
                },
            );
        }
        assert_eq!(book.drop_expired(50), 6); // until 0..=50
        assert_eq!(book.len(), 4);
        assert!(book.get(Fingerprint(6)).is_some());
        assert!(book.get(Fingerprint(5)).is_none());
    }
}
