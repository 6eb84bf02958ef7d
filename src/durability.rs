//! Durability of the embedded tier: an append-only log beside a checkpoint,
//! so that no key whose verdict was returned is lost to a crash.
//!
//! ```text
//! DIR/engine.lock            one engine per directory (flock)
//! DIR/checkpoint             a snapshot, the log position it covers per shard, the last note
//! DIR/wal-<epoch>.log        log segments: checksummed frames of per-shard records
//! ```
//!
//! - **Writing.** Under its lock a shard appends what it changes (a key
//!   accepted, a claim acquired, committed with its result, released,
//!   extended, a key forgotten) to its own buffer; before the lock is let
//!   go the buffer becomes one *record* in the log's pending buffer, which
//!   numbers it (its sequence number), and the shard notes that number.
//!   Whatever a call answers from a shard — a `New`, and also a `Duplicate`
//!   that another thread's unwritten record caused — waits for the
//!   shard's records up to that number: [`Durability::Os`] writes the
//!   pending buffer (one `write`, one frame) before the verdicts are
//!   returned; [`Durability::Sync`] waits for the committer thread, which
//!   writes and `fdatasync`s the pending buffer once per group-commit
//!   interval.
//! - **Checkpoints** write a snapshot and truncate the log. The log is
//!   first cut into a new segment; then each shard, under its lock, seals
//!   its buffer, notes the next sequence number (its *cut*) and is written.
//!   The file is synced and renamed over the last checkpoint; then the
//!   segments before the new one are deleted. A crash at any point leaves
//!   either the old checkpoint and every segment since it, or the new one
//!   and the segments it needs.
//! - **Recovery** ([`crate::DeduperBuilder::open`]): the checkpoint, then
//!   every record of each shard at or after that shard's cut, in order. A
//!   frame that is torn (short, or failing its checksum) with no whole frame
//!   after it is cut away; a damaged frame followed by a whole one is
//!   corruption and refused ([`DurabilityError::Corrupt`]): cutting there
//!   would drop acknowledged keys.
//! - **Failure** (a full disk, an I/O error): fail-stop. The log writes
//!   nothing after a failed write or sync; the call that met it and every
//!   later one answer [`crate::Verdict::Unavailable`] (claims
//!   [`crate::Claim::Unavailable`], commits [`crate::CommitError::Unavailable`],
//!   explicit calls [`DurabilityError::Failed`]), and no checkpoint is taken
//!   (it would make keys durable whose verdicts were not returned).
//!   Reopening the directory recovers exactly what the log holds; the last
//!   checkpoint is never touched by a failure.

mod checkpoint;
mod log;
pub(crate) mod ops;
mod recover;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{Deduper, Shard};
use crate::error::{ConfigError, SnapshotError};
use crate::fingerprint::Fingerprint;

pub(crate) use self::log::Deferred;
use self::log::{Log, NOTE};
pub(crate) use ops::ShardLog;

/// How far the engine's state survives a crash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Nothing is logged: the state lives in memory (and in the snapshots
    /// and checkpoints the caller takes). The default.
    #[default]
    None,
    /// Each batch's changes are written to the log (a `write` to the file)
    /// before its verdicts are returned: a killed process loses no key
    /// whose verdict was returned. A power loss or kernel crash may lose
    /// what the kernel had not yet written back.
    Os,
    /// Changes are written and `fdatasync`ed in groups, once per
    /// `group_commit` interval, and a batch's verdicts are returned once
    /// its group is on disk: a power loss loses no key whose verdict was
    /// returned. A call waits up to the interval plus one sync; keep enough
    /// keys in flight (the pipeline, or batches from several threads) to
    /// fill a group.
    Sync {
        /// How often the committer writes and syncs (10 ms is a good start).
        group_commit: Duration,
    },
}

impl Durability {
    /// [`Durability::Sync`] with the given group-commit interval.
    #[must_use]
    pub fn sync(group_commit: Duration) -> Self {
        Durability::Sync { group_commit }
    }

    /// True for [`Durability::None`].
    #[must_use]
    pub fn is_none(self) -> bool {
        matches!(self, Durability::None)
    }

