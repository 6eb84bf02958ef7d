//! Opening a durable directory: the checkpoint, then the log replayed
//! record by record from each shard's cut, a torn tail cut away.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::checkpoint::{self, Meta};
use super::log::{self, Log, NOTE, SEGMENT_HEADER};
use super::ops::{Op, Ops};
use super::{
    CheckpointResults, CheckpointState, Durability, DurabilityError, Durable, Recovery, ShardLog,
};
use crate::engine::{Deduper, DeduperBuilder, Held, Shard};
use crate::error::{ConfigError, SnapshotError};
use crate::exact::Mark;
use crate::fingerprint::Fingerprint;
use crate::time::Timestamp;

/// The lock file that keeps a directory to one engine.
const LOCK_FILE: &str = "engine.lock";

impl DeduperBuilder {
    /// Opens the durable engine kept in `dir` (created if missing): its
    /// checkpoint, then its log replayed; an empty directory starts an empty
    /// engine. The configuration must be the one the directory was written
    /// with. The engine then logs every change as its
    /// [`DeduperBuilder::durability`] says, and checkpoints as configured.
    ///
    /// Durability needs the embedded memory tier with owned keys in exact
    /// mode (the default engine); Redis keeps its own state.
    ///
    /// ```
    /// use tiered_dedup::{Deduper, Durability};
    ///
    /// let dir = std::env::temp_dir().join(format!("td-doc-open-{}", std::process::id()));
    /// let builder = || Deduper::builder().durability(Durability::Os);
    /// let engine = builder().open(&dir)?;
    /// assert!(engine.check("order-1").is_new());
    /// drop(engine); // or a crash: the log has the key
    ///
    /// let engine = builder().open(&dir)?;
    /// assert!(engine.check("order-1").is_duplicate());
    /// # drop(engine);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`DurabilityError`]: a configuration that cannot be made durable or
    /// does not match the directory's, a directory another engine holds, a
    /// checkpoint refused, a log segment damaged before its end (a torn
    /// tail is cut, not refused), or an I/O error. Nothing is half-loaded.
    pub fn open(self, dir: impl AsRef<Path>) -> Result<Deduper, DurabilityError> {
        open(&self, dir.as_ref(), None)
    }

