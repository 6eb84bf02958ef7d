//! Connections to Redis (a single server or a Cluster) and the backoff
//! between reconnects.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::{Cmd, ConnectionLike, Value};

use super::{error, server, RedisConfig, RedisPartition};
use crate::error::{ExactTierError, FailureCause};

pub(super) enum Conn {
    Single(redis::Connection),
    /// Boxed: a cluster connection is four times a single one.
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    /// Connects within `timeout`, which then bounds each read and write.
    pub(super) fn open(config: &RedisConfig, timeout: Duration) -> redis::RedisResult<Conn> {
        // No `CLIENT SETINFO` on connect: the client reads its two replies
        // even after a timeout, so a stalled server cost twice the timeout
        // before the connection could fail.
        let info = |url: &str| -> redis::RedisResult<redis::ConnectionInfo> {
            let info = redis::IntoConnectionInfo::into_connection_info(url)?;
            let settings = info.redis_settings().clone().set_skip_set_lib_name();
            Ok(info.set_redis_settings(settings))
        };
        let mut conn = if config.cluster {
            let seeds = config
                .urls
                .iter()
                .map(|u| info(u))
                .collect::<redis::RedisResult<Vec<_>>>()?;
            let client = redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(timeout)
                .build()?;
            Conn::Cluster(Box::new(client.get_connection()?))
        } else {
            let client =
                redis::Client::open(info(config.urls.first().map_or("", String::as_str))?)?;
            Conn::Single(client.get_connection_with_timeout(timeout)?)
        };
        conn.set_timeout(timeout)?;
        Ok(conn)
    }

    /// Bounds each read and write by `timeout`.
    pub(super) fn set_timeout(&mut self, timeout: Duration) -> redis::RedisResult<()> {
        // A zero timeout means "none" to the client: never wait forever.
        let timeout = Some(timeout.max(Duration::from_millis(1)));
        match self {
            Conn::Single(c) => {
                c.set_read_timeout(timeout)?;
                c.set_write_timeout(timeout)
            }
            Conn::Cluster(c) => {
                c.set_read_timeout(timeout)?;
                c.set_write_timeout(timeout)
            }
        }
    }

    /// Runs `cmds` as one pipeline (one round trip; slot-local keys).
    /// On a single server, replies are read only until the first failure
    /// (as [`Conn::pipeline_fail_fast`]): the connection must then be
    /// dropped.
    pub(super) fn pipeline(&mut self, cmds: Vec<Cmd>) -> redis::RedisResult<Vec<Value>> {
        match self {
            Conn::Single(_) => self.pipeline_fail_fast(&cmds).expect("a single server"),
            Conn::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c)
            }
        }
    }

    /// Runs `cmds` in one round trip on a single server, reading replies
    /// only until the first failure: a stalled server costs one timeout,
    /// not one per command (the client's own pipelines read every reply).
    /// `None` on a cluster connection (a script does the job there).
    pub(super) fn pipeline_fail_fast(
        &mut self,
        cmds: &[Cmd],
    ) -> Option<redis::RedisResult<Vec<Value>>> {
        let Conn::Single(c) = self else {
            return None;
        };
        let mut run = || {
            c.send_packed_command(&packed(cmds))?;
            let mut replies = Vec::with_capacity(cmds.len());
            for _ in cmds {
                match c.recv_response()? {
                    Value::ServerError(e) => return Err(e.into()),
                    v => replies.push(v),
                }
            }
            Ok(replies)
        };
        Some(run())
    }

    /// Runs `cmds` in one round trip on a single server and returns every
    /// reply, error replies as [`Value::ServerError`]: only an I/O failure
    /// (the connection must then be dropped) is an error. A cluster
    /// connection runs them as a pipeline.
    pub(super) fn pipeline_each(&mut self, cmds: &[Cmd]) -> redis::RedisResult<Vec<Value>> {
        let Conn::Single(c) = self else {
            return self.pipeline(cmds.to_vec());
        };
        c.send_packed_command(&packed(cmds))?;
        cmds.iter().map(|_| c.recv_response()).collect()
    }

    pub(super) fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => &mut **c,
        }
    }
}

