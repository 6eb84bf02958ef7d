//! Reading records: large reads from each input in turn, cut at newlines
//! with `memchr`, handed on as chunks of whole records. A chunk is handed on
//! as soon as a read ends with at least one whole record, so output follows
//! a slow pipe closely; a record longer than the buffer grows it, up to the
//! longest record allowed: past that, a chunk with an empty placeholder for
//! it is handed on at once (so `--on-error fail` stops without waiting for
//! a newline that may never come, as from `/dev/zero`), and the rest of its
//! bytes are skipped, never held.
//!
//! Each read waits for data with `poll` in short ticks, checking a stop
//! flag between them: a run asked to stop (a signal) stops reading within a
//! tick, even from a pipe that sends nothing, and never consumes input it
//! will not judge.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a read waits for data before it checks the stop flag again.
const POLL_TICK: Duration = Duration::from_millis(50);

/// Bytes asked for by one read. 512 KiB: with 1 MiB, the chunks in flight
/// (read, queued, judged; each with its fingerprints, verdicts and output)
/// took 7 MB more of `dedup`'s peak memory, for no measured gain in speed;
/// 256 KiB saved 4 MB more and measured 5% slower (within the noise).
pub const READ_SIZE: usize = 1 << 19;

/// Where records come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Standard input.
    Stdin,
    /// A file.
    File(PathBuf),
}

impl Source {
    /// `FILE` arguments as sources: none, or `-`, is standard input.
    pub fn from_args(files: &[PathBuf]) -> Vec<Source> {
        if files.is_empty() {
            return vec![Source::Stdin];
        }
        files
            .iter()
            .map(|f| {
                if f.as_os_str() == "-" {
                    Source::Stdin
                } else {
                    Source::File(f.clone())
                }
            })
            .collect()
    }

    /// The name in messages.
    pub fn name(&self) -> String {
        match self {
            Source::Stdin => "<stdin>".to_owned(),
            Source::File(p) => p.display().to_string(),
        }
    }

    /// The input's size, if it is a regular file (standard input too, when
    /// redirected from one).
    pub fn size(&self) -> Option<u64> {
        let metadata = match self {
            Source::Stdin => File::from(io::stdin().as_fd().try_clone_to_owned().ok()?).metadata(),
            Source::File(p) => std::fs::metadata(p),
        };
        metadata.ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    fn open(&self) -> io::Result<File> {
        match self {
            // A `File` on a duplicate of the descriptor: reads go straight to
            // it, without `Stdin`'s small buffer.
            Source::Stdin => Ok(File::from(io::stdin().as_fd().try_clone_to_owned()?)),
            Source::File(p) => open_file(p),
        }
    }
}

/// Waits up to one tick for `file` to have data (or end, or an error):
/// `false` when the tick passed first.
fn wait_readable(file: &File) -> io::Result<bool> {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let tick = POLL_TICK.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd, for the duration of the call.
    match unsafe { libc::poll(&mut fds, 1, tick) } {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        // Readable, at its end, or failed: the read says which.
        _ => Ok(true),
    }
}

fn open_file(p: &Path) -> io::Result<File> {
    let f = File::open(p)?;
    if f.metadata()?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a directory",
        ));
    }
    Ok(f)
}

/// An input that could not be opened or read.
#[derive(Debug)]
pub struct InputError {
    /// The input's name.
    pub source_name: String,
    /// What failed.
    pub error: io::Error,
}

/// Whole records of one source: `data` holds them with their separators;
/// record `i` ends at `ends[i]` (a newline, or `data.len()` for a last record
/// that has none).
#[derive(Debug, Default)]
pub struct Chunk {
    /// Index of the source in the reader's list.
    pub source: usize,
    /// Line number of the first record (from 1).
    pub first_line: u64,
    /// The records' bytes.
    pub data: Vec<u8>,
    /// Where each record ends.
    pub ends: Vec<usize>,
    /// Records longer than the limit: (index, their length in bytes). Their
    /// bytes are not kept (the record is empty here).
    pub too_long: Vec<(usize, u64)>,
}

