//! The main thread's side of a run: judging each chunk and writing its
//! output, so that what is marked and what is delivered agree.
//!
//! - Under `--on-error fail`, nothing at or after the first bad record is
//!   judged: parse errors are known before judging, and event-time records
//!   are screened here (`late`, `future`) against the watermark before the
//!   engine sees them, so a stop never leaves judged-and-marked records
//!   behind it.
//! - Records the exact tier could not judge (`Verdict::Unavailable`) are
//!   neither written nor recorded; the rest of the chunk was judged (and
//!   marked), so it is written before the run stops.
//! - A write that fails part-way says which records were delivered; the
//!   others are counted `undelivered`, and those judged new (recorded) are
//!   named by line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tiered_dedup::{Deduper, Fingerprint, Timestamp, Unsettled, Verdict};

use crate::cli::{OnError, RunArgs};
use crate::event_time::format_timestamp;
use crate::input::Source;
use crate::judge::Judge;
use crate::output::{Delivery, Label, Output};
use crate::parse::Parsed;
use crate::record::{BadKind, BadRecord};
use crate::serve::RunCounters;
use crate::state::delivery::{self, Counter, InFlight, Target};
use crate::summary::{Progress, Tally};

/// Bad (and unavailable) records reported one by one under `skip` and
/// `pass`; the rest are only counted.
const MAX_REPORTED: u64 = 20;

/// Why a chunk ended the run.
#[derive(Debug)]
pub enum ChunkStop {
    /// Bad input under `fail` (already reported).
    BadInput,
    /// The exact tier could not judge some records (already reported).
    Unavailable,
    /// Standard output failed (`BrokenPipe`: it was closed).
    Output(std::io::Error),
}

/// Records judged but not delivered, for the message that names them.
#[derive(Clone, Debug)]
pub struct Undelivered {
    /// `FILE`.
    pub source: String,
    /// Line of the first record not delivered.
    pub first_line: u64,
    /// Line of the last record judged.
    pub last_line: u64,
}

/// What became of one record written into the output buffer.
#[derive(Clone, Copy, Debug)]
enum Fate {
    New,
    Duplicate,
    Passed(BadKind),
}

/// `--state` with `--durability os|sync`: each chunk's accepted records are
/// noted in the engine's log before its output is written, and delivery is
/// tracked (see `state/delivery.rs`).
pub struct Delivering {
    counter: Counter,
    target: Target,
    /// Sync the output too (a regular file, `--durability sync`).
    sync_output: bool,
    /// The next chunk's number.
    chunk: u64,
    accepted: Vec<(Fingerprint, u64)>,
    note: Vec<u8>,
    /// Accepted records forgotten because their output failed.
    pub forgotten: u64,
    /// The engine's log failed (the message).
    pub failure: Option<String>,
}

impl Delivering {
    /// Tracks delivery to standard output (`fd`) with the counter in the
    /// state directory.
    pub fn new(counter: Counter, fd: Option<std::os::fd::RawFd>, sync_output: bool) -> Self {
        let target = fd.map_or(Target::Stream, Target::of);
        Delivering {
            sync_output: sync_output && matches!(target, Target::File { .. }),
            counter,
            target,
            chunk: 0,
            accepted: Vec::new(),
            note: Vec::new(),
            forgotten: 0,
            failure: None,
        }
    }
}

/// Event-time screening: the bounds a record's time must keep.
#[derive(Clone, Copy, Debug)]
pub struct TimeBounds {
    /// Allowed lateness in nanoseconds (`u64::MAX`: none is late).
    pub lateness_ns: u64,
    /// `--max-future` in nanoseconds, if bounded.
    pub max_future_ns: Option<u64>,
}

