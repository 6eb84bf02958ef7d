//! `Pipeline`: the sharded worker pipeline for streams.
//!
//! ```text
//! producer ─ fingerprint, split by worker ─▶ bounded queue ─▶ worker w ─▶ shards s ≡ w (mod W)
//!    ▲                                                           │
//!    └──────────── verdicts, reassembled in submission order ◀───┘
//! ```
//!
//! Each shard is owned by exactly one worker (shard `s` by worker
//! `s mod workers`), so two copies of one key are always judged by the same
//! thread, in submission order, with no per-key lock. Producers hash on their
//! own threads and block when a worker's queue is full (back-pressure, not
//! unbounded memory). Each worker writes its shards' pending marks to the
//! exact tier after replying (off the verdict path) once they fill a batch or
//! wait the flush interval.
//!
//! **Memory bound.** At most `workers × queue_depth` messages of at most
//! `max_message_keys` keys wait in the queues; each producer has at most
//! `max_in_flight` batches not yet answered (answered batches wait, as
//! verdicts, until the caller receives them).
//!
//! **Shutdown.** [`Pipeline::shutdown`] (and dropping the pipeline) stops
//! accepting batches, lets every worker finish the messages already queued
//! (their verdicts are delivered to producers still holding them), writes
//! every pending mark, and joins the workers. A batch is taken whole or not
//! at all: one whose submit returned `Ok` is judged and answered in full,
//! even when the pipeline shuts down before its verdicts are received; one
//! refused with [`PipelineError::Closed`] left no trace in the engine (no
//! key recorded, no watermark moved), so it can be retried elsewhere, or in
//! the engine [`Pipeline::into_deduper`] hands back. Marks the exact tier
//! could not store by the end are reported as [`PipelineError::Unwritten`]
//! (a remote tier that is down; the memory tier stores every mark). A
//! worker that panics marks the pipeline failed: every waiting and later
//! call returns [`PipelineError::WorkerPanicked`], never hangs.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use crate::claims::{Claim, ClaimRequest, PayloadFingerprint};
use crate::engine::{group_by, Deduper, DeduperBuilder, Shard, ShardClaim};
use crate::error::{ConfigError, FlushError};
use crate::fingerprint::{Fingerprint, Key};
use crate::time::Timestamp;
use crate::verdict::Verdict;

/// How a pipeline call failed. Batches are handed back where they were not
/// processed, so the caller can retry them elsewhere.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PipelineError {
    /// The pipeline is shut down; nothing of this batch was processed: no
    /// key of it is recorded (a retry judges every key afresh) and, under
    /// event time, the watermark did not move.
    #[error("the pipeline is shut down")]
    Closed,
    /// A worker panicked; the pipeline stopped. The message is the panic's.
    /// A batch answered this way may have been judged in part: its keys
    /// may or may not be recorded.
    #[error("a pipeline worker panicked: {0}")]
    WorkerPanicked(String),
    /// Shutdown judged every queued batch, but the exact tier has not
    /// stored the marks of `marks` accepted keys (a remote tier that is
    /// down). The engine keeps them for a retry: call
    /// [`Pipeline::shutdown`] again, or [`Deduper::flush`] on the engine,
    /// until it answers `Ok`. Until then those keys are not recorded
    /// beyond this process. Never returned for the memory tier.
    #[error("{marks} accepted keys are not stored in the exact tier: {reason}; they are kept for a retry (shut down again, or flush the engine)")]
    Unwritten {
        /// Marks (accepted keys) the tier has not stored.
        marks: u64,
        /// The tier's error.
        reason: String,
    },
    /// `recv` was called with no batch in flight.
    #[error("no batch is in flight")]
    NothingInFlight,
    /// The oldest batch in flight is of the other kind: claims
    /// ([`Producer::submit_claims`]) are received with
    /// [`Producer::recv_claims`], checks with [`Producer::recv`].
    #[error("the oldest batch in flight holds {0}: receive it with the matching call")]
    OtherKind(&'static str),
    /// [`Pipeline::into_deduper`] while producers of the pipeline exist.
    #[error("producers of this pipeline still exist; drop them before taking the engine back")]
    ProducersAlive,
}

