//! Where a mark lives: key names, the bucket of a fingerprint, and the
//! layout (bucket count, record strings or hashes) the engines sharing a
//! shard agree on in Redis.

use redis::Value;

use super::conn::Conn;
use super::RedisPartition;
use crate::fingerprint::Fingerprint;

/// Keys one hash of a slice is sized for by default. The engine's slot
/// sizing already has a quarter to spare, so a hash holds about 51 keys at
/// the expected rate and stays in Redis's compact encoding up to 2.5 times
/// that (`hash-max-listpack-entries`, 128 by default; past it Redis
/// converts that one hash, costing memory, not verdicts). Measured with
/// the Redis bench (marks as scripts then): 16 keys per hash cost 2.4–2.8
/// µs of Redis CPU per key (more `HSET` calls), 40 and 100 cost 1.7–1.8 µs,
/// at 37 and 33 B per key.
pub(super) const KEYS_PER_HASH: usize = 64;

/// Most hashes per slice of a shard (and the most a layout key may name).
pub(super) const MAX_BUCKETS: u64 = 1 << 20;

/// Hashes per slice for `keys_per_slot` expected keys, `keys_per_hash` in
/// each (`0`: one hash).
pub(super) fn buckets_for(keys_per_slot: usize, keys_per_hash: usize) -> u64 {
    if keys_per_hash == 0 {
        return 1;
    }
    (keys_per_slot.div_ceil(keys_per_hash) as u64).clamp(1, MAX_BUCKETS)
}

impl RedisPartition {
    pub(super) fn key(&self, slice: u64, bucket: u64) -> String {
        format!("{}{slice}:{bucket:x}", self.key_base)
    }

    /// The hash of a slice that holds `fp`.
    pub(super) fn bucket(&self, fp: Fingerprint) -> u64 {
        ((u128::from(fp.high()) * u128::from(self.buckets)) >> 64) as u64
    }

    /// This engine's layout, as the layout key stores it: `<count>` of
    /// hashes, `records:<count>` of record strings, or (shared mode)
    /// `log:<window>:<span>` in nanoseconds (`none` without a window).
    fn own_layout(&self) -> String {
        if self.shared {
            let ns = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |v| v.to_string());
            format!("log:{}:{}", ns(self.window), ns(self.span_nanos))
        } else if self.records {
            format!("records:{}", self.buckets)
        } else {
            self.buckets.to_string()
        }
    }

    /// Adopts the layout Redis holds for the shard (the first engine's:
    /// `<count>` of hashes, or `records:<count>` of record strings), or
    /// proposes this engine's if none is stored yet. Shared mode keeps a
    /// log instead, which every engine sharing the shard must agree on
    /// with the same window and lateness (they judge each other's
    /// operations): a shard kept otherwise is refused, with a message. A
    /// reconnect only reads the layout (one command, which a full server
    /// still answers).
    pub(super) fn agree_layout(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        let mut get = redis::cmd("GET");
        get.arg(&self.layout_key);
        let mut stored = conn.pipeline(vec![get.clone()])?.pop();
        if matches!(stored, None | Some(Value::Nil)) {
            let mut set = redis::cmd("SET");
            set.arg(&self.layout_key).arg(self.own_layout()).arg("NX");
            stored = conn.pipeline(vec![set, get])?.pop();
        }
        let text = match &stored {
            Some(Value::BulkString(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        };
        let refuse = |what: String| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "the shard's layout does not fit this engine",
                format!("{}: {what}", self.layout_key),
            ))
        };
        if let Some(log) = text.and_then(|t| t.strip_prefix("log:")) {
            if !self.shared {
                return Err(refuse(format!(
                    "shared-mode engines keep this namespace's keys as a log ({log}); owned \
                     mode needs record strings or hashes: use another namespace or key prefix"
                )));
            }
            let ours = self.own_layout();
            if text != Some(ours.as_str()) {
                return Err(refuse(format!(
                    "engines sharing keys judge each other's operations, so they need the same \
                     window and lateness: this shard's log is kept for {log} (window and span \
                     in nanoseconds), this engine has {}",
                    &ours["log:".len()..]
                )));
            }
            return Ok(());
        }
        let agreed = text.and_then(|s| {
            let (records, count) = match s.strip_prefix("records:") {
                Some(count) => (true, count),
                None => (false, s),
            };
            let n = count.parse::<u64>().ok()?;
            (1..=MAX_BUCKETS).contains(&n).then_some((records, n))
        });
        let Some((records, agreed)) = agreed else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the shard's layout key does not hold a layout",
                self.layout_key.clone(),
            )));
        };
        if self.shared {
            return Err(refuse(format!(
                "owned-mode engines keep this namespace's keys as {}; shared mode needs its \
                 log: use another namespace or key prefix",
                if records { "record strings" } else { "hashes" }
            )));
        }
        if (records, agreed) != (self.records, self.buckets) {
            crate::trace::event!(
                info,
                key_base = %self.key_base,
                ours = self.buckets,
                agreed,
                records,
                "adopted the layout another engine chose"
            );
            self.buckets = agreed;
            self.records = records;
            self.expiring.clear();
        }
        Ok(())
    }
}
