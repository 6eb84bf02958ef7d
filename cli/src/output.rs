//! Writing records: into one buffer per chunk, then one `write` of the
//! buffer to standard output (no line buffering).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use crate::cli::{Format, OutputMode};

/// What is written for a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// The first accepted occurrence.
    New,
    /// A repeat inside the window.
    Duplicate,
}

impl Label {
    fn as_str(self) -> &'static str {
        match self {
            Label::New => "new",
            Label::Duplicate => "duplicate",
        }
    }
}

/// The output stream.
pub struct Output {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    mode: OutputMode,
    format: Format,
    /// `,"_dedup":` — what annotate inserts before the label.
    member: Vec<u8>,
    /// The last record written had no newline: one goes before the next.
    owes_newline: bool,
    /// Where each record buffered since the last flush ends in `buf`.
    ends: Vec<usize>,
    /// Standard output's descriptor, to see whether its reader is gone.
    fd: Option<RawFd>,
    /// Records and bytes delivered (accepted by a `write`).
    records: u64,
    bytes: u64,
    /// Bytes the last flush delivered.
    last_flush: u64,
}

/// What a flush delivered: the first `records` records buffered since the
/// previous flush were accepted by `write` in full; the others were not.
#[derive(Debug)]
pub struct Delivery {
    /// Records delivered whole.
    pub records: usize,
    /// Why the rest were not delivered.
    pub error: Option<io::Error>,
}

impl Output {
    /// Standard output, through a duplicate of its descriptor so that every
    /// flush is one unbuffered write.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated.
    pub fn stdout(mode: OutputMode, format: Format, annotate_field: &str) -> io::Result<Self> {
        let file = File::from(io::stdout().as_fd().try_clone_to_owned()?);
        let fd = file.as_raw_fd();
        let mut out = Self::new(Box::new(file), mode, format, annotate_field);
        out.fd = Some(fd);
        Ok(out)
    }

    /// Writes to `out`.
    pub fn new(
        out: Box<dyn Write + Send>,
        mode: OutputMode,
        format: Format,
        annotate_field: &str,
    ) -> Self {
        let mut member = b",".to_vec();
        // Serializing a string cannot fail.
        let _ = serde_json::to_writer(&mut member, annotate_field);
        member.push(b':');
        Output {
            out,
            buf: Vec::with_capacity(crate::input::READ_SIZE + 4096),
            mode,
            format,
            member,
            owes_newline: false,
            ends: Vec::new(),
            fd: None,
            records: 0,
            bytes: 0,
            last_flush: 0,
        }
    }

    /// Writes (into the buffer) a judged record, if the mode selects it;
    /// true when it did.
    #[inline]
    pub fn judged(&mut self, record: &[u8], newline: bool, label: Label) -> bool {
        match (self.mode, label) {
            (OutputMode::Unique, Label::New) | (OutputMode::Duplicates, Label::Duplicate) => {
                self.raw(record, newline);
                true
            }
            (OutputMode::Annotate, _) => {
                self.annotated(record, newline, label);
                true
            }
            _ => false,
        }
    }

    /// Writes (into the buffer) every record of a chunk that the mode
    /// selects, as [`Output::judged`] would one by one: `data` holds the
    /// records with their newlines, record `i` ends at `ends[i]` (only the
    /// last may end at `data.len()`, without a newline), `label(i)` is its
    /// verdict; `wrote(i)` is called for each record written, in order.
    ///
    /// Records next to each other in `data` are copied with one
    /// `extend_from_slice`: consecutive records the mode keeps are
    /// contiguous there, newlines included.
    pub fn judged_chunk(
        &mut self,
        data: &[u8],
        ends: &[usize],
        label: impl Fn(usize) -> Label,
        mut wrote: impl FnMut(usize),
    ) {
        let want = match self.mode {
            OutputMode::Unique => Label::New,
            OutputMode::Duplicates => Label::Duplicate,
            OutputMode::Annotate => {
                let mut start = 0;
                for (i, &end) in ends.iter().enumerate() {
                    self.annotated(&data[start..end], end < data.len(), label(i));
                    wrote(i);
                    start = end + 1;
                }
                return;
            }
        };
        let n = ends.len();
        let mut i = 0;
        while i < n {
            if label(i) != want {
                i += 1;
                continue;
            }
            // A run of kept records `i..j`: bytes `start..stop` of `data`.
            let start = if i == 0 { 0 } else { ends[i - 1] + 1 };
            self.begin();
            // Invariant: `data[start + k]` goes to `buf[at + k]`.
            let at = self.buf.len();
            let mut j = i;
            while j < n && label(j) == want {
                // A record's end in `buf`: past its newline if it has one.
                self.ends.push(at + (ends[j] + 1).min(data.len()) - start);
                wrote(j);
                j += 1;
            }
            let last = ends[j - 1];
            self.buf
                .extend_from_slice(&data[start..(last + 1).min(data.len())]);
            if last == data.len() {
                // The chunk's last record, without a newline: one goes
                // before the next record written.
                self.owes_newline = true;
            }
            i = j;
        }
    }

