//! Shared mode: claims judged and recorded atomically in Redis
//! (`CLAIM_SCRIPT`), and what a claim does when Redis cannot answer.

use std::collections::HashMap;

use redis::Value;

use super::records::decode;
use super::{FailurePolicy, RedisPartition};
use crate::error::ExactTierError;
use crate::exact::{slots_newest_first, Claim, ExactPartition, Mark};
use crate::fingerprint::Fingerprint;
use crate::time::{slot_of, Timestamp};

/// Shared mode, fail closed: claims that were sent but whose answer was
/// lost (a timeout, a connection cut mid-request). The caller got
/// `Unavailable` and will retry, yet the script may have run — at once, or
/// when a stopped server resumes — and recorded the key at the claim's
/// time. A later claim that finds exactly that time is the retry of that
/// claim: the key is accepted then, not refused as a duplicate of a claim
/// nobody acted on. (Another engine claiming the same key at the same
/// nanosecond would be taken for ours.) Bounded by `max_unsent_marks`;
/// entries older than the window are forgotten.
pub(super) struct UnansweredClaims {
    /// Fingerprint → times of its unanswered claims.
    times: HashMap<Fingerprint, Vec<u64>>,
    len: usize,
    max: usize,
    /// No time held is older (`u64::MAX` when empty).
    oldest: u64,
}

impl UnansweredClaims {
    pub(super) fn new(max: usize) -> Self {
        UnansweredClaims {
            times: HashMap::new(),
            len: 0,
            max,
            oldest: u64::MAX,
        }
    }

    pub(super) fn remember(&mut self, claims: &[Claim]) {
        for c in claims {
            if self.len >= self.max {
                return;
            }
            self.times
                .entry(c.fingerprint)
                .or_default()
                .push(c.at.as_nanos());
            self.len += 1;
            self.oldest = self.oldest.min(c.at.as_nanos());
        }
    }

    /// Forgets `fp`: a claim recorded it now, so no earlier one of ours can
    /// record it any more.
    pub(super) fn forget(&mut self, fp: Fingerprint) {
        if self.len > 0 {
            if let Some(times) = self.times.remove(&fp) {
                self.len -= times.len();
            }
        }
    }

    /// True (and forgotten) when `fp` has an unanswered claim at `at`.
    pub(super) fn take(&mut self, fp: Fingerprint, at: Timestamp) -> bool {
        if self.len == 0 {
            return false;
        }
        let Some(times) = self.times.get(&fp) else {
            return false;
        };
        if !times.contains(&at.as_nanos()) {
            return false;
        }
        self.len -= times.len();
        self.times.remove(&fp);
        true
    }

    /// Forgets claims made before `t` (outside the window: a claim's
    /// record no longer counts then).
    pub(super) fn forget_before(&mut self, t: u64) {
        if self.len == 0 || self.oldest >= t {
            return;
        }
        let (mut len, mut oldest) = (0, u64::MAX);
        self.times.retain(|_, times| {
            times.retain(|&at| at >= t);
            len += times.len();
            oldest = times.iter().copied().fold(oldest, u64::min);
            !times.is_empty()
        });
        self.len = len;
        self.oldest = oldest;
    }
}

