//! Claims: from "was this key seen?" to "was this operation done, once?".
//!
//! [`crate::Deduper::check`] records a key the moment it answers `New`. That
//! is right when acting on the key cannot fail, and wrong when it can: a
//! handler that fails after `New` turns the broker's redelivery into a
//! `Duplicate`, and the message is lost. A claim gives the whole lifecycle:
//!
//! ```text
//! claim(key[, payload fingerprint])
//!   ├─ Acquired(lease)   → act → lease.commit(result) → Completed for the window
//!   │                          └ lease.release() / drop / lease expiry → as if never claimed
//!   ├─ InProgress{until} → another holder is acting: do not act (retry later)
//!   ├─ Completed{first_seen, result} → replay the stored result, do not act
//!   ├─ Conflict          → same key, different payload fingerprint
//!   └─ Unavailable / Late as for check
//! ```
//!
//! ```
//! use tiered_dedup::{Claim, Deduper};
//!
//! let dedup = Deduper::builder().build()?;
//! match dedup.claim("charge-7f3a") {
//!     Claim::Acquired(lease) => {
//!         let receipt = b"charged 42.00"; // act, then store what a retry replays
//!         lease.commit(receipt).expect("the lease is still ours");
//!     }
//!     Claim::Completed { result, .. } => { /* replay `result` */ let _ = result; }
//!     Claim::InProgress { .. } => { /* someone else is acting: retry later */ }
//!     other => { /* Conflict, Unavailable, Late */ let _ = other; }
//! }
//! assert!(matches!(
//!     dedup.claim("charge-7f3a"),
//!     Claim::Completed { ref result, .. } if &result[..] == b"charged 42.00"
//! ));
//! # Ok::<(), tiered_dedup::ConfigError>(())
//! ```
//!
//! Contracts (tested against a reference state machine in `tests/claims.rs`):
//! - At most one live lease per key. Every lease carries a **fencing token**,
//!   strictly increasing per key. A lease is a hard deadline: a commit,
//!   release or extension after it expired (whether or not the key was
//!   claimed again since) stores nothing and answers [`LeaseLost`]; extend
//!   a lease before it runs out for long work.
//! - The window is anchored at the acquisition: a completed key is
//!   [`Claim::Completed`] until the window has passed since it was acquired.
//! - A lease dropped without commit or release is released.
//! - [`Claim::Conflict`] only when both the stored record and the claim
//!   carry a payload fingerprint and they differ.
//! - `check` is a claim and a commit with no result in one step, at the same
//!   speed as before; a key held by a lease checks as
//!   [`crate::Verdict::InProgress`].

mod batcher;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::Deduper;
use crate::error::ExactTierError;
use crate::fingerprint::Fingerprint;
use crate::time::Timestamp;

pub use batcher::{ClaimBatcher, Reply, SharedLease};

/// A digest of the request a key stands for (the body of an HTTP request,
/// the canonical fields of a message). A key claimed again with a different
/// payload fingerprint is a [`Claim::Conflict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PayloadFingerprint(pub u64);

impl PayloadFingerprint {
    /// The xxh3-64 of `bytes` (two payloads that differ are confused with
    /// probability 2⁻⁶⁴).
    #[must_use]
    pub fn of(bytes: &[u8]) -> Self {
        PayloadFingerprint(xxhash_rust::xxh3::xxh3_64(bytes))
    }
}

/// One claim to make: a key, and optionally a payload fingerprint, a lease
/// duration other than the engine's default, and an event time.
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct ClaimRequest<K> {
    /// The key.
    pub key: K,
    /// The payload the key stands for (`None`: never a conflict).
    pub payload: Option<PayloadFingerprint>,
    /// How long the lease lasts if acquired (`None`: the engine's
    /// [`crate::DeduperBuilder::lease_duration`]).
    pub lease: Option<Duration>,
    /// Event time only: the claim's time (`None`: the watermark, as
    /// [`crate::Deduper::check`] does).
    pub at: Option<Timestamp>,
}

impl<K> ClaimRequest<K> {
    /// A claim of `key` with the engine's defaults.
    pub fn new(key: K) -> Self {
        ClaimRequest {
            key,
            payload: None,
            lease: None,
            at: None,
        }
    }

    /// With a payload fingerprint (checked for conflicts).
    pub fn payload(mut self, payload: PayloadFingerprint) -> Self {
        self.payload = Some(payload);
        self
    }

