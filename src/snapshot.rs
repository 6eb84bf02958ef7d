//! Snapshots: the whole engine state (filter generations, exact memory tier,
//! clocks and counters) to a writer and back, so a restarted process keeps
//! its window.
//!
//! Layout (little-endian): magic `TDEDUPSN`, format version (u32), the
//! configuration it was taken with, every shard, then an xxh3-64 checksum of
//! all the bytes before it. A restore builds a complete new engine while it
//! reads and returns it only once the checksum matched: a truncated, corrupt
//! or foreign file is refused with an error, never half-loaded.
//!
//! Version 2 differs from 1 only where the exact tier keeps fingerprints
//! alone (an engine built with `first_seen_times(false)`): its entries are
//! written under tag 2, without slot or time. Version 3 adds, after each
//! shard's entries, its claims: the next fencing token, the live leases and
//! the bodies (payload fingerprint and result) of committed claims. A state
//! is written in the lowest version that holds it, so earlier builds read
//! states that use nothing newer.

use std::io::{self, Read, Write};

use xxhash_rust::xxh3::Xxh3;

use crate::claims::PayloadFingerprint;
use crate::engine::{Deduper, DeduperBuilder, Mode, ShardFilter};
use crate::error::{ConfigError, SnapshotError};
use crate::exact::{Partition, RecordBody};
use crate::filter::{BlockedBloom, GrowingBloom, Layer, OverflowLayer, WindowedFilter};
use crate::fingerprint::Fingerprint;
use crate::time::{Timestamp, GENERATIONS};

const MAGIC: &[u8; 8] = b"TDEDUPSN";
/// The newest format version this build writes and reads (it reads every
/// version from 1 on; see the module docs).
pub const FORMAT_VERSION: u32 = 3;
/// The version of a state whose exact tier keeps first-seen times.
const TIMED_VERSION: u32 = 1;
/// The version of a state whose exact tier keeps fingerprints alone.
const UNTIMED_VERSION: u32 = 2;
/// The first version with claims (leases, bodies, tokens).
const CLAIMS_VERSION: u32 = 3;
/// Largest result a snapshot may declare for one body (1 GiB).
const MAX_RESULT: u32 = 1 << 30;
/// Largest block count a snapshot may declare for one filter (1 TiB).
const MAX_BLOCKS: u64 = (1 << 40) / 64;
const NONE: u64 = u64::MAX;

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Xxh3,
}

impl<W: Write> HashingWriter<W> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.hasher.update(b);
        self.inner.write_all(b)
    }
    fn u8(&mut self, v: u8) -> io::Result<()> {
        self.bytes(&[v])
    }
    fn u32(&mut self, v: u32) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
}

struct HashingReader<R: Read> {
    inner: R,
    hasher: Xxh3,
}

impl<R: Read> HashingReader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                SnapshotError::Truncated
            } else {
                SnapshotError::Io(e)
            }
        })?;
        self.hasher.update(&buf);
        Ok(buf)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.bytes::<1>()?[0])
    }
    /// Appends `len` bytes to `out`, reading in pieces (a corrupt length
    /// ends in `Truncated`, not in one huge allocation).
    fn fill(&mut self, out: &mut Vec<u8>, len: usize) -> Result<(), SnapshotError> {
        let mut left = len;
        while left > 0 {
            let n = left.min(1 << 16);
            let start = out.len();
            out.resize(start + n, 0);
            self.inner.read_exact(&mut out[start..]).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    SnapshotError::Truncated
                } else {
                    SnapshotError::Io(e)
                }
            })?;
            self.hasher.update(&out[start..]);
            left -= n;
        }
        Ok(())
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
}

/// The configuration fields a snapshot must agree with to be restored.
fn header_fields(engine: &Deduper) -> [u64; 7] {
    let plan = engine.plan();
    [
        plan.namespace.seed(),
        plan.window.unwrap_or(NONE),
        plan.lateness,
        plan.slicing.map_or(NONE, |s| s.slice_nanos),
        u64::from(plan.mode == Mode::Probabilistic),
        plan.shards as u64,
        plan.sizing.num_blocks as u64 | (u64::from(plan.sizing.hashes) << 56),
    ]
}

