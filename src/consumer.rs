//! A broker-neutral consumer step: claim a batch of delivered messages in
//! one engine call, act on the ones acquired, commit (or release), and say
//! what to do with each delivery — ack, redeliver, or dead-letter.
//!
//! ```text
//! deliveries ──claim_batch (one round trip)──┬─ Acquired  → handler → commit → Ack
//!                                             │                   └ Err → release → Redeliver
//!                                             ├─ Completed → Ack (not run; result replayed)
//!                                             ├─ InProgress → Redeliver after the holder's lease
//!                                             ├─ Conflict → on_conflict (dead letter) → Ack
//!                                             └─ Unavailable → Redeliver (nothing acked)
//! ```
//!
//! The order matters: the record is committed **after** the handler's
//! effect and **before** the ack. A crash before the commit leaves the key
//! unclaimed once its lease expires, so the broker's redelivery acts again
//! (at least once, never lost); a crash after the commit and before the ack
//! makes the redelivery `Completed` (acked without acting). The one window
//! left — a crash between the effect and the commit — repeats the effect;
//! only an effect committed in the same transaction as the claim (the
//! PostgreSQL integration) closes it.
//!
//! The brokers' own clients live in the `tiered-dedup-consumers` member
//! crate (NATS JetStream, Redis Streams); this module has no dependency.
//!
//! ```
//! use std::sync::Arc;
//! use tiered_dedup::consumer::{BatchConsumer, Delivery, Disposition};
//! use tiered_dedup::Deduper;
//!
//! let consumer = BatchConsumer::new(Arc::new(Deduper::builder().build()?));
//! let batch = vec![Delivery::new("order-1", 1u32), Delivery::new("order-1", 2u32)];
//! let settled = consumer.process(
//!     batch,
//!     |msg: &u32| Ok::<_, std::io::Error>(format!("done {msg}").into_bytes()),
//!     |_msg: &u32| {},
//! );
//! assert!(matches!(settled[0].1, Disposition::Processed));
//! assert!(matches!(settled[1].1, Disposition::Replayed { .. }));
//! assert!(settled.iter().all(|(_, d)| d.should_ack()));
//! # Ok::<(), tiered_dedup::ConfigError>(())
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::claims::{Claim, ClaimRequest, CommitError, Lease, PayloadFingerprint};
use crate::engine::Deduper;
use crate::time::Timestamp;

/// One delivered message: its dedup key (the business key, not the
/// broker's message id), an optional payload fingerprint, and the
/// broker's handle (`M`: the message and whatever acks it).
#[derive(Debug)]
pub struct Delivery<M> {
    /// The dedup key.
    pub key: Vec<u8>,
    /// The payload it stands for (a key seen again with another payload is
    /// a conflict); `None`: never a conflict.
    pub payload: Option<PayloadFingerprint>,
    /// The broker's message.
    pub message: M,
}

impl<M> Delivery<M> {
    /// A delivery of `message` under `key`, without a payload fingerprint.
    pub fn new(key: impl AsRef<[u8]>, message: M) -> Self {
        Delivery {
            key: key.as_ref().to_vec(),
            payload: None,
            message,
        }
    }

    /// With a payload fingerprint (checked for conflicts).
    #[must_use]
    pub fn payload(mut self, payload: PayloadFingerprint) -> Self {
        self.payload = Some(payload);
        self
    }
}

/// What to do with a delivery once its batch is processed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// The handler ran and its result was committed: ack.
    Processed,
    /// Completed earlier within the window: ack without running; `result`
    /// is what the first run stored.
    Replayed {
        /// The stored result.
        result: Arc<[u8]>,
    },
    /// Another holder is acting on the key: do not ack; let the broker
    /// redeliver (after `until`, the holder's lease, where the broker can
    /// delay a redelivery).
    InProgress {
        /// The holder's lease expiry (lease clock).
        until: Timestamp,
    },
    /// The handler failed; the claim was released: do not ack, redeliver.
    Failed,
    /// The key was seen with another payload: handed to the conflict
    /// callback (a dead letter), then ack.
    Conflict,
    /// The exact tier could not answer (fail-closed policy): nothing was
    /// run or recorded; do not ack, redeliver later.
    Unavailable,
    /// The handler ran but its commit was not stored (the lease expired, or
    /// the tier failed at the commit): ack (the effect is done), counted —
    /// a later repeat of the key may act again.
    Uncommitted,
    /// Event time only: behind the allowed lateness; not recorded, ack.
    Late,
}

