//! No silent loss, without Redis: signals stop a run gracefully (the state
//! saved, the summary printed), one run at a time per `--state`, bad times
//! and endless records are bad input, a closed standard error is no panic,
//! and sizes the machine cannot hold are refused. Every failing run's
//! summary adds up.

#[path = "support/run.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{assert_sum_holds, count, peak_mb, run, Running};

/// A generous bound for a run's end on a loaded machine.
const LONG: Duration = Duration::from_secs(60);

fn lines(range: std::ops::Range<u32>) -> String {
    range.map(|i| format!("line-{i}\n")).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn smoke() {
    let r = run(&[], b"a\nb\na\n", LONG);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.out(), "a\nb\n");
    assert_sum_holds(&r.stderr);
}

// ------------------------------------------------------------- signals

/// SIGTERM while the input is still open: what was read is judged and
/// written, the state saved, the summary printed, status 143; a rerun on
/// the state knows every record.
#[test]
fn sigterm_stops_gracefully_and_saves_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut r = Running::start(&["--state", s(&state)]);
    r.write(lines(0..10_000).as_bytes());
    assert!(
        r.wait_for_lines(10_000, LONG),
        "the records were not written while the input stayed open: {}",
        r.stderr()
    );
    r.signal("TERM");
    let f = r.finish(LONG);
    assert_eq!(f.code, Some(143), "{}", f.stderr);
    assert!(
        f.stderr.contains("SIGTERM: stopped reading"),
        "{}",
        f.stderr
    );
    assert_eq!(count(&f.stderr, "unique"), 10_000);
    assert_sum_holds(&f.stderr);
    assert_eq!(f.out(), lines(0..10_000));
    let again = run(
        &["--state", s(&state)],
        lines(5_000..12_000).as_bytes(),
        LONG,
    );
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(again.out(), lines(10_000..12_000));
}

/// SIGINT before anything arrives ends the run at once with 130; a run
/// waiting on an idle pipe is not stuck in its read.
#[test]
fn sigint_on_an_idle_pipe_ends_with_130() {
    let r = Running::start(&[]);
    std::thread::sleep(Duration::from_millis(300));
    r.signal("INT");
    let f = r.finish(Duration::from_secs(10));
    assert_eq!(f.code, Some(130), "{}", f.stderr);
    // Once a record has been read, the summary is printed too.
    let mut r = Running::start(&[]);
    r.write(b"x\ny\n");
    assert!(r.wait_for_lines(2, LONG));
    r.signal("INT");
    let f = r.finish(Duration::from_secs(10));
    assert_eq!(f.code, Some(130), "{}", f.stderr);
    assert_eq!(count(&f.stderr, "read"), 2);
    assert_sum_holds(&f.stderr);
}

// ------------------------------------------------------- one run per state

/// A second run on a state directory in use is refused before it reads
/// anything, and says who holds it; the first run then saves normally.
#[test]
fn a_second_run_on_a_busy_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut first = Running::start(&["--state", s(&state)]);
    first.write(lines(0..1_000).as_bytes());
    assert!(first.wait_for_lines(1_000, LONG), "{}", first.stderr());
    // Its standard input stays open and empty: a run that read it before
    // refusing would hang.
    let second = Running::start(&["--state", s(&state)]);
    let f2 = second.finish(Duration::from_secs(20));
    assert_eq!(f2.code, Some(1), "{}", f2.stderr);
    assert!(
        f2.stderr.contains("in use by another dedup run")
            && f2.stderr.contains(&format!("pid {}", first.pid()))
            && f2.stderr.contains("started "),
        "{}",
        f2.stderr
    );
    assert!(f2.stdout.is_empty());
    first.close_stdin();
    let f1 = first.finish(LONG);
    assert_eq!(f1.code, Some(0), "{}", f1.stderr);
    let again = run(&["--state", s(&state)], lines(0..1_500).as_bytes(), LONG);
    assert_eq!(again.out(), lines(1_000..1_500));
}

