//! The deduplication job. A reader thread reads and cuts records and parses
//! them into fingerprints, times and bad records (NDJSON on every core, see
//! `parse.rs`); the main thread judges each chunk with batch calls to the
//! engine (processing time on every core, see `judge.rs`) and writes the
//! chunk's output with one write.

use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::CommandFactory;
use tiered_dedup::{Deduper, Verdict};

use crate::cli::{Cli, ExactArg, Format, OnError, OutputMode, RunArgs};
use crate::event_time::format_timestamp;
use crate::input::{InputError, RecordReader, Source};
use crate::judge::Judge;
use crate::output::{Label, Output};
use crate::parse::Parsed;
use crate::record::{BadKind, BadRecord, Extractor};
use crate::serve::{MetricsEndpoint, RunCounters};
use crate::settings::Settings;
use crate::state;
use crate::summary::{Progress, Report, Tally};

/// Bad records reported one by one under `skip` and `pass`; the rest are
/// only counted.
const MAX_REPORTED: u64 = 20;

/// Exit status for bad input under `--on-error fail`.
const EXIT_BAD_INPUT: u8 = 2;

/// How a run ends early.
enum Stop {
    /// Bad flags: clap's message, exit 1.
    Usage(String),
    /// Another error: `dedup: …`, exit 1.
    Fatal(String),
    /// Bad input under `fail` (already reported): exit 2.
    BadInput,
    /// Standard output was closed (`dedup … | head`): stop quietly.
    OutputClosed,
}

/// Runs the job `args` describe.
pub fn run(args: RunArgs) -> ExitCode {
    match run_inner(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Usage(msg)) => {
            let _ = Cli::command()
                .error(ErrorKind::ArgumentConflict, msg)
                .print();
            ExitCode::from(1)
        }
        Err(Stop::Fatal(msg)) => {
            eprintln!("dedup: {msg}");
            ExitCode::from(1)
        }
        Err(Stop::BadInput) => ExitCode::from(EXIT_BAD_INPUT),
        Err(Stop::OutputClosed) => ExitCode::SUCCESS,
    }
}

fn check_flags(args: &RunArgs) -> Result<(), Stop> {
    if args.format == Format::Lines {
        if !args.keys.is_empty() {
            return Err(Stop::Usage(
                "--key needs --format ndjson (a line is keyed by all its bytes)".into(),
            ));
        }
        if args.time_field.is_some() {
            return Err(Stop::Usage("--time-field needs --format ndjson".into()));
        }
    }
    if let (ExactArg::Redis(url), Some(_)) = (&args.exact, &args.state) {
        return Err(Stop::Usage(format!(
            "--state keeps the memory tier's entries between runs; with --exact {url} they \
             already live in Redis: drop --state"
        )));
    }
    if !(args.false_positive_rate > 0.0 && args.false_positive_rate < 1.0) {
        return Err(Stop::Usage(format!(
            "--false-positive-rate {} is outside (0, 1): use e.g. 0.01",
            args.false_positive_rate
        )));
    }
    Ok(())
}

/// A message when some accepted records' marks did not reach the exact tier
/// (the next run would not know them).
fn redis_failure(engine: &Deduper) -> Option<String> {
    let s = engine.stats();
    (s.mark_errors > 0 || s.marks_pending > 0).then(|| {
        format!(
            "{} marks of accepted records could not be written to the exact tier ({} still queued): \
             a later run may accept them again",
            s.mark_errors, s.marks_pending
        )
    })
}

fn input_error(e: &InputError) -> Stop {
    Stop::Fatal(format!("cannot read {}: {}", e.source_name, e.error))
}