/// `cmds` in the protocol's form, one buffer sized for them up front: grown
/// from empty, a request of a batch's entries (a 10 kB `XADD`) was copied
/// about ten times, 18 reallocations per request (callgrind).
fn packed(cmds: &[Cmd]) -> Vec<u8> {
    // Each argument: `$<len>\r\n<bytes>\r\n`; each command: `*<n>\r\n`.
    let bytes: usize = cmds
        .iter()
        .flat_map(Cmd::args_iter)
        .map(|a| match a {
            redis::Arg::Simple(b) => b.len() + 16,
            _ => 24,
        })
        .sum::<usize>()
        + 16 * cmds.len();
    let mut packed = Vec::with_capacity(bytes);
    for cmd in cmds {
        cmd.write_packed_command(&mut packed);
    }
    packed
}

/// Shortest and longest wait before reconnecting after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How long a request may wait on Redis, which depends on who is waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// A check needs the answer (a lookup, a claim) or wrote a full batch
    /// of marks: up to [`RedisConfig::timeout`]; a connection backing off
    /// fails at once.
    Check,
    /// The engine's idle upkeep: up to [`RedisConfig::idle_timeout`] (it
    /// holds the shard's lock with no check waiting for it); a connection
    /// backing off fails at once.
    Idle,
    /// An explicit flush ([`crate::Deduper::flush`]): up to
    /// [`RedisConfig::timeout`], and a connection backing off is tried
    /// again now (the caller asked, and may be about to exit).
    Flush,
}

/// One connection and its own reconnect backoff. A partition on a single
/// server keeps two — lookups and claims on one, marks on the other — so a
/// failure of one never delays the other: each waits 10 ms after its first
/// failure, twice as long after each further one (up to 1 s), and is back
/// to 10 ms once it connects.
pub(super) struct Link {
    pub(super) conn: Option<Conn>,
    /// No reconnect before this instant.
    retry_at: Instant,
    /// The wait after the next failure.
    backoff: Duration,
    /// The read and write timeout set on `conn`.
    timeout: Duration,
    /// Why the connection last failed: a request made while it backs off
    /// fails with it.
    last_error: Option<ExactTierError>,
}

impl Link {
    pub(super) fn new() -> Link {
        Link {
            conn: None,
            retry_at: Instant::now(),
            backoff: MIN_BACKOFF,
            timeout: Duration::ZERO,
            last_error: None,
        }
    }

    /// True while a reconnect, or a retry of refused marks, must wait.
    pub(super) fn backing_off(&self) -> bool {
        Instant::now() < self.retry_at
    }

    /// Redis answered with an error (`e`): the connection is fine, but the
    /// next retry waits; returns how long.
    pub(super) fn hold(&mut self, e: &ExactTierError) -> Duration {
        self.last_error = Some(e.clone());
        let wait = self.backoff;
        self.retry_at = Instant::now() + wait;
        self.backoff = (wait * 2).min(MAX_BACKOFF);
        wait
    }

    /// A request succeeded: the next failure waits the shortest time.
    pub(super) fn succeeded(&mut self) {
        self.backoff = MIN_BACKOFF;
    }

    /// A request failed with `e`: drops the connection; returns how long
    /// the next reconnect waits.
    pub(super) fn fail(&mut self, e: &ExactTierError) -> Duration {
        self.conn = None;
        self.last_error = Some(e.clone());
        let wait = self.backoff;
        self.retry_at = Instant::now() + wait;
        self.backoff = (wait * 2).min(MAX_BACKOFF);
        wait
    }

    /// The error of a request not tried because the connection backs off:
    /// the last failure's cause, and how long until the next try.
    pub(super) fn backoff_error(&self) -> ExactTierError {
        let left = self.retry_at.saturating_duration_since(Instant::now());
        let wait = format!(
            "not tried: reconnecting in {} ms after the last failure",
            left.as_millis()
        );
        match &self.last_error {
            Some(ExactTierError::Remote {
                server,
                cause,
                detail,
            }) => ExactTierError::Remote {
                server: server.clone(),
                cause: *cause,
                detail: format!("{detail} ({wait})"),
            },
            Some(e) => ExactTierError::Unavailable(format!("{e} ({wait})")),
            None => ExactTierError::Unavailable(wait),
        }
    }

