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
use crate::fingerprint::{Fingerprint, FingerprintMap};
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

/// The live leases of one shard.
#[derive(Default)]
pub(crate) struct LeaseBook {
    held: FingerprintMap<Held>,
}

impl LeaseBook {
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    #[inline]
    pub(crate) fn get(&self, fp: Fingerprint) -> Option<&Held> {
        self.held.get(&fp)
    }

    pub(crate) fn get_mut(&mut self, fp: Fingerprint) -> Option<&mut Held> {
        self.held.get_mut(&fp)
    }

    pub(crate) fn insert(&mut self, fp: Fingerprint, held: Held) {
        self.held.insert(fp, held);
    }

    pub(crate) fn remove(&mut self, fp: Fingerprint) -> Option<Held> {
        self.held.remove(&fp)
    }

    /// Drops the leases expired at lease-clock time `now`; how many.
    pub(crate) fn drop_expired(&mut self, now: u64) -> u64 {
        let before = self.held.len();
        self.held.retain(|_, h| now < h.until);
        (before - self.held.len()) as u64
    }

    /// Every lease as `(fingerprint, held)`, for snapshots.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Fingerprint, &Held)> + '_ {
        self.held.iter().map(|(fp, h)| (*fp, h))
    }

    /// Bytes of memory used.
    pub(crate) fn bytes(&self) -> usize {
        self.held.capacity() * (16 + std::mem::size_of::<Held>() + 1)
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
