//! The append-only log: segment files of checksummed frames of records.
//!
//! ```text
//! segment  wal-<epoch, 16 hex digits>.log
//!   header  "TDEDUPWL" | u32 version | u64 epoch | u64 first seq | u64 configuration | u64 xxh3 of the 36 bytes before
//!   frame*  u32 magic "TFRM" | u32 body length | u64 first seq | u32 records | u64 xxh3 of the 16 bytes after the magic and the body
//!           body: record*  u16 shard (0xFFFF: a note) | u32 length | bytes
//! ```
//!
//! Records are numbered (their *sequence number*) in the order they were
//! sealed, across frames and segments. Shards seal records into one pending
//! buffer under its lock; a write takes the whole buffer as one frame, so a
//! frame is one `write` and is torn, if ever, only at the end of the file.
//!
//! `os` mode: the thread that needs its records written writes whatever is
//! pending (others find theirs written: a group write). `sync` mode: a
//! committer thread writes and `fdatasync`s what is pending once per
//! interval, then wakes the threads waiting for it. A write or sync that
//! fails stops the log for good (fail-stop): the partial frame is cut away
//! where possible, nothing is written after it, and every wait fails.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use super::{Durability, DurabilityError};

const SEGMENT_MAGIC: &[u8; 8] = b"TDEDUPWL";
const SEGMENT_VERSION: u32 = 1;
/// Bytes of a segment's header.
pub(crate) const SEGMENT_HEADER: usize = 8 + 4 + 8 + 8 + 8 + 8;
const FRAME_MAGIC: [u8; 4] = *b"TFRM";
/// Bytes of a frame's header.
pub(crate) const FRAME_HEADER: usize = 4 + 4 + 8 + 4 + 8;
/// Bytes of a record's header.
const RECORD_HEADER: usize = 2 + 4;
/// The shard number of a note record.
pub(crate) const NOTE: u16 = u16::MAX;
/// Largest frame body written at once (a larger pending buffer is cut at a
/// record into several frames).
const MAX_FRAME_BODY: usize = 64 << 20;

/// The file name of segment `epoch`.
pub(crate) fn segment_name(epoch: u64) -> String {
    format!("wal-{epoch:016x}.log")
}

/// The epoch of a segment file name.
pub(crate) fn segment_epoch(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records sealed and not yet written.
struct Pending {
    /// A frame header's room, then the records.
    bytes: Vec<u8>,
    records: u32,
    /// Sequence number of the first record in `bytes`.
    first_seq: u64,
    /// A cleared buffer to swap in.
    spare: Vec<u8>,
}

impl Pending {
    fn next_seq(&self) -> u64 {
        self.first_seq + u64::from(self.records)
    }
}

/// A segment open for appending.
pub(crate) struct OpenSegment {
    pub(crate) file: File,
    pub(crate) epoch: u64,
    /// Its length in bytes.
    pub(crate) len: u64,
}

/// The segment being appended to.
struct Writer {
    file: File,
    epoch: u64,
    /// Bytes of the current segment.
    len: u64,
    /// Older segments still needed (not yet covered by a checkpoint):
    /// `(epoch, bytes)`.
    older: Vec<(u64, u64)>,
}

/// Something to run once records below a sequence number are durable (or
/// the log failed).
pub(crate) type Deferred = Box<dyn FnOnce(Result<(), DurabilityError>) + Send>;

struct Waiting {
    deferred: Vec<(u64, Deferred)>,
    stop: bool,
}

/// Counters of the log, read by [`crate::Deduper::durability_stats`].
#[derive(Default)]
pub(crate) struct LogCounters {
    pub(crate) frames: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) records: AtomicU64,
}