/// One number for the configuration a snapshot or a log must agree with
/// (the xxh3-64 of the header fields).
pub(crate) fn config_id(engine: &Deduper) -> u64 {
    let bytes: Vec<u8> = header_fields(engine)
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

const HEADER_NAMES: [&str; 7] = [
    "namespace",
    "window",
    "allowed lateness",
    "slice duration",
    "mode",
    "shard count",
    "filter size (expected keys or false-positive rate)",
];

impl Deduper {
    /// Writes the whole engine state to `w`. Every shard is locked for the
    /// duration, so the snapshot is one consistent cut; checks wait.
    ///
    /// # Errors
    /// [`SnapshotError::Io`] when writing fails, and
    /// [`SnapshotError::Unsupported`] for an exact tier that keeps no local
    /// state.
    pub fn snapshot<W: Write>(&self, w: W) -> Result<(), SnapshotError> {
        let mut shards = self.lock_all();
        // Pending marks are part of the state: write them through first.
        // Only local tiers are snapshotted (a remote one is refused below),
        // and they store every mark at once.
        for shard in shards.iter_mut() {
            let _ = shard.sync_marks();
        }
        let untimed = shards
            .iter()
            .any(|s| s.exact.as_ref().is_some_and(|e| !e.keeps_times()));
        let claims = shards.iter().any(|s| {
            !s.leases.is_empty() || s.exact.as_ref().is_some_and(|e| !e.bodies().is_empty())
        });
        let version = if claims {
            CLAIMS_VERSION
        } else if untimed {
            UNTIMED_VERSION
        } else {
            TIMED_VERSION
        };
        let mut w =
            self.snapshot_head(w, version, self.watermark().as_nanos(), self.late_count())?;
        for shard in shards.iter() {
            w.shard(shard)?;
        }
        w.finish()?;
        crate::trace::event!(info, shards = shards.len(), "snapshot written");
        Ok(())
    }

    /// Starts a snapshot of format `version` with the given watermark and
    /// late count; the shards follow one by one ([`ShardWriter::shard`]),
    /// each under its own lock (a checkpoint's cut per shard).
    pub(crate) fn snapshot_head<W: Write>(
        &self,
        w: W,
        version: u32,
        watermark: u64,
        late: u64,
    ) -> io::Result<ShardWriter<W>> {
        let mut w = HashingWriter {
            inner: io::BufWriter::with_capacity(1 << 20, w),
            hasher: Xxh3::new(),
        };
        w.bytes(MAGIC)?;
        w.u32(version)?;
        for field in header_fields(self) {
            w.u64(field)?;
        }
        w.u64(watermark)?;
        w.u64(late)?;
        Ok(ShardWriter {
            w,
            version,
            exact_name: self.plan().exact_name,
        })
    }
}

/// A snapshot being written shard by shard (see [`Deduper::snapshot_head`]).
pub(crate) struct ShardWriter<W: Write> {
    w: HashingWriter<io::BufWriter<W>>,
    version: u32,
    exact_name: &'static str,
}

impl<W: Write> ShardWriter<W> {
    /// Writes the next shard.
    pub(crate) fn shard(&mut self, shard: &crate::engine::Shard) -> Result<(), SnapshotError> {
        write_shard(&mut self.w, shard, self.version, self.exact_name)
    }

    /// The next shard's bytes, to [`ShardWriter::append`] later (a
    /// checkpoint serializes a shard under its lock and writes it after).
    pub(crate) fn serialize(&self, shard: &crate::engine::Shard) -> Result<Vec<u8>, SnapshotError> {
        let mut w = HashingWriter {
            inner: Vec::new(),
            hasher: Xxh3::new(),
        };
        write_shard(&mut w, shard, self.version, self.exact_name)?;
        Ok(w.inner)
    }

    /// Appends a shard [`ShardWriter::serialize`]d.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.bytes(bytes)
    }

    /// Writes the checksum and flushes; the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        let checksum = self.w.hasher.digest();
        self.w.inner.write_all(&checksum.to_le_bytes())?;
        self.w
            .inner
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
    }
}

/// Entries are gathered into pieces this large before they are hashed and
/// written (a call per entry field cost more than the rest of a snapshot).
const ENTRY_PIECE: usize = 64 << 10;