/// Why [`Pipeline::into_deduper`] did not simply hand the engine back: the
/// error, and the engine where it can still be had (like
/// `std::io::IntoInnerError`, so that marks a remote tier could not store
/// are not dropped with it).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct IntoDeduperError {
    error: PipelineError,
    deduper: Option<Box<Deduper>>,
}

impl IntoDeduperError {
    /// What went wrong.
    #[must_use]
    pub fn error(&self) -> &PipelineError {
        &self.error
    }

    /// The engine, shut down, when it could be taken back
    /// ([`PipelineError::Unwritten`], [`PipelineError::WorkerPanicked`]);
    /// `None` while producers hold it.
    #[must_use]
    pub fn into_deduper(self) -> Option<Deduper> {
        self.deduper.map(|d| *d)
    }
}

/// The tier's error of a failed forced flush.
fn flush_reason(e: &FlushError) -> String {
    match e {
        FlushError::Unwritten { source, .. } => source.to_string(),
    }
}

/// The times of the keys of one message.
enum Times {
    /// Processing time: one clock reading for the whole batch (under event
    /// time without timestamps, the watermark).
    Processing(Timestamp),
    /// Event time: one timestamp per key.
    Event(Vec<Timestamp>),
}

/// Part of one submitted batch, for one worker.
struct Job {
    batch: u64,
    fps: Vec<Fingerprint>,
    /// Position of each key in the submitted batch.
    positions: Vec<u32>,
    times: Times,
    /// `Some`: claims (each one's payload and lease), not checks.
    claims: Option<Vec<ClaimSpec>>,
    reply: Sender<Reply>,
}

/// A claim's payload fingerprint and lease in nanoseconds.
type ClaimSpec = (Option<PayloadFingerprint>, u64);

enum Message {
    Work(Job),
    /// Finish what is queued, flush, exit.
    Stop,
}

struct Reply {
    batch: u64,
    positions: Vec<u32>,
    verdicts: Vec<Verdict>,
    /// A claim job's answers (`verdicts` is then empty).
    claims: Vec<Option<ShardClaim>>,
}

/// What workers and producers share.
struct Core {
    deduper: Deduper,
    workers: usize,
    max_message_keys: usize,
    max_in_flight: usize,
    /// Taken shared by a producer while it checks `closed` and enqueues
    /// every part of one batch, and exclusively by shutdown to set
    /// `closed`: so a batch's parts are either all queued before the
    /// workers' `Stop` or none is.
    gate: RwLock<()>,
    closed: AtomicBool,
    panicked: Mutex<Option<String>>,
    /// Marks left unwritten by the workers' last flush: their count and
    /// the first error.
    unwritten: Mutex<Option<(u64, String)>>,
    /// Workers still running.
    alive: AtomicUsize,
}

impl Core {
    fn failure(&self) -> Option<PipelineError> {
        if let Some(msg) = self.panic_message() {
            return Some(PipelineError::WorkerPanicked(msg));
        }
        self.closed
            .load(Ordering::Acquire)
            .then_some(PipelineError::Closed)
    }

    fn panic_message(&self) -> Option<String> {
        self.panicked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds the marks a forced flush left unwritten to the report.
    fn note_unwritten(&self, e: &FlushError) {
        let mut unwritten = self
            .unwritten
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &mut *unwritten {
            Some((marks, _)) => *marks += e.unwritten(),
            None => *unwritten = Some((e.unwritten(), flush_reason(e))),
        }
    }

    fn worker_of(&self, fp: Fingerprint) -> usize {
        self.deduper.shard_index(fp) % self.workers
    }
}

/// Configures a [`Pipeline`].
#[derive(Debug)]
#[must_use]
pub struct PipelineBuilder {
    deduper: EngineSource,
    workers: Option<usize>,
    queue_depth: usize,
    max_message_keys: usize,
    max_in_flight: usize,
}

/// The engine a pipeline will run: to be built, or given ready (restored
/// from a snapshot, or taken back from another pipeline).
#[derive(Debug)]
enum EngineSource {
    Builder(Box<DeduperBuilder>),
    Ready(Box<Deduper>),
}

impl PipelineBuilder {
    /// Worker threads (at most the shard count). Default: available cores.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Messages each worker's queue holds before producers block.
    /// Default: 4.
    pub fn queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth;
        self
    }

    /// Largest number of keys sent to a worker in one message; larger
    /// batches are split. Default: 4096.
    pub fn max_message_keys(mut self, keys: usize) -> Self {
        self.max_message_keys = keys;
        self
    }

