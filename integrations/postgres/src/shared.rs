//! Shared keys: claims, checks, commits, releases, extensions and forgets
//! that every engine on the same tables sees, atomically.
//!
//! One batch is one `READ COMMITTED` transaction of four statements:
//!
//! 1. **lock**: one transaction-scoped advisory lock per key
//!    (`pg_try_advisory_xact_lock`, keys sorted). A key whose lock is held
//!    elsewhere — another engine's batch, or a transactional claim whose
//!    transaction is open — is being acted on: its claims and checks
//!    answer `InProgress`. If a commit, release, extension or forget meets
//!    a held lock, the transaction restarts and waits for every lock in
//!    sorted order (so two engines' batches never deadlock), within the
//!    tier's `lock_timeout`.
//! 2. **read**, in a new statement (so its snapshot is taken after the
//!    locks are held, and sees what every earlier holder committed): the
//!    keys' leases, their records in the live slices, and one fencing
//!    token per claim from the tier's sequence.
//! 3. **decide**, in Rust and in order ([`decide`]): the state machine of
//!    the engine's claims contract, per key.
//! 4. **write**, one statement: leases deleted and upserted, records
//!    deleted (forgets) and upserted into the current slice's partition.
//!
//! The locks end with the transaction. Uniqueness across ring partitions
//! (a key recorded in one slice and claimed in the next) is the lock's
//! doing, not an index's: each partition's primary key covers its slice
//! only, which is what lets a slice be dropped whole.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use postgres::types::ToSql;
use postgres::IsolationLevel;
use tiered_dedup::claims::PayloadFingerprint;
use tiered_dedup::exact::{Claim, ExactPartition, RecordBody, SharedAnswer, SharedOp};
use tiered_dedup::{ExactTierError, Fingerprint, Timestamp};

use crate::config::FailurePolicy;
use crate::fp::{from_nanos, lock_key, nanos, Fp};
use crate::partition::{live_slices, record_upsert_sql, PgPartition, Row, RowColumns};
use crate::schema::Names;

/// A live (or expired, not yet removed) lease row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeaseRow {
    pub(crate) token: u64,
    pub(crate) at: u64,
    pub(crate) until: u64,
    pub(crate) payload: Option<PayloadFingerprint>,
}

/// What the store holds for one key, as read, then as decided.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyState {
    /// The lease row (live or not).
    pub(crate) lease: Option<LeaseRow>,
    /// The newest record in the live slices.
    pub(crate) record: Option<Row>,
    /// A lease row was read (so a final `None` must delete it).
    pub(crate) had_lease: bool,
    /// The lease changed in this batch.
    pub(crate) lease_changed: bool,
    /// A record written in this batch (into the current slice).
    pub(crate) new_record: bool,
    /// Forgotten in this batch (every stored record is deleted).
    pub(crate) forgotten: bool,
}

/// How long a claim that met another holder's lock is told to wait
/// (`InProgress { until }`): the holder is a batch of another engine
/// (milliseconds) or an open transaction (unknown).
const BUSY_NANOS: u64 = 50_000_000;

fn conflicts(stored: Option<PayloadFingerprint>, claimed: Option<PayloadFingerprint>) -> bool {
    matches!((stored, claimed), (Some(a), Some(b)) if a != b)
}

fn inside(window: Option<u64>, first: u64, at: u64) -> bool {
    window.is_none_or(|w| at.saturating_sub(first) < w)
}

