//! Lookups: one `MGET` of the record strings a batch needs, or one
//! pipeline of `HMGET`s (one script on a cluster), newest slice first; marks
//! not yet in Redis answer for themselves.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use redis::{Cmd, Value};

use super::records::{decode, find_record, Stored};
use super::{FailurePolicy, RedisPartition};
use crate::error::{ExactTierError, FailureCause};
use crate::exact::{slots_newest_first, ExactPartition, Lookup};
use crate::time::Timestamp;

impl RedisPartition {
    pub(super) fn lookup_batch_in_redis(
        &mut self,
        current: u64,
        lookups: &[Lookup],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        self.advance(current);
        out.clear();
        self.found_bodies.clear();
        self.apart_bodies.clear();
        // Marks not yet in Redis stay queued: their index answers for them
        // below (read-your-writes without a flush per lookup).
        // Failing here fails the request below at once.
        let _ = self.connect();
        let live: Vec<(u64, usize)> = slots_newest_first(current).collect();
        // One HMGET per (slice, bucket) some lookup needs.
        let mut by_hash: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
        for &(slice, slot) in &live {
            for (i, q) in lookups.iter().enumerate() {
                if q.slots & (1 << slot) != 0 {
                    by_hash
                        .entry((slice, self.bucket(q.fingerprint)))
                        .or_default()
                        .push(i);
                }
            }
        }
        // Newest slice first, so the first value found per lookup is the
        // newest.
        let mut asked: Vec<((u64, u64), Vec<usize>)> = by_hash.into_iter().collect();
        asked.sort_unstable_by_key(|&((slice, _), _)| std::cmp::Reverse(slice));
        // Record strings: one MGET of every string asked (one slot on a
        // cluster), one value per string. Hashes: one value per lookup.
        let result = if asked.is_empty() {
            Ok(Vec::new())
        } else if self.records {
            let mut mget = redis::cmd("MGET");
            for ((slice, bucket), _) in &asked {
                mget.arg(self.key(*slice, *bucket));
            }
            let cluster = self.config.cluster;
            self.with_conn(|c, _| {
                if cluster {
                    mget.query::<Vec<Value>>(c.like())
                } else {
                    let mut replies = c
                        .pipeline_fail_fast(std::slice::from_ref(&mget))
                        .expect("a single server")?;
                    match replies.pop() {
                        Some(Value::Array(values)) => Ok(values),
                        _ => Err(redis::RedisError::from((
                            redis::ErrorKind::UnexpectedReturnType,
                            "unexpected MGET reply",
                        ))),
                    }
                }
            })
        } else {
            let hashes: Vec<(String, Vec<[u8; 16]>)> = asked
                .iter()
                .map(|((slice, bucket), which)| {
                    let fields = which
                        .iter()
                        .map(|&i| lookups[i].fingerprint.to_bytes())
                        .collect();
                    (self.key(*slice, *bucket), fields)
                })
                .collect();
            self.hmget_many(&hashes)
        };
        let replies = match result {
            Ok(r) => r,
            Err(e) => return self.lookups_failed(e, current, lookups, out),
        };
        // Newest slice first: the first value found per lookup wins.
        out.resize(lookups.len(), None);
        let expected = if self.records {
            asked.len()
        } else {
            asked.iter().map(|(_, which)| which.len()).sum::<usize>()
        };
        if replies.len() != expected {
            return Err(self.error_of(
                FailureCause::UnexpectedReply,
                format!("{} values for a lookup of {expected}", replies.len()),
            ));
        }
        let mut values = replies.into_iter();
        for ((slice, _), which) in &asked {
            if self.records {
                let Some(Value::BulkString(records)) = values.next() else {
                    continue;
                };
                for &i in which {
                    if out[i].is_none() {
                        let fp = lookups[i].fingerprint;
                        match find_record(&records, &fp.to_bytes()) {
                            Ok(Some((at, stored))) => {
                                out[i] = Some(at);
                                match stored {
                                    Stored::Bare => {}
                                    Stored::Inline(body) => {
                                        self.found_bodies.insert(fp, (at.as_nanos(), body));
                                    }
                                    Stored::Apart => {
                                        self.apart_bodies.insert(fp, (at.as_nanos(), *slice));
                                    }
                                }
                            }
                            Ok(None) => {}
                            Err(what) => {
                                let e = self.error_of(FailureCause::UnexpectedReply, what);
                                return self.lookups_failed(e, current, lookups, out);
                            }
                        }
                    }
                }
                continue;
            }
            for (&i, v) in which.iter().zip(values.by_ref()) {
                if out[i].is_none() {
                    if let Value::BulkString(bytes) = v {
                        if let Some((at, body)) = decode(&bytes) {
                            out[i] = Some(at);
                            if let Some(body) = body {
                                let fp = lookups[i].fingerprint;
                                self.found_bodies.insert(fp, (at.as_nanos(), body));
                            }
                        }
                    }
                }
            }
        }
        for (i, q) in lookups.iter().enumerate() {
            if let Some(at) = self.pending_time(q.fingerprint) {
                out[i] = Some(Timestamp::from_nanos(at));
            }
        }
        Ok(())
    }

    /// The values of `fields` in each hash of `hashes`, in order (nil
    /// where absent): one pipeline of `HMGET`s, or on a cluster one
    /// `LOOKUP_SCRIPT` (one reply).
    pub(super) fn hmget_many(
        &mut self,
        hashes: &[(String, Vec<[u8; 16]>)],
    ) -> Result<Vec<Value>, ExactTierError> {
        if self.config.cluster {
            let script = self.lookup_script.clone();
            let mut invocation = script.prepare_invoke();
            for (key, fields) in hashes {
                invocation.key(key).arg(fields.len());
                for field in fields {
                    invocation.arg(&field[..]);
                }
            }
            return self.with_conn(|c, _| invocation.invoke::<Vec<Value>>(c.like()));
        }
        let cmds: Vec<Cmd> = hashes
            .iter()
            .map(|(key, fields)| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(key);
                for field in fields {
                    cmd.arg(&field[..]);
                }
                cmd
            })
            .collect();
        // Each reply is one HMGET's values: flatten them in order.
        let replies =
            self.with_conn(|c, _| c.pipeline_fail_fast(&cmds).expect("a single server"))?;
        let mut values = Vec::new();
        for reply in replies {
            let Value::Array(v) = reply else {
                return Err(self.error_of(FailureCause::UnexpectedReply, "an HMGET reply"));
            };
            values.extend(v);
        }
        Ok(values)
    }

    /// Answers `lookups` after Redis failed them (`e`), as the policy says.
    pub(super) fn lookups_failed(
        &mut self,
        e: ExactTierError,
        current: u64,
        lookups: &[Lookup],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        out.clear();
        match self.config.policy {
            FailurePolicy::FailClosed => Err(e),
            FailurePolicy::FailOpen => {
                self.degraded(lookups.len());
                out.extend(
                    lookups
                        .iter()
                        .map(|q| self.pending_time(q.fingerprint).map(Timestamp::from_nanos)),
                );
                Ok(())
            }
            FailurePolicy::FallbackToMemory => {
                self.degraded(lookups.len());
                let fallback = self.fallback.as_mut().expect("fallback policy");
                fallback.lookup_batch(current, lookups, out)
            }
        }
    }

    pub(super) fn degraded(&self, n: usize) {
        self.stats
            .degraded_decisions
            .fetch_add(n as u64, Ordering::Relaxed);
        crate::trace::event!(
            warn,
            keys = n,
            policy = ?self.config.policy,
            "decided without Redis (degraded mode)"
        );
    }
}
