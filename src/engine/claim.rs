//! A shard's half of claims: the lease book in front of the exact tier.
//!
//! Owned keys (and every key of a local tier) keep their leases in the
//! shard's [`LeaseBook`](super::leases::LeaseBook), under the shard's lock,
//! so "at most one live lease per key" is the lock's serialisation. The
//! exact tier only ever holds committed records: a claim reads it (without
//! recording anything), a commit writes the record with the acquisition
//! time, and the body (payload fingerprint, result) beside it.

use std::sync::Arc;

use crate::claims::{LeaseError, LeaseInfo, PayloadFingerprint};
use crate::error::ExactTierError;
use crate::exact::{Lookup, Mark, Partition, RecordBody, Seen};
use crate::fingerprint::Fingerprint;
use crate::time::{newest_slot, slot_of, Timestamp};
use crate::verdict::Verdict;

use super::leases::Held;
use super::shard::{Shard, ShardFilter, ShardRules, Trust};

/// What a shard answers to one claim (the engine wraps a lease around
/// `Acquired`).
#[derive(Clone, Debug)]
pub(crate) enum ShardClaim {
    Acquired(LeaseInfo),
    InProgress {
        until: Timestamp,
    },
    Completed {
        first_seen: Timestamp,
        result: Arc<[u8]>,
    },
    Conflict,
    Unavailable,
}

/// One claim routed to its shard: `(position, fingerprint, payload, time,
/// lease nanoseconds)`.
pub(crate) type Routed = (
    usize,
    Fingerprint,
    Option<PayloadFingerprint>,
    Timestamp,
    u64,
);

/// A committed record found within the window.
struct Found {
    first_seen: Timestamp,
    body: Option<RecordBody>,
}

/// `t − first_seen < window` (a repeat before its record is inside).
#[inline]
fn inside(first_seen: Timestamp, t: Timestamp, rules: &ShardRules) -> bool {
    rules
        .window
        .is_none_or(|w| t.as_nanos().saturating_sub(first_seen.as_nanos()) < w)
}

/// True when both sides carry a payload fingerprint and they differ.
#[inline]
fn conflicts(stored: Option<PayloadFingerprint>, claimed: Option<PayloadFingerprint>) -> bool {
    matches!((stored, claimed), (Some(a), Some(b)) if a != b)
}

impl Shard {
    /// The verdict a check gets for a key held by a live lease
    /// ([`Verdict::InProgress`]); an expired lease met here is dropped.
    #[inline]
    pub(crate) fn held_verdict(&mut self, fp: Fingerprint) -> Option<Verdict> {
        if self.leases.is_empty() {
            return None;
        }
        let until = self.leases.get(fp)?.until;
        if self.lease_clock.now() < until {
            return Some(Verdict::InProgress {
                until: Timestamp::from_nanos(until),
            });
        }
        self.leases.remove(fp);
        self.counters.leases_expired += 1;
        None
    }

    /// One claim of `fp` at engine time `t`, by a lease of `ttl`
    /// nanoseconds, on a shard whose exact tier answers one key at a time.
    pub(crate) fn claim_one(
        &mut self,
        fp: Fingerprint,
        payload: Option<PayloadFingerprint>,
        t: Timestamp,
        ttl: u64,
        now: u64,
        rules: &ShardRules,
    ) -> ShardClaim {
        self.advance(t);
        self.counters.claims += 1;
        if let Some(answer) = self.claim_held(fp, payload, now) {
            return answer;
        }
        let found = self.find_record(fp, t, rules);
        self.settle_claim(fp, payload, t, ttl, now, found)
    }