/// The main thread's state for a run.
pub struct Job<'a> {
    pub args: &'a RunArgs,
    pub sources: &'a [Source],
    pub engine: &'a Deduper,
    pub out: &'a mut Output,
    pub progress: &'a Progress,
    /// `Some` under event time.
    pub time_bounds: Option<TimeBounds>,
    pub tally: Tally,
    pub bytes_read: u64,
    /// Set by the first failed write.
    pub undelivered: Option<Undelivered>,
    reported: u64,
    verdicts: Vec<Verdict>,
    judge: Judge,
    /// Event time: the records to judge, screened.
    timed: Vec<(Fingerprint, Timestamp)>,
    /// Bad records of the chunk (parse errors and screening), by index.
    bad: Vec<(usize, BadRecord)>,
    /// The chunk's records in the output buffer, in order.
    written: Vec<(usize, Fate)>,
    /// Delivery tracking of a durable `--state`.
    pub delivering: Option<Delivering>,
}

impl<'a> Job<'a> {
    /// A job writing to `out`.
    pub fn new(
        args: &'a RunArgs,
        sources: &'a [Source],
        engine: &'a Deduper,
        out: &'a mut Output,
        progress: &'a Progress,
        time_bounds: Option<TimeBounds>,
    ) -> Self {
        Job {
            args,
            sources,
            engine,
            out,
            progress,
            time_bounds,
            tally: Tally::default(),
            bytes_read: 0,
            undelivered: None,
            reported: 0,
            verdicts: Vec::new(),
            judge: Judge::new(engine),
            timed: Vec::new(),
            bad: Vec::new(),
            written: Vec::new(),
            delivering: None,
        }
    }

    /// Sets the program's counters to the run's figures so far.
    pub fn publish(&self, counters: &RunCounters) {
        counters.set(
            &self.tally,
            self.out.records(),
            self.out.bytes(),
            self.bytes_read,
        );
    }

    /// Judges and writes one chunk.
    ///
    /// # Errors
    /// Why the run must stop after this chunk.
    pub fn chunk(&mut self, p: &Parsed) -> Result<(), ChunkStop> {
        if self.out.reader_gone() {
            // Nothing of this chunk could be delivered: judge none of it.
            return Err(ChunkStop::Output(std::io::ErrorKind::BrokenPipe.into()));
        }
        let fail = self.args.on_error == OnError::Fail;
        // Bad records, and the index of the first under `fail`: records
        // from there on are not judged.
        self.bad.clear();
        self.bad.extend(p.bad.iter().cloned());
        let end = match self.time_bounds {
            Some(bounds) => self.screen(p, bounds, fail),
            None => {
                let end = if fail {
                    p.bad.first().map(|&(i, _)| i + 1)
                } else {
                    None
                };
                let good = end.map_or(p.keys.len(), |e| e - 1);
                let unsettled =
                    self.judge
                        .check_deferred(self.engine, &p.keys[..good], &mut self.verdicts);
                self.unsettled(unsettled);
                end
            }
        };
        let end = end.unwrap_or(p.chunk.len());
        let mut bad_input = false;
        let mut unavailable = false;
        let mut bad = 0;
        let mut g = 0;
        self.written.clear();
        let walk = if self.plain_chunk(p) { 0 } else { end };
        for i in 0..walk {
            let (record, newline) = p.chunk.record(i);
            self.tally.read += 1;
            if self.bad.get(bad).is_some_and(|(at, _)| *at == i) {
                let b = self.bad[bad].1.clone();
                bad += 1;
                bad_input |= self.bad_record(p, i, &b);
                continue;
            }
            let verdict = self.verdicts[g];
            let fp = match self.time_bounds {
                Some(_) => self.timed[g].0,
                None => p.keys[g],
            };
            g += 1;
            match verdict {
                Verdict::New => {
                    self.tally.unique += 1;
                    if self.out.judged(record, newline, Label::New) {
                        self.written.push((i, Fate::New));
                    }
                    if let Some(d) = &mut self.delivering {
                        d.accepted.push((fp, self.out.buffered()));
                    }
                }
                Verdict::Duplicate { .. }
                | Verdict::DuplicateUntimed
                | Verdict::LikelyDuplicate { .. } => {
                    self.tally.duplicates += 1;
                    if self.out.judged(record, newline, Label::Duplicate) {
                        self.written.push((i, Fate::Duplicate));
                    }
                }
                Verdict::Late { watermark } => {
                    // Screened out before judging; kept for safety.
                    let b = BadRecord::new(
                        BadKind::Late,
                        format!(
                            "more than the allowed lateness behind the watermark {}",
                            format_timestamp(watermark)
                        ),
                    );
                    bad_input |= self.bad_record(p, i, &b);
                }
                _ => {
                    // `Unavailable`: not recorded; not written either.
                    self.tally.unavailable += 1;
                    unavailable = true;
                    self.report(
                        p,
                        i,
                        "unavailable: the exact tier could not judge this record; not written, \
                         not recorded",
                    );
                }
            }
        }
        self.bytes_read = p.bytes_read;
        self.progress.set(p.bytes_read);
        let delivery = match self.delivering.take() {
            None => self.out.flush(),
            Some(mut d) => {
                let delivery = self.deliver(&mut d);
                self.delivering = Some(d);
                match delivery {
                    Some(delivery) => delivery,
                    None => {
                        // The log failed: nothing of this chunk may be
                        // written (its records are not recorded).
                        self.not_judged(p);
                        return Err(ChunkStop::Unavailable);
                    }
                }
            }
        };
        if let Some(error) = delivery.error {
            self.not_delivered(p, delivery.records);
            return Err(ChunkStop::Output(error));
        }
        if bad_input {
            Err(ChunkStop::BadInput)
        } else if unavailable {
            Err(ChunkStop::Unavailable)
        } else {
            Ok(())
        }
    }

