//! Shared mode: a shard's claims, checks, commits, releases, extensions
//! and forgets appended to its log in Redis and answered from the replica
//! that replays it (`log.rs`); what happens when Redis cannot answer.
//!
//! One request per call (a pipeline: the log's read, then a transaction
//! appending; on a cluster, one script): the log is read
//! from where this replica stopped, then the call's entries are appended,
//! so the replica applies every engine's operations in the log's order,
//! its own among them (as sent, when nothing came between the read and
//! the append; else read back), and answers its own from the state they
//! meet. A committed
//! result lives in the shard's body hash of its acquisition slice
//! (`…:b:<slice>`, field fingerprint and token), written by the same
//! request before the commit that names it; answers that replay one read
//! them in one more request. A claim whose result an engine with a later
//! clock has deleted meanwhile (its slice retired) is decided again
//! through the log, past the record's window (`exchange_ops`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::Value;

use super::log::{decode_entry, encode_entry, Header, LogOp, Outcome, Replica, MAX_OPS};
use super::{FailurePolicy, RedisPartition};
use crate::error::{ExactTierError, FailureCause};
use crate::exact::table::FingerprintTable;
use crate::exact::{RecordBody, SharedAnswer, SharedOp};
use crate::fingerprint::{Fingerprint, FingerprintMap};
use crate::time::{slot_of, Timestamp, GENERATIONS};

/// Entries one read returns at most.
const READ_COUNT: usize = 256;
/// Retired slices whose result hashes wait for a proven clock at most
/// (`SharedLog::retired`).
const MAX_RETIRED: usize = 4 * GENERATIONS;
/// Bytes of one snapshot part (a Redis string of its own).
const SNAPSHOT_PART: usize = 1 << 20;
/// Reads one call makes at most while catching up (a replica far behind
/// catches up over several calls).
const MAX_READS: usize = 4096;

/// A shard's shared-mode state: its replica of the log and what it has
/// sent or still has to send.
pub(super) struct SharedLog {
    pub(super) replica: Replica,
    pub(super) log_key: String,
    epoch_key: String,
    /// This partition's name in the log (random per partition).
    writer: u64,
    next_batch: u64,
    /// The epoch of the log the replica follows (`None`: never read).
    epoch: Option<String>,
    /// The snapshot's pointer and the prefix of its parts' keys.
    snapshot_key: String,
    /// The generation (record-time slice; without a window, position) of
    /// the last snapshot this replica took or considered, and the entries
    /// applied since one was taken.
    snapshot_generation: u64,
    since_snapshot: u64,
    /// Checks accepted and releases made without Redis (fail open,
    /// fallback), oldest first, appended once it is back; the checks'
    /// index, for the decisions made meanwhile.
    kept: Vec<(u64, LogOp)>,
    kept_index: FingerprintTable,
    kept_checks: usize,
    /// Batches sent whose answer was lost: batch → its operations. The
    /// log may hold them (the request ran, its reply did not come back).
    lost: HashMap<u64, Vec<LogOp>>,
    lost_ops: usize,
    /// Checks of lost batches that recorded their key (fingerprint →
    /// time): the caller was told `Unavailable` and retries, and that
    /// retry is the check that accepts the key.
    reclaim: FingerprintMap<u64>,
    /// Leases acquired by claims of lost batches: nobody holds them;
    /// released with the next request.
    orphans: Vec<(Fingerprint, u64, u64)>,
    /// Slices whose result hashes this shard's rotation retired, not yet
    /// deleted: a hash goes only once the log shows a clock that reached
    /// its retiring slice ([`RedisPartition::unlink_retired`]), so a
    /// claim that finds a result missing always finds that proof too.
    retired: Vec<u64>,
    cluster_script: redis::Script,
    snapshot_script: redis::Script,
    scratch: Vec<LogOp>,
}

/// A distinct name for each partition of this process, and of others.
fn new_writer(shard: usize) -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&now.to_le_bytes());
    seed[8..16].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    seed[16..24].copy_from_slice(&(shard as u64).to_le_bytes());
    seed[24..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&seed)
}

impl SharedLog {
    pub(super) fn new(
        key_base: &str,
        shard: usize,
        span: Option<u64>,
        slice: Option<u64>,
        expected: usize,
    ) -> SharedLog {
        SharedLog {
            replica: Replica::with_capacity(span, slice, expected),
            log_key: format!("{key_base}log"),
            epoch_key: format!("{key_base}log:epoch"),
            writer: new_writer(shard),
            next_batch: 1,
            epoch: None,
            snapshot_key: format!("{key_base}snap"),
            snapshot_generation: 0,
            since_snapshot: 0,
            kept: Vec::new(),
            kept_index: FingerprintTable::new(),
            kept_checks: 0,
            lost: HashMap::new(),
            lost_ops: 0,
            reclaim: FingerprintMap::default(),
            orphans: Vec::new(),
            retired: Vec::new(),
            cluster_script: redis::Script::new(super::scripts::CLUSTER_LOG_SCRIPT),
            snapshot_script: redis::Script::new(super::scripts::SNAPSHOT_SCRIPT),
            scratch: Vec::new(),
        }
    }
}

/// One entry to append: its header and operations, and for each of them
/// where its answer goes (`None`: an operation of the tier's own).
struct Outgoing {
    header: Header,
    /// `header.now` is a check's or claim's lease clock.
    now_set: bool,
    ops: Vec<LogOp>,
    answer_to: Vec<Option<usize>>,
}

/// A field of a hash and its value.
type FieldValue<'a> = (&'a [u8], &'a [u8]);

/// What one request read.
struct Read {
    epoch: String,
    /// Sequences of the entries appended.
    appended: Vec<u64>,
    entries: Vec<(u64, Vec<u8>)>,
}

fn parse_seq(id: &[u8]) -> Option<u64> {
    std::str::from_utf8(id)
        .ok()?
        .strip_prefix("0-")?
        .parse()
        .ok()
}

/// The replies of a single server's log request — the bodies' `HSET`s and
/// `PEXPIRE`s, the `XRANGE`, then `MULTI`, the queued commands and `EXEC` —
/// as the cluster script answers: `[epoch, ids of the entries appended,
/// entries read]`.
/// `appended` entries were added and `expiring` keys given their TTL.
fn log_reply(mut replies: Vec<Value>, appended: usize, expiring: usize) -> Result<Value, String> {
    let Some(Value::Array(mut done)) = replies.pop() else {
        return Err("a log transaction that did not run".into());
    };
    // The transaction: the epoch set, then read, the ids, the expiries.
    if done.len() != 2 + appended + expiring {
        return Err(format!(
            "a log transaction of {} replies for {} commands",
            done.len(),
            2 + appended + expiring
        ));
    }
    done.truncate(2 + appended);
    let ids: Vec<Value> = done.drain(2..).collect();
    let epoch = done.pop().expect("two or more");
    // `MULTI`'s `OK` and each queued command's `QUEUED`.
    let queued = 1 + 2 + appended + expiring;
    if replies.len() < queued + 1 {
        return Err(format!("a log reply of {} parts", replies.len()));
    }
    replies.truncate(replies.len() - queued);
    let entries = replies.pop().expect("the read's reply");
    Ok(Value::Array(vec![epoch, Value::Array(ids), entries]))
}

/// The replies of a single server's log request that appends nothing —
/// the `XRANGE`, then the epoch's `GET` — as [`log_reply`] answers.
fn read_reply(mut replies: Vec<Value>) -> Result<Value, String> {
    if replies.len() < 2 {
        return Err(format!("a log reply of {} parts", replies.len()));
    }
    let epoch = replies.pop().expect("two or more");
    let entries = replies.pop().expect("two or more");
    Ok(Value::Array(vec![epoch, Value::Array(Vec::new()), entries]))
}