    /// Claims `items` (`(position, fingerprint, payload, time, ttl)`, in
    /// input order) on a shard whose exact tier is asked in batches: the
    /// lease book answers what it can, one lookup batch answers the rest.
    /// A copy of a key acquired earlier in the batch meets its lease.
    pub(crate) fn claim_batched(
        &mut self,
        items: &[Routed],
        now: u64,
        rules: &ShardRules,
        span: u64,
        out: &mut [Option<ShardClaim>],
    ) {
        // Keys the lease book did not answer, with their filter slots.
        let mut waiting = Vec::new();
        for &(pos, fp, payload, t, _) in items {
            self.advance(t);
            // A cold filter in front of a persistent tier is trusted once a
            // span has passed, for claims as for checks: else an engine
            // that only claims would look every key up in every live slice
            // for ever (9.6 µs of Redis CPU per key claimed, measured).
            self.update_warmth(span, rules.warm_up);
            self.counters.claims += 1;
            match self.claim_held(fp, payload, now) {
                Some(answer) => out[pos] = Some(answer),
                None => waiting.push((pos, fp, self.claim_slots(fp), t)),
            }
        }
        if waiting.is_empty() {
            return;
        }
        let current = self.current_claim_slice();
        let lookups: Vec<Lookup> = waiting
            .iter()
            .map(|&(_, fp, slots, _)| Lookup {
                fingerprint: fp,
                slots,
            })
            .collect();
        let mut answers = Vec::with_capacity(lookups.len());
        let started = std::time::Instant::now();
        let looked_up = match &mut self.exact {
            Some(exact) => exact.lookup_batch(current, &lookups, &mut answers),
            None => Ok(()),
        };
        self.counters
            .exact_call(started.elapsed().as_nanos() as u64);
        let by_pos: std::collections::HashMap<usize, usize> = waiting
            .iter()
            .enumerate()
            .map(|(i, &(pos, ..))| (pos, i))
            .collect();
        // The records found within the window, and their bodies in one
        // more request.
        let mut found: Vec<Option<Timestamp>> = vec![None; waiting.len()];
        let mut wanted = Vec::new();
        if looked_up.is_ok() {
            for (j, &(_, fp, _, t)) in waiting.iter().enumerate() {
                let newest = self.pending.get(fp).or(answers.get(j).copied().flatten());
                if let Some(first_seen) = newest.filter(|&t0| inside(t0, t, rules)) {
                    found[j] = Some(first_seen);
                    wanted.push((fp, slot_of(current), first_seen));
                }
            }
        }
        let mut bodies = Vec::with_capacity(wanted.len());
        let bodies_read = match (&mut self.exact, wanted.is_empty()) {
            (Some(exact), false) => exact.bodies_batch(&wanted, &mut bodies),
            _ => Ok(()),
        };
        let mut bodies = bodies.into_iter();
        for &(pos, fp, payload, t, ttl) in items {
            let Some(&i) = by_pos.get(&pos) else { continue };
            let body = found[i].map(|_| bodies.next().flatten());
            // A copy acquired earlier in this batch holds a lease now.
            if let Some(answer) = self.claim_held(fp, payload, now) {
                out[pos] = Some(answer);
                continue;
            }
            let found = match (&looked_up, &bodies_read) {
                (Err(e), _) | (_, Err(e)) => Err(ExactTierError::Unavailable(e.to_string())),
                (Ok(()), Ok(())) => Ok(found[i].map(|first_seen| Found {
                    first_seen,
                    body: body.flatten(),
                })),
            };
            out[pos] = Some(self.settle_claim(fp, payload, t, ttl, now, found));
        }
    }

    /// True on the memory tier without a filter (one table for the
    /// window, or no window), which [`Shard::claim_direct`] answers.
    #[inline]
    pub(crate) fn claims_direct(&self) -> bool {
        matches!(
            (&self.filter, &self.exact),
            (ShardFilter::Direct, Some(Partition::Memory(_)))
        )
    }

