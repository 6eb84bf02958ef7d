//! A `dedup --state` run fed through a pipe, stopped by SIGINT, SIGTERM or
//! SIGKILL after ~100 000 lines were written, then rerun on the same state
//! with the whole input: no line the first run wrote is written again, and
//! every other line is. Standard output is a regular file, or a pipe whose
//! reader is slow (the kill then lands in the middle of a chunk's output).

#[path = "support/run.rs"]
mod support;

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{dedup_path, wait_until};

/// The input: 300 000 lines, 30% of them repeats of earlier ones.
fn input() -> Vec<u8> {
    let mut state = 0x5EEDu64;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::new();
    let mut fresh = 0u64;
    for _ in 0..300_000 {
        let r = next();
        let key = if fresh > 0 && r % 10 < 3 {
            next() % fresh
        } else {
            fresh += 1;
            fresh - 1
        };
        out.extend_from_slice(format!("record-{key:08}-{}\n", key * 7919 % 1000).as_bytes());
    }
    out
}

fn split(bytes: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let tail = lines.pop().unwrap_or(&[]);
    (lines, tail)
}

enum Out {
    File(std::path::PathBuf),
    SlowPipe(Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>),
}

/// One case: the first run is stopped by `signal` once it wrote 100 000
/// lines; the rerun must write exactly the unique lines it did not. True
/// when the kill caught a chunk's output half-written (the rerun said so).
fn case(signal: &str, to_file: bool, dir: &Path) -> bool {
    let input = input();
    let state = dir.join("state");
    let out_path = dir.join("out1");
    let mut cmd = Command::new(dedup_path());
    cmd.args(["-q", "--state", state.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped());
    if to_file {
        cmd.stdout(File::create(&out_path).unwrap());
    } else {
        cmd.stdout(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    let out = if to_file {
        Out::File(out_path.clone())
    } else {
        // A slow reader: 4 KiB at a time, so the run blocks on its output.
        let mut stdout = child.stdout.take().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&got);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
                std::thread::sleep(Duration::from_micros(1000));
            }
        });
        Out::SlowPipe(got, reader)
    };
    // The producer: the input in 20 KB pieces, a little at a time.
    let mut stdin = child.stdin.take().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writing = Arc::clone(&stop);
    let feed = input.clone();
    let producer = std::thread::spawn(move || {
        for piece in feed.chunks(20_000) {
            if stop_writing.load(Ordering::Acquire) || stdin.write_all(piece).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let written_lines = || match &out {
        Out::File(p) => std::fs::read(p).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count()),
        Out::SlowPipe(got, _) => got.lock().unwrap().iter().filter(|&&c| c == b'\n').count(),
    };
    assert!(
        wait_until(Duration::from_secs(60), || written_lines() >= 100_000),
        "{signal}: the run did not write 100 000 lines"
    );
    let killed = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{signal}: no end"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    stop.store(true, Ordering::Release);
    producer.join().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    match signal {
        "INT" => assert_eq!(status.code(), Some(130), "{stderr}"),
        "TERM" => assert_eq!(status.code(), Some(143), "{stderr}"),
        _ => assert_eq!(status.code(), None),
    }
    let first = match out {
        Out::File(p) => std::fs::read(p).unwrap(),
        Out::SlowPipe(got, reader) => {
            // Everything the run put into the pipe is delivered.
            reader.join().unwrap();
            std::mem::take(&mut *got.lock().unwrap())
        }
    };
    // The rerun on the whole input.
    let mut rerun = Command::new(dedup_path())
        .args(["--no-progress", "--state", state.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = rerun.stdin.take().unwrap();
    let all = input.clone();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&all);
    });
    let rerun = rerun.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(
        rerun.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    let (first_lines, torn) = split(&first);
    let (second_lines, second_tail) = split(&rerun.stdout);
    assert!(second_tail.is_empty());
    let a: HashSet<&[u8]> = first_lines.iter().copied().collect();
    assert_eq!(
        a.len(),
        first_lines.len(),
        "{signal}: the first run repeated a line"
    );
    let b: HashSet<&[u8]> = second_lines.iter().copied().collect();
    assert_eq!(
        b.len(),
        second_lines.len(),
        "{signal}: the rerun repeated a line"
    );
    let twice = a.intersection(&b).count();
    let unique: HashSet<&[u8]> = split(&input).0.into_iter().collect();
    let missing = unique
        .iter()
        .filter(|l| !a.contains(*l) && !b.contains(*l))
        .count();
    let what = if to_file { "file" } else { "slow pipe" };
    assert_eq!(
        (twice, missing),
        (0, 0),
        "{signal}, {what}: lines written by both runs, lines written by neither (first run: {} \
         lines{}; rerun: {}; {})",
        first_lines.len(),
        if torn.is_empty() {
            ""
        } else {
            " and part of one"
        },
        second_lines.len(),
        String::from_utf8_lossy(&rerun.stderr),
    );
    // A line the kill cut in half is written whole by the rerun.
    if !torn.is_empty() {
        assert!(second_lines.iter().any(|l| l.starts_with(torn)));
    }
    assert_eq!(a.len() + b.len(), unique.len());
    String::from_utf8_lossy(&rerun.stderr).contains("stopped before writing")
}

#[test]
fn a_stopped_run_loses_no_line_and_repeats_none() {
    for signal in ["INT", "TERM", "KILL"] {
        for to_file in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let cut = case(signal, to_file, dir.path());
            // A graceful stop writes everything it judged.
            assert!(signal == "KILL" || !cut, "{signal}");
        }
    }
}

/// SIGKILL again and again at other moments.
#[test]
fn repeated_kills_lose_no_line_and_repeat_none() {
    let mut cut = 0;
    for round in 0..4 {
        for to_file in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            // Vary the moment: a little more input before the count is met.
            std::thread::sleep(Duration::from_millis(round * 7));
            cut += u32::from(case("KILL", to_file, dir.path()));
        }
    }
    // The slow reader keeps the run writing: kills land mid-output, and
    // the rerun forgets what was not delivered.
    assert!(cut > 0, "no kill caught a chunk's output half-written");
}