    /// True when a killed process loses no key whose verdict was returned
    /// ([`Durability::Os`] and [`Durability::Sync`]).
    #[must_use]
    pub fn survives_process_kill(self) -> bool {
        !self.is_none()
    }

    /// True when a power loss loses no key whose verdict was returned
    /// ([`Durability::Sync`]).
    #[must_use]
    pub fn survives_power_loss(self) -> bool {
        matches!(self, Durability::Sync { .. })
    }
}

/// When a durable engine takes checkpoints by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CheckpointPolicy {
    /// Taken by the calls that find one due (else only when asked).
    pub(crate) automatic: bool,
    /// Due once the log holds this many bytes, or as many as the last
    /// checkpoint if that is more.
    pub(crate) log_bytes: u64,
    /// Due once this long has passed since the last one.
    pub(crate) interval: Option<Duration>,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            automatic: true,
            log_bytes: 256 << 20,
            interval: Some(Duration::from_secs(600)),
        }
    }
}

/// Why a durable directory could not be opened, or a durable call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurabilityError {
    /// The configuration is invalid, or cannot be made durable.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A file or the directory could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// Another engine (in this process or another) has the directory open
    /// (after waiting up to 250 ms: a lock may outlive its engine by a
    /// moment while the process spawns a child).
    #[error("{}: in use by another engine (one engine per directory)", dir.display())]
    Busy {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory already holds state (an import needs an empty one).
    #[error("{}: already holds a checkpoint or a log: open it instead of importing into it", dir.display())]
    NotEmpty {
        /// The directory.
        dir: PathBuf,
    },
    /// The checkpoint was refused (truncated, corrupt, foreign, or taken
    /// with another configuration); nothing was loaded.
    #[error("{}: checkpoint refused: {source}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// Why.
        source: SnapshotError,
    },
    /// A log segment is damaged before its end (a torn tail is cut, not
    /// refused): cutting it there would drop records written after it.
    /// Nothing was loaded. Move the segment away (losing what it holds
    /// from `offset` on), or truncate it at `offset`, to open the rest.
    #[error("{}: corrupt at byte {offset}: {reason}; refusing to drop the records after it (truncate the file at that offset, or move it away, to open the directory without them)", path.display())]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A log segment was written by an engine of another configuration.
    #[error("{}: written by an engine of another configuration (namespace, window, lateness, mode, shards or sizing)", path.display())]
    Mismatch {
        /// The segment.
        path: PathBuf,
    },
    /// The log failed earlier (a full disk, an I/O error) and has stopped:
    /// the engine answers `Unavailable` until it is reopened. The message
    /// is the first error's.
    #[error("the durability log has stopped after an error ({0}); every call answers Unavailable: free the disk or fix the error, then reopen the directory")]
    Failed(String),
}

/// What [`crate::DeduperBuilder::open`] found and did.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Recovery {
    /// A checkpoint was loaded.
    pub checkpoint: bool,
    /// Log segments read.
    pub segments: usize,
    /// Records applied from the log (those a checkpoint already held are
    /// skipped).
    pub records: u64,
    /// Operations applied from those records.
    pub operations: u64,
    /// Bytes of a torn tail cut from the log (a write the crash interrupted:
    /// its verdicts were never returned).
    pub cut_bytes: u64,
    /// The last note ([`Deduper::note`]).
    pub note: Option<Arc<[u8]>>,
    /// Keys accepted (checked `New`, or committed) in the log after the last
    /// note, in log order. Exact when no checkpoint was taken between that
    /// note and the end (a checkpoint folds them into its snapshot): take
    /// checkpoints yourself at note boundaries
    /// ([`crate::DeduperBuilder::automatic_checkpoints`]`(false)`) if you
    /// rely on it.
    pub accepted_since_note: Vec<Fingerprint>,
    /// How long opening took.
    pub elapsed: Duration,
}