    /// Claims `items` (as [`Shard::claim_batched`]) on the memory tier
    /// without a filter, in three passes: every key's record is looked up,
    /// its table bucket loaded `ahead` keys before; the bodies of the
    /// records found within the window are read in one batch, loaded
    /// ahead too ([`ExactPartition::bodies_batch`]); then each claim is
    /// settled in order, the lease book first, so a copy of a key acquired
    /// earlier in the batch meets its lease. A claim writes nothing to the
    /// table (a commit does), so reading it first answers as reading it
    /// claim by claim would.
    ///
    /// [`ExactPartition::bodies_batch`]: crate::exact::ExactPartition::bodies_batch
    pub(crate) fn claim_direct(
        &mut self,
        items: &[Routed],
        now: u64,
        rules: &ShardRules,
        ahead: usize,
        out: &mut [Option<ShardClaim>],
    ) {
        let Some(Partition::Memory(table)) = &mut self.exact else {
            unreachable!("claim_direct is for the memory tier without a filter");
        };
        let mut records: Vec<Option<Timestamp>> = Vec::with_capacity(items.len());
        let mut wanted = Vec::new();
        for (j, &(_, fp, _, t, _)) in items.iter().enumerate() {
            if let Some(&(_, next, ..)) = items.get(j + ahead) {
                crate::exact::ExactPartition::prefetch(table.as_ref(), next, 0);
            }
            let first_seen = match table.first_seen(fp) {
                Seen::At(first_seen) => Some(first_seen),
                // No times kept: its body knows when, if it has one.
                Seen::Untimed => Some(Timestamp::ZERO),
                Seen::No => None,
            }
            .filter(|&first_seen| inside(first_seen, t, rules));
            if let Some(first_seen) = first_seen {
                wanted.push((fp, 0, first_seen));
            }
            records.push(first_seen);
        }
        let mut bodies = Vec::with_capacity(wanted.len());
        let read = if wanted.is_empty() {
            Ok(())
        } else {
            crate::exact::ExactPartition::bodies_batch(table.as_mut(), &wanted, &mut bodies)
        };
        let mut bodies = bodies.into_iter();
        for (&(pos, fp, payload, t, ttl), first_seen) in items.iter().zip(records) {
            // Taken in order whatever the lease book answers.
            let body = first_seen.map(|_| bodies.next().flatten());
            self.advance(t);
            self.counters.claims += 1;
            if let Some(answer) = self.claim_held(fp, payload, now) {
                out[pos] = Some(answer);
                continue;
            }
            let found = match &read {
                Err(e) => Err(ExactTierError::Unavailable(e.to_string())),
                Ok(()) => Ok(first_seen.map(|first_seen| Found {
                    first_seen,
                    body: body.flatten(),
                })),
            };
            out[pos] = Some(self.settle_claim(fp, payload, t, ttl, now, found));
        }
    }

    /// Starts loading what a commit of `info` writes: on the memory tier
    /// without a filter, its table bucket and its body's index bucket.
    #[inline]
    pub(crate) fn prefetch_commit(&self, info: &LeaseInfo) {
        if let (ShardFilter::Direct, Some(Partition::Memory(table))) = (&self.filter, &self.exact) {
            table.prefetch_commit(info.fingerprint, info.acquired_at);
        }
    }

    /// The lease book's answer for a claim: `InProgress` or `Conflict`
    /// while a live lease holds the key; an expired one is dropped and the
    /// claim goes on to the exact tier.
    fn claim_held(
        &mut self,
        fp: Fingerprint,
        payload: Option<PayloadFingerprint>,
        now: u64,
    ) -> Option<ShardClaim> {
        let held = *self.leases.get(fp)?;
        if now < held.until {
            return Some(if conflicts(held.payload, payload) {
                self.counters.conflicts += 1;
                ShardClaim::Conflict
            } else {
                self.counters.claims_in_progress += 1;
                ShardClaim::InProgress {
                    until: Timestamp::from_nanos(held.until),
                }
            });
        }
        self.leases.remove(fp);
        self.counters.leases_expired += 1;
        None
    }