/// The log of one durable engine.
pub(crate) struct Log {
    dir: PathBuf,
    mode: Durability,
    config: u64,
    pending: Mutex<Pending>,
    writer: Mutex<Writer>,
    /// Every record below this is in the file.
    written: AtomicU64,
    /// Every record below this is synced (os mode: written).
    durable: AtomicU64,
    waiting: Mutex<Waiting>,
    cond: Condvar,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Bytes of every segment still needed (read without the writer's lock,
    /// which a sync holds).
    bytes: AtomicU64,
    pub(crate) counters: LogCounters,
}

impl Log {
    /// A log appending to `current` (its records up to `next_seq` already
    /// written before it), with `older` segments `(epoch, bytes)` before it.
    pub(crate) fn new(
        dir: PathBuf,
        mode: Durability,
        config: u64,
        current: OpenSegment,
        older: Vec<(u64, u64)>,
        next_seq: u64,
    ) -> Self {
        let bytes = current.len + older.iter().map(|&(_, b)| b).sum::<u64>();
        Log {
            dir,
            mode,
            config,
            pending: Mutex::new(Pending {
                bytes: vec![0; FRAME_HEADER],
                records: 0,
                first_seq: next_seq,
                spare: vec![0; FRAME_HEADER],
            }),
            writer: Mutex::new(Writer {
                file: current.file,
                epoch: current.epoch,
                len: current.len,
                older,
            }),
            written: AtomicU64::new(next_seq),
            durable: AtomicU64::new(next_seq),
            waiting: Mutex::new(Waiting {
                deferred: Vec::new(),
                stop: false,
            }),
            cond: Condvar::new(),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            bytes: AtomicU64::new(bytes),
            counters: LogCounters::default(),
        }
    }

    pub(crate) fn mode(&self) -> Durability {
        self.mode
    }

    /// Appends a record for `shard` with `body` (`base`'s 8 bytes, then
    /// `rest`); its sequence number.
    pub(crate) fn append(&self, shard: u16, base: Option<u64>, rest: &[u8]) -> u64 {
        let len = rest.len() + if base.is_some() { 8 } else { 0 };
        let mut p = lock(&self.pending);
        let seq = p.next_seq();
        p.bytes.extend_from_slice(&shard.to_le_bytes());
        p.bytes.extend_from_slice(&(len as u32).to_le_bytes());
        if let Some(base) = base {
            p.bytes.extend_from_slice(&base.to_le_bytes());
        }
        p.bytes.extend_from_slice(rest);
        p.records += 1;
        seq
    }

    /// The sequence number the next record will get.
    pub(crate) fn next_seq(&self) -> u64 {
        lock(&self.pending).next_seq()
    }

