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

    /// Adopts the layout Redis holds for the shard (the first engine's:
    /// `<count>` of hashes, or `records:<count>` of record strings), or
    /// proposes this engine's if none is stored yet. A reconnect only
    /// reads it (one command, which a full server still answers).
    pub(super) fn agree_layout(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        let mut get = redis::cmd("GET");
        get.arg(&self.layout_key);
        let mut stored = conn.pipeline(vec![get.clone()])?.pop();
        if matches!(stored, None | Some(Value::Nil)) {
            let ours = if self.records {
                format!("records:{}", self.buckets)
            } else {
                self.buckets.to_string()
            };
            let mut set = redis::cmd("SET");
            set.arg(&self.layout_key).arg(ours).arg("NX");
            stored = conn.pipeline(vec![set, get])?.pop();
        }
        let agreed = match &stored {
            Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(|s| {
                let (records, count) = match s.strip_prefix("records:") {
                    Some(count) => (true, count),
                    None => (false, s),
                };
                let n = count.parse::<u64>().ok()?;
                (1..=MAX_BUCKETS).contains(&n).then_some((records, n))
            }),
            _ => None,
        };
        let Some((records, agreed)) = agreed else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the shard's layout key does not hold a hash count",
                self.layout_key.clone(),
            )));
        };
        if records && self.shared {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "owned-mode engines keep this namespace's keys as record strings; \
                 shared mode needs hashes: use another namespace or key prefix",
                self.layout_key.clone(),
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
