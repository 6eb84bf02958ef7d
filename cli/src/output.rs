//! Writing records: into one buffer per chunk, then one `write` of the
//! buffer to standard output (no line buffering).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;

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
    records: u64,
    bytes: u64,
}

impl Output {
    /// Standard output, through a duplicate of its descriptor so that every
    /// flush is one unbuffered write.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated.
    pub fn stdout(mode: OutputMode, format: Format, annotate_field: &str) -> io::Result<Self> {
        let file = File::from(io::stdout().as_fd().try_clone_to_owned()?);
        Ok(Self::new(Box::new(file), mode, format, annotate_field))
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
            records: 0,
            bytes: 0,
        }
    }

    /// Writes (into the buffer) a judged record, if the mode selects it.
    #[inline]
    pub fn judged(&mut self, record: &[u8], newline: bool, label: Label) {
        match (self.mode, label) {
            (OutputMode::Unique, Label::New) | (OutputMode::Duplicates, Label::Duplicate) => {
                self.raw(record, newline);
            }
            (OutputMode::Annotate, _) => self.annotated(record, newline, label),
            _ => {}
        }
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
        self.records += 1;
    }

    /// Writes the buffer out in one `write_all`.
    ///
    /// # Errors
    /// When writing fails (a closed pipe: [`io::ErrorKind::BrokenPipe`]).
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.bytes += self.buf.len() as u64;
            let r = self.out.write_all(&self.buf);
            self.buf.clear();
            r?;
        }
        self.out.flush()
    }

    /// Records written (or buffered) so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

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
        out.flush().unwrap();
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
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
}
