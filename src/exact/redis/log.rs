//! Shared keys as a log: the operations of every engine sharing a shard
//! are appended, a batch at a time, to one Redis stream per shard, whose
//! order decides; each engine replays the stream into a replica of the
//! shard's state and answers its own operations from it.
//!
//! An operation's effect depends only on the state before it and on the
//! operation (its time, its lease clock reading, the writer's window), so
//! every replica that applied the same prefix of the stream holds the same
//! state and gives an operation the same answer: the stream's order is the
//! atomicity. Redis does no work per key beyond storing the bytes (`XADD`)
//! and sending them to the other engines (`XRANGE`); the lookups are the
//! engines', in their own memory.
//!
//! On a single server one request reads the log from where the replica
//! stopped, then appends (a `MULTI`/`EXEC` transaction): the read returns
//! the other engines' entries, and when the appended entries' sequence
//! numbers follow the last one read without a gap, the writer applies its
//! own entries as it sent them (with the header as readers decode it,
//! [`Header::as_read`]), not read back. With a gap it reads on, its own entries included. On a
//! cluster one script appends, then reads.
//!
//! **Entry** (one `XADD` field `o`, little-endian): magic `0x54`, version
//! 1, writer (u64, random per partition), batch (u64, the writer's
//! sequence), window (u64 nanoseconds, `u64::MAX` for none), lease clock
//! `now` of its checks and claims (u64), operation count (u32); then the
//! operations, each a kind byte and its fields:
//!
//! | kind | fields | bytes |
//! |---|---|---|
//! | 1 check | fingerprint, time | 25 |
//! | 2 claim | fingerprint, time, until, payload tag (u8) and value (u64) | 42 |
//! | 3 commit | fingerprint, token, now, body (u8: the result is in the body hash) | 34 |
//! | 4 release | fingerprint, token, now | 33 |
//! | 5 extend | fingerprint, token, now, until | 41 |
//! | 6 forget | fingerprint | 17 |
//! | 7 re-anchor | fingerprint, from, to | 33 |
//!
//! Entry ids are `0-<seq>` (`XADD … 0-*`: the sequence counts entries),
//! and the fencing token of the `i`-th operation of entry `seq` is
//! `seq << 16 | i`: strictly increasing per shard, so per key, across
//! engines.

use crate::claims::PayloadFingerprint;
use crate::exact::table::FingerprintTable;
use crate::exact::SharedOp;
use crate::fingerprint::{Fingerprint, FingerprintMap};

pub(super) const MAGIC: u8 = 0x54;
pub(super) const VERSION: u8 = 1;
/// Bytes of an entry's header.
pub(super) const HEADER: usize = 2 + 8 + 8 + 8 + 8 + 4;
/// A snapshot part's first byte (see [`Replica::snapshot`]): a replica
/// starts from the latest snapshot and the entries after its position
/// (the log is trimmed behind snapshots: replaying a suffix alone would
/// judge its checks without the records they met).
pub(super) const SNAPSHOT_MAGIC: u8 = 0x53;
/// Bytes of a snapshot part's header: magic, version, position (u64),
/// newest record time (u64), newest lease clock (u64), records (u32).
const SNAPSHOT_HEADER: usize = 2 + 8 + 8 + 8 + 4;

/// Operations one entry holds at most (the token's low bits).
pub(super) const MAX_OPS: usize = 1 << TOKEN_SHIFT;
const TOKEN_SHIFT: u32 = 16;

const CHECK: u8 = 1;
const CLAIM: u8 = 2;
const COMMIT: u8 = 3;
const RELEASE: u8 = 4;
const EXTEND: u8 = 5;
const FORGET: u8 = 6;
const REANCHOR: u8 = 7;

/// `window` as an entry stores it.
fn window_code(window: Option<u64>) -> u64 {
    window.unwrap_or(u64::MAX)
}

/// The token of operation `index` of entry `seq`.
pub(super) fn token(seq: u64, index: usize) -> u64 {
    (seq << TOKEN_SHIFT) | index as u64
}

/// One operation as the log carries it: a [`SharedOp`] (its result goes to
/// the body hash, the log only says there is one), or a re-anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LogOp {
    Check {
        fp: Fingerprint,
        at: u64,
    },
    Claim {
        fp: Fingerprint,
        at: u64,
        until: u64,
        payload: Option<PayloadFingerprint>,
    },
    Commit {
        fp: Fingerprint,
        token: u64,
        now: u64,
        body: bool,
    },
    Release {
        fp: Fingerprint,
        token: u64,
        now: u64,
    },
    Extend {
        fp: Fingerprint,
        token: u64,
        now: u64,
        until: u64,
    },
    Forget {
        fp: Fingerprint,
    },
    /// A check of ours whose answer was lost recorded the key at `from`;
    /// its retry was answered new at `to`: the window starts at `to`.
    Reanchor {
        fp: Fingerprint,
        from: u64,
        to: u64,
    },
}

