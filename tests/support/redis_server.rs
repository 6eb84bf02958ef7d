//! Starts a private `redis-server` on a free 127.0.0.1 port for a test and
//! stops it on drop. Never touches a server it did not start.
#![allow(dead_code)] // each test crate uses a different part

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

// A test crate with several server helpers loads this file once per helper.
#[allow(clippy::duplicate_mod)]
#[path = "ports.rs"]
mod ports;
pub use ports::free_port;
use ports::fresh_dir;

/// Fresh starts tried, each on a new port, before a test fails.
const START_ATTEMPTS: usize = 5;

fn require_redis() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "redis-server is not installed: run ./scripts/test-all.sh (it installs it), or `apt-get install redis-server`"
    );
}

impl RedisServer {
    /// A fresh server (no persistence) on a free loopback port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A fresh server with extra `redis-server` arguments. A server that
    /// exits at once (its port was taken after the probe) is started
    /// again on another port.
    pub fn start_with(extra: &[&str]) -> Self {
        (0..START_ATTEMPTS)
            .find_map(|_| Self::try_start_with(extra))
            .unwrap_or_else(|| {
                panic!("redis-server exited at start on {START_ATTEMPTS} ports in a row")
            })
    }

    /// One attempt of [`RedisServer::start_with`] on a fresh port: `None`
    /// when the server exits at start.
    pub fn try_start_with(extra: &[&str]) -> Option<Self> {
        require_redis();
        let port = free_port();
        let mut s = RedisServer {
            port,
            child: None,
            dir: fresh_dir("redis", port),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        s.spawn_process();
        // Else dropped: killed, its directory removed.
        s.wait_ready().then_some(s)
    }

    /// Starts the server on its port; fails the test when it does not
    /// come up.
    fn spawn(&mut self) {
        self.spawn_process();
        assert!(
            self.wait_ready(),
            "redis-server on port {} exited at start (port taken?)",
            self.port
        );
    }

    fn spawn_process(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&self.dir)
        .args(&self.extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("starting redis-server"));
    }

    /// True once the server answers `PING` and is ours (its `process_id`
    /// is our child's: another test's server may hold the port ours lost);
    /// false if ours exited first.
    fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut().expect("spawned");
            if child.try_wait().ok().flatten().is_some() {
                self.child = None; // reaped: nothing to signal or kill
                return false;
            }
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        let info: String = redis::cmd("INFO")
                            .arg("server")
                            .query(&mut c)
                            .unwrap_or_default();
                        let pid = self.child.as_ref().map(Child::id);
                        if info_pid(&info) == pid {
                            return true;
                        }
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's URL, with the password when it requires one
    /// (`--requirepass`).
    pub fn url(&self) -> String {
        match self.password() {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn password(&self) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == "--requirepass")?;
        self.extra.get(at + 1).map(String::as_str)
    }

