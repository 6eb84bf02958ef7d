//! `PgPartition`: one engine shard's use of the tables.
//!
//! Owned keys: a lookup batch is one `SELECT … UNION ALL …` (one branch per
//! ring partition asked, `fp = ANY($n)` on its primary key); a mark batch one `INSERT … SELECT
//! FROM unnest(…) ON CONFLICT (fp) DO UPDATE` per ring partition written
//! (one, unless the batch spans a rotation). A committed claim's body rides
//! with its mark in the same row. Marks that cannot be written are kept
//! (bounded), answer lookups, and are written with the next batch or
//! flush. Shared keys: see `shared.rs`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use postgres::types::ToSql;
use tiered_dedup::claims::PayloadFingerprint;
use tiered_dedup::exact::{
    ExactPartition, Lookup, Mark, MemoryPartition, PartitionSpec, RecordBody,
};
use tiered_dedup::{ExactTierError, Fingerprint, Timestamp, GENERATIONS};

use crate::config::FailurePolicy;
use crate::fp::{from_nanos, nanos, Fp};
use crate::link::Link;
use crate::schema::{self, RETIRE_BACK};
use crate::tier::TierShared;
use crate::writer::{write_rows, MarkWriter};

/// A record to write: a mark, with its claim's body when committed with
/// one.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) fp: Fingerprint,
    pub(crate) slice: u64,
    pub(crate) at: u64,
    pub(crate) payload: Option<PayloadFingerprint>,
    pub(crate) result: Option<Arc<[u8]>>,
}

impl Row {
    pub(crate) fn has_body(&self) -> bool {
        self.payload.is_some() || self.result.is_some()
    }

    /// True when `self` makes `later` redundant: the same acceptance, and
    /// `later` is a plain mark while `self` has the body.
    pub(crate) fn supersedes(&self, later: &Row) -> bool {
        self.at == later.at && self.slice == later.slice && self.has_body() && !later.has_body()
    }

    pub(crate) fn body(&self) -> Option<RecordBody> {
        self.has_body().then(|| RecordBody {
            payload: self.payload,
            result: self.result.clone().unwrap_or_else(|| Arc::from(&[][..])),
        })
    }
}

/// The position of the newest row of each fingerprint in `rows` (a plain
/// mark never hides the body of the same acceptance).
pub(crate) fn index_rows(rows: &[Row]) -> HashMap<Fingerprint, usize> {
    let mut index: HashMap<Fingerprint, usize> = HashMap::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        match index.get(&row.fp) {
            Some(&j) if rows[j].supersedes(row) => {}
            _ => {
                index.insert(row.fp, i);
            }
        }
    }
    index
}

/// The slot (of the engine's eight) of slice `s`.
pub(crate) fn slot_of(s: u64) -> usize {
    (s % GENERATIONS as u64) as usize
}

/// The live slices at `current`, newest first, with their slots.
pub(crate) fn live_slices(current: u64) -> impl Iterator<Item = (u64, usize)> {
    (0..GENERATIONS as u64 - 1)
        .filter(move |&back| back <= current)
        .map(move |back| (current - back, slot_of(current - back)))
}

pub(crate) struct PgPartition {
    pub(crate) tier: Arc<TierShared>,
    pub(crate) link: Link,
    /// Mark batches in flight on a connection of their own (`None`: marks
    /// are written in the engine's call).
    writer: Option<MarkWriter>,
    pub(crate) window: Option<u64>,
    /// Rows not yet known to be stored, oldest first, and the newest row of
    /// each fingerprint among them.
    pub(crate) unsent: Vec<Row>,
    pub(crate) unsent_index: HashMap<Fingerprint, usize>,
    /// The bodies the last lookup batch read: the claim path asks for the
    /// body of each record it found, right after.
    found_bodies: HashMap<Fingerprint, (u64, Option<RecordBody>)>,
    pub(crate) fallback: Option<MemoryPartition>,
    /// The newest slice the engine has named.
    pub(crate) current: u64,
    /// The newest lease-clock time shared claims carried (expired leases
    /// are swept against it at rotations).
    pub(crate) lease_now: u64,
}

impl PgPartition {
    pub(crate) fn new(tier: Arc<TierShared>, spec: &PartitionSpec) -> Self {
        let fallback = (tier.config.policy == FailurePolicy::FallbackToMemory)
            .then(|| MemoryPartition::with_capacity(spec.keys_per_slot));
        PgPartition {
            link: Link::new(Arc::clone(&tier)),
            writer: tier
                .config
                .pipeline_marks
                .then(|| MarkWriter::new(Arc::clone(&tier))),
            tier,
            window: spec.window_nanos,
            unsent: Vec::new(),
            unsent_index: HashMap::new(),
            found_bodies: HashMap::new(),
            fallback,
            current: 0,
            lease_now: 0,
        }
    }