/// The answers to `ops` in order, applied to `states` (read under the
/// keys' locks); `busy` keys are held by another transaction; `tokens`
/// yields one fresh fencing token per acquisition.
pub(crate) fn decide(
    ops: &[SharedOp<'_>],
    window: Option<u64>,
    current: u64,
    states: &mut HashMap<Fingerprint, KeyState>,
    busy: &HashSet<Fingerprint>,
    tokens: &mut dyn Iterator<Item = u64>,
) -> Vec<SharedAnswer> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let answer = match *op {
            SharedOp::Claim {
                fingerprint,
                at,
                now,
                until,
                payload,
            } => {
                if busy.contains(&fingerprint) {
                    out.push(SharedAnswer::InProgress {
                        until: now.saturating_add(BUSY_NANOS),
                    });
                    continue;
                }
                let s = states.entry(fingerprint).or_default();
                let at = at.as_nanos();
                match (s.lease, &s.record) {
                    (Some(l), _) if now < l.until => {
                        if conflicts(l.payload, payload) {
                            SharedAnswer::Conflict
                        } else {
                            SharedAnswer::InProgress { until: l.until }
                        }
                    }
                    (_, Some(r)) if inside(window, r.at, at) => {
                        if conflicts(r.payload, payload) {
                            SharedAnswer::Conflict
                        } else {
                            SharedAnswer::Completed {
                                first_seen: Timestamp::from_nanos(r.at),
                                body: r.body(),
                            }
                        }
                    }
                    _ => {
                        let token = tokens.next().expect("one token per claim");
                        s.lease = Some(LeaseRow {
                            token,
                            at,
                            until,
                            payload,
                        });
                        s.lease_changed = true;
                        SharedAnswer::Acquired { token }
                    }
                }
            }
            SharedOp::Check {
                fingerprint,
                at,
                now,
            } => {
                if busy.contains(&fingerprint) {
                    out.push(SharedAnswer::InProgress {
                        until: now.saturating_add(BUSY_NANOS),
                    });
                    continue;
                }
                let s = states.entry(fingerprint).or_default();
                let at = at.as_nanos();
                match (s.lease, &s.record) {
                    (Some(l), _) if now < l.until => SharedAnswer::InProgress { until: l.until },
                    (_, Some(r)) if inside(window, r.at, at) => SharedAnswer::Completed {
                        first_seen: Timestamp::from_nanos(r.at),
                        body: r.body(),
                    },
                    _ => {
                        if s.lease.take().is_some() {
                            s.lease_changed = true;
                        }
                        s.record = Some(Row {
                            fp: fingerprint,
                            slice: current,
                            at,
                            payload: None,
                            result: None,
                        });
                        s.new_record = true;
                        SharedAnswer::Acquired { token: 0 }
                    }
                }
            }
            SharedOp::Commit {
                fingerprint,
                token,
                now,
                result,
            } => {
                let s = states.entry(fingerprint).or_default();
                match s.lease {
                    Some(l) if l.token == token && now < l.until => {
                        s.lease = None;
                        s.lease_changed = true;
                        s.record = Some(Row {
                            fp: fingerprint,
                            slice: current,
                            at: l.at,
                            payload: l.payload,
                            result: (!result.is_empty()).then(|| Arc::from(result)),
                        });
                        s.new_record = true;
                        SharedAnswer::Done
                    }
                    _ => SharedAnswer::Lost,
                }
            }
            SharedOp::Release {
                fingerprint,
                token,
                now,
            } => {
                let s = states.entry(fingerprint).or_default();
                match s.lease {
                    Some(l) if l.token == token && now < l.until => {
                        s.lease = None;
                        s.lease_changed = true;
                        SharedAnswer::Done
                    }
                    _ => SharedAnswer::Lost,
                }
            }
            SharedOp::Extend {
                fingerprint,
                token,
                now,
                until,
            } => {
                let s = states.entry(fingerprint).or_default();
                match &mut s.lease {
                    Some(l) if l.token == token && now < l.until => {
                        l.until = until;
                        s.lease_changed = true;
                        SharedAnswer::Done
                    }
                    _ => SharedAnswer::Lost,
                }
            }
            SharedOp::Forget { fingerprint } => {
                let s = states.entry(fingerprint).or_default();
                let found = s.lease.is_some() || s.record.is_some();
                if s.lease.take().is_some() {
                    s.lease_changed = true;
                }
                s.record = None;
                s.new_record = false;
                s.forgotten = true;
                SharedAnswer::Forgotten(found)
            }
        };
        out.push(answer);
    }
    out
}

fn fp_of(op: &SharedOp<'_>) -> Fingerprint {
    match *op {
        SharedOp::Claim { fingerprint, .. }
        | SharedOp::Check { fingerprint, .. }
        | SharedOp::Commit { fingerprint, .. }
        | SharedOp::Release { fingerprint, .. }
        | SharedOp::Extend { fingerprint, .. }
        | SharedOp::Forget { fingerprint } => fingerprint,
    }
}

