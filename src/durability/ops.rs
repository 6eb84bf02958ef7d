//! What a shard logs: one record per shard per batch, a sequence of
//! operations in the order the shard applied them.
//!
//! ```text
//! record body:  u64 base time | op*
//! op:           varint(zigzag(Δt) << 3 | kind) | fields
//! ```
//!
//! `Δt` is the op's time minus the running time (the base, then each timed
//! op's time), so a batch at one clock reading costs one byte of header per
//! op. An op whose `Δt` does not fit is preceded by `SET_TIME` (the time in
//! full). Fingerprints are 16 bytes, other integers fixed little-endian
//! except lengths (varints).
//!
//! | kind | op | fields | replay |
//! |---|---|---|---|
//! | 0 | accept (a check answered `New`) | fingerprint | advance to `t`, record `t` |
//! | 1 | acquire | fingerprint, token, until, payload | advance, lease held from `t` |
//! | 2 | commit | fingerprint, token, acquired at, payload, result | advance, lease gone, record at the acquisition with its body |
//! | 3 | release | fingerprint, token | that token's lease gone |
//! | 4 | extend | fingerprint, token, until | that token's lease until `until` |
//! | 5 | forget | fingerprint | lease and record gone |
//! | 7 | set time | u64 | the running time |

use crate::claims::PayloadFingerprint;
use crate::fingerprint::Fingerprint;

const ACCEPT: u8 = 0;
const ACQUIRE: u8 = 1;
const COMMIT: u8 = 2;
const RELEASE: u8 = 3;
const EXTEND: u8 = 4;
const FORGET: u8 = 5;
const SET_TIME: u8 = 7;

/// Largest `|Δt|` an op header carries (zigzag, then 3 bits of kind, in 64
/// bits).
const MAX_DELTA: u64 = 1 << 59;

/// Largest result a commit op may carry (the engine's cap is far below).
pub(crate) const MAX_RESULT: usize = 1 << 30;

/// One shard's operations since its last record was sealed.
#[derive(Debug, Default)]
pub(crate) struct ShardLog {
    /// The open record's ops.
    buf: Vec<u8>,
    /// The open record's base time.
    base: u64,
    /// The time the next op's `Δt` is taken from.
    time: u64,
    /// Every record this shard sealed has a sequence number below this:
    /// what anything answered from this shard waits for.
    pub(crate) need: u64,
}

impl ShardLog {
    /// True when no op waits to be sealed.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The open record (base time, ops), to be sealed; then empty.
    pub(crate) fn ops(&self) -> (u64, &[u8]) {
        (self.base, &self.buf)
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
    }

    /// Starts an op of `kind` at time `t` (`None`: the op keeps the time).
    #[inline(always)]
    fn head(&mut self, kind: u8, t: Option<u64>) {
        if self.buf.is_empty() {
            self.base = t.unwrap_or(self.time);
            self.time = self.base;
        }
        let t = t.unwrap_or(self.time);
        let dt = t.wrapping_sub(self.time) as i64;
        if dt.unsigned_abs() >= MAX_DELTA {
            put_varint(&mut self.buf, u64::from(SET_TIME));
            self.buf.extend_from_slice(&t.to_le_bytes());
            self.time = t;
            put_varint(&mut self.buf, u64::from(kind));
        } else {
            put_varint(&mut self.buf, (zigzag(dt) << 3) | u64::from(kind));
            self.time = t;
        }
    }

    /// A check answered `New` for `fp` at `t`.
    #[inline(always)]
    pub(crate) fn accept(&mut self, fp: Fingerprint, t: u64) {
        self.head(ACCEPT, Some(t));
        self.buf.extend_from_slice(&fp.to_bytes());
    }

    /// A claim acquired `fp` at engine time `t`.
    pub(crate) fn acquire(
        &mut self,
        fp: Fingerprint,
        t: u64,
        token: u64,
        until: u64,
        payload: Option<PayloadFingerprint>,
    ) {
        self.head(ACQUIRE, Some(t));
        self.buf.extend_from_slice(&fp.to_bytes());
        self.buf.extend_from_slice(&token.to_le_bytes());
        self.buf.extend_from_slice(&until.to_le_bytes());
        put_payload(&mut self.buf, payload);
    }