/// One shard's section of a snapshot of `version`.
fn write_shard<W: Write>(
    w: &mut HashingWriter<W>,
    shard: &crate::engine::Shard,
    version: u32,
    exact_name: &'static str,
) -> Result<(), SnapshotError> {
    w.u64(shard.time)?;
    for n in counters_to_array(&shard.counters) {
        w.u64(n)?;
    }
    match &shard.filter {
        ShardFilter::Windowed(f) => {
            w.u8(1)?;
            w.u64(f.base.current_slice().unwrap_or(NONE))?;
            for n in f.inserts {
                w.u64(n)?;
            }
            write_words(w, f.base.bloom())?;
            w.u32(f.overflow.len() as u32)?;
            for layer in &f.overflow {
                w.u64(layer.bloom.num_blocks() as u64)?;
                w.u64(layer.capacity)?;
                for n in layer.inserts {
                    w.u64(n)?;
                }
                write_words(w, &layer.bloom)?;
            }
        }
        ShardFilter::Unbounded(g) => {
            w.u8(2)?;
            w.u32(g.layers().len() as u32)?;
            for layer in g.layers() {
                w.u64(layer.bloom.num_blocks() as u64)?;
                w.u32(layer.bloom.hashes())?;
                w.u64(layer.stage_capacity)?;
                write_words(w, &layer.bloom)?;
            }
            let (stage, len) = g.stage();
            w.u32(stage as u32)?;
            w.u64(len)?;
        }
        // No filter: the exact tier below is the whole state.
        ShardFilter::Direct => w.u8(3)?,
    }
    match &shard.exact {
        None => w.u8(0)?,
        Some(exact) => {
            let timed = exact.keeps_times();
            // The memory tier hands its entries over one by one;
            // another backend lists them.
            let listed = match exact {
                Partition::Memory(_) => None,
                Partition::Other(o) => {
                    Some(o.entries().ok_or(SnapshotError::Unsupported(exact_name))?)
                }
            };
            w.u8(if timed { 1 } else { 2 })?;
            w.u64(listed.as_ref().map_or(exact.len(), |l| l.len() as u64))?;
            let mut piece = Vec::with_capacity(ENTRY_PIECE + 32);
            let mut entry = |slot: usize, fp: Fingerprint, at: Timestamp| {
                if timed {
                    piece.push(slot as u8);
                    piece.extend_from_slice(&fp.to_bytes());
                    piece.extend_from_slice(&at.as_nanos().to_le_bytes());
                } else {
                    piece.extend_from_slice(&fp.to_bytes());
                }
                if piece.len() >= ENTRY_PIECE {
                    w.bytes(&piece)?;
                    piece.clear();
                }
                Ok::<(), io::Error>(())
            };
            if let Partition::Memory(m) = exact {
                m.try_for_each_entry(&mut entry)?;
            }
            for (slot, fp, at) in listed.into_iter().flatten() {
                entry(slot, fp, at)?;
            }
            w.bytes(&piece)?;
        }
    }
    if version >= CLAIMS_VERSION {
        let bodies = shard.exact.as_ref().map_or_else(Vec::new, |e| e.bodies());
        write_claims(w, shard, &bodies)?;
    }
    Ok(())
}

/// A shard's claims (version 3): the next token, the live leases, the
/// bodies of committed claims.
fn write_claims<W: Write>(
    w: &mut HashingWriter<W>,
    shard: &crate::engine::Shard,
    bodies: &[(usize, Fingerprint, Timestamp, RecordBody)],
) -> io::Result<()> {
    w.u64(shard.next_token)?;
    w.u64(shard.leases.len() as u64)?;
    for (fp, held) in shard.leases.iter() {
        w.bytes(&fp.to_bytes())?;
        w.u64(held.token)?;
        w.u64(held.acquired_at)?;
        w.u64(held.until)?;
        write_payload(w, held.payload)?;
    }
    w.u64(bodies.len() as u64)?;
    for (slot, fp, at, body) in bodies {
        w.u8(*slot as u8)?;
        w.bytes(&fp.to_bytes())?;
        w.u64(at.as_nanos())?;
        write_payload(w, body.payload)?;
        w.u32(body.result.len() as u32)?;
        w.bytes(&body.result)?;
    }
    Ok(())
}

