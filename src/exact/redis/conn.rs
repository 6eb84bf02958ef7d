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

impl RedisPartition {
    /// Runs `f` on a connection, reconnecting with backoff; a failure drops
    /// the connection.
    pub(super) fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Conn, &mut Self) -> redis::RedisResult<T>,
    ) -> Result<T, ExactTierError> {
        self.connect()?;
        let mut conn = self.conn.take().expect("connected above");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        match f(&mut conn, self) {
            Ok(v) => {
                self.conn = Some(conn);
                Ok(v)
            }
            Err(e) => {
                self.fail();
                Err(unavailable(&e))
            }
        }
    }

    /// Connects unless connected (or in backoff), adopting the agreed hash
    /// count: call it before grouping keys by hash.
    pub(super) fn connect(&mut self) -> Result<(), ExactTierError> {
        if self.conn.is_none() {
            if Instant::now() < self.retry_at {
                return Err(ExactTierError::Unavailable("reconnect backoff".to_owned()));
            }
            match Conn::open(&self.config).and_then(|mut c| {
                self.agree_layout(&mut c)?;
                Ok(c)
            }) {
                Ok(c) => {
                    let n = self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    if n > 0 {
                        crate::trace::event!(info, key_base = %self.key_base, "reconnected to Redis");
                    }
                    self.conn = Some(c);
                    self.backoff = Duration::from_millis(10);
                }
                Err(e) => {
                    self.fail();
                    return Err(unavailable(&e));
                }
            }
        }
        Ok(())
    }

    /// A request on the main connection (lookups, claims, layout) failed:
    /// drops it and backs off. The mark connection keeps its own state.
    pub(super) fn fail(&mut self) {
        self.conn = None;
        self.failed("Redis request failed; connection dropped");
    }

    /// Writing marks or reading their replies failed: drops the mark
    /// connection and backs off.
    pub(super) fn fail_marks(&mut self) {
        self.mark_conn = None;
        self.failed("writing marks to Redis failed; mark connection dropped");
    }

    pub(super) fn failed(&mut self, what: &'static str) {
        #[cfg(not(feature = "tracing"))]
        let _ = what;
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        crate::trace::event!(
            warn,
            key_base = %self.key_base,
            retry_in_ms = self.backoff.as_millis() as u64,
            unsent_marks = self.unsent.len(),
            "{what}"
        );
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
    }
}