    /// The common chunk, judged and written without walking it record by
    /// record: processing time, no delivery tracking, no bad record, and
    /// every verdict new or a duplicate. False (nothing done) otherwise:
    /// the general walk handles it.
    fn plain_chunk(&mut self, p: &Parsed) -> bool {
        if self.time_bounds.is_some()
            || self.delivering.is_some()
            || !self.bad.is_empty()
            || self.verdicts.len() != p.chunk.len()
        {
            return false;
        }
        let mut new = 0;
        for v in &self.verdicts {
            match v {
                Verdict::New => new += 1,
                Verdict::Duplicate { .. }
                | Verdict::DuplicateUntimed
                | Verdict::LikelyDuplicate { .. } => {}
                _ => return false,
            }
        }
        let n = p.chunk.len() as u64;
        self.tally.read += n;
        self.tally.unique += new;
        self.tally.duplicates += n - new;
        let verdicts = &self.verdicts;
        let written = &mut self.written;
        let label = |i: usize| match verdicts[i] {
            Verdict::New => Label::New,
            _ => Label::Duplicate,
        };
        self.out
            .judged_chunk(&p.chunk.data, &p.chunk.ends, label, |i| {
                let fate = match verdicts[i] {
                    Verdict::New => Fate::New,
                    _ => Fate::Duplicate,
                };
                written.push((i, fate));
            });
        true
    }

    /// Without delivery tracking, waits for the verdicts to be durable (a
    /// durable `--state` with `none`: at once); with it, the note written
    /// before the output waits for them too.
    fn unsettled(&mut self, unsettled: Unsettled) {
        if self.delivering.is_none() && unsettled.wait(self.engine).is_err() {
            self.verdicts.fill(Verdict::Unavailable);
        }
    }