    /// Batches one producer may have submitted whose verdicts are not all
    /// in yet; a further `submit` waits for answers first. Answered batches
    /// wait for [`Producer::recv`] without counting. Default: 16.
    pub fn max_in_flight(mut self, batches: usize) -> Self {
        self.max_in_flight = batches;
        self
    }

    /// Starts the workers.
    ///
    /// # Errors
    /// [`ConfigError`] from the engine's configuration, or
    /// [`ConfigError::ZeroWorkers`] for zero workers, queue depth, message
    /// size or in-flight batches.
    pub fn build(self) -> Result<Pipeline, ConfigError> {
        if self.workers == Some(0)
            || self.queue_depth == 0
            || self.max_message_keys == 0
            || self.max_in_flight == 0
        {
            return Err(ConfigError::ZeroWorkers);
        }
        let deduper = match self.deduper {
            EngineSource::Builder(b) => b.build()?,
            EngineSource::Ready(d) => *d,
        };
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .min(deduper.shard_count());
        let core = Arc::new(Core {
            deduper,
            workers,
            max_message_keys: self.max_message_keys,
            max_in_flight: self.max_in_flight,
            gate: RwLock::new(()),
            closed: AtomicBool::new(false),
            panicked: Mutex::new(None),
            unwritten: Mutex::new(None),
            alive: AtomicUsize::new(workers),
        });
        let mut senders = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = bounded(self.queue_depth);
            senders.push(tx);
            let core = Arc::clone(&core);
            let handle = std::thread::Builder::new()
                .name(format!("tiered-dedup-worker-{w}"))
                .spawn(move || run_worker(&core, w, &rx))
                .expect("spawning a pipeline worker thread");
            handles.push(handle);
        }
        Ok(Pipeline {
            core,
            senders,
            handles: Mutex::new(handles),
            queue_depth: self.queue_depth,
        })
    }
}

/// The sharded worker pipeline. `Send + Sync`: share it, and give every
/// producing thread its own [`Producer`] (its own ordered verdict stream).
pub struct Pipeline {
    core: Arc<Core>,
    senders: Vec<Sender<Message>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    queue_depth: usize,
}

impl Pipeline {
    /// A builder around the engine `deduper` describes.
    pub fn builder(deduper: DeduperBuilder) -> PipelineBuilder {
        Self::builder_for(EngineSource::Builder(Box::new(deduper)))
    }