impl Disposition {
    /// A handled delivery's disposition once its commit was (or was not)
    /// stored.
    fn committed(stored: bool) -> Self {
        if stored {
            Disposition::Processed
        } else {
            Disposition::Uncommitted
        }
    }

    /// True when the delivery is settled and should be acked; false when
    /// the broker should deliver it again.
    #[must_use]
    pub fn should_ack(&self) -> bool {
        !matches!(
            self,
            Disposition::InProgress { .. } | Disposition::Failed | Disposition::Unavailable
        )
    }

    /// How long to ask the broker to wait before redelivering (brokers
    /// with a negative ack and a delay), for the ones not acked.
    #[must_use]
    pub fn redeliver_after(&self, now: Timestamp) -> Option<Duration> {
        match self {
            Disposition::InProgress { until } => Some(Duration::from_nanos(
                until.as_nanos().saturating_sub(now.as_nanos()),
            )),
            Disposition::Unavailable => Some(Duration::from_millis(100)),
            Disposition::Failed => Some(Duration::ZERO),
            _ => None,
        }
    }
}

/// The consumer's counters (atomics; read with [`BatchConsumer::stats`]).
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    delivered: AtomicU64,
    processed: AtomicU64,
    replayed: AtomicU64,
    in_progress: AtomicU64,
    failed: AtomicU64,
    conflicts: AtomicU64,
    unavailable: AtomicU64,
    uncommitted: AtomicU64,
    late: AtomicU64,
    commit_retries: AtomicU64,
}

/// A snapshot of a consumer's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Batches processed (one engine claim call each).
    pub batches: u64,
    /// Deliveries seen.
    pub delivered: u64,
    /// Handler runs committed.
    pub processed: u64,
    /// Deliveries of completed keys, acked without running.
    pub replayed: u64,
    /// Deliveries left for redelivery because another holder had the key.
    pub in_progress: u64,
    /// Handler failures (released, redelivered).
    pub failed: u64,
    /// Payload conflicts handed to the callback.
    pub conflicts: u64,
    /// Deliveries the exact tier could not claim (redelivered).
    pub unavailable: u64,
    /// Handler runs whose commit was not stored.
    pub uncommitted: u64,
    /// Late deliveries (event time).
    pub late: u64,
    /// Commits tried again after the exact tier failed them (each try of
    /// each commit counts; most then succeed, the rest are `uncommitted`).
    pub commit_retries: u64,
}

impl ConsumerStats {
    /// The counter that `disposition` adds to.
    fn count(c: &Counters, disposition: &Disposition) {
        let field = match disposition {
            Disposition::Processed => &c.processed,
            Disposition::Replayed { .. } => &c.replayed,
            Disposition::InProgress { .. } => &c.in_progress,
            Disposition::Failed => &c.failed,
            Disposition::Conflict => &c.conflicts,
            Disposition::Unavailable => &c.unavailable,
            Disposition::Uncommitted => &c.uncommitted,
            Disposition::Late => &c.late,
        };
        field.fetch_add(1, Ordering::Relaxed);
    }
}

/// Claims, acts, commits and says what to ack, a batch at a time. Cheap to
/// share (`Arc` it, or clone the engine into several).
#[derive(Debug)]
pub struct BatchConsumer {
    engine: Arc<Deduper>,
    lease: Option<Duration>,
    commit_retry: Duration,
    counters: Counters,
}

/// How long a batch's failed commits are tried again by default.
pub const DEFAULT_COMMIT_RETRY: Duration = Duration::from_secs(2);
/// The first pause before trying failed commits again (doubling, at most
/// [`RETRY_PAUSE_MAX`]).
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(25);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(400);

impl BatchConsumer {
    /// A consumer claiming in `engine`, with the engine's lease duration.
    #[must_use]
    pub fn new(engine: Arc<Deduper>) -> Self {
        BatchConsumer {
            engine,
            lease: None,
            commit_retry: DEFAULT_COMMIT_RETRY,
            counters: Counters::default(),
        }
    }

