//! Starts a private PostgreSQL cluster for a test — `initdb` into a fresh
//! temporary directory, `pg_ctl start` on a free 127.0.0.1 port with its
//! unix socket in that directory — and stops it (and removes the
//! directory) on drop. Run as root, every server program runs as the
//! `postgres` user (`runuser`), since PostgreSQL refuses to run as root.
//! Never touches a server it did not start, nor an address outside
//! 127.0.0.0/8.
#![allow(dead_code)] // each test crate uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The superuser the test clusters are made with, and its password
/// (password authentication over TCP, so a wrong password is refused).
pub const USER: &str = "td";
pub const PASSWORD: &str = "td-secret";

pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    running: bool,
    settings: Vec<String>,
}

// A test crate with several server helpers loads this file once per helper.
#[allow(clippy::duplicate_mod)]
#[path = "../../../../tests/support/ports.rs"]
mod ports;
use ports::{free_port, fresh_dir};

/// The directory of `initdb`, `pg_ctl` and `postgres`.
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server programs (initdb, pg_ctl) are not installed: \
             run ./scripts/test-all.sh (it installs them), or `apt-get install postgresql`"
        )
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `program args` as the `postgres` user when root, else as is.
fn server_command(bin: &Path, program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_dir(tag: &str, port: u16) -> PathBuf {
    let dir = fresh_dir(&format!("pg-{tag}"), port);
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&dir);
                c
            },
            "chown of the cluster directory",
        );
    }
    dir
}

impl PgServer {
    /// A fresh cluster with the default settings (fsync on, as in
    /// production).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A fresh cluster with extra `-c name=value` settings.
    pub fn start_with(settings: &[&str]) -> Self {
        let bin = bin_dir();
        let port = free_port();
        let dir = make_dir("primary", port);
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(&pwfile);
                    c
                },
                "chown of the password file",
            );
        }
        let mut initdb = server_command(&bin, "initdb");
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "-E", "UTF8", "--locale=C"]);
        run(initdb, "initdb");
        // Replication connections from loopback, for a standby.
        let hba = dir.join("data/pg_hba.conf");
        let mut conf = std::fs::read_to_string(&hba).unwrap();
        conf.push_str("\nhost replication all 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, conf).unwrap();
        let mut s = PgServer {
            port,
            dir,
            bin,
            running: false,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
        };
        s.spawn();
        s.psql("CREATE DATABASE dedup");
        s
    }

    fn spawn(&mut self) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.display()
        );
        for s in &self.settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        let mut start = server_command(&self.bin, "pg_ctl");
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .stdout(Stdio::null());
        let ok = start.status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            panic!("pg_ctl start on port {} failed:\n{log}", self.port);
        }
        self.running = true;
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            let conn = postgres::Config::new()
                .host("127.0.0.1")
                .port(self.port)
                .user(USER)
                .password(PASSWORD)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(1))
                .connect(postgres::NoTls);
            if conn.is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "postgres on port {} did not accept connections",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL of database `dedup` (password authentication over TCP).
    pub fn url(&self) -> String {
        self.url_for("dedup")
    }

    pub fn url_for(&self, db: &str) -> String {
        format!(
            "postgresql://{USER}:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// A client of database `dedup`.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).unwrap()
    }

    /// Runs SQL as the superuser in database `postgres`.
    pub fn psql(&self, sql: &str) {
        let mut c = postgres::Client::connect(&self.url_for("postgres"), postgres::NoTls).unwrap();
        c.batch_execute(sql).unwrap();
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let mut stop = server_command(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = stop.status();
        self.running = false;
    }

    /// Stops the server at once, as a crash would (`-m immediate`: no
    /// checkpoint; committed transactions survive through the WAL).
    pub fn kill(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    /// Starts it again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts it again after [`PgServer::kill`].
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// A hot standby of this server (a streaming replica, read-only) on a
    /// port of its own.
    pub fn standby(&self) -> PgServer {
        let port = free_port();
        let dir = make_dir("standby", port);
        let mut base = server_command(&self.bin, "pg_basebackup");
        base.arg("-D")
            .arg(dir.join("data"))
            .args([
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "-h",
                "127.0.0.1",
                "-U",
                USER,
            ])
            .args(["-p", &self.port.to_string()])
            .env("PGPASSWORD", PASSWORD);
        run(base, "pg_basebackup");
        let mut s = PgServer {
            port,
            dir,
            bin: self.bin.clone(),
            running: false,
            settings: vec!["hot_standby=on".to_owned()],
        };
        s.spawn();
        s
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.pg_ctl_stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