/// True for an operation on a lease or record that must be applied (it
/// cannot be answered `InProgress`).
fn must_apply(op: &SharedOp<'_>) -> bool {
    !matches!(op, SharedOp::Claim { .. } | SharedOp::Check { .. })
}

fn lock_sql() -> &'static str {
    "SELECT pg_try_advisory_xact_lock(k) FROM unnest($1::int8[]) AS k"
}

fn lock_wait_sql() -> &'static str {
    "SELECT pg_advisory_xact_lock(k)::text FROM unnest($1::int8[]) AS k"
}

/// The read of step 2: leases (kind 0), records of the live slices
/// (kind 1), and `$3` tokens (kind 2). `$1`: the fingerprints; `$2`: the
/// live slices, newest first.
fn read_sql(names: &Names, current: u64) -> String {
    let mut sql = format!(
        "SELECT 0::int2 AS kind, l.fp, l.token AS a, l.at AS b, l.until AS c, l.payload, NULL::bytea AS result \
         FROM {} AS l WHERE l.fp = ANY($1)",
        names.leases
    );
    for (i, (slice, _)) in live_slices(current).enumerate() {
        sql.push_str(&format!(
            " UNION ALL SELECT 1::int2, r.fp, r.slice, r.at, NULL::int8, r.payload, r.result \
             FROM {} AS r WHERE r.fp = ANY($1) AND r.slice = ($2::int8[])[{}]",
            names.ring(slice),
            i + 1
        ));
    }
    sql.push_str(&format!(
        " UNION ALL SELECT 2::int2, NULL::uuid, nextval('{}'::regclass), NULL::int8, NULL::int8, NULL::int8, NULL::bytea \
         FROM generate_series(1, $3::int8)",
        names.tokens
    ));
    sql
}

/// The write of step 4 for a batch in slice `current`.
fn write_sql(names: &Names, current: u64) -> String {
    format!(
        "WITH dl AS (DELETE FROM {leases} AS l WHERE l.fp = ANY($1)), \
              ul AS (INSERT INTO {leases} AS l (fp, token, at, until, payload) \
                     SELECT * FROM unnest($2::uuid[], $3::int8[], $4::int8[], $5::int8[], $6::int8[]) \
                     ON CONFLICT (fp) DO UPDATE SET token = excluded.token, at = excluded.at, \
                     until = excluded.until, payload = excluded.payload), \
              da AS (DELETE FROM {records} AS r WHERE r.fp = ANY($7)), \
              dx AS (DELETE FROM {records} AS r WHERE r.fp = ANY($8) AND r.slice % {ring} <> $9::int8), \
              ur AS ({upsert}) \
         SELECT 1",
        leases = names.leases,
        records = names.records,
        ring = crate::schema::RING,
        upsert = record_upsert_sql(names.ring(current), 10, false),
    )
}

