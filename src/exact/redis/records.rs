//! Record strings (owned keys): a bucket is a string of 24-byte records
//! (fingerprint, time), appended to and read whole; once a slice stops
//! filling, its strings are rewritten at their exact size.

use super::RedisPartition;
use crate::time::{Timestamp, GENERATIONS};

/// Buckets one flush compacts (one script per flush).
pub(super) const COMPACT_CHUNK: u64 = 1024;

pub(super) fn decode(v: &[u8]) -> Option<Timestamp> {
    let bytes: [u8; 8] = v.try_into().ok()?;
    Some(Timestamp::from_nanos(u64::from_be_bytes(bytes)))
}

/// Bytes of one record in a record string: the fingerprint, then the time
/// (8 bytes big-endian).
pub(super) const RECORD: usize = 24;

/// The time of the last (newest) record of `fp` in a record string; `Err`
/// (what is wrong) for a string that is not whole records.
pub(super) fn find_record(records: &[u8], fp: &[u8; 16]) -> Result<Option<Timestamp>, String> {
    if records.len() % RECORD != 0 {
        return Err(format!(
            "a record string of {} bytes is not whole {RECORD}-byte records",
            records.len()
        ));
    }
    Ok(records
        .chunks_exact(RECORD)
        .rev()
        .find(|r| r[..16] == fp[..])
        .and_then(|r| decode(&r[16..])))
}

impl RedisPartition {
    /// The engine named slice `slice`: record strings of the slices before
    /// it stop growing and are queued for compaction.
    pub(super) fn advance(&mut self, slice: u64) {
        if slice <= self.current {
            return;
        }
        self.current = slice;
        while let Some(&done) = self.appended.first().filter(|&&s| s < slice) {
            self.appended.remove(&done);
            self.compacting.push_back(done);
        }
    }

    /// The next chunk of record strings to compact (at most
    /// [`COMPACT_CHUNK`]), as the keys of one `COMPACT_SCRIPT` call; empty
    /// when nothing is queued. Slices already retired are dropped.
    pub(super) fn next_compaction(&mut self) -> Vec<String> {
        let oldest_live = self.current.saturating_sub(GENERATIONS as u64 - 1);
        while let Some(&slice) = self.compacting.front() {
            if slice < oldest_live || self.compact_cursor >= self.buckets {
                self.compacting.pop_front();
                self.compact_cursor = 0;
                continue;
            }
            let end = (self.compact_cursor + COMPACT_CHUNK).min(self.buckets);
            let keys = (self.compact_cursor..end)
                .map(|b| self.key(slice, b))
                .collect();
            self.compact_cursor = end;
            return keys;
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;

    #[test]
    fn a_record_string_answers_with_its_newest_record() {
        let record = |fp: u128, at: u64| {
            let mut r = Fingerprint(fp).to_bytes().to_vec();
            r.extend_from_slice(&at.to_be_bytes());
            r
        };
        let fp = |v: u128| Fingerprint(v).to_bytes();
        let blob = [record(1, 10), record(2, 20), record(1, 30)].concat();
        assert_eq!(
            find_record(&blob, &fp(1)).unwrap(),
            Some(Timestamp::from_nanos(30))
        );
        assert_eq!(
            find_record(&blob, &fp(2)).unwrap(),
            Some(Timestamp::from_nanos(20))
        );
        assert_eq!(find_record(&blob, &fp(3)).unwrap(), None);
        assert_eq!(find_record(&[], &fp(3)).unwrap(), None);
        assert!(find_record(&blob[..30], &fp(1)).is_err());
    }
}
