//! The deduplication job. A reader thread reads and cuts records and parses
//! them into fingerprints, times and bad records (NDJSON on every core, see
//! `parse.rs`); the main thread judges each chunk with batch calls to the
//! engine (processing time on every core, see `judge.rs`) and writes the
//! chunk's output with one write (`job.rs`). With Redis, a flush thread
//! writes pending marks once the input has paused for the flush interval.
//!
//! However a run ends — the input's end, bad input, an unavailable exact
//! tier, a closed output, SIGINT or SIGTERM — it then writes its pending
//! marks, saves `--state` where that records what was delivered, prints the
//! summary, and exits with the status of the worst thing that happened
//! ([`Status`]).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::CommandFactory;
use tiered_dedup::exact::redis::RedisStats;
use tiered_dedup::Deduper;

use crate::cli::{Cli, ExactArg, Format, OutputMode, RunArgs};
use crate::input::{InputError, NextChunk, RecordReader, Source};
use crate::job::{ChunkStop, Delivering, Job, TimeBounds};
use crate::output::Output;
use crate::parse::Parsed;
use crate::record::Extractor;
use crate::redis_cause;
use crate::serve::{MetricsEndpoint, RunCounters};
use crate::settings::{physical_memory, Settings};
use crate::signals::StopSignals;
use crate::state::{self, delivery, StateLock};
use crate::summary::{Progress, Report};

/// How often the main thread, waiting for input, looks for a signal.
const TICK: Duration = Duration::from_millis(50);

/// Pending marks are written to Redis within about this long, input or
/// not (the engine's flush interval; the flush thread's period).
pub const MARK_FLUSH_INTERVAL: Duration = Duration::from_millis(10);

/// How a run ends, from best to worst: the exit status is the worst that
/// happened (a signal's status only when nothing else went wrong).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    /// 0: every record read and judged; or output closed with nothing
    /// accepted left unwritten.
    Success,
    /// 130 (SIGINT) or 143 (SIGTERM): stopped gracefully.
    Signal(u8),
    /// 1: bad flags or configuration, unreadable input, unusable state.
    Error,
    /// 2: bad input under `--on-error fail`.
    BadInput,
    /// 3: the exact tier could not judge some records.
    Unavailable,
    /// 4: accepted records are not stored in the exact tier.
    NotStored,
    /// 5: accepted (recorded) records were not written: output closed.
    Undelivered,
}

impl Status {
    fn code(self) -> u8 {
        match self {
            Status::Success => 0,
            Status::Signal(code) => code,
            Status::Error => 1,
            Status::BadInput => 2,
            Status::Unavailable => 3,
            Status::NotStored => 4,
            Status::Undelivered => 5,
        }
    }
}

/// A run that stops before it reads: bad flags or an unusable setup.
enum Refusal {
    /// Bad flags: clap's message, exit 1.
    Usage(String),
    /// Another error: `dedup: …`, exit 1.
    Fatal(String),
}