impl LogOp {
    /// The log form of `op`; `now` is the lease clock of checks and claims
    /// (the entry's), returned apart.
    pub(super) fn of(op: &SharedOp<'_>) -> (LogOp, Option<u64>) {
        match *op {
            SharedOp::Check {
                fingerprint,
                at,
                now,
            } => (
                LogOp::Check {
                    fp: fingerprint,
                    at: at.as_nanos(),
                },
                Some(now),
            ),
            SharedOp::Claim {
                fingerprint,
                at,
                now,
                until,
                payload,
            } => (
                LogOp::Claim {
                    fp: fingerprint,
                    at: at.as_nanos(),
                    until,
                    payload,
                },
                Some(now),
            ),
            SharedOp::Commit {
                fingerprint,
                token,
                now,
                result,
            } => (
                LogOp::Commit {
                    fp: fingerprint,
                    token,
                    now,
                    body: !result.is_empty(),
                },
                None,
            ),
            SharedOp::Release {
                fingerprint,
                token,
                now,
            } => (
                LogOp::Release {
                    fp: fingerprint,
                    token,
                    now,
                },
                None,
            ),
            SharedOp::Extend {
                fingerprint,
                token,
                now,
                until,
            } => (
                LogOp::Extend {
                    fp: fingerprint,
                    token,
                    now,
                    until,
                },
                None,
            ),
            SharedOp::Forget { fingerprint } => (LogOp::Forget { fp: fingerprint }, None),
        }
    }

    pub(super) fn fingerprint(&self) -> Fingerprint {
        match *self {
            LogOp::Check { fp, .. }
            | LogOp::Claim { fp, .. }
            | LogOp::Commit { fp, .. }
            | LogOp::Release { fp, .. }
            | LogOp::Extend { fp, .. }
            | LogOp::Forget { fp }
            | LogOp::Reanchor { fp, .. } => fp,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let fp = |out: &mut Vec<u8>, fp: Fingerprint| out.extend_from_slice(&fp.to_bytes());
        let u = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
        match *self {
            LogOp::Check { fp: f, at } => {
                out.push(CHECK);
                fp(out, f);
                u(out, at);
            }
            LogOp::Claim {
                fp: f,
                at,
                until,
                payload,
            } => {
                out.push(CLAIM);
                fp(out, f);
                u(out, at);
                u(out, until);
                out.push(u8::from(payload.is_some()));
                u(out, payload.map_or(0, |p| p.0));
            }
            LogOp::Commit {
                fp: f,
                token,
                now,
                body,
            } => {
                out.push(COMMIT);
                fp(out, f);
                u(out, token);
                u(out, now);
                out.push(u8::from(body));
            }
            LogOp::Release { fp: f, token, now } => {
                out.push(RELEASE);
                fp(out, f);
                u(out, token);
                u(out, now);
            }
            LogOp::Extend {
                fp: f,
                token,
                now,
                until,
            } => {
                out.push(EXTEND);
                fp(out, f);
                u(out, token);
                u(out, now);
                u(out, until);
            }
            LogOp::Forget { fp: f } => {
                out.push(FORGET);
                fp(out, f);
            }
            LogOp::Reanchor { fp: f, from, to } => {
                out.push(REANCHOR);
                fp(out, f);
                u(out, from);
                u(out, to);
            }
        }
    }
}

/// Who wrote an entry and how its operations are to be judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) writer: u64,
    pub(super) batch: u64,
    pub(super) window: Option<u64>,
    /// The lease clock of the entry's checks and claims.
    pub(super) now: u64,
}

impl Header {
    /// The header as every reader decodes it from the log (a window of
    /// `u64::MAX` reads as none): what the writer applies its own entry
    /// with, so that its replica and every other one judge alike.
    pub(super) fn as_read(&self) -> Header {
        Header {
            window: self.window.filter(|&w| w != u64::MAX),
            ..*self
        }
    }
}

/// Encodes one entry.
pub(super) fn encode_entry(header: &Header, ops: &[LogOp], out: &mut Vec<u8>) {
    debug_assert!(ops.len() <= MAX_OPS);
    out.clear();
    out.reserve(HEADER + ops.len() * 42);
    out.push(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&header.writer.to_le_bytes());
    out.extend_from_slice(&header.batch.to_le_bytes());
    out.extend_from_slice(&window_code(header.window).to_le_bytes());
    out.extend_from_slice(&header.now.to_le_bytes());
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        op.encode(out);
    }
}

