//! The `dedup` program, run as a process: byte-identical to
//! `awk '!seen[$0]++'` on lines, equal to a reference model on NDJSON with
//! event time and a window, every kind of bad input under every policy,
//! state across runs, and no panic on any input.

#[path = "../../tests/support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use proptest::prelude::*;
use rng::Rng;

/// What a run of `dedup` produced.
struct Run {
    stdout: Vec<u8>,
    stderr: String,
    code: i32,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn dedup_path() -> &'static str {
    env!("CARGO_BIN_EXE_dedup")
}

/// Runs `dedup args` with `stdin` piped in.
fn dedup(args: &[&str], stdin: &[u8]) -> Run {
    run_command(Command::new(dedup_path()).args(args), stdin)
}

fn run_command(cmd: &mut Command, stdin: &[u8]) -> Run {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    // Write from another thread: the child may fill its stdout first.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    writer.join().unwrap();
    Run {
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code().unwrap_or(-1),
    }
}

/// `LC_ALL=C awk '!seen[$0]++' files…` (stdin when `files` is empty).
fn awk(files: &[&Path], stdin: &[u8]) -> Vec<u8> {
    let mut cmd = Command::new("awk");
    cmd.env("LC_ALL", "C").arg("!seen[$0]++").args(files);
    let r = run_command(&mut cmd, stdin);
    assert_eq!(r.code, 0, "awk failed: {}", r.stderr);
    r.stdout
}

/// What `dedup` writes where awk writes `awk_out` for one input `input`:
/// the same, except that a last record without a newline is written
/// without one when it is the last record written (awk always adds one).
fn expected_from_awk(awk_out: Vec<u8>, input: &[u8]) -> Vec<u8> {
    let mut expected = awk_out;
    if !input.is_empty() && !input.ends_with(b"\n") {
        let last = input.rsplit(|&b| b == b'\n').next().unwrap();
        let earlier = &input[..input.len() - last.len()];
        let seen_before = earlier
            .split(|&b| b == b'\n')
            .take(earlier.split(|&b| b == b'\n').count().saturating_sub(1))
            .any(|l| l == last);
        if !seen_before {
            assert_eq!(expected.pop(), Some(b'\n'));
        }
    }
    expected
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A summary count: `read`, `unique`, `duplicates`, `bad` or `written`.
fn count(stderr: &str, what: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("records read:"))
        .unwrap_or_else(|| panic!("no summary in {stderr:?}"));
    let words: Vec<&str> = line
        .split([' ', ',', ';', ':'])
        .filter(|w| !w.is_empty())
        .collect();
    let at = words
        .iter()
        .position(|w| *w == what)
        .unwrap_or_else(|| panic!("no {what} in {line}"));
    let n = if what == "read" { at - 2 } else { at - 1 };
    words[n].parse().unwrap()
}

#[test]
fn smoke() {
    let r = dedup(&[], b"a\nb\na\n\nc\n\n");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.out(), "a\nb\n\nc\n");
    assert_eq!(count(&r.stderr, "read"), 6);
    assert_eq!(count(&r.stderr, "unique"), 4);
    assert_eq!(count(&r.stderr, "duplicates"), 2);
    // The memory tier keeps no filter: its table holds the 4 distinct keys.
    assert!(
        r.stderr.contains("engine: no filter, 4 exact entries"),
        "{}",
        r.stderr
    );
    let quiet = dedup(&["-q"], b"x\nx\n");
    assert_eq!(quiet.out(), "x\n");
    assert_eq!(quiet.stderr, "");
}

// ---------------------------------------------------------------- lines

/// Inputs that awk and `dedup` must agree on.
fn awkward_inputs() -> Vec<Vec<u8>> {
    let mut long = vec![b'x'; 3 << 20];
    long.push(b'\n');
    long.extend_from_slice(b"y\n");
    long.extend_from_slice(&vec![b'x'; 3 << 20]);
    long.extend_from_slice(b"\n");
    let mut long2 = vec![b'x'; (3 << 20) - 1];
    long2.extend_from_slice(b"z\n");
    long.extend_from_slice(&long2);
    let mut many = Vec::new();
    for i in 0..100_000u32 {
        many.extend_from_slice(format!("{}\n", (i * 7919) % 60_000).as_bytes());
    }
    vec![
        b"".to_vec(),
        b"\n".to_vec(),
        b"\n\n\n".to_vec(),
        b"a\n\nb\n\na\n".to_vec(),
        b"no newline at all".to_vec(),
        b"a\nb\na".to_vec(),
        b"a\nb\nc".to_vec(),
        b"\xff\xfe\n\xff\n\xff\xfe\n\xc3\x28\n\xff\n".to_vec(),
        b"crlf\r\ncrlf\ncrlf\r\n\r\n\r\n".to_vec(),
        b"nul\0byte\nnul\0byte\nnul\0other\n".to_vec(),
        b" lead\nlead\n lead\ntrail \ntrail\n".to_vec(),
        long,
        many,
    ]
}