    /// Starts the durable directory `dir` (which must hold no checkpoint or
    /// log yet) from a snapshot a [`Deduper::snapshot`] wrote: the engine
    /// restored from it is checkpointed into `dir` at once, then logs like
    /// one [`DeduperBuilder::open`]ed.
    ///
    /// # Errors
    /// As [`DeduperBuilder::open`]; [`DurabilityError::NotEmpty`] when the
    /// directory holds state already; [`DurabilityError::Checkpoint`] when
    /// the snapshot is refused.
    pub fn import<R: Read>(
        self,
        dir: impl AsRef<Path>,
        snapshot: R,
    ) -> Result<Deduper, DurabilityError> {
        let mut snapshot = snapshot;
        open(&self, dir.as_ref(), Some(&mut snapshot))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DurabilityError + '_ {
    move |error| DurabilityError::Io {
        path: path.to_owned(),
        error,
    }
}

fn open(
    builder: &DeduperBuilder,
    dir: &Path,
    seed: Option<&mut dyn Read>,
) -> Result<Deduper, DurabilityError> {
    let started = Instant::now();
    let (mode, policy) = builder.durability_settings();
    let fresh = builder.build_engine()?;
    if !fresh.plan().can_be_durable() {
        return Err(ConfigError::DurabilityNeeds(
            "the memory tier (ExactTier::Memory) with owned keys (Affinity::Owned) in exact mode",
        )
        .into());
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let dir_lock = lock_dir(dir)?;
    let _ = fs::remove_file(dir.join(checkpoint::TEMPORARY));
    let checkpoint_path = dir.join(checkpoint::FILE);
    let mut segments = list_segments(dir)?;
    let has_checkpoint = checkpoint_path.exists();
    let seeded = seed.is_some();
    if seeded && (has_checkpoint || !segments.is_empty()) {
        return Err(DurabilityError::NotEmpty {
            dir: dir.to_owned(),
        });
    }
    let shards = fresh.shard_count();
    let config = crate::snapshot::config_id(&fresh);
    let (engine, meta) = if has_checkpoint {
        checkpoint::read(&checkpoint_path, fresh)?
    } else {
        let engine = match seed {
            Some(r) => crate::snapshot::read_into(fresh, r).map_err(|source| {
                DurabilityError::Checkpoint {
                    path: PathBuf::from("<imported snapshot>"),
                    source,
                }
            })?,
            None => fresh,
        };
        (
            engine,
            Meta {
                cuts: vec![0; shards],
                ..Meta::default()
            },
        )
    };
    // Segments before the checkpoint's first live epoch are covered by it
    // (a crash after its rename left them behind).
    segments.retain(|&(epoch, ref path)| {
        if epoch < meta.epoch {
            let _ = fs::remove_file(path);
            false
        } else {
            true
        }
    });
    let mut recovery = Recovery {
        checkpoint: has_checkpoint,
        note: meta.note.clone(),
        ..Recovery::default()
    };
    let mut replay = Replay {
        engine: &engine,
        meta: &meta,
        recovery: &mut recovery,
        watermark: engine.watermark().as_nanos(),
        noted: meta.note.is_some(),
    };
    let (older, next_seq) = replay.segments(&mut segments, config)?;
    let watermark = replay.watermark;
    engine.restore_watermark(watermark, engine.late_count());
    let next_seq = next_seq.max(meta.next_seq);
    // A new segment for this run: its first sequence number is past every
    // record sealed before (written or not).
    let epoch = segments
        .last()
        .map_or(meta.epoch, |&(e, _)| e + 1)
        .max(meta.epoch);
    let file = log::create_segment(dir, epoch, next_seq, config)?;
    let log = Arc::new(Log::new(
        dir.to_owned(),
        mode,
        config,
        log::OpenSegment {
            file,
            epoch,
            len: SEGMENT_HEADER as u64,
        },
        older,
        next_seq,
    ));
    if !mode.is_none() {
        // `None` logs nothing: its state is what its checkpoints hold.
        for s in 0..shards {
            engine.lock_shard(s).log = Some(ShardLog::default());
        }
    }
    let committer = match mode {
        Durability::Sync { group_commit } => {
            let log = Arc::clone(&log);
            Some(
                std::thread::Builder::new()
                    .name("tiered-dedup-commit".into())
                    .spawn(move || log.commit_loop(group_commit))
                    .map_err(io_err(dir))?,
            )
        }
        Durability::None | Durability::Os => None,
    };
    recovery.segments = segments.len();
    recovery.elapsed = started.elapsed();
    let checkpoint_bytes = fs::metadata(&checkpoint_path).map_or(0, |m| m.len());
    let note = recovery.note.clone();
    if builder.prefaults() {
        engine.prefault_tables();
    }
    let mut engine = engine;
    engine.attach_durable(Durable {
        log,
        dir: dir.to_owned(),
        _lock: dir_lock,
        policy,
        checkpointing: Mutex::new(CheckpointState { at: Instant::now() }),
        finishing: Mutex::new(None),
        results: Arc::new(Mutex::new(CheckpointResults {
            bytes: checkpoint_bytes,
            ..CheckpointResults::default()
        })),
        note: Mutex::new(note),
        committer: Mutex::new(committer),
        recovery,
    });
    if seeded {
        // The imported state lives in memory only until checkpointed.
        engine.checkpoint()?;
    }
    crate::trace::event!(
        info,
        records = engine.recovery().map_or(0, |r| r.records),
        "durable directory opened"
    );
    Ok(engine)
}

/// Replays log segments into an engine.
struct Replay<'a> {
    engine: &'a Deduper,
    meta: &'a Meta,
    recovery: &'a mut Recovery,
    watermark: u64,
    /// A note was seen: accepted keys after it are listed.
    noted: bool,
}

impl Replay<'_> {
    /// Replays `segments` in order (dropping a last one whose header was
    /// torn); the segments left with their sizes, and the sequence number
    /// after the last record read.
    fn segments(
        &mut self,
        segments: &mut Vec<(u64, PathBuf)>,
        config: u64,
    ) -> Result<(Vec<(u64, u64)>, u64), DurabilityError> {
        let mut older = Vec::new();
        let mut next: Option<u64> = None;
        let count = segments.len();
        let mut kept = Vec::new();
        for (i, (epoch, path)) in segments.drain(..).enumerate() {
            let last = i + 1 == count;
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let header = match log::read_header(&bytes) {
                Ok(h) => h,
                // A segment whose creation the crash interrupted: nothing
                // was ever written to it.
                Err(_) if last && bytes.len() <= SEGMENT_HEADER => {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    continue;
                }
                Err(reason) => {
                    return Err(DurabilityError::Corrupt {
                        path,
                        offset: 0,
                        reason,
                    })
                }
            };
            if header.config != config {
                return Err(DurabilityError::Mismatch { path });
            }
            if header.epoch != epoch {
                return Err(DurabilityError::Corrupt {
                    path,
                    offset: 0,
                    reason: "segment epoch differs from its name",
                });
            }
            // Sequence numbers a crash burned (sealed, never written) leave
            // a gap before a segment started at an open; never a step back.
            if next.is_some_and(|n| header.first_seq < n) {
                return Err(DurabilityError::Corrupt {
                    path,
                    offset: 0,
                    reason: "segment starts before the previous one ends",
                });
            }
            let (end, seq) = self.frames(&bytes, &path, header.first_seq, last)?;
            if end < bytes.len() {
                self.recovery.cut_bytes += (bytes.len() - end) as u64;
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                file.set_len(end as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(&path))?;
            }
            next = Some(seq);
            older.push((epoch, end as u64));
            kept.push((epoch, path));
        }
        *segments = kept;
        Ok((older, next.unwrap_or(0)))
    }