/// Reads an entry: its header and operations, or what is wrong with it.
pub(super) fn decode_entry(bytes: &[u8], ops: &mut Vec<LogOp>) -> Result<Header, String> {
    ops.clear();
    let mut r = Reader { bytes, at: 0 };
    let magic = r.u8()?;
    let version = r.u8()?;
    if magic != MAGIC || version != VERSION {
        return Err(format!(
            "a log entry of another format (magic {magic:#x}, version {version})"
        ));
    }
    let writer = r.u64()?;
    let batch = r.u64()?;
    let window = match r.u64()? {
        u64::MAX => None,
        w => Some(w),
    };
    let now = r.u64()?;
    let count = r.u32()? as usize;
    if count > MAX_OPS {
        return Err(format!("a log entry of {count} operations"));
    }
    ops.reserve(count);
    for _ in 0..count {
        let op = match r.u8()? {
            CHECK => LogOp::Check {
                fp: r.fp()?,
                at: r.u64()?,
            },
            CLAIM => LogOp::Claim {
                fp: r.fp()?,
                at: r.u64()?,
                until: r.u64()?,
                payload: {
                    let tag = r.u8()?;
                    let value = r.u64()?;
                    (tag != 0).then_some(PayloadFingerprint(value))
                },
            },
            COMMIT => LogOp::Commit {
                fp: r.fp()?,
                token: r.u64()?,
                now: r.u64()?,
                body: r.u8()? != 0,
            },
            RELEASE => LogOp::Release {
                fp: r.fp()?,
                token: r.u64()?,
                now: r.u64()?,
            },
            EXTEND => LogOp::Extend {
                fp: r.fp()?,
                token: r.u64()?,
                now: r.u64()?,
                until: r.u64()?,
            },
            FORGET => LogOp::Forget { fp: r.fp()? },
            REANCHOR => LogOp::Reanchor {
                fp: r.fp()?,
                from: r.u64()?,
                to: r.u64()?,
            },
            other => return Err(format!("an operation of unknown kind {other}")),
        };
        ops.push(op);
    }
    if r.at != bytes.len() {
        return Err(format!(
            "{} bytes after the last operation",
            bytes.len() - r.at
        ));
    }
    Ok(Header {
        writer,
        batch,
        window,
        now,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let end = self.at + N;
        let b = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| format!("a log entry cut at byte {}", self.bytes.len()))?;
        self.at = end;
        Ok(b.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn fp(&mut self) -> Result<Fingerprint, String> {
        Ok(Fingerprint::from_bytes(self.take()?))
    }
}

/// What the replica answers to one operation (the store's answer, before
/// results are read from the body hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Acquired (a check: recorded) with this token.
    Acquired {
        token: u64,
    },
    InProgress {
        until: u64,
    },
    /// Committed within the window; `body` names its body-hash field
    /// (`token`) when the commit stored a result.
    Completed {
        first_seen: u64,
        payload: Option<PayloadFingerprint>,
        body: Option<u64>,
    },
    Conflict,
    Done,
    Lost,
    Forgotten(bool),
}

/// A key whose state is more than a time: a lease, or a claim committed by
/// a token (kept for an idempotent retry of its commit), with a payload
/// or a stored result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rich {
    Held {
        token: u64,
        at: u64,
        until: u64,
        payload: Option<PayloadFingerprint>,
    },
    Done {
        at: u64,
        token: u64,
        payload: Option<PayloadFingerprint>,
        body: bool,
    },
}

/// `at − t0 < window` (an out-of-order `at` before `t0` is inside).
#[inline]
fn inside(at: u64, t0: u64, window: Option<u64>) -> bool {
    window.is_none_or(|w| at.saturating_sub(t0) < w)
}

#[inline]
fn conflicts(stored: Option<PayloadFingerprint>, claimed: Option<PayloadFingerprint>) -> bool {
    matches!((stored, claimed), (Some(a), Some(b)) if a != b)
}

/// Buckets of the records table a sweep looks at per operation applied.
const SWEEP_PER_OP: usize = 8;