    /// A builder around an engine that already exists: one restored from a
    /// snapshot (so a restarted stream processor keeps its window), or one
    /// taken back from another pipeline with [`Pipeline::into_deduper`].
    /// Its shards, window and exact tier are kept as they are.
    ///
    /// ```
    /// use tiered_dedup::{Deduper, Pipeline, Verdict};
    ///
    /// let first = Pipeline::builder(Deduper::builder()).workers(2).build()?;
    /// assert_eq!(first.process(&["a", "b"])?, [Verdict::New, Verdict::New]);
    /// let mut saved = Vec::new();
    /// first.shutdown()?;
    /// first.deduper().snapshot(&mut saved)?;
    ///
    /// // After a restart: the same configuration, restored, in a pipeline.
    /// let engine = Deduper::builder().restore(saved.as_slice())?;
    /// let second = Pipeline::from_deduper(engine).workers(2).build()?;
    /// assert!(second.process(&["a", "c"])?[0].is_duplicate());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_deduper(deduper: Deduper) -> PipelineBuilder {
        Self::builder_for(EngineSource::Ready(Box::new(deduper)))
    }

    fn builder_for(deduper: EngineSource) -> PipelineBuilder {
        PipelineBuilder {
            deduper,
            workers: None,
            queue_depth: 4,
            max_message_keys: 4096,
            max_in_flight: 16,
        }
    }

    /// A producer: submits batches and receives their verdicts in order.
    pub fn producer(&self) -> Producer {
        let (reply_tx, reply_rx) = unbounded();
        Producer {
            core: Arc::clone(&self.core),
            senders: self.senders.clone(),
            reply_tx,
            reply_rx,
            next_batch: 0,
            in_flight: VecDeque::new(),
            unanswered: 0,
        }
    }

    /// Verdicts for `keys` in order, like [`Deduper::check_batch`], through
    /// the workers.
    ///
    /// # Errors
    /// [`PipelineError::Closed`] after shutdown, and
    /// [`PipelineError::WorkerPanicked`] when a worker died.
    pub fn process<K: Key>(&self, keys: &[K]) -> Result<Vec<Verdict>, PipelineError> {
        let mut producer = self.producer();
        producer.submit(keys)?;
        producer.recv()
    }

    /// The engine (for stats, snapshots, single checks).
    pub fn deduper(&self) -> &Deduper {
        &self.core.deduper
    }

    /// Shuts the pipeline down (see [`Pipeline::shutdown`]: every queued
    /// batch answered, every mark written) and hands back the engine, for a
    /// snapshot or another pipeline.
    ///
    /// # Errors
    /// [`IntoDeduperError`]; its [`IntoDeduperError::error`] says why:
    /// - [`PipelineError::Unwritten`]: marks the exact tier could not store.
    ///   The engine comes back with the error
    ///   ([`IntoDeduperError::into_deduper`]) and still holds them: its
    ///   [`Deduper::flush`] retries them.
    /// - [`PipelineError::WorkerPanicked`]: a worker had panicked (the
    ///   engine comes back too, unless producers still hold it).
    /// - [`PipelineError::ProducersAlive`]: a [`Producer`] of this pipeline
    ///   still exists; drop them first (the engine then lives until the last
    ///   of them is dropped, and is not handed back). Call
    ///   [`Pipeline::shutdown`] first to learn of unwritten marks then.
    pub fn into_deduper(self) -> Result<Deduper, IntoDeduperError> {
        let result = self.shutdown();
        let core = Arc::clone(&self.core);
        drop(self);
        match (Arc::try_unwrap(core), result) {
            (Ok(core), Ok(())) => Ok(core.deduper),
            (Ok(core), Err(error)) => Err(IntoDeduperError {
                error,
                deduper: Some(Box::new(core.deduper)),
            }),
            (Err(_), Err(error @ PipelineError::WorkerPanicked(_))) => Err(IntoDeduperError {
                error,
                deduper: None,
            }),
            (Err(_), _) => Err(IntoDeduperError {
                error: PipelineError::ProducersAlive,
                deduper: None,
            }),
        }
    }

    /// Messages waiting in the workers' queues now.
    #[must_use]
    pub fn queued_messages(&self) -> usize {
        self.senders.iter().map(Sender::len).sum()
    }

    /// The most messages the queues hold: workers × queue depth.
    #[must_use]
    pub fn queue_bound(&self) -> usize {
        self.senders.len() * self.queue_depth
    }

    /// Number of worker threads.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.core.workers
    }

    /// Stops accepting batches, lets the workers finish every queued
    /// message, writes every pending mark, and joins the workers. Every
    /// batch whose submit returned `Ok` is answered in full; every later
    /// one gets [`PipelineError::Closed`] and leaves no trace.
    ///
    /// Called again (after the workers are gone), it writes the marks still
    /// unwritten (a forced [`Deduper::flush`]) and reports what is left.
    ///
    /// # Errors
    /// [`PipelineError::WorkerPanicked`] when a worker had panicked;
    /// [`PipelineError::Unwritten`] when the exact tier has not stored the
    /// marks of some accepted keys (how many, and the tier's error).
    pub fn shutdown(&self) -> Result<(), PipelineError> {
        let stopped_now = self.stop();
        if let Some(msg) = self.core.panic_message() {
            return Err(PipelineError::WorkerPanicked(msg));
        }
        let unwritten = if stopped_now {
            // What the workers' last forced flush left.
            self.core
                .unwritten
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        } else {
            self.core
                .deduper
                .flush()
                .err()
                .map(|e| (e.unwritten(), flush_reason(&e)))
        };
        match unwritten {
            None => Ok(()),
            Some((marks, reason)) => Err(PipelineError::Unwritten { marks, reason }),
        }
    }

    /// Closes the gate, sends every worker `Stop` (after the messages
    /// already queued) and joins them. False when they were stopped
    /// already.
    fn stop(&self) -> bool {
        {
            // No producer is between its check of `closed` and its last
            // part's send while this is held: every batch is queued whole
            // before the `Stop`s below, or refused whole.
            let _gate = self
                .core
                .gate
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            self.core.closed.store(true, Ordering::Release);
        }
        let handles =
            std::mem::take(&mut *self.handles.lock().unwrap_or_else(PoisonError::into_inner));
        if handles.is_empty() {
            return false;
        }
        for tx in &self.senders {
            // A worker that died no longer receives: nothing to stop.
            let _ = tx.send(Message::Stop);
        }
        for h in handles {
            let _ = h.join();
        }
        true
    }
}

