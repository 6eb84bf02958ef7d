//! Redis Streams consumer groups: `XREADGROUP`, `XACK`, and `XAUTOCLAIM` of
//! entries left pending by a dead (or slow) consumer.
//!
//! ```text
//! next_batch   XAUTOCLAIM entries idle > reclaim_idle (a dead consumer's, or ours left unacked)
//!              else XREADGROUP > (block up to `wait`, then linger 1 ms for more)
//!          ─▶ claim, act, commit ─▶ settle: XACK the settled ones in one command;
//!              Failed / InProgress / Unavailable stay pending → reclaimed after reclaim_idle
//! ```
//!
//! An entry is acked only after its record was committed; an entry
//! delivered to a consumer that died stays in the group's pending list and
//! is claimed by a live consumer once idle for `reclaim_idle`: `Completed`
//! (acked without acting) when the dead one had committed, `Acquired` once
//! its lease expired when it had not.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::Value;
use tiered_dedup::consumer::Disposition;

use crate::{Batching, ConsumerError};

fn broker(e: impl std::fmt::Display) -> ConsumerError {
    ConsumerError::Broker(e.to_string())
}

/// One stream entry: its id and fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    /// The entry id (`<ms>-<seq>`).
    pub id: String,
    /// The fields, in order.
    pub fields: Vec<(String, Vec<u8>)>,
}

impl StreamEntry {
    /// The value of field `name`, if present.
    #[must_use]
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.as_slice())
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Parses `[[id, [field, value, …]], …]`; entries deleted from the stream
/// (nil fields) are skipped.
fn entries(v: &Value) -> Vec<StreamEntry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| {
            let Value::Array(pair) = e else { return None };
            let id = text(pair.first()?)?;
            let Value::Array(kv) = pair.get(1)? else {
                return None;
            };
            let fields = kv
                .chunks(2)
                .filter_map(|c| match c {
                    [f, Value::BulkString(v)] => Some((text(f)?, v.clone())),
                    [f, v] => Some((text(f)?, text(v)?.into_bytes())),
                    _ => None,
                })
                .collect();
            Some(StreamEntry { id, fields })
        })
        .collect()
}

/// A consumer in a Redis Streams consumer group.
pub struct RedisStreamConsumer {
    conn: MultiplexedConnection,
    stream: String,
    group: String,
    consumer: String,
    batching: Batching,
    reclaim_idle: Duration,
    next_reclaim: Instant,
    cursor: String,
    acked: u64,
    reclaimed: u64,
    /// Where a new connection comes from when this one is lost
    /// ([`RedisStreamConsumer::reconnect_with`]).
    client: Option<redis::Client>,
    /// The connection failed, or the group is gone (a restarted server
    /// without persistence): repaired before the next command.
    broken: bool,
    repairs: u64,
    /// Commands timed out in a row: a connection that only times out
    /// (half-open: the peer vanished without a reset) is repaired too.
    timeouts: u32,
}

/// Timeouts in a row after which the connection is taken for lost.
const TIMEOUTS_BEFORE_REPAIR: u32 = 3;

/// The longest a reconnection may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `XGROUP CREATE stream group 0 MKSTREAM`; an existing group is fine.
async fn create_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Result<(), ConsumerError> {
    let created: Result<Value, _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(broker(e)),
        _ => Ok(()),
    }
}

impl RedisStreamConsumer {
    /// Consumer `consumer` of `group` on `stream` (the group is created at
    /// the stream's start, with the stream, if missing). Entries pending
    /// longer than `reclaim_idle` in any consumer of the group are claimed
    /// by this one: longer than a batch's handler runs, and at least the
    /// claims' lease.
    ///
    /// # Errors
    /// [`ConsumerError::Broker`] when the group cannot be created.
    pub async fn new(
        mut conn: MultiplexedConnection,
        stream: &str,
        group: &str,
        consumer: &str,
        batching: Batching,
        reclaim_idle: Duration,
    ) -> Result<Self, ConsumerError> {
        create_group(&mut conn, stream, group).await?;
        Ok(RedisStreamConsumer {
            conn,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            batching,
            reclaim_idle,
            next_reclaim: Instant::now(),
            cursor: "0-0".to_owned(),
            acked: 0,
            reclaimed: 0,
            client: None,
            broken: false,
            repairs: 0,
            timeouts: 0,
        })
    }

