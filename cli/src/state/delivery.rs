//! What was written, across a kill: the order "log the chunk's marks, then
//! write its output" with a reconciliation on the next run.
//!
//! For each chunk with accepted records (`--durability os|sync`):
//!
//! 1. the chunk is judged: the engine logs the keys it accepts;
//! 2. an *in-flight note* goes to the engine's log after them (durably, as
//!    the mode says, before any output): the chunk's number, where standard
//!    output is (a regular file: device, inode, path and the offset the
//!    chunk starts at; else a stream), and, for every accepted record in
//!    input order, its fingerprint and where its output ends;
//! 3. the output is written: to a file in one `write`; to a pipe or a
//!    terminal in pieces of at most `PIPE_BUF` bytes, each written once the
//!    pipe has room (`poll`) without sleeping in the write (`RWF_NOWAIT`:
//!    a pipe then takes it whole, at once), and counted in
//!    `DIR/dedup.delivery` — a page of shared memory (a store, no system
//!    call: it survives the process being killed) — just before the write.
//!    A blocking write is not used: woken for room, it copies before it
//!    notices a pending SIGKILL, so a killed run's last piece was taken
//!    but not counted (one piece written twice in about one kill in four
//!    against a slow reader); counting after a write fails the same way
//!    for a kill during the copy (one in sixty). Counted just before, only
//!    a kill in the few instructions before the system call counts a piece
//!    the pipe did not take.
//!
//! A run that finds, on start, that the last note is an in-flight one (the
//! previous run was killed between steps 2 and 3, or during 3) works out
//! how many bytes of that chunk were delivered — the file's size past the
//! chunk's start (same inode), or the counter for a stream — and forgets the
//! keys whose output ends past that; keys accepted after the last note
//! (killed between 1 and 2) are forgotten too. Those records are then judged
//! afresh, and written, by the rerun; every record the killed run wrote is
//! recorded. A clean end, a checkpoint and a reconciliation each leave an
//! *idle* note, so an older chunk is never looked at again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tiered_dedup::{Deduper, DurabilityError, Fingerprint};

/// The counter file's name inside `--state DIR`.
pub const COUNTER_FILE: &str = "dedup.delivery";
const NOTE_VERSION: u8 = 1;
const IDLE: u8 = 0;
const IN_FLIGHT: u8 = 1;
/// Largest write a pipe takes whole or not at all.
pub const PIPE_PIECE: usize = libc::PIPE_BUF;

/// Where standard output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A regular file: what was delivered shows in its size.
    File {
        /// Device and inode, to know it again.
        dev: u64,
        /// Inode.
        ino: u64,
        /// Its path when the run started (`/proc/self/fd/1`).
        path: PathBuf,
    },
    /// A pipe, socket or terminal: delivery is counted in
    /// [`COUNTER_FILE`].
    Stream,
}

impl Target {
    /// Standard output's kind, from its descriptor `fd`.
    pub fn of(fd: RawFd) -> Target {
        let file = std::mem::ManuallyDrop::new(unsafe_file(fd));
        match file.metadata() {
            Ok(m) if m.is_file() => Target::File {
                dev: m.dev(),
                ino: m.ino(),
                path: std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default(),
            },
            _ => Target::Stream,
        }
    }
}

/// A `File` over a descriptor this module does not own (never dropped:
/// wrapped in `ManuallyDrop` by the callers).
fn unsafe_file(fd: RawFd) -> File {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is open for the duration of the call, and the `File` is
    // never dropped (the callers wrap it in `ManuallyDrop`), so it is
    // neither closed nor used after.
    unsafe { File::from_raw_fd(fd) }
}

/// Where the next byte written to the regular file `fd` goes: its size when
/// it was opened for appending, else its offset.
pub fn file_position(fd: RawFd) -> io::Result<u64> {
    // SAFETY: plain system calls on a descriptor the caller keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_APPEND != 0 {
        let file = std::mem::ManuallyDrop::new(unsafe_file(fd));
        return file.metadata().map(|m| m.len());
    }
    // SAFETY: as above.
    let at = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
    if at < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(at as u64)
}

