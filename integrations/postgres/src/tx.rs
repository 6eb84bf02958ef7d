//! Transactional claims: a claim taken inside the caller's own transaction,
//! so that the claim's record and the caller's effect commit together or
//! not at all — the one exactly-once path (a crash anywhere leaves either
//! both or neither).
//!
//! ```text
//! BEGIN                                  (the caller's, READ COMMITTED)
//!   claims.claim(&mut tx, key)           lock the key, read, write its record
//!     Acquired(lease) → INSERT the effect; lease.complete(&mut tx, result)
//!     Completed{result} → replay result  (committed by an earlier transaction)
//!     InProgress → another transaction holds the key (NoWait), try later
//!     Conflict → same key, another payload
//! COMMIT                                 record + effect, atomically
//! ```
//!
//! **What a concurrent claimer sees.** The key's transaction-scoped
//! advisory lock is held from the claim until the holder's transaction
//! ends. With [`Wait::NoWait`] (the default) a second claimer gets
//! [`TxClaim::InProgress`] at once — an HTTP handler answers 409. With
//! [`Wait::Block`] it waits for the holder's commit or rollback (within
//! its own `lock_timeout`), then answers `Completed` (the holder
//! committed) or `Acquired` (it rolled back) — a queue consumer just
//! carries on. A live lease of an engine sharing the tables (shared keys)
//! answers `InProgress { until }` in both modes.
//!
//! **Isolation.** `READ COMMITTED` (PostgreSQL's default) is required and
//! checked: the claim's read is a statement of its own, after the lock, so
//! its snapshot sees what the previous holder committed. A `REPEATABLE
//! READ` or `SERIALIZABLE` transaction reads from a snapshot taken at its
//! first statement — before the wait — and could act a second time, so
//! such a claim is refused with [`PgError::Isolation`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::types::Type;
use postgres::{Client, GenericClient};
use tiered_dedup::claims::PayloadFingerprint;
use tiered_dedup::{ClaimRequest, Fingerprint, Key, Namespace, Timestamp};

use crate::config::PgConfig;
use crate::error::PgError;
use crate::fp::{from_nanos, lock_key, nanos, Fp};
use crate::partition::live_slices;
use crate::schema::{self, Names, RETIRE_BACK};

/// What a claim does when another transaction holds its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wait {
    /// Answer [`TxClaim::InProgress`] at once (`pg_try_advisory_xact_lock`).
    #[default]
    NoWait,
    /// Wait until the holder's transaction ends
    /// (`pg_advisory_xact_lock`, bounded by the transaction's
    /// `lock_timeout`), then answer from what it left.
    Block,
}

/// The answer to a transactional claim.
#[must_use = "an acquired claim is the caller's to act on"]
#[derive(Debug)]
pub enum TxClaim {
    /// Recorded in the caller's transaction: write the effect in the same
    /// transaction, then [`TxLease::complete`] (optional: without it the
    /// stored result is empty) and commit. A rollback undoes the claim.
    Acquired(TxLease),
    /// Another transaction holds the key (open now), or an engine's lease
    /// does until `until`: do not act; try again later.
    InProgress {
        /// The engine lease's expiry; `None` for an open transaction.
        until: Option<Timestamp>,
    },
    /// Committed within the window: do not act; replay `result`.
    Completed {
        /// When the completed claim was made (the window's anchor).
        first_seen: Timestamp,
        /// The stored result (empty if none was stored).
        result: Arc<[u8]>,
    },
    /// Held or completed with another payload fingerprint.
    Conflict,
}

impl TxClaim {
    /// True for [`TxClaim::Acquired`].
    #[must_use]
    pub fn is_acquired(&self) -> bool {
        matches!(self, TxClaim::Acquired(_))
    }

    /// True for [`TxClaim::Completed`].
    #[must_use]
    pub fn is_completed(&self) -> bool {
        matches!(self, TxClaim::Completed { .. })
    }

    /// True for [`TxClaim::InProgress`].
    #[must_use]
    pub fn is_in_progress(&self) -> bool {
        matches!(self, TxClaim::InProgress { .. })
    }

    /// True for [`TxClaim::Conflict`].
    #[must_use]
    pub fn is_conflict(&self) -> bool {
        matches!(self, TxClaim::Conflict)
    }

    /// The lease, for [`TxClaim::Acquired`].
    #[must_use]
    pub fn into_lease(self) -> Option<TxLease> {
        match self {
            TxClaim::Acquired(lease) => Some(lease),
            _ => None,
        }
    }
}

