//! The stored response: what a completed key's claim result holds, in a
//! small versioned binary format, decoded defensively (every length
//! bounded by what is left, every name and value validated, a checksum over
//! the whole record).
//!
//! ```text
//! offset  size  field
//! 0       4     magic "TDHR"
//! 4       1     version (1)
//! 5       1     body kind: 0 = the body follows, 1 = omitted (over the cap)
//! 6       2     status code, big-endian
//! 8       2     header count H, big-endian
//! 10      …     H × (name length u16 BE, name (lowercase), value length u16 BE, value)
//! …       4     body length B, big-endian (0 when omitted)
//! …       B     body
//! …       8     xxh3-64 of every byte before it, little-endian
//! ```
//!
//! Overhead: 26 bytes plus 4 + name + value per stored header.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 4] = b"TDHR";
/// The version this crate writes; it reads versions 1 to this.
pub const RECORD_VERSION: u8 = 1;
/// Fixed bytes of a record: magic, version, kind, status, header count,
/// body length, checksum.
pub const RECORD_OVERHEAD: usize = 4 + 1 + 1 + 2 + 2 + 4 + 8;

/// A response as stored for replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The first response's status.
    pub status: StatusCode,
    /// The replayable headers it had, in order (a name may repeat).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Its body, or why it is not stored.
    pub body: StoredBody,
}

/// A stored response's body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredBody {
    /// The whole body.
    Bytes(Bytes),
    /// The body was over the layer's cap: the key completed, but its
    /// response cannot be replayed.
    Omitted,
}

/// Why stored bytes are not a response this crate can replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// No bytes: the key was completed by something other than this layer
    /// (a `check`, or a commit without a result).
    Empty,
    /// Not this format (wrong magic), or truncated, or the checksum does
    /// not match.
    Corrupt,
    /// A version newer than this crate reads (written by a newer release).
    Version(u8),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Empty => f.write_str("the key was completed without a stored response"),
            RecordError::Corrupt => f.write_str("the stored response is corrupt or not of this format"),
            RecordError::Version(v) => write!(
                f,
                "the stored response is format version {v}; this release reads versions 1 to {RECORD_VERSION}"
            ),
        }
    }
}

impl std::error::Error for RecordError {}