/// The note of a chunk whose output is being written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// The run's chunk number (matched against the counter).
    pub chunk: u64,
    /// Where the output goes.
    pub target: Target,
    /// For a file: the offset the chunk's output starts at.
    pub start: u64,
    /// Bytes of the chunk's output.
    pub total: u64,
    /// Every accepted record, in input order: its key and where its output
    /// (or the output before it, for a record not written) ends.
    pub accepted: Vec<(Fingerprint, u64)>,
}

/// The note saying no output is in flight.
pub fn idle_note() -> Vec<u8> {
    vec![NOTE_VERSION, IDLE]
}

impl InFlight {
    /// Encodes the note into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&[NOTE_VERSION, IN_FLIGHT]);
        out.extend_from_slice(&self.chunk.to_le_bytes());
        match &self.target {
            Target::File { dev, ino, path } => {
                out.push(0);
                out.extend_from_slice(&dev.to_le_bytes());
                out.extend_from_slice(&ino.to_le_bytes());
                let p = path.as_os_str().as_bytes();
                out.extend_from_slice(&(p.len() as u32).to_le_bytes());
                out.extend_from_slice(p);
            }
            Target::Stream => out.push(1),
        }
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&(self.accepted.len() as u64).to_le_bytes());
        let mut last = 0;
        for &(fp, end) in &self.accepted {
            out.extend_from_slice(&fp.to_bytes());
            put_varint(out, end - last);
            last = end;
        }
    }

    /// Decodes a note; `None` for an idle note, `Err` for one this build
    /// does not read.
    pub fn decode(bytes: &[u8]) -> Result<Option<InFlight>, &'static str> {
        let mut r = Cursor(bytes);
        if r.take(1)?[0] != NOTE_VERSION {
            return Err("note version");
        }
        match r.take(1)?[0] {
            IDLE => return Ok(None),
            IN_FLIGHT => {}
            _ => return Err("note kind"),
        }
        let chunk = r.u64()?;
        let target = match r.take(1)?[0] {
            0 => {
                let dev = r.u64()?;
                let ino = r.u64()?;
                let len = u32::from_le_bytes(r.take(4)?.try_into().map_err(|_| "path")?);
                let path = PathBuf::from(std::ffi::OsStr::from_bytes(r.take(len as usize)?));
                Target::File { dev, ino, path }
            }
            1 => Target::Stream,
            _ => return Err("note target"),
        };
        let start = r.u64()?;
        let total = r.u64()?;
        let n = r.u64()?;
        let mut accepted = Vec::with_capacity(n.min(1 << 20) as usize);
        let mut end = 0u64;
        for _ in 0..n {
            let fp = Fingerprint::from_bytes(r.take(16)?.try_into().map_err(|_| "fingerprint")?);
            end = end.saturating_add(r.varint()?);
            accepted.push((fp, end));
        }
        Ok(Some(InFlight {
            chunk,
            target,
            start,
            total,
            accepted,
        }))
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated note");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| "u64")?,
        ))
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint")
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `DIR/dedup.delivery`, mapped shared: the chunk being written and the
/// bytes of it delivered so far.
pub struct Counter {
    words: *mut u64,
    _file: File,
}

// SAFETY: the mapping is owned by this value and only written through
// `&mut self` (read through `&self`).
unsafe impl Send for Counter {}

const COUNTER_BYTES: usize = 4096;

