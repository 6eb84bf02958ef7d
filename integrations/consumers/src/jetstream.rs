//! NATS JetStream: a pull consumer with explicit acks.
//!
//! ```text
//! next_batch   pull (linger 1 ms) ─▶ claim, act, commit ─▶ settle:
//!                Processed/Replayed/Conflict/Uncommitted → ack (or double-ack)
//!                Failed                → nak (redeliver now)
//!                InProgress{until}     → nak with the holder's remaining lease
//!                Unavailable           → nak with 100 ms
//!              bad message (no key)   → term (never redelivered), counted
//! ```
//!
//! A consumer killed before it acks has its messages redelivered by the
//! server after the consumer's `AckWait`; the claim (not the ack) decides
//! who acts: JetStream accepts a late ack of a message it has redelivered,
//! so a slow worker cannot know its ack won — the lease's fencing token
//! and the commit's refusal after expiry do. Acks are fire-and-forget by
//! default (one publish each); [`JetStreamConsumer::confirm_acks`] waits for
//! the server's confirmation (`double_ack`), worth it before a graceful
//! exit or when the next step must not see a redelivery.
//!
//! Publish with [`publish`]: the `Nats-Msg-Id` header lets the stream drop
//! a re-publish within its `duplicate_window` (a producer's retry). The
//! engine adds what that window cannot do: business keys (not message ids)
//! over windows far longer than the stream's, across streams and subjects,
//! and payload fingerprints (a key reused for another payload is a
//! conflict, not a silent drop).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, Context};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::Message;
use futures_util::StreamExt;
use tiered_dedup::consumer::Disposition;
use tiered_dedup::Timestamp;

use crate::{Batching, ConsumerError};

fn broker(e: impl std::fmt::Display) -> ConsumerError {
    ConsumerError::Broker(e.to_string())
}

fn ended() -> ConsumerError {
    ConsumerError::Broker(
        "the pull stream ended (its consumer was deleted, or the connection closed for good)"
            .to_owned(),
    )
}

/// A durable pull consumer's configuration for deduplicated consumption:
/// explicit acks, `ack_wait` before a redelivery (longer than a batch's
/// handler runs, and at least the claims' lease), unlimited deliveries.
#[must_use]
pub fn consumer_config(durable: &str, ack_wait: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(durable.to_owned()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: 100_000,
        ..Default::default()
    }
}

/// Publishes `payload` to `subject` with `Nats-Msg-Id: msg_id` and waits
/// for the stream's acknowledgement (`duplicate: true` when the stream's
/// window dropped it).
///
/// # Errors
/// [`ConsumerError::Broker`] when the publish or its acknowledgement failed.
pub async fn publish(
    js: &Context,
    subject: &str,
    msg_id: &str,
    payload: Vec<u8>,
) -> Result<bool, ConsumerError> {
    let ack = js
        .send_publish(
            subject.to_owned(),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .message_id(msg_id),
        )
        .await
        .map_err(broker)?
        .await
        .map_err(broker)?;
    Ok(ack.duplicate)
}

/// Counts of what [`JetStreamConsumer::settle`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckStats {
    /// Acks (and double acks).
    pub acked: u64,
    /// Negative acks (redeliveries asked for).
    pub naked: u64,
    /// Bad messages terminated.
    pub terminated: u64,
}

/// Batches from a JetStream pull consumer, settled after processing.
pub struct JetStreamConsumer {
    messages: pull::Stream,
    /// The consumer pulled from, asked whether it still exists when the
    /// pull goes quiet with an error (see [`JetStreamConsumer::next_batch`]).
    consumer: PullConsumer,
    batching: Batching,
    confirm_acks: bool,
    acked: AtomicU64,
    naked: AtomicU64,
    terminated: AtomicU64,
    missed_heartbeats: AtomicU64,
    /// Set once the pull stream ended: every later call fails.
    ended: bool,
}

impl JetStreamConsumer {
    /// Starts pulling from `consumer` in batches of `batching.max`, with
    /// the server's idle heartbeat every 5 s.
    ///
    /// # Errors
    /// [`ConsumerError::Broker`] when the pull cannot start.
    pub async fn new(consumer: &PullConsumer, batching: Batching) -> Result<Self, ConsumerError> {
        Self::with_heartbeat(consumer, batching, Duration::from_secs(5)).await
    }

    /// As [`JetStreamConsumer::new`], with the server's idle heartbeat
    /// every `heartbeat` (at most 15 s: half the pull's 30 s expiry). Two
    /// heartbeats missed in a row (a stalled server or network) make
    /// [`JetStreamConsumer::next_batch`] answer an empty batch and count it
    /// in [`JetStreamConsumer::missed_heartbeats`]; the pull goes on.
    ///
    /// # Errors
    /// [`ConsumerError::Broker`] when the pull cannot start.
    pub async fn with_heartbeat(
        consumer: &PullConsumer,
        batching: Batching,
        heartbeat: Duration,
    ) -> Result<Self, ConsumerError> {
        let messages = consumer
            .stream()
            .max_messages_per_batch(batching.max.max(1))
            .heartbeat(heartbeat.min(Duration::from_secs(15)))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(broker)?;
        Ok(JetStreamConsumer {
            messages,
            consumer: consumer.clone(),
            batching,
            confirm_acks: false,
            acked: AtomicU64::new(0),
            naked: AtomicU64::new(0),
            terminated: AtomicU64::new(0),
            missed_heartbeats: AtomicU64::new(0),
            ended: false,
        })
    }

