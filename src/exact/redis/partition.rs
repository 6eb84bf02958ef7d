//! The [`ExactPartition`] the engine calls: each request goes to the
//! concern that handles it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::conn::Wait;
use super::records::decode;
use super::scripts::FORGET_SCRIPT;
use super::RedisPartition;
use crate::claims::PayloadFingerprint;
use crate::error::{ExactTierError, FailureCause};
use crate::exact::{
    slots_newest_first, Claim, ExactPartition, Lookup, Mark, MemoryPartition, RecordBody,
    SharedAnswer, SharedOp,
};
use crate::fingerprint::Fingerprint;
use crate::time::{slot_of, Timestamp, GENERATIONS};

impl ExactPartition for RedisPartition {
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        let mut out = Vec::new();
        let lookup = Lookup {
            fingerprint: fp,
            slots: 1 << slot,
        };
        self.lookup_batch(self.current, &[lookup], &mut out)?;
        Ok(out.pop().flatten())
    }

    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        let slice = slots_newest_first(self.current)
            .find(|&(_, s)| s == slot)
            .map_or(self.current, |(slice, _)| slice);
        self.mark_batch(&[Mark {
            fingerprint: fp,
            slot,
            slice,
            at,
        }])
    }

    fn mark_batch(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        if let Some(newest) = marks.iter().map(|m| m.slice).max() {
            self.advance(newest);
        }
        if let Some(fallback) = &mut self.fallback {
            fallback.mark_batch(marks)?;
        }
        let dropped = self.keep(marks);
        // Kept for retry whatever happens now; report the failure.
        self.send_unsent()?;
        if dropped > 0 {
            return Err(self.error_of(
                FailureCause::RetryBufferFull,
                format!(
                    "{dropped} marks dropped: {} are kept for a retry per shard (max_unsent_marks)",
                    self.config.max_unsent_marks
                ),
            ));
        }
        Ok(())
    }

    fn mark_batch_idle(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        self.waiting(Wait::Idle, |p| p.mark_batch(marks))
    }

    fn flush(&mut self) -> Result<(), ExactTierError> {
        if self.log.is_some() {
            self.waiting(Wait::Flush, |p| p.catch_up())?;
        } else {
            self.waiting(Wait::Flush, |p| p.send_unsent().and_then(|()| p.settle()))?;
        }
        // Stored or kept; dropped marks are reported while they matter.
        match self.dropped() {
            0 => Ok(()),
            n => Err(self.error_of(
                FailureCause::RetryBufferFull,
                format!(
                    "{n} accepted keys inside the window were dropped past the retry buffer \
                     ({} marks per shard: RedisConfig::max_unsent_marks) while Redis did not \
                     store them",
                    self.config.max_unsent_marks
                ),
            )),
        }
    }

    fn unwritten(&self) -> u64 {
        (self.unsent.len() + self.in_flight.marks.len()) as u64 + self.kept_checks()
    }

    fn dropped(&self) -> u64 {
        self.dropped.iter().sum()
    }

    fn flush_idle(&mut self) -> Result<(), ExactTierError> {
        if self.log.is_some() {
            // Reads what the other engines appended meanwhile: the next
            // batch has less to catch up.
            return self.waiting(Wait::Idle, |p| p.catch_up());
        }
        self.waiting(Wait::Idle, |p| p.send_unsent().and_then(|()| p.settle()))
    }

    fn prefers_batches(&self) -> bool {
        true
    }

    fn persistent(&self) -> bool {
        true
    }

    fn lookup_batch(
        &mut self,
        current: u64,
        lookups: &[Lookup],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        if self.log.is_some() {
            return Err(ExactTierError::Unsupported(
                "shared keys are looked up by claiming them (shared_claims)",
            ));
        }
        self.lookup_batch_in_redis(current, lookups, out)
    }

    /// Shared mode: checks through the shard's log, as
    /// [`ExactPartition::shared_claims`] does them.
    fn claim_batch(
        &mut self,
        current: u64,
        window: Option<u64>,
        claims: &[Claim],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        if self.log.is_none() {
            return Err(ExactTierError::Unsupported(
                "owned keys are claimed in the engine",
            ));
        }
        let now = crate::time::Timestamp::now().as_nanos();
        let ops: Vec<SharedOp<'_>> = claims
            .iter()
            .map(|c| SharedOp::Check {
                fingerprint: c.fingerprint,
                at: c.at,
                now,
            })
            .collect();
        let mut answers = Vec::with_capacity(ops.len());
        self.shared_claims_in_redis(current, window, &ops, &mut answers)?;
        out.clear();
        out.extend(answers.into_iter().map(|a| match a {
            SharedAnswer::Completed { first_seen, .. } => Some(first_seen),
            _ => None,
        }));
        Ok(())
    }

    fn shared_claims(
        &mut self,
        current: u64,
        window: Option<u64>,
        ops: &[SharedOp<'_>],
        out: &mut Vec<SharedAnswer>,
    ) -> Result<(), ExactTierError> {
        if self.log.is_none() {
            return Err(ExactTierError::Unsupported(
                "owned keys keep their leases in the engine",
            ));
        }
        self.shared_claims_in_redis(current, window, ops, out)
    }

    fn clear_slots(&mut self, slots: u8) {
        // The slot's retiring slice is the newest one in it up to the last
        // slice the engine named: delete those hashes now (best effort; the
        // TTL is the backstop).
        let expired: Vec<u64> = (0..GENERATIONS as u64)
            .filter_map(|back| self.current.checked_sub(back))
            .filter(|&slice| slots & (1 << slot_of(slice)) != 0)
            .collect();
        if !expired.is_empty() && self.log.is_some() {
            // Shared mode: the log is trimmed as it is read; the retired
            // slices' result hashes go once the log proves this clock
            // (`unlink_retired`; the TTL is the backstop).
            self.retire_results(&expired);
        } else if !expired.is_empty() {
            self.expiring.retain(|(slice, _)| !expired.contains(slice));
            if self.config.cluster {
                // Marks are answered at once on a cluster: none in flight.
                let _ = self.with_conn(|c, p| {
                    let mut del = redis::cmd("UNLINK");
                    for &slice in &expired {
                        for bucket in 0..p.buckets {
                            del.arg(p.key(slice, bucket));
                        }
                        if p.records {
                            del.arg(p.body_key(slice));
                        }
                    }
                    c.pipeline(vec![del])
                });
            } else {
                // On the mark connection, after the marks in flight (Redis
                // runs one connection's commands in order: none of them
                // lands after the delete), without waiting for a reply; or
                // with the next marks if that connection is down.
                self.unlinks.extend(expired);
                self.send_unlinks();
            }
        }
        self.forget_slots(slots);
        if let Some(fallback) = &mut self.fallback {
            fallback.clear_slots(slots);
        }
    }

    fn put_body(
        &mut self,
        mark: &Mark,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
    ) -> Result<(), ExactTierError> {
        if self.log.is_some() {
            return Err(ExactTierError::Unsupported(
                "shared keys are committed through shared_claims",
            ));
        }
        if let Some(fallback) = &mut self.fallback {
            fallback.put_body(mark, payload, result)?;
        }
        // Written with the key's mark, which the engine queues next.
        self.bodies.insert(
            mark.fingerprint,
            (
                mark.at.as_nanos(),
                RecordBody {
                    payload,
                    result: Arc::from(result),
                },
            ),
        );
        Ok(())
    }

    fn body(
        &mut self,
        fp: Fingerprint,
        slot: usize,
        at: Timestamp,
    ) -> Result<Option<RecordBody>, ExactTierError> {
        let mut out = Vec::with_capacity(1);
        self.bodies_batch(&[(fp, slot, at)], &mut out)?;
        Ok(out.pop().flatten())
    }

    /// Bodies not yet acknowledged are read here; the others were found
    /// by the lookup that found their records (the claim path asks right
    /// after it), or are looked up again, in one request.
    fn bodies_batch(
        &mut self,
        records: &[(Fingerprint, usize, Timestamp)],
        out: &mut Vec<Option<RecordBody>>,
    ) -> Result<(), ExactTierError> {
        out.clear();
        let mut missing = Vec::new();
        for (i, &(fp, _, at)) in records.iter().enumerate() {
            let at = at.as_nanos();
            let known = [&self.bodies, &self.found_bodies]
                .into_iter()
                .find_map(|m| m.get(&fp).filter(|(t, _)| *t == at));
            match known {
                Some((_, body)) => out.push(Some(body.clone())),
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if missing.is_empty() || self.log.is_some() {
            return Ok(());
        }
        // Not found by the last lookup: looked up again.
        let again: Vec<Lookup> = missing
            .iter()
            .filter(|&&i| {
                let (fp, _, at) = records[i];
                self.apart_bodies.get(&fp).map(|&(t, _)| t) != Some(at.as_nanos())
            })
            .map(|&i| Lookup {
                fingerprint: records[i].0,
                slots: u8::MAX,
            })
            .collect();
        if !again.is_empty() {
            let apart = std::mem::take(&mut self.apart_bodies);
            let mut times = Vec::with_capacity(again.len());
            self.lookup_batch_in_redis(self.current, &again, &mut times)?;
            for (fp, v) in apart {
                self.apart_bodies.entry(fp).or_insert(v);
            }
        }
        // Bodies in body hashes: one HMGET per slice.
        let mut by_slice: Vec<(u64, usize)> = Vec::new();
        for &i in &missing {
            let (fp, _, at) = records[i];
            out[i] = self
                .found_bodies
                .get(&fp)
                .filter(|(t, _)| *t == at.as_nanos())
                .map(|(_, body)| body.clone());
            if let Some(&(_, slice)) = self
                .apart_bodies
                .get(&fp)
                .filter(|(t, _)| *t == at.as_nanos())
            {
                by_slice.push((slice, i));
            }
        }
        if by_slice.is_empty() {
            return Ok(());
        }
        by_slice.sort_unstable();
        let runs: Vec<&[(u64, usize)]> = by_slice.chunk_by(|a, b| a.0 == b.0).collect();
        let hashes: Vec<(String, Vec<[u8; 16]>)> = runs
            .iter()
            .map(|run| {
                let fields = run.iter().map(|&(_, i)| records[i].0.to_bytes()).collect();
                (self.body_key(run[0].0), fields)
            })
            .collect();
        let values = self.hmget_many(&hashes)?;
        if values.len() != by_slice.len() {
            return Err(self.error_of(
                FailureCause::UnexpectedReply,
                format!("{} bodies for {} asked", values.len(), by_slice.len()),
            ));
        }
        for (&(slice, i), value) in by_slice.iter().zip(values) {
            let at = records[i].2;
            let body = match value {
                redis::Value::BulkString(bytes) => decode(&bytes)
                    .filter(|(t, _)| *t == at)
                    .and_then(|(_, body)| body),
                _ => None,
            };
            // A record says it has a body: without it, the record's
            // stored result cannot be replayed, nor taken for empty.
            let Some(body) = body else {
                return Err(self.error_of(
                    FailureCause::UnexpectedReply,
                    format!(
                        "the body of a completed record (accepted at {} ns) is missing from {}",
                        at.as_nanos(),
                        self.body_key(slice)
                    ),
                ));
            };
            out[i] = Some(body);
        }
        Ok(())
    }

    /// The slices live at `current` are where `forget` looks.
    fn name_slice(&mut self, current: u64) {
        self.advance(current);
    }

    /// Owned keys: the marks in flight are settled first (a delete must
    /// not be overtaken by them), the unsent ones dropped, then every
    /// record of `fp` is removed from the buckets of the live slices
    /// (`FORGET_SCRIPT`, one request).
    fn forget(&mut self, fp: Fingerprint) -> Result<bool, ExactTierError> {
        if self.log.is_some() {
            return Err(ExactTierError::Unsupported(
                "shared keys are forgotten through shared_claims",
            ));
        }
        if !self.config.cluster {
            self.send_unsent()?;
            self.settle()?;
        }
        let mut found = self.bodies.remove(&fp).is_some();
        self.found_bodies.remove(&fp);
        self.apart_bodies.remove(&fp);
        if self.unsent_index.get(fp).is_some() {
            found = true;
            let gone = self.unsent.iter().filter(|m| m.fingerprint == fp).count();
            self.unsent.retain(|m| m.fingerprint != fp);
            self.unsent_index.clear();
            for m in &self.unsent {
                self.unsent_index.insert(m.fingerprint, m.at.as_nanos());
            }
            self.stats
                .marks_unsent
                .fetch_sub(gone as u64, Ordering::Relaxed);
        }
        if let Some(fallback) = &mut self.fallback {
            found |= fallback.forget(fp)?;
        }
        let script = redis::Script::new(FORGET_SCRIPT);
        let removed: u64 = self.with_conn(|c, p| {
            let mut invocation = script.prepare_invoke();
            let bucket = p.bucket(fp);
            for (slice, _) in slots_newest_first(p.current) {
                invocation.key(p.key(slice, bucket));
            }
            invocation
                .arg(&fp.to_bytes()[..])
                .arg(if p.records { "1" } else { "0" });
            invocation.invoke(c.like())
        })?;
        Ok(found || removed > 0)
    }

    fn len(&self) -> u64 {
        (self.unsent.len() + self.in_flight.marks.len()) as u64
            + self.log.as_ref().map_or(0, |l| l.replica.len())
    }

    fn bytes(&self) -> usize {
        let bodies = |m: &crate::fingerprint::FingerprintMap<(u64, RecordBody)>| {
            m.values().map(|(_, b)| 64 + b.result.len()).sum::<usize>()
        };
        self.fallback.as_ref().map_or(0, MemoryPartition::bytes)
            + bodies(&self.bodies)
            + bodies(&self.found_bodies)
            + self.log.as_ref().map_or(0, |l| l.replica.bytes())
            + (self.unsent.capacity() + self.in_flight.marks.capacity()) * 48
            + self.unsent_index.bytes()
            + self.in_flight.index.bytes()
    }

    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        None
    }
}
