//! Starts a private `nats-server -js` on a free 127.0.0.1 port, with its
//! store in a fresh temporary directory, and stops it on drop. Never
//! touches a server it did not start.
#![allow(dead_code)] // each test crate uses a different part

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

// A test crate with several server helpers loads this file once per helper.
#[allow(clippy::duplicate_mod)]
#[path = "../../../../tests/support/ports.rs"]
mod ports;
use ports::{free_port, fresh_dir};

/// Fresh starts tried, each on a new port, before a test fails.
const START_ATTEMPTS: usize = 5;

/// Numbers the logs of this process's servers.
static SERIAL: AtomicU64 = AtomicU64::new(0);

fn require_nats() {
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "nats-server is not installed: run ./scripts/test-all.sh (it installs it), or `apt-get install nats-server`"
    );
}

impl NatsServer {
    /// A fresh server; one that exits at once (its port was taken after
    /// the probe) is started again on another port.
    pub fn start() -> Self {
        require_nats();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let dir = fresh_dir("nats", port);
            let mut s = NatsServer {
                port,
                child: None,
                dir,
            };
            if s.try_spawn() {
                return s;
            }
            // Dropped: its directory removed.
        }
        panic!("nats-server exited at start on {START_ATTEMPTS} ports in a row");
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "nats-server on port {} exited at start (port taken?)",
            self.port
        );
    }

    /// Starts the server; true once it says it is ready (in its own log:
    /// a connection could reach another test's server on a port ours
    /// lost), false if it exited first.
    fn try_spawn(&mut self) -> bool {
        let log = self.dir.join(format!(
            "server-{}.log",
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(&self.dir)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let child = self.child.as_mut().expect("spawned");
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return false;
            }
            let ready =
                std::fs::read_to_string(&log).is_ok_and(|text| text.contains("Server is ready"));
            if ready && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nats-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// store: a crashed broker coming back.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Kills the server (SIGKILL): its clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped server again on the same port and store.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is running");
        self.spawn();
    }

    /// Stops the server's process (SIGSTOP) without closing its sockets:
    /// a stalled server, as a client sees one.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("nats-server is running");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: kill(2) with our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signalling nats-server");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