fn write_payload<W: Write>(
    w: &mut HashingWriter<W>,
    payload: Option<PayloadFingerprint>,
) -> io::Result<()> {
    match payload {
        None => w.u8(0),
        Some(p) => {
            w.u8(1)?;
            w.u64(p.0)
        }
    }
}

fn read_payload<R: Read>(
    r: &mut HashingReader<R>,
) -> Result<Option<PayloadFingerprint>, SnapshotError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(PayloadFingerprint(r.u64()?))),
        _ => Err(SnapshotError::Malformed("payload tag")),
    }
}

/// Reads a shard's claims (version 3) into `shard`.
fn read_claims<R: Read>(
    r: &mut HashingReader<R>,
    shard: &mut crate::engine::Shard,
    exact_name: &'static str,
) -> Result<(), SnapshotError> {
    // Tokens only grow: a fresh shard's first token is the wall clock's
    // nanoseconds, which may be past the saved one.
    shard.next_token = shard.next_token.max(r.u64()?);
    let leases = r.u64()?;
    for _ in 0..leases {
        let fp = Fingerprint::from_bytes(r.bytes()?);
        let held = crate::engine::Held {
            token: r.u64()?,
            acquired_at: r.u64()?,
            until: r.u64()?,
            payload: read_payload(r)?,
        };
        if held.token >= shard.next_token {
            return Err(SnapshotError::Malformed("lease token"));
        }
        shard.leases.insert(fp, held);
    }
    let bodies = r.u64()?;
    for _ in 0..bodies {
        let slot = r.u8()? as usize;
        if slot >= GENERATIONS {
            return Err(SnapshotError::Malformed("body slot"));
        }
        let fp = Fingerprint::from_bytes(r.bytes()?);
        let at = Timestamp::from_nanos(r.u64()?);
        let payload = read_payload(r)?;
        let len = r.u32()?;
        if len > MAX_RESULT {
            return Err(SnapshotError::Malformed("result length"));
        }
        let mut result = Vec::new();
        r.fill(&mut result, len as usize)?;
        let exact = shard
            .exact
            .as_mut()
            .ok_or(SnapshotError::Malformed("a body without an exact tier"))?;
        let mark = crate::exact::Mark {
            fingerprint: fp,
            slot,
            slice: 0,
            at,
        };
        exact
            .put_body(&mark, payload, &result)
            .map_err(|_| SnapshotError::Unsupported(exact_name))?;
    }
    Ok(())
}

/// Reads a windowed filter (tag 1) into `f`, which has the sizing of the
/// engine that wrote it (the header checked that).
fn read_windowed<R: Read>(
    r: &mut HashingReader<R>,
    f: &mut WindowedFilter,
) -> Result<(), SnapshotError> {
    let current = r.u64()?;
    f.restore_current((current != NONE).then_some(current));
    for n in &mut f.inserts {
        *n = r.u64()?;
    }
    read_words(r, f.base.bloom())?;
    let layers = r.u32()?;
    if layers > 12 {
        return Err(SnapshotError::Malformed("overflow layer count"));
    }
    f.overflow.clear();
    for _ in 0..layers {
        let blocks = r.u64()?;
        if blocks == 0 || blocks > MAX_BLOCKS {
            return Err(SnapshotError::Malformed("overflow layer size"));
        }
        let capacity = r.u64()?;
        let mut inserts = [0u64; GENERATIONS];
        for n in &mut inserts {
            *n = r.u64()?;
        }
        let bloom = BlockedBloom::try_new(blocks as usize, f.base.bloom().hashes())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        read_words(r, &bloom)?;
        f.overflow
            .push(OverflowLayer::new(bloom, capacity, inserts));
    }
    Ok(())
}

fn write_words<W: Write>(w: &mut HashingWriter<W>, bloom: &BlockedBloom) -> io::Result<()> {
    let mut result = Ok(());
    let mut buf = Vec::with_capacity(1 << 16);
    bloom.for_each_word(|word| {
        buf.extend_from_slice(&word.to_le_bytes());
        if buf.len() >= 1 << 16 && result.is_ok() {
            result = w.bytes(&buf);
            buf.clear();
        }
    });
    result?;
    w.bytes(&buf)
}