/// A directory that cannot be written is refused before any input is read
/// (the input here never ends), not at the save.
#[test]
fn an_unwritable_state_directory_is_refused_before_reading() {
    // /proc refuses new files even to root.
    let r = Running::start(&["--state", "/proc/self"]);
    let f = r.finish(Duration::from_secs(20));
    assert_eq!(f.code, Some(1), "{}", f.stderr);
    assert!(f.stderr.contains("/proc/self"), "{}", f.stderr);
}

/// Temporary files a dead run left are removed (a planted link among them,
/// without following it), and the state is never written through a link
/// planted at a name it writes: a temporary file's link is removed, not
/// followed; a new file's name taken by a link makes the write fail.
#[test]
fn the_state_directory_is_not_written_through_planted_links() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let stale = state.join(".dedup.state.1.tmp");
    std::os::unix::fs::symlink(&victim, &stale).unwrap();
    let args = ["--state", s(&state), "--durability", "none"];
    let mut r = Running::start(&args);
    r.write(b"a\n");
    assert!(r.wait_for_lines(1, LONG), "{}", r.stderr());
    assert!(
        std::fs::symlink_metadata(&stale).is_err(),
        "a stale temporary file was left"
    );
    // The checkpoint's temporary name: the link is removed, not followed.
    let engine = state.join("engine");
    std::os::unix::fs::symlink(&victim, engine.join("checkpoint.tmp")).unwrap();
    r.close_stdin();
    let f = r.finish(LONG);
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(engine.join("checkpoint").is_file());
    // The next log segment's name: the checkpoint that would create it
    // refuses, and the previous checkpoint stays.
    let before = std::fs::read(engine.join("checkpoint")).unwrap();
    let mut r = Running::start(&args);
    r.write(b"b\n");
    assert!(r.wait_for_lines(1, LONG), "{}", r.stderr());
    let next = std::fs::read_dir(&engine)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            u64::from_str_radix(name.strip_prefix("wal-")?.strip_suffix(".log")?, 16).ok()
        })
        .max()
        .unwrap()
        + 1;
    std::os::unix::fs::symlink(&victim, engine.join(format!("wal-{next:016x}.log"))).unwrap();
    r.close_stdin();
    let f = r.finish(LONG);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(f.code, Some(1), "{}", f.stderr);
    assert!(f.stderr.contains("exists"), "{}", f.stderr);
    assert_eq!(std::fs::read(engine.join("checkpoint")).unwrap(), before);
}

// ---------------------------------------------------------- bad times

/// One record dated 2554 is `future` bad input: it is counted, follows
/// `--on-error`, and neither the later records nor the saved state are
/// poisoned by it.
#[test]
fn a_time_far_in_the_future_does_not_poison_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let t0 = now_secs() - 3_600;
    let mut input = String::new();
    for i in 0..100 {
        input.push_str(&format!("{{\"id\":{i},\"t\":{}}}\n", t0 + i));
        if i == 50 {
            input.push_str("{\"id\":\"bad\",\"t\":\"2554-01-01T00:00:00Z\"}\n");
        }
    }
    let args = [
        "--format",
        "ndjson",
        "--key",
        "/id",
        "--time-field",
        "/t",
        "--window",
        "10m",
        "--state",
        s(&state),
    ];
    let mut skip = args.to_vec();
    skip.extend(["--on-error", "skip"]);
    let r = run(&skip, input.as_bytes(), LONG);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains(":52: future: "), "{}", r.stderr);
    assert_eq!(count(&r.stderr, "unique"), 100, "{}", r.stderr);
    assert!(r.stderr.contains("1 future"), "{}", r.stderr);
    assert!(!r.stderr.contains(": late: "), "{}", r.stderr);
    assert_sum_holds(&r.stderr);
    // The state's watermark is the last good time: a record an hour later
    // is judged, not late.
    let next = format!("{{\"id\":\"next\",\"t\":{}}}\n", t0 + 200);
    let r = run(&args, next.as_bytes(), LONG);
    assert_eq!((r.code, r.out()), (Some(0), next), "{}", r.stderr);
    // Under `fail` it stops the run (status 2), with nothing after it.
    let dir2 = tempfile::tempdir().unwrap();
    let r = run(
        &[
            "--format",
            "ndjson",
            "--key",
            "/id",
            "--time-field",
            "/t",
            "--state",
            s(dir2.path()),
        ],
        input.as_bytes(),
        LONG,
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert_eq!(count(&r.stderr, "unique"), 51);
    assert_sum_holds(&r.stderr);
    // `--max-future none` takes any time.
    let r = run(
        &[
            "--format",
            "ndjson",
            "--key",
            "/id",
            "--time-field",
            "/t",
            "--window",
            "10m",
            "--max-future",
            "none",
        ],
        input.as_bytes(),
        LONG,
    );
    assert_eq!(
        r.code,
        Some(2),
        "the 2554 record makes the rest late: {}",
        r.stderr
    );
    assert!(r.stderr.contains(": late: "), "{}", r.stderr);
}

