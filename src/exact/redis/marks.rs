//! Writing marks: kept oldest first, sent as one pipeline (single server:
//! on a connection of their own, replies read with the next batch, see
//! `replies.rs`) or one script (Cluster), and kept for a retry when Redis
//! does not store them — up to a bound, past which they are dropped and
//! counted until their slice leaves the window.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use redis::{Cmd, Value};

use super::conn::{Conn, Wait};
use super::records::{write_record, BODY_APART, RECORD};
use super::replies::{Sent, BODY_HASH};
use super::scripts::COMPACT_SCRIPT;
use super::RedisPartition;
use crate::error::{ExactTierError, FailureCause};
use crate::exact::{Mark, RecordBody};
use crate::fingerprint::Fingerprint;
use crate::time::GENERATIONS;

impl RedisPartition {
    /// Writes every unsent mark (oldest first) in one pipeline. On a
    /// single server the replies are read by the next call (or by
    /// [`Self::settle`]); a cluster's script is answered at once.
    pub(super) fn send_unsent(&mut self) -> Result<(), ExactTierError> {
        // The previous marks' replies first: marks Redis did not store go
        // back before these, in order.
        self.settle()?;
        if self.unsent.is_empty() && self.unlinks.is_empty() {
            return Ok(());
        }
        // Redis refused marks a moment ago (or the connection failed): the
        // retry waits for the backoff, unless the caller asked to flush.
        let link = if self.config.cluster {
            &self.lookups
        } else {
            &self.marks
        };
        if link.backing_off() && self.wait != Wait::Flush {
            return Err(link.backoff_error());
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
        // The buckets whose write carries a PEXPIRE: none without a TTL;
        // every one when writes renew it (a retention without a window);
        // else those this process has not given it yet.
        let fresh: HashSet<(u64, u64)> = match self.ttl_ms {
            None => HashSet::new(),
            Some(_) => order
                .chunk_by(|a, b| (a.0, a.1) == (b.0, b.1))
                .map(|run| (run[0].0, run[0].1))
                .filter(|h| self.renew_ttl || !self.expiring.contains(h))
                .collect(),
        };
        if self.records {
            let current = self.current;
            self.appended
                .extend(order.iter().map(|o| o.0).filter(|&s| s >= current));
        }
        if self.config.cluster {
            self.send_by_script(&order, &fresh)
        } else {
            self.send_pipeline(&order, &fresh)
        }
    }

    /// The body to store with mark `m`, if its claim was committed with
    /// one ([`crate::exact::ExactPartition::put_body`]).
    fn body_of_mark(&self, m: &Mark) -> Option<&RecordBody> {
        match self.bodies.get(&m.fingerprint) {
            Some((at, body)) if *at == m.at.as_nanos() => Some(body),
            _ => None,
        }
    }

    /// The record string of one bucket's marks, in mark order.
    fn record_blob(&self, run: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut blob = Vec::with_capacity(run.len() * RECORD);
        for &(_, _, i) in run {
            let m = &self.unsent[i as usize];
            let body = self.body_of_mark(m);
            write_record(
                &mut blob,
                Some(&m.fingerprint.to_bytes()),
                m.at.as_nanos(),
                body,
            );
        }
        blob
    }

    /// The body hash write of one slice's marks (`order` entries of one
    /// slice): an `HSET` of the bodies kept apart from record strings, and
    /// the marks it carries (indices into `unsent`); `None` when no mark
    /// of the slice has one.
    fn body_write(&self, slice_run: &[(u64, u64, u32)]) -> Option<(Cmd, Vec<u32>)> {
        if !self.records {
            return None;
        }
        let mut hset = redis::cmd("HSET");
        let mut marks = Vec::new();
        for &(slice, _, i) in slice_run {
            let m = &self.unsent[i as usize];
            let Some(body) = self.body_of_mark(m) else {
                continue;
            };
            if m.at.as_nanos() >= BODY_APART {
                continue;
            }
            if marks.is_empty() {
                hset.arg(self.body_key(slice));
            }
            let mut value = Vec::with_capacity(8 + 13 + body.result.len());
            write_record(&mut value, None, m.at.as_nanos(), Some(body));
            hset.arg(&m.fingerprint.to_bytes()[..]).arg(value);
            marks.push(i);
        }
        (!marks.is_empty()).then_some((hset, marks))
    }

    /// The `PEXPIRE` a slice's body hash needs with a write, if this
    /// process has not given it its TTL yet (every write, when writes renew
    /// it).
    fn body_expire(&self, slice: u64) -> Option<Cmd> {
        let ttl = self.ttl_ms?;
        if !self.renew_ttl && self.expiring.contains(&(slice, BODY_HASH)) {
            return None;
        }
        let mut expire = redis::cmd("PEXPIRE");
        expire.arg(self.body_key(slice)).arg(ttl);
        Some(expire)
    }

    /// A hash's field and value for each of one bucket's marks.
    fn hash_pairs(&self, run: &[(u64, u64, u32)]) -> Vec<([u8; 16], Vec<u8>)> {
        run.iter()
            .map(|&(_, _, i)| {
                let m = &self.unsent[i as usize];
                let mut value = Vec::with_capacity(8);
                write_record(&mut value, None, m.at.as_nanos(), self.body_of_mark(m));
                (m.fingerprint.to_bytes(), value)
            })
            .collect()
    }

    /// Marks Redis acknowledged: their bodies are stored with them.
    pub(super) fn bodies_written<'a>(&mut self, marks: impl Iterator<Item = &'a Mark>) {
        if self.bodies.is_empty() {
            return;
        }
        for m in marks {
            if self
                .bodies
                .get(&m.fingerprint)
                .is_some_and(|(at, _)| *at == m.at.as_nanos())
            {
                self.bodies.remove(&m.fingerprint);
            }
        }
    }