impl Chunk {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Record `i`: its bytes without the newline, and whether it had one.
    #[inline]
    pub fn record(&self, i: usize) -> (&[u8], bool) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] + 1 };
        let end = self.ends[i];
        (&self.data[start..end], end < self.data.len())
    }

    fn reset(&mut self) {
        self.data.clear();
        self.ends.clear();
        self.too_long.clear();
    }
}

/// What [`RecordReader::next_chunk`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextChunk {
    /// A chunk of whole records.
    Records,
    /// Every source is exhausted.
    End,
    /// The stop flag was raised before the next read. Bytes of an
    /// incomplete record read before it are dropped
    /// ([`RecordReader::abandoned`]).
    Stopped,
}

/// Reads the sources in order and cuts them into chunks.
pub struct RecordReader {
    sources: Vec<Source>,
    /// The source being read, and its file.
    current: Option<(usize, File)>,
    next_source: usize,
    /// Line number of the next record of the current source.
    next_line: u64,
    /// Bytes of an incomplete record, carried into the next chunk.
    carry: Vec<u8>,
    /// Bytes read so far, over all sources.
    bytes_read: u64,
    /// The longest record kept.
    max_record: usize,
    /// Skipping the rest of a too-long record (up to its newline).
    skipping: bool,
    /// Raised to stop reading.
    stop: Arc<AtomicBool>,
}

impl RecordReader {
    /// A reader of `sources`; each file is opened when its turn comes.
    /// Records longer than `max_record` bytes become too-long placeholders;
    /// reading stops once `stop` is raised.
    pub fn new(sources: Vec<Source>, max_record: u64, stop: Arc<AtomicBool>) -> Self {
        RecordReader {
            sources,
            current: None,
            next_source: 0,
            next_line: 1,
            carry: Vec::new(),
            bytes_read: 0,
            max_record: usize::try_from(max_record).unwrap_or(usize::MAX),
            skipping: false,
            stop,
        }
    }

    /// Bytes of an incomplete record read before a stop, and its line
    /// (`FILE:LINE`), if any.
    pub fn abandoned(&self) -> Option<(u64, String)> {
        let (index, _) = self.current.as_ref()?;
        let bytes = self.carry.len() as u64;
        (bytes > 0).then(|| {
            (
                bytes,
                format!("{}:{}", self.sources[*index].name(), self.next_line),
            )
        })
    }