// ------------------------------------------------------ endless records

/// `/dev/zero` has no newline: the record is cut at the limit, reported
/// with its file and line, and the run stops (status 2) in bounded memory.
#[test]
fn a_record_without_end_stops_at_the_limit() {
    let r = run(&["/dev/zero"], b"", LONG);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("/dev/zero:1: too-long: "), "{}", r.stderr);
    assert!(peak_mb(&r.stderr) < 200.0, "{}", r.stderr);
    assert_sum_holds(&r.stderr);
}

/// Under `skip` a too-long record is dropped and counted; under `pass` too
/// (its bytes were not kept), and the message says so.
#[test]
fn too_long_records_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.txt");
    let mut bytes = b"a\n".to_vec();
    bytes.extend(vec![b'x'; 3 << 20]);
    bytes.extend_from_slice(b"\nb\na\n");
    std::fs::write(&file, &bytes).unwrap();
    for policy in ["skip", "pass"] {
        let r = run(
            &["--max-record-bytes", "1MiB", "--on-error", policy, s(&file)],
            b"",
            LONG,
        );
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(r.out(), "a\nb\n");
        assert!(r.stderr.contains("long.txt:2: too-long: "), "{}", r.stderr);
        assert!(r.stderr.contains("1 too-long"), "{}", r.stderr);
        assert_sum_holds(&r.stderr);
        if policy == "pass" {
            assert!(r.stderr.contains("not passed"), "{}", r.stderr);
        }
    }
}

// ------------------------------------------------------- closed stderr

/// A closed standard error loses the messages, not the run.
#[test]
fn a_closed_stderr_is_not_a_panic() {
    let mut child = Command::new(support::dedup_path())
        .args(["--format", "ndjson", "--on-error", "skip"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"{\"a\":1}\nnot json\n{\"a\":1}\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"{\"a\":1}\n");
}

// ------------------------------------------------------------- sizing

/// An expected key count no machine holds is a configuration error, not
/// an abort on allocation.
#[test]
fn impossible_sizes_are_refused_with_a_message() {
    for keys in ["1000000000000", "1e12"] {
        let r = run(&["--expected-keys", keys, "--window", "1h"], b"a\n", LONG);
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        assert!(
            r.stderr
                .contains("--expected-keys 1000000000000 per window"),
            "{}",
            r.stderr
        );
        assert!(
            r.stderr.contains("more than this machine's"),
            "{}",
            r.stderr
        );
    }
}

/// A lateness of 1000 days over a one-hour window (24001 windows' worth
/// of keys) costs memory for the input's records, not for the span.
#[test]
fn lateness_far_past_the_window_stays_small() {
    let t0 = now_secs() - 86_400;
    let input: String = (0..1_386)
        .map(|i| format!("{{\"id\":{i},\"t\":{}}}\n", t0 + i))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, &input).unwrap();
    let r = run(
        &[
            "--format",
            "ndjson",
            "--key",
            "/id",
            "--time-field",
            "/t",
            "--window",
            "1h",
            "--allowed-lateness",
            "1000d",
            s(&file),
        ],
        b"",
        LONG,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(count(&r.stderr, "unique"), 1_386);
    assert!(peak_mb(&r.stderr) < 150.0, "{}", r.stderr);
}