impl Drop for Pipeline {
    /// Like [`Pipeline::shutdown`], without its report: queued messages are
    /// finished and every pending mark is written (or kept by the tier)
    /// before the workers exit. Call `shutdown` to learn of marks left
    /// unwritten.
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("workers", &self.core.workers)
            .field("queue_depth", &self.queue_depth)
            .field("deduper", &self.core.deduper)
            .finish_non_exhaustive()
    }
}

/// A batch submitted and not yet fully answered.
struct InFlight {
    batch: u64,
    /// A check batch's verdicts; for a claim batch, `Late` marks the late
    /// claims (the others are placeholders).
    verdicts: Vec<Verdict>,
    /// A claim batch's answers.
    claims: Option<Vec<Option<ShardClaim>>>,
    parts_left: usize,
}

/// One producer's handle: submits batches and receives each batch's
/// verdicts in submission order. `Send`, not shared: one per thread.
pub struct Producer {
    core: Arc<Core>,
    senders: Vec<Sender<Message>>,
    reply_tx: Sender<Reply>,
    reply_rx: Receiver<Reply>,
    next_batch: u64,
    in_flight: VecDeque<InFlight>,
    /// Batches in `in_flight` still waiting for a reply.
    unanswered: usize,
}

impl Producer {
    /// Submits a batch (processing time: one clock reading for the batch).
    /// Blocks while the workers' queues are full, or while this producer
    /// has `max_in_flight` batches unanswered.
    ///
    /// # Errors
    /// [`PipelineError::Closed`]: the pipeline is shut down and nothing of
    /// the batch was processed or recorded. [`PipelineError::WorkerPanicked`]:
    /// a worker died; the batch may have been judged in part.
    pub fn submit<K: Key>(&mut self, keys: &[K]) -> Result<(), PipelineError> {
        let fps: Vec<Fingerprint> = keys
            .iter()
            .map(|k| self.core.deduper.fingerprint(k))
            .collect();
        let n = fps.len();
        self.dispatch(fps, None, |d| {
            // Event time without timestamps: the watermark, like `check`.
            let reading = d.clock_reading().unwrap_or_else(|| d.watermark());
            (vec![Verdict::New; n], None, Times::Processing(reading))
        })
    }

    /// Submits a batch of claims (see [`crate::Claim`]): each shard's
    /// claims are made by its worker, in one lock (and on a remote tier one
    /// round trip) per shard. Receive the answers with
    /// [`Producer::recv_claims`]; acquired leases commit or release through
    /// the engine directly ([`crate::Lease::commit`], [`Deduper::commit_batch`]).
    /// Event time: a claim's `at` (else the watermark); late claims are
    /// answered [`Claim::Late`] without reaching a worker.
    ///
    /// # Errors
    /// As [`Producer::submit`].
    pub fn submit_claims<K: Key>(
        &mut self,
        requests: &[ClaimRequest<K>],
    ) -> Result<(), PipelineError> {
        let fps: Vec<Fingerprint> = requests
            .iter()
            .map(|r| self.core.deduper.fingerprint(&r.key))
            .collect();
        let lease = self.core.deduper.lease_nanos();
        let specs: Vec<ClaimSpec> = requests
            .iter()
            .map(|r| {
                (
                    r.payload,
                    r.lease.map_or(lease, crate::time::duration_nanos),
                )
            })
            .collect();
        self.dispatch(fps, Some(specs), |d| match d.clock_reading() {
            Some(reading) => (
                vec![Verdict::New; requests.len()],
                None,
                Times::Processing(reading),
            ),
            None => {
                let wm = d.watermark();
                let times: Vec<Timestamp> = requests.iter().map(|r| r.at.unwrap_or(wm)).collect();
                let mut verdicts = Vec::with_capacity(times.len());
                let late = d.screen_late(times.iter().copied(), &mut verdicts);
                (verdicts, Some(late), Times::Event(times))
            }
        })
    }