    /// A port nothing listens on (taken from the system, then released).
    pub fn unused_port() -> u16 {
        free_port()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9` the server (its data is lost: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts it again on the same port with `extra` arguments added (for
    /// this and later starts), and returns as soon as it accepts
    /// connections: it may still be loading its data set.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.kill();
        self.extra.extend(extra.iter().map(|s| (*s).to_owned()));
        self.spawn_process();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server on port {} did not listen",
                self.port
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `SIGSTOP`: the server stops answering (slow, not down).
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// `SIGCONT`.
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

/// The `process_id` an `INFO server` answer names.
fn info_pid(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// The engine's mark keys (hashes, record strings, or shared-mode logs)
/// under the default prefix `td` (not the shards' `…:layout` keys, nor a
/// log's epoch, snapshots and hashes of committed results).
pub fn mark_hashes(conn: &mut redis::Connection) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("td:*").query(conn).unwrap();
    keys.into_iter()
        .filter(|k| {
            !k.ends_with(":layout")
                && !k.ends_with(":log:epoch")
                && !k.contains(":b:")
                && !k.contains(":snap")
        })
        .collect()
}

/// A stream entry as `XRANGE` answers it: its id and fields.
type LogEntry = (String, Vec<(String, Vec<u8>)>);

/// The checks in a shared-mode log (a stream of entries, see
/// `src/exact/redis/log.rs`): each check's fingerprint and time, in log
/// order.
pub fn log_checks(conn: &mut redis::Connection, key: &str) -> Vec<(Vec<u8>, u64)> {
    let entries: Vec<LogEntry> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    let mut checks = Vec::new();
    for (_, fields) in entries {
        let blob = &fields[0].1;
        assert_eq!(&blob[..2], &[0x54, 1], "{key}: a log entry");
        let u64_at = |i: usize| u64::from_le_bytes(blob[i..i + 8].try_into().unwrap());
        let count = u32::from_le_bytes(blob[34..38].try_into().unwrap());
        let mut i = 38;
        for _ in 0..count {
            let kind = blob[i];
            let size = match kind {
                1 => 25,
                2 => 42,
                3 => 34,
                4 | 7 => 33,
                5 => 41,
                6 => 17,
                other => panic!("{key}: an operation of kind {other}"),
            };
            if kind == 1 {
                checks.push((blob[i + 1..i + 17].to_vec(), u64_at(i + 17)));
            }
            i += size;
        }
        assert_eq!(i, blob.len(), "{key}: whole operations");
    }
    checks
}

/// The distinct fingerprints stored under one mark key: the fields of a
/// hash, or the records (24 bytes: fingerprint, time) of a record string.
pub fn stored_fingerprints(conn: &mut redis::Connection, key: &str) -> Vec<Vec<u8>> {
    let kind: String = redis::cmd("TYPE").arg(key).query(conn).unwrap();
    match kind.as_str() {
        "hash" => redis::cmd("HKEYS").arg(key).query(conn).unwrap(),
        "string" => {
            let bytes: Vec<u8> = redis::cmd("GET").arg(key).query(conn).unwrap();
            let mut fps: Vec<Vec<u8>> = records(&bytes, key).into_iter().map(|r| r.0).collect();
            fps.sort_unstable();
            fps.dedup();
            fps
        }
        "stream" => {
            let mut fps: Vec<Vec<u8>> = log_checks(conn, key).into_iter().map(|c| c.0).collect();
            fps.sort_unstable();
            fps.dedup();
            fps
        }
        other => panic!("{key}: a {other} among the mark keys"),
    }
}

/// The records of a record string (see `src/exact/redis/records.rs`):
/// fingerprint, time, and the result of those with a body inline (bodies
/// kept apart are in the slice's body hash).
pub fn records(bytes: &[u8], key: &str) -> Vec<(Vec<u8>, u64, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        assert!(i + 24 <= bytes.len(), "{key}: a record cut short");
        let word = u64::from_be_bytes(bytes[i + 16..i + 24].try_into().unwrap());
        let fp = bytes[i..i + 16].to_vec();
        if word >> 63 == 0 {
            // Bit 62: the body is in the slice's body hash.
            out.push((fp, word & !(1 << 62), None));
            i += 24;
            continue;
        }
        let len = u32::from_be_bytes(bytes[i + 33..i + 37].try_into().unwrap()) as usize;
        assert!(i + 37 + len <= bytes.len(), "{key}: a body cut short");
        out.push((
            fp,
            word & !(1 << 63),
            Some(bytes[i + 37..i + 37 + len].to_vec()),
        ));
        i += 37 + len;
    }
    out
}

/// Distinct fingerprints stored under all of `keys`, summed per key.
pub fn count_marks(conn: &mut redis::Connection, keys: &[String]) -> u64 {
    keys.iter()
        .map(|k| stored_fingerprints(conn, k).len() as u64)
        .sum()
}

/// The slice number in the name of a mark hash (`…:<slice>:<bucket>`).
pub fn slice_of(hash: &str) -> &str {
    hash.rsplit(':').nth(1).unwrap_or("")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c.id(), "CONT");
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