    /// The answer once the exact tier was read: completed (or a conflict)
    /// when a record lies within the window, else acquired.
    fn settle_claim(
        &mut self,
        fp: Fingerprint,
        payload: Option<PayloadFingerprint>,
        t: Timestamp,
        ttl: u64,
        now: u64,
        found: Result<Option<Found>, ExactTierError>,
    ) -> ShardClaim {
        match found {
            Err(_) => {
                self.counters.unavailable += 1;
                ShardClaim::Unavailable
            }
            Ok(Some(Found { first_seen, body })) => {
                if conflicts(body.as_ref().and_then(|b| b.payload), payload) {
                    self.counters.conflicts += 1;
                    return ShardClaim::Conflict;
                }
                self.counters.claims_completed += 1;
                ShardClaim::Completed {
                    first_seen,
                    result: body.map_or_else(|| self.empty_result.clone(), |b| b.result),
                }
            }
            Ok(None) => {
                let token = self.next_token;
                self.next_token += 1;
                let until = now.saturating_add(ttl);
                self.leases.insert(
                    fp,
                    Held {
                        token,
                        acquired_at: t.as_nanos(),
                        until,
                        payload,
                    },
                );
                if let Some(log) = &mut self.log {
                    log.acquire(fp, t.as_nanos(), token, until, payload);
                }
                self.counters.acquired += 1;
                ShardClaim::Acquired(LeaseInfo {
                    fingerprint: fp,
                    token,
                    acquired_at: t,
                    expires_at: Timestamp::from_nanos(until),
                    payload,
                })
            }
        }
    }

    /// The committed record of `fp` within the window at `t`, if any,
    /// without recording anything.
    fn find_record(
        &mut self,
        fp: Fingerprint,
        t: Timestamp,
        rules: &ShardRules,
    ) -> Result<Option<Found>, ExactTierError> {
        // The newest record and the slot it lives in.
        let newest: Option<(Timestamp, usize)> = match &self.filter {
            ShardFilter::Direct => {
                let Some(Partition::Memory(table)) = &self.exact else {
                    unreachable!("a shard without a filter has the memory tier");
                };
                match table.first_seen(fp) {
                    Seen::At(first_seen) => Some((first_seen, 0)),
                    // No times kept: its body knows when, if it has one.
                    Seen::Untimed => Some((Timestamp::ZERO, 0)),
                    Seen::No => None,
                }
            }
            ShardFilter::Windowed(f) => {
                let cur = f.current();
                if let Some(first_seen) = self.pending.get(fp) {
                    Some((first_seen, slot_of(cur)))
                } else {
                    let mut todo = f.hits(fp, f.probe(fp));
                    let mut found = None;
                    if let Some(exact) = &mut self.exact {
                        while let Some(slot) = newest_slot(todo, cur) {
                            todo &= !(1 << slot);
                            if let Some(first_seen) = exact.lookup(fp, slot)? {
                                found = Some((first_seen, slot));
                                break;
                            }
                        }
                    } else if todo != 0 {
                        // Probabilistic mode: the filter is all there is.
                        let since = match self.likely_duplicate(todo, cur) {
                            Verdict::LikelyDuplicate { since } => since,
                            _ => Timestamp::ZERO,
                        };
                        return Ok(Some(Found {
                            first_seen: since,
                            body: None,
                        }));
                    }
                    found
                }
            }
            ShardFilter::Unbounded(g) => {
                if let Some(first_seen) = self.pending.get(fp) {
                    Some((first_seen, 0))
                } else if g.contains(fp) {
                    match &mut self.exact {
                        Some(exact) => exact.lookup(fp, 0)?.map(|first_seen| (first_seen, 0)),
                        None => {
                            return Ok(Some(Found {
                                first_seen: Timestamp::ZERO,
                                body: None,
                            }))
                        }
                    }
                } else {
                    None
                }
            }
        };
        let Some((first_seen, slot)) = newest else {
            return Ok(None);
        };
        if !inside(first_seen, t, rules) {
            return Ok(None);
        }
        // (An engine without first-seen times answers the epoch.)
        let body = self.body_of(fp, slot, first_seen)?;
        Ok(Some(Found { first_seen, body }))
    }