    /// With a lease of `duration` instead of the engine's default.
    pub fn lease(mut self, duration: Duration) -> Self {
        self.lease = Some(duration);
        self
    }

    /// Event time: claimed at `t` (an event more than the allowed lateness
    /// behind the watermark is [`Claim::Late`]).
    pub fn at(mut self, t: Timestamp) -> Self {
        self.at = Some(t);
        self
    }
}

/// The answer to a claim. `D` is how the lease refers to its engine:
/// `&Deduper` from [`Deduper::claim`], `Arc<Deduper>` from
/// [`Deduper::claim_owned`] (a lease that can move into a task).
#[must_use = "an acquired lease must be committed or released (dropping it releases)"]
pub enum Claim<D: AsRef<Deduper>> {
    /// No live lease and no completed record within the window: act, then
    /// [`Lease::commit`] (or [`Lease::release`] on failure).
    Acquired(Lease<D>),
    /// Another holder's lease is live until `until` (lease clock): do not
    /// act; try again later (HTTP: 409; a broker consumer: redeliver).
    InProgress {
        /// When the holder's lease expires unless extended.
        until: Timestamp,
    },
    /// Committed within the window: do not act; replay `result`.
    Completed {
        /// When the completed claim was acquired (the window's anchor).
        first_seen: Timestamp,
        /// The bytes stored at commit (empty for a key recorded by
        /// [`Deduper::check`] or committed without a result).
        result: Arc<[u8]>,
    },
    /// The key is held or completed with a different payload fingerprint
    /// (HTTP: 422).
    Conflict,
    /// The exact tier could not answer (a remote tier is down and the
    /// failure policy is to fail closed): nothing was recorded; retry.
    Unavailable,
    /// Event time: the claim is more than the allowed lateness behind the
    /// watermark. Not recorded.
    Late {
        /// The watermark when the claim was made.
        watermark: Timestamp,
    },
}

impl<D: AsRef<Deduper>> Claim<D> {
    /// True for [`Claim::Acquired`].
    #[must_use]
    pub fn is_acquired(&self) -> bool {
        matches!(self, Claim::Acquired(_))
    }

    /// True for [`Claim::Completed`].
    #[must_use]
    pub fn is_completed(&self) -> bool {
        matches!(self, Claim::Completed { .. })
    }

    /// True for [`Claim::InProgress`].
    #[must_use]
    pub fn is_in_progress(&self) -> bool {
        matches!(self, Claim::InProgress { .. })
    }

    /// True for [`Claim::Conflict`].
    #[must_use]
    pub fn is_conflict(&self) -> bool {
        matches!(self, Claim::Conflict)
    }

    /// The lease, for [`Claim::Acquired`].
    #[must_use]
    pub fn into_lease(self) -> Option<Lease<D>> {
        match self {
            Claim::Acquired(lease) => Some(lease),
            _ => None,
        }
    }

    /// The answer without the lease (an acquired lease is released).
    pub fn kind(&self) -> ClaimKind {
        match self {
            Claim::Acquired(_) => ClaimKind::Acquired,
            Claim::InProgress { .. } => ClaimKind::InProgress,
            Claim::Completed { .. } => ClaimKind::Completed,
            Claim::Conflict => ClaimKind::Conflict,
            Claim::Unavailable => ClaimKind::Unavailable,
            Claim::Late { .. } => ClaimKind::Late,
        }
    }
}

impl<D: AsRef<Deduper>> fmt::Debug for Claim<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Acquired(lease) => f.debug_tuple("Acquired").field(lease).finish(),
            Claim::InProgress { until } => {
                f.debug_struct("InProgress").field("until", until).finish()
            }
            Claim::Completed { first_seen, result } => f
                .debug_struct("Completed")
                .field("first_seen", first_seen)
                .field("result_len", &result.len())
                .finish(),
            Claim::Conflict => f.write_str("Conflict"),
            Claim::Unavailable => f.write_str("Unavailable"),
            Claim::Late { watermark } => f
                .debug_struct("Late")
                .field("watermark", watermark)
                .finish(),
        }
    }
}

/// Which answer a claim got, without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClaimKind {
    /// [`Claim::Acquired`].
    Acquired,
    /// [`Claim::InProgress`].
    InProgress,
    /// [`Claim::Completed`].
    Completed,
    /// [`Claim::Conflict`].
    Conflict,
    /// [`Claim::Unavailable`].
    Unavailable,
    /// [`Claim::Late`].
    Late,
}