    /// How long the commits the exact tier failed (a timeout, a dropped
    /// connection) are tried again before the batch is answered; default
    /// [`DEFAULT_COMMIT_RETRY`], `Duration::ZERO` never retries.
    ///
    /// A commit given up on releases its lease and answers
    /// [`Disposition::Uncommitted`]: acked, counted, and a later repeat
    /// of the key may act again. Yet a commit that timed out on a slow
    /// tier has often been applied all the same (its request was read
    /// once the tier caught up), and one that was not leaves the key held
    /// until its lease expires when the release fails as well: every
    /// repeat meanwhile is `InProgress` and waits the lease out. Trying
    /// again for a moment settles both: a commit already applied is
    /// answered as done, one not applied is applied now, and one whose
    /// lease expired meanwhile is lease-lost (fencing), never stored
    /// twice.
    #[must_use]
    pub fn commit_retry(mut self, budget: Duration) -> Self {
        self.commit_retry = budget;
        self
    }

    /// Leases of `duration` instead of the engine's default: longer than a
    /// batch's handler runs take, and no longer than the broker's ack
    /// deadline (a redelivery before the lease ends is `InProgress`).
    #[must_use]
    pub fn lease(mut self, duration: Duration) -> Self {
        self.lease = Some(duration);
        self
    }