    /// Opens a new connection from `client` when this one is lost (the
    /// server restarted, the network dropped it): the call that met the
    /// failure returns its error, the next one reconnects. Without it, a
    /// lost connection fails every later call. Either way a group that is
    /// gone (a server restarted without persistence) is created again.
    #[must_use]
    pub fn reconnect_with(mut self, client: redis::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Reconnections and group re-creations made so far.
    #[must_use]
    pub fn repairs(&self) -> u64 {
        self.repairs
    }

    /// `e` as the consumer's error; a lost connection or a missing group
    /// marks the consumer for repair before its next command.
    fn failed(&mut self, e: &redis::RedisError) -> ConsumerError {
        if e.is_timeout() {
            self.timeouts += 1;
        }
        if e.is_unrecoverable_error()
            || e.is_connection_dropped()
            || e.code() == Some("NOGROUP")
            || self.timeouts >= TIMEOUTS_BEFORE_REPAIR
        {
            self.broken = true;
        }
        broker(e)
    }

    /// A command answered: the connection is alive.
    fn answered<T>(&mut self, reply: T) -> T {
        self.timeouts = 0;
        reply
    }

    /// Reconnects (when a client was given and the connection was lost)
    /// and re-creates the group, if the last command found either broken.
    async fn repair(&mut self) -> Result<(), ConsumerError> {
        if !self.broken {
            return Ok(());
        }
        if let Some(client) = &self.client {
            // Bounded: a stalled server accepts the socket and never answers.
            self.conn =
                tokio::time::timeout(RECONNECT_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| ConsumerError::Broker("reconnecting timed out".to_owned()))?
                    .map_err(broker)?;
        }
        create_group(&mut self.conn, &self.stream, &self.group).await?;
        self.broken = false;
        self.timeouts = 0;
        // A re-created group's pending list starts over.
        self.cursor = "0-0".to_owned();
        self.repairs += 1;
        Ok(())
    }

    /// Entries acked so far.
    #[must_use]
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Entries claimed from the pending list (`XAUTOCLAIM`) so far.
    #[must_use]
    pub fn reclaimed(&self) -> u64 {
        self.reclaimed
    }

    async fn read(
        &mut self,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, ConsumerError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(">");
        let reply: redis::RedisResult<Value> = match block {
            // The server answers a blocking read only after `b`: give it
            // that long plus a margin (the client's default response
            // timeout, 500 ms, would cut a longer wait short).
            Some(b) => {
                let mut conn = self.conn.clone();
                conn.set_response_timeout(b + Duration::from_secs(1));
                cmd.query_async(&mut conn).await
            }
            None => cmd.query_async(&mut self.conn).await,
        };
        let reply: Value = reply.map_err(|e| self.failed(&e))?;
        let reply = self.answered(reply);
        let Value::Array(streams) = reply else {
            return Ok(Vec::new());
        };
        Ok(streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(pair) => pair.get(1).map(entries).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect())
    }

    async fn reclaim(&mut self) -> Result<Vec<StreamEntry>, ConsumerError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.reclaim_idle.as_millis() as u64)
            .arg(&self.cursor)
            .arg("COUNT")
            .arg(self.batching.max)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| self.failed(&e))?;
        let reply = self.answered(reply);
        let Value::Array(parts) = reply else {
            return Ok(Vec::new());
        };
        let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        let found = parts.get(1).map(entries).unwrap_or_default();
        if next == "0-0" {
            // A full pass over the pending list: look again in a while.
            self.next_reclaim = Instant::now() + self.reclaim_idle / 4;
        }
        self.cursor = next;
        self.reclaimed += found.len() as u64;
        Ok(found)
    }

    /// The next batch: entries idle in the pending list longer than
    /// `reclaim_idle` first (looked for at most every quarter of it), else
    /// new entries — waiting up to `batching.wait` for a first, then
    /// `batching.linger` for more. Empty when nothing came.
    ///
    /// # Errors
    /// [`ConsumerError::Broker`] when Redis failed.
    pub async fn next_batch(&mut self) -> Result<Vec<StreamEntry>, ConsumerError> {
        self.repair().await?;
        if Instant::now() >= self.next_reclaim {
            let found = self.reclaim().await?;
            if !found.is_empty() {
                return Ok(found);
            }
        }
        let max = self.batching.max.max(1);
        let wait = self
            .batching
            .wait
            .min(self.reclaim_idle / 4)
            .max(Duration::from_millis(1));
        let mut batch = self.read(max, Some(wait)).await?;
        if !batch.is_empty() && batch.len() < max && !self.batching.linger.is_zero() {
            tokio::time::sleep(self.batching.linger).await;
            // A failed read for more keeps what was read: those entries
            // are already this consumer's (the failure is noted for repair).
            if let Ok(more) = self.read(max - batch.len(), None).await {
                batch.extend(more);
            }
        }
        Ok(batch)
    }

    /// `XACK`s, in one command, every entry whose disposition says ack (and
    /// `rejected`, bad entries); the others stay pending, to be reclaimed
    /// after `reclaim_idle`.
    ///
    /// # Errors
    /// [`ConsumerError::Broker`] when Redis failed (the entries stay
    /// pending and are reclaimed; their claims answer `Completed`).
    pub async fn settle<'a>(
        &mut self,
        settled: impl IntoIterator<Item = (&'a StreamEntry, &'a Disposition)>,
        rejected: impl IntoIterator<Item = &'a StreamEntry>,
    ) -> Result<(), ConsumerError> {
        let ids: Vec<&str> = settled
            .into_iter()
            .filter(|(_, d)| d.should_ack())
            .map(|(e, _)| e.id.as_str())
            .chain(rejected.into_iter().map(|e| e.id.as_str()))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.repair().await?;
        let n: u64 = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&ids)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| self.failed(&e))?;
        self.acked += self.answered(n);
        Ok(())
    }
}

/// Appends `fields` to `stream` (`XADD stream * …`), returning the id.
///
/// # Errors
/// [`ConsumerError::Broker`] when Redis failed.
pub async fn publish(
    conn: &mut MultiplexedConnection,
    stream: &str,
    fields: &[(&str, &[u8])],
) -> Result<String, ConsumerError> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (f, v) in fields {
        cmd.arg(*f).arg(*v);
    }
    cmd.query_async(conn).await.map_err(broker)
}