impl Counter {
    /// Maps the counter file in `dir` (created if missing; never through a
    /// link).
    ///
    /// # Errors
    /// When it cannot be created or mapped.
    pub fn open(dir: &Path) -> io::Result<Counter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(COUNTER_FILE))?;
        if file.metadata()?.len() < COUNTER_BYTES as u64 {
            file.set_len(COUNTER_BYTES as u64)?;
        }
        // SAFETY: a shared read-write mapping of a file this value keeps
        // open, of its length; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                COUNTER_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Counter {
            words: ptr.cast(),
            _file: file,
        })
    }

    /// `(chunk, bytes delivered)` as last stored.
    pub fn read(&self) -> (u64, u64) {
        // SAFETY: two aligned words inside the mapping.
        unsafe {
            (
                std::ptr::read_volatile(self.words),
                std::ptr::read_volatile(self.words.add(1)),
            )
        }
    }

    /// Starts chunk `chunk` at 0 bytes (the count first: a kill between the
    /// two stores leaves the old chunk's number, read as nothing delivered).
    pub fn start(&mut self, chunk: u64) {
        self.delivered(0);
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.words, chunk) };
    }

    /// `bytes` of the current chunk are delivered.
    pub fn delivered(&mut self, bytes: u64) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.words.add(1), bytes) };
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`.
        unsafe {
            libc::munmap(self.words.cast(), COUNTER_BYTES);
        }
    }
}

/// What a run found of the previous one's last chunk.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Keys forgotten: accepted by the previous run but never written.
    pub forgotten: u64,
    /// The in-flight chunk's delivery could not be known (a stream), or its
    /// file was replaced: its records are written again.
    pub unknown: bool,
    /// The file the previous run was writing, when the kill cut its last
    /// chunk's output short (it may end with part of a record, which this
    /// run writes whole).
    pub file: Option<PathBuf>,
}

/// Forgets what the previous run accepted but did not write (see the module
/// docs), then leaves an idle note.
///
/// # Errors
/// When the engine cannot forget or note (its log failed): the message.
pub fn reconcile(engine: &Deduper, counter: &Counter) -> Result<Reconciled, String> {
    let mut done = Reconciled::default();
    let Some(recovery) = engine.recovery() else {
        return Ok(done);
    };
    let mut forget: Vec<Fingerprint> = recovery.accepted_since_note.clone();
    let in_flight = recovery
        .note
        .as_deref()
        .and_then(|n| InFlight::decode(n).ok().flatten());
    if let Some(note) = &in_flight {
        let delivered = match &note.target {
            Target::File { dev, ino, path } => match std::fs::metadata(path) {
                Ok(m) if m.dev() == *dev && m.ino() == *ino => {
                    let d = m.len().saturating_sub(note.start).min(note.total);
                    if d < note.total {
                        done.file = Some(path.clone());
                    }
                    d
                }
                _ => {
                    done.unknown = true;
                    0
                }
            },
            Target::Stream => match counter.read() {
                (chunk, bytes) if chunk == note.chunk => bytes.min(note.total),
                _ => {
                    done.unknown = note.total > 0;
                    0
                }
            },
        };
        forget.extend(
            note.accepted
                .iter()
                .filter(|&&(_, end)| end > delivered)
                .map(|&(fp, _)| fp),
        );
    }
    for fp in &forget {
        if engine.forget(fp).map_err(|e| e.to_string())? {
            done.forgotten += 1;
        }
    }
    if in_flight.is_some() || !forget.is_empty() {
        engine
            .note(&idle_note())
            .map_err(|e: DurabilityError| e.to_string())?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip() {
        let note = InFlight {
            chunk: 7,
            target: Target::File {
                dev: 1,
                ino: 2,
                path: PathBuf::from("/tmp/out"),
            },
            start: 100,
            total: 50,
            accepted: vec![
                (Fingerprint(5), 10),
                (Fingerprint(6), 10),
                (Fingerprint(7), 50),
            ],
        };
        let mut bytes = Vec::new();
        note.encode(&mut bytes);
        assert_eq!(InFlight::decode(&bytes), Ok(Some(note)));
        assert_eq!(InFlight::decode(&idle_note()), Ok(None));
        for cut in 0..bytes.len() {
            assert!(InFlight::decode(&bytes[..cut]).is_err());
        }
    }
}