    /// The engine.
    #[must_use]
    pub fn engine(&self) -> &Arc<Deduper> {
        &self.engine
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> ConsumerStats {
        let c = &self.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsumerStats {
            batches: r(&c.batches),
            delivered: r(&c.delivered),
            processed: r(&c.processed),
            replayed: r(&c.replayed),
            in_progress: r(&c.in_progress),
            failed: r(&c.failed),
            conflicts: r(&c.conflicts),
            unavailable: r(&c.unavailable),
            uncommitted: r(&c.uncommitted),
            late: r(&c.late),
            commit_retries: r(&c.commit_retries),
        }
    }

    /// Processes one batch: claims every delivery in one engine call (one
    /// round trip per shard on a remote tier), runs `handler` on each
    /// acquired one in order, commits the successes in one call (results
    /// stored for replays) and releases the failures, and calls
    /// `on_conflict` for payload conflicts. Returns each message with what
    /// to do with it, in delivery order; the caller acks the ones whose
    /// [`Disposition::should_ack`] is true — after this returns, that is
    /// after the commit.
    ///
    /// A key delivered twice in one batch is acted on once (the second is
    /// `Replayed`, or `Failed` if the first failed; `Conflict` when both
    /// carry payload fingerprints and they differ).
    pub fn process<M, E>(
        &self,
        batch: Vec<Delivery<M>>,
        handler: impl FnMut(&M) -> Result<Vec<u8>, E>,
        on_conflict: impl FnMut(&M),
    ) -> Vec<(M, Disposition)> {
        let mut step = self.claim_and_act(Vec::new(), &batch, handler, on_conflict);
        // 3. Commit the successes in one call: the record before the ack.
        let outcomes = self.commit_with_retry(std::mem::take(&mut step.leases), &step.bodies);
        for (&i, stored) in step.acted.iter().zip(outcomes) {
            step.out[i] = Some(Disposition::committed(stored));
        }
        step.follow(&batch);
        batch
            .into_iter()
            .zip(step.out)
            .map(|(d, o)| {
                let o = o.expect("every delivery settled");
                ConsumerStats::count(&self.counters, &o);
                (d.message, o)
            })
            .collect()
    }

    /// Processes one batch as [`BatchConsumer::process`] does, except that
    /// the batch's commits are held back in `held` and sent with the
    /// **next** batch's claims, in one engine call: with shared keys on a
    /// remote tier, one round trip per batch instead of two.
    ///
    /// Returns what to do with the messages settled by this call, to be
    /// acked (or not) as they come: first the previous batch's handled
    /// messages, whose commits went with this batch's claims
    /// ([`Disposition::Processed`] or [`Disposition::Uncommitted`]), then
    /// this batch's deliveries that were not acted on (replays, keys held
    /// elsewhere, failures, conflicts), in delivery order. This batch's
    /// handled messages stay in `held` until the next call, or until
    /// [`BatchConsumer::flush`].
    ///
    /// The order of effect, commit and ack is kept — every ack follows its
    /// commit — but a handled message waits one more batch for both, and
    /// its key stays leased meanwhile: call [`BatchConsumer::flush`] when a
    /// read comes back empty or short (the next one may wait for messages)
    /// and before stopping. A `held` dropped without a flush releases its
    /// leases, and its messages, never acked, are delivered again and acted
    /// on again: a crash between the effect and the commit, which this mode
    /// widens from one call to one batch.
    pub fn process_pipelined<M, E>(
        &self,
        held: &mut Held<M>,
        batch: Vec<Delivery<M>>,
        handler: impl FnMut(&M) -> Result<Vec<u8>, E>,
        on_conflict: impl FnMut(&M),
    ) -> Vec<(M, Disposition)> {
        let carried = std::mem::take(held);
        let commits: Vec<_> = carried.leases.into_iter().zip(carried.bodies).collect();
        let mut step = self.claim_and_act(commits, &batch, handler, on_conflict);
        let stored =
            self.retry_unavailable(std::mem::take(&mut step.carried), &step.carried_bodies);
        let mut settled = self.settle_committed(carried.messages, stored);
        // A repeat in this batch of a delivery held here replays its result
        // whether or not the commit then succeeds, as in `process`.
        for &i in &step.acted {
            step.out[i] = Some(Disposition::Processed);
        }
        step.follow(&batch);
        let Step {
            out,
            leases,
            bodies,
            acted,
            ..
        } = step;
        let mut acted = acted.into_iter().peekable();
        for (i, (d, o)) in batch.into_iter().zip(out).enumerate() {
            if acted.peek() == Some(&i) {
                acted.next();
                held.messages.push(d.message);
                continue;
            }
            let o = o.expect("every delivery settled");
            ConsumerStats::count(&self.counters, &o);
            settled.push((d.message, o));
        }
        held.leases = leases;
        held.bodies = bodies;
        settled
    }

    /// Commits what `held` holds (the last batch of
    /// [`BatchConsumer::process_pipelined`]) on its own, and says what to
    /// do with those messages: [`Disposition::Processed`] or
    /// [`Disposition::Uncommitted`], both acked.
    pub fn flush<M>(&self, held: &mut Held<M>) -> Vec<(M, Disposition)> {
        let carried = std::mem::take(held);
        if carried.messages.is_empty() {
            return Vec::new();
        }
        let stored = self.commit_with_retry(carried.leases, &carried.bodies);
        self.settle_committed(carried.messages, stored)
    }

    /// Each message with whether its commit was stored, as a disposition
    /// (counted).
    fn settle_committed<M>(&self, messages: Vec<M>, stored: Vec<bool>) -> Vec<(M, Disposition)> {
        messages
            .into_iter()
            .zip(stored)
            .map(|(m, stored)| {
                let o = Disposition::committed(stored);
                ConsumerStats::count(&self.counters, &o);
                (m, o)
            })
            .collect()
    }

    /// Steps 1 and 2 of a batch: claims every delivery in one engine call,
    /// with `commits` (an earlier batch's, pipelined) sent first in the
    /// same call, and runs `handler` on each acquired delivery in order.
    /// The successes' leases and results are left in the step, to commit.
    fn claim_and_act<M, E>(
        &self,
        commits: Vec<(Lease<Arc<Deduper>>, Vec<u8>)>,
        batch: &[Delivery<M>],
        mut handler: impl FnMut(&M) -> Result<Vec<u8>, E>,
        mut on_conflict: impl FnMut(&M),
    ) -> Step {
        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
        // 1. One claim call for the batch. Repeats of a key within the
        // batch claim once (the first); the others follow its outcome.
        let mut first_of: crate::fingerprint::BytesMap<'_, usize> =
            crate::fingerprint::BytesMap::with_capacity_and_hasher(batch.len(), Default::default());
        // The first deliveries that a later one in the batch repeats: only
        // their results are kept for the repeats' replays.
        let mut repeated = vec![false; batch.len()];
        let mut requests = Vec::with_capacity(batch.len());
        let mut slot = Vec::with_capacity(batch.len());
        for (i, d) in batch.iter().enumerate() {
            match first_of.entry(d.key.as_slice()) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    let j = *first.get();
                    repeated[j] = true;
                    slot.push(Err(j));
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
            let mut r = ClaimRequest::new(d.key.as_slice());
            r.payload = d.payload;
            r.lease = self.lease;
            slot.push(Ok(requests.len()));
            requests.push(r);
        }
        let (carried, carried_bodies, claims) = if commits.is_empty() {
            (
                Vec::new(),
                Vec::new(),
                self.engine.claim_batch_owned(&requests),
            )
        } else {
            // The results are moved into the call and back out of it in
            // the same order (the retry of a failed commit needs them).
            let (leases, bodies): (Vec<_>, Vec<_>) = commits.into_iter().unzip();
            let (done, claims) = self
                .engine
                .commit_and_claim_batch(leases.into_iter().zip(bodies.iter()).collect(), &requests);
            (done, bodies, claims)
        };
        drop(first_of);
        // 2. Act on the acquired ones, in delivery order.
        let mut out: Vec<Option<Disposition>> = (0..batch.len()).map(|_| None).collect();
        let mut leases = Vec::with_capacity(batch.len());
        let mut bodies: Vec<Vec<u8>> = Vec::with_capacity(batch.len());
        let mut acted = Vec::with_capacity(batch.len());
        // The claims answer the requests in order, and the requests were
        // made in delivery order: the next claim is the next first delivery's.
        let mut claims = claims.into_iter();
        for (i, d) in batch.iter().enumerate() {
            let Ok(r) = slot[i] else { continue };
            let claim: Claim<Arc<Deduper>> = claims.next().expect("a claim per request");
            debug_assert_eq!(r + claims.len() + 1, requests.len());
            out[i] = Some(match claim {
                Claim::Acquired(lease) => match handler(&d.message) {
                    Ok(result) => {
                        leases.push(lease);
                        bodies.push(result);
                        acted.push(i);
                        continue;
                    }
                    Err(_) => {
                        let _ = lease.release();
                        Disposition::Failed
                    }
                },
                Claim::Completed { result, .. } => Disposition::Replayed { result },
                Claim::InProgress { until } => Disposition::InProgress { until },
                Claim::Conflict => {
                    on_conflict(&d.message);
                    Disposition::Conflict
                }
                Claim::Unavailable => Disposition::Unavailable,
                Claim::Late { .. } => Disposition::Late,
            });
        }
        // A repeat with another payload than its first delivery's is a
        // conflict, whatever the first's outcome.
        for (i, d) in batch.iter().enumerate() {
            if let Err(j) = slot[i] {
                if let (Some(a), Some(b)) = (batch[j].payload, d.payload) {
                    if a != b {
                        on_conflict(&d.message);
                        out[i] = Some(Disposition::Conflict);
                    }
                }
            }
        }
        // The results a repeat in this batch replays are kept (copied once).
        let mut stored: Vec<Option<Arc<[u8]>>> = vec![None; batch.len()];
        for (&i, body) in acted.iter().zip(&bodies) {
            if repeated[i] {
                stored[i] = Some(Arc::from(&body[..]));
            }
        }
        Step {
            carried,
            carried_bodies,
            out,
            leases,
            bodies,
            acted,
            slot,
            stored,
        }
    }

    /// Commits `leases[k]` with `bodies[k]` in one call, then tries the
    /// ones the exact tier failed again ([`BatchConsumer::retry_unavailable`]).
    /// Whether each was stored.
    fn commit_with_retry(&self, leases: Vec<Lease<Arc<Deduper>>>, bodies: &[Vec<u8>]) -> Vec<bool> {
        let commits = leases
            .into_iter()
            .zip(bodies)
            .map(|(lease, body)| (lease, &body[..]))
            .collect();
        let outcomes = self.engine.commit_batch(commits);
        self.retry_unavailable(outcomes, bodies)
    }

    /// Given the outcomes of commits of `bodies` (in order), tries the ones
    /// the exact tier failed (`CommitError::Unavailable`) again, the whole
    /// set in one call per try, for up to the consumer's retry budget.
    /// Whether each was stored; a commit not stored has its lease released
    /// (lost, or handed back: too large, or the tier still failing).
    fn retry_unavailable(
        &self,
        outcomes: Vec<Result<(), CommitError<Arc<Deduper>>>>,
        bodies: &[Vec<u8>],
    ) -> Vec<bool> {
        let mut stored = vec![false; outcomes.len()];
        let mut pending: Vec<usize> = (0..outcomes.len()).collect();
        let mut outcomes = outcomes;
        let give_up = Instant::now() + self.commit_retry;
        let mut pause = RETRY_PAUSE_FIRST;
        loop {
            let mut again = Vec::new();
            let mut retry = Vec::new();
            for (&k, outcome) in pending.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => stored[k] = true,
                    Err(CommitError::Unavailable { lease, .. })
                        if Instant::now() + pause < give_up =>
                    {
                        again.push(lease);
                        retry.push(k);
                    }
                    // Lost, or handed back (too large, the tier down past
                    // the budget): the effect is done but not recorded;
                    // give the key up.
                    Err(e) => {
                        if let Some(lease) = e.into_lease() {
                            let _ = lease.release();
                        }
                    }
                }
            }
            if again.is_empty() {
                return stored;
            }
            self.counters
                .commit_retries
                .fetch_add(again.len() as u64, Ordering::Relaxed);
            std::thread::sleep(pause);
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
            let commits = again
                .into_iter()
                .zip(&retry)
                .map(|(lease, &k)| (lease, &bodies[k][..]))
                .collect();
            outcomes = self.engine.commit_batch(commits);
            pending = retry;
        }
    }
}