#[test]
fn lines_without_window_equal_awk_from_files_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    for (i, input) in awkward_inputs().iter().enumerate() {
        let file = write_file(dir.path(), &format!("in{i}"), input);
        let expected = expected_from_awk(awk(&[&file], b""), input);
        let from_file = dedup(&["-q", s(&file)], b"");
        assert_eq!(from_file.code, 0, "{}", from_file.stderr);
        assert!(
            from_file.stdout == expected,
            "input {i} from a file differs from awk"
        );
        let from_stdin = dedup(&["-q"], input);
        assert!(
            from_stdin.stdout == expected,
            "input {i} from stdin differs from awk"
        );
        let dash = dedup(&["-q", "-"], input);
        assert!(
            dash.stdout == expected,
            "input {i} from `-` differs from awk"
        );
    }
}

#[test]
fn several_files_are_one_stream() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(dir.path(), "a", b"1\n2\nlast-without-newline");
    let b = write_file(dir.path(), "b", b"2\n3\n1\n");
    let c = write_file(dir.path(), "c", b"4\n");
    // A record without a newline gets one when more output follows it.
    let r = dedup(&["-q", s(&a), s(&b), s(&c)], b"");
    assert_eq!(r.stdout, awk(&[&a, &b, &c], b""));
    assert_eq!(r.out(), "1\n2\nlast-without-newline\n3\n4\n");
    // Standard input between files.
    let r = dedup(&["-q", s(&a), "-", s(&c)], b"4\n5\n");
    assert_eq!(r.out(), "1\n2\nlast-without-newline\n4\n5\n");
}

#[test]
fn duplicates_and_annotate_on_lines() {
    let r = dedup(&["-q", "--output", "duplicates"], b"a\nb\na\na\nc\nb\n");
    assert_eq!(r.out(), "a\na\nb\n");
    let r = dedup(&["-q", "--output", "annotate"], b"a\nb\na\n");
    assert_eq!(r.out(), "new\ta\nnew\tb\nduplicate\ta\n");
}

#[test]
fn output_starts_before_input_ends() {
    let mut child = Command::new(dedup_path())
        .arg("-q")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"first\nfirst\n").unwrap();
    stdin.flush().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 6];
        let r = stdout.read_exact(&mut buf).map(|()| buf);
        let _ = tx.send(r.map(|b| b.to_vec()));
    });
    // The first record arrives while standard input is still open.
    let got = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no output while input is open");
    assert_eq!(got.unwrap(), b"first\n");
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

// ---------------------------------------------------------------- NDJSON and event time

/// How a test renders an event time.
#[derive(Clone, Copy, Debug)]
enum Encoding {
    /// RFC 3339 with nanoseconds and a UTC offset.
    Rfc3339,
    /// Seconds with nine decimals.
    Seconds,
    /// Whole milliseconds (`--time-unit ms`).
    Millis,
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn render_time(nanos: u64, enc: Encoding, offset_minutes: i64) -> String {
    match enc {
        Encoding::Seconds => format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000),
        Encoding::Millis => format!("{}", nanos / 1_000_000),
        Encoding::Rfc3339 => {
            let secs = (nanos / 1_000_000_000) as i64 + offset_minutes * 60;
            let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            let (y, mo, d) = civil_from_days(days);
            let sign = if offset_minutes < 0 { '-' } else { '+' };
            let off = offset_minutes.abs();
            format!(
                "\"{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:09}{sign}{:02}:{:02}\"",
                rem / 3600,
                rem / 60 % 60,
                rem % 60,
                nanos % 1_000_000_000,
                off / 60,
                off % 60
            )
        }
    }
}