fn read_words<R: Read>(
    r: &mut HashingReader<R>,
    bloom: &BlockedBloom,
) -> Result<(), SnapshotError> {
    bloom.fill_words(|| r.u64())
}

fn counters_to_array(c: &crate::engine::ShardCountersView) -> [u64; COUNTERS] {
    [
        c.checks,
        c.new,
        c.duplicates,
        c.likely_duplicates,
        c.unavailable,
        c.maybe_seen,
        c.false_positives,
        c.reaccepted_after_window,
        c.rotations,
        c.over_capacity,
        c.overflow_inserts,
        c.mark_errors,
        c.marks_queued,
        c.marks_flushed,
        c.mark_flushes,
    ]
}

/// Counters stored per shard.
const COUNTERS: usize = 15;

impl DeduperBuilder {
    /// Builds the engine this builder describes and loads the state a
    /// [`Deduper::snapshot`] wrote. The configuration must be the one the
    /// snapshot was taken with (namespace, window, lateness, mode, shards,
    /// sizing); the exact tier must keep local state.
    ///
    /// # Errors
    /// [`SnapshotError`] when the data is not a snapshot, of another version,
    /// truncated, corrupt (checksum), or taken with another configuration
    /// (the message names the field); nothing is half-loaded.
    pub fn restore<R: Read>(self, r: R) -> Result<Deduper, SnapshotError> {
        let engine = self.build().map_err(SnapshotError::Config)?;
        read_into(engine, r)
    }
}