/// A batch claimed and acted on, not yet committed (see
/// `BatchConsumer::claim_and_act`).
struct Step {
    /// The outcomes of the commits sent with the claims (pipelined), and
    /// their results, in the order they were given.
    carried: Vec<Result<(), CommitError<Arc<Deduper>>>>,
    carried_bodies: Vec<Vec<u8>>,
    /// Each delivery's disposition; `None` for the ones acted on (until
    /// committed) and for repeats (until [`Step::follow`]).
    out: Vec<Option<Disposition>>,
    /// The handler's successes: their leases and results, and positions.
    leases: Vec<Lease<Arc<Deduper>>>,
    bodies: Vec<Vec<u8>>,
    acted: Vec<usize>,
    /// Per delivery: `Ok(request)`, or `Err(first)` for a repeat of the
    /// delivery at `first`.
    slot: Vec<Result<usize, usize>>,
    /// The results of first deliveries that a repeat replays.
    stored: Vec<Option<Arc<[u8]>>>,
}

impl Step {
    /// Repeats within the batch follow their first delivery (once the
    /// first ones are settled): a committed one's result is replayed.
    fn follow<M>(&mut self, batch: &[Delivery<M>]) {
        for i in 0..batch.len() {
            let Err(j) = self.slot[i] else { continue };
            if self.out[i].is_some() {
                continue; // a conflict
            }
            self.out[i] = Some(match self.out[j].clone().expect("settled first") {
                Disposition::Processed | Disposition::Uncommitted => Disposition::Replayed {
                    result: self.stored[j].clone().unwrap_or_else(|| Arc::from(&[][..])),
                },
                other => other,
            });
        }
    }
}