/// A key claimed in the caller's transaction: its record is written there
/// already; [`TxLease::complete`] stores the result beside it. It lives
/// exactly as long as the transaction: commit and it is done, roll back
/// and it never was.
#[derive(Debug)]
#[must_use = "complete the lease with its result, in the same transaction"]
pub struct TxLease {
    fingerprint: Fingerprint,
    slice: u64,
    at: Timestamp,
    /// The tables' `complete` function.
    complete_fn: String,
}

impl TxLease {
    /// The claimed key's fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The claim's time (the window's anchor).
    #[must_use]
    pub fn at(&self) -> Timestamp {
        self.at
    }

    /// Stores `result` with the claim's record, in the caller's
    /// transaction `tx` (the one the claim was taken in).
    ///
    /// # Errors
    /// The database's error (the caller's transaction is then aborted:
    /// roll it back).
    pub fn complete<C: GenericClient>(self, tx: &mut C, result: &[u8]) -> Result<(), PgError> {
        complete_batch(tx, vec![(self, result)])
    }
}

/// One ring partition's completions: fingerprints, slices, results.
type Completions<'a> = (Vec<Fp>, Vec<i64>, Vec<&'a [u8]>);

/// A stored record: time, payload fingerprint, result.
type Stored = (u64, Option<PayloadFingerprint>, Arc<[u8]>);

/// Completes many leases, each with its result, in one statement.
///
/// # Errors
/// The database's error (roll the transaction back).
pub fn complete_batch<C: GenericClient, R: AsRef<[u8]>>(
    tx: &mut C,
    leases: Vec<(TxLease, R)>,
) -> Result<(), PgError> {
    let mut by_ring: std::collections::BTreeMap<(&str, i32), Completions<'_>> =
        std::collections::BTreeMap::new();
    for (lease, result) in &leases {
        let ring = (lease.slice % schema::RING) as i32;
        let e = by_ring
            .entry((lease.complete_fn.as_str(), ring))
            .or_default();
        e.0.push(Fp(lease.fingerprint));
        e.1.push(nanos(lease.slice));
        e.2.push(result.as_ref());
    }
    for ((function, ring), (fps, slices, results)) in &by_ring {
        tx.query_typed(
            &format!("SELECT {function}($1, $2, $3, $4)"),
            &[
                (ring, Type::INT4),
                (fps, Type::UUID_ARRAY),
                (slices, Type::INT8_ARRAY),
                (results, Type::BYTEA_ARRAY),
            ],
        )?;
    }
    Ok(())
}

/// Claims taken inside the caller's transactions, on a tier's tables.
/// Build one per process ([`PgClaims::builder`]) and share it.
pub struct PgClaims {
    names: Names,
    namespace: Namespace,
    window: Option<u64>,
    slice_nanos: Option<u64>,
    wait: Wait,
    /// Empties expired ring partitions (a connection of its own, never
    /// the caller's transaction).
    maintenance: Mutex<Option<Client>>,
    client_config: postgres::Config,
    retired: AtomicU64,
}

impl std::fmt::Debug for PgClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgClaims")
            .field("tables", &self.names.label)
            .field("window", &self.window)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

/// Builds a [`PgClaims`].
#[derive(Debug)]
#[must_use]
pub struct PgClaimsBuilder {
    config: PgConfig,
    window: Option<Duration>,
    lateness: Duration,
    namespace: String,
    wait: Wait,
}

impl PgClaimsBuilder {
    /// A completed key is `Completed` for `window` after its claim. Use
    /// the window of the engines sharing the tables. Default: 24 hours.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = Some(window);
        self
    }

    /// Completed keys are kept forever (no window). Default: a window.
    pub fn no_window(mut self) -> Self {
        self.window = None;
        self
    }

    /// The engines' allowed lateness (it sets the slicing with the
    /// window). Default: zero.
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.lateness = lateness;
        self
    }

    /// The key space (the engines' `namespace`). Default: `""`.
    pub fn namespace(mut self, name: &str) -> Self {
        name.clone_into(&mut self.namespace);
        self
    }

    /// What a claim does when another transaction holds its key. Default:
    /// [`Wait::NoWait`].
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// Connects once, checks the server, the login and the tables (created
    /// or checked as the configuration says), and agrees on the slicing.
    ///
    /// # Errors
    /// As [`crate::PgTier::connect`]; [`PgError::Config`] for a zero
    /// window; [`PgError::Schema`] when the tables were made for another
    /// window.
    pub fn build(self) -> Result<PgClaims, PgError> {
        if self.window.is_some_and(|w| w.is_zero()) {
            return Err(PgError::Config(
                "the window is zero: give a positive window, or no_window()".to_owned(),
            ));
        }
        let (client_config, names, mut client) = crate::tier::open(&self.config)?;
        let window = self
            .window
            .map(|w| u64::try_from(w.as_nanos()).unwrap_or(u64::MAX));
        let lateness = u64::try_from(self.lateness.as_nanos()).unwrap_or(u64::MAX);
        // The engine's slicing: the span (window plus lateness) in six.
        let slice_nanos = window.map(|w| w.saturating_add(lateness).div_ceil(6).max(1));
        schema::agree_slicing(&mut client, &names, slice_nanos)?;
        Ok(PgClaims {
            names,
            namespace: Namespace::new(&self.namespace),
            window,
            slice_nanos,
            wait: self.wait,
            maintenance: Mutex::new(Some(client)),
            client_config,
            retired: AtomicU64::new(0),
        })
    }
}

