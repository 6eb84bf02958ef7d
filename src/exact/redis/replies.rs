//! Reading the replies of marks in flight (single server), one per command
//! sent: each says whether Redis stored its bucket's marks. Marks Redis
//! refused (an error reply: out of memory, no permission, read-only) or
//! whose reply never came go back to the retry buffer; the others are
//! counted written. Nothing is taken for stored without its reply.

use std::sync::atomic::Ordering;

use redis::Value;

use super::conn::Conn;
use super::error;
use super::RedisPartition;
use crate::error::{ExactTierError, FailureCause};
use crate::exact::table::FingerprintTable;
use crate::exact::Mark;

/// Marks written to a single server whose replies are not read yet. Its
/// vectors and table keep their memory between batches (they swap with
/// the unsent marks').
pub(super) struct InFlight {
    /// The marks, in the order they were kept (oldest first).
    pub(super) marks: Vec<Mark>,
    /// Their index, for lookups that overtake them.
    pub(super) index: FingerprintTable,
    /// Indices into `marks`, grouped by bucket as they were sent.
    pub(super) order: Vec<u32>,
    /// Indices into `marks` of those whose bodies were sent to body
    /// hashes, grouped by slice as they were sent.
    pub(super) bodies: Vec<u32>,
    /// What each command sent carries, in order: the replies owed.
    pub(super) sent: Vec<Sent>,
}

impl InFlight {
    pub(super) fn new() -> Self {
        InFlight {
            marks: Vec::new(),
            index: FingerprintTable::new(),
            order: Vec::new(),
            bodies: Vec::new(),
            sent: Vec::new(),
        }
    }
}

/// The bucket number under which a slice's body hash is remembered as
/// given its TTL (`expiring`).
pub(super) const BODY_HASH: u64 = u64::MAX;

/// What one command on the mark connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sent {
    /// The write of one bucket: the marks `order[start..end]`.
    Marks { start: u32, end: u32 },
    /// The write of one slice's bodies (kept apart from record strings):
    /// those of the marks `bodies[start..end]`. A mark is stored once its
    /// bucket's write and its body's are.
    Bodies { start: u32, end: u32 },
    /// The first `PEXPIRE` of a bucket (or of a slice's body hash:
    /// [`BODY_HASH`]).
    Expire { slice: u64, bucket: u64 },
    /// A compaction or a retired slice's `UNLINK`: no mark depends on it.
    Upkeep,
}

