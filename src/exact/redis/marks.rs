//! Writing marks: kept oldest first, sent as one pipeline (single server:
//! on a connection of their own, replies read with the next batch) or one
//! script (Cluster), and kept for a retry when Redis fails.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use redis::{Cmd, Value};

use super::conn::Conn;
use super::error;
use super::records::RECORD;
use super::scripts::COMPACT_SCRIPT;
use super::RedisPartition;
use crate::error::{ExactTierError, FailureCause};
use crate::exact::table::FingerprintTable;
use crate::exact::Mark;
use crate::fingerprint::Fingerprint;
use crate::time::{slot_of, Timestamp};

/// Marks written to a single server whose replies are not read yet.
pub(super) struct InFlight {
    pub(super) marks: Vec<Mark>,
    pub(super) index: FingerprintTable,
    /// Replies owed on the mark connection.
    pub(super) replies: usize,
    /// Hashes whose first `PEXPIRE` went with these marks.
    pub(super) fresh: HashSet<(u64, u64)>,
}

/// The marks of one bucket's run of `(slice, bucket, index)` in mark
/// order, as Redis stores them: (fingerprint, time as 8 big-endian bytes).
pub(super) fn stored_marks<'a>(
    unsent: &'a [Mark],
    run: &'a [(u64, u64, u32)],
) -> impl Iterator<Item = ([u8; 16], [u8; 8])> + 'a {
    run.iter().map(|&(_, _, i)| {
        let m = &unsent[i as usize];
        (m.fingerprint.to_bytes(), m.at.as_nanos().to_be_bytes())
    })
}