    /// Notes the chunk's accepted records, then writes its output, counting
    /// what a stream takes; `None` when the engine's log failed (nothing
    /// written). An output that fails part-way forgets the accepted records
    /// it did not deliver.
    fn deliver(&mut self, d: &mut Delivering) -> Option<Delivery> {
        let total = self.out.buffered();
        let accepted = std::mem::take(&mut d.accepted);
        if accepted.is_empty() {
            // Nothing to forget if it fails: no note, and the counter keeps
            // the last noted chunk's count.
            return Some(self.out.flush());
        }
        {
            let start = match (&d.target, self.out.fd()) {
                (Target::File { .. }, Some(fd)) => delivery::file_position(fd).unwrap_or(0),
                _ => 0,
            };
            let note = InFlight {
                chunk: d.chunk,
                target: d.target.clone(),
                start,
                total,
                accepted,
            };
            note.encode(&mut d.note);
            d.accepted = note.accepted;
            if let Err(e) = self.engine.note(&d.note) {
                d.failure = Some(e.to_string());
                d.accepted.clear();
                return None;
            }
        }
        let (piece, nowait) = match d.target {
            Target::File { .. } => (usize::MAX, false),
            Target::Stream => (delivery::PIPE_PIECE, true),
        };
        d.counter.start(d.chunk);
        let counter = &mut d.counter;
        let delivery = self
            .out
            .flush_tracked(piece, nowait, |bytes| counter.delivered(bytes));
        if d.sync_output && delivery.error.is_none() {
            if let Some(fd) = self.out.fd() {
                // SAFETY: fdatasync on standard output's descriptor.
                unsafe { libc::fdatasync(fd) };
            }
        }
        if delivery.error.is_some() {
            // Not written: not recorded either (a later run writes them).
            let written = self.out.bytes_last_flush();
            for &(fp, end) in &d.accepted {
                if end > written && self.engine.forget(&fp).unwrap_or(false) {
                    d.forgotten += 1;
                }
            }
            let _ = self.engine.note(&delivery::idle_note());
        }
        d.accepted.clear();
        d.chunk += 1;
        Some(delivery)
    }

    /// The log failed before the chunk's output: its judged records are
    /// neither written nor recorded (counted unavailable).
    fn not_judged(&mut self, p: &Parsed) {
        let _ = p;
        for &(_, fate) in &self.written {
            match fate {
                Fate::New => self.tally.unique -= 1,
                Fate::Duplicate => self.tally.duplicates -= 1,
                Fate::Passed(kind) => self.tally.bad[kind.index()] -= 1,
            }
            self.tally.unavailable += 1;
        }
        self.out.discard();
    }

    /// Event time: picks the records to judge into `self.timed`, adding
    /// `late` and `future` ones to `self.bad`, and judges them. Returns the
    /// end of the records to walk under `fail` (one past the first bad).
    fn screen(&mut self, p: &Parsed, bounds: TimeBounds, fail: bool) -> Option<usize> {
        self.timed.clear();
        let mut wm = self.engine.watermark().as_nanos();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut parse_bad = p.bad.iter().map(|&(i, _)| i).peekable();
        let mut timed = p.timed.iter();
        let mut screened = Vec::new();
        let mut end = None;
        for i in 0..p.chunk.len() {
            if parse_bad.next_if_eq(&i).is_some() {
                if fail {
                    end = Some(i + 1);
                    break;
                }
                continue;
            }
            let Some(&(fp, t)) = timed.next() else { break };
            let tn = t.as_nanos();
            let verdict = if tn.saturating_add(bounds.lateness_ns) < wm {
                Some(BadRecord::new(
                    BadKind::Late,
                    format!(
                        "event time {} is more than the allowed lateness ({}) behind the watermark {}",
                        format_timestamp(t),
                        lateness_text(bounds.lateness_ns),
                        format_timestamp(Timestamp::from_nanos(wm))
                    ),
                ))
            } else {
                bounds.max_future_ns.and_then(|max| {
                    let reference = wm.max(now);
                    (tn > reference.saturating_add(max)).then(|| {
                        BadRecord::new(
                            BadKind::Future,
                            format!(
                                "event time {} is more than --max-future ({}) after {} ({}); \
                                 it would move the watermark and make later records late",
                                format_timestamp(t),
                                humantime::format_duration(Duration::from_nanos(max)),
                                if wm > now {
                                    "the watermark"
                                } else {
                                    "the clock"
                                },
                                format_timestamp(Timestamp::from_nanos(reference))
                            ),
                        )
                    })
                })
            };
            match verdict {
                Some(b) => {
                    screened.push((i, b));
                    if fail {
                        end = Some(i + 1);
                        break;
                    }
                }
                None => {
                    wm = wm.max(tn);
                    self.timed.push((fp, t));
                }
            }
        }
        if !screened.is_empty() {
            self.bad.extend(screened);
            self.bad.sort_by_key(|&(i, _)| i);
        }
        let mut verdicts = std::mem::take(&mut self.verdicts);
        let unsettled = self
            .engine
            .check_batch_at_deferred(&self.timed, &mut verdicts);
        self.verdicts = verdicts;
        self.unsettled(unsettled);
        end
    }