    /// Single server: one `APPEND` or `HSET` per bucket (plain commands
    /// cost Redis less than a script's calls: no Lua string per argument),
    /// a `PEXPIRE` right after each fresh bucket's write (a pipeline cut
    /// short leaves no bucket written without a TTL), a compaction chunk
    /// and queued deletes, sent without waiting: the marks are in flight
    /// until [`Self::settle`] reads the replies.
    fn send_pipeline(
        &mut self,
        order: &[(u64, u64, u32)],
        fresh: &HashSet<(u64, u64)>,
    ) -> Result<(), ExactTierError> {
        let mut cmds = Vec::with_capacity(2 * fresh.len());
        let mut sent = Vec::with_capacity(2 * fresh.len());
        let mut body_marks: Vec<u32> = Vec::new();
        let mut start = 0u32;
        for slice_run in order.chunk_by(|a, b| a.0 == b.0) {
            // A slice's bodies go before its records: a reader that finds
            // a record finds its body.
            if let Some((hset, marks)) = self.body_write(slice_run) {
                let from = body_marks.len() as u32;
                body_marks.extend(marks);
                cmds.push(hset);
                sent.push(Sent::Bodies {
                    start: from,
                    end: body_marks.len() as u32,
                });
                if let Some(expire) = self.body_expire(slice_run[0].0) {
                    cmds.push(expire);
                    sent.push(Sent::Expire {
                        slice: slice_run[0].0,
                        bucket: BODY_HASH,
                    });
                }
            }
            self.bucket_writes(slice_run, fresh, &mut start, &mut cmds, &mut sent);
        }
        let compaction = if self.records {
            self.next_compaction()
        } else {
            Vec::new()
        };
        if !compaction.is_empty() {
            let mut eval = redis::cmd("EVAL");
            eval.arg(COMPACT_SCRIPT)
                .arg(compaction.len())
                .arg(&compaction);
            cmds.push(eval);
            sent.push(Sent::Upkeep);
        }
        let unlinks = self.unlink_commands();
        sent.extend(unlinks.iter().map(|_| Sent::Upkeep));
        cmds.extend(unlinks);
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
        // In flight until their replies are read; still indexed. (The
        // settled in-flight vectors and table, empty, take their place.)
        std::mem::swap(&mut self.in_flight.marks, &mut self.unsent);
        std::mem::swap(&mut self.in_flight.index, &mut self.unsent_index);
        self.in_flight.order.extend(order.iter().map(|o| o.2));
        self.in_flight.bodies = body_marks;
        self.in_flight.sent = sent;
        Ok(())
    }