/// A stream of (key, time) with disorder inside the lateness, and repeats
/// that land exactly on the window's boundary (and one unit before it).
fn event_stream(seed: u64, n: usize, window: u64, unit: u64) -> Vec<(String, u64)> {
    let mut rng = Rng::new(seed);
    let mut wm = 1_700_000_000_000_000_000u64;
    let mut first: HashMap<String, u64> = HashMap::new();
    let mut out = Vec::new();
    for _ in 0..n {
        let boundary = !first.is_empty() && rng.below(8) == 0;
        let (key, t) = if boundary {
            // A key whose window ends at or after wm − window (not late).
            let candidates: Vec<(&String, &u64)> = first
                .iter()
                .filter(|(_, &t0)| t0 + window >= wm - window + unit && t0 + window <= wm + window)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let mut candidates = candidates;
            candidates.sort();
            let (k, &t0) = candidates[rng.below(candidates.len() as u64) as usize];
            let t = t0 + window - if rng.below(2) == 0 { 0 } else { unit };
            (k.clone(), t)
        } else {
            let key = format!("k{}", rng.below(40));
            // Time moves on by up to 2 s, and an event may be up to half the
            // lateness (= the window) behind.
            let step = rng.below(2_000_000_000) / unit * unit;
            let back = rng.below(window / 2) / unit * unit;
            let t = (wm + step).saturating_sub(back);
            (key, t)
        };
        // The model's own first-accepted times, to aim boundary repeats.
        match first.get(&key) {
            Some(&t0) if (t as i128 - t0 as i128) < window as i128 => {}
            _ => {
                first.insert(key.clone(), t);
            }
        }
        wm = wm.max(t);
        out.push((key, t));
    }
    out
}

/// The reference: a map from key to first-accepted time; a repeat is a
/// duplicate iff `t − t0 < window`. Also counts the repeats exactly at the
/// window's end (new) and one `unit` before it (duplicates).
fn model(stream: &[(String, u64)], window: u64, unit: u64) -> (Vec<bool>, usize, usize) {
    let mut first: HashMap<&str, u64> = HashMap::new();
    let (mut at_end, mut just_before) = (0, 0);
    let verdicts = stream
        .iter()
        .map(|(k, t)| {
            let prior = first.get(k.as_str()).copied();
            if prior.is_some_and(|t0| *t == t0 + window) {
                at_end += 1;
            }
            if prior.is_some_and(|t0| *t + unit == t0 + window) {
                just_before += 1;
            }
            match prior {
                Some(t0) if (*t as i128 - t0 as i128) < window as i128 => false,
                _ => {
                    first.insert(k, *t);
                    true
                }
            }
        })
        .collect();
    (verdicts, at_end, just_before)
}

#[test]
fn ndjson_event_time_window_equals_the_reference_model() {
    let window = 10_000_000_000u64; // 10 s
    for (seed, enc) in [
        (1, Encoding::Rfc3339),
        (2, Encoding::Seconds),
        (3, Encoding::Millis),
        (4, Encoding::Rfc3339),
    ] {
        let unit = match enc {
            Encoding::Millis => 1_000_000,
            _ => 1,
        };
        let stream = event_stream(seed, 4000, window, unit);
        let (expected, at_end, just_before) = model(&stream, window, unit);
        assert!(at_end > 10 && just_before > 10, "{at_end} {just_before}");
        let mut rng = Rng::new(seed);
        let mut input = String::new();
        for (i, (k, t)) in stream.iter().enumerate() {
            let offset = rng.below(25) as i64 * 60 - 12 * 60;
            input.push_str(&format!(
                "{{\"seq\":{i},\"ev\":{{\"id\":\"{k}\"}},\"at\":{}}}\n",
                render_time(*t, enc, offset)
            ));
        }
        let mut args = vec![
            "--format",
            "ndjson",
            "--key",
            "/ev/id",
            "--time-field",
            "/at",
            "--window",
            "10s",
        ];
        if let Encoding::Millis = enc {
            args.extend(["--time-unit", "ms"]);
        }
        let mut annotate = args.clone();
        annotate.extend(["--output", "annotate"]);
        // From a file (large chunks, parsed on several threads) and from a
        // pipe (small chunks).
        let dir = tempfile::tempdir().unwrap();
        let file = write_file(dir.path(), "events.ndjson", input.as_bytes());
        let r = if seed % 2 == 0 {
            let mut from_file = annotate.clone();
            from_file.push(s(&file));
            dedup(&from_file, b"")
        } else {
            dedup(&annotate, input.as_bytes())
        };
        assert_eq!(r.code, 0, "{enc:?}: {}", r.stderr);
        let got: Vec<bool> = r
            .out()
            .lines()
            .map(|l| {
                assert!(l.ends_with("\"}") && l.contains(",\"_dedup\":\""), "{l}");
                l.ends_with(",\"_dedup\":\"new\"}")
            })
            .collect();
        assert_eq!(got.len(), expected.len());
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "{enc:?}: record {i} ({:?}) judged wrong", stream[i]);
        }
        // `unique` writes exactly the model's new records, unchanged.
        let unique = dedup(&args, input.as_bytes());
        let kept: Vec<&str> = input
            .lines()
            .zip(&expected)
            .filter(|(_, &new)| new)
            .map(|(l, _)| l)
            .collect();
        assert_eq!(unique.out(), kept.join("\n") + "\n", "{enc:?}");
        assert_eq!(
            count(&unique.stderr, "duplicates"),
            expected.iter().filter(|n| !**n).count() as u64
        );
    }
}

