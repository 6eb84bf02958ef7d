//! Connections to Redis (a single server or a Cluster) and the backoff
//! between reconnects.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::{Cmd, ConnectionLike, Value};

use super::{RedisConfig, RedisPartition};
use crate::error::ExactTierError;

pub(super) enum Conn {
    Single(redis::Connection),
    /// Boxed: a cluster connection is four times a single one.
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    pub(super) fn open(config: &RedisConfig) -> redis::RedisResult<Conn> {
        if config.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(config.urls.clone())
                .connection_timeout(config.timeout)
                .build()?;
            let conn = client.get_connection()?;
            conn.set_read_timeout(Some(config.timeout))?;
            conn.set_write_timeout(Some(config.timeout))?;
            Ok(Conn::Cluster(Box::new(conn)))
        } else {
            let client = redis::Client::open(config.urls.first().map_or("", String::as_str))?;
            let conn = client.get_connection_with_timeout(config.timeout)?;
            conn.set_read_timeout(Some(config.timeout))?;
            conn.set_write_timeout(Some(config.timeout))?;
            Ok(Conn::Single(conn))
        }
    }

    /// Runs `cmds` as one pipeline (one round trip; slot-local keys).
    pub(super) fn pipeline(&mut self, cmds: Vec<Cmd>) -> redis::RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c)
            }
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
            let mut packed = Vec::new();
            for cmd in cmds {
                cmd.write_packed_command(&mut packed);
            }
            c.send_packed_command(&packed)?;
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

    pub(super) fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => &mut **c,
        }
    }
}

pub(super) fn unavailable(e: &redis::RedisError) -> ExactTierError {
    ExactTierError::Unavailable(e.to_string())
}

/// Shortest and longest wait before reconnecting after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

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
}

impl Link {
    pub(super) fn new() -> Link {
        Link {
            conn: None,
            retry_at: Instant::now(),
            backoff: MIN_BACKOFF,
        }
    }

    /// True while a reconnect must wait (after a failure).
    pub(super) fn backing_off(&self) -> bool {
        self.conn.is_none() && Instant::now() < self.retry_at
    }

    /// A request failed: drops the connection; returns how long the next
    /// reconnect waits.
    pub(super) fn fail(&mut self) -> Duration {
        self.conn = None;
        let wait = self.backoff;
        self.retry_at = Instant::now() + wait;
        self.backoff = (wait * 2).min(MAX_BACKOFF);
        wait
    }

    /// A connection was opened.
    pub(super) fn connected(&mut self, conn: Conn) {
        self.conn = Some(conn);
        self.backoff = MIN_BACKOFF;
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
        let mut conn = self.lookups.conn.take().expect("connected above");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        match f(&mut conn, self) {
            Ok(v) => {
                self.lookups.conn = Some(conn);
                Ok(v)
            }
            Err(e) => {
                self.fail();
                Err(unavailable(&e))
            }
        }
    }

    /// Opens the lookup connection unless it is open (or backing off),
    /// adopting the agreed layout: call it before grouping keys by bucket.
    pub(super) fn connect(&mut self) -> Result<(), ExactTierError> {
        if self.lookups.conn.is_some() {
            return Ok(());
        }
        if self.lookups.backing_off() {
            return Err(ExactTierError::Unavailable("reconnect backoff".to_owned()));
        }
        match self.open() {
            Ok(c) => {
                self.lookups.connected(c);
                Ok(())
            }
            Err(e) => {
                self.fail();
                Err(unavailable(&e))
            }
        }
    }

    /// Opens the mark connection (single server) unless it is open (or
    /// backing off), adopting the agreed layout: call it before grouping
    /// marks by bucket. The lookup connection is not involved.
    pub(super) fn connect_marks(&mut self) -> Result<(), ExactTierError> {
        if self.marks.conn.is_some() {
            return Ok(());
        }
        if self.marks.backing_off() {
            return Err(ExactTierError::Unavailable("reconnect backoff".to_owned()));
        }
        match self.open() {
            Ok(c) => {
                self.marks.connected(c);
                Ok(())
            }
            Err(e) => {
                self.fail_marks();
                Err(unavailable(&e))
            }
        }
    }

    /// A new connection that has adopted the shard's agreed layout.
    fn open(&mut self) -> redis::RedisResult<Conn> {
        let mut c = Conn::open(&self.config)?;
        self.agree_layout(&mut c)?;
        let n = self.stats.connects.fetch_add(1, Ordering::Relaxed);
        if n > 0 {
            crate::trace::event!(info, key_base = %self.key_base, "reconnected to Redis");
        }
        Ok(c)
    }

    /// A request on the lookup connection (lookups, claims, layout,
    /// deletes) failed: drops it and backs off. The mark connection keeps
    /// its own state.
    pub(super) fn fail(&mut self) {
        let wait = self.lookups.fail();
        self.failed("Redis request failed; connection dropped", wait);
    }

    /// Writing marks or reading their replies failed: drops the mark
    /// connection and backs off. The lookup connection keeps its own state.
    pub(super) fn fail_marks(&mut self) {
        let wait = self.marks.fail();
        self.failed(
            "writing marks to Redis failed; mark connection dropped",
            wait,
        );
    }

    fn failed(&mut self, what: &'static str, wait: Duration) {
        #[cfg(not(feature = "tracing"))]
        let _ = (what, wait);
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        crate::trace::event!(
            warn,
            key_base = %self.key_base,
            retry_in_ms = wait.as_millis() as u64,
            unsent_marks = self.unsent.len(),
            "{what}"
        );
    }
}