/// Loads the state a [`Deduper::snapshot`] wrote into `engine`, a fresh
/// engine of the configuration the snapshot must match.
pub(crate) fn read_into<R: Read>(engine: Deduper, r: R) -> Result<Deduper, SnapshotError> {
    let mut r = HashingReader {
        inner: io::BufReader::with_capacity(1 << 20, r),
        hasher: Xxh3::new(),
    };
    if &r.bytes::<8>()? != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let version = r.u32()?;
    if !(1..=FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    for (expected, name) in header_fields(&engine).into_iter().zip(HEADER_NAMES) {
        if r.u64()? != expected {
            return Err(SnapshotError::Mismatch(name));
        }
    }
    let watermark = r.u64()?;
    let late = r.u64()?;
    {
        let mut shards = engine.lock_all();
        for shard in shards.iter_mut() {
            shard.time = r.u64()?;
            // The generations are replaced: the next advance runs in full.
            shard.advanced_to = None;
            let mut c = [0u64; COUNTERS];
            for n in &mut c {
                *n = r.u64()?;
            }
            shard.counters = counters_from_array(c);
            let tag = r.u8()?;
            match (&mut shard.filter, tag) {
                (ShardFilter::Windowed(f), 1) => read_windowed(&mut r, f)?,
                // A state written while the memory tier kept a filter and
                // one table per slice: the entries below carry every key
                // (merged into the one table), the filter is read and
                // let go.
                (ShardFilter::Direct, 1) => {
                    let mut scratch = engine
                        .plan()
                        .windowed_filter()
                        .map_err(SnapshotError::Config)?
                        .ok_or(SnapshotError::Malformed("filter kind"))?;
                    read_windowed(&mut r, &mut scratch)?;
                }
                (ShardFilter::Unbounded(g), 2) => {
                    *g = read_growing(&mut r, engine.plan().false_positive_rate)?;
                }
                // A state written before the engine dropped the filter
                // in front of its memory tier: the exact entries below
                // hold every key, so the filter is read and let go.
                (ShardFilter::Direct, 2) => {
                    read_growing(&mut r, engine.plan().false_positive_rate)?;
                }
                (ShardFilter::Direct, 3) => {}
                // No filter: written on the memory tier with owned keys.
                (_, 3) => {
                    return Err(SnapshotError::Mismatch(
                        "exact tier (the state was written on the memory tier, \
                             which keeps no filter)",
                    ))
                }
                _ => return Err(SnapshotError::Malformed("filter kind")),
            }
            match (&mut shard.exact, r.u8()?) {
                (None, 0) => {}
                (Some(exact), 1) => {
                    let count = r.u64()?;
                    exact.reserve(count);
                    for _ in 0..count {
                        let slot = r.u8()? as usize;
                        if slot >= GENERATIONS {
                            return Err(SnapshotError::Malformed("exact-tier slot"));
                        }
                        let fp = Fingerprint::from_bytes(r.bytes()?);
                        let at = Timestamp::from_nanos(r.u64()?);
                        exact
                            .mark(fp, slot, at)
                            .map_err(|_| SnapshotError::Unsupported(engine.plan().exact_name))?;
                    }
                }
                // Fingerprints alone (version 2): only an engine that
                // keeps no times takes them.
                (Some(exact), 2) if version >= UNTIMED_VERSION => {
                    if exact.keeps_times() {
                        return Err(SnapshotError::Mismatch(
                            "first_seen_times setting (the state keeps no first-seen \
                                 times: build with first_seen_times(false))",
                        ));
                    }
                    let count = r.u64()?;
                    exact.reserve(count);
                    for _ in 0..count {
                        let fp = Fingerprint::from_bytes(r.bytes()?);
                        exact
                            .mark(fp, 0, Timestamp::ZERO)
                            .map_err(|_| SnapshotError::Unsupported(engine.plan().exact_name))?;
                    }
                }
                _ => return Err(SnapshotError::Malformed("exact tier kind")),
            }
            if version >= CLAIMS_VERSION {
                read_claims(&mut r, shard, engine.plan().exact_name)?;
            }
        }
    }
    let computed = r.hasher.digest();
    let mut stored = [0u8; 8];
    r.inner
        .read_exact(&mut stored)
        .map_err(|_| SnapshotError::Truncated)?;
    if u64::from_le_bytes(stored) != computed {
        return Err(SnapshotError::Checksum);
    }
    let mut rest = [0u8; 1];
    if r.inner.read(&mut rest)? != 0 {
        return Err(SnapshotError::Malformed(
            "trailing bytes after the checksum",
        ));
    }
    // The restored filter knows every key this engine accepted.
    for shard in engine.lock_all().iter_mut() {
        shard.warmth = crate::engine::Warmth::Warm;
    }
    engine.restore_watermark(watermark, late);
    crate::trace::event!(info, shards = engine.shard_count(), "snapshot restored");
    Ok(engine)
}

/// A growing filter as [`Deduper::snapshot`] writes it (tag 2).
fn read_growing<R: Read>(
    r: &mut HashingReader<R>,
    false_positive_rate: f64,
) -> Result<GrowingBloom, SnapshotError> {
    let n_layers = r.u32()?;
    if n_layers == 0 || n_layers > 64 {
        return Err(SnapshotError::Malformed("layer count"));
    }
    let mut layers = Vec::new();
    for _ in 0..n_layers {
        let blocks = r.u64()?;
        let hashes = r.u32()?;
        let stage_capacity = r.u64()?;
        if blocks == 0 || blocks > MAX_BLOCKS || !(1..=10).contains(&hashes) {
            return Err(SnapshotError::Malformed("filter layer size"));
        }
        let bloom = BlockedBloom::try_new(blocks as usize, hashes)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        read_words(r, &bloom)?;
        layers.push(Layer {
            bloom,
            stage_capacity,
        });
    }
    let stage = r.u32()? as usize;
    let stage_len = r.u64()?;
    if stage >= GENERATIONS {
        return Err(SnapshotError::Malformed("fill stage"));
    }
    Ok(GrowingBloom::from_parts(
        layers,
        false_positive_rate,
        stage,
        stage_len,
    ))
}

fn counters_from_array(c: [u64; COUNTERS]) -> crate::engine::ShardCountersView {
    crate::engine::ShardCountersView {
        checks: c[0],
        new: c[1],
        duplicates: c[2],
        likely_duplicates: c[3],
        unavailable: c[4],
        maybe_seen: c[5],
        false_positives: c[6],
        reaccepted_after_window: c[7],
        rotations: c[8],
        over_capacity: c[9],
        overflow_inserts: c[10],
        mark_errors: c[11],
        marks_queued: c[12],
        marks_flushed: c[13],
        mark_flushes: c[14],
        // Batch and latency figures describe this process's run: not kept.
        ..crate::engine::ShardCountersView::default()
    }
}

impl From<ConfigError> for SnapshotError {
    fn from(e: ConfigError) -> Self {
        SnapshotError::Config(e)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::engine::ShardFilter;
    use crate::filter::GrowingBloom;
    use crate::{Deduper, DeduperBuilder, Verdict};

    fn builder() -> DeduperBuilder {
        Deduper::builder()
            .no_window()
            .expected_keys(1_000)
            .shards(2)
    }

    /// A state written while the windowed memory tier kept a filter and a
    /// table per slice (tag 1) restores into the engine with one table: the
    /// filter is read and dropped, the entries keep their times, so the
    /// window goes on where it was.
    #[test]
    fn a_state_with_the_old_windowed_filter_restores_into_one_table() {
        use crate::{Clock, ManualClock, Timestamp};
        use std::time::Duration;
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let b = || {
            Deduper::builder()
                .window(Duration::from_secs(60))
                .expected_keys(1_000)
                .shards(2)
                .clock(Clock::Manual(clock.clone()))
        };
        let d = b().build().unwrap();
        let key = |k: u64| k.to_le_bytes();
        for k in 0..300u64 {
            assert!(d.check(&key(k)[..]).is_new());
        }
        clock.advance(Duration::from_secs(30));
        for k in 300..600u64 {
            assert!(d.check(&key(k)[..]).is_new());
        }
        let mut one_table = Vec::new();
        d.snapshot(&mut one_table).unwrap();
        for shard in d.lock_all().iter_mut() {
            assert!(matches!(shard.filter, ShardFilter::Direct));
            shard.filter = ShardFilter::Windowed(d.plan().windowed_filter().unwrap().unwrap());
        }
        let mut old = Vec::new();
        d.snapshot(&mut old).unwrap();
        assert!(
            old.len() > one_table.len(),
            "the filter's words are in the old state"
        );
        // 40 s later the first 300 keys (accepted at 1000 s) are out of the
        // 60 s window, the next 300 (at 1030 s) are inside it.
        clock.advance(Duration::from_secs(40));
        for state in [&old, &one_table] {
            let restored = b().restore(&state[..]).unwrap();
            for shard in restored.lock_all().iter() {
                assert!(matches!(shard.filter, ShardFilter::Direct));
            }
            for k in 0..600u64 {
                let expected = if k < 300 {
                    Verdict::New
                } else {
                    Verdict::Duplicate {
                        first_seen: Timestamp::from_secs(1_030),
                    }
                };
                assert_eq!(restored.check(&key(k)[..]), expected, "key {k}");
            }
        }
    }

    /// A state written while the memory tier still had a growing filter in
    /// front of it (tag 2) restores into the engine without one: the filter
    /// is read, checked and dropped; the exact entries carry every key.
    #[test]
    fn a_state_with_the_old_growing_filter_restores_without_it() {
        let d = builder().build().unwrap();
        for k in 0..500u64 {
            assert!(d.check(&k.to_le_bytes()[..]).is_new());
        }
        let mut direct = Vec::new();
        d.snapshot(&mut direct).unwrap();
        for shard in d.lock_all().iter_mut() {
            assert!(matches!(shard.filter, ShardFilter::Direct));
            let mut g = GrowingBloom::new(500, 0.01).unwrap();
            for (_, fp, _) in shard.exact.as_ref().unwrap().entries().unwrap() {
                g.insert(fp);
            }
            shard.filter = ShardFilter::Unbounded(g);
        }
        let mut old = Vec::new();
        d.snapshot(&mut old).unwrap();
        assert!(
            old.len() > direct.len(),
            "the filter's words are in the old state"
        );
        let restored = builder().restore(&old[..]).unwrap();
        for shard in restored.lock_all().iter() {
            assert!(matches!(shard.filter, ShardFilter::Direct));
        }
        for k in 0..1_000u64 {
            let v = restored.check(&k.to_le_bytes()[..]);
            assert_eq!(matches!(v, Verdict::Duplicate { .. }), k < 500, "key {k}");
        }
        // And the state an engine without a filter writes (tag 3) restores.
        let mut new = Vec::new();
        restored.snapshot(&mut new).unwrap();
        let again = builder().restore(&new[..]).unwrap();
        assert!(matches!(
            again.check(&999u64.to_le_bytes()[..]),
            Verdict::Duplicate { .. }
        ));
        assert!(again.check(&1_000u64.to_le_bytes()[..]).is_new());
    }
}