    /// Waits for the server to confirm each ack (`double_ack`): one round
    /// trip per message. Default: off (fire-and-forget acks).
    #[must_use]
    pub fn confirm_acks(mut self, on: bool) -> Self {
        self.confirm_acks = on;
        self
    }

    /// What was settled so far.
    #[must_use]
    pub fn ack_stats(&self) -> AckStats {
        AckStats {
            acked: self.acked.load(Ordering::Relaxed),
            naked: self.naked.load(Ordering::Relaxed),
            terminated: self.terminated.load(Ordering::Relaxed),
        }
    }

    /// True once the pull stream has ended (see
    /// [`JetStreamConsumer::next_batch`]): make a new consumer to go on.
    #[must_use]
    pub fn has_ended(&self) -> bool {
        self.ended
    }

    /// How many times the server's idle heartbeat was missed (the pull
    /// went on each time).
    #[must_use]
    pub fn missed_heartbeats(&self) -> u64 {
        self.missed_heartbeats.load(Ordering::Relaxed)
    }

    /// The next batch: waits up to `batching.wait` for a first message,
    /// then `batching.linger` for more, up to `batching.max`. Empty when
    /// nothing came, or when the server's idle heartbeat was missed (the
    /// pull stream recovers by itself: counted, not an error); a missed
    /// heartbeat also asks the server, for at most 2 s more, whether the
    /// consumer still exists (deleted while this client was disconnected,
    /// the pull has ended).
    ///
    /// # Errors
    /// [`ConsumerError::Broker`] when the pull failed before any message
    /// came (an error after some is left for the next call), and on every
    /// call once the pull stream has ended (the consumer was deleted, or
    /// the connection closed for good): a consumer loop must not mistake a
    /// dead pull for an idle stream. Start a new `JetStreamConsumer` then.
    pub async fn next_batch(&mut self) -> Result<Vec<Message>, ConsumerError> {
        if self.ended {
            return Err(ended());
        }
        let mut batch = Vec::new();
        match tokio::time::timeout(self.batching.wait, self.messages.next()).await {
            Err(_) => return Ok(batch),
            Ok(None) => {
                self.ended = true;
                return Err(ended());
            }
            Ok(Some(Err(e))) if e.kind() == MessagesErrorKind::MissingHeartbeat => {
                self.missed_heartbeats.fetch_add(1, Ordering::Relaxed);
                if self.consumer_is_gone().await {
                    self.ended = true;
                    return Err(ended());
                }
                return Ok(batch);
            }
            Ok(Some(Err(e))) => {
                // These end the pull stream (async-nats terminates it):
                // say so now, not one call later.
                if matches!(
                    e.kind(),
                    MessagesErrorKind::ConsumerDeleted
                        | MessagesErrorKind::PushBasedConsumer
                        | MessagesErrorKind::RequestLimitExceeded
                ) || self.consumer_is_gone().await
                {
                    self.ended = true;
                }
                return Err(broker(e));
            }
            Ok(Some(Ok(m))) => batch.push(m),
        }
        let deadline = tokio::time::Instant::now() + self.batching.linger;
        while batch.len() < self.batching.max {
            match tokio::time::timeout_at(deadline, self.messages.next()).await {
                Ok(Some(Ok(m))) => batch.push(m),
                Ok(None) => {
                    // Answered next time: these messages are processed first.
                    self.ended = true;
                    break;
                }
                _ => break,
            }
        }
        Ok(batch)
    }

    /// True when the server says the consumer (or its stream) no longer
    /// exists. A consumer deleted while this client was disconnected sends
    /// no `ConsumerDeleted` to the pull: the pull only misses heartbeats or
    /// finds no responder, which a stalled server does too, so the server
    /// is asked (one request, at most 2 s). No answer is not an answer: the
    /// pull goes on.
    async fn consumer_is_gone(&self) -> bool {
        match tokio::time::timeout(Duration::from_secs(2), self.consumer.get_info()).await {
            Ok(Err(e)) => matches!(
                e.kind(),
                ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
            ),
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    /// Acks, naks (with a delay where a holder's lease is known) or leaves
    /// each message as its disposition says.
    ///
    /// # Errors
    /// [`ConsumerError::Broker`] when an ack could not be sent (the message
    /// is redelivered after `AckWait`, and answers `Completed`).
    pub async fn settle(
        &self,
        settled: impl IntoIterator<Item = (Message, Disposition)>,
    ) -> Result<(), ConsumerError> {
        let now = Timestamp::now();
        for (m, d) in settled {
            if d.should_ack() {
                if self.confirm_acks {
                    m.double_ack().await.map_err(broker)?;
                } else {
                    m.ack().await.map_err(broker)?;
                }
                self.acked.fetch_add(1, Ordering::Relaxed);
            } else {
                let delay = d.redeliver_after(now).filter(|d| !d.is_zero());
                m.ack_with(AckKind::Nak(delay)).await.map_err(broker)?;
                self.naked.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Terminates a message that cannot be processed (malformed, no key):
    /// the server never redelivers it.
    ///
    /// # Errors
    /// [`ConsumerError::Broker`] when the term could not be sent.
    pub async fn reject(&self, m: &Message) -> Result<(), ConsumerError> {
        m.ack_with(AckKind::Term).await.map_err(broker)?;
        self.terminated.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
