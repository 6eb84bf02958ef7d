//! `dedup --metrics-addr`: a run kept going by an open standard input serves
//! its counters as Prometheus text over loopback, and they match the
//! summary it prints at the end. Only 127.0.0.1 is ever listened on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the counters may take to reach what was written (not a timing
/// assertion: a generous bound on a loaded machine).
const DEADLINE: Duration = Duration::from_secs(30);

fn dedup_path() -> &'static str {
    env!("CARGO_BIN_EXE_dedup")
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One HTTP/1.1 request; the whole answer (`None` when nothing listens).
fn request(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// The body of `GET /metrics`, after checking the status and content type.
fn scrape(addr: SocketAddr) -> Option<String> {
    let answer = request(addr, "GET", "/metrics")?;
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(body.to_owned())
}

/// The value of the series `name` whose labels include every `labels`
/// (`key="value"`), from Prometheus text.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let rest = l.strip_prefix(name);
            rest.is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                && labels.iter().all(|want| l.contains(want))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

#[test]
fn smoke() {
    let out = Command::new(dedup_path())
        .args(["--metrics-addr", "localhost:9464"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--metrics-addr"), "{stderr}");
    assert!(stderr.contains("expected IP:PORT"), "{stderr}");
}

/// An address that is taken is refused before any input is read, with a
/// clap-style error and exit status 1.
#[test]
fn an_address_in_use_is_refused() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(dedup_path())
        .args(["--metrics-addr", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error:"), "{stderr}");
    assert!(stderr.contains("cannot serve metrics there"), "{stderr}");
}

/// 5 000 NDJSON records (3 500 distinct ids, 1 500 repeats) and 7 invalid
/// lines, written to a pipe left open: the scrape reaches those counts
/// while the run goes on; after standard input closes, the summary says the
/// same, and the endpoint is gone.
#[test]
fn a_long_run_serves_counters_that_match_its_summary() {
    let addr = free_addr();
    let mut child = Command::new(dedup_path())
        .args([
            "--format",
            "ndjson",
            "--key",
            "/id",
            "--on-error",
            "skip",
            "--namespace",
            "orders",
            "--metrics-addr",
            &addr.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both outputs so the run never blocks on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).unwrap();
        v
    });
    let mut stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });

    let (distinct, repeats, bad) = (3_500u64, 1_500u64, 7u64);
    let mut input = String::new();
    for i in 0..distinct + repeats {
        let id = if i < distinct { i } else { (i * 7) % distinct };
        input.push_str(&format!("{{\"id\":{id},\"n\":{i}}}\n"));
        if i % 700 == 0 && i / 700 < bad {
            input.push_str("{\"id\": \n");
        }
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    stdin.flush().unwrap();

    // Standard input stays open: the run is still going.
    let read = distinct + repeats + bad;
    let start = Instant::now();
    let text = loop {
        if let Some(text) = scrape(addr) {
            if value(&text, "dedup_records_read_total", &[]) == Some(read) {
                break text;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the counters did not reach {read} records read"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run is still going"
    );
    let get = |name: &str, labels: &[&str]| {
        value(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{text}"))
    };
    assert_eq!(get("dedup_records_unique_total", &[]), distinct);
    assert_eq!(get("dedup_records_duplicate_total", &[]), repeats);
    assert_eq!(
        get("dedup_records_bad_total", &["kind=\"invalid-json\""]),
        bad
    );
    assert_eq!(get("dedup_records_bad_total", &["kind=\"missing-key\""]), 0);
    assert_eq!(get("dedup_records_written_total", &[]), distinct);
    let engine = ["namespace=\"orders\"", "exact_tier=\"memory\""];
    assert_eq!(
        get("tiered_dedup_checks_total", &engine),
        distinct + repeats
    );
    assert_eq!(get("tiered_dedup_new_total", &engine), distinct);
    assert_eq!(get("tiered_dedup_duplicates_total", &engine), repeats);
    assert!(text.contains("# TYPE dedup_records_read_total counter"));
    // Only /metrics is served.
    let other = request(addr, "GET", "/").unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");

    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success());
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(
        stdout.iter().filter(|&&b| b == b'\n').count() as u64,
        distinct
    );
    assert!(
        stderr.contains(&format!("dedup: metrics at http://{addr}/metrics")),
        "{stderr}"
    );
    // The summary's figures equal the last scrape's.
    let summary = stderr
        .lines()
        .find(|l| l.contains(" records read: "))
        .unwrap_or_else(|| panic!("a summary in {stderr}"));
    assert_eq!(
        summary.split(" (").next().unwrap(),
        format!(
            "dedup: {} records read: {} unique, {} duplicates, {} bad; {} written",
            get("dedup_records_read_total", &[]),
            get("dedup_records_unique_total", &[]),
            get("dedup_records_duplicate_total", &[]),
            get("dedup_records_bad_total", &["kind=\"invalid-json\""]),
            get("dedup_records_written_total", &[]),
        )
    );
    assert!(stderr.contains(&format!("dedup: bad records (skipped): {bad} invalid-json")));
    // The endpoint closed with the run.
    assert!(request(addr, "GET", "/metrics").is_none());
}

/// A client that sends its request one byte a second holds its connection
/// without delaying another scrape, and is cut off at the connection's
/// deadline (5 s) instead of holding it as long as it trickles.
#[test]
fn a_slow_client_does_not_delay_another_scrape() {
    let addr = free_addr();
    let mut child = Command::new(dedup_path())
        .args(["--metrics-addr", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while scrape_quietly(addr).is_none() {
        assert!(started.elapsed() < DEADLINE, "the endpoint never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        let connected = Instant::now();
        // At most 20 bytes, one a second: the request never completes.
        for b in b"GET /metrics HTTP/1.1" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            // A closed connection reads as its end (or an error).
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 64];
            let closed = matches!(s.read(&mut buf), Ok(0))
                || matches!(s.read(&mut buf), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock);
            s.set_nonblocking(false).unwrap();
            if closed {
                break;
            }
        }
        connected.elapsed()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    let body = scrape_quietly(addr).expect("the scrape was answered");
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "a scrape waited {took:?} behind a slow client"
    );
    assert!(body.contains("dedup_records_read_total"), "{body}");
    let held = slow.join().unwrap();
    assert!(
        held < Duration::from_secs(9),
        "the slow client held its connection {held:?}"
    );
    drop(child.stdin.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// `GET /metrics` with a short read timeout; `None` when it fails.
fn scrape_quietly(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(4))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer
        .starts_with("HTTP/1.1 200 OK")
        .then(|| answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()))
        .flatten()
}