/// One shard's state, as the stream's prefix up to `last_seq` makes it.
pub(super) struct Replica {
    /// Keys recorded by checks: fingerprint → time.
    plain: FingerprintTable,
    /// Leases and committed claims.
    rich: FingerprintMap<Rich>,
    /// The last entry applied (0: none).
    pub(super) last_seq: u64,
    /// Retention: window plus lateness (`None`: keys never expire).
    span: Option<u64>,
    /// One slice: the margin kept past the span, for clocks that differ.
    slice: u64,
    /// The newest record time and lease clock reading applied.
    newest_at: u64,
    newest_now: u64,
    /// The slice of `newest_at` when the last sweep began, and where the
    /// running sweep of `plain` resumes (`None`: none running).
    swept_slice: u64,
    sweep: Option<usize>,
}

impl Replica {
    #[cfg(test)]
    pub(super) fn new(span: Option<u64>, slice: Option<u64>) -> Replica {
        Replica::with_capacity(span, slice, 0)
    }

    /// A replica whose records table has room for `expected` keys.
    pub(super) fn with_capacity(span: Option<u64>, slice: Option<u64>, expected: usize) -> Replica {
        Replica {
            plain: if expected > 0 {
                FingerprintTable::with_capacity(expected)
            } else {
                FingerprintTable::new()
            },
            rich: FingerprintMap::default(),
            last_seq: 0,
            span,
            slice: slice.unwrap_or(0),
            newest_at: 0,
            newest_now: 0,
            swept_slice: 0,
            sweep: None,
        }
    }

    /// Forgets everything (the stream was lost: rebuilt from what Redis
    /// holds now).
    pub(super) fn clear(&mut self) {
        self.plain.clear();
        self.rich.clear();
        self.last_seq = 0;
        self.newest_at = 0;
        self.newest_now = 0;
        self.swept_slice = 0;
        self.sweep = None;
    }

    /// The newest record time applied.
    pub(super) fn newest_at(&self) -> u64 {
        self.newest_at
    }

    pub(super) fn len(&self) -> u64 {
        (self.plain.len() + self.rich.len()) as u64
    }

    pub(super) fn bytes(&self) -> usize {
        self.plain.bytes() + self.rich.capacity() * (16 + std::mem::size_of::<Rich>() + 8)
    }

    /// Records older than this can no longer count for any operation (they
    /// are at least a span and a slice behind the newest record time).
    fn horizon(&self) -> Option<u64> {
        let span = self.span?;
        Some(
            self.newest_at
                .saturating_sub(span.saturating_add(self.slice)),
        )
    }

    /// Applies entry `seq` (its header and operations); `answer` receives
    /// each operation's outcome in order.
    pub(super) fn apply(
        &mut self,
        seq: u64,
        header: &Header,
        ops: &[LogOp],
        mut answer: impl FnMut(usize, Outcome),
    ) {
        for (i, op) in ops.iter().enumerate() {
            let outcome = self.apply_op(token(seq, i), header, op);
            answer(i, outcome);
        }
        self.last_seq = seq;
        self.newest_now = self.newest_now.max(header.now);
        self.upkeep(ops.len());
    }