/// The commits [`BatchConsumer::process_pipelined`] holds back to send
/// with the next batch's claims: the handled messages of the last batch,
/// their leases and results. Flush it ([`BatchConsumer::flush`]) before
/// dropping it: dropped, it releases the leases, and the messages (never
/// acked) are delivered and acted on again.
#[derive(Debug)]
pub struct Held<M> {
    messages: Vec<M>,
    leases: Vec<Lease<Arc<Deduper>>>,
    bodies: Vec<Vec<u8>>,
}

impl<M> Default for Held<M> {
    fn default() -> Self {
        Held {
            messages: Vec::new(),
            leases: Vec::new(),
            bodies: Vec::new(),
        }
    }
}

impl<M> Held<M> {
    /// Nothing held.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many handled messages wait for their commit.
    #[must_use]
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when no commit waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer() -> BatchConsumer {
        BatchConsumer::new(Arc::new(Deduper::builder().build().unwrap()))
    }

    #[test]
    fn acquired_runs_once_and_repeats_replay_the_result() {
        let c = consumer();
        let mut runs = 0;
        let out = c.process(
            vec![Delivery::new("a", 1), Delivery::new("b", 2)],
            |m: &i32| {
                runs += 1;
                Ok::<_, ()>(vec![*m as u8])
            },
            |_| {},
        );
        assert!(out.iter().all(|(_, d)| *d == Disposition::Processed));
        let out = c.process(vec![Delivery::new("a", 3)], |_| Ok::<_, ()>(vec![]), |_| {});
        assert_eq!(
            out[0].1,
            Disposition::Replayed {
                result: Arc::from(&[1u8][..])
            }
        );
        assert_eq!(runs, 2);
        let s = c.stats();
        assert_eq!(
            (s.batches, s.delivered, s.processed, s.replayed),
            (2, 3, 2, 1)
        );
    }