    /// Lease `token` of `fp` committed at engine time `t`.
    pub(crate) fn commit(
        &mut self,
        fp: Fingerprint,
        t: u64,
        token: u64,
        acquired_at: u64,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
    ) {
        self.head(COMMIT, Some(t));
        self.buf.extend_from_slice(&fp.to_bytes());
        self.buf.extend_from_slice(&token.to_le_bytes());
        self.buf.extend_from_slice(&acquired_at.to_le_bytes());
        put_payload(&mut self.buf, payload);
        put_varint(&mut self.buf, result.len() as u64);
        self.buf.extend_from_slice(result);
    }

    /// Lease `token` of `fp` released.
    pub(crate) fn release(&mut self, fp: Fingerprint, token: u64) {
        self.head(RELEASE, None);
        self.buf.extend_from_slice(&fp.to_bytes());
        self.buf.extend_from_slice(&token.to_le_bytes());
    }

    /// Lease `token` of `fp` extended until `until`.
    pub(crate) fn extend(&mut self, fp: Fingerprint, token: u64, until: u64) {
        self.head(EXTEND, None);
        self.buf.extend_from_slice(&fp.to_bytes());
        self.buf.extend_from_slice(&token.to_le_bytes());
        self.buf.extend_from_slice(&until.to_le_bytes());
    }

    /// Whatever was held or recorded for `fp` removed.
    pub(crate) fn forget(&mut self, fp: Fingerprint) {
        self.head(FORGET, None);
        self.buf.extend_from_slice(&fp.to_bytes());
    }
}

/// One decoded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    Accept {
        fp: Fingerprint,
        at: u64,
    },
    Acquire {
        fp: Fingerprint,
        at: u64,
        token: u64,
        until: u64,
        payload: Option<PayloadFingerprint>,
    },
    Commit {
        fp: Fingerprint,
        at: u64,
        token: u64,
        acquired_at: u64,
        payload: Option<PayloadFingerprint>,
        result: &'a [u8],
    },
    Release {
        fp: Fingerprint,
        token: u64,
    },
    Extend {
        fp: Fingerprint,
        token: u64,
        until: u64,
    },
    Forget {
        fp: Fingerprint,
    },
}

/// The ops of one record body, in order. A body that does not decode
/// (which its frame's checksum makes a bug or a foreign writer) ends in
/// `Err`.
pub(crate) struct Ops<'a> {
    rest: &'a [u8],
    time: u64,
}

impl<'a> Ops<'a> {
    pub(crate) fn new(body: &'a [u8]) -> Result<Self, &'static str> {
        let mut r = Reader(body);
        let base = r.u64()?;
        Ok(Ops {
            rest: r.0,
            time: base,
        })
    }

    fn next_op(&mut self) -> Result<Op<'a>, &'static str> {
        let mut r = Reader(self.rest);
        let mut head = r.varint()?;
        if head == u64::from(SET_TIME) {
            self.time = r.u64()?;
            head = r.varint()?;
            if head >= u64::from(SET_TIME) {
                return Err("op after a set time");
            }
        } else {
            let dt = unzigzag(head >> 3);
            self.time = self.time.wrapping_add(dt as u64);
        }
        let at = self.time;
        let op = match (head & 7) as u8 {
            ACCEPT => Op::Accept { fp: r.fp()?, at },
            ACQUIRE => Op::Acquire {
                fp: r.fp()?,
                at,
                token: r.u64()?,
                until: r.u64()?,
                payload: r.payload()?,
            },
            COMMIT => {
                let fp = r.fp()?;
                let token = r.u64()?;
                let acquired_at = r.u64()?;
                let payload = r.payload()?;
                let len = usize::try_from(r.varint()?).map_err(|_| "result length")?;
                if len > MAX_RESULT || len > r.0.len() {
                    return Err("result length");
                }
                let (result, rest) = r.0.split_at(len);
                r.0 = rest;
                Op::Commit {
                    fp,
                    at,
                    token,
                    acquired_at,
                    payload,
                    result,
                }
            }
            RELEASE => Op::Release {
                fp: r.fp()?,
                token: r.u64()?,
            },
            EXTEND => Op::Extend {
                fp: r.fp()?,
                token: r.u64()?,
                until: r.u64()?,
            },
            FORGET => Op::Forget { fp: r.fp()? },
            _ => return Err("op kind"),
        };
        self.rest = r.0;
        Ok(op)
    }
}

impl<'a> Iterator for Ops<'a> {
    type Item = Result<Op<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let op = self.next_op();
        if op.is_err() {
            self.rest = &[];
        }
        Some(op)
    }
}

