//! Record strings (owned keys): a bucket is a string of records, appended
//! to and read whole; once a slice stops filling, its strings are
//! rewritten at their exact size.
//!
//! A record is 24 bytes — the fingerprint and the first-accepted time (8
//! bytes big-endian). A committed claim with a payload fingerprint or a
//! result has a **body** (the payload tag (u8) and fingerprint (u64), the
//! result's length (u32) and the result), kept apart from the strings: in
//! the slice's body hash (`…:b:<slice>`, field the fingerprint, value the
//! time and the body as a hash layout stores them), the record's time
//! flagged with [`BODY_APART`]. So a lookup reads strings of 24-byte
//! records whatever the results weigh, and fetches the bodies of the
//! records it found, and only those, with one `HMGET` per slice. With
//! bodies inside the strings (their time's top bit set, the body after the
//! record: what earlier versions wrote, still read) a lookup of a slice of
//! 100-byte results read about 7 kB per key asked and cost Redis 9.6 µs of
//! CPU per key claimed (`benches/claims.rs`). The newest record of a
//! fingerprint wins. (A hash's value is the same without the fingerprint.)

use std::sync::Arc;

use super::RedisPartition;
use crate::claims::PayloadFingerprint;
use crate::exact::RecordBody;
use crate::time::{Timestamp, GENERATIONS};

/// Buckets one flush compacts (one script per flush).
pub(super) const COMPACT_CHUNK: u64 = 1024;

/// Bytes of a record's head in a record string: the fingerprint, then the
/// time (8 bytes big-endian; its top bit set when a body follows).
pub(super) const RECORD: usize = 24;

/// The top bit of a stored time: a body follows (record times are below
/// 2⁶²).
const HAS_BODY: u64 = 1 << 63;

/// The next bit of a record's time: its body is in the slice's body hash.
/// Times from 2⁶² ns (the year 2116) on keep their bodies inline.
pub(super) const BODY_APART: u64 = 1 << 62;

/// Where a record's body is.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Stored {
    /// A mark: no body.
    Bare,
    /// In the record string, after the record (earlier versions).
    Inline(RecordBody),
    /// In the slice's body hash.
    Apart,
}

/// Bytes of a body's header after its record's head: the payload tag (u8)
/// and fingerprint (u64), the result's length (u32), all big-endian.
const BODY_HEADER: usize = 1 + 8 + 4;

/// A record (or a hash's value) as Redis stores it: the time, and the body
/// of a committed claim that has one.
pub(super) fn write_record(
    out: &mut Vec<u8>,
    fp: Option<&[u8; 16]>,
    at: u64,
    body: Option<&RecordBody>,
) {
    if let Some(fp) = fp {
        out.extend_from_slice(fp);
    }
    if let (Some(_), Some(_), true) = (fp, body, at < BODY_APART) {
        // A record string's body goes to the slice's body hash.
        out.extend_from_slice(&(at | BODY_APART).to_be_bytes());
        return;
    }
    let flag = if body.is_some() { HAS_BODY } else { 0 };
    out.extend_from_slice(&(at | flag).to_be_bytes());
    if let Some(b) = body {
        out.push(u8::from(b.payload.is_some()));
        out.extend_from_slice(&b.payload.map_or(0, |p| p.0).to_be_bytes());
        out.extend_from_slice(&(b.result.len() as u32).to_be_bytes());
        out.extend_from_slice(&b.result);
    }
}

/// Reads the time and body at the start of `v` (a hash's value, or a
/// record string after the fingerprint): the time, where the body is, and
/// the bytes they took; `None` when `v` is cut.
fn read_tail(v: &[u8]) -> Option<(u64, Stored, usize)> {
    let word = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    if word & HAS_BODY == 0 {
        if word & BODY_APART != 0 {
            return Some((word & !BODY_APART, Stored::Apart, 8));
        }
        return Some((word, Stored::Bare, 8));
    }
    let h = v.get(8..8 + BODY_HEADER)?;
    let payload = (h[0] != 0)
        .then(|| PayloadFingerprint(u64::from_be_bytes(h[1..9].try_into().expect("8 bytes"))));
    let len = u32::from_be_bytes(h[9..13].try_into().expect("4 bytes")) as usize;
    let start = 8 + BODY_HEADER;
    let result = v.get(start..start + len)?;
    Some((
        word & !HAS_BODY,
        Stored::Inline(RecordBody {
            payload,
            result: Arc::from(result),
        }),
        start + len,
    ))
}