    #[test]
    fn a_failed_handler_releases_and_asks_for_redelivery() {
        let c = consumer();
        let out = c.process(
            vec![Delivery::new("a", 1)],
            |_| Err::<Vec<u8>, _>("no"),
            |_| {},
        );
        assert_eq!(out[0].1, Disposition::Failed);
        assert!(!out[0].1.should_ack());
        let out = c.process(vec![Delivery::new("a", 1)], |_| Ok::<_, ()>(vec![]), |_| {});
        assert_eq!(out[0].1, Disposition::Processed, "released: acts again");
    }

    #[test]
    fn a_held_key_is_in_progress_and_a_different_payload_conflicts() {
        let c = consumer();
        let lease = c
            .engine()
            .claim_owned(ClaimRequest::new("held").payload(PayloadFingerprint(1)))
            .into_lease()
            .unwrap();
        let mut dead = Vec::new();
        let out = c.process(
            vec![
                Delivery::new("held", 1),
                Delivery::new("held", 2).payload(PayloadFingerprint(2)),
            ],
            |_| Ok::<_, ()>(vec![]),
            |m: &i32| dead.push(*m),
        );
        assert!(matches!(out[0].1, Disposition::InProgress { .. }));
        assert!(out[0].1.redeliver_after(Timestamp::from_nanos(0)).is_some());
        // The second delivery of the key in the batch follows the first.
        assert!(matches!(out[1].1, Disposition::InProgress { .. }));
        lease.commit(b"").unwrap();
        let out = c.process(
            vec![Delivery::new("held", 3).payload(PayloadFingerprint(2))],
            |_| Ok::<_, ()>(vec![]),
            |m: &i32| dead.push(*m),
        );
        assert_eq!(out[0].1, Disposition::Conflict);
        assert!(out[0].1.should_ack());
        assert_eq!(dead, vec![3]);
    }

    #[test]
    fn a_key_twice_in_one_batch_runs_once() {
        let c = consumer();
        let mut runs = 0;
        let out = c.process(
            vec![
                Delivery::new("k", 1),
                Delivery::new("j", 3),
                Delivery::new("k", 2),
            ],
            |m: &i32| {
                runs += 1;
                Ok::<_, ()>(vec![*m as u8; 3])
            },
            |_| {},
        );
        assert_eq!(runs, 2);
        assert_eq!(out[0].1, Disposition::Processed);
        assert_eq!(out[1].1, Disposition::Processed);
        // The repeat replays the first delivery's result, byte for byte.
        assert_eq!(
            out[2].1,
            Disposition::Replayed {
                result: Arc::from(&[1u8, 1, 1][..])
            }
        );
    }