    fn apply_op(&mut self, token: u64, header: &Header, op: &LogOp) -> Outcome {
        let window = header.window;
        match *op {
            LogOp::Check { fp, at } => {
                self.newest_at = self.newest_at.max(at);
                match self.live(fp, at, header.now, window) {
                    Some(Rich::Held { until, .. }) => Outcome::InProgress { until },
                    Some(Rich::Done {
                        at: t0,
                        token,
                        payload,
                        body,
                    }) => Outcome::Completed {
                        first_seen: t0,
                        payload,
                        body: body.then_some(token),
                    },
                    None => {
                        self.rich.remove(&fp);
                        self.plain.insert(fp, at);
                        Outcome::Acquired { token }
                    }
                }
            }
            LogOp::Claim {
                fp,
                at,
                until,
                payload,
            } => {
                self.newest_at = self.newest_at.max(at);
                match self.live(fp, at, header.now, window) {
                    Some(Rich::Held {
                        until: held_until,
                        payload: held,
                        ..
                    }) => {
                        if conflicts(held, payload) {
                            Outcome::Conflict
                        } else {
                            Outcome::InProgress { until: held_until }
                        }
                    }
                    Some(Rich::Done {
                        at: t0,
                        token,
                        payload: stored,
                        body,
                    }) => {
                        if conflicts(stored, payload) {
                            Outcome::Conflict
                        } else {
                            Outcome::Completed {
                                first_seen: t0,
                                payload: stored,
                                body: body.then_some(token),
                            }
                        }
                    }
                    None => {
                        if self.plain.len() > 0 {
                            self.plain.remove(fp);
                        }
                        self.rich.insert(
                            fp,
                            Rich::Held {
                                token,
                                at,
                                until,
                                payload,
                            },
                        );
                        Outcome::Acquired { token }
                    }
                }
            }
            LogOp::Commit {
                fp,
                token: t,
                now,
                body,
            } => match self.rich.get_mut(&fp) {
                Some(held) => match *held {
                    Rich::Held {
                        token,
                        at,
                        until,
                        payload,
                    } if token == t && now < until => {
                        // In place: one probe.
                        *held = Rich::Done {
                            at,
                            token,
                            payload,
                            body,
                        };
                        Outcome::Done
                    }
                    // A retry of a commit that was applied (its answer lost).
                    Rich::Done { token, .. } if token == t => Outcome::Done,
                    _ => Outcome::Lost,
                },
                None => Outcome::Lost,
            },
            LogOp::Release { fp, token: t, now } => match self.rich.get(&fp) {
                Some(&Rich::Held { token, until, .. }) if token == t && now < until => {
                    self.rich.remove(&fp);
                    Outcome::Done
                }
                _ => Outcome::Lost,
            },
            LogOp::Extend {
                fp,
                token: t,
                now,
                until: new_until,
            } => match self.rich.get_mut(&fp) {
                Some(Rich::Held { token, until, .. }) if *token == t && now < *until => {
                    *until = new_until;
                    Outcome::Done
                }
                _ => Outcome::Lost,
            },
            LogOp::Forget { fp } => {
                let rich = self.rich.remove(&fp).is_some();
                let plain = self.plain.remove(fp);
                Outcome::Forgotten(rich || plain)
            }
            LogOp::Reanchor { fp, from, to } => {
                if self.plain.get(fp) == Some(from) {
                    self.plain.insert(fp, to);
                }
                if let Some(Rich::Done { at, .. }) = self.rich.get_mut(&fp) {
                    if *at == from {
                        *at = to;
                    }
                }
                Outcome::Done
            }
        }
    }

    /// The state that counts for an operation at `at` (record time) and
    /// `now` (lease clock): a live lease, or a record within the window
    /// (plain records answer as `Done` without token or body). An expired
    /// lease is dropped here.
    fn live(&mut self, fp: Fingerprint, at: u64, now: u64, window: Option<u64>) -> Option<Rich> {
        match self.rich.get(&fp).copied() {
            Some(held @ Rich::Held { until, .. }) => {
                if now < until {
                    return Some(held);
                }
                self.rich.remove(&fp);
                None
            }
            Some(done @ Rich::Done { at: t0, .. }) => inside(at, t0, window).then_some(done),
            // An engine that only claims records nothing plain: no probe
            // of a table that cannot hold the key.
            None if self.plain.len() == 0 => None,
            None => self
                .plain
                .get(fp)
                .filter(|&t0| inside(at, t0, window))
                .map(|t0| Rich::Done {
                    at: t0,
                    token: 0,
                    payload: None,
                    body: false,
                }),
        }
    }

    /// Drops what can no longer count: a sweep of the records table runs
    /// after each slice of record time, a few buckets per operation
    /// applied; leases expired a slice ago and claims older than the
    /// horizon go with it.
    fn upkeep(&mut self, ops: usize) {
        let Some(horizon) = self.horizon() else {
            return;
        };
        if let Some(slice) = self.newest_at.checked_div(self.slice) {
            if slice > self.swept_slice && self.sweep.is_none() {
                self.swept_slice = slice;
                self.sweep = Some(0);
                let expired_before = self.newest_now.saturating_sub(self.slice);
                self.rich.retain(|_, r| match *r {
                    Rich::Held { at, until, .. } => at > horizon || until > expired_before,
                    Rich::Done { at, .. } => at > horizon,
                });
            }
        }
        if let Some(cursor) = self.sweep {
            let (next, _) = self.plain.sweep(cursor, ops.max(1) * SWEEP_PER_OP, horizon);
            self.sweep = next;
        }
    }