    /// Replays the frames of one segment; where its whole frames end, and
    /// the sequence number after them.
    fn frames(
        &mut self,
        bytes: &[u8],
        path: &Path,
        first_seq: u64,
        last: bool,
    ) -> Result<(usize, u64), DurabilityError> {
        let corrupt = |offset: usize, reason| DurabilityError::Corrupt {
            path: path.to_owned(),
            offset: offset as u64,
            reason,
        };
        let mut at = SEGMENT_HEADER;
        let mut seq = first_seq;
        while at < bytes.len() {
            let Some(frame) = log::frame_at(bytes, at) else {
                // Torn (the last write, cut short) unless a whole frame
                // follows: then the damage is in the middle.
                if !last || log::valid_frame_after(bytes, at).is_some() {
                    return Err(corrupt(at, "a damaged frame before whole ones"));
                }
                return Ok((at, seq));
            };
            if frame.first_seq != seq {
                return Err(corrupt(at, "frame out of sequence (a frame is missing)"));
            }
            for (i, record) in log::records(frame.body).enumerate() {
                let (shard, body) = record.map_err(|reason| corrupt(at, reason))?;
                self.record(seq + i as u64, shard, body)
                    .map_err(|reason| corrupt(at, reason))?;
            }
            if log::records(frame.body).count() != frame.records as usize {
                return Err(corrupt(at, "record count differs from the frame's"));
            }
            seq += u64::from(frame.records);
            at = frame.end;
        }
        Ok((at, seq))
    }

    fn record(&mut self, seq: u64, shard: u16, body: &[u8]) -> Result<(), &'static str> {
        if shard == NOTE {
            if seq >= self.meta.note_cut {
                self.recovery.note = Some(Arc::from(body));
                self.recovery.accepted_since_note.clear();
                self.noted = true;
                self.recovery.records += 1;
            }
            return Ok(());
        }
        let s = usize::from(shard);
        let cut = *self.meta.cuts.get(s).ok_or("shard number out of range")?;
        if seq < cut {
            return Ok(());
        }
        self.recovery.records += 1;
        let mut guard = self.engine.lock_shard(s);
        let shard = &mut *guard;
        for op in Ops::new(body)? {
            let op = op?;
            self.recovery.operations += 1;
            let accepted = apply(shard, &op)?;
            if let Some(fp) = accepted {
                if self.noted {
                    self.recovery.accepted_since_note.push(fp);
                }
            }
            if let Op::Accept { at, .. } | Op::Acquire { at, .. } | Op::Commit { at, .. } = op {
                self.watermark = self.watermark.max(at);
            }
        }
        Ok(())
    }
}