    /// The error that stopped the log, if one did.
    pub(crate) fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.failure).clone()
    }

    #[inline]
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn failed_error(&self) -> DurabilityError {
        DurabilityError::Failed(self.failure().unwrap_or_default())
    }

    /// Returns once every record below `need` is durable as the mode
    /// promises: written (`os`), or synced (`sync`).
    ///
    /// # Errors
    /// [`DurabilityError::Failed`] once the log has failed.
    pub(crate) fn make_durable(&self, need: u64) -> Result<(), DurabilityError> {
        if self.durable.load(Ordering::Acquire) >= need {
            return if self.has_failed() {
                Err(self.failed_error())
            } else {
                Ok(())
            };
        }
        match self.mode {
            Durability::None => Ok(()),
            Durability::Os => self.write_through(need),
            Durability::Sync { .. } => {
                let mut w = lock(&self.waiting);
                loop {
                    if self.has_failed() {
                        return Err(self.failed_error());
                    }
                    if self.durable.load(Ordering::Acquire) >= need {
                        return Ok(());
                    }
                    w = self.cond.wait(w).unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Runs `then` once records below `need` are durable: now (on this
    /// thread) where they are or the mode writes on the caller's thread,
    /// else on the committer's thread after the sync that covers them.
    pub(crate) fn after_durable(&self, need: u64, then: Deferred) {
        if let Durability::Sync { .. } = self.mode {
            if self.durable.load(Ordering::Acquire) < need && !self.has_failed() {
                let mut w = lock(&self.waiting);
                // Checked again under the lock the committer settles under.
                if self.durable.load(Ordering::Acquire) < need && !self.has_failed() {
                    w.deferred.push((need, then));
                    return;
                }
            }
        }
        then(self.make_durable(need));
    }

    /// `os` mode: writes what is pending unless records below `need` are in
    /// the file already.
    fn write_through(&self, need: u64) -> Result<(), DurabilityError> {
        let mut w = lock(&self.writer);
        if self.has_failed() {
            return Err(self.failed_error());
        }
        if self.written.load(Ordering::Acquire) < need {
            self.write_pending(&mut w)?;
        }
        Ok(())
    }

    /// Writes every pending record as frames; the sequence number after the
    /// last one written. `os` mode: they are then durable.
    fn write_pending(&self, w: &mut Writer) -> Result<u64, DurabilityError> {
        let (mut bytes, first, records) = {
            let mut p = lock(&self.pending);
            if p.records == 0 {
                return Ok(p.first_seq);
            }
            let mut fresh = std::mem::take(&mut p.spare);
            fresh.clear();
            fresh.resize(FRAME_HEADER, 0);
            let bytes = std::mem::replace(&mut p.bytes, fresh);
            let first = p.first_seq;
            let records = p.records;
            p.first_seq += u64::from(records);
            p.records = 0;
            (bytes, first, records)
        };
        let end = first + u64::from(records);
        let result = if bytes.len() - FRAME_HEADER <= MAX_FRAME_BODY {
            seal_frame(&mut bytes, first, records);
            self.write_frame(w, &bytes)
        } else {
            self.write_split(w, &bytes[FRAME_HEADER..], first)
        };
        if let Err(e) = result {
            return Err(self.fail(w, &e));
        }
        self.written.store(end, Ordering::Release);
        if self.mode == Durability::Os {
            self.durable.store(end, Ordering::Release);
        }
        self.counters
            .records
            .fetch_add(u64::from(records), Ordering::Relaxed);
        let mut p = lock(&self.pending);
        if p.spare.capacity() < bytes.capacity() {
            p.spare = bytes;
        }
        Ok(end)
    }

    /// Writes records too many for one frame as several.
    fn write_split(&self, w: &mut Writer, records: &[u8], mut seq: u64) -> io::Result<()> {
        let mut at = 0;
        while at < records.len() {
            let mut end = at;
            let mut count = 0u32;
            while end < records.len() && (count == 0 || end - at < MAX_FRAME_BODY) {
                let len = u32::from_le_bytes(records[end + 2..end + 6].try_into().expect("4"));
                end += RECORD_HEADER + len as usize;
                count += 1;
            }
            let mut frame = vec![0; FRAME_HEADER];
            frame.extend_from_slice(&records[at..end]);
            seal_frame(&mut frame, seq, count);
            self.write_frame(w, &frame)?;
            seq += u64::from(count);
            at = end;
        }
        Ok(())
    }

    fn write_frame(&self, w: &mut Writer, frame: &[u8]) -> io::Result<()> {
        fail_point(frame.len() as u64)?;
        w.file.write_all(frame)?;
        w.len += frame.len() as u64;
        self.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.counters.frames.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Stops the log after `e`: cuts a partial frame away (best effort: a
    /// torn frame left at the end is cut when the directory is opened),
    /// records the error, wakes every waiter.
    fn fail(&self, w: &mut Writer, e: &io::Error) -> DurabilityError {
        let _ = w.file.set_len(w.len);
        let message = format!(
            "writing the log {} failed: {e}",
            self.dir.join(segment_name(w.epoch)).display()
        );
        {
            let mut f = lock(&self.failure);
            if f.is_none() {
                *f = Some(message);
            }
        }
        self.failed.store(true, Ordering::Release);
        crate::trace::event!(error, error = %e, "durability log failed");
        self.settle_waiters();
        self.failed_error()
    }

    /// Wakes waiters and runs the deferred work that is due (or fails it).
    fn settle_waiters(&self) {
        let durable = self.durable.load(Ordering::Acquire);
        let failed = self.has_failed();
        let due: Vec<Deferred> = {
            let mut w = lock(&self.waiting);
            let mut due = Vec::new();
            let mut i = 0;
            while i < w.deferred.len() {
                if failed || w.deferred[i].0 <= durable {
                    due.push(w.deferred.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
            self.cond.notify_all();
            due
        };
        for then in due {
            then(if failed {
                Err(self.failed_error())
            } else {
                Ok(())
            });
        }
    }

    /// Writes and syncs everything pending (any mode).
    ///
    /// # Errors
    /// [`DurabilityError::Failed`] when the log fails or had failed.
    pub(crate) fn sync(&self) -> Result<(), DurabilityError> {
        let mut w = lock(&self.writer);
        self.sync_locked(&mut w)
    }

    fn sync_locked(&self, w: &mut Writer) -> Result<(), DurabilityError> {
        if self.has_failed() {
            return Err(self.failed_error());
        }
        let end = self.write_pending(w)?;
        if let Err(e) = fail_point(0).and_then(|()| w.file.sync_data()) {
            return Err(self.fail(w, &e));
        }
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        self.durable.fetch_max(end, Ordering::AcqRel);
        self.settle_waiters();
        Ok(())
    }

    /// The committer's loop (`sync` mode): every `interval` writes and syncs
    /// what is pending and wakes its waiters. Exits on [`Log::stop`] after a
    /// last sync.
    pub(crate) fn commit_loop(&self, interval: Duration) {
        let mut last = Instant::now();
        loop {
            let stop = {
                let mut w = lock(&self.waiting);
                loop {
                    if w.stop {
                        break;
                    }
                    let left = interval.saturating_sub(last.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    w = self
                        .cond
                        .wait_timeout(w, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                w.stop
            };
            last = Instant::now();
            let due = self.durable.load(Ordering::Acquire) < lock(&self.pending).next_seq();
            if due || stop {
                let _ = self.sync();
            }
            if stop || self.has_failed() {
                return;
            }
        }
    }

    /// Asks the committer to exit after a last sync.
    pub(crate) fn stop(&self) {
        lock(&self.waiting).stop = true;
        self.cond.notify_all();
    }

    /// Bytes of every segment still needed.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Starts a new segment for every record after those pending now,
    /// which are written (and synced in `sync` mode) to the current one
    /// first. Returns the new segment's epoch; records before its first
    /// sequence number are all in older segments.
    ///
    /// # Errors
    /// [`DurabilityError::Io`] when the new segment cannot be made (the log
    /// goes on in the current one), [`DurabilityError::Failed`] when
    /// writing the pending records fails.
    pub(crate) fn rotate(&self) -> Result<u64, DurabilityError> {
        let mut w = lock(&self.writer);
        if self.has_failed() {
            return Err(self.failed_error());
        }
        let first = if self.mode == Durability::Os {
            self.write_pending(&mut w)?
        } else {
            self.sync_locked(&mut w)?;
            self.durable.load(Ordering::Acquire)
        };
        let epoch = w.epoch + 1;
        let file = create_segment(&self.dir, epoch, first, self.config)?;
        let old = std::mem::replace(&mut w.file, file);
        drop(old);
        let old_epoch = std::mem::replace(&mut w.epoch, epoch);
        let old_len = std::mem::replace(&mut w.len, SEGMENT_HEADER as u64);
        w.older.push((old_epoch, old_len));
        self.bytes
            .fetch_add(SEGMENT_HEADER as u64, Ordering::Relaxed);
        Ok(epoch)
    }

    /// Deletes the segments before `epoch` (a checkpoint covers them).
    pub(crate) fn remove_before(&self, epoch: u64) {
        let mut w = lock(&self.writer);
        w.older.retain(|&(e, bytes)| {
            if e < epoch {
                let _ = fs::remove_file(self.dir.join(segment_name(e)));
                self.bytes.fetch_sub(bytes, Ordering::Relaxed);
                false
            } else {
                true
            }
        });
        let _ = sync_dir(&self.dir);
    }
}

/// Fills the frame header at the start of `frame`.
fn seal_frame(frame: &mut [u8], first_seq: u64, records: u32) {
    let body_len = (frame.len() - FRAME_HEADER) as u32;
    frame[..4].copy_from_slice(&FRAME_MAGIC);
    frame[4..8].copy_from_slice(&body_len.to_le_bytes());
    frame[8..16].copy_from_slice(&first_seq.to_le_bytes());
    frame[16..20].copy_from_slice(&records.to_le_bytes());
    let sum = frame_checksum(&frame[4..20], &frame[FRAME_HEADER..]);
    frame[20..28].copy_from_slice(&sum.to_le_bytes());
}

fn frame_checksum(head: &[u8], body: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(head);
    h.update(body);
    h.digest()
}

/// Creates segment `epoch` (never over an existing file), writes its header,
/// syncs it and the directory.
pub(crate) fn create_segment(
    dir: &Path,
    epoch: u64,
    first_seq: u64,
    config: u64,
) -> Result<File, DurabilityError> {
    let path = dir.join(segment_name(epoch));
    let io_err = |error| DurabilityError::Io {
        path: path.clone(),
        error,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err)?;
    let mut head = Vec::with_capacity(SEGMENT_HEADER);
    head.extend_from_slice(SEGMENT_MAGIC);
    head.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    head.extend_from_slice(&epoch.to_le_bytes());
    head.extend_from_slice(&first_seq.to_le_bytes());
    head.extend_from_slice(&config.to_le_bytes());
    let sum = xxh3_64(&head);
    head.extend_from_slice(&sum.to_le_bytes());
    let written = fail_point(head.len() as u64)
        .and_then(|()| file.write_all(&head))
        .and_then(|()| file.sync_all());
    if let Err(error) = written {
        drop(file);
        let _ = fs::remove_file(&path);
        return Err(io_err(error));
    }
    sync_dir(dir).map_err(|error| DurabilityError::Io {
        path: dir.to_owned(),
        error,
    })?;
    Ok(file)
}

/// Makes renames and new files in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A segment's header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegmentHeader {
    pub(crate) epoch: u64,
    pub(crate) first_seq: u64,
    pub(crate) config: u64,
}

/// Parses a segment's header; `None` when it is torn or not one.
pub(crate) fn read_header(bytes: &[u8]) -> Result<SegmentHeader, &'static str> {
    if bytes.len() < SEGMENT_HEADER {
        return Err("shorter than a segment header");
    }
    if &bytes[..8] != SEGMENT_MAGIC {
        return Err("not a log segment (bad magic bytes)");
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
    if xxh3_64(&bytes[..36]) != word(36) {
        return Err("segment header checksum mismatch");
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
    if version != SEGMENT_VERSION {
        return Err("unknown segment version");
    }
    Ok(SegmentHeader {
        epoch: word(12),
        first_seq: word(20),
        config: word(28),
    })
}

/// A whole, checksummed frame.
pub(crate) struct Frame<'a> {
    pub(crate) first_seq: u64,
    pub(crate) records: u32,
    pub(crate) body: &'a [u8],
    /// Offset just past it.
    pub(crate) end: usize,
}

/// The frame at `at`, if a whole valid one is there.
pub(crate) fn frame_at(bytes: &[u8], at: usize) -> Option<Frame<'_>> {
    let head = bytes.get(at..at.checked_add(FRAME_HEADER)?)?;
    if head[..4] != FRAME_MAGIC {
        return None;
    }
    let body_len = u32::from_le_bytes(head[4..8].try_into().expect("4")) as usize;
    let start = at + FRAME_HEADER;
    let body = bytes.get(start..start.checked_add(body_len)?)?;
    let sum = u64::from_le_bytes(head[20..28].try_into().expect("8"));
    if frame_checksum(&head[4..20], body) != sum {
        return None;
    }
    Some(Frame {
        first_seq: u64::from_le_bytes(head[8..16].try_into().expect("8")),
        records: u32::from_le_bytes(head[16..20].try_into().expect("4")),
        body,
        end: start + body_len,
    })
}

/// The offset of the first whole valid frame after `at`, if any (a damaged
/// frame followed by a valid one is corruption, not a torn tail).
pub(crate) fn valid_frame_after(bytes: &[u8], at: usize) -> Option<usize> {
    let mut from = at + 1;
    while from + FRAME_HEADER <= bytes.len() {
        let i = bytes[from..].windows(4).position(|w| w == FRAME_MAGIC)? + from;
        if frame_at(bytes, i).is_some() {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

/// The records of a frame body: `(shard, bytes)`.
pub(crate) fn records(body: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), &'static str>> {
    let mut rest = body;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < RECORD_HEADER {
            rest = &[];
            return Some(Err("truncated record header"));
        }
        let shard = u16::from_le_bytes([rest[0], rest[1]]);
        let len = u32::from_le_bytes(rest[2..6].try_into().expect("4")) as usize;
        let Some(record) = rest.get(RECORD_HEADER..RECORD_HEADER + len) else {
            rest = &[];
            return Some(Err("record longer than its frame"));
        };
        rest = &rest[RECORD_HEADER + len..];
        Some(Ok((shard, record)))
    })
}

/// Test hook: the bytes the log may still write before writes fail with
/// "no space left" (`u64::MAX`: no limit). Set through
/// [`crate::durability::inject_write_failure_after`].
static FAIL_AFTER: AtomicU64 = AtomicU64::new(u64::MAX);

/// See [`FAIL_AFTER`].
pub(crate) fn set_fail_after(bytes: Option<u64>) {
    FAIL_AFTER.store(bytes.unwrap_or(u64::MAX), Ordering::Release);
}

pub(crate) fn fail_point(bytes: u64) -> io::Result<()> {
    let left = FAIL_AFTER.load(Ordering::Acquire);
    if left == u64::MAX {
        return Ok(());
    }
    if left < bytes {
        return Err(io::Error::from_raw_os_error(28));
    }
    FAIL_AFTER.store(left - bytes, Ordering::Release);
    Ok(())
}