    /// A connection was opened with read and write timeout `timeout`.
    pub(super) fn connected(&mut self, conn: Conn, timeout: Duration) {
        self.conn = Some(conn);
        self.retry_at = Instant::now();
        self.timeout = timeout;
        self.backoff = MIN_BACKOFF;
    }

    /// Bounds the connection's next reads and writes by `timeout` (a
    /// system call only when it changes).
    pub(super) fn bound(&mut self, timeout: Duration) -> redis::RedisResult<()> {
        if let Some(conn) = &mut self.conn {
            if self.timeout != timeout {
                conn.set_timeout(timeout)?;
                self.timeout = timeout;
            }
        }
        Ok(())
    }
}

impl RedisPartition {
    /// Runs `f` on the lookup connection, reconnecting with backoff; a
    /// failure drops the connection.
    pub(super) fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Conn, &mut Self) -> redis::RedisResult<T>,
    ) -> Result<T, ExactTierError> {
        self.connect()?;
        let timeout = self.request_timeout();
        if let Err(e) = self.lookups.bound(timeout) {
            return Err(self.fail(&e));
        }
        let mut conn = self.lookups.conn.take().expect("connected above");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        match f(&mut conn, self) {
            Ok(v) => {
                self.lookups.conn = Some(conn);
                Ok(v)
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// Runs `f` on the mark connection (shared mode: the upkeep of the
    /// log — snapshots — whose failures must not hold back claims on the
    /// lookup connection), reconnecting with backoff; a failure drops it.
    pub(super) fn with_mark_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Conn, &mut Self) -> redis::RedisResult<T>,
    ) -> Result<T, ExactTierError> {
        self.connect_marks()?;
        let timeout = self.request_timeout();
        if let Err(e) = self.marks.bound(timeout) {
            let err = self.error(&e);
            return Err(self.fail_marks(&err));
        }
        let mut conn = self.marks.conn.take().expect("connected above");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        match f(&mut conn, self) {
            Ok(v) => {
                self.marks.conn = Some(conn);
                self.marks.succeeded();
                Ok(v)
            }
            Err(e) => {
                let err = self.error(&e);
                Err(self.fail_marks(&err))
            }
        }
    }

    /// Opens the lookup connection unless it is open (or backing off),
    /// adopting the agreed layout: call it before grouping keys by bucket.
    pub(super) fn connect(&mut self) -> Result<(), ExactTierError> {
        if self.lookups.conn.is_some() {
            return Ok(());
        }
        if self.lookups.backing_off() && self.wait != Wait::Flush {
            return Err(self.lookups.backoff_error());
        }
        let timeout = self.request_timeout();
        match self.open(timeout) {
            Ok(c) => {
                self.lookups.connected(c, timeout);
                Ok(())
            }
            Err(err) => Err(self.fail_lookups(&err)),
        }
    }

    /// Opens the mark connection (single server) unless it is open (or
    /// backing off), adopting the agreed layout: call it before grouping
    /// marks by bucket. The lookup connection is not involved.
    pub(super) fn connect_marks(&mut self) -> Result<(), ExactTierError> {
        if self.marks.conn.is_some() {
            return Ok(());
        }
        if self.marks.backing_off() && self.wait != Wait::Flush {
            return Err(self.marks.backoff_error());
        }
        let timeout = self.request_timeout();
        match self.open(timeout) {
            Ok(c) => {
                self.marks.connected(c, timeout);
                Ok(())
            }
            Err(err) => Err(self.fail_marks(&err)),
        }
    }

    /// A new connection, made within `timeout`, to a server that keeps
    /// accepted keys (or one the configuration accepts anyway: see
    /// `server.rs`), that has adopted the shard's agreed layout.
    fn open(&mut self, timeout: Duration) -> Result<Conn, ExactTierError> {
        let mut c = Conn::open(&self.config, timeout).map_err(|e| self.error(&e))?;
        let info = server::inspect(&mut c, &self.server).map_err(|e| self.error(&e))?;
        server::judge(&info, self.config.unsafe_server, &self.stats, &self.server)?;
        self.agree_layout(&mut c).map_err(|e| self.error(&e))?;
        let n = self.stats.connects.fetch_add(1, Ordering::Relaxed);
        if n > 0 {
            crate::trace::event!(info, key_base = %self.key_base, "reconnected to Redis");
        }
        Ok(c)
    }

    /// How long the request about to be made may wait (see [`Wait`]).
    pub(super) fn request_timeout(&self) -> Duration {
        match self.wait {
            Wait::Check | Wait::Flush => self.config.timeout,
            Wait::Idle => self.config.idle_timeout.min(self.config.timeout),
        }
    }

    /// Runs `f` with requests waiting as `wait` allows.
    pub(super) fn waiting<T>(&mut self, wait: Wait, f: impl FnOnce(&mut Self) -> T) -> T {
        let before = std::mem::replace(&mut self.wait, wait);
        let result = f(self);
        self.wait = before;
        result
    }

    /// `e`, from this partition's server (remembered as the tier's last
    /// failure).
    pub(super) fn error(&self, e: &redis::RedisError) -> ExactTierError {
        let err = error::remote(&self.server, e);
        self.stats.record(&err);
        err
    }

    /// A failure of `cause` at this partition's server (remembered as the
    /// tier's last failure).
    pub(super) fn error_of(
        &self,
        cause: FailureCause,
        detail: impl Into<String>,
    ) -> ExactTierError {
        let err = error::failure(&self.server, cause, detail);
        self.stats.record(&err);
        err
    }

    /// A request on the lookup connection (lookups, claims, layout,
    /// deletes) failed with `e`: drops it and backs off. The mark
    /// connection keeps its own state. Returns the error, with its cause.
    pub(super) fn fail(&mut self, e: &redis::RedisError) -> ExactTierError {
        let err = self.error(e);
        self.fail_lookups(&err)
    }

    /// [`Self::fail`] with the error made already.
    fn fail_lookups(&mut self, err: &ExactTierError) -> ExactTierError {
        let wait = self.lookups.fail(err);
        self.failed(err, "Redis request failed; connection dropped", wait);
        err.clone()
    }

    /// Writing marks or reading their replies failed with `err`: drops the
    /// mark connection and backs off. The lookup connection keeps its own
    /// state. Returns `err`.
    pub(super) fn fail_marks(&mut self, err: &ExactTierError) -> ExactTierError {
        let wait = self.marks.fail(err);
        self.failed(
            err,
            "writing marks to Redis failed; mark connection dropped",
            wait,
        );
        err.clone()
    }

    pub(super) fn failed(&mut self, err: &ExactTierError, what: &'static str, wait: Duration) {
        #[cfg(not(feature = "tracing"))]
        let _ = (what, wait);
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.stats.record(err);
        crate::trace::event!(
            warn,
            key_base = %self.key_base,
            retry_in_ms = wait.as_millis() as u64,
            unsent_marks = self.unsent.len(),
            error = %err,
            "{what}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> ExactTierError {
        error::failure("redis://h:1", FailureCause::ConnectionRefused, "")
    }

    #[test]
    fn a_link_backs_off_on_its_own_doubling_up_to_a_second() {
        let (mut lookups, marks) = (Link::new(), Link::new());
        let mut waits = Vec::new();
        for _ in 0..9 {
            waits.push(lookups.fail(&refused()).as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert!(lookups.backing_off());
        assert!(!marks.backing_off(), "the other link is not held back");
        let e = lookups.backoff_error();
        assert_eq!(e.cause(), Some(FailureCause::ConnectionRefused), "{e}");
        assert!(e.to_string().contains("not tried: reconnecting in"), "{e}");
        // A refusal holds the link back without dropping it; a success
        // brings the next wait back to the shortest.
        let mut held = Link::new();
        assert_eq!(held.hold(&refused()).as_millis(), 10);
        assert_eq!(held.hold(&refused()).as_millis(), 20);
        held.succeeded();
        assert_eq!(held.hold(&refused()).as_millis(), 10);
    }
}