/// Applies one logged op to `shard` as the engine applied it; the key it
/// recorded, if it recorded one.
fn apply(shard: &mut Shard, op: &Op<'_>) -> Result<Option<Fingerprint>, &'static str> {
    let exact_err = |_| "the exact tier refused a replayed op";
    match *op {
        Op::Accept { fp, at } => {
            shard.advance(Timestamp::from_nanos(at));
            shard.sweep_expired(16);
            let exact = shard.exact.as_mut().ok_or("no exact tier")?;
            exact
                .mark(fp, 0, Timestamp::from_nanos(at))
                .map_err(exact_err)?;
            Ok(Some(fp))
        }
        Op::Acquire {
            fp,
            at,
            token,
            until,
            payload,
        } => {
            shard.advance(Timestamp::from_nanos(at));
            shard.leases.insert(
                fp,
                Held {
                    token,
                    acquired_at: at,
                    until,
                    payload,
                },
            );
            shard.next_token = shard.next_token.max(token.saturating_add(1));
            Ok(None)
        }
        Op::Commit {
            fp,
            at,
            token,
            acquired_at,
            payload,
            result,
        } => {
            if shard.leases.get(fp).is_some_and(|h| h.token == token) {
                shard.leases.remove(fp);
            }
            shard.advance(Timestamp::from_nanos(at));
            let exact = shard.exact.as_mut().ok_or("no exact tier")?;
            let acquired = Timestamp::from_nanos(acquired_at);
            if payload.is_some() || !result.is_empty() {
                let mark = Mark {
                    fingerprint: fp,
                    slot: 0,
                    slice: 0,
                    at: acquired,
                };
                exact.put_body(&mark, payload, result).map_err(exact_err)?;
            }
            exact.mark(fp, 0, acquired).map_err(exact_err)?;
            Ok(Some(fp))
        }
        Op::Release { fp, token } => {
            if shard.leases.get(fp).is_some_and(|h| h.token == token) {
                shard.leases.remove(fp);
            }
            Ok(None)
        }
        Op::Extend { fp, token, until } => {
            if let Some(h) = shard.leases.get_mut(fp) {
                if h.token == token {
                    h.until = until;
                }
            }
            Ok(None)
        }
        Op::Forget { fp } => {
            shard.leases.remove(fp);
            if let Some(exact) = shard.exact.as_mut() {
                exact.forget(fp).map_err(exact_err)?;
            }
            Ok(None)
        }
    }
}

/// The log segments in `dir`, by epoch.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, DurabilityError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(epoch) = entry.file_name().to_str().and_then(log::segment_epoch) {
            out.push((epoch, entry.path()));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// How long a held lock is waited for before the directory is called busy.
/// A lock can outlive its engine by a moment: a child process this process
/// spawns holds a copy of every descriptor until its `exec` closes it, and
/// the lock belongs to the lock file's open description, not to the
/// descriptor (an engine reopened right after a drop, while another thread
/// spawns a process, found it held).
#[cfg(target_os = "linux")]
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Takes `DIR/engine.lock` for the engine's life (Linux: `flock`, released
/// by the kernel however the process ends; elsewhere no lock is taken).
fn lock_dir(dir: &Path) -> Result<Option<File>, DurabilityError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let started = std::time::Instant::now();
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::WouldBlock {
                return Err(DurabilityError::Io { path, error });
            }
            if started.elapsed() >= LOCK_WAIT {
                return Err(DurabilityError::Busy {
                    dir: dir.to_owned(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    Ok(Some(file))
}

impl From<SnapshotError> for DurabilityError {
    fn from(source: SnapshotError) -> Self {
        DurabilityError::Checkpoint {
            path: PathBuf::new(),
            source,
        }
    }
}