    /// The state as snapshot parts of at most about `part_bytes` each
    /// (see [`SNAPSHOT_MAGIC`]), as of the last entry applied.
    pub(super) fn snapshot(&self, part_bytes: usize) -> Vec<Vec<u8>> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut count = 0u32;
        let mut part = Vec::new();
        let start = |part: &mut Vec<u8>| {
            part.clear();
            part.push(SNAPSHOT_MAGIC);
            part.push(VERSION);
            part.extend_from_slice(&self.last_seq.to_le_bytes());
            part.extend_from_slice(&self.newest_at.to_le_bytes());
            part.extend_from_slice(&self.newest_now.to_le_bytes());
            part.extend_from_slice(&0u32.to_le_bytes());
        };
        let finish = |part: &mut Vec<u8>, count: &mut u32, parts: &mut Vec<Vec<u8>>| {
            part[SNAPSHOT_HEADER - 4..SNAPSHOT_HEADER].copy_from_slice(&count.to_le_bytes());
            parts.push(std::mem::take(part));
            *count = 0;
        };
        start(&mut part);
        let u = |part: &mut Vec<u8>, v: u64| part.extend_from_slice(&v.to_le_bytes());
        let payload = |part: &mut Vec<u8>, p: Option<PayloadFingerprint>| {
            part.push(u8::from(p.is_some()));
            part.extend_from_slice(&p.map_or(0, |p| p.0).to_le_bytes());
        };
        let rich = self.rich.iter().map(|(fp, r)| (*fp, Some(*r)));
        let plain = self.plain.iter().map(|(fp, _)| (fp, None));
        for (fp, r) in rich.chain(plain) {
            if part.len() >= part_bytes {
                finish(&mut part, &mut count, &mut parts);
                start(&mut part);
            }
            match r {
                None => {
                    part.push(1);
                    part.extend_from_slice(&fp.to_bytes());
                    u(&mut part, self.plain.get(fp).expect("iterated"));
                }
                Some(Rich::Held {
                    token,
                    at,
                    until,
                    payload: p,
                }) => {
                    part.push(2);
                    part.extend_from_slice(&fp.to_bytes());
                    u(&mut part, token);
                    u(&mut part, at);
                    u(&mut part, until);
                    payload(&mut part, p);
                }
                Some(Rich::Done {
                    at,
                    token,
                    payload: p,
                    body,
                }) => {
                    part.push(3);
                    part.extend_from_slice(&fp.to_bytes());
                    u(&mut part, at);
                    u(&mut part, token);
                    payload(&mut part, p);
                    part.push(u8::from(body));
                }
            }
            count += 1;
        }
        finish(&mut part, &mut count, &mut parts);
        parts
    }

    /// Adds one snapshot part to this (cleared) replica: its records, and
    /// the position and times it was taken at. Returns the position.
    pub(super) fn load_part(&mut self, bytes: &[u8]) -> Result<u64, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.u8()? != SNAPSHOT_MAGIC || r.u8()? != VERSION {
            return Err("a snapshot part of another format".into());
        }
        let as_of = r.u64()?;
        self.newest_at = self.newest_at.max(r.u64()?);
        self.newest_now = self.newest_now.max(r.u64()?);
        let count = r.u32()?;
        let payload = |r: &mut Reader<'_>| -> Result<Option<PayloadFingerprint>, String> {
            let tag = r.u8()?;
            let value = r.u64()?;
            Ok((tag != 0).then_some(PayloadFingerprint(value)))
        };
        for _ in 0..count {
            match r.u8()? {
                1 => {
                    let fp = r.fp()?;
                    let at = r.u64()?;
                    self.plain.insert(fp, at);
                }
                2 => {
                    let fp = r.fp()?;
                    let held = Rich::Held {
                        token: r.u64()?,
                        at: r.u64()?,
                        until: r.u64()?,
                        payload: payload(&mut r)?,
                    };
                    self.rich.insert(fp, held);
                }
                3 => {
                    let fp = r.fp()?;
                    let done = Rich::Done {
                        at: r.u64()?,
                        token: r.u64()?,
                        payload: payload(&mut r)?,
                        body: r.u8()? != 0,
                    };
                    self.rich.insert(fp, done);
                }
                other => return Err(format!("a snapshot record of unknown kind {other}")),
            }
        }
        if r.at != bytes.len() {
            return Err("bytes after a snapshot part's last record".into());
        }
        self.last_seq = as_of;
        self.swept_slice = self.newest_at.checked_div(self.slice).unwrap_or(0);
        Ok(as_of)
    }

    /// The lease `token` of `fp` if it still holds it (not expired by the
    /// newest lease clock reading applied): its acquisition time.
    pub(super) fn held_at(&self, fp: Fingerprint, token: u64) -> Option<u64> {
        match self.rich.get(&fp)? {
            Rich::Held { token: t, at, .. } if *t == token => Some(*at),
            _ => None,
        }
    }

    /// What a check at `at` (lease clock `now`) would answer now, without
    /// recording anything: for decisions made without Redis.
    pub(super) fn peek(
        &mut self,
        fp: Fingerprint,
        at: u64,
        now: u64,
        window: Option<u64>,
    ) -> Option<Outcome> {
        match self.live(fp, at, now, window)? {
            Rich::Held { until, .. } => Some(Outcome::InProgress { until }),
            Rich::Done { at: t0, .. } => Some(Outcome::Completed {
                first_seen: t0,
                payload: None,
                body: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(now: u64) -> Header {
        Header {
            writer: 7,
            batch: 1,
            window: Some(100),
            now,
        }
    }

    /// One operation of every kind.
    fn every_kind_of_op() -> Vec<LogOp> {
        vec![
            LogOp::Check {
                fp: Fingerprint(1),
                at: 5,
            },
            LogOp::Claim {
                fp: Fingerprint(u128::MAX),
                at: 6,
                until: 9,
                payload: Some(PayloadFingerprint(3)),
            },
            LogOp::Commit {
                fp: Fingerprint(2),
                token: 11,
                now: 12,
                body: true,
            },
            LogOp::Release {
                fp: Fingerprint(2),
                token: 1,
                now: 2,
            },
            LogOp::Extend {
                fp: Fingerprint(2),
                token: 1,
                now: 2,
                until: 3,
            },
            LogOp::Forget { fp: Fingerprint(4) },
            LogOp::Reanchor {
                fp: Fingerprint(4),
                from: 1,
                to: 2,
            },
        ]
    }

    #[test]
    fn entries_round_trip() {
        let ops = every_kind_of_op();
        let h = Header {
            writer: 1,
            batch: 2,
            window: None,
            now: 3,
        };
        let mut bytes = Vec::new();
        encode_entry(&h, &ops, &mut bytes);
        assert_eq!(bytes.len(), HEADER + 25 + 42 + 34 + 33 + 41 + 17 + 33);
        let mut back = Vec::new();
        assert_eq!(decode_entry(&bytes, &mut back).unwrap(), h);
        assert_eq!(back, ops);
        assert!(decode_entry(&bytes[..bytes.len() - 1], &mut back).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_entry(&longer, &mut back).is_err());
        // A writer applies its own entries as every reader decodes them.
        for window in [None, Some(0), Some(7), Some(u64::MAX)] {
            let h = Header { window, ..h };
            encode_entry(&h, &ops, &mut bytes);
            assert_eq!(decode_entry(&bytes, &mut back).unwrap(), h.as_read());
        }
    }

    #[test]
    fn the_replica_follows_the_state_machine() {
        let mut r = Replica::new(Some(100), Some(20));
        let fp = Fingerprint(9);
        let mut out = Vec::new();
        let mut run = |r: &mut Replica, seq: u64, now: u64, ops: &[LogOp]| {
            out.clear();
            r.apply(seq, &header(now), ops, |_, o| out.push(o));
            out.clone()
        };
        // Check: recorded, then a duplicate until the window has passed.
        assert_eq!(
            run(&mut r, 1, 0, &[LogOp::Check { fp, at: 10 }]),
            [Outcome::Acquired { token: token(1, 0) }]
        );
        assert_eq!(
            run(
                &mut r,
                2,
                0,
                &[LogOp::Check { fp, at: 109 }, LogOp::Check { fp, at: 110 }]
            ),
            [
                Outcome::Completed {
                    first_seen: 10,
                    payload: None,
                    body: None
                },
                Outcome::Acquired { token: token(2, 1) }
            ]
        );
        // A claim on another key: held, conflicting, lost after its lease.
        let k = Fingerprint(10);
        let p = Some(PayloadFingerprint(1));
        let claim = LogOp::Claim {
            fp: k,
            at: 120,
            until: 50,
            payload: p,
        };
        let t = token(3, 0);
        assert_eq!(
            run(&mut r, 3, 40, &[claim]),
            [Outcome::Acquired { token: t }]
        );
        let other = LogOp::Claim {
            fp: k,
            at: 121,
            until: 60,
            payload: Some(PayloadFingerprint(2)),
        };
        assert_eq!(run(&mut r, 4, 45, &[other]), [Outcome::Conflict]);
        let commit = |now| LogOp::Commit {
            fp: k,
            token: t,
            now,
            body: true,
        };
        assert_eq!(run(&mut r, 5, 0, &[commit(50)]), [Outcome::Lost]);
        assert_eq!(
            run(&mut r, 6, 0, &[commit(49), commit(49)]),
            [Outcome::Done, Outcome::Done],
            "a retried commit of the same lease is done"
        );
        assert_eq!(
            run(&mut r, 7, 70, &[claim]),
            [Outcome::Completed {
                first_seen: 120,
                payload: p,
                body: Some(t)
            }]
        );
        assert_eq!(
            run(&mut r, 8, 0, &[LogOp::Forget { fp: k }]),
            [Outcome::Forgotten(true)]
        );
        assert_eq!(
            run(&mut r, 9, 0, &[LogOp::Forget { fp: k }]),
            [Outcome::Forgotten(false)]
        );
    }

    #[test]
    fn old_records_are_swept_and_snapshots_round_trip() {
        let mut r = Replica::new(Some(100), Some(20));
        let h = header(0);
        for seq in 1..=50u64 {
            let ops: Vec<LogOp> = (0..10u128)
                .map(|i| LogOp::Check {
                    fp: Fingerprint(u128::from(seq) << 8 | i),
                    at: seq * 10,
                })
                .collect();
            r.apply(seq, &h, &ops, |_, _| {});
        }
        let claim = LogOp::Claim {
            fp: Fingerprint(7),
            at: 500,
            until: 90,
            payload: Some(PayloadFingerprint(4)),
        };
        r.apply(51, &header(10), &[claim], |_, _| {});
        // Newest record time 500: records at or before 500 − 120 are gone.
        for _ in 0..100 {
            r.upkeep(100);
        }
        assert!(r.plain.len() <= 13 * 10, "{} records kept", r.plain.len());
        assert!(r.plain.get(Fingerprint(50 << 8)).is_some());
        let parts = r.snapshot(64);
        assert!(parts.len() > 10, "{} parts", parts.len());
        let mut back = Replica::new(Some(100), Some(20));
        for p in &parts {
            assert_eq!(back.load_part(p), Ok(51));
        }
        assert_eq!(back.len(), r.len());
        assert_eq!(
            (back.newest_at, back.newest_now),
            (r.newest_at, r.newest_now)
        );
        // Both answer the next operations alike.
        let next = [
            LogOp::Check {
                fp: Fingerprint(50 << 8),
                at: 505,
            },
            claim,
        ];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        r.apply(52, &header(20), &next, |_, o| a.push(o));
        back.apply(52, &header(20), &next, |_, o| b.push(o));
        assert_eq!(a, b);
        assert!(matches!(a[1], Outcome::InProgress { until: 90 }));
        assert!(back.load_part(&parts[0][..parts[0].len() - 1]).is_err());
    }

    /// Entries and snapshot parts come from Redis, where anything may have
    /// written them: every truncation is refused, and every flipped byte
    /// is refused or read (a flipped value is a value) without a panic,
    /// and what is read applies without one.
    #[test]
    fn damaged_entries_and_snapshot_parts_are_refused_or_read_never_panicking() {
        let ops = every_kind_of_op();
        let mut entry = Vec::new();
        encode_entry(&header(3), &ops, &mut entry);
        let mut source = Replica::new(Some(100), Some(20));
        source.apply(1, &header(3), &ops[..3], |_, _| {});
        source.apply(
            2,
            &header(4),
            &[LogOp::Claim {
                fp: Fingerprint(9),
                at: 8,
                until: 50,
                payload: None,
            }],
            |_, _| {},
        );
        let parts = source.snapshot(1 << 20);
        assert_eq!(parts.len(), 1);
        let part = &parts[0];

        let mut decoded = Vec::new();
        for cut in 0..entry.len() {
            assert!(decode_entry(&entry[..cut], &mut decoded).is_err(), "{cut}");
        }
        for cut in 0..part.len() {
            let mut r = Replica::new(Some(100), Some(20));
            assert!(r.load_part(&part[..cut]).is_err(), "{cut}");
        }
        let mut read = 0;
        for i in 0..entry.len() {
            for flip in [0x01, 0x80, 0xFF] {
                let mut bytes = entry.clone();
                bytes[i] ^= flip;
                if let Ok(h) = decode_entry(&bytes, &mut decoded) {
                    read += 1;
                    let mut r = Replica::new(Some(100), Some(20));
                    r.apply(1, &h, &decoded, |_, _| {});
                    r.upkeep(decoded.len());
                }
            }
        }
        for i in 0..part.len() {
            for flip in [0x01, 0x80, 0xFF] {
                let mut bytes = part.clone();
                bytes[i] ^= flip;
                let mut r = Replica::new(Some(100), Some(20));
                if r.load_part(&bytes).is_ok() {
                    read += 1;
                    r.apply(3, &header(5), &ops, |_, _| {});
                    r.upkeep(ops.len());
                }
            }
        }
        // Most flips land in values: read, not refused.
        assert!(read > entry.len(), "{read} damaged copies read");
    }
}