#[test]
fn window_boundary_is_exact() {
    let input = "{\"id\":\"a\",\"t\":100}\n\
                 {\"id\":\"a\",\"t\":109.999999999}\n\
                 {\"id\":\"a\",\"t\":110}\n\
                 {\"id\":\"a\",\"t\":\"1970-01-01T00:01:59.999999999Z\"}\n\
                 {\"id\":\"a\",\"t\":\"1970-01-01T01:02:00+01:00\"}\n";
    let r = dedup(
        &[
            "-q",
            "--format",
            "ndjson",
            "--key",
            "/id",
            "--time-field",
            "/t",
            "--window",
            "10s",
            "--output",
            "annotate",
            "--annotate-field",
            "v",
        ],
        input.as_bytes(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let verdicts: Vec<&str> = r
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.ends_with(b"\"new\"}") {
                "new"
            } else {
                "dup"
            }
        })
        .collect();
    assert_eq!(verdicts, ["new", "dup", "new", "dup", "new"]);
}

#[test]
fn composite_keys_and_key_rules() {
    let input = "{\"a\":\"x\",\"b\":1}\n\
                 {\"b\":1,\"a\":\"x\",\"c\":2}\n\
                 {\"a\":\"x\",\"b\":\"1\"}\n\
                 {\"a\":\"x\",\"b\":2}\n";
    let r = dedup(
        &["-q", "--format", "ndjson", "--key", "/a", "--key", "/b"],
        input.as_bytes(),
    );
    // Member order does not matter; "1" and 1 are the same key.
    assert_eq!(r.out(), "{\"a\":\"x\",\"b\":1}\n{\"a\":\"x\",\"b\":2}\n");
    // Without --key the whole record is the key (its bytes, JSON-trimmed).
    let r = dedup(
        &["-q", "--format", "ndjson"],
        b"{\"a\":1}\n {\"a\":1}\r\n{\"a\": 1}\n",
    );
    assert_eq!(r.out(), "{\"a\":1}\n{\"a\": 1}\n");
    // The empty pointer keys by the canonical value.
    let r = dedup(
        &["-q", "--format", "ndjson", "--key", ""],
        b"{\"a\":1,\"b\":[2]}\n{ \"b\": [2], \"a\": 1 }\n{\"a\":1}\n",
    );
    assert_eq!(r.out(), "{\"a\":1,\"b\":[2]}\n{\"a\":1}\n");
}

// ---------------------------------------------------------------- bad input

/// One record of each kind of bad input, with good records around them.
const MIXED: &str = concat!(
    "{\"id\":\"a\",\"t\":100}\n",
    "{\"id\":\"a\",\"t\":101}\n",
    "{\"id\":\"b\",\"t\":\n",
    "{\"t\":102}\n",
    "{\"id\":\"c\"}\n",
    "{\"id\":\"d\",\"t\":\"yesterday\"}\n",
    "{\"id\":\"e\",\"t\":1}\n",
    "{\"id\":\"f\",\"t\":103}\n",
);

fn mixed_input() -> Vec<u8> {
    let mut v = MIXED.as_bytes().to_vec();
    v.extend_from_slice(b"{\"id\":\"\xff\",\"t\":104}\n{\"id\":\"a\",\"t\":105}\n");
    v
}