impl RedisPartition {
    /// Reads the replies of the marks in flight (single server). Marks
    /// whose command Redis answered without an error are written; the
    /// others go back to the front of the unsent marks (older than those),
    /// for the next retry. An error reply leaves the connection open (it
    /// is in step) but holds the next retry back (backoff); a failed read
    /// (timeout, connection lost) drops the connection, and every mark
    /// whose reply was not read counts as not stored.
    ///
    /// # Errors
    /// The first refusal's or the read's error, with its cause.
    pub(super) fn settle(&mut self) -> Result<(), ExactTierError> {
        if self.in_flight.sent.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.marks.bound(self.request_timeout()) {
            let err = self.error(&e);
            self.fail_marks(&err);
        }
        let in_flight = &self.in_flight;
        let mut conn = match &mut self.marks.conn {
            Some(Conn::Single(c)) => Some(c),
            _ => None,
        };
        // Indices (into `in_flight.marks`) of marks not stored: refused by
        // Redis, or unknown after a failed read.
        let mut not_stored: Vec<u32> = Vec::new();
        let mut refused_marks: Vec<u32> = Vec::new();
        let mut refusal: Option<redis::RedisError> = None;
        let mut broken: Option<ExactTierError> = None;
        let mut fresh = Vec::new();
        // The marks a command carries.
        let carried = |sent: Sent| match sent {
            Sent::Marks { start, end } => &in_flight.order[start as usize..end as usize],
            Sent::Bodies { start, end } => &in_flight.bodies[start as usize..end as usize],
            Sent::Expire { .. } | Sent::Upkeep => &[],
        };
        for &sent in &in_flight.sent {
            let reply = match &mut conn {
                Some(c) if broken.is_none() => c.recv_response(),
                _ => {
                    not_stored.extend(carried(sent));
                    continue;
                }
            };
            match (sent, reply) {
                (Sent::Marks { .. } | Sent::Bodies { .. }, Ok(Value::ServerError(e))) => {
                    not_stored.extend(carried(sent));
                    refused_marks.extend(carried(sent));
                    refusal.get_or_insert(e.into());
                }
                (Sent::Expire { slice, bucket }, Ok(Value::Int(1))) => fresh.push((slice, bucket)),
                // Written (an APPEND's length, an HSET's count); a bucket
                // already gone (`PEXPIRE` 0); compaction and deletes are
                // best effort.
                (_, Ok(_)) => {}
                (sent, Err(e)) => {
                    broken = Some(error::remote(&self.server, &e));
                    not_stored.extend(carried(sent));
                }
            }
        }
        if conn.is_none() && broken.is_none() {
            broken = Some(error::failure(
                &self.server,
                FailureCause::ConnectionLost,
                "the connection marks were sent on was dropped",
            ));
        }
        // Oldest first, as they were kept; once each (a mark whose body
        // and record both failed).
        not_stored.sort_unstable();
        not_stored.dedup();
        refused_marks.sort_unstable();
        refused_marks.dedup();
        let refused = refused_marks.len();
        let again: Vec<Mark> = not_stored
            .iter()
            .map(|&i| in_flight.marks[i as usize])
            .collect();
        let written = in_flight.marks.len() - again.len();
        let stored: Vec<Mark> = {
            let mut not = not_stored.iter().peekable();
            (0u32..)
                .zip(&in_flight.marks)
                .filter(|(i, _)| {
                    while not.peek().is_some_and(|&&n| n < *i) {
                        not.next();
                    }
                    not.peek() != Some(&i)
                })
                .map(|(_, m)| *m)
                .collect()
        };
        self.in_flight.marks.clear();
        self.in_flight.index.clear();
        self.in_flight.order.clear();
        self.in_flight.bodies.clear();
        self.in_flight.sent.clear();
        self.expiring.extend(fresh);
        self.written(written);
        self.bodies_written(stored.iter());
        self.keep_again(again.into_iter());
        if refused > 0 {
            self.stats
                .marks_refused
                .fetch_add(refused as u64, Ordering::Relaxed);
        }
        if let Some(err) = broken {
            self.stats.record(&err);
            if self.marks.conn.is_some() {
                self.fail_marks(&err);
            }
            return Err(err);
        }
        if let Some(e) = refusal {
            let err = self.error(&e);
            return Err(self.hold_marks(&err));
        }
        self.marks.succeeded();
        Ok(())
    }

    /// Redis refused marks (an error reply, `text` on a cluster): the
    /// error, with the cause its code names.
    pub(super) fn refusal(&self, text: &str, marks: usize) -> ExactTierError {
        let code = text.split_whitespace().next().unwrap_or("");
        let cause = error::cause_of_code(code).unwrap_or(if text.contains("script") {
            FailureCause::Script
        } else if code == "WRONGTYPE" {
            // A key the tier uses holds another type: data it did not
            // write (as `error::cause_of` says of the same reply).
            FailureCause::UnexpectedReply
        } else {
            FailureCause::Other
        });
        self.error_of(cause, format!("{marks} marks refused: {text}"))
    }

    /// Redis refused marks with `err`: the connection is fine, but the
    /// next retry waits (backoff), so a full or forbidding server is not
    /// sent every batch again at once. Returns `err`.
    pub(super) fn hold_marks(&mut self, err: &ExactTierError) -> ExactTierError {
        let wait = self.marks.hold(err);
        self.failed(err, "Redis refused marks; kept for a retry", wait);
        err.clone()
    }
}