/// What a live lease is: the key, its fencing token, when it was acquired
/// and when it expires. Carried by a [`Lease`], and by the engine's book of
/// live leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The claimed key.
    pub fingerprint: Fingerprint,
    /// Strictly increasing per key: a later holder always has a larger one.
    pub token: u64,
    /// The claim's time: the window's anchor if it is committed.
    pub acquired_at: Timestamp,
    /// When the lease expires (lease clock) unless extended.
    pub expires_at: Timestamp,
    /// The payload fingerprint given with the claim.
    pub payload: Option<PayloadFingerprint>,
}

/// The right to act on a key, once. Commit it with the result to store, or
/// release it; dropped without either, it is released (on a remote tier the
/// release is queued, never blocking inside `Drop`).
#[must_use = "a lease must be committed or released (dropping it releases)"]
pub struct Lease<D: AsRef<Deduper>> {
    engine: Option<D>,
    info: LeaseInfo,
}

impl<D: AsRef<Deduper>> Lease<D> {
    pub(crate) fn new(engine: D, info: LeaseInfo) -> Self {
        Lease {
            engine: Some(engine),
            info,
        }
    }

    /// The lease's key, token, times and payload.
    #[must_use]
    pub fn info(&self) -> LeaseInfo {
        self.info
    }

    /// [`Lease::info`] without the copy (64 bytes), for the batch paths.
    #[inline]
    pub(crate) fn info_ref(&self) -> &LeaseInfo {
        &self.info
    }

    /// The fencing token: strictly increasing per key, so a store that
    /// keeps the highest token it has seen can refuse a stale holder.
    #[must_use]
    pub fn token(&self) -> u64 {
        self.info.token
    }

    /// When the lease expires unless extended.
    #[must_use]
    pub fn expires_at(&self) -> Timestamp {
        self.info.expires_at
    }

    /// The claimed key's fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> Fingerprint {
        self.info.fingerprint
    }

    fn engine(&self) -> &Deduper {
        self.engine
            .as_ref()
            .expect("a lease has its engine until consumed")
            .as_ref()
    }

    /// Takes the engine out, so `Drop` does nothing.
    fn settle(&mut self) -> D {
        self.engine.take().expect("a lease is settled once")
    }

    /// Settles a lease its engine has just committed (no further call).
    #[inline]
    pub(crate) fn committed(mut self) {
        self.settle();
    }

    /// True when this lease was issued by `engine`.
    pub(crate) fn is_of(&self, engine: &Deduper) -> bool {
        std::ptr::eq(self.engine(), engine)
    }

    /// A commit whose engine call is `commit` (the size cap checked
    /// first): the lease settled, or handed back in the error.
    pub(crate) fn settle_commit(
        mut self,
        result: &[u8],
        commit: impl FnOnce(&Deduper, &LeaseInfo) -> Result<(), LeaseError>,
    ) -> Result<(), CommitError<D>> {
        let cap = self.engine().max_result_bytes();
        if result.len() > cap {
            return Err(CommitError::ResultTooLarge {
                len: result.len(),
                cap,
                lease: self,
            });
        }
        match commit(self.engine(), &self.info) {
            Ok(()) => {
                self.settle();
                Ok(())
            }
            Err(LeaseError::Lost) => {
                self.settle();
                Err(CommitError::LeaseLost(LeaseLost {
                    token: self.info.token,
                }))
            }
            Err(LeaseError::Unavailable(source)) => Err(CommitError::Unavailable {
                source,
                lease: self,
            }),
        }
    }

    /// Completes the claim and stores `result` for the window: later claims
    /// answer [`Claim::Completed`] with these bytes.
    ///
    /// # Errors
    /// - [`CommitError::LeaseLost`]: the lease expired (the key may have
    ///   been claimed again), or the key was forgotten: nothing stored.
    /// - [`CommitError::ResultTooLarge`]: over the engine's
    ///   [`crate::DeduperBuilder::max_result_bytes`]; nothing stored and the
    ///   lease handed back (commit a smaller result, or release).
    /// - [`CommitError::Unavailable`]: the exact tier could not record it;
    ///   the lease is handed back (retry, or release).
    pub fn commit(self, result: &[u8]) -> Result<(), CommitError<D>> {
        self.settle_commit(result, |engine, info| engine.commit_lease(info, result))
    }

    /// Gives the key up: the next claim acquires it, as if never claimed.
    ///
    /// # Errors
    /// [`LeaseLost`] when the lease had expired (another holder's lease is
    /// left alone).
    pub fn release(mut self) -> Result<(), LeaseLost> {
        let result = self.engine().release_lease(&self.info, false);
        self.settle();
        result.map_err(|_| LeaseLost {
            token: self.info.token,
        })
    }

    /// Renews the lease for `duration` from now (long work), returning the
    /// new expiry.
    ///
    /// # Errors
    /// [`LeaseLost`] when the lease had expired, or the key was forgotten.
    pub fn extend(&mut self, duration: Duration) -> Result<Timestamp, LeaseLost> {
        match self.engine().extend_lease(&self.info, duration) {
            Ok(until) => {
                self.info.expires_at = until;
                Ok(until)
            }
            Err(_) => Err(LeaseLost {
                token: self.info.token,
            }),
        }
    }
}