    fn body_of(
        &mut self,
        fp: Fingerprint,
        slot: usize,
        at: Timestamp,
    ) -> Result<Option<RecordBody>, ExactTierError> {
        match &mut self.exact {
            Some(exact) => exact.body(fp, slot, at),
            None => Ok(None),
        }
    }

    /// The filter slots a batched claim looks `fp` up in: what the filter
    /// matched while warm, every live slot while cold.
    fn claim_slots(&self, fp: Fingerprint) -> u8 {
        match &self.filter {
            ShardFilter::Windowed(f) if self.warmth == super::shard::Warmth::Warm => {
                f.hits(fp, f.probe(fp))
            }
            _ => u8::MAX,
        }
    }

    pub(super) fn current_claim_slice(&self) -> u64 {
        match &self.filter {
            ShardFilter::Windowed(f) => f.current(),
            ShardFilter::Unbounded(_) | ShardFilter::Direct => 0,
        }
    }

    /// Commits `info`'s lease at engine time `t`: the record is written
    /// with the acquisition time, its body beside it.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when `info` is not the key's lease any more;
    /// [`LeaseError::Unavailable`] when the tier could not store the body
    /// (the lease stays).
    pub(crate) fn commit(
        &mut self,
        info: &LeaseInfo,
        result: &[u8],
        t: Timestamp,
        now: u64,
        rules: &ShardRules,
        trust: Trust,
    ) -> Result<(), LeaseError> {
        let fp = info.fingerprint;
        // Taken out of the book first (one lookup), so the rotation below,
        // which drops expired leases, cannot take it from under us.
        let held = match self.leases.remove(fp) {
            Some(h) if h.token == info.token && now < h.until => h,
            other => {
                if let Some(h) = other {
                    if h.token == info.token {
                        // Ours, expired: gone either way.
                        self.counters.leases_expired += 1;
                    } else {
                        self.leases.insert(fp, h);
                    }
                }
                self.counters.lease_lost += 1;
                return Err(LeaseError::Lost);
            }
        };
        self.advance(t);
        if let Err(e) = self.record(
            fp,
            Timestamp::from_nanos(held.acquired_at),
            held.payload,
            result,
            rules,
            trust,
        ) {
            self.leases.insert(fp, held);
            return Err(LeaseError::Unavailable(e));
        }
        if let Some(log) = &mut self.log {
            log.commit(
                fp,
                t.as_nanos().max(self.time),
                held.token,
                held.acquired_at,
                held.payload,
                result,
            );
        }
        self.counters.commits += 1;
        self.counters.result_bytes += result.len() as u64;
        Ok(())
    }

    /// Records `fp` as accepted at `at` with `body`: the filter's current
    /// generation and the exact tier (queued or written through), the body
    /// first so that a failure leaves nothing half-written.
    fn record(
        &mut self,
        fp: Fingerprint,
        at: Timestamp,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
        rules: &ShardRules,
        trust: Trust,
    ) -> Result<(), ExactTierError> {
        let slice = self.current_claim_slice();
        if payload.is_some() || !result.is_empty() {
            let mark = Mark {
                fingerprint: fp,
                slot: slot_of(slice),
                slice,
                at,
            };
            if let Some(exact) = &mut self.exact {
                exact.put_body(&mark, payload, result)?;
            }
        }
        match self.filter {
            ShardFilter::Direct => {
                let Some(exact) = &mut self.exact else {
                    unreachable!("a shard without a filter has the memory tier");
                };
                exact.mark(fp, 0, at)?;
                self.counters.marks_queued += 1;
                self.counters.marks_flushed += 1;
            }
            ShardFilter::Windowed(_) | ShardFilter::Unbounded(_) => {
                self.accept(fp, None, at, rules);
                if trust == Trust::Shared {
                    // Shared checks claim in the tier itself, which does not
                    // read this shard's queue: write the mark now.
                    self.flush_marks();
                }
            }
        }
        Ok(())
    }

