//! Starts a private `nats-server -js` on a free 127.0.0.1 port, with its
//! store in a fresh temporary directory, and stops it on drop. Never
//! touches a server it did not start.
#![allow(dead_code)] // each test crate uses a different part

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
    pub fn start() -> Self {
        require_nats();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("td-nats-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = NatsServer {
            port,
            child: None,
            dir,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
