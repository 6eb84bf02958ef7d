//! What became of each request: one [`Outcome`] per request the layer saw,
//! counted in relaxed atomics (nothing else on the request path), published
//! through the `metrics` facade on demand (feature `metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

/// What the layer did with one request. Every request counts exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Its method is not covered, or it had no key and keys are optional:
    /// passed to the handler untouched.
    Passthrough,
    /// The handler ran and its response was stored for replay.
    Stored,
    /// The handler ran; its body was over the cap, so the key completed
    /// without a replayable body (retries get `410`).
    StoredWithoutBody,
    /// The handler ran and its status is not stored (by default 5xx, 408,
    /// 409, 423, 425, 429, 401, 403), or the handler returned an error: the
    /// key was released and a retry runs the handler again.
    Released,
    /// The handler ran but the commit could not be recorded (the store was
    /// unreachable, or the lease had expired): the response was sent; the
    /// commit is retried in the background while the lease lasts.
    NotRecorded,
    /// The request was dropped while the handler ran (the client went
    /// away, or the handler panicked): the key was released.
    Cancelled,
    /// A stored response was replayed; the handler did not run.
    Replayed,
    /// `410`: the key completed without a replayable response.
    NotReplayable,
    /// `409`: another request with the key was in flight.
    InProgress,
    /// `422`: the key was used for a different request.
    KeyReused,
    /// `400`: no key where one is required.
    MissingKey,
    /// `400`: a malformed key.
    InvalidKey,
    /// `400`: the request body could not be read.
    UnreadableBody,
    /// `413`: the request body was over the cap.
    RequestTooLarge,
    /// `503`: the store could not be reached (fail closed).
    Unavailable,
    /// The store could not be reached and the policy is to proceed: the
    /// handler ran without a claim (nothing stored).
    Unprotected,
}

impl Outcome {
    /// Every outcome, in the order of [`Outcome::label`]'s table.
    pub const ALL: [Outcome; 16] = [
        Outcome::Passthrough,
        Outcome::Stored,
        Outcome::StoredWithoutBody,
        Outcome::Released,
        Outcome::NotRecorded,
        Outcome::Cancelled,
        Outcome::Replayed,
        Outcome::NotReplayable,
        Outcome::InProgress,
        Outcome::KeyReused,
        Outcome::MissingKey,
        Outcome::InvalidKey,
        Outcome::UnreadableBody,
        Outcome::RequestTooLarge,
        Outcome::Unavailable,
        Outcome::Unprotected,
    ];

    /// The `outcome` label of `tiered_dedup_http_requests_total`.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Passthrough => "passthrough",
            Outcome::Stored => "stored",
            Outcome::StoredWithoutBody => "stored_without_body",
            Outcome::Released => "released",
            Outcome::NotRecorded => "not_recorded",
            Outcome::Cancelled => "cancelled",
            Outcome::Replayed => "replayed",
            Outcome::NotReplayable => "not_replayable",
            Outcome::InProgress => "in_progress",
            Outcome::KeyReused => "key_reused",
            Outcome::MissingKey => "missing_key",
            Outcome::InvalidKey => "invalid_key",
            Outcome::UnreadableBody => "unreadable_body",
            Outcome::RequestTooLarge => "request_too_large",
            Outcome::Unavailable => "unavailable",
            Outcome::Unprotected => "unprotected",
        }
    }

    /// The outcome's counter: its declaration order, which [`Outcome::ALL`]
    /// follows (checked by a test).
    fn index(self) -> usize {
        self as usize
    }
}

/// The layer's counters: requests per [`Outcome`], handler runs, and
/// stored bytes. Read them with [`IdempotencyStats::count`]; with the
/// `metrics` feature, [`crate::IdempotencyLayer::publish_metrics`]
/// publishes them.
#[derive(Debug, Default)]
pub struct IdempotencyStats {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    handler_runs: AtomicU64,
    stored_bytes: AtomicU64,
    commit_retries: AtomicU64,
}

impl IdempotencyStats {
    /// Requests that ended in `outcome`.
    #[must_use]
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
    }

    /// Times the handler was called for a request with a key (under a
    /// claim, or unprotected).
    #[must_use]
    pub fn handler_runs(&self) -> u64 {
        self.handler_runs.load(Ordering::Relaxed)
    }

    /// Bytes of stored response records committed.
    #[must_use]
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// Commits retried in the background after the store could not record
    /// them.
    #[must_use]
    pub fn commit_retries(&self) -> u64 {
        self.commit_retries.load(Ordering::Relaxed)
    }

    pub(crate) fn record(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handler_ran(&self) {
        self.handler_runs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stored(&self, bytes: usize) {
        self.stored_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn commit_retried(&self) {
        self.commit_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes the counters through the `metrics` facade as absolute
    /// values, labelled `namespace` (the engine's).
    #[cfg(feature = "metrics")]
    pub(crate) fn publish(&self, namespace: &str) {
        for outcome in Outcome::ALL {
            metrics::counter!(
                "tiered_dedup_http_requests_total",
                "namespace" => namespace.to_owned(),
                "outcome" => outcome.label()
            )
            .absolute(self.count(outcome));
        }
        let ns = [("namespace", namespace.to_owned())];
        metrics::counter!("tiered_dedup_http_handler_runs_total", &ns)
            .absolute(self.handler_runs());
        metrics::counter!("tiered_dedup_http_stored_bytes_total", &ns)
            .absolute(self.stored_bytes());
        metrics::counter!("tiered_dedup_http_commit_retries_total", &ns)
            .absolute(self.commit_retries());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_declaration_order_with_distinct_labels() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
        let mut labels: Vec<_> = Outcome::ALL.iter().map(|o| o.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