    /// True when standard output is a pipe or socket whose reader has
    /// gone (a write would fail with `EPIPE`).
    pub fn reader_gone(&self) -> bool {
        let Some(fd) = self.fd else {
            return false;
        };
        let mut fds = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call; zero
        // timeout.
        let ready = unsafe { libc::poll(&mut fds, 1, 0) };
        ready > 0 && fds.revents & libc::POLLERR != 0
    }

    /// Writes a record unchanged (`--on-error pass`).
    #[inline]
    pub fn raw(&mut self, record: &[u8], newline: bool) {
        self.begin();
        self.buf.extend_from_slice(record);
        self.end(newline);
    }

    fn annotated(&mut self, record: &[u8], newline: bool, label: Label) {
        self.begin();
        match self.format {
            Format::Lines => {
                self.buf.extend_from_slice(label.as_str().as_bytes());
                self.buf.push(b'\t');
                self.buf.extend_from_slice(record);
            }
            Format::Ndjson => {
                // The record is a valid JSON object (checked before judging):
                // insert the member before its closing brace.
                let close = record
                    .iter()
                    .rposition(|&b| b == b'}')
                    .unwrap_or(record.len());
                let open = record.iter().position(|&b| b == b'{').unwrap_or(0);
                let empty = record[open + 1..close]
                    .iter()
                    .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
                self.buf.extend_from_slice(&record[..close]);
                let member = if empty {
                    &self.member[1..]
                } else {
                    &self.member[..]
                };
                self.buf.extend_from_slice(member);
                self.buf.push(b'"');
                self.buf.extend_from_slice(label.as_str().as_bytes());
                self.buf.push(b'"');
                self.buf.extend_from_slice(&record[close..]);
            }
        }
        self.end(newline);
    }

    #[inline]
    fn begin(&mut self) {
        if self.owes_newline {
            self.buf.push(b'\n');
            self.owes_newline = false;
        }
    }

    #[inline]
    fn end(&mut self, newline: bool) {
        if newline {
            self.buf.push(b'\n');
        } else {
            self.owes_newline = true;
        }
        self.ends.push(self.buf.len());
    }

