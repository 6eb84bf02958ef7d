//! Exactly once: the handler's effect and the claim's record in one
//! PostgreSQL transaction (feature `postgres`).
//!
//! ```text
//! BEGIN
//!   claim_batch(tx, keys)                 two statements for the batch
//!   Acquired → handler(tx, message)       the effect, in the same transaction
//!   complete_batch(tx, results)           one statement
//! COMMIT                                  effects + records, or neither
//! then ack
//! ```
//!
//! A crash before `COMMIT` undoes effects and records together (the broker
//! redelivers; the keys are free); a crash after it leaves both (the
//! redelivery is `Completed`, acked without acting). There is no window in
//! which an effect exists without its record. A handler that fails rolls
//! the batch back; the batch is retried without that message (which is
//! left for redelivery), so one bad message costs one extra transaction.

use tiered_dedup::consumer::{ConsumerStats, Delivery, Disposition};
use tiered_dedup::{ClaimRequest, Timestamp};
use tiered_dedup_postgres::{complete_batch, PgClaims, TxClaim};

use crate::ConsumerError;

/// How long a redelivery waits for a key another transaction holds.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// A consumer whose handler writes its effect in the claim's transaction.
pub struct TxConsumer {
    claims: PgClaims,
    client: postgres::Client,
    stats: ConsumerStats,
}

impl TxConsumer {
    /// Claims in `claims`' tables through `client` (a connection of its
    /// own: each batch is one transaction on it).
    #[must_use]
    pub fn new(claims: PgClaims, client: postgres::Client) -> Self {
        TxConsumer {
            claims,
            client,
            stats: ConsumerStats::default(),
        }
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> ConsumerStats {
        self.stats
    }

    /// Processes one batch in one transaction: claims every delivery, runs
    /// `handler` with the transaction on each acquired one, stores the
    /// results and commits; then answers each message's disposition (ack
    /// the ones whose [`Disposition::should_ack`] is true). A handler
    /// error rolls the transaction back and the batch is run again without
    /// that message (`Failed`: redeliver).
    ///
    /// # Errors
    /// [`ConsumerError::Postgres`] when the database failed: nothing of
    /// the batch was committed; ack none of it.
    pub fn process<M, E>(
        &mut self,
        batch: Vec<Delivery<M>>,
        mut handler: impl FnMut(&mut postgres::Transaction<'_>, &M) -> Result<Vec<u8>, E>,
        mut on_conflict: impl FnMut(&M),
    ) -> Result<Vec<(M, Disposition)>, ConsumerError> {
        let n = batch.len();
        let mut failed = vec![false; n];
        // Each retry drops at least one message: at most n + 1 attempts.
        let answers = 'attempt: loop {
            let mut tx = self
                .client
                .transaction()
                .map_err(tiered_dedup_postgres::PgError::from)?;
            let live: Vec<usize> = (0..n).filter(|&i| !failed[i]).collect();
            let requests: Vec<ClaimRequest<&[u8]>> = live
                .iter()
                .map(|&i| {
                    let mut r = ClaimRequest::new(batch[i].key.as_slice());
                    r.payload = batch[i].payload;
                    r
                })
                .collect();
            let claims = self.claims.claim_batch(&mut tx, &requests)?;
            let mut leases = Vec::new();
            let mut answers: Vec<Option<Disposition>> = vec![None; n];
            for (&i, claim) in live.iter().zip(claims) {
                answers[i] = Some(match claim {
                    TxClaim::Acquired(lease) => match handler(&mut tx, &batch[i].message) {
                        Ok(result) => {
                            leases.push((lease, result));
                            Disposition::Processed
                        }
                        Err(_) => {
                            failed[i] = true;
                            drop(tx.rollback());
                            continue 'attempt;
                        }
                    },
                    TxClaim::Completed { result, .. } => Disposition::Replayed { result },
                    TxClaim::InProgress { until } => Disposition::InProgress {
                        until: until.unwrap_or_else(|| Timestamp::now().saturating_add(BUSY_RETRY)),
                    },
                    TxClaim::Conflict => Disposition::Conflict,
                });
            }
            complete_batch(&mut tx, leases)?;
            tx.commit().map_err(tiered_dedup_postgres::PgError::from)?;
            break answers;
        };
        self.stats.batches += 1;
        self.stats.delivered += n as u64;
        let out = batch
            .into_iter()
            .zip(answers)
            .map(|(d, a)| {
                let a = a.unwrap_or(Disposition::Failed);
                let s = &mut self.stats;
                match &a {
                    Disposition::Processed => s.processed += 1,
                    Disposition::Replayed { .. } => s.replayed += 1,
                    Disposition::InProgress { .. } => s.in_progress += 1,
                    Disposition::Failed => s.failed += 1,
                    Disposition::Conflict => {
                        s.conflicts += 1;
                        on_conflict(&d.message);
                    }
                    _ => {}
                }
                (d.message, a)
            })
            .collect();
        Ok(out)
    }
}