    /// The records of this chunk's buffer past the first `delivered`: no
    /// longer counted as judged, but as undelivered.
    fn not_delivered(&mut self, p: &Parsed, delivered: usize) {
        let lost = &self.written[delivered.min(self.written.len())..];
        let Some(&(first, _)) = lost.first() else {
            return;
        };
        for &(_, fate) in lost {
            match fate {
                Fate::New => {
                    self.tally.unique -= 1;
                    self.tally.undelivered_accepted += 1;
                }
                Fate::Duplicate => self.tally.duplicates -= 1,
                Fate::Passed(kind) => self.tally.bad[kind.index()] -= 1,
            }
            self.tally.undelivered += 1;
        }
        let last = lost.last().map_or(first, |&(i, _)| i);
        self.undelivered = Some(Undelivered {
            source: self.sources[p.chunk.source].name(),
            first_line: p.chunk.first_line + first as u64,
            last_line: p.chunk.first_line + last as u64,
        });
    }

    /// `FILE:LINE`.
    fn place(&self, p: &Parsed, i: usize) -> String {
        format!(
            "{}:{}",
            self.sources[p.chunk.source].name(),
            p.chunk.first_line + i as u64
        )
    }

    /// Reports `FILE:LINE: what`, or only counts it once the first few
    /// were reported.
    fn report(&mut self, p: &Parsed, i: usize, what: &str) {
        self.reported += 1;
        if self.reported <= MAX_REPORTED {
            self.progress
                .println(&format!("{}: {what}", self.place(p, i)));
        } else if self.reported == MAX_REPORTED + 1 {
            self.progress.println(
                "dedup: further bad or unavailable records are counted in the summary, not \
                 reported one by one",
            );
        }
    }

    /// Counts and reports a bad record, then applies the policy; true when
    /// the run must stop (`fail`).
    fn bad_record(&mut self, p: &Parsed, i: usize, b: &BadRecord) -> bool {
        self.tally.bad[b.kind.index()] += 1;
        let fail = self.args.on_error == OnError::Fail;
        if fail {
            self.progress.println(&format!("{}: {b}", self.place(p, i)));
        } else if b.kind == BadKind::TooLong && self.args.on_error == OnError::Pass {
            self.report(p, i, &format!("{b} (not passed: its bytes were not kept)"));
        } else {
            self.report(p, i, &b.to_string());
        }
        match self.args.on_error {
            OnError::Fail => true,
            OnError::Skip => false,
            OnError::Pass => {
                if b.kind != BadKind::TooLong {
                    let (record, newline) = p.chunk.record(i);
                    self.out.raw(record, newline);
                    self.written.push((i, Fate::Passed(b.kind)));
                }
                false
            }
        }
    }
}

fn lateness_text(ns: u64) -> String {
    if ns == u64::MAX {
        "unlimited".to_owned()
    } else {
        humantime::format_duration(Duration::from_nanos(ns)).to_string()
    }
}