/// A hash's value (a hash layout's record, or a body hash's body): the
/// time and the body, if any; `None` for a value that is not one.
pub(super) fn decode(v: &[u8]) -> Option<(Timestamp, Option<RecordBody>)> {
    match read_tail(v)? {
        (at, Stored::Bare, used) if used == v.len() => Some((Timestamp::from_nanos(at), None)),
        (at, Stored::Inline(body), used) if used == v.len() => {
            Some((Timestamp::from_nanos(at), Some(body)))
        }
        _ => None,
    }
}

/// The newest record of `fp` in a record string: its time and where its
/// body is; `Err` (what is wrong) for a string that is not whole records.
pub(super) fn find_record(
    records: &[u8],
    fp: &[u8; 16],
) -> Result<Option<(Timestamp, Stored)>, String> {
    let mut found = None;
    let mut i = 0;
    while i < records.len() {
        let cut = || format!("a record string of {} bytes cut at byte {i}", records.len());
        let head = records.get(i..i + 16).ok_or_else(cut)?;
        let (at, body, used) = read_tail(&records[i + 16..]).ok_or_else(cut)?;
        if head == fp {
            found = Some((Timestamp::from_nanos(at), body));
        }
        i += 16 + used;
    }
    Ok(found)
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
        let record = |fp: u128, at: u64, body: Option<&RecordBody>| {
            let mut r = Vec::new();
            write_record(&mut r, Some(&Fingerprint(fp).to_bytes()), at, body);
            r
        };
        let fp = |v: u128| Fingerprint(v).to_bytes();
        let body = RecordBody {
            payload: Some(PayloadFingerprint(5)),
            result: Arc::from(&b"receipt"[..]),
        };
        // What earlier versions wrote: the body inline after its record.
        let mut inline = fp(4).to_vec();
        write_record(&mut inline, None, 40, Some(&body));
        let blob = [
            record(1, 10, None),
            record(2, 20, Some(&body)),
            inline.clone(),
            record(1, 30, None),
        ]
        .concat();
        assert_eq!(blob.len(), 4 * RECORD + BODY_HEADER + 7, "bodies apart");
        assert_eq!(
            find_record(&blob, &fp(1)).unwrap(),
            Some((Timestamp::from_nanos(30), Stored::Bare))
        );
        assert_eq!(
            find_record(&blob, &fp(2)).unwrap(),
            Some((Timestamp::from_nanos(20), Stored::Apart))
        );
        assert_eq!(
            find_record(&blob, &fp(4)).unwrap(),
            Some((Timestamp::from_nanos(40), Stored::Inline(body.clone())))
        );
        assert_eq!(find_record(&blob, &fp(3)).unwrap(), None);
        assert_eq!(find_record(&[], &fp(3)).unwrap(), None);
        assert!(find_record(&blob[..30], &fp(1)).is_err());
        assert!(
            find_record(&blob[..2 * RECORD + 20], &fp(1)).is_err(),
            "a body cut short"
        );
        // A time past the apart flag keeps its body inline.
        let late = record(5, BODY_APART + 1, Some(&body));
        assert_eq!(
            find_record(&late, &fp(5)).unwrap(),
            Some((
                Timestamp::from_nanos(BODY_APART + 1),
                Stored::Inline(body.clone())
            ))
        );
        let mut value = Vec::new();
        write_record(&mut value, None, 20, Some(&body));
        assert_eq!(
            decode(&value),
            Some((Timestamp::from_nanos(20), Some(body)))
        );
        assert_eq!(decode(&value[..9]), None);
        assert_eq!(
            decode(&record(2, 20, None)[16..]),
            Some((Timestamp::from_nanos(20), None))
        );
        assert_eq!(
            decode(&(20 | BODY_APART).to_be_bytes()),
            None,
            "not a hash value"
        );
    }
}