impl RedisPartition {
    /// Writes every unsent mark (oldest first) in one pipeline. On a
    /// single server the replies are read by the next call (or by
    /// [`Self::settle`]); a cluster's script is answered at once.
    pub(super) fn send_unsent(&mut self) -> Result<(), ExactTierError> {
        // The previous marks' replies first: a failure puts them back
        // before these, in order.
        self.settle()?;
        if self.unsent.is_empty() && self.unlinks.is_empty() {
            return Ok(());
        }
        // Connect first: the hash count may change when a connection
        // adopts the agreed one. Marks go on their own connection (single
        // server), whose failures and backoff are its own.
        if self.config.cluster {
            self.connect()?;
        } else {
            self.connect_marks()?;
        }
        // Marks by hash, in mark order within each (a later mark of a key
        // wins): sorted by (slice, bucket, position), no map, no vector per
        // hash; a TTL for hashes this process has not given one yet.
        let mut order: Vec<(u64, u64, u32)> = (0u32..)
            .zip(&self.unsent)
            .map(|(i, m)| (m.slice, self.bucket(m.fingerprint), i))
            .collect();
        order.sort_unstable();
        let by_hash = || order.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1));
        let fresh: HashSet<(u64, u64)> = by_hash()
            .map(|run| (run[0].0, run[0].1))
            .filter(|h| !self.expiring.contains(h))
            .collect();
        if self.records {
            let current = self.current;
            self.appended
                .extend(by_hash().map(|run| run[0].0).filter(|&s| s >= current));
        }
        // A chunk of a finished slice's strings rides along (see
        // `COMPACT_SCRIPT`).
        let compaction = if self.records {
            self.next_compaction()
        } else {
            Vec::new()
        };
        // A record string's marks, appended in mark order.
        let records = |run: &[(u64, u64, u32)]| {
            let mut blob = Vec::with_capacity(run.len() * RECORD);
            for (fp, at) in stored_marks(&self.unsent, run) {
                blob.extend_from_slice(&fp);
                blob.extend_from_slice(&at);
            }
            blob
        };
        let is_fresh = |run: &[(u64, u64, u32)]| fresh.contains(&(run[0].0, run[0].1));
        if self.config.cluster {
            // One script: one reply, whatever the number of hashes.
            let script = if self.records {
                self.append_script.clone()
            } else {
                self.mark_script.clone()
            };
            let mut invocation = script.prepare_invoke();
            invocation.arg(self.ttl_ms);
            for run in by_hash() {
                invocation.key(self.key(run[0].0, run[0].1));
                let fresh = u8::from(is_fresh(run));
                if self.records {
                    invocation.arg(records(run)).arg(fresh);
                    continue;
                }
                invocation.arg(run.len()).arg(fresh);
                for (fp, at) in stored_marks(&self.unsent, run) {
                    invocation.arg(&fp[..]).arg(&at[..]);
                }
            }
            self.with_conn(|c, _| invocation.invoke::<Value>(c.like()))?;
            if !compaction.is_empty() {
                let script = self.compact_script.clone();
                let mut invocation = script.prepare_invoke();
                for k in &compaction {
                    invocation.key(k);
                }
                // Best effort: the marks are written either way.
                let _ = self.with_conn(|c, _| invocation.invoke::<Value>(c.like()));
            }
            self.expiring.extend(fresh);
            self.written(self.unsent.len());
            self.unsent.clear();
            self.unsent_index.clear();
        } else {
            // Plain commands cost Redis less than a script's calls (no Lua
            // strings per argument): one APPEND or HSET per string or hash,
            // a PEXPIRE per fresh one, read until the first failure.
            // Each fresh bucket's PEXPIRE right after its write: a
            // pipeline cut short leaves no bucket written without a TTL.
            let mut cmds = Vec::with_capacity(2 * fresh.len());
            for run in by_hash() {
                let key = self.key(run[0].0, run[0].1);
                let mut cmd = redis::cmd(if self.records { "APPEND" } else { "HSET" });
                cmd.arg(&key);
                if self.records {
                    cmd.arg(records(run));
                } else {
                    for (fp, at) in stored_marks(&self.unsent, run) {
                        cmd.arg(&fp[..]).arg(&at[..]);
                    }
                }
                cmds.push(cmd);
                if is_fresh(run) {
                    let mut expire = redis::cmd("PEXPIRE");
                    expire.arg(&key).arg(self.ttl_ms);
                    cmds.push(expire);
                }
            }
            if !compaction.is_empty() {
                let mut eval = redis::cmd("EVAL");
                eval.arg(COMPACT_SCRIPT)
                    .arg(compaction.len())
                    .arg(&compaction);
                cmds.push(eval);
            }
            cmds.extend(self.unlink_commands());
            let mut packed = Vec::new();
            for cmd in &cmds {
                cmd.write_packed_command(&mut packed);
            }
            if let Err(e) = self.marks.bound(self.request_timeout()) {
                let err = self.error(&e);
                return Err(self.fail_marks(&err));
            }
            // A connection opened by an earlier flush may have been closed
            // since (a server's idle `timeout`): one more try on a new one.
            let mut tries = if self.marks.conn.is_some() { 2 } else { 1 };
            loop {
                self.connect_marks()?;
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let Some(Conn::Single(c)) = &mut self.marks.conn else {
                    unreachable!("a single server's mark connection")
                };
                match c.send_packed_command(&packed) {
                    Ok(()) => break,
                    Err(_) if tries > 1 => {
                        tries -= 1;
                        self.marks.conn = None;
                    }
                    Err(e) => {
                        // Not known to be stored: the marks stay unsent
                        // (those Redis did read are written again: an
                        // `HSET` the same, a record string gains a copy).
                        let err = self.error(&e);
                        return Err(self.fail_marks(&err));
                    }
                }
            }
            self.unlinks.clear();
            // In flight until their replies are read; still indexed.
            std::mem::swap(&mut self.in_flight.marks, &mut self.unsent);
            std::mem::swap(&mut self.in_flight.index, &mut self.unsent_index);
            self.in_flight.replies = cmds.len();
            self.in_flight.fresh = fresh;
        }
        Ok(())
    }

    /// Reads the replies of the marks in flight (single server): on
    /// success they are written; on a failure they go back to the front of
    /// the unsent marks (older than those), for the next retry.
    pub(super) fn settle(&mut self) -> Result<(), ExactTierError> {
        if self.in_flight.replies == 0 {
            return Ok(());
        }
        if let Err(e) = self.marks.bound(self.request_timeout()) {
            let err = self.error(&e);
            return Err(self.fail_marks(&err));
        }
        let result = match &mut self.marks.conn {
            Some(Conn::Single(c)) => (0..self.in_flight.replies)
                .try_for_each(|_| match c.recv_response()? {
                    Value::ServerError(e) => Err(e.into()),
                    _ => Ok(()),
                })
                .map_err(|e: redis::RedisError| error::remote(&self.server, &e)),
            _ => Err(error::failure(
                &self.server,
                FailureCause::ConnectionLost,
                "the connection marks were sent on was dropped",
            )),
        };
        self.in_flight.replies = 0;
        match result {
            Ok(()) => {
                self.expiring.extend(self.in_flight.fresh.drain());
                self.written(self.in_flight.marks.len());
                self.in_flight.marks.clear();
                self.in_flight.index.clear();
                Ok(())
            }
            Err(e) => {
                self.stats.record(&e);
                if self.marks.conn.is_some() {
                    self.fail_marks(&e);
                }
                self.in_flight.fresh.clear();
                // Unsent marks are newer: they stay indexed over these.
                for m in &self.in_flight.marks {
                    if self.unsent_index.get(m.fingerprint).is_none() {
                        self.unsent_index.insert(m.fingerprint, m.at.as_nanos());
                    }
                }
                self.in_flight.index.clear();
                self.in_flight.marks.append(&mut self.unsent);
                std::mem::swap(&mut self.in_flight.marks, &mut self.unsent);
                Err(e)
            }
        }
    }

    /// The `UNLINK`s of the retired slices queued in `unlinks`: one per
    /// slice, every bucket of it.
    fn unlink_commands(&self) -> Vec<Cmd> {
        self.unlinks
            .iter()
            .map(|&slice| {
                let mut del = redis::cmd("UNLINK");
                for bucket in 0..self.buckets {
                    del.arg(self.key(slice, bucket));
                }
                del
            })
            .collect()
    }

    /// Single server: sends the queued `UNLINK`s on the mark connection if
    /// it is open, behind the marks in flight, without waiting: their
    /// replies are read with those of the marks. Otherwise they go with
    /// the next marks.
    pub(super) fn send_unlinks(&mut self) {
        if self.unlinks.is_empty() || self.marks.conn.is_none() {
            return;
        }
        let cmds = self.unlink_commands();
        let mut packed = Vec::new();
        for cmd in &cmds {
            cmd.write_packed_command(&mut packed);
        }
        let Some(Conn::Single(c)) = &mut self.marks.conn else {
            return;
        };
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        match c.send_packed_command(&packed) {
            Ok(()) => {
                self.in_flight.replies += cmds.len();
                self.unlinks.clear();
            }
            // The marks in flight fail with their replies; the deletes go
            // with the next marks.
            Err(e) => {
                let err = self.error(&e);
                self.fail_marks(&err);
            }
        }
    }

    /// Counts `n` marks as written (no longer unsent).
    pub(super) fn written(&self, n: usize) {
        let n = n as u64;
        self.stats.marks_written.fetch_add(n, Ordering::Relaxed);
        self.stats.marks_unsent.fetch_sub(n, Ordering::Relaxed);
    }

    /// The time of the newest mark of `fp` not yet known to be in Redis.
    pub(super) fn pending_time(&self, fp: Fingerprint) -> Option<u64> {
        self.unsent_index
            .get(fp)
            .or_else(|| self.in_flight.index.get(fp))
    }

    /// Keeps `marks` for writing, indexed for lookups, up to
    /// `max_unsent_marks`; returns how many did not fit (counted dropped).
    pub(super) fn keep(&mut self, marks: &[Mark]) -> usize {
        let room = self
            .config
            .max_unsent_marks
            .saturating_sub(self.unsent.len());
        let dropped = marks.len().saturating_sub(room);
        for m in &marks[..marks.len() - dropped] {
            self.unsent.push(*m);
            self.unsent_index.insert(m.fingerprint, m.at.as_nanos());
        }
        self.stats
            .marks_unsent
            .fetch_add((marks.len() - dropped) as u64, Ordering::Relaxed);
        if dropped > 0 {
            self.stats
                .marks_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        dropped
    }

    /// A mark of a key this partition accepted in slice `current`.
    pub(super) fn mark_now(fingerprint: Fingerprint, current: u64, at: Timestamp) -> Mark {
        Mark {
            fingerprint,
            slot: slot_of(current),
            slice: current,
            at,
        }
    }
}
