//! `--metrics-addr`: the run's counters as Prometheus text over HTTP.
//!
//! The `metrics-exporter-prometheus` recorder (without its hyper/tokio
//! listener) is installed as the global recorder and renders the text; one
//! std thread accepts connections on the address the user gave and hands
//! each to a thread of its own (at most [`MAX_CONNECTIONS`] at once; more
//! are closed at once), which answers `GET /metrics`, one request per
//! connection, within [`CLIENT_DEADLINE`] from the connection's start: a
//! client that trickles its request, or reads the answer slowly, is cut off
//! then and delays no other scrape. The engine's counters are
//! published on each scrape, just before rendering (no timer thread, and a
//! scrape never sees figures older than itself); the program's own counters
//! ([`RunCounters`]) are set after every chunk. The endpoint lives as long
//! as the process: it closes when the run ends.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tiered_dedup::Deduper;

use crate::record::BadKind;
use crate::summary::Tally;

/// How long one connection may take, from its accept to the end of the
/// answer: sending its request and reading the answer together.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// The content type of the Prometheus text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The serving endpoint; the engine is attached once it is built.
pub struct MetricsEndpoint {
    engine: Arc<OnceLock<Arc<Deduper>>>,
    addr: SocketAddr,
}

impl MetricsEndpoint {
    /// Listens on `addr` (only there), installs the Prometheus recorder and
    /// starts the serving thread.
    ///
    /// # Errors
    /// The address cannot be listened on (in use, not local, no
    /// permission), or another recorder is installed.
    pub fn start(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let handle = PrometheusBuilder::new()
            .install_recorder()
            .map_err(io::Error::other)?;
        let engine = Arc::new(OnceLock::<Arc<Deduper>>::new());
        let seen = Arc::clone(&engine);
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("dedup-metrics".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                        continue; // dropped: closed unanswered
                    }
                    let slot = Slot::take(&active);
                    let handle = handle.clone();
                    let engine = seen.get().cloned();
                    let spawned = std::thread::Builder::new()
                        .name("dedup-scrape".into())
                        .spawn(move || {
                            let _slot = slot;
                            // A client that misbehaves only loses its own
                            // answer.
                            let _ = answer(stream, &handle, engine.as_deref());
                        });
                    // Without a thread the connection is closed (the
                    // closure, slot and stream with it).
                    drop(spawned);
                }
            })?;
        Ok(MetricsEndpoint { engine, addr })
    }

    /// The address listened on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes `engine`'s counters with every later scrape.
    pub fn attach(&self, engine: &Arc<Deduper>) {
        let _ = self.engine.set(Arc::clone(engine));
    }
}

/// One of the [`MAX_CONNECTIONS`] connections served at once; freed on
/// drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::AcqRel);
        Slot(Arc::clone(active))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream whose every read and write must end by a deadline: each call's
/// timeout is what is left of it.
struct Deadline {
    stream: TcpStream,
    at: Instant,
}

impl Deadline {
    fn left(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection's deadline passed",
            ));
        }
        Ok(left)
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Reads one request from `stream` and answers it, all within
/// [`CLIENT_DEADLINE`].
fn answer(
    stream: TcpStream,
    handle: &PrometheusHandle,
    engine: Option<&Deduper>,
) -> io::Result<()> {
    let mut stream = Deadline {
        stream,
        at: Instant::now() + CLIENT_DEADLINE,
    };
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // Up to the blank line that ends the head (a GET has no body).
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"",
            );
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            if let Some(engine) = engine {
                engine.publish_metrics();
            }
            handle.run_upkeep();
            let body = handle.render();
            respond(&mut stream, "200 OK", CONTENT_TYPE, body.as_bytes())
        }
        (_, "/metrics") => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET /metrics\n",
        ),
        _ => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"try GET /metrics\n",
        ),
    }
}

fn respond(
    stream: &mut impl Write,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// The program's own counters (the summary's figures), set after every
/// chunk: no-ops unless `--metrics-addr` installed a recorder.
pub struct RunCounters {
    read: Counter,
    unique: Counter,
    duplicates: Counter,
    bad: [Counter; BadKind::ALL.len()],
    unavailable: Counter,
    undelivered: Counter,
    written: Counter,
    written_bytes: Counter,
    bytes_read: Counter,
}

impl RunCounters {
    /// Registers the series (after the recorder is installed).
    pub fn new() -> Self {
        RunCounters {
            read: metrics::counter!("dedup_records_read_total"),
            unique: metrics::counter!("dedup_records_unique_total"),
            duplicates: metrics::counter!("dedup_records_duplicate_total"),
            bad: BadKind::ALL
                .map(|k| metrics::counter!("dedup_records_bad_total", "kind" => k.name())),
            unavailable: metrics::counter!("dedup_records_unavailable_total"),
            undelivered: metrics::counter!("dedup_records_undelivered_total"),
            written: metrics::counter!("dedup_records_written_total"),
            written_bytes: metrics::counter!("dedup_written_bytes_total"),
            bytes_read: metrics::counter!("dedup_read_bytes_total"),
        }
    }

    /// Sets every series to the run's figures so far.
    pub fn set(&self, tally: &Tally, written: u64, written_bytes: u64, bytes_read: u64) {
        self.read.absolute(tally.read);
        self.unique.absolute(tally.unique);
        self.duplicates.absolute(tally.duplicates);
        for (counter, &n) in self.bad.iter().zip(&tally.bad) {
            counter.absolute(n);
        }
        self.unavailable.absolute(tally.unavailable);
        self.undelivered.absolute(tally.undelivered);
        self.written.absolute(written);
        self.written_bytes.absolute(written_bytes);
        self.bytes_read.absolute(bytes_read);
    }
}