/// `SET epoch <a new writer's name> NX` and `GET epoch`, for a
/// transaction: the log's epoch, set if it has none.
fn set_and_get_epoch(epoch_key: &str, reads: usize) -> [redis::Cmd; 2] {
    let mut set = redis::cmd("SET");
    set.arg(epoch_key)
        .arg(format!("{:016x}", new_writer(reads)))
        .arg("NX");
    let mut get = redis::cmd("GET");
    get.arg(epoch_key);
    [set, get]
}

/// Runs `cmds` as one pipeline and reads every reply (the connection stays
/// in step); the first error reply, a transaction's included, fails the
/// request.
fn pipeline_replies(
    c: &mut super::conn::Conn,
    cmds: &[redis::Cmd],
) -> redis::RedisResult<Vec<Value>> {
    let replies = c.pipeline_each(cmds)?;
    let error = replies.iter().find_map(|v| match v {
        Value::ServerError(e) => Some(e.clone()),
        Value::Array(inner) => inner.iter().find_map(|v| match v {
            Value::ServerError(e) => Some(e.clone()),
            _ => None,
        }),
        _ => None,
    });
    match error {
        Some(e) => Err(e.into()),
        None => Ok(replies),
    }
}

fn parse_read(reply: Value) -> Result<Read, String> {
    let Value::Array(mut parts) = reply else {
        return Err(format!("a log reply of {reply:?}"));
    };
    if parts.len() != 3 {
        return Err(format!("a log reply of {} parts", parts.len()));
    }
    let entries = parts.pop().expect("three parts");
    let ids = parts.pop().expect("three parts");
    let epoch = match parts.pop().expect("three parts") {
        Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        Value::SimpleString(s) => s,
        other => return Err(format!("a log epoch of {other:?}")),
    };
    let appended = match ids {
        Value::Array(ids) => ids
            .iter()
            .map(|id| match id {
                Value::BulkString(b) => parse_seq(b),
                Value::SimpleString(s) => parse_seq(s.as_bytes()),
                _ => None,
            })
            .collect::<Option<Vec<u64>>>()
            .ok_or("an appended entry's id")?,
        Value::Nil => Vec::new(),
        other => return Err(format!("appended ids of {other:?}")),
    };
    let Value::Array(raw) = entries else {
        return Err(format!("log entries of {entries:?}"));
    };
    let mut read = Vec::with_capacity(raw.len());
    for e in raw {
        let Value::Array(mut e) = e else {
            return Err("a log entry that is not [id, fields]".into());
        };
        if e.len() != 2 {
            return Err("a log entry that is not [id, fields]".into());
        }
        let fields = e.pop().expect("two");
        let seq = match e.pop().expect("two") {
            Value::BulkString(b) => parse_seq(&b),
            Value::SimpleString(s) => parse_seq(s.as_bytes()),
            _ => None,
        }
        .ok_or("a log entry's id")?;
        let Value::Array(mut fields) = fields else {
            return Err("a log entry's fields".into());
        };
        let blob = match fields.pop() {
            Some(Value::BulkString(b)) => b,
            _ => return Err("a log entry's operations".into()),
        };
        read.push((seq, blob));
    }
    Ok(Read {
        epoch,
        appended,
        entries: read,
    })
}

impl RedisPartition {
    fn log(&mut self) -> &mut SharedLog {
        self.log.as_mut().expect("a shared-mode partition")
    }