#[test]
fn every_bad_kind_under_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "mixed.ndjson", &mixed_input());
    let base = [
        "--format",
        "ndjson",
        "--key",
        "/id",
        "--time-field",
        "/t",
        "--window",
        "10s",
    ];
    let kinds = [
        (3, "invalid-json"),
        (4, "missing-key"),
        (5, "missing-time"),
        (6, "bad-time"),
        (7, "late"),
        (9, "not-utf8"),
    ];

    // fail: the first bad record stops the run with status 2, after what
    // came before it was written.
    let mut args = base.to_vec();
    args.push(s(&file));
    let r = dedup(&args, b"");
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.out(), "{\"id\":\"a\",\"t\":100}\n");
    let place = format!("{}:3: invalid-json: ", s(&file));
    assert!(r.stderr.starts_with(&place), "{}", r.stderr);
    assert_eq!(r.stderr.matches(": invalid-json: ").count(), 1);

    for policy in ["skip", "pass"] {
        let mut args = base.to_vec();
        args.extend(["--on-error", policy, s(&file)]);
        let r = dedup(&args, b"");
        assert_eq!(r.code, 0, "{policy}: {}", r.stderr);
        for (line, kind) in kinds {
            let msg = format!("{}:{line}: {kind}: ", s(&file));
            assert!(
                r.stderr.contains(&msg),
                "{policy}: no `{msg}` in {}",
                r.stderr
            );
        }
        let (read, unique, dups, bad) = (
            count(&r.stderr, "read"),
            count(&r.stderr, "unique"),
            count(&r.stderr, "duplicates"),
            count(&r.stderr, "bad"),
        );
        let written = count(&r.stderr, "written");
        assert_eq!((read, unique, dups, bad), (10, 2, 2, 6), "{policy}");
        assert_eq!(read, unique + dups + bad);
        let out = r.stdout.clone();
        let lines = out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() as u64;
        assert_eq!(lines, written);
        if policy == "skip" {
            assert_eq!(
                read,
                written + dups + bad,
                "read = written + duplicates + skipped"
            );
            assert_eq!(
                r.out(),
                "{\"id\":\"a\",\"t\":100}\n{\"id\":\"f\",\"t\":103}\n"
            );
        } else {
            assert_eq!(
                written,
                unique + bad,
                "passed records are written unchanged"
            );
            // Only the two duplicates of `a` (lines 2 and 10) are dropped.
            let input = mixed_input();
            let keep: Vec<&[u8]> = input
                .split(|&b| b == b'\n')
                .enumerate()
                .filter(|(i, l)| !l.is_empty() && *i != 1 && *i != 9)
                .map(|(_, l)| l)
                .collect();
            let mut expected = keep.join(&b'\n');
            expected.push(b'\n');
            assert!(r.stdout == expected, "{}", r.out());
        }
        assert!(r.stderr.contains(&format!(
            "bad records ({})",
            if policy == "skip" {
                "skipped"
            } else {
                "passed through"
            }
        )));
    }
}