impl<D: AsRef<Deduper>> Drop for Lease<D> {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            // Neither committed nor released: give the key up. A remote
            // tier queues the release (no I/O inside `drop`).
            let _ = engine.as_ref().release_lease(&self.info, true);
        }
    }
}

impl<D: AsRef<Deduper>> fmt::Debug for Lease<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("token", &self.info.token)
            .field("acquired_at", &self.info.acquired_at)
            .field("expires_at", &self.info.expires_at)
            .finish_non_exhaustive()
    }
}

/// A lease that is no longer the key's: it expired (the key may have been
/// claimed again), or the key was forgotten. Nothing was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("lease {token} was lost: it expired or its key was forgotten; nothing was stored")]
pub struct LeaseLost {
    /// The lost lease's token.
    pub token: u64,
}

/// Why a commit stored nothing.
pub enum CommitError<D: AsRef<Deduper>> {
    /// The lease was lost (fencing): another holder owns the key now.
    LeaseLost(LeaseLost),
    /// The result is over the engine's cap; the lease is handed back.
    ResultTooLarge {
        /// The result's length.
        len: usize,
        /// The engine's cap.
        cap: usize,
        /// The lease, still live.
        lease: Lease<D>,
    },
    /// The exact tier could not record the commit; the lease is handed
    /// back.
    Unavailable {
        /// The tier's error.
        source: ExactTierError,
        /// The lease, still live.
        lease: Lease<D>,
    },
}

impl<D: AsRef<Deduper>> CommitError<D> {
    /// The lease, when the commit failed without losing it.
    pub fn into_lease(self) -> Option<Lease<D>> {
        match self {
            CommitError::LeaseLost(_) => None,
            CommitError::ResultTooLarge { lease, .. } | CommitError::Unavailable { lease, .. } => {
                Some(lease)
            }
        }
    }

    /// True for [`CommitError::LeaseLost`].
    #[must_use]
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, CommitError::LeaseLost(_))
    }
}

impl<D: AsRef<Deduper>> fmt::Debug for CommitError<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommitError::LeaseLost(l) => f.debug_tuple("LeaseLost").field(l).finish(),
            CommitError::ResultTooLarge { len, cap, .. } => f
                .debug_struct("ResultTooLarge")
                .field("len", len)
                .field("cap", cap)
                .finish_non_exhaustive(),
            CommitError::Unavailable { source, .. } => f
                .debug_struct("Unavailable")
                .field("source", source)
                .finish_non_exhaustive(),
        }
    }
}

impl<D: AsRef<Deduper>> fmt::Display for CommitError<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommitError::LeaseLost(l) => l.fmt(f),
            CommitError::ResultTooLarge { len, cap, .. } => write!(
                f,
                "the result is {len} bytes, over the cap of {cap} (max_result_bytes): nothing stored"
            ),
            CommitError::Unavailable { source, .. } => {
                write!(f, "the commit was not recorded: {source}")
            }
        }
    }
}

impl<D: AsRef<Deduper>> std::error::Error for CommitError<D> {}

/// Why the engine refused a lease operation.
#[derive(Debug)]
pub(crate) enum LeaseError {
    /// Not the key's live lease any more.
    Lost,
    /// The tier could not answer.
    Unavailable(ExactTierError),
}

impl AsRef<Deduper> for Deduper {
    fn as_ref(&self) -> &Deduper {
        self
    }
}