/// Why the loop over chunks ended early.
enum Stop {
    Signal(&'static str, u8),
    Chunk(ChunkStop),
    Input(InputError),
}

/// What the reader thread hands on.
enum FromReader {
    Chunk(Parsed),
    Failed(InputError),
    /// A signal stopped it; bytes of an incomplete record it dropped.
    Stopped(Option<(u64, String)>),
}

/// Runs the job `args` describe.
pub fn run(args: RunArgs) -> ExitCode {
    let status = match run_inner(&args) {
        Ok(status) => status,
        Err(Refusal::Usage(msg)) => {
            let _ = Cli::command()
                .error(ErrorKind::ArgumentConflict, msg)
                .print();
            Status::Error
        }
        Err(Refusal::Fatal(msg)) => {
            say!("dedup: {msg}");
            Status::Error
        }
    };
    ExitCode::from(status.code())
}

fn check_flags(args: &RunArgs) -> Result<(), Refusal> {
    if args.format == Format::Lines {
        if !args.keys.is_empty() {
            return Err(Refusal::Usage(
                "--key needs --format ndjson (a line is keyed by all its bytes)".into(),
            ));
        }
        if args.time_field.is_some() {
            return Err(Refusal::Usage("--time-field needs --format ndjson".into()));
        }
    }
    if let (ExactArg::Redis(url), Some(_)) = (&args.exact, &args.state) {
        return Err(Refusal::Usage(format!(
            "--state keeps the memory tier's entries between runs; with --exact {} they \
             already live in Redis: drop --state",
            redis_cause::redact(url)
        )));
    }
    if !(args.false_positive_rate > 0.0 && args.false_positive_rate < 1.0) {
        return Err(Refusal::Usage(format!(
            "--false-positive-rate {} is outside (0, 1): use e.g. 0.01",
            args.false_positive_rate
        )));
    }
    Ok(())
}

fn input_error(e: &InputError) -> String {
    format!("cannot read {}: {}", e.source_name, e.error)
}

fn start_metrics(args: &RunArgs) -> Result<Option<MetricsEndpoint>, Refusal> {
    let Some(addr) = args.metrics_addr else {
        return Ok(None);
    };
    let endpoint = MetricsEndpoint::start(addr).map_err(|e| {
        Refusal::Usage(format!(
            "--metrics-addr {addr}: cannot serve metrics there: {e}"
        ))
    })?;
    if !addr.ip().is_loopback() {
        // Said even under -q: it is about exposure, not progress.
        say!(
            "dedup: warning: --metrics-addr {addr} is not a loopback address: the endpoint has \
             no authentication, and anyone who can reach it can read the run's counters"
        );
    }
    if !args.quiet {
        say!("dedup: metrics at http://{}/metrics", endpoint.addr());
    }
    Ok(Some(endpoint))
}

fn run_inner(args: &RunArgs) -> Result<Status, Refusal> {
    check_flags(args)?;
    let signals = StopSignals::install()
        .map_err(|e| Refusal::Fatal(format!("cannot install signal handlers: {e}")))?;
    // Listening before anything is read: a bad address stops the run
    // before it consumes its input.
    let endpoint = start_metrics(args)?;
    let counters = RunCounters::new();
    let sources = Source::from_args(&args.files);
    let mut reader = RecordReader::new(sources.clone(), args.max_record_bytes, signals.flag());
    reader
        .check_sources()
        .map_err(|e| Refusal::Fatal(input_error(&e)))?;
    // One run at a time per state directory, and a directory that can be
    // written, before any input is read.
    let _lock = match &args.state {
        Some(dir) => Some(StateLock::acquire(dir).map_err(|e| Refusal::Fatal(e.to_string()))?),
        None => None,
    };

    // The first chunk is read before the engine is built: its mean record
    // length turns file sizes into an expected key count.
    let started = Instant::now();
    let mut first = Parsed::default();
    let has_first = match reader
        .next_chunk(&mut first.chunk)
        .map_err(|e| Refusal::Fatal(input_error(&e)))?
    {
        NextChunk::Records => true,
        NextChunk::End => false,
        NextChunk::Stopped => {
            let (name, code) = signals.requested().unwrap_or(("a signal", 130));
            say!("dedup: stopped by {name} before any record was read");
            return Ok(Status::Signal(code));
        }
    };
    first.bytes_read = reader.bytes_read();

    let wanted = Settings::from_args(args);
    let durability = state::durability(args.durability, args.group_commit);
    let (engine, settings, redis_stats) = match &args.state {
        Some(dir) => {
            let fatal = |e: state::StateError| Refusal::Fatal(e.to_string());
            let settings = match state::saved_settings(dir, &wanted).map_err(fatal)? {
                Some(saved) => saved,
                None => fit(
                    wanted.with_estimate(&sources, has_first.then_some(&first.chunk)),
                    args.expected_keys.is_some(),
                )?,
            };
            let engine = state::open(dir, &settings, durability).map_err(fatal)?;
            (engine, settings, None)
        }
        None => build(
            wanted.with_estimate(&sources, has_first.then_some(&first.chunk)),
            args.expected_keys.is_some(),
        )?,
    };
    // A durable state: what the previous run accepted but did not write
    // (it was killed) is forgotten, so this run writes it.
    let counter = match (&args.state, durability.survives_process_kill()) {
        (Some(dir), true) => Some(reconcile(&engine, dir, args.quiet)?),
        _ => None,
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
    let time_bounds = args.time_field.as_ref().map(|_| TimeBounds {
        lateness_ns: settings.allowed_lateness_ns.unwrap_or(u64::MAX),
        max_future_ns: args
            .max_future
            .0
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
    });
    let total_bytes: Option<u64> = sources.iter().map(Source::size).sum();
    let progress = Progress::new(total_bytes, !args.no_progress && !args.quiet);
    let mut out = Output::stdout(args.output, args.format, &args.annotate_field)
        .map_err(|e| Refusal::Fatal(format!("cannot write to standard output: {e}")))?;

    let delivering =
        counter.map(|c| Delivering::new(c, out.fd(), durability.survives_power_loss()));
    // Judged chunks go back to the reader, which reads into their buffers:
    // fresh buffers for every chunk cost page faults and zeroing (about 8%
    // of the CPU time on the benchmark file, docs/cost-model.md).
    let (recycle_tx, recycle_rx) = mpsc::channel::<Parsed>();
    let parsed_rx = spawn_reader(reader, has_first.then_some(first), extractor, recycle_rx)?;
    let flusher = redis_stats
        .is_some()
        .then(|| IdleFlusher::start(&engine))
        .transpose()?;

    let mut job = Job::new(args, &sources, &engine, &mut out, &progress, time_bounds);
    job.delivering = delivering;
    let mut stop = None;
    let mut abandoned = None;
    loop {
        let msg = match parsed_rx.recv_timeout(TICK) {
            Ok(msg) => msg,
            // The reader stops on a signal by itself and says so.
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let step = match msg {
            FromReader::Chunk(p) => {
                let step = job.chunk(&p).map_err(Stop::Chunk);
                // The reader may be gone (end of input): the chunk is dropped.
                let _ = recycle_tx.send(p);
                if let Some(f) = &flusher {
                    f.touch();
                }
                job.publish(&counters);
                if step.is_ok() && job.delivering.is_some() {
                    checkpoint_if_due(&engine);
                }
                step
            }
            FromReader::Failed(e) => Err(Stop::Input(e)),
            FromReader::Stopped(partial) => {
                abandoned = partial;
                let (name, code) = signals.requested().unwrap_or(("a signal", 130));
                Err(Stop::Signal(name, code))
            }
        };
        if let Err(s) = step {
            stop = Some(s);
            break;
        }
    }
    if stop.is_none() {
        // The input ended; a signal that came meanwhile still counts.
        if let Some((name, code)) = signals.requested() {
            stop = Some(Stop::Signal(name, code));
        }
    }
    if let Some(f) = flusher {
        f.stop();
    }
    progress.finish();
    let elapsed = started.elapsed();

    let ending = Ending {
        args,
        engine: &engine,
        redis_stats: redis_stats.as_deref(),
    };
    let mut status = Status::Success;
    let mut may_save = true;
    match &stop {
        None => {}
        Some(Stop::Signal(name, code)) => {
            status = status.max(Status::Signal(*code));
            let partial = abandoned.map_or_else(String::new, |(bytes, at)| {
                format!(" ({bytes} bytes of an incomplete record at {at} were dropped)")
            });
            say!(
                "dedup: {name}: stopped reading; every record read was judged and written{partial}"
            );
        }
        Some(Stop::Input(e)) => {
            status = status.max(Status::Error);
            may_save = false;
            say!("dedup: {}", input_error(e));
        }
        Some(Stop::Chunk(ChunkStop::BadInput)) => {
            status = status.max(Status::BadInput);
            may_save = false;
        }
        Some(Stop::Chunk(ChunkStop::Unavailable)) => {}
        Some(Stop::Chunk(ChunkStop::Output(e))) => {
            let closed = e.kind() == std::io::ErrorKind::BrokenPipe;
            if !closed {
                status = status.max(Status::Error);
                say!("dedup: cannot write to standard output: {e}");
            }
            // A durable state forgot the accepted records it could not write.
            let forgotten = job.delivering.as_ref().map_or(0, |d| d.forgotten);
            let recorded = ending.persistent() && job.tally.undelivered_accepted > forgotten;
            if let (true, Some(u)) = (recorded, &job.undelivered) {
                status = status.max(Status::Undelivered);
                say!(
                    "dedup: standard output {}: {} accepted records among {}:{}-{} were \
                     recorded but not written; a later run calls them duplicates",
                    if closed { "was closed" } else { "failed" },
                    job.tally.undelivered_accepted,
                    u.source,
                    u.first_line,
                    u.last_line
                );
            }
        }
    }
    let log_failure = job
        .delivering
        .as_ref()
        .and_then(|d| d.failure.clone())
        .or_else(|| engine.durability_failure());
    if job.tally.unavailable > 0 {
        status = status.max(Status::Unavailable);
        may_save = false;
        match &log_failure {
            Some(failure) => say!(
                "dedup: the --state log could not be written ({failure}): {} records were \
                 neither written nor recorded and the run stopped; free the disk and rerun \
                 (every record written so far is recorded)",
                job.tally.unavailable
            ),
            None => say!(
                "dedup: the exact tier could not judge {} records (neither written nor recorded); \
                 the run stopped after writing the records of their chunk it could judge{}",
                job.tally.unavailable,
                ending.cause()
            ),
        }
    }
    // Marks still queued for the exact tier (Redis batches them) are
    // written before the program ends, whatever stopped it.
    let accepted = job.tally.unique + job.tally.undelivered_accepted;
    let not_stored = ending.flush(accepted);
    if not_stored.is_some() {
        status = status.max(Status::NotStored);
    }
    job.publish(&counters);
    if args.state.is_some() {
        if durability.survives_process_kill() {
            // Every record written is logged already; nothing is in flight.
            let ended = engine
                .note(&delivery::idle_note())
                .and_then(|()| engine.sync());
            if let (Err(e), None) = (ended, &log_failure) {
                say!("dedup: --state: {e}");
                status = status.max(Status::Error);
            }
        } else if may_save {
            if let Err(e) = engine.checkpoint() {
                say!("dedup: --state: cannot save: {e}");
                status = status.max(Status::Error);
            }
        }
    }
    debug_assert_eq!(job.tally.read, job.tally.accounted());
    if !args.quiet {
        let report = Report {
            tally: &job.tally,
            on_error: args.on_error,
            written: job.out.records(),
            written_bytes: job.out.bytes(),
            bytes_read: job.bytes_read,
            elapsed,
            stats: engine.stats(),
            not_stored,
        };
        say!("{}", report.render());
    }
    Ok(status)
}

/// The end of a run: flushing and explaining the exact tier's failures.
struct Ending<'a> {
    args: &'a RunArgs,
    engine: &'a Deduper,
    redis_stats: Option<&'a RedisStats>,
}

impl Ending<'_> {
    /// True when what the run accepts outlives it (Redis, `--state`).
    fn persistent(&self) -> bool {
        self.redis_stats.is_some() || self.args.state.is_some()
    }

    fn redis_url(&self) -> Option<&str> {
        match &self.args.exact {
            ExactArg::Redis(url) => Some(url),
            ExactArg::Memory => None,
        }
    }

    /// `: Redis at URL: why` for a message, from a fresh look at the
    /// server (the engine's verdicts carry no cause).
    fn cause(&self) -> String {
        match (self.redis_url(), self.redis_stats) {
            (Some(url), Some(stats)) => format!(
                ": Redis at {}: {} ({} of its requests failed)",
                redis_cause::redact(url),
                redis_cause::diagnose(url),
                stats.failures.load(Ordering::Relaxed)
            ),
            _ => String::new(),
        }
    }

    /// Writes the pending marks of the `accepted` records; says how many
    /// are not stored, and why, when some are not.
    fn flush(&self, accepted: u64) -> Option<u64> {
        let Err(e) = self.engine.flush() else {
            return None;
        };
        // The engine counts every accepted key whose mark the tier has not
        // stored (kept for a retry, and dropped past its retry buffer).
        // What Redis has not acknowledged of this run's marks (one per
        // accepted record) is a floor, should the two ever disagree: the
        // run never reports fewer than are missing.
        let acknowledged = self
            .redis_stats
            .map_or(accepted, |s| s.marks_written.load(Ordering::Relaxed));
        let not_stored = e.unwritten().max(accepted.saturating_sub(acknowledged));
        let url = self.redis_url().map_or_else(String::new, |u| {
            format!(" (Redis at {})", redis_cause::redact(u))
        });
        say!("dedup: {e}{url}");
        say!(
            "dedup: {not_stored} accepted records (written to standard output) are not stored{}; \
             a later run will accept them again",
            self.cause()
        );
        Some(not_stored)
    }
}

/// Checks `settings` against the machine's memory: a size the user gave
/// (`explicit`) that the machine cannot hold is refused; an estimated one
/// is lowered to fit (the tables grow if the keys come).
fn fit(mut settings: Settings, explicit: bool) -> Result<Settings, Refusal> {
    if let Some(physical) = physical_memory() {
        if explicit {
            settings.check_memory(physical).map_err(Refusal::Usage)?;
        } else {
            settings.fit_estimate(physical / 2);
        }
    }
    Ok(settings)
}

/// A durable state's start: forgets what the previous run accepted but did
/// not write, and says so; the delivery counter.
fn reconcile(
    engine: &Deduper,
    dir: &std::path::Path,
    quiet: bool,
) -> Result<delivery::Counter, Refusal> {
    let counter = delivery::Counter::open(dir).map_err(|e| {
        Refusal::Fatal(format!(
            "{}: {e}",
            dir.join(delivery::COUNTER_FILE).display()
        ))
    })?;
    let done = delivery::reconcile(engine, &counter)
        .map_err(|e| Refusal::Fatal(format!("{}: {e}", dir.display())))?;
    if done.forgotten > 0 && !quiet {
        say!(
            "dedup: the previous run on this state stopped before writing {} records it had \
             accepted: this run judges and writes them again{}",
            done.forgotten,
            if done.unknown {
                " (standard output was not a file it could look at: some of them may have \
                 been written before the kill)"
            } else {
                ""
            }
        );
    }
    if let Some(file) = &done.file {
        if !quiet {
            say!(
                "dedup: {} may end with part of a record the previous run was writing when it \
                 was killed; this run writes that record whole",
                file.display()
            );
        }
    }
    Ok(counter)
}

/// Takes a checkpoint of a durable state when its log has grown enough
/// (between chunks: no output is in flight).
fn checkpoint_if_due(engine: &Deduper) {
    if !engine.checkpoint_due() {
        return;
    }
    let taken = engine
        .note(&delivery::idle_note())
        .and_then(|()| engine.checkpoint());
    if let Err(e) = taken {
        say!("dedup: --state: a checkpoint failed ({e}); the log goes on and nothing is lost");
    }
}

/// Builds the engine `settings` describe (see [`fit`]).
fn build(
    settings: Settings,
    explicit: bool,
) -> Result<(Deduper, Settings, Option<Arc<RedisStats>>), Refusal> {
    let settings = fit(settings, explicit)?;
    if let Some(url) = settings.redis_url() {
        check_redis(url)?;
    }
    let (builder, redis_stats) = settings.builder_with_stats();
    let engine = builder.build().map_err(|e| {
        Refusal::Usage(format!(
            "cannot build the engine: {e} (its sizes come from --expected-keys, \
             --false-positive-rate, --window and --allowed-lateness)"
        ))
    })?;
    Ok((engine, settings, redis_stats))
}

/// Asks the Redis server, before any input is read, whether it keeps what
/// is written to it: a server that evicts keys (`maxmemory-policy` other
/// than `noeviction`) or a read-only replica is refused with the library's
/// message; one without an append-only file is a warning. A server that cannot be reached now is not refused here: the
/// run's records are then judged under the tier's failure policy, and the
/// run says why at the end.
fn check_redis(url: &str) -> Result<(), Refusal> {
    use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
    use tiered_dedup::FailureCause;
    match RedisTier::new(RedisConfig::new(url)).check() {
        Ok(info) => {
            for warning in info.warnings().into_iter().chain(info.unchecked()) {
                say!("dedup: warning: {warning}");
            }
            Ok(())
        }
        Err(e)
            if matches!(
                e.cause(),
                Some(FailureCause::UnsafeServer | FailureCause::ReadOnly)
            ) =>
        {
            Err(Refusal::Fatal(e.to_string()))
        }
        Err(_) => Ok(()),
    }
}

/// Starts the reader thread: it reads, cuts and parses chunks (the first
/// one already read) and hands them on over a bounded channel.
fn spawn_reader(
    mut reader: RecordReader,
    first: Option<Parsed>,
    extractor: Extractor,
    recycled: mpsc::Receiver<Parsed>,
) -> Result<mpsc::Receiver<FromReader>, Refusal> {
    let parse_threads = thread::available_parallelism().map_or(1, |n| n.get());
    // Detached, not scoped: an early stop must not wait for it.
    let (parsed_tx, parsed_rx) = mpsc::sync_channel::<FromReader>(2);
    thread::Builder::new()
        .name("dedup-reader".into())
        .spawn(move || {
            let mut next = first;
            loop {
                let mut p = match next.take() {
                    Some(p) => p,
                    None => {
                        // A judged chunk's buffers if one is back (the
                        // chunk is reset before it is read into and the
                        // parse clears the rest), else new ones.
                        let mut p = recycled.try_recv().unwrap_or_default();
                        match reader.next_chunk(&mut p.chunk) {
                            Ok(NextChunk::Records) => p.bytes_read = reader.bytes_read(),
                            Ok(NextChunk::End) => return,
                            Ok(NextChunk::Stopped) => {
                                let _ = parsed_tx.send(FromReader::Stopped(reader.abandoned()));
                                return;
                            }
                            Err(e) => {
                                let _ = parsed_tx.send(FromReader::Failed(e));
                                return;
                            }
                        }
                        p
                    }
                };
                p.parse(&extractor, parse_threads);
                if parsed_tx.send(FromReader::Chunk(p)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Refusal::Fatal(format!("cannot start the reader thread: {e}")))?;
    Ok(parsed_rx)
}

/// Writes pending marks to Redis once the run has been idle (no chunk
/// judged) for [`MARK_FLUSH_INTERVAL`]: while chunks flow, the engine's
/// checks write the marks that are due themselves; when input pauses,
/// nothing would. (`Deduper::maintain` would also do it, but it advances
/// every shard to the watermark, which under event time races the batch
/// being judged.)
struct IdleFlusher {
    /// Chunks judged so far; the main thread bumps it after each.
    activity: Arc<AtomicU64>,
    done: mpsc::Sender<()>,
    thread: thread::JoinHandle<()>,
}

/// How long a failed idle flush waits before the next try.
const IDLE_RETRY: Duration = Duration::from_secs(1);

impl IdleFlusher {
    fn start(engine: &Arc<Deduper>) -> Result<Self, Refusal> {
        let (done, wait) = mpsc::channel::<()>();
        let engine = Arc::clone(engine);
        let activity = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&activity);
        let thread = thread::Builder::new()
            .name("dedup-flush".into())
            .spawn(move || {
                // The activity count at the last look, and at the last
                // flush that succeeded (or the time of one that failed).
                let mut last = u64::MAX;
                let mut flushed = 0;
                let mut retry_at = Instant::now();
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    wait.recv_timeout(MARK_FLUSH_INTERVAL)
                {
                    let now = seen.load(Ordering::Acquire);
                    let idle = now == last;
                    last = now;
                    if idle && now != flushed && Instant::now() >= retry_at {
                        match engine.flush() {
                            Ok(()) => flushed = now,
                            // Reported by the flush at the end of the run.
                            Err(_) => retry_at = Instant::now() + IDLE_RETRY,
                        }
                    }
                }
            })
            .map_err(|e| Refusal::Fatal(format!("cannot start the flush thread: {e}")))?;
        Ok(IdleFlusher {
            activity,
            done,
            thread,
        })
    }

    /// A chunk was judged.
    fn touch(&self) {
        self.activity.fetch_add(1, Ordering::AcqRel);
    }

    fn stop(self) {
        let _ = self.done.send(());
        let _ = self.thread.join();
    }
}
