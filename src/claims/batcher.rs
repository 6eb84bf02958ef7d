//! `ClaimBatcher`: concurrent callers' claims, commits and releases in one
//! engine call per batch, on threads of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

use crate::claims::{Claim, ClaimRequest, CommitError, Lease, LeaseLost};
use crate::engine::Deduper;
use crate::fingerprint::{Fingerprint, Key};

/// A lease of an engine shared through an `Arc` (what the batcher hands
/// out).
pub type SharedLease = Lease<Arc<Deduper>>;

/// The most jobs one batch takes.
const MAX_BATCH: usize = 4096;

/// How often waiting claims look again, at most (they look again sooner
/// when a batch runs anyway).
const WAIT_POLL: Duration = Duration::from_millis(20);

struct Slot<T> {
    value: Mutex<Pending<T>>,
    ready: Condvar,
}

/// A slot's state: the answer once sent; the task to wake, or whether a
/// thread sleeps on the condition variable (only then is it notified: a
/// notification is a system call).
struct Pending<T> {
    value: Option<T>,
    waker: Option<Waker>,
    sleeping: bool,
}

/// The answer to one call to a [`ClaimBatcher`]: `.await` it, or
/// [`Reply::wait`] for it from a thread.
#[must_use = "a reply carries the answer (an acquired lease must be committed or released)"]
pub struct Reply<T> {
    slot: Arc<Slot<T>>,
}

/// The batcher's side of a [`Reply`].
struct Answer<T> {
    slot: Arc<Slot<T>>,
}

fn reply<T>() -> (Answer<T>, Reply<T>) {
    let slot = Arc::new(Slot {
        value: Mutex::new(Pending {
            value: None,
            waker: None,
            sleeping: false,
        }),
        ready: Condvar::new(),
    });
    (
        Answer {
            slot: Arc::clone(&slot),
        },
        Reply { slot },
    )
}

impl<T> Answer<T> {
    fn send(self, value: T) {
        let mut guard = self
            .slot
            .value
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.value = Some(value);
        let waker = guard.waker.take();
        let sleeping = guard.sleeping;
        drop(guard);
        if let Some(waker) = waker {
            waker.wake();
        }
        if sleeping {
            self.slot.ready.notify_all();
        }
    }
}