fn run_inner(args: &RunArgs) -> Result<(), Stop> {
    check_flags(args)?;
    // Listening before anything is read: a bad address stops the run
    // before it consumes its input.
    let endpoint = match args.metrics_addr {
        Some(addr) => {
            let endpoint = MetricsEndpoint::start(addr).map_err(|e| {
                Stop::Usage(format!(
                    "--metrics-addr {addr}: cannot serve metrics there: {e}"
                ))
            })?;
            if !args.quiet {
                eprintln!("dedup: metrics at http://{}/metrics", endpoint.addr());
            }
            Some(endpoint)
        }
        None => None,
    };
    let counters = RunCounters::new();
    let sources = Source::from_args(&args.files);
    let mut reader = RecordReader::new(sources.clone());
    reader.check_sources().map_err(|e| input_error(&e))?;

    // The first chunk is read before the engine is built: its mean record
    // length turns file sizes into an expected key count.
    let started = Instant::now();
    let mut first = Parsed::default();
    let has_first = reader
        .next_chunk(&mut first.chunk)
        .map_err(|e| input_error(&e))?;
    first.bytes_read = reader.bytes_read();

    let wanted = Settings::from_args(args);
    let (engine, settings) = match &args.state {
        Some(dir) => match state::load(dir, &wanted).map_err(|e| Stop::Fatal(e.to_string()))? {
            Some(loaded) => (loaded.engine, loaded.settings),
            None => build(wanted.with_estimate(&sources, has_first.then_some(&first.chunk)))?,
        },
        None => build(wanted.with_estimate(&sources, has_first.then_some(&first.chunk)))?,
    };

    let engine = Arc::new(engine);
    if let Some(endpoint) = &endpoint {
        endpoint.attach(&engine);
    }
    let namespace = engine.namespace();
    let extractor = match args.format {
        Format::Lines => Extractor::Lines { namespace },
        Format::Ndjson => Extractor::ndjson(
            namespace,
            &args.keys,
            args.time_field.clone().map(|p| (p, args.time_unit)),
            args.output == OutputMode::Annotate,
        ),
    };
    let event_time = args.time_field.is_some();
    let total_bytes: Option<u64> = sources.iter().map(Source::size).sum();
    let progress = Progress::new(total_bytes, !args.no_progress && !args.quiet);
    let mut out = Output::stdout(args.output, args.format, &args.annotate_field)
        .map_err(|e| Stop::Fatal(format!("cannot write to standard output: {e}")))?;

    let parse_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The reader thread is detached, not scoped: an early stop must not
    // wait for a read from a pipe that may never end.
    let (parsed_tx, parsed_rx) = mpsc::sync_channel::<Result<Parsed, InputError>>(2);
    let (recycle_tx, recycle_rx) = mpsc::channel::<Parsed>();
    thread::Builder::new()
        .name("dedup-reader".into())
        .spawn(move || {
            let mut next = has_first.then_some(first);
            loop {
                let mut p = match next.take() {
                    Some(p) => p,
                    None => {
                        let mut p = recycle_rx.try_recv().unwrap_or_default();
                        match reader.next_chunk(&mut p.chunk) {
                            Ok(true) => p.bytes_read = reader.bytes_read(),
                            Ok(false) => return,
                            Err(e) => {
                                let _ = parsed_tx.send(Err(e));
                                return;
                            }
                        }
                        p
                    }
                };
                p.parse(&extractor, parse_threads);
                if parsed_tx.send(Ok(p)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Stop::Fatal(format!("cannot start the reader thread: {e}")))?;

    let mut job = Job {
        args,
        sources: &sources,
        engine: &engine,
        out: &mut out,
        progress: &progress,
        tally: Tally::default(),
        reported: 0,
        bytes_read: 0,
        verdicts: Vec::new(),
        judge: Judge::new(&engine),
    };
    let mut result = Ok(());
    for msg in parsed_rx {
        let step = match msg {
            Ok(p) => {
                let step = job.chunk(&p, event_time);
                let _ = recycle_tx.send(p);
                job.publish(&counters);
                step
            }
            Err(e) => Err(input_error(&e)),
        };
        if let Err(stop) = step {
            result = Err(stop);
            break;
        }
    }
    progress.finish();
    let elapsed = started.elapsed();
    if matches!(result, Err(Stop::OutputClosed)) {
        return result;
    }
    // Marks still queued for the exact tier (Redis batches them) are
    // written before the program ends.
    let _ = engine.flush(); // failures are reported from the tier's counters below
    job.publish(&counters);
    if let Some(e) = redis_failure(&engine) {
        eprintln!("dedup: {e}");
        if result.is_ok() {
            result = Err(Stop::Fatal(e));
        }
    }
    if result.is_ok() {
        if let Some(dir) = &args.state {
            state::save(dir, &settings, &engine).map_err(|e| Stop::Fatal(e.to_string()))?;
        }
    }
    let (tally, bytes_read) = (job.tally, job.bytes_read);
    if !args.quiet {
        let report = Report {
            tally: &tally,
            on_error: args.on_error,
            written: out.records(),
            written_bytes: out.bytes(),
            bytes_read,
            elapsed,
            stats: engine.stats(),
        };
        eprintln!("{}", report.render());
    }
    result
}

fn build(settings: Settings) -> Result<(Deduper, Settings), Stop> {
    let engine = settings
        .builder()
        .build()
        .map_err(|e| Stop::Fatal(format!("cannot build the engine: {e}")))?;
    Ok((engine, settings))
}

/// The main thread's side of a run.
struct Job<'a> {
    args: &'a RunArgs,
    sources: &'a [Source],
    engine: &'a Deduper,
    out: &'a mut Output,
    progress: &'a Progress,
    tally: Tally,
    reported: u64,
    bytes_read: u64,
    verdicts: Vec<Verdict>,
    judge: Judge,
}

impl Job<'_> {
    /// Sets the program's counters to the run's figures so far.
    fn publish(&self, counters: &RunCounters) {
        counters.set(
            &self.tally,
            self.out.records(),
            self.out.bytes(),
            self.bytes_read,
        );
    }

    /// Judges and writes one chunk.
    fn chunk(&mut self, p: &Parsed, event_time: bool) -> Result<(), Stop> {
        // Under `fail`, nothing after the first bad record is judged.
        let good = match (self.args.on_error, p.bad.first()) {
            (OnError::Fail, Some(&(i, _))) => i,
            _ if event_time => p.timed.len(),
            _ => p.keys.len(),
        };
        if event_time {
            self.verdicts = self.engine.check_batch_at(&p.timed[..good]);
        } else {
            self.judge
                .check(self.engine, &p.keys[..good], &mut self.verdicts);
        }
        let mut bad = p.bad.iter().peekable();
        let mut g = 0;
        let mut result = Ok(());
        for i in 0..p.chunk.len() {
            let (record, newline) = p.chunk.record(i);
            self.tally.read += 1;
            if let Some((_, b)) = bad.next_if(|(at, _)| *at == i) {
                result = self.bad(p, i, b);
                if result.is_err() {
                    break;
                }
                continue;
            }
            let verdict = self.verdicts[g];
            g += 1;
            match verdict {
                Verdict::New => {
                    self.tally.unique += 1;
                    self.out.judged(record, newline, Label::New);
                }
                Verdict::Duplicate { .. }
                | Verdict::DuplicateUntimed
                | Verdict::LikelyDuplicate { .. } => {
                    self.tally.duplicates += 1;
                    self.out.judged(record, newline, Label::Duplicate);
                }
                Verdict::Late { watermark } => {
                    let t = p.timed[g - 1].1;
                    let lateness = self.engine_lateness();
                    let b = BadRecord {
                        kind: BadKind::Late,
                        detail: format!(
                            "event time {} is more than the allowed lateness ({}) behind the watermark {}",
                            format_timestamp(t),
                            humantime::format_duration(lateness),
                            format_timestamp(watermark)
                        ),
                    };
                    result = self.bad(p, i, &b);
                    if result.is_err() {
                        break;
                    }
                }
                _ => {
                    result = Err(Stop::Fatal(format!(
                        "{}: the exact tier could not answer",
                        self.place(p, i)
                    )));
                    break;
                }
            }
        }
        self.bytes_read = p.bytes_read;
        self.progress.set(p.bytes_read);
        // What was judged before a stop is written before it.
        let flushed = self.out.flush();
        match flushed {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Stop::OutputClosed),
            Err(e) => Err(Stop::Fatal(format!("cannot write to standard output: {e}"))),
            Ok(()) => result,
        }
    }

    fn engine_lateness(&self) -> Duration {
        self.args
            .allowed_lateness
            .or(self.args.window)
            .unwrap_or(Duration::MAX)
    }

    /// `FILE:LINE`.
    fn place(&self, p: &Parsed, i: usize) -> String {
        format!(
            "{}:{}",
            self.sources[p.chunk.source].name(),
            p.chunk.first_line + i as u64
        )
    }

    /// Counts and reports a bad record, then applies the policy.
    fn bad(&mut self, p: &Parsed, i: usize, b: &BadRecord) -> Result<(), Stop> {
        self.tally.bad[b.kind.index()] += 1;
        self.reported += 1;
        if self.reported <= MAX_REPORTED || self.args.on_error == OnError::Fail {
            self.progress.println(&format!("{}: {b}", self.place(p, i)));
        } else if self.reported == MAX_REPORTED + 1 {
            self.progress.println(
                "dedup: further bad records are counted in the summary, not reported one by one",
            );
        }
        match self.args.on_error {
            OnError::Fail => Err(Stop::BadInput),
            OnError::Skip => Ok(()),
            OnError::Pass => {
                let (record, newline) = p.chunk.record(i);
                self.out.raw(record, newline);
                Ok(())
            }
        }
    }
}