impl StoredResponse {
    /// The record's length once encoded.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| 4 + n.as_str().len() + v.len())
            .sum();
        let body = match &self.body {
            StoredBody::Bytes(b) => b.len(),
            StoredBody::Omitted => 0,
        };
        RECORD_OVERHEAD + headers + body
    }

    /// The record's bytes. Headers whose name or value exceed 65 535 bytes,
    /// and headers past the 65 535th, are not stored.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let body = match &self.body {
            StoredBody::Bytes(b) => Some(&b[..]),
            StoredBody::Omitted => None,
        };
        encode_record(
            self.status,
            || self.headers.iter().map(|(n, v)| (n, v)),
            body,
        )
    }

    /// Reads a record from a claim's result; the body shares the result's
    /// memory (no copy).
    ///
    /// # Errors
    /// [`RecordError`] for anything but a whole, valid record of a version
    /// this crate reads.
    pub fn decode(result: Arc<[u8]>) -> Result<StoredResponse, RecordError> {
        if result.is_empty() {
            return Err(RecordError::Empty);
        }
        let all: &[u8] = &result;
        if all.len() < RECORD_OVERHEAD || &all[..4] != MAGIC {
            return Err(RecordError::Corrupt);
        }
        let version = all[4];
        if version == 0 {
            return Err(RecordError::Corrupt);
        }
        if version > RECORD_VERSION {
            return Err(RecordError::Version(version));
        }
        let (content, sum) = all.split_at(all.len() - 8);
        let sum = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
        if xxhash_rust::xxh3::xxh3_64(content) != sum {
            return Err(RecordError::Corrupt);
        }
        let mut r = Reader { s: content, i: 5 };
        let kind = r.u8()?;
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| RecordError::Corrupt)?;
        let count = r.u16()?;
        let mut headers = Vec::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            let n = usize::from(r.u16()?);
            let name = HeaderName::from_bytes(r.take(n)?).map_err(|_| RecordError::Corrupt)?;
            let n = usize::from(r.u16()?);
            let value = HeaderValue::from_bytes(r.take(n)?).map_err(|_| RecordError::Corrupt)?;
            headers.push((name, value));
        }
        let body_len = r.u32()? as usize;
        let start = r.i;
        r.take(body_len)?;
        if r.i != content.len() {
            return Err(RecordError::Corrupt);
        }
        let body = match kind {
            0 => StoredBody::Bytes(Bytes::from_owner(result).slice(start..start + body_len)),
            1 if body_len == 0 => StoredBody::Omitted,
            _ => return Err(RecordError::Corrupt),
        };
        Ok(StoredResponse {
            status,
            headers,
            body,
        })
    }
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RecordError> {
        let end = self.i.checked_add(n).ok_or(RecordError::Corrupt)?;
        let out = self.s.get(self.i..end).ok_or(RecordError::Corrupt)?;
        self.i = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

/// A record of `status`, the headers `headers()` yields (in that order)
/// and `body` (`None`: omitted), written in one pass over the headers to
/// count and size them and one to write them: the layer encodes straight
/// from the response's headers, without a list of copies. Headers whose
/// name or value exceed 65 535 bytes, and headers past the 65 535th, are
/// not stored.
pub(crate) fn encode_record<'h, I>(
    status: StatusCode,
    headers: impl Fn() -> I,
    body: Option<&[u8]>,
) -> Vec<u8>
where
    I: Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
{
    let kept = || {
        headers()
            .filter(|(n, v)| n.as_str().len() <= 0xffff && v.len() <= 0xffff)
            .take(0xffff)
    };
    let (count, header_bytes) = kept().fold((0usize, 0usize), |(c, b), (n, v)| {
        (c + 1, b + 4 + n.as_str().len() + v.len())
    });
    let (kind, body): (u8, &[u8]) = match body {
        Some(b) => (0, b),
        None => (1, &[]),
    };
    let mut out = Vec::with_capacity(RECORD_OVERHEAD + header_bytes + body.len());
    out.extend_from_slice(MAGIC);
    out.push(RECORD_VERSION);
    out.push(kind);
    out.extend_from_slice(&status.as_u16().to_be_bytes());
    out.extend_from_slice(&(count as u16).to_be_bytes());
    for (name, value) in kept() {
        let name = name.as_str().as_bytes();
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    let body_len = u32::try_from(body.len()).expect("bodies are capped far below 4 GiB");
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(body);
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> StoredResponse {
        StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    http::header::LOCATION,
                    HeaderValue::from_static("/payments/7"),
                ),
                (
                    http::header::LOCATION,
                    HeaderValue::from_static("/payments/7b"),
                ),
            ],
            body: StoredBody::Bytes(Bytes::from_static(b"{\"id\":7}")),
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let bytes = r.encode();
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(StoredResponse::decode(bytes.into()).unwrap(), r);
        let omitted = StoredResponse {
            body: StoredBody::Omitted,
            ..sample()
        };
        assert_eq!(
            StoredResponse::decode(omitted.encode().into()).unwrap(),
            omitted
        );
    }

    #[test]
    fn damaged_records_are_refused() {
        let bytes = sample().encode();
        assert_eq!(
            StoredResponse::decode(Arc::from(&[][..])),
            Err(RecordError::Empty)
        );
        for cut in 0..bytes.len() {
            assert!(
                StoredResponse::decode(Arc::from(&bytes[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(StoredResponse::decode(b.into()).is_err(), "flip at {i}");
        }
        let mut newer = bytes.clone();
        newer[4] = RECORD_VERSION + 1;
        assert_eq!(
            StoredResponse::decode(newer.into()),
            Err(RecordError::Version(2))
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = StoredResponse::decode(bytes.into());
        }

        #[test]
        fn arbitrary_responses_round_trip(
            status in 100u16..1000,
            headers in proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}"), 0..8),
            body in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let r = StoredResponse {
                status: StatusCode::from_u16(status).unwrap(),
                headers: headers
                    .iter()
                    .map(|(n, v)| (HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap()))
                    .collect(),
                body: StoredBody::Bytes(Bytes::from(body)),
            };
            prop_assert_eq!(StoredResponse::decode(r.encode().into()).unwrap(), r);
        }
    }
}