#[test]
fn large_files_keep_order_and_line_numbers() {
    // Every 7th record is bad; keys repeat. Large enough to be parsed and
    // judged on several threads.
    let mut input = String::new();
    let mut seen = std::collections::HashSet::new();
    let mut expected = String::new();
    for i in 1..=30_000u32 {
        let line = if i % 7 == 0 {
            format!("{{\"id\":{i},")
        } else {
            format!("{{\"id\":{},\"n\":{i}}}", (i * 7919) % 9000)
        };
        if i % 7 != 0 && seen.insert((i * 7919) % 9000) {
            expected.push_str(&line);
            expected.push('\n');
        }
        input.push_str(&line);
        input.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "big.ndjson", input.as_bytes());
    let r = dedup(
        &[
            "--format",
            "ndjson",
            "--key",
            "/id",
            "--on-error",
            "skip",
            s(&file),
        ],
        b"",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.out() == expected, "output differs");
    let reported: Vec<u64> = r
        .stderr
        .lines()
        .filter(|l| l.contains(": invalid-json: "))
        .map(|l| {
            l.rsplit(".ndjson:")
                .next()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(reported, (1..=20).map(|k| 7 * k).collect::<Vec<u64>>());
    assert_eq!(count(&r.stderr, "bad"), 30_000 / 7);
}

#[test]
fn not_an_object_under_annotate() {
    let r = dedup(
        &[
            "--format",
            "ndjson",
            "--output",
            "annotate",
            "--on-error",
            "skip",
        ],
        b"{\"a\":1}\n[1,2]\n7\n{}\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.out(),
        "{\"a\":1,\"_dedup\":\"new\"}\n{\"_dedup\":\"new\"}\n"
    );
    assert!(r.stderr.contains("<stdin>:2: not-object: "), "{}", r.stderr);
    assert_eq!(count(&r.stderr, "bad"), 2);
}

#[test]
fn many_bad_records_are_counted_not_all_printed() {
    let input = "oops\n".repeat(1000);
    let r = dedup(
        &["--format", "ndjson", "--on-error", "skip"],
        input.as_bytes(),
    );
    assert_eq!(r.code, 0);
    assert_eq!(count(&r.stderr, "bad"), 1000);
    assert!(r.stderr.lines().count() < 40, "{}", r.stderr);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Arbitrary bytes, JSON-ish or not: never a panic, and the counts add
    /// up under both policies.
    #[test]
    fn no_panic_and_counts_add_up(
        records in proptest::collection::vec(
            prop_oneof![
                Just(b"{\"id\":1,\"t\":5}".to_vec()),
                Just(b"{\"id\":\"x\",\"t\":\"1970-01-01T00:00:09Z\"}".to_vec()),
                Just(b"{\"id\":[1,{\"a\":null}],\"t\":1e1}".to_vec()),
                Just(b"{\"id\":null}".to_vec()),
                Just(b"{\"t\":-1,\"id\":2}".to_vec()),
                Just(b"{\"id\":2,\"t\":0}".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..40),
                proptest::collection::vec(
                    prop_oneof![Just(b'{'), Just(b'}'), Just(b'"'), Just(b':'), Just(b'1'), Just(b'\\'), Just(b'\n'), Just(b'\xff')],
                    0..20),
            ],
            0..40),
        policy in prop_oneof![Just("skip"), Just("pass")],
        ndjson in any::<bool>(),
    ) {
        let input = records.join(&b'\n');
        let mut args = vec!["--on-error", policy];
        if ndjson {
            args.extend(["--format", "ndjson", "--key", "/id", "--time-field", "/t", "--window", "3s"]);
        }
        let r = dedup(&args, &input);
        prop_assert_eq!(r.code, 0, "{}", r.stderr);
        prop_assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        let read = count(&r.stderr, "read");
        let expected_records = if input.is_empty() {
            0
        } else {
            input.split(|&b| b == b'\n').count() as u64 - u64::from(input.ends_with(b"\n"))
        };
        prop_assert_eq!(read, expected_records);
        let (unique, dups, bad, written) = (
            count(&r.stderr, "unique"),
            count(&r.stderr, "duplicates"),
            count(&r.stderr, "bad"),
            count(&r.stderr, "written"),
        );
        prop_assert_eq!(read, unique + dups + bad);
        if policy == "skip" {
            prop_assert_eq!(read, written + dups + bad);
        } else {
            prop_assert_eq!(written, unique + bad);
        }
    }
}

// ---------------------------------------------------------------- state

#[test]
fn state_dedups_across_runs_and_refuses_damage() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let today = write_file(dir.path(), "today", b"a\nb\na\nc\n");
    let tomorrow = write_file(dir.path(), "tomorrow", b"c\nd\na\ne\nd\n");
    let st = s(&state);
    let r = dedup(&["-q", "--state", st, s(&today)], b"");
    assert_eq!((r.code, r.out().as_str()), (0, "a\nb\nc\n"), "{}", r.stderr);
    let r = dedup(&["-q", "--state", st, s(&tomorrow)], b"");
    assert_eq!((r.code, r.out().as_str()), (0, "d\ne\n"), "{}", r.stderr);
    // The state moved on: a third run sees both days.
    let r = dedup(&["-q", "--state", st], b"a\ne\nf\n");
    assert_eq!(r.out(), "f\n");

    let file = state.join("dedup.settings");
    let bytes = std::fs::read(&file).unwrap();
    assert!(state.join("engine").is_dir());
    assert!(!dir.path().join("state").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("tmp")));

    // Contradicting flags are refused, naming the flag.
    let r = dedup(&["-q", "--state", st, "--window", "1h"], b"a\n");
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("--window: the state was written with none, this run has 1h"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());

    // A truncated settings file is refused, and left as it was.
    for cut in [0, 10, 30, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        let r = dedup(&["-q", "--state", st], b"a\n");
        assert_eq!(r.code, 1, "cut at {cut}");
        assert!(r.stderr.contains("refused"), "cut at {cut}: {}", r.stderr);
        assert!(r.stdout.is_empty());
        assert_eq!(std::fs::read(&file).unwrap(), &bytes[..cut]);
    }
    // So is a corrupt one (a flipped bit anywhere) and a foreign file.
    for at in [3, 20, bytes.len() / 3, bytes.len() - 3] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        std::fs::write(&file, &bad).unwrap();
        let r = dedup(&["-q", "--state", st], b"a\n");
        assert_eq!(r.code, 1, "flip at {at}: {}", r.stderr);
        assert!(
            r.stderr.contains("refused") || r.stderr.contains("contradict"),
            "{}",
            r.stderr
        );
    }
    std::fs::write(&file, b"{\"not\": \"a state\"}").unwrap();
    let r = dedup(&["-q", "--state", st], b"a\n");
    assert!(
        r.code == 1 && r.stderr.contains("not a dedup state"),
        "{}",
        r.stderr
    );
    std::fs::write(&file, &bytes).unwrap();

    // The engine's log: a record damaged before whole ones is refused (not
    // cut: that would drop records written after it), and left as it was.
    let mut segments: Vec<_> = std::fs::read_dir(state.join("engine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".log"))
        .collect();
    segments.sort();
    let first = &segments[0];
    let log = std::fs::read(first).unwrap();
    assert!(log.len() > 80, "{} bytes", log.len());
    let mut bad = log.clone();
    bad[60] ^= 0x10;
    std::fs::write(first, &bad).unwrap();
    let r = dedup(&["-q", "--state", st], b"a\n");
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("corrupt"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert_eq!(std::fs::read(first).unwrap(), bad);

    // Restored intact, it works again.
    std::fs::write(first, &log).unwrap();
    let r = dedup(&["-q", "--state", st], b"a\ng\n");
    assert_eq!(r.out(), "g\n");
}

/// `--durability none`: the state is one checkpoint, saved when a run ends
/// without error (a run stopped by bad input leaves it as it was).
#[test]
fn state_without_durability_is_saved_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let st = s(&state);
    let none = ["-q", "--state", st, "--durability", "none"];
    let r = dedup(&none, b"a\nb\n");
    assert_eq!((r.code, r.out().as_str()), (0, "a\nb\n"), "{}", r.stderr);
    assert!(state.join("engine").join("checkpoint").exists());
    let r = dedup(&none, b"b\nc\n");
    assert_eq!(r.out(), "c\n");
    // The default (os) continues the same state.
    let r = dedup(&["-q", "--state", st], b"a\nc\nd\n");
    assert_eq!(r.out(), "d\n");
    let r = dedup(&none, b"d\ne\n");
    assert_eq!(r.out(), "e\n");
}

#[test]
fn state_keeps_an_event_time_window() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    let args = [
        "-q",
        "--format",
        "ndjson",
        "--key",
        "/id",
        "--time-field",
        "/t",
        "--window",
        "10s",
        "--state",
        s(&st),
    ];
    let r = dedup(&args, b"{\"id\":1,\"t\":100}\n{\"id\":2,\"t\":105}\n");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = dedup(
        &args,
        b"{\"id\":1,\"t\":109}\n{\"id\":2,\"t\":115}\n{\"id\":1,\"t\":110}\n",
    );
    assert_eq!(r.out(), "{\"id\":2,\"t\":115}\n{\"id\":1,\"t\":110}\n");
    // A failed run records what it wrote (`os`, the default): the same
    // input again writes nothing more.
    let bad = b"{\"id\":3,\"t\":116}\nbroken\n";
    let r1 = dedup(&args, bad);
    let r2 = dedup(&args, bad);
    assert_eq!((r1.code, r2.code), (2, 2));
    assert_eq!(r1.out(), "{\"id\":3,\"t\":116}\n");
    assert_eq!(r2.out(), "");
    // `--durability none`: not saved after a failed run, so the same input
    // gives the same output.
    let mut none = args.to_vec();
    none.extend(["--durability", "none"]);
    let bad = b"{\"id\":4,\"t\":117}\nbroken\n";
    let r1 = dedup(&none, bad);
    let r2 = dedup(&none, bad);
    assert_eq!((r1.code, r2.code), (2, 2));
    assert_eq!(r1.stdout, r2.stdout);
    assert_eq!(r1.out(), "{\"id\":4,\"t\":117}\n");
}