    /// The writes of one slice's buckets (`order` entries of one slice),
    /// each a run of marks `order[start..]`, and the `PEXPIRE` of each
    /// fresh bucket right after its write.
    fn bucket_writes(
        &self,
        slice_run: &[(u64, u64, u32)],
        fresh: &HashSet<(u64, u64)>,
        start: &mut u32,
        cmds: &mut Vec<Cmd>,
        sent: &mut Vec<Sent>,
    ) {
        for run in slice_run.chunk_by(|a, b| a.1 == b.1) {
            let (slice, bucket) = (run[0].0, run[0].1);
            let key = self.key(slice, bucket);
            let mut cmd = redis::cmd(if self.records { "APPEND" } else { "HSET" });
            cmd.arg(&key);
            if self.records {
                cmd.arg(self.record_blob(run));
            } else {
                for (fp, value) in self.hash_pairs(run) {
                    cmd.arg(&fp[..]).arg(value);
                }
            }
            cmds.push(cmd);
            let end = *start + run.len() as u32;
            sent.push(Sent::Marks { start: *start, end });
            *start = end;
            if let Some(ttl) = self.ttl_ms.filter(|_| fresh.contains(&(slice, bucket))) {
                let mut expire = redis::cmd("PEXPIRE");
                expire.arg(&key).arg(ttl);
                cmds.push(expire);
                sent.push(Sent::Expire { slice, bucket });
            }
        }
    }

