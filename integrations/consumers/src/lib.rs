//! # tiered-dedup-consumers
//!
//! Broker consumers for [`tiered_dedup`], effectively once end to end:
//! every delivery is **claimed, acted on, committed, then acked** — the
//! order that neither loses a message (the hand-written "mark, then act")
//! nor repeats one after a crash past the commit (the hand-written "act,
//! then mark"). The broker-neutral step is [`tiered_dedup::consumer`]; this
//! crate connects it to two brokers, a module (and a feature) each:
//!
//! - [`jetstream`] (feature `jetstream`, on `async-nats`): a pull consumer
//!   with explicit acks; redelivery after `AckWait`; negative acks with a
//!   delay for keys another consumer holds; publishing with `Nats-Msg-Id`.
//! - [`redis_streams`] (feature `redis-streams`, on `redis`): consumer
//!   groups with `XREADGROUP` and `XACK`, and `XAUTOCLAIM` of the entries a
//!   dead consumer left pending.
//! - [`transactional`] (feature `postgres`): the handler's effect and the
//!   claim's record in one PostgreSQL transaction — exactly once, whatever
//!   crashes (the only mode that closes the effect-to-commit window).
//!
//! ```text
//! broker ──batch (linger 1 ms)──▶ claim the batch (one engine call, one round trip)
//!        ◀──ack / nak / leave──── act on Acquired → commit (or release) → dispositions
//! ```
//!
//! Claims go to the engine in one call per batch, on a blocking thread
//! ([`process_blocking`]): a remote exact tier's round trip, or a handler
//! that does I/O, never blocks a runtime worker. With the memory tier and
//! a handler that does not block, [`BatchConsumer::process`] can be called
//! on the worker directly (it saves the thread hop). On a remote tier,
//! [`process_pipelined_blocking`] sends a batch's commits with the next
//! batch's claims: one round trip per batch instead of two
//! ([`flush_blocking`] when a read comes back short, and before stopping).
//! What each mode survives, and what the engine adds to JetStream's own
//! duplicate window, is in `docs/consumers.md`.

#[cfg(feature = "jetstream")]
pub mod jetstream;
#[cfg(feature = "redis-streams")]
pub mod redis_streams;
#[cfg(feature = "postgres")]
pub mod transactional;

use std::sync::Arc;
use std::time::Duration;

use tiered_dedup::consumer::{BatchConsumer, Delivery, Disposition, Held};

/// How a consumer gathers a batch from its broker.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// The most messages in one batch. Default: 256.
    pub max: usize,
    /// Once a first message is in, how long to wait for more before
    /// claiming (amortizes the engine's round trip). Default: 1 ms.
    pub linger: Duration,
    /// How long to wait for a first message before answering an empty
    /// batch. Default: 1 s.
    pub wait: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max: 256,
            linger: Duration::from_millis(1),
            wait: Duration::from_secs(1),
        }
    }
}

/// Why a consumer call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The broker refused or the connection failed.
    #[error("broker: {0}")]
    Broker(String),
    /// PostgreSQL failed (transactional mode): nothing of the batch was
    /// committed.
    #[cfg(feature = "postgres")]
    #[error("postgres: {0}")]
    Postgres(#[from] tiered_dedup_postgres::PgError),
    /// The blocking task that ran the batch panicked or was cancelled.
    #[error("the batch's blocking task failed: {0}")]
    Task(String),
}

/// A message that cannot be processed at all (malformed, no key): it is
/// counted and rejected (terminated or acked), never retried.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad message: {0}")]
pub struct BadMessage(pub String);

/// Runs [`BatchConsumer::process`] for `batch` on a blocking thread (the
/// engine's claim and commit may wait on a remote tier), with `handler`
/// run on each acquired delivery and `on_conflict` on each conflict.
///
/// # Errors
/// [`ConsumerError::Task`] when the blocking task panicked.
pub async fn process_blocking<M, E, H, C>(
    consumer: &Arc<BatchConsumer>,
    batch: Vec<Delivery<M>>,
    handler: &Arc<H>,
    on_conflict: &Arc<C>,
) -> Result<Vec<(M, Disposition)>, ConsumerError>
where
    M: Send + 'static,
    H: Fn(&M) -> Result<Vec<u8>, E> + Send + Sync + 'static + ?Sized,
    C: Fn(&M) + Send + Sync + 'static + ?Sized,
{
    let consumer = Arc::clone(consumer);
    let handler = Arc::clone(handler);
    let on_conflict = Arc::clone(on_conflict);
    blocking(move || consumer.process(batch, |m| handler(m), |m| on_conflict(m))).await
}

/// Runs `work` on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ConsumerError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ConsumerError::Task(e.to_string()))
}

/// Runs [`BatchConsumer::process_pipelined`] for `batch` on a blocking
/// thread: the commits `held` holds (the last batch's) go to the engine
/// with this batch's claims, in one call, and this batch's commits are
/// held in turn. Returns what to do with the messages settled now, and
/// what is held for the next call (or for [`flush_blocking`]).
///
/// # Errors
/// [`ConsumerError::Task`] when the blocking task panicked (the held
/// commits are lost with it: their leases expire, their messages are
/// delivered again).
pub async fn process_pipelined_blocking<M, E, H, C>(
    consumer: &Arc<BatchConsumer>,
    held: Held<M>,
    batch: Vec<Delivery<M>>,
    handler: &Arc<H>,
    on_conflict: &Arc<C>,
) -> Result<(Vec<(M, Disposition)>, Held<M>), ConsumerError>
where
    M: Send + 'static,
    H: Fn(&M) -> Result<Vec<u8>, E> + Send + Sync + 'static + ?Sized,
    C: Fn(&M) + Send + Sync + 'static + ?Sized,
{
    let consumer = Arc::clone(consumer);
    let handler = Arc::clone(handler);
    let on_conflict = Arc::clone(on_conflict);
    blocking(move || {
        let mut held = held;
        let settled =
            consumer.process_pipelined(&mut held, batch, |m| handler(m), |m| on_conflict(m));
        (settled, held)
    })
    .await
}

/// Runs [`BatchConsumer::flush`] on a blocking thread: commits what `held`
/// holds on its own; what to do with those messages (all acked).
///
/// # Errors
/// [`ConsumerError::Task`] when the blocking task panicked.
pub async fn flush_blocking<M: Send + 'static>(
    consumer: &Arc<BatchConsumer>,
    held: Held<M>,
) -> Result<Vec<(M, Disposition)>, ConsumerError> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let consumer = Arc::clone(consumer);
    blocking(move || {
        let mut held = held;
        consumer.flush(&mut held)
    })
    .await
}

/// `docs/consumers.md`'s examples, compiled and run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/consumers.md")]
pub struct ConsumersDocDoctests;