/// What a durable engine's log and checkpoints have done since it was
/// opened ([`Deduper::durability_stats`]).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct DurabilityStats {
    /// The mode.
    pub mode: Durability,
    /// Bytes of the log segments still needed (those since the last
    /// checkpoint).
    pub log_bytes: u64,
    /// Records written.
    pub records_written: u64,
    /// Frames written (one `write` each).
    pub frames_written: u64,
    /// Bytes written to the log.
    pub bytes_written: u64,
    /// `fdatasync`s of the log.
    pub syncs: u64,
    /// Checkpoints taken.
    pub checkpoints: u64,
    /// Checkpoints that failed (the previous one stays whole).
    pub checkpoint_failures: u64,
    /// Bytes of the last checkpoint file.
    pub checkpoint_bytes: u64,
    /// How long the last checkpoint took.
    pub last_checkpoint: Duration,
    /// The error of the last failed checkpoint.
    pub last_checkpoint_error: Option<String>,
    /// Set once the log has failed: every call answers `Unavailable`.
    pub failure: Option<String>,
}

/// When the last checkpoint was started (held while one writes its shards).
struct CheckpointState {
    at: Instant,
}

/// What checkpoints did (updated by the thread that finishes one).
#[derive(Default)]
struct CheckpointResults {
    bytes: u64,
    count: u64,
    failures: u64,
    took: Duration,
    error: Option<String>,
}

impl CheckpointResults {
    fn record(&mut self, result: &Result<u64, DurabilityError>, took: Duration) {
        match result {
            Ok(bytes) => {
                self.count += 1;
                self.bytes = *bytes;
                self.took = took;
                self.error = None;
                crate::trace::event!(info, bytes, "checkpoint taken");
            }
            Err(e) => {
                self.failures += 1;
                self.error = Some(e.to_string());
                crate::trace::event!(warn, error = %e, "checkpoint failed");
            }
        }
    }
}

/// The durable half of an engine.
pub(crate) struct Durable {
    log: Arc<Log>,
    dir: PathBuf,
    /// Held for the engine's life: one engine per directory.
    _lock: Option<File>,
    policy: CheckpointPolicy,
    /// One checkpoint at a time; notes wait for its pass over the shards
    /// (its cut of the note).
    checkpointing: Mutex<CheckpointState>,
    /// An automatic checkpoint's last steps (sync, rename, deleting the
    /// segments it covers), on a thread of its own: they wait for the disk,
    /// not for the shards.
    finishing: Mutex<Option<JoinHandle<()>>>,
    results: Arc<Mutex<CheckpointResults>>,
    note: Mutex<Option<Arc<[u8]>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
    recovery: Recovery,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Durable {
    #[inline]
    pub(crate) fn has_failed(&self) -> bool {
        self.log.has_failed()
    }

    /// Makes records below `need` durable (or fails).
    pub(crate) fn make_durable(&self, need: u64) -> Result<(), DurabilityError> {
        self.log.make_durable(need)
    }

    /// Runs `then` once records below `need` are durable (see
    /// [`Log::after_durable`]).
    pub(crate) fn after_durable(&self, need: u64, then: Deferred) {
        self.log.after_durable(need, then);
    }

    /// Whether a checkpoint is due (false while one is being taken).
    fn checkpoint_due(&self) -> bool {
        let bytes = self.log.bytes();
        if bytes < self.policy.log_bytes && self.policy.interval.is_none() {
            return false;
        }
        if lock(&self.finishing)
            .as_ref()
            .is_some_and(|h| !h.is_finished())
        {
            return false;
        }
        let Ok(state) = self.checkpointing.try_lock() else {
            return false;
        };
        let last = lock(&self.results).bytes;
        bytes >= self.policy.log_bytes.max(last)
            || self
                .policy
                .interval
                .is_some_and(|i| state.at.elapsed() >= i && bytes > log::SEGMENT_HEADER as u64)
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.finishing).take() {
            let _ = h.join();
        }
        self.log.stop();
        if let Some(h) = lock(&self.committer).take() {
            let _ = h.join();
        }
        // What was sealed but not yet written (nothing was answered from it).
        let _ = self.log.sync();
    }
}