    pub(crate) fn advance(&mut self, slice: u64) {
        self.current = self.current.max(slice);
    }

    /// Keeps `rows` for writing, up to the bound; returns how many did not
    /// fit (counted dropped).
    pub(crate) fn keep(&mut self, rows: impl IntoIterator<Item = Row>) -> usize {
        let max = self.tier.config.max_unsent_marks;
        let (mut kept, mut dropped) = (0u64, 0usize);
        for row in rows {
            // A plain mark of an acceptance whose body is kept or in flight
            // says nothing more (and must not hide the body).
            if self.pending(row.fp).is_some_and(|old| old.supersedes(&row)) {
                continue;
            }
            if self.unsent.len() + self.in_flight() >= max {
                dropped += 1;
                continue;
            }
            self.unsent_index.insert(row.fp, self.unsent.len());
            self.unsent.push(row);
            kept += 1;
        }
        let stats = &self.tier.stats;
        stats.marks_unsent.fetch_add(kept, Ordering::Relaxed);
        if dropped > 0 {
            stats
                .marks_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        dropped
    }

    /// The newest row of `fp` not yet known to be stored: kept, or in
    /// flight.
    pub(crate) fn pending(&self, fp: Fingerprint) -> Option<&Row> {
        self.unsent_index
            .get(&fp)
            .map(|&i| &self.unsent[i])
            .or_else(|| self.writer.as_ref().and_then(|w| w.pending(fp)))
    }

    /// Hands every kept row to the mark writer (after settling the batch
    /// in flight): written while the engine goes on. A failure of the
    /// batch in flight puts its rows back, before the kept ones.
    pub(crate) fn write_unsent(&mut self) -> Result<(), ExactTierError> {
        self.settle()?;
        if self.unsent.is_empty() {
            return Ok(());
        }
        let Some(writer) = &mut self.writer else {
            // Not pipelined: written now.
            write_rows(&mut self.link, &self.tier.names, &self.unsent)?;
            self.written(self.unsent.len());
            self.unsent.clear();
            self.unsent_index.clear();
            return Ok(());
        };
        let rows = std::mem::take(&mut self.unsent);
        self.unsent_index.clear();
        if let Err(rows) = writer.send(rows) {
            self.put_back(rows);
            return Err(ExactTierError::Unavailable(
                "the mark writer thread stopped".to_owned(),
            ));
        }
        Ok(())
    }

    /// Waits for the batch in flight; on a failure its rows go back to the
    /// front of the kept ones (older than those).
    pub(crate) fn settle(&mut self) -> Result<(), ExactTierError> {
        let Some(writer) = &mut self.writer else {
            return Ok(());
        };
        match writer.settle() {
            Ok(written) => {
                self.written(written);
                Ok(())
            }
            Err((e, rows)) => {
                self.put_back(rows);
                Err(e)
            }
        }
    }

    /// Counts `n` rows as stored.
    fn written(&self, n: usize) {
        let stats = &self.tier.stats;
        stats.marks_written.fetch_add(n as u64, Ordering::Relaxed);
        stats.marks_unsent.fetch_sub(n as u64, Ordering::Relaxed);
    }

    /// Rows in flight.
    fn in_flight(&self) -> usize {
        self.writer.as_ref().map_or(0, MarkWriter::len)
    }

    /// Writes everything kept and waits until it is stored.
    pub(crate) fn sync(&mut self) -> Result<(), ExactTierError> {
        self.write_unsent()?;
        self.settle()
    }

    /// `rows` (older) back in front of the kept rows.
    fn put_back(&mut self, mut rows: Vec<Row>) {
        rows.append(&mut self.unsent);
        self.unsent = rows;
        self.unsent_index = index_rows(&self.unsent);
    }

    pub(crate) fn degraded(&self, n: usize) {
        self.tier
            .stats
            .degraded_decisions
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Answers `lookups` after the database failed them, as the policy says.
    fn lookups_failed(
        &mut self,
        e: ExactTierError,
        current: u64,
        lookups: &[Lookup],
        out: &mut Vec<Option<Timestamp>>,
    ) -> Result<(), ExactTierError> {
        out.clear();
        match self.tier.config.policy {
            FailurePolicy::FailClosed => Err(e),
            FailurePolicy::FailOpen => {
                self.degraded(lookups.len());
                out.extend(lookups.iter().map(|q| {
                    self.pending(q.fingerprint)
                        .map(|r| Timestamp::from_nanos(r.at))
                }));
                Ok(())
            }
            FailurePolicy::FallbackToMemory => {
                self.degraded(lookups.len());
                let fallback = self.fallback.as_mut().expect("fallback policy");
                fallback.lookup_batch(current, lookups, out)
            }
        }
    }

    /// Reads the records of `wanted` (slice → fingerprints) in one
    /// statement: `(slice, fingerprint, time, body)` rows.
    pub(crate) fn read_records(
        &mut self,
        wanted: &[(u64, Vec<Fp>)],
    ) -> Result<Vec<(u64, Row)>, ExactTierError> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let names = &self.tier.names;
        let sql = wanted
            .iter()
            .enumerate()
            .map(|(i, (slice, _))| {
                format!(
                    "SELECT fp, slice, at, payload, result FROM {} WHERE fp = ANY(${}) AND slice = ${}",
                    names.ring(*slice),
                    2 * i + 2,
                    2 * i + 1
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let slices: Vec<i64> = wanted.iter().map(|(s, _)| nanos(*s)).collect();
        self.link.run(|client, prepared| {
            let stmt = prepared.get(client, &sql)?;
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(2 * wanted.len());
            for (i, (_, fps)) in wanted.iter().enumerate() {
                params.push(&slices[i]);
                params.push(fps);
            }
            let rows = client.query(&stmt, &params)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let slice = from_nanos(r.get::<_, i64>(1));
                    (
                        slice,
                        Row {
                            fp: r.get::<_, Fp>(0).0,
                            slice,
                            at: from_nanos(r.get(2)),
                            payload: r
                                .get::<_, Option<i64>>(3)
                                .map(|p| PayloadFingerprint(p as u64)),
                            result: r.get::<_, Option<&[u8]>>(4).map(Arc::from),
                        },
                    )
                })
                .collect())
        })
    }
}

/// The upsert of records into one ring partition, its five arrays from
/// parameter `$first`. With `guard`, a row replaces the stored one unless
/// it is the same acceptance (same slice and time) without a body: a plain
/// mark never erases a committed claim's result.
pub(crate) fn record_upsert_sql(ring: &str, first: usize, guard: bool) -> String {
    let p = |i: usize| first + i;
    let mut sql = format!(
        "INSERT INTO {ring} AS r (fp, slice, at, payload, result) \
         SELECT * FROM unnest(${}::uuid[], ${}::int8[], ${}::int8[], ${}::int8[], ${}::bytea[]) \
         ON CONFLICT (fp) DO UPDATE SET slice = excluded.slice, at = excluded.at, \
         payload = excluded.payload, result = excluded.result",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4)
    );
    if guard {
        sql.push_str(
            " WHERE r.slice <> excluded.slice OR r.at <> excluded.at \
             OR excluded.payload IS NOT NULL OR excluded.result IS NOT NULL",
        );
    }
    sql
}

