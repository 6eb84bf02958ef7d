//! `dedup --exact redis://…`: two runs against one private `redis-server`
//! deduplicate across the run boundary, through Redis alone; and no silent
//! loss: marks Redis cannot store fail the run loudly, a closed output
//! records what was delivered, marks reach Redis while the input is idle,
//! a stop inside a chunk leaves nothing marked that was not written, and
//! every failure names its cause with a summary that adds up.

#[path = "../../tests/support/redis_server.rs"]
mod redis_server;
#[path = "support/run.rs"]
mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis_server::{count_marks, mark_hashes, RedisServer};
use support::{assert_sum_holds, count, wait_until, Running};

/// A generous bound for a run's end on a loaded machine.
const LONG: Duration = Duration::from_secs(120);

fn keys(range: std::ops::Range<u32>) -> String {
    range.map(|i| format!("key-{i}\n")).collect()
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

fn marks_in(server: &RedisServer) -> u64 {
    let mut conn = server.connection();
    let hashes = mark_hashes(&mut conn);
    count_marks(&mut conn, &hashes)
}

fn dedup(args: &[&str], input: &str) -> (String, String, i32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dedup"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running dedup");
    // A run refused at its flags exits before reading: a broken pipe here
    // is that, and the exit status tells.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
fn smoke() {
    let server = RedisServer::start();
    let url = server.url();
    let (out, _, code) = dedup(&["-q", "--exact", &url], "a\nb\na\n");
    assert_eq!((out.as_str(), code), ("a\nb\n", 0));
}

#[test]
fn a_second_run_remembers_the_first_through_redis() {
    let server = RedisServer::start();
    let url = server.url();
    let first: String = (0..5_000).map(|i| format!("order-{i}\n")).collect();
    let (out, err, code) = dedup(&["-q", "--exact", &url, "--window", "1h"], &first);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, first);
    // The second run repeats half of the first run's records and adds new
    // ones: only the new ones come out (its filter starts cold, so every
    // record is confirmed in Redis).
    let second: String = (2_500..7_500).map(|i| format!("order-{i}\n")).collect();
    let (out, err, code) = dedup(&["-q", "--exact", &url, "--window", "1h"], &second);
    assert_eq!(code, 0, "{err}");
    let expected: String = (5_000..7_500).map(|i| format!("order-{i}\n")).collect();
    assert_eq!(out, expected);
}

#[test]
fn state_with_redis_is_refused() {
    let server = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("td-cli-redis-{}", std::process::id()));
    let (_, err, code) = dedup(
        &["--exact", &server.url(), "--state", dir.to_str().unwrap()],
        "a\n",
    );
    assert_eq!(code, 1);
    assert!(err.contains("drop --state"), "{err}");
}

// ------------------------------------------------------- no silent loss

/// A Redis that refuses writes (out of memory, no eviction): the run
/// fails with status 4, says how many accepted records are not stored and
/// why, and the summary says so.
#[test]
fn marks_redis_cannot_store_fail_the_run_loudly() {
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "keys.txt", &keys(0..300_000));
    let r = support::run(&["--exact", &url, "--window", "1h", &file], b"", LONG);
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(
        r.stderr.contains("accepted keys are not stored"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("OOM"), "the cause: {}", r.stderr);
    assert!(r.stderr.contains("NOT STORED: "), "{}", r.stderr);
    assert_sum_holds(&r.stderr);
    // Never fewer reported than Redis is missing.
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("dedup: NOT STORED: "))
        .unwrap();
    let reported: u64 = line["dedup: NOT STORED: ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let missing = count(&r.stderr, "unique") - marks_in(&server);
    assert!(
        reported >= missing,
        "reported {reported}, missing {missing}"
    );
}

/// `dedup … | head -n 50000` through a real pipe: the delivered lines are
/// recorded (a rerun calls them duplicates); accepted lines that could not
/// be delivered are named, with status 5 — or, when the pipe closed between
/// chunks, none was accepted unwritten and the status is 0.
#[test]
fn a_closed_output_records_what_was_delivered() {
    let server = RedisServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "keys.txt", &keys(0..300_000));
    let mut dedup = Command::new(support::dedup_path())
        .args(["--exact", &url, "--window", "1h", &file])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let head = Command::new("head")
        .args(["-n", "50000"])
        .stdin(dedup.stdout.take().unwrap())
        .output()
        .unwrap();
    assert_eq!(head.stdout, keys(0..50_000).as_bytes());
    let d = dedup.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&d.stderr).into_owned();
    assert_sum_holds(&stderr);
    // Delivered to the pipe is more than `head` printed (its buffer).
    let written = u32::try_from(count(&stderr, "written")).unwrap();
    assert!(written >= 50_000, "{stderr}");
    let known = match d.status.code() {
        // The pipe closed while a chunk was being written: the accepted
        // lines not written are named, `… accepted records among
        // FILE:A-B were recorded but not written`.
        Some(5) => {
            let named = stderr
                .lines()
                .find(|l| l.contains("recorded but not written"))
                .unwrap_or_else(|| panic!("{stderr}"));
            let range = named.split(&format!("{file}:")).nth(1).unwrap();
            let range = range.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
            assert!(a == written + 1 && b >= a, "{named}");
            assert_eq!(count(&stderr, "undelivered"), u64::from(b - a + 1));
            b
        }
        // It closed between chunks, seen before the next was judged:
        // nothing accepted is left unwritten.
        Some(0) => {
            assert_eq!(count(&stderr, "undelivered"), 0, "{stderr}");
            written
        }
        other => panic!("status {other:?}: {stderr}"),
    };
    // The rerun: the delivered and the named lines are known; every line
    // after them is new.
    let again = support::run(&["-q", "--exact", &url, "--window", "1h", &file], b"", LONG);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(again.out(), keys(known..300_000));
}