impl Deduper {
    /// Seals shard `s`'s buffered operations as one log record; what a
    /// call that answered from this shard must wait for (0 when the engine
    /// is not durable).
    #[inline]
    pub(crate) fn seal(&self, s: usize, shard: &mut Shard) -> u64 {
        let (Some(d), Some(log)) = (&self.durable, &mut shard.log) else {
            return 0;
        };
        if !log.is_empty() {
            let (base, ops) = log.ops();
            let seq = d.log.append(s as u16, Some(base), ops);
            log.need = seq + 1;
            log.clear();
        }
        log.need
    }

    /// True once the log has failed (every call answers `Unavailable`).
    #[inline]
    pub(crate) fn durability_failed(&self) -> bool {
        self.durable.as_ref().is_some_and(Durable::has_failed)
    }

    /// Waits until records below `need` are durable, then takes a
    /// checkpoint if one is due and automatic.
    ///
    /// # Errors
    /// [`DurabilityError::Failed`] when the log has failed.
    #[inline]
    pub(crate) fn settle(&self, need: u64) -> Result<(), DurabilityError> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        d.make_durable(need)?;
        // A failed checkpoint leaves the previous one; it is counted and
        // tried again later.
        self.checkpoint_if_due();
        Ok(())
    }

    pub(crate) fn durable(&self) -> Option<&Durable> {
        self.durable.as_ref()
    }

    /// Takes a checkpoint if one is due and automatic (and none is running).
    pub(crate) fn checkpoint_if_due(&self) {
        if let Some(d) = &self.durable {
            if d.policy.automatic && d.checkpoint_due() {
                let _ = self.checkpoint_if_free();
            }
        }
    }

    /// The durability the engine was opened with ([`Durability::None`] for
    /// an engine built without a directory).
    #[must_use]
    pub fn durability(&self) -> Durability {
        self.durable
            .as_ref()
            .map_or(Durability::None, |d| d.log.mode())
    }

    /// The directory a durable engine was opened on.
    #[must_use]
    pub fn durable_dir(&self) -> Option<&Path> {
        self.durable.as_ref().map(|d| d.dir.as_path())
    }

    /// What opening the directory found (`None` for an engine built without
    /// one).
    #[must_use]
    pub fn recovery(&self) -> Option<&Recovery> {
        self.durable.as_ref().map(|d| &d.recovery)
    }

    /// The error that stopped the log, if one did: the engine then answers
    /// `Unavailable` to every call until the directory is reopened.
    #[must_use]
    pub fn durability_failure(&self) -> Option<String> {
        self.durable.as_ref().and_then(|d| d.log.failure())
    }

    /// Counters of the log and checkpoints (`None` without a directory).
    #[must_use]
    pub fn durability_stats(&self) -> Option<DurabilityStats> {
        let d = self.durable.as_ref()?;
        let c = &d.log.counters;
        let state = lock(&d.results);
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        Some(DurabilityStats {
            mode: d.log.mode(),
            log_bytes: d.log.bytes(),
            records_written: c.records.load(relaxed),
            frames_written: c.frames.load(relaxed),
            bytes_written: c.bytes_written.load(relaxed),
            syncs: c.syncs.load(relaxed),
            checkpoints: state.count,
            checkpoint_failures: state.failures,
            checkpoint_bytes: state.bytes,
            last_checkpoint: state.took,
            last_checkpoint_error: state.error.clone(),
            failure: d.log.failure(),
        })
    }

    /// Writes and syncs (`fdatasync`) everything logged so far, whatever the
    /// mode: after it returns, a power loss loses nothing answered before
    /// the call. A no-op without a directory.
    ///
    /// # Errors
    /// [`DurabilityError::Failed`] when the log fails or had failed.
    pub fn sync(&self) -> Result<(), DurabilityError> {
        match &self.durable {
            Some(d) => d.log.sync(),
            None => Ok(()),
        }
    }

    /// True when the log has grown past its bound (the log-size setting,
    /// or the last checkpoint's size if larger) or the checkpoint interval
    /// has passed: [`Deduper::checkpoint`] would shorten the log.
    #[must_use]
    pub fn checkpoint_due(&self) -> bool {
        self.durable.as_ref().is_some_and(Durable::checkpoint_due)
    }

    /// Takes a checkpoint now: writes the state beside the log, then deletes
    /// the log segments it covers. Shards are written one at a time, each
    /// under its own lock (other shards keep answering). Without a directory,
    /// a no-op.
    ///
    /// # Errors
    /// [`DurabilityError::Failed`] once the log has failed (no checkpoint
    /// is taken then); [`DurabilityError::Io`] when the checkpoint cannot
    /// be written (a full disk): the previous checkpoint and the log stay
    /// as they were, and nothing is lost.
    pub fn checkpoint(&self) -> Result<(), DurabilityError> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        let mut state = lock(&d.checkpointing);
        self.checkpoint_locked(d, &mut state, false)
    }

    /// A checkpoint unless one is already running.
    fn checkpoint_if_free(&self) -> Result<(), DurabilityError> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        let Ok(mut state) = d.checkpointing.try_lock() else {
            return Ok(());
        };
        self.checkpoint_locked(d, &mut state, true)
    }

    /// Writes a checkpoint's shards (under the checkpoint lock), then
    /// finishes it here or, `in_background`, on a thread of its own.
    fn checkpoint_locked(
        &self,
        d: &Durable,
        state: &mut CheckpointState,
        in_background: bool,
    ) -> Result<(), DurabilityError> {
        if d.has_failed() {
            return Err(DurabilityError::Failed(d.log.failure().unwrap_or_default()));
        }
        // The previous checkpoint is renamed (or failed) before this one
        // starts.
        if let Some(h) = lock(&d.finishing).take() {
            let _ = h.join();
        }
        let started = Instant::now();
        state.at = started;
        let written = match checkpoint::write(self, d) {
            Ok(written) => written,
            Err(e) => {
                let failed = Err(e);
                lock(&d.results).record(&failed, started.elapsed());
                return failed.map(|_| ());
            }
        };
        let results = Arc::clone(&d.results);
        let finish = move || {
            let result = written.finish();
            lock(&results).record(&result, started.elapsed());
            result.map(|_| ())
        };
        if !in_background {
            return finish();
        }
        let handle = std::thread::Builder::new()
            .name("tiered-dedup-checkpoint".into())
            .spawn(move || {
                let _ = finish();
            })
            .map_err(|error| DurabilityError::Io {
                path: d.dir.clone(),
                error,
            })?;
        *lock(&d.finishing) = Some(handle);
        Ok(())
    }

    /// Records `note` (application bytes, e.g. how far a job got) in the log,
    /// in order with every change answered before the call, durably as the
    /// mode promises before returning. The last note comes back after a
    /// restart ([`Recovery::note`]), with the keys accepted after it
    /// ([`Recovery::accepted_since_note`]). Without a directory, kept in
    /// memory only ([`Deduper::last_note`]).
    ///
    /// # Errors
    /// [`DurabilityError::Failed`] when the log has failed.
    pub fn note(&self, note: &[u8]) -> Result<(), DurabilityError> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        if d.has_failed() {
            return Err(DurabilityError::Failed(d.log.failure().unwrap_or_default()));
        }
        let need = {
            // A checkpoint cuts the note once, before or after this one.
            let _checkpoint = lock(&d.checkpointing);
            let mut last = lock(&d.note);
            let seq = d.log.append(NOTE, None, note);
            *last = Some(Arc::from(note));
            seq + 1
        };
        d.make_durable(need)
    }

    /// The last note recorded (by this engine, or recovered from its
    /// directory).
    #[must_use]
    pub fn last_note(&self) -> Option<Arc<[u8]>> {
        self.durable.as_ref().and_then(|d| lock(&d.note).clone())
    }
}

/// Test hook: after `bytes` more bytes, every write of the log, a segment or
/// a checkpoint fails with "no space left on device" (`None`: never). For
/// machines where a small file system cannot be mounted to fill for real.
#[doc(hidden)]
pub fn inject_write_failure_after(bytes: Option<u64>) {
    log::set_fail_after(bytes);
}