    /// Submits a batch of `(key, event time)` pairs; late events are
    /// answered [`Verdict::Late`] without reaching a worker.
    ///
    /// # Errors
    /// As [`Producer::submit`].
    pub fn submit_at<K: Key>(&mut self, keys: &[(K, Timestamp)]) -> Result<(), PipelineError> {
        let fps: Vec<Fingerprint> = keys
            .iter()
            .map(|(k, _)| self.core.deduper.fingerprint(k))
            .collect();
        self.dispatch(fps, None, |d| {
            // Lateness is decided (and the watermark moved) only once the
            // batch is sure to be queued.
            let mut verdicts = Vec::with_capacity(keys.len());
            let late = d.screen_late(keys.iter().map(|(_, t)| *t), &mut verdicts);
            let times: Vec<Timestamp> = keys.iter().map(|(_, t)| *t).collect();
            (verdicts, Some(late), Times::Event(times))
        })
    }

    /// Queues every part of one batch, or none: `prepare` (which may move
    /// the watermark) runs and the parts are sent under the pipeline's
    /// gate, after a check that it is open.
    fn dispatch(
        &mut self,
        fps: Vec<Fingerprint>,
        claims: Option<Vec<ClaimSpec>>,
        prepare: impl FnOnce(&Deduper) -> (Vec<Verdict>, Option<Vec<bool>>, Times),
    ) -> Result<(), PipelineError> {
        if let Some(e) = self.core.failure() {
            return Err(e);
        }
        while self.unanswered >= self.core.max_in_flight {
            self.collect_one()?;
        }
        let core = Arc::clone(&self.core);
        // Held until the last part is sent (a send may block on a full
        // queue: the workers keep draining, since their `Stop` waits for
        // this gate).
        let _gate = core.gate.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = core.failure() {
            return Err(e);
        }
        let (verdicts, skip, times) = prepare(&core.deduper);
        let batch = self.next_batch;
        // Split by worker, keeping input order within each worker (so the
        // copies of one key reach their shard in order), then by message
        // size.
        let (starts, order) = group_by(fps.len(), core.workers, |i| core.worker_of(fps[i]));
        let mut jobs = Vec::new();
        for w in 0..core.workers {
            let mine = &order[starts[w] as usize..starts[w + 1] as usize];
            let mine: Vec<u32> = match &skip {
                Some(skip) => mine
                    .iter()
                    .copied()
                    .filter(|&i| !skip[i as usize])
                    .collect(),
                None => mine.to_vec(),
            };
            for chunk in mine.chunks(core.max_message_keys) {
                let job_times = match &times {
                    Times::Processing(r) => Times::Processing(*r),
                    Times::Event(ts) => {
                        Times::Event(chunk.iter().map(|&i| ts[i as usize]).collect())
                    }
                };
                jobs.push((
                    w,
                    Job {
                        batch,
                        fps: chunk.iter().map(|&i| fps[i as usize]).collect(),
                        positions: chunk.to_vec(),
                        times: job_times,
                        claims: claims
                            .as_ref()
                            .map(|specs| chunk.iter().map(|&i| specs[i as usize]).collect()),
                        reply: self.reply_tx.clone(),
                    },
                ));
            }
        }
        self.in_flight.push_back(InFlight {
            batch,
            claims: claims.as_ref().map(|specs| vec![None; specs.len()]),
            verdicts,
            parts_left: jobs.len(),
        });
        if !jobs.is_empty() {
            self.unanswered += 1;
        }
        self.next_batch += 1;
        for (w, job) in jobs {
            if self.senders[w].send(Message::Work(job)).is_err() {
                // With the gate open, only a worker that panicked stops
                // receiving (it records the panic first). Parts already
                // sent may have been judged; this batch is abandoned.
                self.in_flight.pop_back();
                self.unanswered -= 1;
                return Err(core.failure().unwrap_or(PipelineError::Closed));
            }
        }
        Ok(())
    }