    #[test]
    fn pipelined_commits_go_with_the_next_batch() {
        let c = consumer();
        let mut held = Held::new();
        let mut runs = Vec::new();
        let out = c.process_pipelined(
            &mut held,
            vec![
                Delivery::new("a", 1),
                Delivery::new("b", 2),
                Delivery::new("a", 3),
            ],
            |m: &i32| {
                runs.push(*m);
                Ok::<_, ()>(vec![*m as u8])
            },
            |_| {},
        );
        // The handled ones wait for their commit; the repeat within the
        // batch replays the first's result at once.
        assert_eq!(held.len(), 2);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 3);
        assert_eq!(
            out[0].1,
            Disposition::Replayed {
                result: Arc::from(&[1u8][..])
            }
        );
        // Not committed yet: the key is held.
        assert!(matches!(c.engine().claim("a"), Claim::InProgress { .. }));
        let out = c.process_pipelined(
            &mut held,
            vec![Delivery::new("a", 4), Delivery::new("c", 5)],
            |m: &i32| {
                runs.push(*m);
                Ok::<_, ()>(vec![*m as u8])
            },
            |_| {},
        );
        // The first batch's commits went first: its messages are settled,
        // and the repeat of "a" in this batch found it completed.
        let got: Vec<(i32, Disposition)> = out.into_iter().collect();
        assert_eq!(got[0], (1, Disposition::Processed));
        assert_eq!(got[1], (2, Disposition::Processed));
        assert_eq!(
            got[2],
            (
                4,
                Disposition::Replayed {
                    result: Arc::from(&[1u8][..])
                }
            )
        );
        assert_eq!(got.len(), 3);
        assert_eq!(held.len(), 1);
        let out = c.flush(&mut held);
        assert_eq!(out, vec![(5, Disposition::Processed)]);
        assert!(held.is_empty());
        assert!(c.flush(&mut held).is_empty());
        assert_eq!(runs, vec![1, 2, 5]);
        let s = c.stats();
        assert_eq!(
            (s.batches, s.delivered, s.processed, s.replayed),
            (2, 5, 3, 2)
        );
    }

    #[test]
    fn held_commits_dropped_unflushed_release_their_keys() {
        let c = consumer();
        let mut held = Held::new();
        let out = c.process_pipelined(
            &mut held,
            vec![Delivery::new("a", 1)],
            |_: &i32| Ok::<_, ()>(vec![]),
            |_| {},
        );
        assert!(out.is_empty());
        drop(held);
        // As if never claimed: the redelivery acts again.
        assert!(matches!(c.engine().claim("a"), Claim::Acquired(_)));
    }

    /// Random batches through `process` and through `process_pipelined`
    /// (flushed at the end) on two engines: every message gets the same
    /// disposition and the handler runs for the same messages.
    #[test]
    fn pipelined_matches_one_batch_at_a_time() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let plain = consumer();
        let piped = consumer();
        let mut held = Held::new();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut runs_a, mut runs_b) = (Vec::new(), Vec::new());
        // A message fails its handler when its id says so (the same in
        // both runs).
        let fails = |m: &u64| m % 7 == 3;
        let mut id = 0u64;
        for round in 0..400 {
            let len = (next() % 24) as usize;
            let batch: Vec<(String, Option<u64>, u64)> = (0..len)
                .map(|_| {
                    id += 1;
                    let key = format!("k{}", next() % 60);
                    let payload = (next() % 5 == 0).then(|| next() % 2);
                    (key, payload, id)
                })
                .collect();
            let deliveries = || {
                batch
                    .iter()
                    .map(|(k, p, m)| {
                        let d = Delivery::new(k, *m);
                        match p {
                            Some(p) => d.payload(PayloadFingerprint(*p)),
                            None => d,
                        }
                    })
                    .collect::<Vec<_>>()
            };
            a.extend(plain.process(
                deliveries(),
                |m| {
                    runs_a.push(*m);
                    if fails(m) {
                        Err(())
                    } else {
                        Ok(m.to_le_bytes().to_vec())
                    }
                },
                |_| {},
            ));
            b.extend(piped.process_pipelined(
                &mut held,
                deliveries(),
                |m| {
                    runs_b.push(*m);
                    if fails(m) {
                        Err(())
                    } else {
                        Ok(m.to_le_bytes().to_vec())
                    }
                },
                |_| {},
            ));
            if round % 37 == 0 {
                b.extend(piped.flush(&mut held));
            }
        }
        b.extend(piped.flush(&mut held));
        a.sort_by_key(|(m, _)| *m);
        b.sort_by_key(|(m, _)| *m);
        assert_eq!(a.len(), id as usize);
        assert_eq!(a, b);
        assert_eq!(runs_a, runs_b);
        let (sa, sb) = (plain.stats(), piped.stats());
        assert_eq!(sa.processed, sb.processed);
        assert_eq!(sa.replayed, sb.replayed);
        assert_eq!(sa.failed, sb.failed);
        assert_eq!(sa.conflicts, sb.conflicts);
        assert!(sa.conflicts > 0 && sa.failed > 0 && sa.replayed > 0);
    }
}
