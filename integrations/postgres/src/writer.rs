//! `MarkWriter`: a partition's mark batches written on a connection and a
//! thread of their own, so the engine checks its next batch while the
//! database stores the last one — the pipelining of the Redis tier's mark
//! connection, with the synchronous client.
//!
//! At most one batch is in flight. Its rows stay indexed (a lookup that
//! overtakes them is answered from here) until [`MarkWriter::settle`]
//! reads its outcome: the next batch, a flush, a claim, a forget or a
//! rotation settles first, so nothing is written out of order and a
//! failure hands the rows back for a retry.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use tiered_dedup::{ExactTierError, Fingerprint};

use crate::link::Link;
use crate::partition::{record_upsert_sql, Row, RowColumns};
use crate::schema::{self, Names};
use crate::tier::TierShared;

pub(crate) struct MarkWriter {
    to: Sender<Vec<Row>>,
    from: Receiver<(Vec<Row>, Result<(), ExactTierError>)>,
    /// The batch in flight (empty when none), and the newest row of each
    /// fingerprint in it.
    in_flight: Vec<Row>,
    index: HashMap<Fingerprint, usize>,
    busy: bool,
}

impl MarkWriter {
    pub(crate) fn new(tier: Arc<TierShared>) -> Self {
        let (to, work) = channel::<Vec<Row>>();
        let (done, from) = channel();
        std::thread::Builder::new()
            .name("td-pg-marks".to_owned())
            .spawn(move || {
                let mut link = Link::new(Arc::clone(&tier));
                // Ends when the partition (the sender) is dropped.
                while let Ok(rows) = work.recv() {
                    let result = write_rows(&mut link, &tier.names, &rows);
                    if done.send((rows, result)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the mark writer thread");
        MarkWriter {
            to,
            from,
            in_flight: Vec::new(),
            index: HashMap::new(),
            busy: false,
        }
    }

    /// Starts writing `rows` (nothing may be in flight: settle first).
    pub(crate) fn send(&mut self, rows: Vec<Row>) -> Result<(), Vec<Row>> {
        debug_assert!(!self.busy, "settle before sending");
        self.index = crate::partition::index_rows(&rows);
        self.in_flight = rows.clone();
        match self.to.send(rows) {
            Ok(()) => {
                self.busy = true;
                Ok(())
            }
            Err(e) => {
                self.in_flight.clear();
                self.index.clear();
                Err(e.0)
            }
        }
    }

    /// Waits for the batch in flight: `Ok(n)` rows written (0 when none
    /// was in flight), or its error and rows, handed back.
    pub(crate) fn settle(&mut self) -> Result<usize, (ExactTierError, Vec<Row>)> {
        if !self.busy {
            return Ok(0);
        }
        self.busy = false;
        self.index.clear();
        let in_flight = std::mem::take(&mut self.in_flight);
        match self.from.recv() {
            Ok((_, Ok(()))) => Ok(in_flight.len()),
            Ok((rows, Err(e))) => Err((e, rows)),
            Err(_) => Err((
                ExactTierError::Unavailable("the mark writer thread stopped".to_owned()),
                in_flight,
            )),
        }
    }

    /// The newest row of `fp` in flight.
    pub(crate) fn pending(&self, fp: Fingerprint) -> Option<&Row> {
        self.index.get(&fp).map(|&i| &self.in_flight[i])
    }

    /// Rows in flight.
    pub(crate) fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes held by the rows in flight.
    pub(crate) fn bytes(&self) -> usize {
        self.in_flight.capacity() * std::mem::size_of::<Row>()
            + self
                .in_flight
                .iter()
                .map(|r| r.result.as_ref().map_or(0, |b| b.len()))
                .sum::<usize>()
            + self.index.capacity() * 32
    }
}

/// Writes `rows`: one statement per ring partition, each fingerprint once
/// per statement (a row with a body wins over a plain mark of the same
/// time, else the later row).
pub(crate) fn write_rows(
    link: &mut Link,
    names: &Names,
    rows: &[Row],
) -> Result<(), ExactTierError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut by_ring: HashMap<u64, HashMap<Fingerprint, &Row>> = HashMap::new();
    for row in rows {
        let ring = by_ring.entry(row.slice % schema::RING).or_default();
        match ring.get(&row.fp) {
            Some(old) if old.supersedes(row) => {}
            _ => {
                ring.insert(row.fp, row);
            }
        }
    }
    let statements: Vec<(String, Vec<&Row>)> = by_ring
        .into_values()
        .map(|rows| {
            let rows: Vec<&Row> = rows.into_values().collect();
            (record_upsert_sql(names.ring(rows[0].slice), 1, true), rows)
        })
        .collect();
    link.run(|client, prepared| {
        for (sql, rows) in &statements {
            let stmt = prepared.get(client, sql)?;
            let columns = RowColumns::of(rows);
            client.execute(&stmt, &columns.params())?;
        }
        Ok(())
    })
}