    /// Waits for one reply and files it.
    fn collect_one(&mut self) -> Result<(), PipelineError> {
        loop {
            match self.reply_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(reply) => {
                    self.file(reply);
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Not a hang: a dead worker's replies never come.
                    if let Some(PipelineError::WorkerPanicked(msg)) = self.core.failure() {
                        return Err(PipelineError::WorkerPanicked(msg));
                    }
                    if self.core.alive.load(Ordering::Acquire) == 0 {
                        // Every worker finished its queue and exited: what
                        // they answered is in the channel already (a batch
                        // queued whole before their `Stop` is answered
                        // whole, so this finds its replies).
                        return match self.reply_rx.try_recv() {
                            Ok(reply) => {
                                self.file(reply);
                                Ok(())
                            }
                            Err(_) => Err(PipelineError::Closed),
                        };
                    }
                }
                Err(RecvTimeoutError::Disconnected) => unreachable!("the producer holds a sender"),
            }
        }
    }

    fn file(&mut self, reply: Reply) {
        // A reply to an abandoned batch (its submit failed half-way) has no
        // entry: drop it.
        let Some(entry) = self.in_flight.iter_mut().find(|b| b.batch == reply.batch) else {
            return;
        };
        match &mut entry.claims {
            Some(claims) => {
                for (p, c) in reply.positions.into_iter().zip(reply.claims) {
                    claims[p as usize] = c;
                }
            }
            None => {
                for (p, v) in reply.positions.into_iter().zip(reply.verdicts) {
                    entry.verdicts[p as usize] = v;
                }
            }
        }
        entry.parts_left -= 1;
        if entry.parts_left == 0 {
            self.unanswered -= 1;
        }
    }

    /// The verdicts of the oldest batch in flight, in its key order; blocks
    /// until they are all in.
    ///
    /// # Errors
    /// [`PipelineError::NothingInFlight`] when no batch is in flight;
    /// [`PipelineError::WorkerPanicked`] when a worker died;
    /// [`PipelineError::Closed`] only for a batch that was never queued
    /// (every batch whose submit returned `Ok` is answered in full, even
    /// across a shutdown).
    pub fn recv(&mut self) -> Result<Vec<Verdict>, PipelineError> {
        let entry = self.recv_front(false)?;
        Ok(entry.verdicts)
    }

    /// The answers of the oldest batch in flight, a batch of claims
    /// ([`Producer::submit_claims`]), in its request order; blocks until
    /// they are all in. The leases hold the pipeline's engine.
    ///
    /// # Errors
    /// As [`Producer::recv`]; [`PipelineError::OtherKind`] when the oldest
    /// batch holds checks.
    pub fn recv_claims(&mut self) -> Result<Vec<Claim<PipelineEngine>>, PipelineError> {
        let entry = self.recv_front(true)?;
        let engine = PipelineEngine {
            core: Arc::clone(&self.core),
        };
        let claims = entry.claims.expect("a claim batch");
        Ok(entry
            .verdicts
            .into_iter()
            .zip(claims)
            .map(|(verdict, claim)| match (verdict, claim) {
                (Verdict::Late { watermark }, _) => Claim::Late { watermark },
                (_, Some(claim)) => claim.wrap(&engine),
                (_, None) => Claim::Unavailable,
            })
            .collect())
    }

    /// The oldest batch in flight once all in, if of the asked kind.
    fn recv_front(&mut self, claims: bool) -> Result<InFlight, PipelineError> {
        loop {
            let Some(front) = self.in_flight.front() else {
                return Err(PipelineError::NothingInFlight);
            };
            if front.claims.is_some() != claims {
                return Err(PipelineError::OtherKind(if claims {
                    "checks"
                } else {
                    "claims"
                }));
            }
            if front.parts_left == 0 {
                return Ok(self.in_flight.pop_front().expect("front exists"));
            }
            self.collect_one()?;
        }
    }

    /// Submits `keys` and returns their verdicts (earlier batches in flight
    /// stay queued for [`Producer::recv`]).
    ///
    /// # Errors
    /// As [`Producer::submit`] and [`Producer::recv`].
    pub fn process<K: Key>(&mut self, keys: &[K]) -> Result<Vec<Verdict>, PipelineError> {
        self.submit(keys)?;
        let batch = self.next_batch - 1;
        loop {
            let back = self.in_flight.back().expect("just submitted");
            if back.batch == batch && back.parts_left == 0 {
                return Ok(self.in_flight.pop_back().expect("just checked").verdicts);
            }
            self.collect_one()?;
        }
    }

    /// Batches submitted and not yet received.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Batches submitted whose verdicts are not all in yet (at most the
    /// pipeline's `max_in_flight`).
    #[must_use]
    pub fn unanswered(&self) -> usize {
        self.unanswered
    }
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