/// Rows as the five arrays of [`upsert_sql`].
pub(crate) struct RowColumns<'a> {
    fps: Vec<Fp>,
    slices: Vec<i64>,
    ats: Vec<i64>,
    payloads: Vec<Option<i64>>,
    results: Vec<Option<&'a [u8]>>,
}

impl<'a> RowColumns<'a> {
    pub(crate) fn of(rows: &[&'a Row]) -> Self {
        RowColumns {
            fps: rows.iter().map(|r| Fp(r.fp)).collect(),
            slices: rows.iter().map(|r| nanos(r.slice)).collect(),
            ats: rows.iter().map(|r| nanos(r.at)).collect(),
            payloads: rows.iter().map(|r| r.payload.map(|p| p.0 as i64)).collect(),
            results: rows.iter().map(|r| r.result.as_deref()).collect(),
        }
    }

    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 5] {
        [
            &self.fps,
            &self.slices,
            &self.ats,
            &self.payloads,
            &self.results,
        ]
    }
}

impl ExactPartition for PgPartition {
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        let mut out = Vec::new();
        let q = Lookup {
            fingerprint: fp,
            slots: 1 << slot,
        };
        self.lookup_batch(self.current, &[q], &mut out)?;
        Ok(out.pop().flatten())
    }

    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        let slice = live_slices(self.current)
            .find(|&(_, s)| s == slot)
            .map_or(self.current, |(slice, _)| slice);
        self.mark_batch(&[Mark {
            fingerprint: fp,
            slot,
            slice,
            at,
        }])
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
        self.advance(current);
        out.clear();
        // Every key has a kept mark (newer than anything stored): no need
        // to ask, and an answer even while the database is down.
        if lookups
            .iter()
            .all(|q| self.pending(q.fingerprint).is_some())
        {
            out.extend(lookups.iter().map(|q| {
                self.pending(q.fingerprint)
                    .map(|r| Timestamp::from_nanos(r.at))
            }));
            return Ok(());
        }
        // Per live slice asked, the fingerprints to look for there.
        let mut wanted: Vec<(u64, Vec<Fp>)> = Vec::new();
        for (slice, slot) in live_slices(current) {
            let fps: Vec<Fp> = lookups
                .iter()
                .filter(|q| q.slots & (1 << slot) != 0)
                .map(|q| Fp(q.fingerprint))
                .collect();
            if !fps.is_empty() {
                wanted.push((slice, fps));
            }
        }
        let rows = match self.read_records(&wanted) {
            Ok(rows) => rows,
            Err(e) => return self.lookups_failed(e, current, lookups, out),
        };
        // The newest record of each fingerprint (each branch returned only
        // fingerprints that asked for its slice).
        self.found_bodies.clear();
        let mut newest: HashMap<Fingerprint, (u64, Row)> = HashMap::new();
        for (slice, row) in rows {
            match newest.get(&row.fp) {
                Some((_, old)) if old.at >= row.at => {}
                _ => {
                    newest.insert(row.fp, (slice, row));
                }
            }
        }
        for q in lookups {
            let found = match self.pending(q.fingerprint) {
                // A kept mark is newer than anything stored.
                Some(row) => Some(row.at),
                None => newest.get(&q.fingerprint).and_then(|(slice, row)| {
                    (q.slots & (1 << slot_of(*slice)) != 0).then_some(row.at)
                }),
            };
            out.push(found.map(Timestamp::from_nanos));
        }
        for (fp, (_, row)) in newest {
            self.found_bodies.insert(fp, (row.at, row.body()));
        }
        Ok(())
    }

    fn mark_batch(&mut self, marks: &[Mark]) -> Result<(), ExactTierError> {
        if let Some(newest) = marks.iter().map(|m| m.slice).max() {
            self.advance(newest);
        }
        if let Some(fallback) = &mut self.fallback {
            fallback.mark_batch(marks)?;
        }
        let dropped = self.keep(marks.iter().map(|m| Row {
            fp: m.fingerprint,
            slice: m.slice,
            at: m.at.as_nanos(),
            payload: None,
            result: None,
        }));
        // Kept for a retry whatever happens now; report the failure.
        self.write_unsent()?;
        if dropped > 0 {
            return Err(ExactTierError::Unavailable(format!(
                "{dropped} marks dropped: the retry buffer is full"
            )));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ExactTierError> {
        self.sync()
    }

    fn unwritten(&self) -> u64 {
        (self.unsent.len() + self.in_flight()) as u64
    }

    fn put_body(
        &mut self,
        mark: &Mark,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
    ) -> Result<(), ExactTierError> {
        if let Some(fallback) = &mut self.fallback {
            fallback.put_body(mark, payload, result)?;
        }
        self.advance(mark.slice);
        // Written with the mark that follows (same row).
        let dropped = self.keep([Row {
            fp: mark.fingerprint,
            slice: mark.slice,
            at: mark.at.as_nanos(),
            payload,
            result: (!result.is_empty()).then(|| Arc::from(result)),
        }]);
        if dropped > 0 {
            return Err(ExactTierError::Unavailable(
                "the retry buffer is full: the result was not stored".to_owned(),
            ));
        }
        Ok(())
    }

    fn body(
        &mut self,
        fp: Fingerprint,
        slot: usize,
        at: Timestamp,
    ) -> Result<Option<RecordBody>, ExactTierError> {
        let at = at.as_nanos();
        if let Some(row) = self.pending(fp) {
            if row.at == at {
                return Ok(row.body());
            }
        }
        if let Some((t, body)) = self.found_bodies.get(&fp) {
            if *t == at {
                return Ok(body.clone());
            }
        }
        let _ = slot;
        let sql = format!(
            "SELECT payload, result FROM {} WHERE fp = $1 AND at = $2 LIMIT 1",
            self.tier.names.records
        );
        let found = self.link.run(|client, prepared| {
            let stmt = prepared.get(client, &sql)?;
            client.query_opt(&stmt, &[&Fp(fp), &nanos(at)])
        });
        match found {
            Ok(row) => Ok(row.and_then(|r| {
                Row {
                    fp,
                    slice: 0,
                    at,
                    payload: r
                        .get::<_, Option<i64>>(0)
                        .map(|p| PayloadFingerprint(p as u64)),
                    result: r.get::<_, Option<&[u8]>>(1).map(Arc::from),
                }
                .body()
            })),
            Err(e) => match (&mut self.fallback, self.tier.config.policy) {
                (Some(fallback), _) => fallback.body(fp, slot, at_ts(at)),
                (None, FailurePolicy::FailOpen) => Ok(None),
                _ => Err(e),
            },
        }
    }

    fn forget(&mut self, fp: Fingerprint) -> Result<bool, ExactTierError> {
        // A batch in flight must land before the delete (a failure puts its
        // rows back among the kept ones, removed below).
        let _ = self.settle();
        let mut found = false;
        if self.unsent_index.remove(&fp).is_some() {
            let before = self.unsent.len();
            self.unsent.retain(|r| r.fp != fp);
            let removed = (before - self.unsent.len()) as u64;
            self.tier
                .stats
                .marks_unsent
                .fetch_sub(removed, Ordering::Relaxed);
            self.unsent_index = index_rows(&self.unsent);
            found = true;
        }
        self.found_bodies.remove(&fp);
        if let Some(fallback) = &mut self.fallback {
            found |= fallback.forget(fp)?;
        }
        let sql = format!(
            "WITH r AS (DELETE FROM {} WHERE fp = $1 RETURNING 1), \
                  l AS (DELETE FROM {} WHERE fp = $1 RETURNING 1) \
             SELECT (SELECT count(*) FROM r) + (SELECT count(*) FROM l)",
            self.tier.names.records, self.tier.names.leases
        );
        let removed: i64 = self.link.run(|client, prepared| {
            let stmt = prepared.get(client, &sql)?;
            Ok(client.query_one(&stmt, &[&Fp(fp)])?.get(0))
        })?;
        Ok(found || removed > 0)
    }

    fn clear_slots(&mut self, slots: u8) {
        if let Some(fallback) = &mut self.fallback {
            fallback.clear_slots(slots);
        }
        // The engine entered slice `c` and retired slice `c − 7` (slot
        // `(c + 1) % 8`): the newest slice in a cleared slot, counting back
        // from the last slice it named. Empty the ring partition of slice
        // `c − 8` (see `schema::RING`), once per process.
        let Some(retired) = (0..GENERATIONS as u64)
            .filter_map(|back| self.current.checked_sub(back))
            .find(|&s| slots & (1 << slot_of(s)) != 0)
        else {
            return;
        };
        let entered = retired + GENERATIONS as u64 - 1;
        // Marks in flight land before a partition is emptied.
        let _ = self.settle();
        self.advance(entered);
        let Some(expired) = entered.checked_sub(RETIRE_BACK) else {
            return;
        };
        if self.tier.retired.fetch_max(expired, Ordering::AcqRel) >= expired {
            return;
        }
        let names = &self.tier.names;
        let lease_now = self.lease_now;
        let sweep_leases = lease_now > 0;
        let leases = names.leases.clone();
        let stats = Arc::clone(&self.tier.stats);
        let _ = self.link.run(|client, _| {
            if schema::retire(client, names, expired) {
                stats.partitions_retired.fetch_add(1, Ordering::Relaxed);
            }
            if sweep_leases {
                client.execute(
                    &format!("DELETE FROM {leases} WHERE until <= $1"),
                    &[&nanos(lease_now)],
                )?;
            }
            Ok(())
        });
    }

    fn len(&self) -> u64 {
        (self.unsent.len() + self.in_flight()) as u64
    }

    fn bytes(&self) -> usize {
        self.fallback.as_ref().map_or(0, MemoryPartition::bytes)
            + self.unsent.capacity() * std::mem::size_of::<Row>()
            + self
                .unsent
                .iter()
                .map(|r| r.result.as_ref().map_or(0, |b| b.len()))
                .sum::<usize>()
            + self.unsent_index.capacity() * 32
            + self.writer.as_ref().map_or(0, MarkWriter::bytes)
    }

    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        None
    }

    fn shared_claims(
        &mut self,
        current: u64,
        window: Option<u64>,
        ops: &[tiered_dedup::exact::SharedOp<'_>],
        out: &mut Vec<tiered_dedup::exact::SharedAnswer>,
    ) -> Result<(), ExactTierError> {
        crate::shared::shared_claims(self, current, window, ops, out)
    }
}

fn at_ts(at: u64) -> Timestamp {
    Timestamp::from_nanos(at)
}
