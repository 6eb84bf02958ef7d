//! `Verdict`: what the engine says about one key.

use crate::time::Timestamp;

/// The answer for one key. Never a bare `bool`: a duplicate says when its key
/// was first accepted, and a key the engine cannot judge exactly says why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verdict {
    /// Not accepted within the window: accepted now (act on it).
    New,
    /// Accepted less than the window ago, at `first_seen`: do not act again.
    Duplicate {
        /// When the accepted occurrence was checked.
        first_seen: Timestamp,
    },
    /// Accepted before (no window: at any earlier time), by an engine built
    /// with [`crate::DeduperBuilder::first_seen_times`]`(false)`, which keeps
    /// fingerprints alone (16 bytes per key instead of 24) and so cannot
    /// say when: do not act again.
    DuplicateUntimed,
    /// Probabilistic mode only: the filter holds the key, so it was probably
    /// accepted within the window (wrong at the configured false-positive
    /// rate); `since` is the start of the oldest generation that matched.
    LikelyDuplicate {
        /// The key was accepted at or after this time, if at all.
        since: Timestamp,
    },
    /// The key is held by a live claim's lease (see [`crate::Claim`]):
    /// someone is acting on it now and has not committed. Not recorded; do
    /// not act — check again after `until` or when the holder is done.
    InProgress {
        /// When the holder's lease expires unless extended or committed.
        until: Timestamp,
    },
    /// The exact tier could not confirm a key the filter matched (a remote
    /// tier is down): nothing was recorded; retry the key later.
    Unavailable,
    /// Event time only: the event is more than the allowed lateness behind
    /// the watermark, so its window is no longer kept. Not accepted, not
    /// recorded.
    Late {
        /// The watermark (highest event time seen) when it was checked.
        watermark: Timestamp,
    },
}

impl Verdict {
    /// True for [`Verdict::New`]: act on the key.
    #[must_use]
    pub fn is_new(self) -> bool {
        matches!(self, Verdict::New)
    }

    /// True for [`Verdict::Duplicate`], [`Verdict::DuplicateUntimed`] and
    /// [`Verdict::LikelyDuplicate`].
    #[must_use]
    pub fn is_duplicate(self) -> bool {
        matches!(
            self,
            Verdict::Duplicate { .. } | Verdict::DuplicateUntimed | Verdict::LikelyDuplicate { .. }
        )
    }

    /// True for [`Verdict::Late`].
    #[must_use]
    pub fn is_late(self) -> bool {
        matches!(self, Verdict::Late { .. })
    }

    /// True for [`Verdict::InProgress`].
    #[must_use]
    pub fn is_in_progress(self) -> bool {
        matches!(self, Verdict::InProgress { .. })
    }

    /// True for [`Verdict::Unavailable`].
    #[must_use]
    pub fn is_unavailable(self) -> bool {
        matches!(self, Verdict::Unavailable)
    }

    /// When the key was first accepted, where the engine knows it exactly.
    #[must_use]
    pub fn first_seen(self) -> Option<Timestamp> {
        match self {
            Verdict::Duplicate { first_seen } => Some(first_seen),
            _ => None,
        }
    }
}