/// Input that pauses: the marks of what was read reach Redis within the
/// flush interval although no record arrives, and SIGINT then ends the
/// run gracefully (status 130) with every mark kept.
#[test]
fn idle_input_flushes_and_sigint_keeps_the_marks() {
    let server = RedisServer::start();
    let url = server.url();
    let mut r = Running::start(&["--exact", &url, "--window", "1h"]);
    r.write(keys(0..60_000).as_bytes());
    assert!(r.wait_for_lines(60_000, LONG), "{}", r.stderr());
    assert!(
        wait_until(Duration::from_secs(5), || marks_in(&server) == 60_000),
        "marks still pending while the input is idle: {} of 60000 in Redis",
        marks_in(&server)
    );
    r.signal("INT");
    let f = r.finish(LONG);
    assert_eq!(f.code, Some(130), "{}", f.stderr);
    assert!(f.stderr.contains("SIGINT: stopped reading"), "{}", f.stderr);
    assert_sum_holds(&f.stderr);
    let again = support::run(
        &["-q", "--exact", &url, "--window", "1h"],
        keys(0..60_000).as_bytes(),
        LONG,
    );
    assert_eq!(
        (again.code, again.out()),
        (Some(0), String::new()),
        "{}",
        again.stderr
    );
}

/// A `late` record under `--on-error fail` in the middle of a chunk: the
/// records after it are not judged, so none is marked; the corrected
/// rerun writes exactly them.
#[test]
fn a_stop_inside_a_chunk_marks_nothing_after_it() {
    let server = RedisServer::start();
    let url = server.url();
    let t0 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 86_400;
    let record = |i: u64, t: u64| format!("{{\"id\":{i},\"t\":{t}}}\n");
    let good: Vec<String> = (0..2_000).map(|i| record(i, t0 + i)).collect();
    let late = record(99_999, t0 - 7_200);
    let mut input = good[..1_000].concat();
    input.push_str(&late);
    input.push_str(&good[1_000..].concat());
    let args = [
        "--exact",
        &url,
        "--format",
        "ndjson",
        "--key",
        "/id",
        "--time-field",
        "/t",
        "--window",
        "10m",
    ];
    let r = support::run(&args, input.as_bytes(), LONG);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("<stdin>:1001: late: "), "{}", r.stderr);
    assert_eq!(r.out(), good[..1_000].concat());
    assert_sum_holds(&r.stderr);
    let fixed = good.concat();
    let r = support::run(&args, fixed.as_bytes(), LONG);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.out(), good[1_000..].concat());
}

/// Redis down, a wrong password, no password, a read-only replica: the
/// run fails (not 0), names the cause and the URL without its password,
/// and its summary adds up.
#[test]
fn failures_name_their_cause_and_the_sum_holds() {
    let input = keys(0..2_000);
    let check = |url: &str, causes: &[&str]| {
        let r = support::run(&["--exact", url, "--window", "1h"], input.as_bytes(), LONG);
        assert!(matches!(r.code, Some(3 | 4)), "{url}: {}", r.stderr);
        assert!(
            causes.iter().any(|c| r.stderr.contains(c)),
            "{url}: no cause among {causes:?}: {}",
            r.stderr
        );
        assert!(
            !r.stderr.contains("sesame"),
            "the password is shown: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("could not answer\n"), "{}", r.stderr);
        assert_sum_holds(&r.stderr);
        r
    };
    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("redis://127.0.0.1:{port}");
    let r = check(&down, &["Connection refused", "refused"]);
    assert_eq!(r.code, Some(3));
    assert!(r.stderr.contains(&down), "{}", r.stderr);
    assert_eq!(count(&r.stderr, "unavailable"), 2_000);
    assert!(r.stdout.is_empty());

    let guarded = RedisServer::start();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right")
        .query(&mut guarded.connection())
        .unwrap();
    let wrong = format!("redis://:sesame@127.0.0.1:{}", guarded.port);
    let r = check(
        &wrong,
        &[
            "WRONGPASS",
            "authentication failed",
            "invalid username-password",
        ],
    );
    assert!(
        r.stderr
            .contains(&format!("redis://:***@127.0.0.1:{}", guarded.port)),
        "{}",
        r.stderr
    );
    check(&guarded.url(), &["NOAUTH", "Authentication required"]);

    let master = RedisServer::start();
    let replica = RedisServer::start();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(master.port)
        .query(&mut replica.connection())
        .unwrap();
    // A replica keeps nothing that is written to it: refused before any
    // input is read, with the library's message.
    let r = support::run(
        &["--exact", &replica.url(), "--window", "1h"],
        input.as_bytes(),
        LONG,
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("replica"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

/// A Redis that evicts keys under memory pressure would forget accepted
/// records: the run is refused before reading input, saying which policy
/// to change.
#[test]
fn an_evicting_redis_is_refused_at_start() {
    let server = RedisServer::start();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query(&mut server.connection())
        .unwrap();
    let input = keys(0..100);
    let r = support::run(
        &["--exact", &server.url(), "--window", "1h"],
        input.as_bytes(),
        LONG,
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("allkeys-lru"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
}