impl<T> Reply<T> {
    /// Blocks the calling thread until the answer is there (not from an
    /// async task: `.await` it there).
    pub fn wait(self) -> T {
        let mut guard = self
            .slot
            .value
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(value) = guard.value.take() {
                return value;
            }
            guard.sleeping = true;
            guard = self
                .slot
                .ready
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl<T> Future for Reply<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut guard = self
            .slot
            .value
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match guard.value.take() {
            Some(value) => Poll::Ready(value),
            None => {
                match &mut guard.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    waker => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl<T> std::fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").finish_non_exhaustive()
    }
}

type Request = ClaimRequest<Fingerprint>;

enum Job {
    Claim {
        request: Request,
        /// `Some`: wait for an in-flight holder until then.
        deadline: Option<Instant>,
        answer: Answer<Claim<Arc<Deduper>>>,
    },
    Commit {
        lease: SharedLease,
        result: Vec<u8>,
        answer: Answer<Result<(), CommitError<Arc<Deduper>>>>,
    },
    Release {
        lease: SharedLease,
        answer: Answer<Result<(), LeaseLost>>,
    },
}

/// Gathers the claims, commits and releases of concurrent callers — async
/// tasks of an HTTP server or a broker consumer, or threads — into one
/// engine call per batch, made on threads of the batcher's own; dropping
/// it finishes the queued jobs and stops the threads. Callers never block
/// a runtime's worker threads on the exact tier's I/O, and concurrent
/// callers share round trips: while one batch is with the tier, the next
/// gathers.
///
/// Every call returns a [`Reply`]: a future (any executor; no runtime
/// dependency) that can also be waited for from a thread.
///
/// ```
/// use std::sync::Arc;
/// use tiered_dedup::{Claim, ClaimBatcher, ClaimRequest, Deduper};
///
/// let dedup = Arc::new(Deduper::builder().build()?);
/// let batcher = ClaimBatcher::new(Arc::clone(&dedup));
/// // From async code: `batcher.claim(request).await`.
/// match batcher.claim(ClaimRequest::new("order-7")).wait() {
///     Claim::Acquired(lease) => {
///         batcher.commit(lease, b"created".to_vec()).wait().unwrap();
///     }
///     other => panic!("{other:?}"),
/// }
/// assert!(batcher.claim(ClaimRequest::new("order-7")).wait().is_completed());
/// # Ok::<(), tiered_dedup::ConfigError>(())
/// ```
pub struct ClaimBatcher {
    engine: Arc<Deduper>,
    /// One queue per thread; a key's jobs always go to the same one.
    jobs: Vec<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl ClaimBatcher {
    /// Threads of [`ClaimBatcher::new`]'s batcher when the engine's leases
    /// live in a remote store (shared keys on Redis or PostgreSQL): batches
    /// in flight at once.
    pub const REMOTE_THREADS: usize = 4;

    /// A batcher for `engine`, with its threads started: one thread for a
    /// local tier; with shared keys on a remote store, where a batch waits
    /// on round trips, [`ClaimBatcher::REMOTE_THREADS`] (no gain measured
    /// on loopback, where a round trip is short; no loss either).
    ///
    /// # Panics
    /// When a thread cannot be spawned.
    #[must_use]
    pub fn new(engine: Arc<Deduper>) -> Self {
        let threads = if engine.shares_leases_remotely() {
            Self::REMOTE_THREADS
        } else {
            1
        };
        Self::with_threads(engine, threads)
    }

    /// A batcher for `engine` with `threads` threads (at least one, at most
    /// one per shard): more batches in flight when a batch waits on a
    /// remote tier's round trips. Each thread serves the keys of its own
    /// shards (shard mod threads), so a key's jobs stay in arrival order —
    /// a claim queued behind its key's commit finds it completed — and
    /// threads never wait for each other's shard locks.
    ///
    /// # Panics
    /// When a thread cannot be spawned.
    #[must_use]
    pub fn with_threads(engine: Arc<Deduper>, threads: usize) -> Self {
        let n = threads.clamp(1, engine.shard_count().max(1));
        let mut jobs = Vec::with_capacity(n);
        let threads = (0..n)
            .map(|_| {
                let (tx, rx) = unbounded();
                jobs.push(tx);
                let worker = Arc::clone(&engine);
                std::thread::Builder::new()
                    .name("tiered-dedup-claims".to_owned())
                    .spawn(move || run(&worker, &rx))
                    .expect("spawning the claim batcher's thread")
            })
            .collect();
        ClaimBatcher {
            engine,
            jobs,
            threads,
        }
    }

    /// The engine the batcher claims in.
    #[must_use]
    pub fn engine(&self) -> &Arc<Deduper> {
        &self.engine
    }

    /// Queues `job` for the thread that serves `fp`'s shard.
    fn send(&self, fp: Fingerprint, job: Job) {
        let t = self.engine.shard_index(fp) % self.jobs.len();
        // The threads outlive every sender but ours; they only stop when we
        // drop ours.
        let _ = self.jobs[t].send(job);
    }

    /// Claims `request` (batched with other callers' claims).
    pub fn claim<K: Key>(&self, request: ClaimRequest<K>) -> Reply<Claim<Arc<Deduper>>> {
        self.claim_until(request, None)
    }

    /// Claims `request`, waiting up to `timeout` for an in-flight holder to
    /// commit (then `Completed`) or release (then `Acquired`) — see
    /// [`Deduper::claim_wait`]. Waiting claims look again in batches, at
    /// most every 20 ms, never one round trip per key.
    pub fn claim_wait<K: Key>(
        &self,
        request: ClaimRequest<K>,
        timeout: Duration,
    ) -> Reply<Claim<Arc<Deduper>>> {
        self.claim_until(request, Some(Instant::now() + timeout))
    }

    fn claim_until<K: Key>(
        &self,
        request: ClaimRequest<K>,
        deadline: Option<Instant>,
    ) -> Reply<Claim<Arc<Deduper>>> {
        let (answer, reply) = reply();
        let request = ClaimRequest {
            key: self.engine.fingerprint(&request.key),
            payload: request.payload,
            lease: request.lease,
            at: request.at,
        };
        self.send(
            request.key,
            Job::Claim {
                request,
                deadline,
                answer,
            },
        );
        reply
    }

    /// Commits `lease` with `result` (batched with other callers' commits).
    pub fn commit(
        &self,
        lease: SharedLease,
        result: Vec<u8>,
    ) -> Reply<Result<(), CommitError<Arc<Deduper>>>> {
        let (answer, reply) = reply();
        self.send(
            lease.fingerprint(),
            Job::Commit {
                lease,
                result,
                answer,
            },
        );
        reply
    }

    /// Releases `lease` (on the batcher's thread: a remote tier's round
    /// trip never blocks the caller).
    pub fn release(&self, lease: SharedLease) -> Reply<Result<(), LeaseLost>> {
        let (answer, reply) = reply();
        self.send(lease.fingerprint(), Job::Release { lease, answer });
        reply
    }
}

impl Drop for ClaimBatcher {
    fn drop(&mut self) {
        self.jobs.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for ClaimBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimBatcher")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// A claim taken from the queue: the request, its waiting deadline, where
/// its answer goes.
type QueuedClaim = (Request, Option<Instant>, Answer<Claim<Arc<Deduper>>>);

/// A claim waiting for an in-flight holder.
struct Waiting {
    request: Request,
    deadline: Instant,
    answer: Answer<Claim<Arc<Deduper>>>,
}

/// A batcher's thread: takes what is queued (up to [`MAX_BATCH`]), runs
/// its releases, then its commits and claims in one engine call (a commit
/// queued before a claim of the same key is applied first), and looks
/// again for its waiting claims.
fn run(engine: &Arc<Deduper>, jobs: &Receiver<Job>) {
    let mut waiting: Vec<Waiting> = Vec::new();
    let mut last_look = Instant::now();
    loop {
        let first = if waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        } else {
            match jobs.recv_timeout(WAIT_POLL) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    // Shutting down: waiting claims get their answer now.
                    look_again(engine, &mut waiting, true);
                    return;
                }
            }
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // One call for the whole drained batch (on a shared remote store,
        // one round trip per shard), not one per run of a kind: requests of
        // concurrent callers interleave claims and commits. Releases and
        // commits first: a claim queued behind the commit of its key then
        // finds it completed; jobs of one kind keep their order.
        let mut claims = Vec::new();
        let mut commits = Vec::new();
        let mut releases = Vec::new();
        for job in batch {
            match job {
                Job::Claim {
                    request,
                    deadline,
                    answer,
                } => claims.push((request, deadline, answer)),
                Job::Commit {
                    lease,
                    result,
                    answer,
                } => commits.push(((lease, result), answer)),
                Job::Release { lease, answer } => releases.push((lease, answer)),
            }
        }
        for (lease, answer) in releases {
            answer.send(lease.release());
        }
        let (pairs, commit_answers): (Vec<_>, Vec<_>) = commits.into_iter().unzip();
        run_batch(engine, pairs, commit_answers, claims, &mut waiting);
        if !waiting.is_empty() && last_look.elapsed() >= WAIT_POLL {
            look_again(engine, &mut waiting, false);
            last_look = Instant::now();
        }
    }
}

/// The commits of a batch, then its claims (on a shared remote store in
/// one call: one round trip per shard carries both); claims in progress
/// with a deadline ahead wait.
fn run_batch(
    engine: &Arc<Deduper>,
    commits: Vec<(SharedLease, Vec<u8>)>,
    commit_answers: Vec<Answer<Result<(), CommitError<Arc<Deduper>>>>>,
    claims: Vec<QueuedClaim>,
    waiting: &mut Vec<Waiting>,
) {
    let requests: Vec<Request> = claims.iter().map(|(r, ..)| *r).collect();
    let answers = if engine.shares_leases_remotely() {
        // One round trip per shard for both.
        let (done, answers) = engine.commit_and_claim_batch(commits, &requests);
        for (done, answer) in done.into_iter().zip(commit_answers) {
            answer.send(done);
        }
        answers
    } else {
        // Nothing shared: the commits answer before the claims run.
        if !commits.is_empty() {
            for (done, answer) in engine.commit_batch(commits).into_iter().zip(commit_answers) {
                answer.send(done);
            }
        }
        if requests.is_empty() {
            Vec::new()
        } else {
            engine.claim_batch_owned(&requests)
        }
    };
    let now = Instant::now();
    for ((request, deadline, answer), claim) in claims.into_iter().zip(answers) {
        match (claim, deadline) {
            (Claim::InProgress { .. }, Some(deadline)) if now < deadline => waiting.push(Waiting {
                request,
                deadline,
                answer,
            }),
            (claim, _) => answer.send(claim),
        }
    }
}

/// Claims every waiting request again in one batch; those still in
/// progress keep waiting until their deadline (or, at `last`, get their
/// answer now).
fn look_again(engine: &Arc<Deduper>, waiting: &mut Vec<Waiting>, last: bool) {
    let requests: Vec<Request> = waiting.iter().map(|w| w.request).collect();
    let answers = engine.claim_batch_owned(&requests);
    let now = Instant::now();
    let mut still = Vec::new();
    for (w, claim) in waiting.drain(..).zip(answers) {
        match claim {
            Claim::InProgress { .. } if !last && now < w.deadline => still.push(w),
            claim => w.answer.send(claim),
        }
    }
    *waiting = still;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_callers_share_batches_and_get_their_own_answers() {
        for threads in [1, 3] {
            callers_share_batches(threads);
        }
    }

    fn callers_share_batches(threads: usize) {
        let dedup = Arc::new(Deduper::builder().shards(4).build().unwrap());
        let batcher = Arc::new(ClaimBatcher::with_threads(Arc::clone(&dedup), threads));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let batcher = Arc::clone(&batcher);
                std::thread::spawn(move || {
                    let mut acquired = 0;
                    for i in 0..500u64 {
                        // Every key is claimed by two threads.
                        let key = (t / 2) * 1_000 + i;
                        match batcher.claim(ClaimRequest::new(key)).wait() {
                            Claim::Acquired(lease) => {
                                batcher
                                    .commit(lease, key.to_le_bytes().to_vec())
                                    .wait()
                                    .unwrap();
                                acquired += 1;
                            }
                            Claim::InProgress { .. } | Claim::Completed { .. } => {}
                            other => panic!("{other:?}"),
                        }
                    }
                    acquired
                })
            })
            .collect();
        let acquired: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(acquired, 4 * 500, "each key acquired once");
        let stats = dedup.stats();
        assert_eq!(stats.claims.commits, 2_000);
        // Concurrent callers shared batches: fewer per-shard groups than
        // claims.
        assert!(stats.batches < stats.claims.claims, "{stats:?}");
    }

    /// With several threads, a key's jobs stay in order: a claim queued
    /// right behind its key's commit (without waiting for the commit's
    /// reply) finds it completed, every time.
    #[test]
    fn a_claim_queued_behind_its_commit_finds_it_completed_on_any_thread() {
        let dedup = Arc::new(Deduper::builder().shards(8).build().unwrap());
        let batcher = ClaimBatcher::with_threads(Arc::clone(&dedup), 4);
        assert_eq!(batcher.threads.len(), 4);
        for key in 0..2_000u64 {
            let lease = batcher
                .claim(ClaimRequest::new(key))
                .wait()
                .into_lease()
                .unwrap();
            let committed = batcher.commit(lease, key.to_le_bytes().to_vec());
            let again = batcher.claim(ClaimRequest::new(key));
            match again.wait() {
                Claim::Completed { result, .. } => assert_eq!(&result[..], &key.to_le_bytes()),
                other => panic!("key {key}: {other:?}"),
            }
            committed.wait().unwrap();
        }
        // More threads than shards: one per shard.
        let small = Arc::new(Deduper::builder().shards(2).build().unwrap());
        assert_eq!(ClaimBatcher::with_threads(small, 8).threads.len(), 2);
    }

    /// A reply is a future: polled pending, woken when answered.
    #[test]
    fn a_reply_wakes_its_task() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;
        struct Count(AtomicUsize, std::thread::Thread);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
                self.1.unpark();
            }
        }
        let dedup = Arc::new(Deduper::builder().build().unwrap());
        let batcher = ClaimBatcher::new(dedup);
        let wakes = Arc::new(Count(AtomicUsize::new(0), std::thread::current()));
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut reply = batcher.claim(ClaimRequest::new("f"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let claim = loop {
            if let Poll::Ready(claim) = Pin::new(&mut reply).poll(&mut cx) {
                break claim;
            }
            assert!(Instant::now() < deadline, "never answered");
            std::thread::park_timeout(Duration::from_millis(100));
        };
        assert!(claim.is_acquired());
    }

    #[test]
    fn a_waiting_claim_gets_the_result_a_commit_stores() {
        let dedup = Arc::new(Deduper::builder().build().unwrap());
        let batcher = ClaimBatcher::new(Arc::clone(&dedup));
        let lease = batcher
            .claim(ClaimRequest::new("k"))
            .wait()
            .into_lease()
            .unwrap();
        let waiting = batcher.claim_wait(ClaimRequest::new("k"), Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(30));
        batcher.commit(lease, b"v".to_vec()).wait().unwrap();
        match waiting.wait() {
            Claim::Completed { result, .. } => assert_eq!(&result[..], b"v"),
            other => panic!("{other:?}"),
        }
        let held = batcher
            .claim(ClaimRequest::new("h"))
            .wait()
            .into_lease()
            .unwrap();
        let started = Instant::now();
        let answer = batcher
            .claim_wait(ClaimRequest::new("h"), Duration::from_millis(60))
            .wait();
        assert!(answer.is_in_progress());
        assert!(started.elapsed() >= Duration::from_millis(60));
        batcher.release(held).wait().unwrap();
        assert!(batcher.claim(ClaimRequest::new("h")).wait().is_acquired());
    }
}