    /// Checks up front that every file can be opened, so that a typo in the
    /// last name fails before any output.
    ///
    /// # Errors
    /// The first file that cannot be opened.
    pub fn check_sources(&self) -> Result<(), InputError> {
        for s in &self.sources {
            if let Source::File(p) = s {
                open_file(p).map_err(|error| InputError {
                    source_name: s.name(),
                    error,
                })?;
            }
        }
        Ok(())
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next chunk of whole records, reusing `chunk`'s buffers.
    ///
    /// # Errors
    /// A source that cannot be opened or read.
    pub fn next_chunk(&mut self, chunk: &mut Chunk) -> Result<NextChunk, InputError> {
        chunk.reset();
        loop {
            if self.stop.load(Ordering::Acquire) {
                // What was read of an incomplete record goes back.
                if !chunk.data.is_empty() {
                    self.carry.clear();
                    self.carry.append(&mut chunk.data);
                }
                return Ok(NextChunk::Stopped);
            }
            let (index, file) = match &mut self.current {
                Some((index, file)) => (*index, file),
                None => {
                    if self.next_source == self.sources.len() {
                        return Ok(NextChunk::End);
                    }
                    let index = self.next_source;
                    let source = &self.sources[index];
                    let file = source.open().map_err(|error| InputError {
                        source_name: source.name(),
                        error,
                    })?;
                    self.next_source += 1;
                    self.next_line = 1;
                    let (_, file) = self.current.insert((index, file));
                    (index, file)
                }
            };
            match wait_readable(file) {
                Ok(false) => continue, // the tick passed: check the flag
                Ok(true) => {}
                Err(error) => {
                    return Err(InputError {
                        source_name: self.sources[index].name(),
                        error,
                    })
                }
            }
            let data = &mut chunk.data;
            if data.is_empty() {
                data.append(&mut self.carry);
            }
            // Read into the spare room. Grown exactly, not doubled: chunks
            // stay about one read long, and their memory is reused.
            let start = data.len();
            data.reserve_exact(READ_SIZE);
            data.resize(start + READ_SIZE, 0);
            let n = loop {
                match file.read(&mut data[start..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        data.truncate(start);
                        return Err(InputError {
                            source_name: self.sources[index].name(),
                            error,
                        });
                    }
                }
            };
            data.truncate(start + n);
            self.bytes_read += n as u64;
            chunk.source = index;
            chunk.first_line = self.next_line;
            if self.skipping {
                // The rest of a too-long record: dropped up to its newline.
                match memchr::memchr(b'\n', data) {
                    Some(end) => {
                        data.drain(..=end);
                        self.skipping = false;
                    }
                    None => {
                        data.clear();
                        if n == 0 {
                            self.skipping = false;
                            self.current = None;
                        }
                        continue;
                    }
                }
            }
            if n == 0 {
                // End of this source: what is left is its last record, which
                // has no newline.
                self.current = None;
                if data.is_empty() {
                    continue;
                }
                self.cut(chunk, true);
                return Ok(NextChunk::Records);
            }
            // Only the new bytes can hold the last newline.
            let from = start.min(data.len());
            if memchr::memrchr(b'\n', &data[from..]).is_some() {
                self.cut(chunk, false);
                return Ok(NextChunk::Records);
            }
            if data.len() > self.max_record {
                // One record, too long to keep: handed on at once as a
                // placeholder; the rest of it is skipped.
                chunk.too_long.push((0, data.len() as u64));
                data.clear();
                chunk.ends.push(0);
                self.next_line += 1;
                self.skipping = true;
                return Ok(NextChunk::Records);
            }
        }
    }

    /// Records the ends of `chunk`'s records; moves an incomplete last
    /// record to `carry` unless this is the end of the source. A first
    /// record longer than the limit becomes an empty placeholder listed in
    /// `too_long`.
    fn cut(&mut self, chunk: &mut Chunk, at_end: bool) {
        let first_end = memchr::memchr(b'\n', &chunk.data).unwrap_or(chunk.data.len());
        if first_end > self.max_record {
            // Only the first record can span reads, so only it can be too
            // long: keep its newline (if any) as an empty record.
            chunk.too_long.push((0, first_end as u64));
            chunk.data.drain(..first_end);
            if chunk.data.is_empty() {
                // It ended the source, without a newline.
                chunk.ends.push(0);
                self.next_line += 1;
                return;
            }
        }
        chunk.ends.extend(memchr::memchr_iter(b'\n', &chunk.data));
        let complete = chunk.ends.last().map_or(0, |&e| e + 1);
        if complete < chunk.data.len() {
            if at_end {
                chunk.ends.push(chunk.data.len());
            } else {
                self.carry.clear();
                self.carry.extend_from_slice(&chunk.data[complete..]);
                chunk.data.truncate(complete);
            }
        }
        self.next_line += chunk.ends.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;

    /// Every record of every chunk, with its line number and newline flag.
    fn read_all(files: &[&[u8]]) -> Vec<(usize, u64, Vec<u8>, bool)> {
        let dir = tempfile::tempdir().unwrap();
        let sources = files
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
                Source::File(p)
            })
            .collect();
        let mut reader = RecordReader::new(sources, u64::MAX, Arc::default());
        let mut chunk = Chunk::default();
        let mut out = Vec::new();
        while reader.next_chunk(&mut chunk).unwrap() == NextChunk::Records {
            assert!(chunk.len() > 0, "chunks are never empty");
            for i in 0..chunk.len() {
                let (rec, nl) = chunk.record(i);
                out.push((chunk.source, chunk.first_line + i as u64, rec.to_vec(), nl));
            }
        }
        out
    }

