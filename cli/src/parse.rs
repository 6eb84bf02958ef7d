//! The reader thread's work on a chunk: each record's fingerprint and time,
//! or why it is bad. NDJSON parsing is the costly part, so a large chunk is
//! cut into contiguous parts parsed on several threads and joined in order.

use std::ops::Range;

use tiered_dedup::{Fingerprint, Timestamp};

use crate::input::Chunk;
use crate::record::{BadKind, BadRecord, Extractor};

/// Fewest records worth a thread of their own.
const MIN_PART: usize = 2048;

/// A chunk of records and what was made of them.
#[derive(Default)]
pub struct Parsed {
    /// The records.
    pub chunk: Chunk,
    /// Fingerprints of the good records, in order (processing time).
    pub keys: Vec<Fingerprint>,
    /// Fingerprints and times of the good records, in order (event time).
    pub timed: Vec<(Fingerprint, Timestamp)>,
    /// Bad records by index, in order.
    pub bad: Vec<(usize, BadRecord)>,
    /// Bytes read from all inputs once this chunk was read.
    pub bytes_read: u64,
}

/// The results for a run of records.
#[derive(Default)]
struct Part {
    keys: Vec<Fingerprint>,
    timed: Vec<(Fingerprint, Timestamp)>,
    bad: Vec<(usize, BadRecord)>,
}

impl Parsed {
    /// Fills `keys`, `timed` and `bad` from `chunk`, on up to `threads`
    /// threads.
    pub fn parse(&mut self, extractor: &Extractor, threads: usize) {
        let Parsed {
            chunk,
            keys,
            timed,
            bad,
            ..
        } = self;
        keys.clear();
        timed.clear();
        bad.clear();
        if let Some(&(at, len)) = chunk.too_long.first() {
            // Only a chunk's first record can span reads, so only it can be
            // too long; its bytes were not kept.
            debug_assert!(at == 0 && chunk.too_long.len() == 1);
            bad.push((
                at,
                BadRecord::new(
                    BadKind::TooLong,
                    format!(
                        "the record is longer than --max-record-bytes ({len} bytes of it read); \
                         its bytes were dropped, not kept"
                    ),
                ),
            ));
        }
        let skip = bad.len();
        if let Extractor::Lines { namespace } = extractor {
            // Hashing a line is cheaper than handing it to a thread.
            let mut start = if skip == 1 { chunk.ends[0] + 1 } else { 0 };
            keys.extend(chunk.ends[skip..].iter().map(|&end| {
                let fp = namespace.fingerprint(&chunk.data[start..end]);
                start = end + 1;
                fp
            }));
            return;
        }
        let n = chunk.len();
        let parts = threads.min(n / MIN_PART).max(1);
        if parts == 1 {
            parse_range(extractor, chunk, skip..n, keys, timed, bad);
            return;
        }
        let mut bounds: Vec<usize> = (0..=parts).map(|p| p * n / parts).collect();
        bounds[0] = bounds[0].max(skip);
        let chunk = &*chunk;
        let mut rest: Vec<Part> = (1..parts).map(|_| Part::default()).collect();
        std::thread::scope(|scope| {
            for (p, part) in rest.iter_mut().enumerate() {
                let range = bounds[p + 1]..bounds[p + 2];
                scope.spawn(move || {
                    parse_range(
                        extractor,
                        chunk,
                        range,
                        &mut part.keys,
                        &mut part.timed,
                        &mut part.bad,
                    );
                });
            }
            parse_range(extractor, chunk, bounds[0]..bounds[1], keys, timed, bad);
        });
        for part in rest {
            keys.extend_from_slice(&part.keys);
            timed.extend_from_slice(&part.timed);
            bad.extend(part.bad);
        }
    }
}

fn parse_range(
    extractor: &Extractor,
    chunk: &Chunk,
    range: Range<usize>,
    keys: &mut Vec<Fingerprint>,
    timed: &mut Vec<(Fingerprint, Timestamp)>,
    bad: &mut Vec<(usize, BadRecord)>,
) {
    for i in range {
        match extractor.extract(chunk.record(i).0) {
            Ok(j) => match j.time {
                Some(t) => timed.push((j.fingerprint, t)),
                None => keys.push(j.fingerprint),
            },
            Err(b) => bad.push((i, b)),
        }
    }
}