/// A cursor over bytes that fails instead of panicking.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl Reader<'_> {
    pub(crate) fn take<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        if self.0.len() < N {
            return Err("truncated op");
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("N bytes"))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, &'static str> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    fn fp(&mut self) -> Result<Fingerprint, &'static str> {
        self.take::<16>().map(Fingerprint::from_bytes)
    }

    fn payload(&mut self) -> Result<Option<PayloadFingerprint>, &'static str> {
        match self.take::<1>()?[0] {
            0 => Ok(None),
            1 => Ok(Some(PayloadFingerprint(self.u64()?))),
            _ => Err("payload tag"),
        }
    }

    pub(crate) fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for i in 0..10 {
            let [b] = self.take::<1>()?;
            if i == 9 && b > 1 {
                return Err("varint overflow");
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint overflow")
    }
}

fn put_payload(buf: &mut Vec<u8>, payload: Option<PayloadFingerprint>) {
    match payload {
        None => buf.push(0),
        Some(p) => {
            buf.push(1);
            buf.extend_from_slice(&p.0.to_le_bytes());
        }
    }
}

#[inline(always)]
pub(crate) fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    if v < 0x80 {
        buf.push(v as u8);
        return;
    }
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

#[inline(always)]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_with_any_time_step() {
        let mut log = ShardLog::default();
        let times = [5u64, 5, 7, 3, u64::MAX, 0, 1 << 62, (1 << 62) + 1];
        for (i, &t) in times.iter().enumerate() {
            log.accept(Fingerprint(i as u128 * 0x1234_5678_9abc), t);
        }
        log.acquire(Fingerprint(9), 100, 77, 500, Some(PayloadFingerprint(3)));
        log.commit(Fingerprint(9), 101, 77, 100, None, b"result");
        log.release(Fingerprint(10), 78);
        log.extend(Fingerprint(11), 79, 900);
        log.forget(Fingerprint(12));
        let (base, ops) = log.ops();
        let mut body = base.to_le_bytes().to_vec();
        body.extend_from_slice(ops);
        let decoded: Vec<Op<'_>> = Ops::new(&body).unwrap().map(Result::unwrap).collect();
        for (i, &t) in times.iter().enumerate() {
            assert_eq!(
                decoded[i],
                Op::Accept {
                    fp: Fingerprint(i as u128 * 0x1234_5678_9abc),
                    at: t
                }
            );
        }
        let n = times.len();
        assert_eq!(
            decoded[n],
            Op::Acquire {
                fp: Fingerprint(9),
                at: 100,
                token: 77,
                until: 500,
                payload: Some(PayloadFingerprint(3))
            }
        );
        assert_eq!(
            decoded[n + 1],
            Op::Commit {
                fp: Fingerprint(9),
                at: 101,
                token: 77,
                acquired_at: 100,
                payload: None,
                result: b"result"
            }
        );
        assert_eq!(
            decoded[n + 2],
            Op::Release {
                fp: Fingerprint(10),
                token: 78
            }
        );
        assert_eq!(
            decoded[n + 3],
            Op::Extend {
                fp: Fingerprint(11),
                token: 79,
                until: 900
            }
        );
        assert_eq!(
            decoded[n + 4],
            Op::Forget {
                fp: Fingerprint(12)
            }
        );
        assert_eq!(decoded.len(), n + 5);
    }

    #[test]
    fn an_accept_at_one_reading_costs_seventeen_bytes() {
        let mut log = ShardLog::default();
        for i in 0..100u128 {
            log.accept(Fingerprint(i), 1_700_000_000_000_000_000);
        }
        assert_eq!(log.ops().1.len(), 1700);
    }

    #[test]
    fn garbage_never_panics() {
        let mut body = 0u64.to_le_bytes().to_vec();
        for b in 0..=255u8 {
            body.push(b);
            for op in Ops::new(&body).unwrap() {
                let _ = op;
            }
        }
    }
}