/// A worker's loop: judge queued messages for its shards, reply, then write
/// its shards' due marks; on `Stop`, finish the queue, flush and exit.
fn run_worker(core: &Core, w: usize, rx: &Receiver<Message>) {
    let my_shards: Vec<usize> = (w..core.deduper.shard_count())
        .step_by(core.workers)
        .collect();
    let flush_every = core.deduper.flush_interval();
    let result = catch_unwind(AssertUnwindSafe(|| {
        loop {
            match rx.recv_timeout(flush_every) {
                Ok(Message::Work(job)) => {
                    process_job(core, job);
                    flush_due(core, &my_shards, false);
                }
                Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => flush_due(core, &my_shards, false),
            }
        }
        // Finish every message already queued, then write every mark.
        while let Ok(message) = rx.try_recv() {
            if let Message::Work(job) = message {
                process_job(core, job);
            }
        }
        flush_due(core, &my_shards, true);
    }));
    if let Err(payload) = result {
        let msg = payload
            .downcast_ref::<&str>()
            .map(ToString::to_string)
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        // Recorded before `alive` drops (and before the queue's receiver
        // does): a producer that finds the worker gone finds the panic.
        *core.panicked.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(format!("worker {w}: {msg}"));
    }
    core.alive.fetch_sub(1, Ordering::AcqRel);
}

/// Writes the due marks of `shards` (`force`: all of them, waiting until
/// the tier has them). Marks a remote tier could not store stay kept (and
/// counted) by it for the next flush; a forced flush that leaves some
/// unwritten is reported by [`Pipeline::shutdown`].
fn flush_due(core: &Core, shards: &[usize], force: bool) {
    for &s in shards {
        if let Err(e) = core.deduper.flush_shard(s, force) {
            core.note_unwritten(&e);
        }
    }
}

fn process_job(core: &Core, job: Job) {
    let Job {
        batch,
        fps,
        positions,
        times,
        claims,
        reply,
    } = job;
    let d = &core.deduper;
    let (starts, order) = group_by(fps.len(), d.shard_count(), |i| d.shard_index(fps[i]));
    let time = |shard: &Shard, i: usize| -> Option<Timestamp> {
        Some(match &times {
            Times::Processing(r) => shard.processing_time(*r),
            Times::Event(ts) => ts[i],
        })
    };
    let groups = (0..d.shard_count())
        .filter(|s| starts[s + 1] > starts[*s])
        .map(|s| (s, &order[starts[s] as usize..starts[s + 1] as usize]));
    // What the answers wait for to be durable (a durable engine).
    let mut need = 0;
    let (verdicts, answers) = match claims {
        None => {
            let mut verdicts = vec![Verdict::New; fps.len()];
            for (s, group) in groups {
                need = need.max(d.check_group(s, &fps, group, &time, &mut verdicts));
            }
            (verdicts, Vec::new())
        }
        Some(specs) => {
            let mut answers = vec![None; fps.len()];
            for (s, group) in groups {
                need = need.max(d.claim_group(s, &fps, group, &time, &specs, &mut answers));
            }
            (Vec::new(), answers)
        }
    };
    let mut answer = Reply {
        batch,
        positions,
        verdicts,
        claims: answers,
    };
    let Some(durable) = d.durable() else {
        // The producer may be gone; its answers are then nobody's.
        let _ = reply.send(answer);
        return;
    };
    // Answered once durable: `os` on this thread, `sync` by the committer
    // after the group's sync (this worker goes on meanwhile).
    durable.after_durable(
        need,
        Box::new(move |result| {
            if result.is_err() {
                answer.verdicts.fill(Verdict::Unavailable);
                answer.claims.fill(Some(ShardClaim::Unavailable));
            }
            let _ = reply.send(answer);
        }),
    );
    d.checkpoint_if_due();
}

/// The pipeline's engine, as the leases of its claims hold it
/// ([`Producer::recv_claims`]): a lease commits or releases through it, and
/// keeps the engine alive while it exists.
#[derive(Clone)]
pub struct PipelineEngine {
    core: Arc<Core>,
}

impl AsRef<Deduper> for PipelineEngine {
    fn as_ref(&self) -> &Deduper {
        &self.core.deduper
    }
}

impl std::fmt::Debug for PipelineEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PipelineEngine")
            .field(&self.core.deduper)
            .finish()
    }
}