impl PgClaims {
    /// A builder for claims on the tables `config` names.
    pub fn builder(config: PgConfig) -> PgClaimsBuilder {
        PgClaimsBuilder {
            config,
            window: Some(Duration::from_secs(24 * 3600)),
            lateness: Duration::ZERO,
            namespace: String::new(),
            wait: Wait::NoWait,
        }
    }

    /// The fingerprint of `key` (the engines' for the same namespace).
    pub fn fingerprint<K: Key + ?Sized>(&self, key: &K) -> Fingerprint {
        key.fingerprint(self.namespace)
    }

    /// Claims `key` inside the caller's transaction `tx` (no payload, time
    /// now).
    ///
    /// # Errors
    /// [`PgError::Isolation`] outside `READ COMMITTED`; the database's
    /// error otherwise (a `lock_timeout` while waiting is
    /// [`PgError::is_retryable`]). Either way, roll the transaction back.
    pub fn claim<C: GenericClient, K: Key + ?Sized>(
        &self,
        tx: &mut C,
        key: &K,
    ) -> Result<TxClaim, PgError> {
        let fp = self.fingerprint(key);
        self.claim_fingerprints(tx, &[(fp, None, None)])
            .map(|mut v| v.pop().expect("one answer"))
    }

    /// Claims one request (payload fingerprint, event time; the lease
    /// duration does not apply: the transaction is the lease).
    ///
    /// # Errors
    /// As [`PgClaims::claim`].
    pub fn claim_with<C: GenericClient, K: Key>(
        &self,
        tx: &mut C,
        request: ClaimRequest<K>,
    ) -> Result<TxClaim, PgError> {
        self.claim_batch(tx, std::slice::from_ref(&request))
            .map(|mut v| v.pop().expect("one answer"))
    }

    /// Claims many requests in the caller's transaction, in two
    /// statements whatever their number (lock and read, write). A key claimed
    /// twice in one batch is `Completed` the second time (this
    /// transaction recorded it).
    ///
    /// # Errors
    /// As [`PgClaims::claim`].
    pub fn claim_batch<C: GenericClient, K: Key>(
        &self,
        tx: &mut C,
        requests: &[ClaimRequest<K>],
    ) -> Result<Vec<TxClaim>, PgError> {
        let items: Vec<(Fingerprint, Option<PayloadFingerprint>, Option<Timestamp>)> = requests
            .iter()
            .map(|r| (self.fingerprint(&r.key), r.payload, r.at))
            .collect();
        self.claim_fingerprints(tx, &items)
    }