impl RedisPartition {
    pub(super) fn claim_batch_in_redis(
        &mut self,
        current: u64,
        window: Option<u64>,
        claims: &[Claim],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        self.advance(current);
        out.clear();
        let window = window.or(self.window);
        // Marks kept through an outage first: the script must see them.
        // Written means answered: the script runs on another connection.
        // If they cannot be written, the claims cannot be made either (the
        // script would accept their keys again): the policy decides.
        if let Err(e) = self.send_unsent().and_then(|()| self.settle()) {
            return match self.config.policy {
                FailurePolicy::FailClosed => Err(e),
                FailurePolicy::FailOpen | FailurePolicy::FallbackToMemory => {
                    self.claim_degraded(current, window, claims, out)
                }
            };
        }
        let script = self.script.clone();
        let mut sent = false;
        let result: Result<Vec<Value>, ExactTierError> = {
            let live: Vec<u64> = slots_newest_first(current)
                .map(|(slice, _)| slice)
                .collect();
            // 0: no TTL (no window, no retention configured).
            let ttl = self.ttl_ms.unwrap_or(0);
            let sent = &mut sent;
            // Built once connected: the hash count may change when a
            // connection adopts the agreed one.
            self.with_conn(move |c, p| {
                // Per bucket used, its live hashes; per claim, where its
                // bucket's hashes start.
                let mut keys: Vec<String> = Vec::new();
                let mut base: HashMap<u64, usize> = HashMap::new();
                let mut args: Vec<Vec<u8>> = Vec::with_capacity(claims.len() * 4);
                for c in claims {
                    let bucket = p.bucket(c.fingerprint);
                    let offset = *base.entry(bucket).or_insert_with(|| {
                        let offset = keys.len();
                        keys.extend(live.iter().map(|&slice| p.key(slice, bucket)));
                        offset
                    });
                    let threshold =
                        window.map_or(0, |w| c.at.as_nanos().saturating_sub(w).saturating_add(1));
                    args.push(offset.to_string().into_bytes());
                    args.push(c.fingerprint.to_bytes().to_vec());
                    args.push(c.at.as_nanos().to_be_bytes().to_vec());
                    args.push(threshold.to_be_bytes().to_vec());
                }
                *sent = true;
                let mut invocation = script.prepare_invoke();
                for k in &keys {
                    invocation.key(k);
                }
                invocation.arg(ttl).arg(live.len());
                for a in &args {
                    invocation.arg(&a[..]);
                }
                invocation.invoke(c.like())
            })
        };
        let values = match result {
            Ok(values) => values,
            Err(e) => {
                return match self.config.policy {
                    FailurePolicy::FailClosed => {
                        if sent {
                            // The script may still run (a reply lost, a
                            // stopped server resumed): remember what it
                            // would record, so the caller's retry is not
                            // taken for a duplicate of its own claim.
                            self.unanswered.remember(claims);
                        }
                        Err(e)
                    }
                    FailurePolicy::FailOpen | FailurePolicy::FallbackToMemory => {
                        self.claim_degraded(current, window, claims, out)
                    }
                };
            }
        };
        // Keys whose stored time is that of a claim of ours answered
        // `Unavailable`: recorded by that claim, never accepted by the
        // caller. Accept them now, and record the time they are accepted.
        let mut reclaimed: Vec<Mark> = Vec::new();
        for (c, v) in claims.iter().zip(values) {
            let found = match v {
                Value::BulkString(bytes) => decode(&bytes),
                _ => None,
            };
            let found = match found {
                Some(t0) if self.unanswered.take(c.fingerprint, t0) => {
                    reclaimed.push(Self::mark_now(c.fingerprint, current, c.at));
                    None
                }
                // A later copy of a key reclaimed in this batch.
                Some(t0) => Some(
                    reclaimed
                        .iter()
                        .find(|m| m.fingerprint == c.fingerprint)
                        .map_or(t0, |m| m.at),
                ),
                None => {
                    self.unanswered.forget(c.fingerprint);
                    None
                }
            };
            out.push(found);
        }
        if let Some(fallback) = &mut self.fallback {
            for (c, r) in claims.iter().zip(out.iter()) {
                if r.is_none() {
                    fallback.mark(c.fingerprint, slot_of(current), c.at)?;
                }
            }
        }
        if !reclaimed.is_empty() {
            self.keep(&reclaimed);
            let _ = self.send_unsent();
        }
        if let Some(at) = claims.iter().map(|c| c.at.as_nanos()).max() {
            self.unanswered
                .forget_before(window.map_or(0, |w| at.saturating_sub(w)));
        }
        Ok(())
    }

    /// Shared mode without Redis, under a policy that accepts keys: judges
    /// `claims` in order from the marks this partition keeps (fail open) or
    /// its memory tier (fallback), and keeps a mark of every key accepted,
    /// so that Redis holds it once it is back.
    pub(super) fn claim_degraded(
        &mut self,
        current: u64,
        window: Option<u64>,
        claims: &[Claim],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        self.degraded(claims.len());
        out.clear();
        if let Some(fallback) = &mut self.fallback {
            fallback.claim_batch(current, window, claims, out)?;
        } else {
            for c in claims {
                // Kept marks are written in order: a copy accepted earlier
                // in this batch is seen here.
                let inside = self
                    .pending_time(c.fingerprint)
                    .filter(|&t0| window.is_none_or(|w| c.at.as_nanos().saturating_sub(t0) < w));
                if inside.is_none() {
                    self.keep(&[Self::mark_now(c.fingerprint, current, c.at)]);
                }
                out.push(inside.map(Timestamp::from_nanos));
            }
            return Ok(());
        }
        let accepted: Vec<Mark> = claims
            .iter()
            .zip(out.iter())
            .filter(|(_, r)| r.is_none())
            .map(|(c, _)| Self::mark_now(c.fingerprint, current, c.at))
            .collect();
        self.keep(&accepted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(fp: u128, at: u64) -> Claim {
        Claim {
            fingerprint: Fingerprint(fp),
            at: Timestamp::from_nanos(at),
        }
    }

    #[test]
    fn unanswered_claims_are_recognised_once_and_forgotten_with_age() {
        let mut u = UnansweredClaims {
            times: HashMap::new(),
            len: 0,
            max: 3,
            oldest: u64::MAX,
        };
        u.remember(&[claim(1, 10), claim(1, 20), claim(2, 30), claim(3, 40)]);
        assert_eq!(u.len, 3, "bounded");
        assert!(!u.take(Fingerprint(1), Timestamp::from_nanos(15)));
        assert!(u.take(Fingerprint(1), Timestamp::from_nanos(20)));
        assert!(!u.take(Fingerprint(1), Timestamp::from_nanos(10)), "once");
        assert!(
            !u.take(Fingerprint(3), Timestamp::from_nanos(40)),
            "never held"
        );
        u.remember(&[claim(4, 50)]);
        u.forget_before(31);
        assert_eq!((u.len, u.oldest), (1, 50));
        assert!(!u.take(Fingerprint(2), Timestamp::from_nanos(30)));
        u.forget(Fingerprint(4));
        assert_eq!(u.len, 0);
    }
}