// ---------------------------------------------------------------- flags and errors

#[test]
fn errors_exit_1_with_a_message() {
    // Refused before any connection is tried (no server is assumed).
    let state = std::env::temp_dir().join(format!("td-cli-state-{}", std::process::id()));
    let r = dedup(
        &[
            "--exact",
            "redis://127.0.0.1:1",
            "--state",
            state.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("drop --state"), "{}", r.stderr);
    let r = dedup(&["--exact", "memcached"], b"");
    assert_eq!(r.code, 1);
    let r = dedup(&["--window", "soon"], b"");
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--window"), "{}", r.stderr);
    let r = dedup(&["--key", "/id"], b"");
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--format ndjson"), "{}", r.stderr);
    let r = dedup(&["--format", "ndjson", "--key", "id"], b"");
    assert!(
        r.code == 1 && r.stderr.contains("did you mean `/id`"),
        "{}",
        r.stderr
    );
    let r = dedup(&["--no-such-flag"], b"");
    assert_eq!(r.code, 1);
    let r = dedup(&["/definitely/not/here"], b"");
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot read /definitely/not/here"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let r = dedup(&[s(dir.path())], b"");
    assert!(
        r.code == 1 && r.stderr.contains("directory"),
        "{}",
        r.stderr
    );
    // A --state that is not a directory fails before any output.
    let not_a_dir = write_file(dir.path(), "plain", b"");
    let r = dedup(&["--state", s(&not_a_dir)], b"a\n");
    assert!(r.code == 1 && r.stdout.is_empty(), "{}", r.stderr);
}

#[test]
fn help_documents_exit_codes_and_defaults() {
    let r = dedup(&["--help"], b"");
    assert_eq!(r.code, 0);
    let help = r.out();
    for needle in [
        "Exit status",
        "0    every record",
        "2    bad input",
        "3    the exact tier",
        "4    accepted records are not stored",
        "5    standard output was closed",
        "130  stopped by SIGINT",
        "read = unique + duplicates + bad",
        "future",
        "too-long",
        "costs about N + 1 times the memory",
        "[default: lines]",
        "[default: unique]",
        "[default: fail]",
        "late",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}");
    }
    assert_eq!(dedup(&["--version"], b"").code, 0);
}