    fn claim_fingerprints<C: GenericClient>(
        &self,
        tx: &mut C,
        items: &[(Fingerprint, Option<PayloadFingerprint>, Option<Timestamp>)],
    ) -> Result<Vec<TxClaim>, PgError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let now = Timestamp::now();
        let current = self.slice_nanos.map_or(0, |d| now.as_nanos() / d);
        self.maintain(current);
        // 1. One call: the isolation level, the locks (sorted: two batches
        // never deadlock), then the read in statements of their own, whose
        // snapshots are taken after the locks and so see what earlier
        // holders committed.
        let salt = self.names.lock_salt();
        let mut keys: Vec<i64> = items.iter().map(|&(fp, ..)| lock_key(fp, salt)).collect();
        keys.sort_unstable();
        keys.dedup();
        let fps: Vec<Fp> = items.iter().map(|&(fp, ..)| Fp(fp)).collect();
        // Per ring partition, the live slice it holds (NULL: not read).
        let mut slices: Vec<Option<i64>> = vec![None; schema::RING as usize];
        for (slice, _) in live_slices(current) {
            slices[(slice % schema::RING) as usize] = Some(nanos(slice));
        }
        let wait = self.wait == Wait::Block;
        let rows = tx.query_typed(
            &format!("SELECT * FROM {}($1, $2, $3, $4)", self.names.claim_read_fn),
            &[
                (&keys, Type::INT8_ARRAY),
                (&wait, Type::BOOL),
                (&fps, Type::UUID_ARRAY),
                (&slices, Type::INT8_ARRAY),
            ],
        )?;
        let mut busy = std::collections::HashSet::new();
        let mut leases = std::collections::HashMap::new();
        let mut records: std::collections::HashMap<Fingerprint, Stored> =
            std::collections::HashMap::new();
        for r in &rows {
            match r.get::<_, i16>(0) {
                3 => {
                    let isolation = String::from_utf8_lossy(r.get::<_, &[u8]>(6)).into_owned();
                    if isolation != "read committed" {
                        return Err(PgError::Isolation(isolation));
                    }
                }
                4 => {
                    busy.insert(r.get::<_, i64>(2));
                }
                kind => {
                    let fp = r.get::<_, Fp>(1).0;
                    let payload = r
                        .get::<_, Option<i64>>(5)
                        .map(|p| PayloadFingerprint(p as u64));
                    let at = from_nanos(r.get(3));
                    if kind == 0 {
                        let until = from_nanos(r.get::<_, Option<i64>>(4).unwrap_or(0));
                        leases.insert(fp, (until, payload));
                    } else if records.get(&fp).is_none_or(|(t, ..)| *t < at) {
                        let result: Arc<[u8]> = r
                            .get::<_, Option<&[u8]>>(6)
                            .map_or_else(|| Arc::from(&[][..]), Arc::from);
                        records.insert(fp, (at, payload, result));
                    }
                }
            }
        }
        // 2. Decide, in order.
        let conflicts = |a: Option<PayloadFingerprint>, b: Option<PayloadFingerprint>| matches!((a, b), (Some(a), Some(b)) if a != b);
        let mut answers = Vec::with_capacity(items.len());
        let mut writes: Vec<(Fp, i64, Option<i64>)> = Vec::new();
        for &(fp, payload, at) in items {
            let at = at.unwrap_or(now).as_nanos();
            if busy.contains(&lock_key(fp, salt)) {
                answers.push(TxClaim::InProgress { until: None });
                continue;
            }
            if let Some(&(until, held)) = leases.get(&fp) {
                if now.as_nanos() < until {
                    answers.push(if conflicts(held, payload) {
                        TxClaim::Conflict
                    } else {
                        TxClaim::InProgress {
                            until: Some(Timestamp::from_nanos(until)),
                        }
                    });
                    continue;
                }
            }
            if let Some((first, stored, result)) = records.get(&fp) {
                if self.window.is_none_or(|w| at.saturating_sub(*first) < w) {
                    answers.push(if conflicts(*stored, payload) {
                        TxClaim::Conflict
                    } else {
                        TxClaim::Completed {
                            first_seen: Timestamp::from_nanos(*first),
                            result: Arc::clone(result),
                        }
                    });
                    continue;
                }
            }
            records.insert(fp, (at, payload, Arc::from(&[][..])));
            writes.push((Fp(fp), nanos(at), payload.map(|p| p.0 as i64)));
            answers.push(TxClaim::Acquired(TxLease {
                fingerprint: fp,
                slice: current,
                at: Timestamp::from_nanos(at),
                complete_fn: self.names.complete_fn.clone(),
            }));
        }
        // 3. Write the records (and drop expired engine leases of them).
        if !writes.is_empty() {
            let wfps: Vec<Fp> = writes.iter().map(|w| w.0).collect();
            let wslices: Vec<i64> = vec![nanos(current); writes.len()];
            let wats: Vec<i64> = writes.iter().map(|w| w.1).collect();
            let wpay: Vec<Option<i64>> = writes.iter().map(|w| w.2).collect();
            let ring = (current % schema::RING) as i32;
            tx.query_typed(
                &format!("SELECT {}($1, $2, $3, $4, $5)", self.names.record_fn),
                &[
                    (&ring, Type::INT4),
                    (&wfps, Type::UUID_ARRAY),
                    (&wslices, Type::INT8_ARRAY),
                    (&wats, Type::INT8_ARRAY),
                    (&wpay, Type::INT8_ARRAY),
                ],
            )?;
        }
        Ok(answers)
    }

    /// Empties the ring partition of slice `current − 8` once per slice,
    /// on the handle's own connection (never in a caller's transaction);
    /// best effort, never waiting more than 200 ms for its lock.
    fn maintain(&self, current: u64) {
        if self.slice_nanos.is_none() {
            return;
        }
        let Some(expired) = current.checked_sub(RETIRE_BACK) else {
            return;
        };
        if self.retired.fetch_max(expired, Ordering::AcqRel) >= expired {
            return;
        }
        let Ok(mut guard) = self.maintenance.try_lock() else {
            return;
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = self.client_config.connect(postgres::NoTls).ok();
        }
        if let Some(client) = guard.as_mut() {
            if !schema::retire(client, &self.names, expired) {
                // Try again at the next claim.
                self.retired
                    .store(expired.saturating_sub(1), Ordering::Release);
            }
        }
    }
}
