//! Shared keys on a remote store: every claim, check, commit and release is
//! an operation the store applies atomically
//! ([`crate::exact::ExactPartition::shared_claims`]),
//! so the leases live in the store and every engine sharing it sees them.
//! A shard sends one batch of operations per call; releases of dropped
//! leases are queued and ride along with the next batch (no I/O in `Drop`).

use crate::claims::{LeaseError, LeaseInfo, PayloadFingerprint};
use crate::error::ExactTierError;
use crate::exact::{SharedAnswer, SharedOp};
use crate::fingerprint::Fingerprint;
use crate::time::Timestamp;
use crate::verdict::Verdict;

use super::claim::ShardClaim;
use super::shard::{Shard, ShardRules};

/// A claim routed to a shard: `(position, fingerprint, payload, time,
/// lease nanoseconds)`.
pub(crate) type ClaimItem = (
    usize,
    Fingerprint,
    Option<PayloadFingerprint>,
    Timestamp,
    u64,
);

/// True when the error says the store offers no shared claims (the engine
/// then checks through `ExactPartition::claim_batch`).
fn unsupported(e: &ExactTierError) -> bool {
    matches!(e, ExactTierError::Unsupported(_))
}

impl Shard {
    /// Sends `ops` (after the queued releases) in one batch; the answers
    /// of `ops` only.
    fn send_shared(
        &mut self,
        ops: &[SharedOp<'_>],
        rules: &ShardRules,
    ) -> Result<Vec<SharedAnswer>, ExactTierError> {
        let current = self.current_claim_slice();
        let exact = self
            .exact
            .as_mut()
            .expect("shared claims need the exact tier");
        // The queued releases first; without any (the usual case), the
        // caller's operations as they are, not copied.
        let all: Vec<SharedOp<'_>>;
        let sent: &[SharedOp<'_>] = if self.queued_releases.is_empty() {
            ops
        } else {
            all = self
                .queued_releases
                .iter()
                .map(|&(fingerprint, token, now)| SharedOp::Release {
                    fingerprint,
                    token,
                    now,
                })
                .chain(ops.iter().copied())
                .collect();
            &all
        };
        let queued = self.queued_releases.len();
        let mut out = Vec::with_capacity(sent.len());
        let started = std::time::Instant::now();
        let result = exact.shared_claims(current, rules.window, sent, &mut out);
        self.counters
            .exact_call(started.elapsed().as_nanos() as u64);
        result?;
        if out.len() != sent.len() {
            return Err(ExactTierError::Unavailable(format!(
                "the store answered {} of {} claim operations",
                out.len(),
                sent.len()
            )));
        }
        // The queued releases are applied (or were lost already).
        self.counters.releases += queued as u64;
        self.queued_releases.clear();
        if queued > 0 {
            out.drain(..queued);
        }
        Ok(out)
    }

    /// Shared claims of `items` (`(position, fingerprint, payload, time,
    /// lease nanoseconds)`), in one batch.
    pub(crate) fn claim_shared(
        &mut self,
        items: &[ClaimItem],
        now: u64,
        rules: &ShardRules,
        out: &mut [Option<ShardClaim>],
    ) {
        self.commit_and_claim_shared(&[], items, now, rules, out);
    }

    /// Lease operations `first` (commits, releases), then the shared claims
    /// of `items`, in one batch to the store (one round trip): the answers
    /// of `first` in order; the claims' answers go to `out`.
    pub(crate) fn commit_and_claim_shared(
        &mut self,
        first: &[SharedOp<'_>],
        items: &[ClaimItem],
        now: u64,
        rules: &ShardRules,
        out: &mut [Option<ShardClaim>],
    ) -> Vec<Result<(), LeaseError>> {
        let claims = items.iter().map(|&(_, fingerprint, payload, at, ttl)| {
            self.advance(at);
            self.counters.claims += 1;
            SharedOp::Claim {
                fingerprint,
                at,
                now,
                until: now.saturating_add(ttl),
                payload,
            }
        });
        let ops: Vec<SharedOp<'_>> = first.iter().copied().chain(claims).collect();
        let mut answers = self.send_shared(&ops, rules);
        let claim_answers = match &mut answers {
            Ok(a) => Ok(a.split_off(first.len())),
            Err(e) => Err(e.clone()),
        };
        let leases = self.lease_answers(first, answers);
        for (i, &(pos, fingerprint, payload, at, ttl)) in items.iter().enumerate() {
            let answer = match &claim_answers {
                Err(_) => {
                    self.counters.unavailable += 1;
                    ShardClaim::Unavailable
                }
                Ok(a) => match a[i].clone() {
                    // The lease's anchor is the record time the store
                    // keeps: the claim's, unless the store moved it.
                    SharedAnswer::Acquired { token } | SharedAnswer::AcquiredAt { token, .. } => {
                        let acquired_at = match a[i] {
                            SharedAnswer::AcquiredAt { at: kept, .. } => kept,
                            _ => at,
                        };
                        self.counters.acquired += 1;
                        ShardClaim::Acquired(LeaseInfo {
                            fingerprint,
                            token,
                            acquired_at,
                            expires_at: Timestamp::from_nanos(now.saturating_add(ttl)),
                            payload,
                        })
                    }
                    SharedAnswer::InProgress { until } => {
                        self.counters.claims_in_progress += 1;
                        ShardClaim::InProgress {
                            until: Timestamp::from_nanos(until),
                        }
                    }
                    SharedAnswer::Completed { first_seen, body } => {
                        self.counters.claims_completed += 1;
                        ShardClaim::Completed {
                            first_seen,
                            result: body.map_or_else(|| self.empty_result.clone(), |b| b.result),
                        }
                    }
                    SharedAnswer::Conflict => {
                        self.counters.conflicts += 1;
                        ShardClaim::Conflict
                    }
                    _unexpected => {
                        self.counters.unavailable += 1;
                        crate::trace::event!(
                            warn,
                            answer = ?_unexpected,
                            "the store answered a claim with a non-claim answer"
                        );
                        ShardClaim::Unavailable
                    }
                },
            };
            out[pos] = Some(answer);
        }
        leases
    }

    /// Shared checks of `items` (`(position, fingerprint, time)`) as
    /// claims committed in one step. `None` when the store offers no
    /// shared claims (the caller uses
    /// [`crate::exact::ExactPartition::claim_batch`]).
    pub(crate) fn check_shared(
        &mut self,
        items: &[(usize, Fingerprint, Timestamp)],
        now: u64,
        rules: &ShardRules,
        out: &mut [Verdict],
    ) -> Option<()> {
        let ops: Vec<SharedOp<'_>> = items
            .iter()
            .map(|&(_, fingerprint, at)| SharedOp::Check {
                fingerprint,
                at,
                now,
            })
            .collect();
        let answers = match self.send_shared(&ops, rules) {
            Err(e) if unsupported(&e) => return None,
            other => other,
        };
        for (i, &(pos, _, _)) in items.iter().enumerate() {
            out[pos] = match &answers {
                Err(_) => Verdict::Unavailable,
                Ok(a) => match &a[i] {
                    SharedAnswer::Acquired { .. } | SharedAnswer::AcquiredAt { .. } => Verdict::New,
                    SharedAnswer::InProgress { until } => Verdict::InProgress {
                        until: Timestamp::from_nanos(*until),
                    },
                    SharedAnswer::Completed { first_seen, .. } => Verdict::Duplicate {
                        first_seen: *first_seen,
                    },
                    _ => Verdict::Unavailable,
                },
            };
        }
        Some(())
    }

    /// One lease operation on the store (commit, release, extend).
    pub(crate) fn lease_op_shared(
        &mut self,
        op: SharedOp<'_>,
        rules: &ShardRules,
    ) -> Result<(), LeaseError> {
        self.lease_ops_shared(&[op], rules)
            .pop()
            .expect("one answer per operation")
    }

    /// Lease operations on the store (commits, releases, extensions) in
    /// one batch, answered in order.
    pub(crate) fn lease_ops_shared(
        &mut self,
        ops: &[SharedOp<'_>],
        rules: &ShardRules,
    ) -> Vec<Result<(), LeaseError>> {
        let answers = self.send_shared(ops, rules);
        self.lease_answers(ops, answers)
    }

    /// What the store's `answers` to lease operations `ops` mean, counted.
    fn lease_answers(
        &mut self,
        ops: &[SharedOp<'_>],
        answers: Result<Vec<SharedAnswer>, ExactTierError>,
    ) -> Vec<Result<(), LeaseError>> {
        match answers {
            Err(e) => ops
                .iter()
                .map(|_| {
                    Err(LeaseError::Unavailable(ExactTierError::Unavailable(
                        e.to_string(),
                    )))
                })
                .collect(),
            Ok(answers) => answers
                .into_iter()
                .zip(ops)
                .map(|(answer, op)| match answer {
                    SharedAnswer::Done => {
                        match op {
                            SharedOp::Commit { result, .. } => {
                                self.counters.commits += 1;
                                self.counters.result_bytes += result.len() as u64;
                            }
                            SharedOp::Release { .. } => self.counters.releases += 1,
                            _ => {}
                        }
                        Ok(())
                    }
                    SharedAnswer::Lost => {
                        self.counters.lease_lost += 1;
                        Err(LeaseError::Lost)
                    }
                    other => Err(LeaseError::Unavailable(ExactTierError::Unavailable(
                        format!("the store answered a lease operation with {other:?}"),
                    ))),
                })
                .collect(),
        }
    }

    /// A dropped lease's release, sent with the shard's next batch.
    pub(crate) fn queue_release(&mut self, info: &LeaseInfo, now: u64) {
        self.queued_releases
            .push((info.fingerprint, info.token, now));
    }

    /// Forgets `fp` in the store.
    pub(crate) fn forget_shared(
        &mut self,
        fp: Fingerprint,
        rules: &ShardRules,
    ) -> Result<bool, ExactTierError> {
        let answers = self.send_shared(&[SharedOp::Forget { fingerprint: fp }], rules)?;
        match answers.first() {
            Some(SharedAnswer::Forgotten(found)) => {
                if *found {
                    self.counters.forgotten += 1;
                }
                Ok(*found)
            }
            other => Err(ExactTierError::Unavailable(format!(
                "the store answered a forget with {other:?}"
            ))),
        }
    }

    /// Sends the queued releases now (a flush), if any.
    pub(crate) fn send_queued_releases(&mut self, rules: &ShardRules) {
        if !self.queued_releases.is_empty() {
            // A failure keeps them queued for the next batch.
            let _ = self.send_shared(&[], rules);
        }
    }

    /// True for shared keys on a store that holds the leases.
    pub(crate) fn shares_leases(&self, shared: bool) -> bool {
        shared && self.exact.as_ref().is_some_and(|e| e.prefers_batches())
    }
}