    /// Shared mode: `ops` appended to the shard's log and answered in
    /// order in `out`, atomically in the log's order with every other
    /// engine's. Checks follow the failure policy when Redis cannot
    /// answer; every other operation fails then.
    pub(super) fn shared_claims_in_redis(
        &mut self,
        current: u64,
        window: Option<u64>,
        ops: &[SharedOp<'_>],
        out: &mut Vec<SharedAnswer>,
    ) -> Result<(), ExactTierError> {
        self.advance(current);
        out.clear();
        let window = window.or(self.window);
        match self.exchange_ops(window, ops, out) {
            Ok(()) => {
                // Once the call is answered: a failing delete never
                // fails it.
                self.unlink_retired();
                Ok(())
            }
            Err(e) => {
                out.clear();
                let checks_only = ops
                    .iter()
                    .all(|op| matches!(op, SharedOp::Check { .. } | SharedOp::Release { .. }));
                match self.config.policy {
                    FailurePolicy::FailOpen | FailurePolicy::FallbackToMemory if checks_only => {
                        // Answered here: what the request did, if it ran,
                        // needs no repair (its checks only record keys
                        // these answers accept or find).
                        self.unanswered.clear();
                        self.decide_without_redis(current, window, ops, out);
                        Ok(())
                    }
                    _ => {
                        self.remember_lost();
                        Err(e)
                    }
                }
            }
        }
    }

    /// The caller is told its operations failed, yet the request may have
    /// run: its batches are remembered, so that what they did is repaired
    /// when the log shows them (a check's key accepted by its retry, a
    /// claim's lease released). Bounded by `max_unsent_marks` operations.
    fn remember_lost(&mut self) {
        let max = self.config.max_unsent_marks;
        let unanswered = std::mem::take(&mut self.unanswered);
        let log = self.log();
        for (batch, ops) in unanswered {
            if log.lost_ops + ops.len() <= max {
                log.lost_ops += ops.len();
                log.lost.insert(batch, ops);
            }
        }
    }

    /// Appends the kept operations and the orphans' releases (if any),
    /// reads the log up to now: the replica is current.
    pub(super) fn catch_up(&mut self) -> Result<(), ExactTierError> {
        let mut out = Vec::new();
        let window = self.window;
        self.exchange_ops(window, &[], &mut out)
    }

    /// Kept checks not yet in Redis (accepted without it).
    pub(super) fn kept_checks(&self) -> u64 {
        self.log.as_ref().map_or(0, |l| l.kept_checks as u64)
    }

    /// `ops` appended and answered in `out`. A claim answered completed
    /// whose result is missing from Redis (its body hash deleted: an
    /// engine whose clock passed the record's window retired its slice,
    /// while this claim's earlier reading still found the record inside)
    /// is decided again, through the log: as a claim at the time the
    /// record leaves the window, which every replica applies in the log's
    /// order (acquired, unless another engine took the key meanwhile).
    fn exchange_ops(
        &mut self,
        window: Option<u64>,
        ops: &[SharedOp<'_>],
        out: &mut Vec<SharedAnswer>,
    ) -> Result<(), ExactTierError> {
        let missing = self.exchange_ops_once(window, ops, out)?;
        let mut decided = Ok(());
        if !missing.is_empty() {
            decided = self.decide_again(window, ops, out, &missing);
        }
        if decided.is_ok() {
            decided = self.decide_past_orphans(window, ops, out);
        }
        if decided.is_err() {
            // The call's entries are in the log, but its caller hears
            // `Unavailable` for all of them.
            self.orphan_acquired(ops, out);
        }
        decided
    }

    /// Queues the result hashes of `slices` (retired by this shard's
    /// rotation) for deletion once the log proves a clock reached their
    /// retiring slice ([`Self::unlink_retired`]).
    /// An engine that only idles queues one slice per rotation: the
    /// oldest beyond [`MAX_RETIRED`] are left to their hashes' TTL.
    pub(super) fn retire_results(&mut self, slices: &[u64]) {
        let log = self.log();
        for &slice in slices {
            if !log.retired.contains(&slice) {
                log.retired.push(slice);
            }
        }
        let over = log.retired.len().saturating_sub(MAX_RETIRED);
        log.retired.drain(..over);
    }

    /// Deletes the retired result hashes whose retiring slice the replica
    /// has seen a clock reach (an entry with a record time in it or
    /// later): the proof [`Self::retired_by_the_log`] looks for is in the
    /// log before the result is gone. A rotation alone (idle upkeep, or a
    /// call that appends only commits) proves nothing, and its hashes wait
    /// for an entry that does (or for their TTL). Best effort, on the
    /// mark connection (the log's upkeep, as snapshots), so a delete that
    /// fails (a timeout, an ACL without `UNLINK`) never holds back claims
    /// on the lookup connection: its hashes are left to their TTL.
    fn unlink_retired(&mut self) {
        let Some(d) = self.slice_nanos else { return };
        let log = self.log();
        if log.retired.is_empty() {
            return;
        }
        let newest = log.replica.newest_at();
        let due: Vec<u64> = log
            .retired
            .iter()
            .copied()
            .filter(|&slice| retiring_start(d, slice) <= newest)
            .collect();
        if due.is_empty() {
            return;
        }
        log.retired.retain(|slice| !due.contains(slice));
        let keys: Vec<String> = due.iter().map(|&slice| self.body_key(slice)).collect();
        let _ = self.with_mark_conn(|c, _| {
            let mut del = redis::cmd("UNLINK");
            for key in &keys {
                del.arg(key);
            }
            c.pipeline(vec![del])
        });
    }

    /// Claims and checks of this call that met a lease acquired by a lost
    /// batch of ours (a request that ran although its answer never came
    /// back), decided again once that lease is released. The call's read
    /// of the log is what found the lost batch, so the release could not
    /// go with the call's own entries: without this the caller's retry
    /// of the very claims whose answer was lost meets the orphaned lease,
    /// `InProgress` until it expires, and a broker consumer holds the
    /// message back for the whole lease (a 30 s stall in a JetStream
    /// bench round). One more request, on this rare path only: the
    /// orphans' releases go first in it.
    fn decide_past_orphans(
        &mut self,
        window: Option<u64>,
        ops: &[SharedOp<'_>],
        out: &mut [SharedAnswer],
    ) -> Result<(), ExactTierError> {
        let orphans = &self.log().orphans;
        if orphans.is_empty() {
            return Ok(());
        }
        let held: Vec<usize> = ops
            .iter()
            .zip(out.iter())
            .enumerate()
            .filter_map(|(i, (op, answer))| {
                let fp = match (op, answer) {
                    (
                        SharedOp::Claim { fingerprint, .. } | SharedOp::Check { fingerprint, .. },
                        SharedAnswer::InProgress { .. },
                    ) => *fingerprint,
                    _ => return None,
                };
                orphans.iter().any(|&(o, ..)| o == fp).then_some(i)
            })
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        crate::trace::event!(
            debug,
            claims = held.len(),
            "keys held by leases of a lost request of ours: decided again after their release"
        );
        let again: Vec<SharedOp<'_>> = held.iter().map(|&i| ops[i]).collect();
        let answers = self.exchange_again(window, &again)?;
        for (&i, answer) in held.iter().zip(answers) {
            out[i] = answer;
        }
        Ok(())
    }

    /// The second decision of [`Self::exchange_ops`]: the claims at
    /// `missing` (answered completed, their results gone) claimed again
    /// past their records' windows.
    fn decide_again(
        &mut self,
        window: Option<u64>,
        ops: &[SharedOp<'_>],
        out: &mut [SharedAnswer],
        missing: &[usize],
    ) -> Result<(), ExactTierError> {
        let mut again: Vec<SharedOp<'_>> = Vec::with_capacity(missing.len());
        for &i in missing {
            match (ops[i], &out[i], window) {
                (
                    SharedOp::Claim {
                        fingerprint,
                        at,
                        now,
                        until,
                        payload,
                    },
                    SharedAnswer::Completed { first_seen, .. },
                    Some(w),
                ) if self.retired_by_the_log(first_seen.as_nanos())? => {
                    again.push(SharedOp::Claim {
                        fingerprint,
                        at: Timestamp::from_nanos(past_window(
                            at.as_nanos(),
                            first_seen.as_nanos(),
                            w,
                        )),
                        now,
                        until,
                        payload,
                    });
                }
                // Without a window nothing expires; a result missing
                // while no clock in the log explains it (evicted, its TTL
                // too short, deleted by hand) is not taken for granted:
                // the error, as it was.
                _ => return Err(self.missing_result()),
            }
        }
        crate::trace::event!(
            debug,
            claims = again.len(),
            "committed results of expired slices are gone: claimed again past their window"
        );
        let answers = self.exchange_again(window, &again)?;
        for ((&i, answer), op) in missing.iter().zip(answers).zip(&again) {
            out[i] = match (answer, op) {
                // The lease reports the record time the store keeps.
                (SharedAnswer::Acquired { token }, SharedOp::Claim { at, .. }) => {
                    SharedAnswer::AcquiredAt { token, at: *at }
                }
                (answer, _) => answer,
            };
        }
        Ok(())
    }

    /// A second exchange of a call (`again`: some of its operations,
    /// decided anew): their answers, or an error when a claim among them
    /// finds a newer record whose result is missing too (the leases they
    /// acquired are orphaned: the caller hears `Unavailable`).
    fn exchange_again(
        &mut self,
        window: Option<u64>,
        again: &[SharedOp<'_>],
    ) -> Result<Vec<SharedAnswer>, ExactTierError> {
        let mut answers = Vec::with_capacity(again.len());
        if !self
            .exchange_ops_once(window, again, &mut answers)?
            .is_empty()
        {
            self.orphan_acquired(again, &answers);
            return Err(self.missing_result());
        }
        Ok(answers)
    }

    /// True when the log shows that some engine's clock reached the slice
    /// whose rotation deletes the results of a record at `first_seen` (an
    /// entry with a record time in it or later): the proof that a missing
    /// result was retired, not lost. An engine deletes a retired slice's
    /// results only once its replica holds that proof
    /// ([`Self::unlink_retired`]), so a result found missing has its proof
    /// in the log already: one catch-up reads it.
    fn retired_by_the_log(&mut self, first_seen: u64) -> Result<bool, ExactTierError> {
        let Some(d) = self.slice_nanos else {
            return Ok(false);
        };
        let retiring = retiring_start(d, slice_of(Some(d), first_seen));
        let newest = |p: &Self| p.log.as_ref().map_or(0, |l| l.replica.newest_at());
        if newest(self) < retiring {
            self.catch_up()?;
        }
        Ok(newest(self) >= retiring)
    }

    /// What `ops` acquired (answers `out`, in the log) while the call
    /// fails after all: nobody holds those leases, so they are released
    /// with the next request, and a check's recorded key is accepted by
    /// the caller's retry (as for a batch whose answer was lost).
    fn orphan_acquired(&mut self, ops: &[SharedOp<'_>], out: &[SharedAnswer]) {
        let log = self.log();
        for (op, answer) in ops.iter().zip(out) {
            match (op, answer) {
                (
                    SharedOp::Claim {
                        fingerprint, now, ..
                    },
                    SharedAnswer::Acquired { token } | SharedAnswer::AcquiredAt { token, .. },
                ) => log.orphans.push((*fingerprint, *token, *now)),
                (
                    SharedOp::Check {
                        fingerprint, at, ..
                    },
                    SharedAnswer::Acquired { .. },
                ) => {
                    log.reclaim.insert(*fingerprint, at.as_nanos());
                }
                _ => {}
            }
        }
    }

    fn missing_result(&self) -> ExactTierError {
        self.error_of(
            FailureCause::Other,
            "a committed result is missing from Redis (its slice was deleted, or the server \
             lost it)",
        )
    }

    /// [`Self::exchange_ops`] without the second decision: returns the
    /// positions of the claims answered completed whose result is missing
    /// (their answers in `out` carry an empty result).
    fn exchange_ops_once(
        &mut self,
        window: Option<u64>,
        ops: &[SharedOp<'_>],
        out: &mut Vec<SharedAnswer>,
    ) -> Result<Vec<usize>, ExactTierError> {
        // Entries: the tier's own operations first (kept checks and
        // releases, the orphans' releases), then the caller's, split where
        // the lease clock of checks and claims changes (one `now` per
        // entry) and at `MAX_OPS`.
        let (own, own_checks) = self.take_own_ops();
        let writer = self.log().writer;
        // Results go to the body hash of their lease's acquisition slice
        // (borrowed from the caller's operations, not copied).
        let mut bodies: Vec<(u64, BodyField, &[u8])> = Vec::new();
        for op in ops {
            if let SharedOp::Commit {
                fingerprint,
                token,
                result,
                ..
            } = *op
            {
                if !result.is_empty() {
                    if let Some(at) = self.log().replica.held_at(fingerprint, token) {
                        bodies.push((
                            slice_of(self.slice_nanos, at),
                            body_field(fingerprint, token),
                            result,
                        ));
                    }
                }
            }
        }
        let items: Vec<Item> = own
            .iter()
            .map(|&(now, op)| (now, op, None))
            .chain(ops.iter().enumerate().map(|(i, op)| {
                let (log_op, now) = LogOp::of(op);
                (now.unwrap_or(0), log_op, Some(i))
            }))
            .collect();
        let mut outgoing: Vec<Outgoing> = Vec::new();
        for (k, &(now, op, to)) in items.iter().enumerate() {
            push(&mut outgoing, writer, window, now, op, to, || {
                entry_len(&items[k..])
            });
        }
        let answers = match self.exchange(&mut outgoing, &bodies) {
            Ok(answers) => answers,
            Err((e, sent)) => {
                // Not known to be applied: the tier's own operations are
                // kept again (sent twice, a check or a release changes
                // nothing the second time); the caller's, if sent, may
                // have run: remembered until the caller knows (see
                // `remember_lost`).
                self.unanswered.clear();
                if sent {
                    for o in &outgoing {
                        let theirs: Vec<LogOp> = o
                            .ops
                            .iter()
                            .zip(&o.answer_to)
                            .filter(|(_, to)| to.is_some())
                            .map(|(op, _)| *op)
                            .collect();
                        if !theirs.is_empty() {
                            self.unanswered.push((o.header.batch, theirs));
                        }
                    }
                }
                self.keep_ops(own);
                return Err(e);
            }
        };
        self.stats
            .marks_written
            .fetch_add(own_checks as u64, Ordering::Relaxed);
        // The caller's answers, in order; results read in one request.
        out.resize(ops.len(), SharedAnswer::Lost);
        let mut wanted: Vec<(usize, u64, BodyField)> = Vec::new();
        let mut reanchors: Vec<(u64, LogOp)> = Vec::new();
        for (o, outcomes) in outgoing.iter().zip(answers) {
            for ((op, to), outcome) in o.ops.iter().zip(&o.answer_to).zip(outcomes) {
                let Some(i) = *to else { continue };
                out[i] = match outcome {
                    Outcome::Acquired { token } => SharedAnswer::Acquired { token },
                    Outcome::InProgress { until } => SharedAnswer::InProgress { until },
                    Outcome::Completed {
                        first_seen,
                        payload,
                        body,
                    } => {
                        // A later copy of a key reclaimed in this call:
                        // judged against the retry's acceptance.
                        let first_seen = reanchors
                            .iter()
                            .find_map(|(_, r)| match *r {
                                LogOp::Reanchor { fp, from, to }
                                    if fp == op.fingerprint() && from == first_seen =>
                                {
                                    Some(to)
                                }
                                _ => None,
                            })
                            .unwrap_or(first_seen);
                        if let LogOp::Check { fp, at } = *op {
                            let log = self.log();
                            if log.reclaim.get(&fp) == Some(&first_seen) {
                                // Recorded by a check of ours whose answer
                                // was lost: this retry is what accepts the
                                // key, and its window starts now.
                                log.reclaim.remove(&fp);
                                reanchors.push((
                                    0,
                                    LogOp::Reanchor {
                                        fp,
                                        from: first_seen,
                                        to: at,
                                    },
                                ));
                                out[i] = SharedAnswer::Acquired { token: 0 };
                                continue;
                            }
                        }
                        // A check answers without the result (a
                        // duplicate): only claims read it.
                        let body = body.filter(|_| matches!(op, LogOp::Claim { .. }));
                        if let Some(token) = body {
                            wanted.push((
                                i,
                                slice_of(self.slice_nanos, first_seen),
                                body_field(op.fingerprint(), token),
                            ));
                        }
                        SharedAnswer::Completed {
                            first_seen: Timestamp::from_nanos(first_seen),
                            body: (payload.is_some() || body.is_some()).then(|| RecordBody {
                                payload,
                                result: std::sync::Arc::from(&[][..]),
                            }),
                        }
                    }
                    Outcome::Conflict => SharedAnswer::Conflict,
                    Outcome::Done => SharedAnswer::Done,
                    Outcome::Lost => SharedAnswer::Lost,
                    Outcome::Forgotten(found) => SharedAnswer::Forgotten(found),
                };
            }
        }
        if !reanchors.is_empty() {
            // Kept, and sent now (again with the next request if this one
            // fails).
            self.keep_ops(reanchors);
            let _ = self.catch_up();
        }
        let mut missing = Vec::new();
        if !wanted.is_empty() {
            let results = match self.read_bodies(&wanted) {
                Ok(results) => results,
                Err(e) => {
                    self.orphan_acquired(ops, out);
                    return Err(e);
                }
            };
            for ((i, ..), result) in wanted.iter().zip(results) {
                let Some(result) = result else {
                    missing.push(*i);
                    continue;
                };
                if let SharedAnswer::Completed {
                    body: Some(body), ..
                } = &mut out[*i]
                {
                    body.result = result.into();
                }
            }
        }
        Ok(missing)
    }

    /// The operations the tier itself has to append (kept while Redis was
    /// down, releases of orphaned leases), taken out of the partition,
    /// with the number of kept checks among them.
    fn take_own_ops(&mut self) -> (Vec<(u64, LogOp)>, usize) {
        let log = self.log();
        let mut own = std::mem::take(&mut log.kept);
        log.kept_index.clear();
        let checks = std::mem::take(&mut log.kept_checks);
        own.extend(
            std::mem::take(&mut log.orphans)
                .into_iter()
                .map(|(fp, token, now)| (now, LogOp::Release { fp, token, now })),
        );
        self.stats
            .marks_unsent
            .fetch_sub(checks as u64, Ordering::Relaxed);
        (own, checks)
    }

    /// Sends `outgoing` (numbered here) with `bodies`, reads the log until
    /// every entry sent is applied (with nothing to send, until the
    /// replica has read everything), and returns each sent entry's
    /// outcomes. On failure, whether the request was sent.
    fn exchange(
        &mut self,
        outgoing: &mut [Outgoing],
        bodies: &[(u64, BodyField, &[u8])],
    ) -> Result<Vec<Vec<Outcome>>, (ExactTierError, bool)> {
        let log = self.log();
        for o in outgoing.iter_mut() {
            o.header.batch = log.next_batch;
            log.next_batch += 1;
        }
        let mut blobs: Vec<Vec<u8>> = Vec::with_capacity(outgoing.len());
        for o in outgoing.iter() {
            let mut blob = Vec::new();
            encode_entry(&o.header, &o.ops, &mut blob);
            blobs.push(blob);
        }
        // Body hashes by slice, each one of KEYS.
        let mut by_slice: Vec<(u64, Vec<FieldValue<'_>>)> = Vec::new();
        for (slice, field, value) in bodies {
            match by_slice.iter_mut().find(|(s, _)| s == slice) {
                Some((_, fields)) => fields.push((&field[..], value)),
                None => by_slice.push((*slice, vec![(&field[..], value)])),
            }
        }
        let body_keys: Vec<String> = by_slice.iter().map(|(s, _)| self.body_key(*s)).collect();
        let ttl = self.ttl_ms.unwrap_or(0);
        let mut outcomes: Vec<Vec<Outcome>> = outgoing
            .iter()
            .map(|o| Vec::with_capacity(o.ops.len()))
            .collect();
        let first_batch = outgoing.first().map_or(0, |o| o.header.batch);
        let mut waiting: Vec<u64> = outgoing.iter().map(|o| o.header.batch).collect();
        let mut sent = false;
        let mut reads = 0;
        loop {
            let first = reads == 0;
            if !first && self.log().replica.last_seq == 0 {
                // A replica with nothing yet starts from the snapshot.
                self.load_snapshot().map_err(|e| (e, sent))?;
            }
            let log = self.log.as_ref().expect("shared");
            let sent_now = &mut sent;
            let reply = if self.config.cluster {
                // One script does it all (the cluster client sends no
                // pipelines).
                let script = log.cluster_script.clone();
                let mut invocation = script.prepare_invoke();
                invocation.key(&log.log_key).key(&log.epoch_key);
                if first {
                    for k in &body_keys {
                        invocation.key(k);
                    }
                }
                invocation
                    .arg(format!("{:016x}", new_writer(reads)))
                    .arg(ttl)
                    .arg(format!("(0-{}", log.replica.last_seq))
                    .arg(READ_COUNT);
                if first {
                    invocation.arg(blobs.len());
                    for b in &blobs {
                        invocation.arg(&b[..]);
                    }
                    for (k, (_, fields)) in by_slice.iter().enumerate() {
                        invocation.arg(k + 3).arg(fields.len());
                        for (f, v) in fields {
                            invocation.arg(*f).arg(*v);
                        }
                    }
                } else {
                    invocation.arg(0);
                }
                self.with_conn(|c, _| {
                    *sent_now |= first;
                    invocation.invoke::<Value>(c.like())
                })
                .map_err(|e| (e, sent))?
            } else {
                // One pipeline: the bodies (each hash's `HSET`, then its
                // `PEXPIRE`), the log read from where this replica
                // stopped, then a transaction appending the entries. The read comes first so that it returns other
                // engines' entries only: this call's own are applied from
                // what it sent ([`own_entries_follow`]), not read back and
                // decoded (about 400 instructions per operation in the
                // client, and their bytes sent back by Redis). An entry
                // another engine appends between the two leaves a gap, and
                // the next read fetches both.
                //
                // The append is `MULTI`, the epoch set if there is none
                // and read, the entries' `XADD`s, the log's and epoch's
                // `PEXPIRE`s, `EXEC`: isolated as a script was, without the script's
                // cost (Redis spent 13 µs on a script call appending one
                // small entry, 9 of them in Lua, and 38 µs on one of
                // 10 kB, 23 of them copying the argument into Lua and
                // back). Unlike a script, a transaction does not stop at a
                // command that fails as it runs (a key of another type):
                // the rest still run, and the call fails — `sent` is set,
                // so its entries count as possibly appended. A call that
                // appends nothing writes nothing: the epoch is read alone,
                // and set (in a transaction of its own) only if there is
                // none, so reads go on while Redis refuses writes (out of
                // memory, a replica).
                let appending = if first { blobs.len() } else { 0 };
                let mut cmds: Vec<redis::Cmd> =
                    Vec::with_capacity(body_keys.len() + appending + body_keys.len() + 8);
                let mut xrange = redis::cmd("XRANGE");
                xrange
                    .arg(&log.log_key)
                    .arg(format!("(0-{}", log.replica.last_seq))
                    .arg("+")
                    .arg("COUNT")
                    .arg(READ_COUNT);
                if first {
                    for (key, (_, fields)) in body_keys.iter().zip(&by_slice) {
                        // Sized for its fields: grown from empty, the
                        // command's buffer was copied about twice (330
                        // client instructions per commit).
                        let bytes: usize = fields.iter().map(|(f, v)| f.len() + v.len()).sum();
                        let mut hset =
                            redis::Cmd::with_capacity(2 + 2 * fields.len(), 4 + key.len() + bytes);
                        hset.arg("HSET").arg(key);
                        for (f, v) in fields {
                            hset.arg(*f).arg(*v);
                        }
                        cmds.push(hset);
                        // The hash's TTL right behind its write, outside
                        // the transaction: a hash whose transaction never
                        // runs (the connection cut, a refused command)
                        // still expires.
                        if ttl > 0 {
                            let mut pexpire = redis::cmd("PEXPIRE");
                            pexpire.arg(key).arg(ttl);
                            cmds.push(pexpire);
                        }
                    }
                }
                cmds.push(xrange);
                let mut expiring = 0;
                if appending == 0 {
                    let mut get_epoch = redis::cmd("GET");
                    get_epoch.arg(&log.epoch_key);
                    cmds.push(get_epoch);
                } else {
                    cmds.push(redis::cmd("MULTI"));
                    cmds.extend(set_and_get_epoch(&log.epoch_key, reads));
                    for b in blobs.iter().take(appending) {
                        let mut xadd = redis::Cmd::with_capacity(5, b.len() + 64);
                        xadd.arg("XADD")
                            .arg(&log.log_key)
                            .arg("0-*")
                            .arg("o")
                            .arg(&b[..]);
                        cmds.push(xadd);
                    }
                    if ttl > 0 {
                        for key in [&log.log_key, &log.epoch_key] {
                            let mut pexpire = redis::cmd("PEXPIRE");
                            pexpire.arg(key).arg(ttl);
                            cmds.push(pexpire);
                            expiring += 1;
                        }
                    }
                    cmds.push(redis::cmd("EXEC"));
                }
                let epoch_key = log.epoch_key.clone();
                let replies = self
                    .with_conn(|c, _| {
                        *sent_now |= first;
                        let mut replies = pipeline_replies(c, &cmds)?;
                        if appending == 0 && matches!(replies.last(), Some(Value::Nil)) {
                            // No epoch yet: set one, as an append would.
                            let mut set: Vec<redis::Cmd> = vec![redis::cmd("MULTI")];
                            set.extend(set_and_get_epoch(&epoch_key, reads));
                            set.push(redis::cmd("EXEC"));
                            let mut done = pipeline_replies(c, &set)?;
                            if let Some(Value::Array(mut exec)) = done.pop() {
                                if let (Some(last), Some(epoch)) = (replies.last_mut(), exec.pop())
                                {
                                    *last = epoch;
                                }
                            }
                        }
                        Ok(replies)
                    })
                    .map_err(|e| (e, sent))?;
                if appending == 0 {
                    read_reply(replies)
                } else {
                    log_reply(replies, appending, expiring)
                }
                .map_err(|what| (self.error_of(FailureCause::UnexpectedReply, what), sent))?
            };
            let read = parse_read(reply)
                .map_err(|what| (self.error_of(FailureCause::UnexpectedReply, what), sent))?;
            reads += 1;
            let log = self.log();
            // A log other than the one the replica follows (its server lost
            // it, or some of it), or one trimmed past what the replica read
            // (it fell a snapshot behind): rebuilt from what Redis holds.
            let last = log.replica.last_seq;
            let gap = read.entries.first().is_some_and(|&(seq, _)| seq > last + 1);
            let lost_log = match &log.epoch {
                None => last > 0,
                Some(e) => *e != read.epoch,
            } || read.appended.iter().any(|&seq| seq <= last);
            log.epoch = Some(read.epoch);
            if lost_log || gap {
                crate::trace::event!(
                    warn,
                    log = %log.log_key,
                    lost = lost_log,
                    "the shared log was lost, replaced or trimmed past this replica; \
                     it is rebuilt from Redis"
                );
                log.replica.clear();
                if last > 0 {
                    self.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                }
                if reads >= MAX_READS {
                    break;
                }
                continue;
            }
            let got = read.entries.len();
            self.apply_entries(read.entries, first_batch, &mut waiting, &mut outcomes)
                .map_err(|e| (e, sent))?;
            let caught_up = got < READ_COUNT;
            // On a single server the first read ran before the append.
            let read_before_append = first && !self.config.cluster;
            if read_before_append && caught_up && !waiting.is_empty() {
                self.own_entries_follow(
                    outgoing,
                    &read.appended,
                    first_batch,
                    &mut waiting,
                    &mut outcomes,
                );
            }
            if waiting.is_empty() && (caught_up || !outgoing.is_empty()) {
                break;
            }
            if caught_up && !waiting.is_empty() && !read_before_append {
                return Err((
                    self.error_of(
                        FailureCause::UnexpectedReply,
                        "entries appended to the shared log were not found in it",
                    ),
                    sent,
                ));
            }
            if reads >= MAX_READS {
                let key = self.log().log_key.clone();
                return Err((
                    self.error_of(
                        FailureCause::Other,
                        format!("the shared log {key} is too far ahead to catch up in one call"),
                    ),
                    sent,
                ));
            }
        }
        if !waiting.is_empty() {
            return Err((
                self.error_of(
                    FailureCause::UnexpectedReply,
                    "entries appended to the shared log were lost before they were read",
                ),
                sent,
            ));
        }
        self.schedule_snapshot();
        Ok(outcomes)
    }

    /// Loads the shard's latest snapshot into the (cleared) replica, if
    /// there is one: the log is then read from its position on.
    fn load_snapshot(&mut self) -> Result<(), ExactTierError> {
        for _ in 0..8 {
            let pointer_key = self.log().snapshot_key.clone();
            let pointer: Option<String> =
                self.with_conn(|c, _| redis::cmd("GET").arg(&pointer_key).query(c.like()))?;
            let Some(pointer) = pointer else {
                return Ok(());
            };
            let mut fields = pointer.split(':');
            let (Some(_), Some(parts), Some(id)) = (
                fields.next(),
                fields.next().and_then(|n| n.parse::<usize>().ok()),
                fields.next(),
            ) else {
                return Err(self.error_of(
                    FailureCause::UnexpectedReply,
                    format!("{pointer_key} holds {pointer:?}, not a snapshot pointer"),
                ));
            };
            let keys: Vec<String> = (1..=parts)
                .map(|i| format!("{pointer_key}:{id}:{i}"))
                .collect();
            let mut blobs: Vec<Option<Vec<u8>>> = Vec::with_capacity(parts);
            for chunk in keys.chunks(16) {
                let got: Vec<Option<Vec<u8>>> = self.with_conn(|c, _| {
                    let mut mget = redis::cmd("MGET");
                    for k in chunk {
                        mget.arg(k);
                    }
                    mget.query(c.like())
                })?;
                blobs.extend(got);
            }
            if blobs.iter().any(Option::is_none) {
                // Replaced meanwhile by a newer one: read that.
                continue;
            }
            let log = self.log();
            log.replica.clear();
            for blob in blobs.iter().flatten() {
                if let Err(what) = log.replica.load_part(blob) {
                    log.replica.clear();
                    return Err(self.error_of(
                        FailureCause::UnexpectedReply,
                        format!("{pointer_key}: {what}"),
                    ));
                }
            }
            let slice_nanos = self.slice_nanos;
            let log = self.log();
            log.snapshot_generation = log.snapshot_generation.max(self_generation(
                slice_nanos,
                log.replica.newest_at(),
                log.replica.last_seq,
            ));
            return Ok(());
        }
        Err(self.error_of(
            FailureCause::Other,
            "the shard's snapshot kept changing while it was read",
        ))
    }

    /// Takes a snapshot of the replica for the log to be trimmed behind:
    /// once per slice of record time (without a window, once the entries
    /// since the last one outnumber twice the state). Best effort: another
    /// engine may have taken this slice's, or the next request takes it.
    fn schedule_snapshot(&mut self) {
        let slice_nanos = self.slice_nanos;
        let ttl = self.ttl_ms.unwrap_or(0);
        let log = self.log();
        let state = log.replica.len();
        let generation = match slice_nanos {
            Some(d) => log.replica.newest_at() / d.max(1),
            None => {
                if log.since_snapshot < (2 * state).max(1 << 16) {
                    return;
                }
                log.replica.last_seq
            }
        };
        if log.snapshot_generation == 0 {
            // The first look: the next snapshot is a generation on.
            log.snapshot_generation = generation;
            return;
        }
        if generation <= log.snapshot_generation || log.replica.last_seq == 0 {
            return;
        }
        log.snapshot_generation = generation;
        log.since_snapshot = 0;
        let parts = log.replica.snapshot(SNAPSHOT_PART);
        let id = format!("{:x}", new_writer(generation as usize));
        let pointer = format!(
            "{}:{}:{id}:{generation}:0-{}",
            log.replica.last_seq,
            parts.len(),
            log.replica.last_seq + 1
        );
        let part_keys: Vec<String> = (1..=parts.len())
            .map(|i| format!("{}:{id}:{i}", log.snapshot_key))
            .collect();
        let script = log.snapshot_script.clone();
        let (snapshot_key, log_key) = (log.snapshot_key.clone(), log.log_key.clone());
        // On the mark connection (unused otherwise in shared mode): a slow
        // or failed snapshot never holds back the claims. The parts first,
        // a few megabytes per request; then the pointer, which readers
        // follow, switched atomically with the deletion of the previous
        // snapshot and the trimming of the log behind it.
        for (keys, blobs) in part_keys.chunks(4).zip(parts.chunks(4)) {
            let written = self.with_mark_conn(|c, _| {
                let cmds = keys
                    .iter()
                    .zip(blobs)
                    .map(|(k, b)| {
                        let mut cmd = redis::cmd("SET");
                        cmd.arg(k).arg(&b[..]);
                        if ttl > 0 {
                            cmd.arg("PX").arg(ttl);
                        }
                        cmd
                    })
                    .collect();
                // `Conn::pipeline`: a cluster connection takes a cluster
                // pipeline (the client's plain one is refused there).
                c.pipeline(cmds)
            });
            if written.is_err() {
                return;
            }
        }
        let switched = self.with_mark_conn(|c, _| {
            let mut invocation = script.prepare_invoke();
            invocation.key(&snapshot_key).key(&log_key);
            invocation
                .arg(pointer)
                .arg(generation)
                .arg(ttl)
                .arg(format!("{snapshot_key}:"));
            for k in &part_keys {
                invocation.arg(k);
            }
            invocation.invoke::<i64>(c.like())
        });
        if let Ok(1) = switched {
            self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Applies this call's own entries, as sent, when the log holds
    /// nothing between what the replica has read and them (`appended`,
    /// their sequence numbers, follow `last_seq` without a gap): the log
    /// then reads exactly as the replica would have read it back. With a
    /// gap (another engine appended in between) nothing is applied, and
    /// the caller reads the log on.
    fn own_entries_follow(
        &mut self,
        outgoing: &[Outgoing],
        appended: &[u64],
        first_batch: u64,
        waiting: &mut Vec<u64>,
        outcomes: &mut [Vec<Outcome>],
    ) {
        let log = self.log.as_mut().expect("shared");
        if !follows(log.replica.last_seq, appended, outgoing.len()) {
            return;
        }
        for (o, &seq) in outgoing.iter().zip(appended) {
            let k = (o.header.batch - first_batch) as usize;
            let slot = &mut outcomes[k];
            log.since_snapshot += o.ops.len() as u64;
            let header = o.header.as_read();
            log.replica
                .apply(seq, &header, &o.ops, |_, out| slot.push(out));
            waiting.retain(|&b| b != o.header.batch);
        }
    }

    /// Applies read entries in order; the outcomes of entries this call
    /// appended (their batches in `waiting`) go to `outcomes`.
    fn apply_entries(
        &mut self,
        entries: Vec<(u64, Vec<u8>)>,
        first_batch: u64,
        waiting: &mut Vec<u64>,
        outcomes: &mut [Vec<Outcome>],
    ) -> Result<(), ExactTierError> {
        let log = self.log.as_mut().expect("shared");
        let mut ops = std::mem::take(&mut log.scratch);
        for (seq, blob) in entries {
            if seq <= log.replica.last_seq {
                continue;
            }
            let header = match decode_entry(&blob, &mut ops) {
                Ok(h) => h,
                Err(what) => {
                    log.scratch = ops;
                    let key = log.log_key.clone();
                    return Err(self.error_of(
                        FailureCause::UnexpectedReply,
                        format!("{key} entry 0-{seq}: {what}"),
                    ));
                }
            };
            log.since_snapshot += ops.len() as u64;
            let mine = header.writer == log.writer;
            if mine && waiting.contains(&header.batch) {
                self.stats
                    .own_entries_read_back
                    .fetch_add(1, Ordering::Relaxed);
                let k = (header.batch - first_batch) as usize;
                let slot = &mut outcomes[k];
                log.replica.apply(seq, &header, &ops, |_, o| slot.push(o));
                waiting.retain(|&b| b != header.batch);
            } else if let Some(sent) = mine.then(|| log.lost.remove(&header.batch)).flatten() {
                // A batch whose answer was lost: what it did.
                log.lost_ops -= sent.len();
                let mut found: Vec<(LogOp, Outcome)> = Vec::new();
                log.replica
                    .apply(seq, &header, &ops, |i, o| found.push((ops[i], o)));
                for (op, outcome) in found {
                    match (op, outcome) {
                        (LogOp::Check { fp, at }, Outcome::Acquired { .. }) => {
                            log.reclaim.insert(fp, at);
                        }
                        (LogOp::Claim { fp, .. }, Outcome::Acquired { token }) => {
                            log.orphans.push((fp, token, header.now));
                        }
                        _ => {}
                    }
                }
            } else {
                log.replica.apply(seq, &header, &ops, |_, _| {});
            }
        }
        log.scratch = ops;
        Ok(())
    }

    /// Keeps `ops` (with their lease clock readings) to append with the
    /// next request, up to `max_unsent_marks`; checks past it are dropped
    /// and counted.
    fn keep_ops(&mut self, ops: Vec<(u64, LogOp)>) {
        let max = self.config.max_unsent_marks;
        let current = self.current;
        let log = self.log.as_mut().expect("shared");
        let mut dropped = 0u64;
        let mut kept = 0u64;
        for (now, op) in ops {
            if log.kept.len() >= max {
                if matches!(op, LogOp::Check { .. }) {
                    dropped += 1;
                }
                continue;
            }
            if let LogOp::Check { fp, at } = op {
                log.kept_index.insert(fp, at);
                log.kept_checks += 1;
                kept += 1;
            }
            log.kept.push((now, op));
        }
        self.stats.marks_unsent.fetch_add(kept, Ordering::Relaxed);
        if dropped > 0 {
            self.dropped[slot_of(current)] += dropped;
            self.stats
                .marks_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Checks (and queued releases) decided without Redis, under a policy
    /// that accepts keys: judged from the replica (the log as last read)
    /// and the keys accepted so, which are kept to append once Redis is
    /// back.
    fn decide_without_redis(
        &mut self,
        current: u64,
        window: Option<u64>,
        ops: &[SharedOp<'_>],
        out: &mut Vec<SharedAnswer>,
    ) {
        let _ = current;
        self.degraded(ops.len());
        let mut keep = Vec::new();
        let log = self.log.as_mut().expect("shared");
        for op in ops {
            let answer = match *op {
                SharedOp::Check {
                    fingerprint,
                    at,
                    now,
                } => {
                    let at = at.as_nanos();
                    let pending = log
                        .kept_index
                        .get(fingerprint)
                        .filter(|&t0| window.is_none_or(|w| at.saturating_sub(t0) < w));
                    match (pending, log.replica.peek(fingerprint, at, now, window)) {
                        (Some(t0), _) | (None, Some(Outcome::Completed { first_seen: t0, .. })) => {
                            SharedAnswer::Completed {
                                first_seen: Timestamp::from_nanos(t0),
                                body: None,
                            }
                        }
                        (None, Some(Outcome::InProgress { until })) => {
                            SharedAnswer::InProgress { until }
                        }
                        (None, _) => {
                            log.kept_index.insert(fingerprint, at);
                            keep.push((
                                now,
                                LogOp::Check {
                                    fp: fingerprint,
                                    at,
                                },
                            ));
                            SharedAnswer::Acquired { token: 0 }
                        }
                    }
                }
                SharedOp::Release {
                    fingerprint,
                    token,
                    now,
                } => {
                    keep.push((
                        now,
                        LogOp::Release {
                            fp: fingerprint,
                            token,
                            now,
                        },
                    ));
                    SharedAnswer::Done
                }
                _ => SharedAnswer::Lost,
            };
            out.push(answer);
        }
        // The index already holds the kept checks: keep_ops re-inserts.
        self.keep_ops(keep);
    }

    /// The results named by `wanted` (`(answer, slice, field)`), read in
    /// one request (`None`: not in Redis).
    fn read_bodies(
        &mut self,
        wanted: &[(usize, u64, BodyField)],
    ) -> Result<Vec<Option<Vec<u8>>>, ExactTierError> {
        let mut slices: Vec<u64> = wanted.iter().map(|w| w.1).collect();
        slices.sort_unstable();
        slices.dedup();
        let script = self.lookup_script.clone();
        let mut invocation = script.prepare_invoke();
        let mut order = Vec::with_capacity(wanted.len());
        for &slice in &slices {
            let fields: Vec<usize> = (0..wanted.len())
                .filter(|&i| wanted[i].1 == slice)
                .collect();
            invocation.key(self.body_key(slice)).arg(fields.len());
            for &i in &fields {
                invocation.arg(&wanted[i].2[..]);
                order.push(i);
            }
        }
        let values = self.with_conn(|c, _| invocation.invoke::<Vec<Value>>(c.like()))?;
        if values.len() != order.len() {
            return Err(self.error_of(
                FailureCause::UnexpectedReply,
                format!("{} results for {} asked", values.len(), order.len()),
            ));
        }
        let mut results = vec![None; wanted.len()];
        for (i, v) in order.into_iter().zip(values) {
            match v {
                Value::BulkString(b) => results[i] = Some(b),
                Value::Nil | Value::Boolean(false) => {}
                other => {
                    return Err(self.error_of(
                        FailureCause::UnexpectedReply,
                        format!("a committed result read as {other:?}"),
                    ))
                }
            }
        }
        Ok(results)
    }

    /// The hash of a slice's committed results.
    pub(super) fn body_key(&self, slice: u64) -> String {
        format!("{}b:{slice}", self.key_base)
    }
}

/// A snapshot's generation: the slice of its newest record time, or
/// without a window its position.
fn self_generation(slice_nanos: Option<u64>, newest_at: u64, last_seq: u64) -> u64 {
    match slice_nanos {
        Some(d) => newest_at / d.max(1),
        None => last_seq,
    }
}

/// The slice of record time `at` (0 without a window).
fn slice_of(slice_nanos: Option<u64>, at: u64) -> u64 {
    slice_nanos.map_or(0, |d| at / d.max(1))
}

/// The record time of a claim decided again because the result of the
/// record it found (at `first_seen`) is gone: the first time outside that
/// record's window, or the claim's own time `at` if later. No later than
/// the clock that deleted the result: a slice's results are deleted once
/// an engine's clock passes the slice's end plus the span (at least the
/// window), so this claim's window is anchored at a time some engine has
/// already read.
fn past_window(at: u64, first_seen: u64, window: u64) -> u64 {
    at.max(first_seen.saturating_add(window))
}

/// Where the slice retiring the results of acquisition slice `slice`
/// begins (slices of `d` nanoseconds; a shard entering slice `c` clears
/// slice `c − 7`, `clear_slots`): the record time an entry must reach to
/// prove a clock retired them.
fn retiring_start(d: u64, slice: u64) -> u64 {
    slice
        .saturating_add(GENERATIONS as u64 - 1)
        .saturating_mul(d)
}

/// True when the `sent` entries appended as `appended` (their sequence
/// numbers) come right after entry `last`, without a gap.
fn follows(last: u64, appended: &[u64], sent: usize) -> bool {
    appended.len() == sent && appended.iter().zip(1..).all(|(&seq, k)| seq == last + k)
}

/// A result's field in its body hash: the fingerprint and the token of the
/// lease that committed it.
/// An array, not a `Vec`: built as a 16-byte `Vec` grown to 24, it cost a
/// reallocation per commit (about 600 of 4 000 client instructions per
/// shared claim and commit, callgrind).
fn body_field(fp: Fingerprint, token: u64) -> BodyField {
    let mut field = [0u8; 24];
    field[..16].copy_from_slice(&fp.to_bytes());
    field[16..].copy_from_slice(&token.to_le_bytes());
    field
}

/// A result's field in its body hash ([`body_field`]).
type BodyField = [u8; 24];

/// An operation to append: its lease clock reading, the operation, and
/// the position of the caller's operation it answers (`None`: the tier's
/// own).
type Item = (u64, LogOp, Option<usize>);

/// True for the operations whose entry carries their lease clock reading
/// (an entry holds one).
fn needs_now(op: &LogOp) -> bool {
    matches!(op, LogOp::Check { .. } | LogOp::Claim { .. })
}

/// How many of `items` go into the entry the first of them starts: as
/// [`push`] fills it, up to `MAX_OPS`, until a check or claim with another
/// lease clock reading than the entry's.
fn entry_len(items: &[Item]) -> usize {
    let mut now = None;
    items
        .iter()
        .take(MAX_OPS)
        .take_while(|(t, op, _)| !needs_now(op) || *now.get_or_insert(*t) == *t)
        .count()
}

/// Appends `op` (whose answer goes to `to`) to the last entry, or to a new
/// one where the lease clock of checks and claims changes or the entry is
/// full; a new entry is sized for `len()` operations (its exact count:
/// sizing each for every operation still to come made a tier that kept
/// K checks through an outage, each with its own reading, reserve K²/2
/// operations).
fn push(
    outgoing: &mut Vec<Outgoing>,
    writer: u64,
    window: Option<u64>,
    now: u64,
    op: LogOp,
    to: Option<usize>,
    len: impl FnOnce() -> usize,
) {
    let needs_now = needs_now(&op);
    let fits = outgoing.last().is_some_and(|o| {
        o.ops.len() < MAX_OPS && (!needs_now || !o.now_set || o.header.now == now)
    });
    if !fits {
        let len = len();
        outgoing.push(Outgoing {
            header: Header {
                writer,
                batch: 0,
                window,
                now: 0,
            },
            now_set: false,
            ops: Vec::with_capacity(len),
            answer_to: Vec::with_capacity(len),
        });
    }
    let o = outgoing.last_mut().expect("pushed");
    if needs_now && !o.now_set {
        o.header.now = now;
        o.now_set = true;
    }
    o.ops.push(op);
    o.answer_to.push(to);
}

#[cfg(test)]
mod tests {
    use super::{entry_len, follows, past_window, push, Item, Outgoing, MAX_OPS};
    use crate::exact::redis::log::{token, Header, LogOp, Outcome, Replica};
    use crate::fingerprint::Fingerprint;

    /// A kept check of key `i` with lease-clock reading `now`.
    fn check(now: u64, i: u64) -> Item {
        let fp = Fingerprint(u128::from(i));
        (now, LogOp::Check { fp, at: i }, None)
    }

    /// Entries made of `items` by `push`, each with the index of its first
    /// item.
    fn entries(items: &[Item]) -> Vec<(usize, Outgoing)> {
        let mut outgoing: Vec<Outgoing> = Vec::new();
        let mut starts = Vec::new();
        for (k, &(now, op, to)) in items.iter().enumerate() {
            let before = outgoing.len();
            push(&mut outgoing, 1, None, now, op, to, || {
                entry_len(&items[k..])
            });
            if outgoing.len() > before {
                starts.push(k);
            }
        }
        starts.into_iter().zip(outgoing).collect()
    }

    #[test]
    fn entries_are_sized_exactly_for_their_operations() {
        // Checks and commits mixed, the lease clock changing now and then.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut items: Vec<Item> = Vec::new();
        let mut now = 1;
        for i in 0..5_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 7 == 0 {
                now += 1;
            }
            let fp = Fingerprint(u128::from(i));
            let op = if x % 3 == 0 {
                LogOp::Commit {
                    fp,
                    token: i,
                    now: i,
                    body: false,
                }
            } else {
                LogOp::Check { fp, at: i }
            };
            items.push((now, op, Some(i as usize)));
        }
        let made = entries(&items);
        assert!(made.len() > 100);
        let mut total = 0;
        for (start, o) in &made {
            assert_eq!(entry_len(&items[*start..]), o.ops.len());
            assert_eq!(o.ops.capacity(), o.ops.len());
            assert_eq!(o.answer_to.len(), o.ops.len());
            total += o.ops.len();
        }
        assert_eq!(total, items.len());
        // One long run: split at `MAX_OPS`.
        let long: Vec<Item> = (0..MAX_OPS as u64 + 10).map(|i| check(5, i)).collect();
        let made = entries(&long);
        assert_eq!(made.len(), 2);
        assert_eq!(made[0].1.ops.len(), MAX_OPS);
        assert_eq!(made[1].1.ops.len(), 10);
    }

    #[test]
    fn checks_kept_through_an_outage_reserve_what_they_hold() {
        // Each kept check has the reading of its own call: one entry each,
        // and no entry sized for the ones after it.
        let items: Vec<Item> = (0..20_000u64).map(|i| check(i, i)).collect();
        let made = entries(&items);
        assert_eq!(made.len(), items.len());
        let reserved: usize = made.iter().map(|(_, o)| o.ops.capacity()).sum();
        assert_eq!(reserved, items.len());
    }

    #[test]
    fn a_claim_decided_again_past_the_window_is_acquired_once() {
        // Window 120, slices of 20: a record committed at 39 (the end of
        // slice 1), whose slice another engine retired (its clock passed
        // 160); two engines whose clocks read 158 claim the key.
        let window = 120;
        let mut r = Replica::new(Some(window), Some(20));
        let fp = Fingerprint(3);
        let header = |writer: u64, now: u64| Header {
            writer,
            batch: 1,
            window: Some(window),
            now,
        };
        let apply = |r: &mut Replica, seq: u64, writer: u64, op: LogOp| {
            let mut out = Vec::new();
            r.apply(seq, &header(writer, 40), &[op], |_, o| out.push(o));
            out[0]
        };
        let claim = |at: u64| LogOp::Claim {
            fp,
            at,
            until: 1_000,
            payload: None,
        };
        assert_eq!(
            apply(&mut r, 1, 1, claim(39)),
            Outcome::Acquired { token: token(1, 0) }
        );
        let commit = LogOp::Commit {
            fp,
            token: token(1, 0),
            now: 40,
            body: true,
        };
        assert_eq!(apply(&mut r, 2, 1, commit), Outcome::Done);
        // Both find it inside the window by their reading.
        let found = Outcome::Completed {
            first_seen: 39,
            payload: None,
            body: Some(token(1, 0)),
        };
        assert_eq!(apply(&mut r, 3, 2, claim(158)), found);
        assert_eq!(apply(&mut r, 4, 3, claim(158)), found);
        // Its result is gone: each claims again past the window, and the
        // log's order decides: the first acquires, the second finds it
        // held.
        let again = past_window(158, 39, window);
        assert_eq!(again, 159);
        assert_eq!(
            apply(&mut r, 5, 2, claim(again)),
            Outcome::Acquired { token: token(5, 0) }
        );
        assert_eq!(
            apply(&mut r, 6, 3, claim(again)),
            Outcome::InProgress { until: 1_000 }
        );
        // A claim already past the window keeps its own time.
        assert_eq!(past_window(170, 39, window), 170);
    }

    #[test]
    fn own_entries_apply_only_right_after_what_was_read() {
        assert!(follows(10, &[11, 12, 13], 3));
        assert!(follows(0, &[1], 1));
        // Nothing sent, nothing appended.
        assert!(follows(7, &[], 0));
        // Another engine's entry (11) came between the read and the append.
        assert!(!follows(10, &[12, 13], 2));
        // Fewer ids than entries sent, or not consecutive.
        assert!(!follows(10, &[11], 2));
        assert!(!follows(10, &[11, 13], 2));
        // A log behind the replica (lost and rebuilt).
        assert!(!follows(10, &[5, 6], 2));
    }
}
