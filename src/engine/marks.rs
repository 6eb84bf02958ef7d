//! `MarkBatch`: marks of newly accepted keys waiting to be written to the
//! exact tier, with an index so that a shard reads its own writes.

use std::time::{Duration, Instant};

use crate::exact::table::FingerprintTable;
use crate::exact::Mark;
use crate::fingerprint::Fingerprint;
use crate::time::Timestamp;

/// Pending marks of one shard.
///
/// A shard that accepts a key queues its mark here; the batch is written with
/// one [`crate::exact::ExactPartition::mark_batch`] call when it is full, when
/// its oldest mark has waited the flush interval, before a rotation clears a
/// slot, before a snapshot, and at shutdown. Until then a lookup finds the
/// key here first (read-your-writes), and these marks are always newer than
/// anything already in the exact tier.
pub(crate) struct MarkBatch {
    marks: Vec<Mark>,
    /// Fingerprint → time of its newest pending mark.
    index: FingerprintTable,
    /// Flush when this many are queued; 1 = write-through (no queue).
    capacity: usize,
    /// When the oldest pending mark was queued.
    oldest: Option<Instant>,
}

impl MarkBatch {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        MarkBatch {
            marks: Vec::new(),
            index: if capacity > 1 {
                FingerprintTable::with_capacity(capacity)
            } else {
                FingerprintTable::new()
            },
            capacity,
            oldest: None,
        }
    }

    /// True when marks go straight to the exact tier.
    #[inline]
    pub(crate) fn is_write_through(&self) -> bool {
        self.capacity == 1
    }

    /// Queues a mark; true when the batch is now full and must be flushed.
    #[inline]
    pub(crate) fn push(&mut self, mark: Mark) -> bool {
        if self.marks.is_empty() {
            self.oldest = Some(Instant::now());
        }
        self.index.insert(mark.fingerprint, mark.at.as_nanos());
        self.marks.push(mark);
        self.marks.len() >= self.capacity
    }

    /// Starts loading the index bucket a [`MarkBatch::get`] of `fp` reads.
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint) {
        self.index.prefetch(fp);
    }

    /// The time of the newest pending mark of `fp`.
    #[inline]
    pub(crate) fn get(&self, fp: Fingerprint) -> Option<Timestamp> {
        if self.marks.is_empty() {
            return None;
        }
        self.index.get(fp).map(Timestamp::from_nanos)
    }

    pub(crate) fn len(&self) -> usize {
        self.marks.len()
    }

    /// True when the oldest pending mark has waited at least `interval`.
    pub(crate) fn is_due(&self, interval: Duration) -> bool {
        self.oldest.is_some_and(|t| t.elapsed() >= interval)
    }

    /// The pending marks, for writing; call [`MarkBatch::clear`] once they
    /// are written.
    pub(crate) fn marks(&self) -> &[Mark] {
        &self.marks
    }

    pub(crate) fn clear(&mut self) {
        self.marks.clear();
        self.index.clear();
        self.oldest = None;
    }
}