#[test]
fn shipped_samples_run_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
    let events = root.join("events.ndjson");
    let r = dedup(
        &[
            "--format",
            "ndjson",
            "--key",
            "/id",
            "--time-field",
            "/received_at",
            "--window",
            "10m",
            s(&events),
        ],
        b"",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let read = count(&r.stderr, "read");
    let dups = count(&r.stderr, "duplicates");
    assert!(read >= 200 && dups > 20, "{}", r.stderr);
    let lines = root.join("requests.txt");
    let r = dedup(&["-q", s(&lines)], b"");
    assert_eq!(r.stdout, awk(&[&lines], b""));
}

#[test]
fn bench_measures_and_checks_exactness() {
    let r = dedup(
        &[
            "bench",
            "--keys",
            "20k",
            "--threads",
            "1,2",
            "--exact",
            "memory,dashmap,none",
            "--json",
        ],
        b"",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rows: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 6);
    for row in rows {
        assert!(row["keys_per_second"].as_f64().unwrap() > 0.0);
        assert_ne!(row["check"], "WRONG");
    }
    let r = dedup(
        &[
            "bench",
            "--keys",
            "1000",
            "--emit-lines",
            "--duplicate-ratio",
            "0.5",
        ],
        b"",
    );
    assert_eq!(r.stdout.len(), 17_000);
    let table = dedup(
        &[
            "bench",
            "--keys",
            "10k",
            "--threads",
            "1",
            "--window",
            "none",
            "--distribution",
            "zipf",
        ],
        b"",
    );
    assert!(table.out().contains("exact"), "{}", table.out());
}