    /// Cluster: one script for all the buckets (one reply: the cluster
    /// client's pipeline of one command per bucket would wait out a
    /// timeout per command when a server stalls), which answers how many
    /// marks of each bucket it stored; then a compaction chunk.
    fn send_by_script(
        &mut self,
        order: &[(u64, u64, u32)],
        fresh: &HashSet<(u64, u64)>,
    ) -> Result<(), ExactTierError> {
        // The slices' bodies first (a reader that finds a record finds
        // its body), answered at once: refused, every mark stays kept.
        let mut body_writes: Vec<(u64, Cmd, Option<Cmd>)> = Vec::new();
        for slice_run in order.chunk_by(|a, b| a.0 == b.0) {
            if let Some((hset, _)) = self.body_write(slice_run) {
                let slice = slice_run[0].0;
                body_writes.push((slice, hset, self.body_expire(slice)));
            }
        }
        for (slice, hset, expire) in body_writes {
            let written = self.with_conn(|c, _| {
                hset.query::<Value>(c.like())?;
                match &expire {
                    Some(expire) => expire.query::<i64>(c.like()).map(|n| n == 1),
                    None => Ok(false),
                }
            });
            match written {
                Ok(true) => {
                    self.expiring.insert((slice, BODY_HASH));
                }
                Ok(false) => {}
                // Not stored: every mark stays kept, as when the script fails.
                Err(e) => return Err(e),
            }
        }
        let script = if self.records {
            self.append_script.clone()
        } else {
            self.mark_script.clone()
        };
        let mut invocation = script.prepare_invoke();
        invocation.arg(self.ttl_ms.unwrap_or(0));
        let runs: Vec<&[(u64, u64, u32)]> =
            order.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)).collect();
        for run in &runs {
            invocation.key(self.key(run[0].0, run[0].1));
            let fresh = u8::from(fresh.contains(&(run[0].0, run[0].1)));
            if self.records {
                invocation
                    .arg(self.record_blob(run))
                    .arg(fresh)
                    .arg(run.len());
                continue;
            }
            invocation.arg(run.len()).arg(fresh);
            for (fp, value) in self.hash_pairs(run) {
                invocation.arg(&fp[..]).arg(value);
            }
        }
        let reply = self.with_conn(|c, _| invocation.invoke::<Vec<Value>>(c.like()))?;
        // Per bucket the marks stored (a prefix of its run), then the
        // first refusal's message if there was one.
        let stored: Vec<usize> = reply
            .iter()
            .take(runs.len())
            .map(|v| match v {
                Value::Int(n) => usize::try_from(*n).unwrap_or(0),
                _ => 0,
            })
            .collect();
        if stored.len() != runs.len() {
            let e = self.error_of(
                FailureCause::UnexpectedReply,
                format!("{} counts for {} buckets", stored.len(), runs.len()),
            );
            return Err(self.fail_marks(&e));
        }
        let mut refused: Vec<u32> = Vec::new();
        for (run, &n) in runs.iter().zip(&stored) {
            if n > 0 && fresh.contains(&(run[0].0, run[0].1)) {
                self.expiring.insert((run[0].0, run[0].1));
            }
            refused.extend(run.iter().skip(n).map(|o| o.2));
        }
        let written = self.unsent.len() - refused.len();
        self.written(written);
        let stored: Vec<Mark> = runs
            .iter()
            .zip(&stored)
            .flat_map(|(run, &n)| run.iter().take(n))
            .map(|o| self.unsent[o.2 as usize])
            .collect();
        self.bodies_written(stored.iter());
        let refusal = (!refused.is_empty()).then(|| match reply.get(runs.len()) {
            Some(Value::BulkString(text)) => {
                self.refusal(&String::from_utf8_lossy(text), refused.len())
            }
            _ => self.error_of(FailureCause::Other, "marks not stored"),
        });
        // Marks Redis refused stay kept, in order.
        refused.sort_unstable();
        let unsent = std::mem::take(&mut self.unsent);
        self.unsent_index.clear();
        self.keep_again(refused.iter().map(|&i| unsent[i as usize]));
        if let Some(e) = refusal {
            self.stats
                .marks_refused
                .fetch_add(refused.len() as u64, Ordering::Relaxed);
            return Err(self.hold_marks(&e));
        }
        let compaction = if self.records {
            self.next_compaction()
        } else {
            Vec::new()
        };
        if !compaction.is_empty() {
            let script = self.compact_script.clone();
            let mut invocation = script.prepare_invoke();
            for k in &compaction {
                invocation.key(k);
            }
            // Best effort: the marks are written either way.
            let _ = self.with_conn(|c, _| invocation.invoke::<Value>(c.like()));
        }
        Ok(())
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
                if self.records {
                    del.arg(self.body_key(slice));
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
                self.in_flight
                    .sent
                    .extend(cmds.iter().map(|_| Sent::Upkeep));
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
    /// `max_unsent_marks`; the rest are dropped: counted (per slot, until
    /// the slot's slice leaves the window) and returned.
    pub(super) fn keep(&mut self, marks: &[Mark]) -> usize {
        let room = self
            .config
            .max_unsent_marks
            .saturating_sub(self.unsent.len());
        let dropped = marks.len().saturating_sub(room);
        let (kept, lost) = marks.split_at(marks.len() - dropped);
        for m in kept {
            self.unsent.push(*m);
            self.unsent_index.insert(m.fingerprint, m.at.as_nanos());
        }
        for m in lost {
            self.dropped[m.slot] += 1;
            self.bodies.remove(&m.fingerprint);
        }
        self.stats
            .marks_unsent
            .fetch_add(kept.len() as u64, Ordering::Relaxed);
        if dropped > 0 {
            self.stats
                .marks_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        dropped
    }

    /// Puts back marks that were sent but not stored, oldest first, in
    /// front of the unsent ones (newer: their index entries win). Marks of
    /// a slice that has left the window are let go (not counted dropped:
    /// Redis deletes that slice anyway).
    pub(super) fn keep_again(&mut self, marks: impl Iterator<Item = Mark>) {
        let mut again: Vec<Mark> = Vec::new();
        let mut expired = 0u64;
        for m in marks {
            if self.retired(m.slice) {
                expired += 1;
                self.bodies.remove(&m.fingerprint);
                continue;
            }
            if self.unsent_index.get(m.fingerprint).is_none() {
                self.unsent_index.insert(m.fingerprint, m.at.as_nanos());
            }
            again.push(m);
        }
        again.append(&mut self.unsent);
        self.unsent = again;
        self.stats
            .marks_unsent
            .fetch_sub(expired, Ordering::Relaxed);
    }

    /// True when `slice` has left the window (its slot was retired).
    pub(super) fn retired(&self, slice: u64) -> bool {
        self.window.is_some() && slice + (GENERATIONS as u64 - 1) <= self.current
    }

    /// Lets go of the kept marks in `slots`, whose slices are retired,
    /// and of the count of marks dropped there.
    pub(super) fn forget_slots(&mut self, slots: u8) {
        let before = self.unsent.len();
        let bodies = &mut self.bodies;
        self.unsent.retain(|m| {
            let keep = slots & (1 << m.slot) == 0;
            if !keep {
                bodies.remove(&m.fingerprint);
            }
            keep
        });
        let gone = before - self.unsent.len();
        if gone > 0 {
            self.unsent_index.clear();
            for m in &self.unsent {
                self.unsent_index.insert(m.fingerprint, m.at.as_nanos());
            }
            self.stats
                .marks_unsent
                .fetch_sub(gone as u64, Ordering::Relaxed);
        }
        for (slot, dropped) in self.dropped.iter_mut().enumerate() {
            if slots & (1 << slot) != 0 {
                *dropped = 0;
            }
        }
    }
}
