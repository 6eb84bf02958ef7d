//! Running `dedup` as a process the test can feed, watch and signal, and
//! reading its summary.
#![allow(dead_code)] // each test crate uses a different part

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub fn dedup_path() -> &'static str {
    env!("CARGO_BIN_EXE_dedup")
}

/// What a finished run produced.
pub struct Finished {
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// `None`: ended by a signal.
    pub code: Option<i32>,
}

impl Finished {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `dedup args` on `stdin` (written from another thread) and waits,
/// at most `within`.
pub fn run(args: &[&str], stdin: &[u8], within: Duration) -> Finished {
    let mut r = Running::start(args);
    r.write(stdin);
    r.close_stdin();
    r.finish(within)
}

/// A running `dedup` with piped standard streams.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

impl Running {
    pub fn start(args: &[&str]) -> Self {
        Self::start_command(Command::new(dedup_path()).args(args))
    }

    pub fn start_command(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dedup");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&out)),
            collect(child.stderr.take().unwrap(), Arc::clone(&err)),
        ];
        let stdin = child.stdin.take();
        Running {
            child,
            stdin,
            out,
            err,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes to its standard input (ignoring a run that stopped reading).
    pub fn write(&mut self, bytes: &[u8]) {
        if let Some(stdin) = &mut self.stdin {
            let _ = stdin.write_all(bytes);
            let _ = stdin.flush();
        }
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn stdout_lines(&self) -> usize {
        self.out
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until it has written `n` lines, at most `within`.
    pub fn wait_for_lines(&self, n: usize, within: Duration) -> bool {
        wait_until(within, || self.stdout_lines() >= n)
    }

    /// `kill -SIG pid`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the end, at most `within` (then kills it and fails).
    pub fn finish(mut self, within: Duration) -> Finished {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "dedup did not end within {within:?}; stderr: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.stdin = None;
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        let stdout = std::mem::take(&mut *self.out.lock().unwrap());
        Finished {
            stdout,
            stderr: self.stderr(),
            code: status.code(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 10 ms until it holds, at most `within`.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if f() {
            return true;
        }
        if started.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A count of the summary's first line (`read`, `unique`, `duplicates`,
/// `bad`, `unavailable`, `undelivered`, `written`); categories the line
/// leaves out are 0.
pub fn count(stderr: &str, what: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("records read:"))
        .unwrap_or_else(|| panic!("no summary in {stderr:?}"));
    let words: Vec<&str> = line
        .split([' ', ',', ';', ':'])
        .filter(|w| !w.is_empty())
        .collect();
    let Some(at) = words.iter().position(|w| *w == what) else {
        assert!(
            matches!(what, "unavailable" | "undelivered"),
            "no {what} in {line}"
        );
        return 0;
    };
    let n = if what == "read" { at - 2 } else { at - 1 };
    words[n].parse().unwrap()
}

/// Every record read is counted once: read = unique + duplicates + bad +
/// unavailable + undelivered.
pub fn assert_sum_holds(stderr: &str) {
    let parts = ["unique", "duplicates", "bad", "unavailable", "undelivered"];
    let sum: u64 = parts.iter().map(|p| count(stderr, p)).sum();
    assert_eq!(
        count(stderr, "read"),
        sum,
        "the summary does not add up: {stderr}"
    );
}

/// Peak memory from the summary, in MB.
pub fn peak_mb(stderr: &str) -> f64 {
    let at = stderr.find("peak memory ").expect("a peak memory figure") + 12;
    let rest = &stderr[at..];
    let mut words = rest.split_whitespace();
    let n: f64 = words.next().unwrap().parse().unwrap();
    match words.next().unwrap() {
        "GB" => n * 1000.0,
        "MB" => n,
        "kB" => n / 1000.0,
        _ => n / 1e6,
    }
}
