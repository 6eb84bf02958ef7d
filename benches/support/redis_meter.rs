//! What the Redis benches measure besides wall time: the CPU time of this
//! process and of `redis-server` (from `/proc/<pid>/stat`), and Redis's
//! `used_memory`.

use std::time::{Duration, Instant};

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
#[cfg(target_os = "linux")]
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(Duration::from_secs_f64(ticks as f64 / hz.max(1) as f64))
}

#[cfg(not(target_os = "linux"))]
pub fn cpu_time(_: &str) -> Option<Duration> {
    None
}

/// Wall time and the CPU time of this process and of `redis-server` over
/// one measurement.
pub struct Meter {
    redis_pid: String,
    start: Instant,
    client: Option<Duration>,
    server: Option<Duration>,
}

/// What a [`Meter`] read.
pub struct Measured {
    pub wall: Duration,
    pub client_cpu: Option<Duration>,
    pub redis_cpu: Option<Duration>,
}

impl Meter {
    pub fn start(redis_pid: u32) -> Meter {
        let redis_pid = redis_pid.to_string();
        Meter {
            client: cpu_time("self"),
            server: cpu_time(&redis_pid),
            redis_pid,
            start: Instant::now(),
        }
    }

    pub fn stop(self) -> Measured {
        let wall = self.start.elapsed();
        let since = |before: Option<Duration>, now: Option<Duration>| Some(now? - before?);
        Measured {
            wall,
            client_cpu: since(self.client, cpu_time("self")),
            redis_cpu: since(self.server, cpu_time(&self.redis_pid)),
        }
    }
}

/// Redis's `used_memory`.
pub fn used_memory(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("memory").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO memory has used_memory")
}