    /// Releases `info`'s lease: the key is as if never claimed.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when `info` is not the key's lease any more.
    pub(crate) fn release(&mut self, info: &LeaseInfo, now: u64) -> Result<(), LeaseError> {
        if !self.holds(info, now) {
            return Err(LeaseError::Lost);
        }
        self.leases.remove(info.fingerprint);
        if let Some(log) = &mut self.log {
            log.release(info.fingerprint, info.token);
        }
        self.counters.releases += 1;
        Ok(())
    }

    /// True while `info` is the key's lease and has not expired: a lease is
    /// a hard deadline (a holder past it may have been overtaken, and a
    /// store that told it otherwise would depend on when expired leases
    /// are swept).
    fn holds(&self, info: &LeaseInfo, now: u64) -> bool {
        self.leases
            .get(info.fingerprint)
            .is_some_and(|h| h.token == info.token && now < h.until)
    }

    /// Renews `info`'s lease until lease-clock time `until`.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when `info` is not the key's lease any more.
    pub(crate) fn extend(
        &mut self,
        info: &LeaseInfo,
        until: u64,
        now: u64,
    ) -> Result<(), LeaseError> {
        if !self.holds(info, now) {
            return Err(LeaseError::Lost);
        }
        let held = self
            .leases
            .get_mut(info.fingerprint)
            .expect("held, checked above");
        held.until = until;
        if let Some(log) = &mut self.log {
            log.extend(info.fingerprint, info.token, until);
        }
        Ok(())
    }

    /// Removes whatever is recorded or held for `fp`; true if something
    /// was.
    ///
    /// # Errors
    /// The tier's error when it cannot remove the record.
    pub(crate) fn forget(
        &mut self,
        fp: Fingerprint,
        t: Timestamp,
        rules: &ShardRules,
    ) -> Result<bool, ExactTierError> {
        // An expired lease counts as nothing held, whether or not it was
        // swept yet (the answer must not depend on when sweeps run, nor on
        // a restart's replay, which sweeps at other moments).
        // Time first, as a check or claim does: a remote tier looks for the
        // key in the slices live at `t` (an engine just started has named
        // none yet).
        self.advance(t);
        let now = self.lease_clock.now();
        let held = self.leases.remove(fp).is_some_and(|h| now < h.until);
        if self.pending.get(fp).is_some() {
            // Its mark is queued: write the queue, then remove it there.
            self.flush_marks();
        }
        // On the one-table memory tier an expired record counts as nothing,
        // swept or not; other tiers answer for any record they removed.
        let live = match (&self.filter, &self.exact) {
            (ShardFilter::Direct, Some(Partition::Memory(table))) => match table.first_seen(fp) {
                Seen::At(first_seen) => Some(inside(first_seen, t, rules)),
                Seen::Untimed => Some(true),
                Seen::No => Some(false),
            },
            _ => None,
        };
        let current = self.current_claim_slice();
        let recorded = match &mut self.exact {
            Some(exact) => {
                exact.name_slice(current);
                exact.forget(fp)?
            }
            None => false,
        };
        let recorded = live.map_or(recorded, |live| live && recorded);
        if held || recorded {
            self.counters.forgotten += 1;
            if let Some(log) = &mut self.log {
                log.forget(fp);
            }
        }
        Ok(held || recorded)
    }

    /// Drops the expired leases (at each rotation, so the book holds only
    /// keys being acted on).
    pub(crate) fn drop_expired_leases(&mut self) {
        if !self.leases.is_empty() {
            let now = self.lease_clock.now();
            self.counters.leases_expired += self.leases.drop_expired(now);
        }
    }
}