    /// Bytes in the buffer (the end of the last record buffered).
    pub fn buffered(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Standard output's descriptor (`None` for another writer).
    pub fn fd(&self) -> Option<RawFd> {
        self.fd
    }

    /// Writes the buffer out (one `write` unless the output takes less at
    /// a time) and says which of its records were delivered: a record
    /// counts as delivered once `write` has accepted its last byte. After
    /// an error nothing more is written.
    pub fn flush(&mut self) -> Delivery {
        self.flush_tracked(usize::MAX, false, |_| {})
    }

    /// [`Output::flush`] in writes of at most `piece` bytes, cut at record
    /// ends where a record fits, calling `delivered` with the bytes taken
    /// so far after each. With `nowait` (a pipe, `piece` ≤ `PIPE_BUF`), each
    /// piece waits for room first (`poll`) and is then written without
    /// sleeping (`RWF_NOWAIT`): a pipe takes such a write whole or not at
    /// all, and a process killed while waiting has nothing in flight (a
    /// blocking write woken for room copies before it notices the kill).
    pub fn flush_tracked(
        &mut self,
        piece: usize,
        nowait: bool,
        mut delivered: impl FnMut(u64),
    ) -> Delivery {
        let mut written = 0;
        let mut error = None;
        while written < self.buf.len() {
            let end = if piece >= self.buf.len() - written {
                self.buf.len()
            } else {
                // The last record end within one piece, else a piece.
                let limit = written + piece;
                let i = self.ends.partition_point(|&e| e <= limit);
                match i.checked_sub(1).map(|i| self.ends[i]) {
                    Some(e) if e > written => e,
                    _ => limit,
                }
            };
            let result = if let (true, Some(fd)) = (nowait, self.fd) {
                write_nowait(fd, &self.buf[written..end], || {
                    // Counted just before the write: the pipe has room and
                    // takes it whole, so only a kill in the few
                    // instructions before the system call counts a piece
                    // not taken (after the write, the kill lands in the
                    // copy or on its return: a window a thousand times
                    // wider, and a piece counted short).
                    delivered(end as u64);
                })
            } else {
                self.out.write(&self.buf[written..end])
            };
            match result {
                Ok(0) => {
                    error = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => {
                    written += n;
                    delivered(written as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if error.is_some() {
            // A piece counted before a write that failed: the true count.
            delivered(written as u64);
        }
        if error.is_none() {
            if let Err(e) = self.out.flush() {
                error = Some(e);
            }
        }
        let delivered = self.ends.partition_point(|&end| end <= written);
        let delivery = Delivery {
            records: delivered,
            error,
        };
        self.records += delivered as u64;
        self.bytes += written as u64;
        self.last_flush = written as u64;
        self.buf.clear();
        self.ends.clear();
        delivery
    }

    /// Drops what is buffered, unwritten.
    pub fn discard(&mut self) {
        self.buf.clear();
        self.ends.clear();
        self.owes_newline = false;
    }

    /// Bytes the last flush delivered.
    pub fn bytes_last_flush(&self) -> u64 {
        self.last_flush
    }

    /// Records delivered so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes delivered so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Writes `buf` to `fd` once room is there, never sleeping inside the
/// write itself (see [`Output::flush_tracked`]), calling `ready` just
/// before; falls back to a blocking write where the kernel has no
/// `RWF_NOWAIT` for this file.
fn write_nowait(fd: RawFd, buf: &[u8], mut ready: impl FnMut()) -> io::Result<usize> {
    loop {
        let mut fds = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut fds, 1, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        ready();
        // SAFETY: one iovec over `buf`, valid for the call; offset -1 is
        // the file's current position (a pipe has none).
        let n = unsafe { libc::pwritev2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => {}
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                // SAFETY: a plain write of `buf` to `fd`.
                let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
                return if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                };
            }
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn written(mode: OutputMode, format: Format, f: impl FnOnce(&mut Output)) -> String {
        let sink = Shared::default();
        let mut out = Output::new(Box::new(sink.clone()), mode, format, "_dedup");
        f(&mut out);
        let d = out.flush();
        assert!(d.error.is_none());
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// Takes `room` bytes, then fails as a closed pipe does.
    struct Closing {
        taken: Shared,
        room: usize,
    }
    impl Write for Closing {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = b.len().min(self.room).min(3);
            self.room -= n;
            self.taken.write(&b[..n])
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_partial_write_says_which_records_were_delivered() {
        let taken = Shared::default();
        let sink = Closing {
            taken: taken.clone(),
            room: 7,
        };
        let mut out = Output::new(Box::new(sink), OutputMode::Unique, Format::Lines, "_dedup");
        for r in [&b"ab"[..], b"cd", b"ef", b"gh"] {
            out.judged(r, true, Label::New);
        }
        let d = out.flush();
        // "ab\ncd\ne": two whole records, the third cut.
        assert_eq!(d.records, 2);
        assert_eq!(d.error.unwrap().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!((out.records(), out.bytes()), (2, 7));
        assert_eq!(&*taken.0.lock().unwrap(), b"ab\ncd\ne");
    }

    #[test]
    fn a_missing_newline_is_kept_unless_more_follows() {
        let s = written(OutputMode::Unique, Format::Lines, |o| {
            o.judged(b"a", false, Label::New);
            o.judged(b"b", true, Label::New);
            o.judged(b"c", false, Label::New);
        });
        assert_eq!(s, "a\nb\nc");
    }

    #[test]
    fn annotate_adds_a_member_or_a_column() {
        let s = written(OutputMode::Annotate, Format::Ndjson, |o| {
            o.judged(br#"{"id":1} "#, true, Label::New);
            o.judged(b"{ }", true, Label::Duplicate);
        });
        assert_eq!(
            s,
            "{\"id\":1,\"_dedup\":\"new\"} \n{ \"_dedup\":\"duplicate\"}\n"
        );
        let s = written(OutputMode::Annotate, Format::Lines, |o| {
            o.judged(b"x", true, Label::Duplicate);
        });
        assert_eq!(s, "duplicate\tx\n");
    }

    proptest! {
        /// A chunk written at once is what writing its records one by one
        /// gives: the same bytes, record ends and records reported written,
        /// after a record that owes a newline too.
        #[test]
        fn a_chunk_at_once_is_its_records_one_by_one(
            records in prop::collection::vec(
                (prop::collection::vec(any::<u8>().prop_filter("a newline", |&b| b != b'\n'), 0..4), any::<bool>()),
                1..40,
            ),
            last_newline in any::<bool>(),
            owes in any::<bool>(),
            mode in prop::sample::select(vec![OutputMode::Unique, OutputMode::Duplicates, OutputMode::Annotate]),
        ) {
            let mut data = Vec::new();
            let mut ends = Vec::new();
            for (i, (r, _)) in records.iter().enumerate() {
                data.extend_from_slice(r);
                ends.push(data.len());
                if i + 1 < records.len() || last_newline {
                    data.push(b'\n');
                }
            }
            let label = |i: usize| if records[i].1 { Label::New } else { Label::Duplicate };
            let mut one_by_one = Output::new(Box::new(io::sink()), mode, Format::Lines, "_dedup");
            let mut at_once = Output::new(Box::new(io::sink()), mode, Format::Lines, "_dedup");
            one_by_one.owes_newline = owes;
            at_once.owes_newline = owes;
            let mut wrote_one_by_one = Vec::new();
            let mut start = 0;
            for (i, &end) in ends.iter().enumerate() {
                if one_by_one.judged(&data[start..end], end < data.len(), label(i)) {
                    wrote_one_by_one.push(i);
                }
                start = end + 1;
            }
            let mut wrote_at_once = Vec::new();
            at_once.judged_chunk(&data, &ends, label, |i| wrote_at_once.push(i));
            prop_assert_eq!(&one_by_one.buf, &at_once.buf);
            prop_assert_eq!(&one_by_one.ends, &at_once.ends);
            prop_assert_eq!(one_by_one.owes_newline, at_once.owes_newline);
            prop_assert_eq!(wrote_one_by_one, wrote_at_once);
        }
    }
}
