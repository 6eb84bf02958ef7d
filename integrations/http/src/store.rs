//! Where claims go: straight to the engine (the memory tier does no I/O, so
//! a claim there is a few hundred nanoseconds under a shard lock), or
//! through a [`ClaimBatcher`] (a remote tier: never I/O on a runtime worker,
//! and concurrent requests share round trips). Commits the store could not
//! record are retried on a thread of the store's own while the lease lasts.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tiered_dedup::claims::SharedLease;
use tiered_dedup::{
    Claim, ClaimBatcher, ClaimRequest, CommitError, Deduper, ExactTier, Fingerprint, LeaseLost,
};

use crate::stats::IdempotencyStats;

/// How the layer reaches the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dispatch {
    /// [`Dispatch::Direct`] for the engine's local tiers (memory,
    /// dashmap), [`Dispatch::Batched`] for any other (Redis, a custom
    /// backend).
    #[default]
    Auto,
    /// Claims, commits and releases are engine calls made on the runtime's
    /// worker thread: right for a tier that does no I/O (measured faster
    /// on the memory tier: `docs/benchmarks.md`, HTTP).
    Direct,
    /// Through a [`ClaimBatcher`]: its own thread makes one engine call per
    /// batch of concurrent requests' claims (or commits, or releases), and
    /// the request's task awaits the answer without blocking its worker.
    Batched,
}

/// The result of a commit, as the layer sees it.
pub(crate) type Committed = Result<(), CommitError<Arc<Deduper>>>;

pub(crate) struct Store {
    engine: Arc<Deduper>,
    /// `Some` when batched, or when in-flight retries wait (a wait must
    /// never block a worker thread, so it always goes through a batcher).
    batcher: Option<ClaimBatcher>,
    direct: bool,
    retrier: OnceLock<Retrier>,
    /// How long a failed commit is retried (the lease's duration).
    retry_for: Duration,
}

impl Store {
    pub(crate) fn new(
        engine: Arc<Deduper>,
        dispatch: Dispatch,
        waits: bool,
        retry_for: Duration,
    ) -> Self {
        let direct = match dispatch {
            Dispatch::Direct => true,
            Dispatch::Batched => false,
            Dispatch::Auto => matches!(engine.exact_tier(), ExactTier::Memory | ExactTier::DashMap),
        };
        let batcher = (!direct || waits).then(|| ClaimBatcher::new(Arc::clone(&engine)));
        Store {
            engine,
            batcher,
            direct,
            retrier: OnceLock::new(),
            retry_for,
        }
    }

    pub(crate) fn engine(&self) -> &Arc<Deduper> {
        &self.engine
    }

    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    pub(crate) fn fingerprint(&self, key: &[u8]) -> Fingerprint {
        self.engine.fingerprint(key)
    }

    /// True when a claim (waiting up to `wait`) is an engine call made at
    /// once, on the caller's thread: [`Self::claim_at_once`].
    pub(crate) fn claims_at_once(&self, wait: Option<Duration>) -> bool {
        self.direct && !(wait.is_some() && self.batcher.is_some())
    }

    /// A claim made at once (see [`Self::claims_at_once`]).
    pub(crate) fn claim_at_once(&self, request: ClaimRequest<Fingerprint>) -> Claim<Arc<Deduper>> {
        self.engine.claim_owned(request)
    }

    /// Claims `request`, waiting up to `wait` for an in-flight holder.
    pub(crate) async fn claim(
        &self,
        request: ClaimRequest<Fingerprint>,
        wait: Option<Duration>,
    ) -> Claim<Arc<Deduper>> {
        match (wait, &self.batcher) {
            (Some(timeout), Some(b)) => b.claim_wait(request, timeout).await,
            (_, Some(b)) if !self.direct => b.claim(request).await,
            _ => self.engine.claim_owned(request),
        }
    }

    pub(crate) async fn commit(&self, lease: SharedLease, result: Vec<u8>) -> Committed {
        match &self.batcher {
            Some(b) if !self.direct => b.commit(lease, result).await,
            _ => lease.commit(&result),
        }
    }

    pub(crate) async fn release(&self, lease: SharedLease) -> Result<(), LeaseLost> {
        match &self.batcher {
            Some(b) if !self.direct => b.release(lease).await,
            _ => lease.release(),
        }
    }

    /// Keeps committing `lease` with `result` in the background, with a
    /// growing pause, until it is recorded, the lease is lost, or the
    /// lease's duration has passed (then the lease is dropped: released).
    pub(crate) fn retry_commit(
        &self,
        lease: SharedLease,
        result: Vec<u8>,
        stats: &Arc<IdempotencyStats>,
    ) {
        let retrier = self
            .retrier
            .get_or_init(|| Retrier::start(Arc::clone(stats)));
        retrier.push(RetryJob {
            lease,
            result,
            give_up: Instant::now() + self.retry_for,
            next: Instant::now() + RETRY_FIRST,
            pause: RETRY_FIRST,
        });
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("exact_tier", &self.engine.exact_tier_name())
            .field("direct", &self.direct)
            .field("batcher", &self.batcher.is_some())
            .finish_non_exhaustive()
    }
}

const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Commits kept for retry at most; past it the oldest lease is released.
const RETRY_CAPACITY: usize = 10_000;

struct RetryJob {
    lease: SharedLease,
    result: Vec<u8>,
    give_up: Instant,
    next: Instant,
    pause: Duration,
}

struct Retrier {
    jobs: Mutex<Option<Sender<RetryJob>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Retrier {
    fn start(stats: Arc<IdempotencyStats>) -> Self {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tiered-dedup-http-commits".to_owned())
            .spawn(move || retry_loop(&rx, &stats))
            .expect("spawning the commit retry thread");
        Retrier {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        }
    }

    fn push(&self, job: RetryJob) {
        if let Some(tx) = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(job);
        }
    }
}

impl Drop for Retrier {
    fn drop(&mut self) {
        drop(self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// The retry thread: each job is tried when due; pending jobs are bounded
/// in number ([`RETRY_CAPACITY`]) and in time (their `give_up`). When the
/// store is dropped, the jobs left are dropped (their leases released).
fn retry_loop(jobs: &Receiver<RetryJob>, stats: &IdempotencyStats) {
    let mut pending: Vec<RetryJob> = Vec::new();
    loop {
        let wait = pending
            .iter()
            .map(|j| j.next)
            .min()
            .map(|due| due.saturating_duration_since(Instant::now()));
        let got = match wait {
            None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(w) => jobs.recv_timeout(w),
        };
        match got {
            Ok(job) => {
                if pending.len() >= RETRY_CAPACITY {
                    pending.remove(0);
                }
                pending.push(job);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let mut still = Vec::with_capacity(pending.len());
        for mut job in pending.drain(..) {
            if job.next > now {
                still.push(job);
                continue;
            }
            stats.commit_retried();
            match job.lease.commit(&job.result) {
                Ok(()) => stats.stored(job.result.len()),
                Err(CommitError::LeaseLost(_)) => {}
                Err(e) => {
                    let Some(lease) = e.into_lease() else {
                        continue;
                    };
                    if now >= job.give_up {
                        continue; // dropped: released
                    }
                    job.lease = lease;
                    job.pause = (job.pause * 2).min(RETRY_MAX);
                    job.next = now + job.pause;
                    still.push(job);
                }
            }
        }
        pending = still;
    }
}