    /// The same, by the obvious method.
    fn model(files: &[&[u8]]) -> Vec<(usize, u64, Vec<u8>, bool)> {
        let mut out = Vec::new();
        for (s, bytes) in files.iter().enumerate() {
            let mut line = 1;
            let mut rest: &[u8] = bytes;
            while !rest.is_empty() {
                match rest.iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        out.push((s, line, rest[..p].to_vec(), true));
                        rest = &rest[p + 1..];
                    }
                    None => {
                        out.push((s, line, rest.to_vec(), false));
                        rest = &[];
                    }
                }
                line += 1;
            }
        }
        out
    }

    #[test]
    fn records_across_files_and_buffer_boundaries() {
        let long = vec![b'x'; 3 * READ_SIZE + 17];
        let mut big = Vec::new();
        for i in 0..200_000u32 {
            big.extend_from_slice(format!("{i}\n").as_bytes());
        }
        let mut with_long = b"a\n".to_vec();
        with_long.extend_from_slice(&long);
        with_long.extend_from_slice(b"\nb");
        let files: [&[u8]; 5] = [b"", b"\n\n", &big, &with_long, b"no newline"];
        assert_eq!(read_all(&files), model(&files));
    }

    #[test]
    fn records_past_the_limit_become_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut bytes = b"a\n".to_vec();
        bytes.extend(vec![b'x'; 3 * READ_SIZE + 5]);
        bytes.extend_from_slice(b"\nb\n");
        // Just over the limit, inside one read after the first.
        bytes.extend(vec![b'y'; READ_SIZE + 1]);
        bytes.extend_from_slice(b"\nc\n");
        bytes.extend(vec![b'z'; 2 * READ_SIZE]); // the last, without a newline
        std::fs::write(&p, &bytes).unwrap();
        let mut reader = RecordReader::new(vec![Source::File(p)], READ_SIZE as u64, Arc::default());
        let mut chunk = Chunk::default();
        let mut records = Vec::new();
        while reader.next_chunk(&mut chunk).unwrap() == NextChunk::Records {
            for i in 0..chunk.len() {
                let long = chunk
                    .too_long
                    .iter()
                    .find(|(at, _)| *at == i)
                    .map(|(_, n)| *n);
                let (rec, nl) = chunk.record(i);
                records.push((chunk.first_line + i as u64, rec.to_vec(), nl, long));
                assert!(
                    chunk.data.len() <= 3 * READ_SIZE,
                    "too-long bytes are not held"
                );
            }
        }
        // Handed on once more than the limit was read; the newline of
        // record 2 is skipped with its rest, so its placeholder has none.
        let expected = vec![
            (1, b"a".to_vec(), true, None),
            (2, Vec::new(), false, Some(2 * READ_SIZE as u64 - 2)),
            (3, b"b".to_vec(), true, None),
            (4, Vec::new(), true, Some(READ_SIZE as u64 + 1)),
            (5, b"c".to_vec(), true, None),
            (6, Vec::new(), false, Some(2 * READ_SIZE as u64 - 14)),
        ];
        assert_eq!(records, expected);
    }

    #[test]
    fn a_raised_stop_flag_ends_reading_of_an_idle_pipe() {
        let (read_end, write_end) = {
            let mut fds = [0; 2];
            // SAFETY: a two-element array for pipe(2).
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: the descriptors were just created and are owned here.
            unsafe {
                use std::os::fd::FromRawFd;
                (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
            }
        };
        let path = PathBuf::from(format!("/proc/self/fd/{}", read_end.as_raw_fd()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut reader = RecordReader::new(vec![Source::File(path)], u64::MAX, Arc::clone(&stop));
        (&write_end).write_all(b"partial").unwrap();
        let raiser = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::Release);
            })
        };
        let started = std::time::Instant::now();
        let mut chunk = Chunk::default();
        assert_eq!(reader.next_chunk(&mut chunk).unwrap(), NextChunk::Stopped);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(reader.abandoned().map(|(n, _)| n), Some(7));
        raiser.join().unwrap();
        drop(write_end);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_bytes_read_like_the_model(
            files in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![Just(b'\n'), Just(b'a'), any::<u8>()], 0..300),
                1..4)
        ) {
            let files: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(read_all(&files), model(&files));
        }
    }
}
