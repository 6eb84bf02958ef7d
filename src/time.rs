//! Time: timestamps, the clocks an engine can run on, and how a window is cut
//! into the slices that the tiers expire one at a time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A point in time: nanoseconds since the Unix epoch (good until 2554).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const ZERO: Timestamp = Timestamp(0);

    /// `nanos` nanoseconds after the epoch.
    #[must_use]
    pub const fn from_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// `millis` milliseconds after the epoch (saturating).
    #[must_use]
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis.saturating_mul(1_000_000))
    }

    /// `secs` seconds after the epoch (saturating).
    #[must_use]
    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the epoch.
    #[must_use]
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// The wall-clock time now.
    #[must_use]
    pub fn now() -> Self {
        Timestamp::from_system_time(SystemTime::now())
    }

    /// A `SystemTime` as a timestamp (times before the epoch become the epoch).
    #[must_use]
    pub fn from_system_time(time: SystemTime) -> Self {
        let nanos = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Timestamp(nanos)
    }

    /// This timestamp plus `d`, saturating at the end of time.
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_nanos(d)))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    #[must_use]
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// A duration in whole nanoseconds, saturating at `u64::MAX`.
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Where an engine's notion of "now" comes from.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// Processing time: the system's monotonic clock, anchored to wall-clock
    /// time when the engine is built. Never goes backwards, so no check is
    /// ever late.
    #[default]
    System,
    /// Processing time read from a [`ManualClock`] the caller moves (tests,
    /// simulations).
    Manual(ManualClock),
    /// Event time: the caller passes a timestamp with every key
    /// ([`crate::Deduper::check_at`]); "now" is the highest timestamp seen so far
    /// (the watermark), and an event more than the allowed lateness behind it
    /// is [`crate::Verdict::Late`]. A plain [`crate::Deduper::check`] uses the
    /// watermark as its time.
    EventTime,
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `start`.
    #[must_use]
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            nanos: Arc::new(AtomicU64::new(start.as_nanos())),
        }
    }

    /// The clock's time.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::Acquire))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.nanos.fetch_add(duration_nanos(d), Ordering::AcqRel);
    }

    /// Sets the clock to `t` (it may go backwards; the engine never does).
    pub fn set(&self, t: Timestamp) {
        self.nanos.store(t.as_nanos(), Ordering::Release);
    }
}

/// The clock as the engine reads it: the wall-clock anchor is taken once, so
/// a reading costs one monotonic clock read.
#[derive(Debug)]
pub(crate) enum ClockSource {
    System { wall_anchor: u64, anchor: Instant },
    Manual(ManualClock),
    EventTime,
}

impl ClockSource {
    pub(crate) fn new(clock: &Clock) -> Self {
        match clock {
            Clock::System => ClockSource::System {
                wall_anchor: Timestamp::now().as_nanos(),
                anchor: Instant::now(),
            },
            Clock::Manual(m) => ClockSource::Manual(m.clone()),
            Clock::EventTime => ClockSource::EventTime,
        }
    }

    /// True under event time (no reading: [`ClockSource::read`] is `None`).
    #[inline]
    pub(crate) fn is_event_time(&self) -> bool {
        matches!(self, ClockSource::EventTime)
    }

    /// The processing time now, or `None` under event time.
    #[inline]
    pub(crate) fn read(&self) -> Option<Timestamp> {
        match self {
            ClockSource::System {
                wall_anchor,
                anchor,
            } => Some(Timestamp(
                wall_anchor.saturating_add(duration_nanos(anchor.elapsed())),
            )),
            ClockSource::Manual(m) => Some(m.now()),
            ClockSource::EventTime => None,
        }
    }
}

/// Number of generation slots in every filter block and exact-tier ring.
pub const GENERATIONS: usize = 8;

/// Number of slices one retention span is cut into. Two more slots exist:
/// the slice now filling, and a spare that is cleared one slice ahead of use.
pub const SLICES_PER_SPAN: u64 = (GENERATIONS as u64) - 2;

/// How a window is cut into slices.
///
/// Slice `s` covers times `[s·d, (s+1)·d)` and lives in slot `s % 8`. When
/// slice `c` begins, slot `(c+1) % 8` (slice `c−7`) is cleared: every key in
/// it is at least `6·d ≥ window + lateness` old, so nothing inside the window
/// is ever forgotten, and slices `c−6 ..= c` stay queryable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Slicing {
    /// Length of one slice in nanoseconds, at least 1.
    pub(crate) slice_nanos: u64,
}

impl Slicing {
    /// The slicing that keeps every key for at least `span` nanoseconds.
    pub(crate) fn for_span(span: u64) -> Self {
        Slicing {
            slice_nanos: span.div_ceil(SLICES_PER_SPAN).max(1),
        }
    }

    /// The slice a time falls in.
    #[inline]
    pub(crate) fn slice_of(self, t: Timestamp) -> u64 {
        t.as_nanos() / self.slice_nanos
    }

    /// The start of slice `s` (saturating).
    pub(crate) fn slice_start(self, s: u64) -> Timestamp {
        Timestamp(s.saturating_mul(self.slice_nanos))
    }
}

/// The slot a slice lives in.
#[inline]
pub(crate) fn slot_of(slice: u64) -> usize {
    (slice % GENERATIONS as u64) as usize
}

/// The slot of the newest slice among the slots in `slots`, counting back
/// from `current` (the current slice is the newest): `None` for no slot.
#[inline]
pub(crate) fn newest_slot(slots: u8, current: u64) -> Option<usize> {
    if slots == 0 {
        return None;
    }
    // Rotate so that the current slot is bit 7 and older slots follow it
    // downwards: the newest slot in `slots` is then the highest set bit.
    let cur = slot_of(current);
    let rotated = slots.rotate_left((GENERATIONS - 1 - cur) as u32);
    let back = rotated.leading_zeros() as usize;
    Some((cur + GENERATIONS - back) % GENERATIONS)
}

/// Bit mask of the slots of the slices `current−6 ..= current` (the live ones).
#[inline]
pub(crate) fn live_slots(current: u64) -> u8 {
    // Every slot except the spare that follows the current one.
    !(1u8 << slot_of(current.wrapping_add(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_slot_counts_back_from_the_current_slice() {
        for current in 0..3 * GENERATIONS as u64 {
            for slots in 0..=u8::MAX {
                let expected = (0..GENERATIONS as u64)
                    .map(|back| slot_of(current.wrapping_sub(back)))
                    .find(|&slot| slots & (1 << slot) != 0);
                assert_eq!(
                    newest_slot(slots, current),
                    expected,
                    "{current} {slots:08b}"
                );
            }
        }
    }

    #[test]
    fn slicing_covers_the_span() {
        for span in [1u64, 5, 6, 7, 1_000, 999_999_937] {
            let s = Slicing::for_span(span);
            assert!(s.slice_nanos * SLICES_PER_SPAN >= span);
        }
    }

    #[test]
    fn live_slots_exclude_the_spare() {
        assert_eq!(live_slots(0), 0b1111_1101);
        assert_eq!(live_slots(7), 0b1111_1110);
        assert_eq!(live_slots(6).count_ones(), 7);
    }

    #[test]
    fn manual_clock_is_shared() {
        let a = ManualClock::new(Timestamp::from_secs(10));
        let b = a.clone();
        b.advance(Duration::from_secs(5));
        assert_eq!(a.now(), Timestamp::from_secs(15));
    }
}