/// [`ExactPartition::shared_claims`] for [`PgPartition`].
pub(crate) fn shared_claims(
    p: &mut PgPartition,
    current: u64,
    window: Option<u64>,
    ops: &[SharedOp<'_>],
    out: &mut Vec<SharedAnswer>,
) -> Result<(), ExactTierError> {
    p.advance(current);
    out.clear();
    if ops.is_empty() {
        return Ok(());
    }
    let window = window.or(p.window);
    for op in ops {
        if let SharedOp::Claim { now, .. }
        | SharedOp::Check { now, .. }
        | SharedOp::Commit { now, .. }
        | SharedOp::Release { now, .. }
        | SharedOp::Extend { now, .. } = *op
        {
            p.lease_now = p.lease_now.max(now);
        }
    }
    // Marks kept through an outage (fail open, fallback) first: the
    // decisions below must see them.
    if let Err(e) = p.sync() {
        return degrade(p, current, window, ops, out, e);
    }
    let salt = p.tier.names.lock_salt();
    let mut keys: Vec<(i64, Fingerprint)> = ops
        .iter()
        .map(|op| (lock_key(fp_of(op), salt), fp_of(op)))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut lock_keys: Vec<i64> = keys.iter().map(|&(k, _)| k).collect();
    lock_keys.dedup();
    let fps: Vec<Fp> = keys.iter().map(|&(_, fp)| Fp(fp)).collect();
    let slices: Vec<i64> = live_slices(current).map(|(s, _)| nanos(s)).collect();
    let claims = ops
        .iter()
        .filter(|op| matches!(op, SharedOp::Claim { .. }))
        .count() as i64;
    let names = p.tier.names.clone();
    let read = read_sql(&names, current);
    let write = write_sql(&names, current);
    let result = p.link.run(|client, prepared| {
        let try_lock = prepared.get(client, lock_sql())?;
        let wait_lock = prepared.get(client, lock_wait_sql())?;
        let read = prepared.get(client, &read)?;
        let write = prepared.get(client, &write)?;
        // 1. Locks.
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()?;
        let got = tx.query(&try_lock, &[&lock_keys])?;
        let busy_keys: HashSet<i64> = lock_keys
            .iter()
            .zip(&got)
            .filter(|(_, r)| !r.get::<_, bool>(0))
            .map(|(&k, _)| k)
            .collect();
        let mut busy: HashSet<Fingerprint> = ops
            .iter()
            .map(fp_of)
            .filter(|&fp| busy_keys.contains(&lock_key(fp, salt)))
            .collect();
        if ops
            .iter()
            .any(|op| must_apply(op) && busy.contains(&fp_of(op)))
        {
            tx.rollback()?;
            tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()?;
            tx.query(&wait_lock, &[&lock_keys])?;
            busy.clear();
        }
        // 2. Read.
        let rows = tx.query(&read, &[&fps, &slices, &claims])?;
        let mut states: HashMap<Fingerprint, KeyState> = HashMap::with_capacity(fps.len());
        let mut tokens: Vec<u64> = Vec::new();
        for r in &rows {
            let kind: i16 = r.get(0);
            if kind == 2 {
                tokens.push(from_nanos(r.get(2)));
                continue;
            }
            let fp = r.get::<_, Fp>(1).0;
            let payload = r
                .get::<_, Option<i64>>(5)
                .map(|v| PayloadFingerprint(v as u64));
            let s = states.entry(fp).or_default();
            if kind == 0 {
                s.lease = Some(LeaseRow {
                    token: from_nanos(r.get(2)),
                    at: from_nanos(r.get(3)),
                    until: from_nanos(r.get::<_, Option<i64>>(4).unwrap_or(0)),
                    payload,
                });
                s.had_lease = true;
            } else {
                let row = Row {
                    fp,
                    slice: from_nanos(r.get(2)),
                    at: from_nanos(r.get(3)),
                    payload,
                    result: r.get::<_, Option<&[u8]>>(6).map(Arc::from),
                };
                if s.record.as_ref().is_none_or(|old| old.at < row.at) {
                    s.record = Some(row);
                }
            }
        }
        // Tokens are drawn in the order of the sequence: in ascending order.
        tokens.sort_unstable();
        // 3. Decide.
        let answers = decide(
            ops,
            window,
            current,
            &mut states,
            &busy,
            &mut tokens.into_iter(),
        );
        // 4. Write.
        let mut lease_delete: Vec<Fp> = Vec::new();
        let mut lease_rows: Vec<(Fp, LeaseRow)> = Vec::new();
        let mut delete_all: Vec<Fp> = Vec::new();
        let mut delete_other: Vec<Fp> = Vec::new();
        let mut records: Vec<&Row> = Vec::new();
        for (fp, s) in &states {
            if s.lease_changed {
                match s.lease {
                    Some(l) => lease_rows.push((Fp(*fp), l)),
                    None if s.had_lease => lease_delete.push(Fp(*fp)),
                    None => {}
                }
            }
            if s.forgotten {
                if s.new_record {
                    delete_other.push(Fp(*fp));
                } else {
                    delete_all.push(Fp(*fp));
                }
            }
            if s.new_record {
                records.push(s.record.as_ref().expect("a new record"));
            }
        }
        if !(lease_delete.is_empty()
            && lease_rows.is_empty()
            && delete_all.is_empty()
            && delete_other.is_empty()
            && records.is_empty())
        {
            let lfps: Vec<Fp> = lease_rows.iter().map(|(fp, _)| *fp).collect();
            let ltokens: Vec<i64> = lease_rows.iter().map(|(_, l)| nanos(l.token)).collect();
            let lats: Vec<i64> = lease_rows.iter().map(|(_, l)| nanos(l.at)).collect();
            let luntil: Vec<i64> = lease_rows.iter().map(|(_, l)| nanos(l.until)).collect();
            let lpay: Vec<Option<i64>> = lease_rows
                .iter()
                .map(|(_, l)| l.payload.map(|p| p.0 as i64))
                .collect();
            let ring = nanos(current % crate::schema::RING);
            let columns = RowColumns::of(&records);
            let [c0, c1, c2, c3, c4] = columns.params();
            let params: [&(dyn ToSql + Sync); 14] = [
                &lease_delete,
                &lfps,
                &ltokens,
                &lats,
                &luntil,
                &lpay,
                &delete_all,
                &delete_other,
                &ring,
                c0,
                c1,
                c2,
                c3,
                c4,
            ];
            tx.execute(&write, &params)?;
        }
        tx.commit()?;
        Ok(answers)
    });
    match result {
        Ok(answers) => {
            *out = answers;
            if let Some(fallback) = &mut p.fallback {
                // Keep the fallback in step with what this engine recorded.
                for (op, a) in ops.iter().zip(out.iter()) {
                    if let (
                        SharedOp::Check {
                            fingerprint, at, ..
                        },
                        SharedAnswer::Acquired { .. },
                    ) = (op, a)
                    {
                        let _ =
                            fallback.mark(*fingerprint, crate::partition::slot_of(current), *at);
                    }
                }
            }
            Ok(())
        }
        Err(e) => degrade(p, current, window, ops, out, e),
    }
}

/// The store failed a batch (`e`). Fail closed: the error. Fail open or
/// fallback: a batch of checks (and queued releases) is judged locally,
/// and every key accepted is kept as a mark for the store; a claim or a
/// lease operation is never answered without the store (another engine
/// could hold the key), so such a batch fails.
fn degrade(
    p: &mut PgPartition,
    current: u64,
    window: Option<u64>,
    ops: &[SharedOp<'_>],
    out: &mut Vec<SharedAnswer>,
    e: ExactTierError,
) -> Result<(), ExactTierError> {
    out.clear();
    let checks_only = ops
        .iter()
        .all(|op| matches!(op, SharedOp::Check { .. } | SharedOp::Release { .. }));
    if p.tier.config.policy == FailurePolicy::FailClosed || !checks_only {
        return Err(e);
    }
    let checks: Vec<Claim> = ops
        .iter()
        .filter_map(|op| match *op {
            SharedOp::Check {
                fingerprint, at, ..
            } => Some(Claim { fingerprint, at }),
            _ => None,
        })
        .collect();
    p.degraded(checks.len());
    let mut found = Vec::with_capacity(checks.len());
    if let Some(fallback) = &mut p.fallback {
        fallback.claim_batch(current, window, &checks, &mut found)?;
    } else {
        for c in &checks {
            let pending = p.pending(c.fingerprint).map(|r| r.at);
            let inside = pending.filter(|&t0| inside(window, t0, c.at.as_nanos()));
            if inside.is_none() {
                p.keep([Row {
                    fp: c.fingerprint,
                    slice: current,
                    at: c.at.as_nanos(),
                    payload: None,
                    result: None,
                }]);
            }
            found.push(inside.map(Timestamp::from_nanos));
        }
    }
    let mut found = found.into_iter();
    for op in ops {
        out.push(match op {
            SharedOp::Check {
                fingerprint, at, ..
            } => match found.next().flatten() {
                Some(first_seen) => SharedAnswer::Completed {
                    first_seen,
                    body: None,
                },
                None => {
                    if p.fallback.is_some() {
                        p.keep([Row {
                            fp: *fingerprint,
                            slice: current,
                            at: at.as_nanos(),
                            payload: None,
                            result: None,
                        }]);
                    }
                    SharedAnswer::Acquired { token: 0 }
                }
            },
            // The lease expires in the store by itself.
            _ => SharedAnswer::Lost,
        });
    }
    Ok(())
}

/// Keeps `RecordBody` in the unit tests' scope.
#[allow(dead_code)]
fn _body(_: RecordBody) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(v: u128) -> Fingerprint {
        Fingerprint(v)
    }

    #[test]
    fn the_state_machine_answers_like_the_contract() {
        let mut states = HashMap::new();
        let busy = HashSet::new();
        let mut tokens = 10..;
        let a = fp(1);
        let claim = |now, payload| SharedOp::Claim {
            fingerprint: a,
            at: Timestamp::from_nanos(now),
            now,
            until: now + 100,
            payload,
        };
        let answers = decide(
            &[
                claim(1_000, Some(PayloadFingerprint(7))),
                claim(1_010, Some(PayloadFingerprint(8))),
                claim(1_020, Some(PayloadFingerprint(7))),
                SharedOp::Commit {
                    fingerprint: a,
                    token: 10,
                    now: 1_050,
                    result: b"r",
                },
                claim(1_060, Some(PayloadFingerprint(7))),
                claim(1_070, Some(PayloadFingerprint(8))),
                SharedOp::Commit {
                    fingerprint: a,
                    token: 10,
                    now: 1_080,
                    result: b"again",
                },
                SharedOp::Forget { fingerprint: a },
                claim(1_090, None),
            ],
            Some(500),
            3,
            &mut states,
            &busy,
            &mut tokens,
        );
        assert_eq!(answers[0], SharedAnswer::Acquired { token: 10 });
        assert_eq!(answers[1], SharedAnswer::Conflict);
        assert_eq!(answers[2], SharedAnswer::InProgress { until: 1_100 });
        assert_eq!(answers[3], SharedAnswer::Done);
        assert!(matches!(
            &answers[4],
            SharedAnswer::Completed { first_seen, body: Some(b) }
                if first_seen.as_nanos() == 1_000 && &b.result[..] == b"r"
        ));
        assert_eq!(answers[5], SharedAnswer::Conflict);
        assert_eq!(answers[6], SharedAnswer::Lost);
        assert_eq!(answers[7], SharedAnswer::Forgotten(true));
        assert_eq!(answers[8], SharedAnswer::Acquired { token: 11 });
        let s = &states[&a];
        assert!(s.forgotten && !s.new_record && s.lease.is_some());
    }

    #[test]
    fn expired_leases_and_records_are_as_if_absent() {
        let mut states = HashMap::new();
        let a = fp(2);
        states.insert(
            a,
            KeyState {
                lease: Some(LeaseRow {
                    token: 3,
                    at: 0,
                    until: 50,
                    payload: None,
                }),
                record: Some(Row {
                    fp: a,
                    slice: 0,
                    at: 10,
                    payload: None,
                    result: None,
                }),
                had_lease: true,
                ..KeyState::default()
            },
        );
        let answers = decide(
            &[
                SharedOp::Release {
                    fingerprint: a,
                    token: 3,
                    now: 60,
                },
                SharedOp::Check {
                    fingerprint: a,
                    at: Timestamp::from_nanos(200),
                    now: 60,
                },
                SharedOp::Check {
                    fingerprint: a,
                    at: Timestamp::from_nanos(210),
                    now: 61,
                },
            ],
            Some(100),
            1,
            &mut states,
            &HashSet::new(),
            &mut (1..),
        );
        assert_eq!(answers[0], SharedAnswer::Lost);
        assert_eq!(answers[1], SharedAnswer::Acquired { token: 0 });
        assert!(
            matches!(answers[2], SharedAnswer::Completed { first_seen, body: None } if first_seen.as_nanos() == 200)
        );
        assert!(states[&a].lease.is_none() && states[&a].lease_changed);
    }

    #[test]
    fn a_busy_key_is_in_progress_for_claims_and_checks() {
        let a = fp(3);
        let busy: HashSet<Fingerprint> = [a].into();
        let answers = decide(
            &[SharedOp::Check {
                fingerprint: a,
                at: Timestamp::from_nanos(5),
                now: 5,
            }],
            None,
            0,
            &mut HashMap::new(),
            &busy,
            &mut (1..),
        );
        assert_eq!(
            answers[0],
            SharedAnswer::InProgress {
                until: 5 + BUSY_NANOS
            }
        );
    }
}
