//! Checkpoints: a snapshot written shard by shard, with the log position
//! each shard was cut at.
//!
//! ```text
//! "TDEDUPCK" | u32 version | u64 snapshot length
//! snapshot (format 3, its own magic and checksum)
//! u64 first live epoch | u64 note cut | u64 next sequence number
//! u32 shards | u64 cut × shards | u8 has note | u32 note length | note
//! u64 xxh3 of the 20 bytes of the head and the trailer before it
//! ```
//!
//! A shard's cut is the first sequence number it did not hold when it was
//! written: recovery applies that shard's records from its cut on. Notes
//! wait while a checkpoint runs, so one cut serves them all.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use super::log::{fail_point, sync_dir};
use super::{lock, DurabilityError, Durable};
use crate::engine::Deduper;
use crate::error::SnapshotError;

const MAGIC: &[u8; 8] = b"TDEDUPCK";
const VERSION: u32 = 1;
const HEAD: u64 = 8 + 4 + 8;
/// The snapshot format a checkpoint writes (claims included).
const SNAPSHOT_VERSION: u32 = 3;
/// The checkpoint's file name.
pub(crate) const FILE: &str = "checkpoint";
/// Where a checkpoint is written before it is renamed over [`FILE`].
pub(crate) const TEMPORARY: &str = "checkpoint.tmp";
/// Largest trailer accepted (shards' cuts and a note).
const MAX_TRAILER: u64 = 1 << 30;

/// What a checkpoint says about the log.
#[derive(Clone, Debug, Default)]
pub(crate) struct Meta {
    /// Segments before this epoch are covered.
    pub(crate) epoch: u64,
    /// Notes from this sequence number on are in the log.
    pub(crate) note_cut: u64,
    /// No record had this sequence number or more when the checkpoint ended.
    pub(crate) next_seq: u64,
    /// Per shard: its records from this sequence number on are in the log.
    pub(crate) cuts: Vec<u64>,
    pub(crate) note: Option<Arc<[u8]>>,
}

/// A file that counts what is written through it (and fails where the test
/// hook says so).
struct Counted {
    file: File,
    bytes: u64,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        fail_point(buf.len() as u64)?;
        let n = self.file.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A checkpoint whose shards are written (not yet synced or renamed).
pub(crate) struct Written {
    file: File,
    bytes: u64,
    epoch: u64,
    dir: std::path::PathBuf,
    log: std::sync::Arc<super::log::Log>,
}

/// Writes a checkpoint of `engine` to its temporary file (the caller holds
/// the checkpoint lock): the log is cut into a new segment, then each shard
/// is written with its cut. [`Written::finish`] makes it the checkpoint.
pub(crate) fn write(engine: &Deduper, d: &Durable) -> Result<Written, DurabilityError> {
    // Records from here on go to a new segment; the older ones are all
    // before every shard's cut below.
    let epoch = d.log.rotate()?;
    let tmp = d.dir.join(TEMPORARY);
    let io_err = |error| DurabilityError::Io {
        path: tmp.clone(),
        error,
    };
    let _ = fs::remove_file(&tmp);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err)?;
    match write_shards(engine, d, file, epoch) {
        Ok((file, bytes)) => Ok(Written {
            file,
            bytes,
            epoch,
            dir: d.dir.clone(),
            log: std::sync::Arc::clone(&d.log),
        }),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

impl Written {
    /// Syncs the file, renames it over the last checkpoint, syncs the
    /// directory, and deletes the log segments it covers; its size. On an
    /// error the temporary file is removed and the last checkpoint stays.
    pub(crate) fn finish(self) -> Result<u64, DurabilityError> {
        let tmp = self.dir.join(TEMPORARY);
        let synced = fail_point(0).and_then(|()| self.file.sync_all());
        drop(self.file);
        if let Err(error) = synced {
            let _ = fs::remove_file(&tmp);
            return Err(DurabilityError::Io { path: tmp, error });
        }
        let path = self.dir.join(FILE);
        if let Err(error) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(DurabilityError::Io { path, error });
        }
        sync_dir(&self.dir).map_err(|error| DurabilityError::Io {
            path: self.dir.clone(),
            error,
        })?;
        // Only now is the old checkpoint gone: the segments it needed go too.
        self.log.remove_before(self.epoch);
        Ok(self.bytes)
    }
}

fn write_shards(
    engine: &Deduper,
    d: &Durable,
    file: File,
    epoch: u64,
) -> Result<(File, u64), DurabilityError> {
    let tmp = d.dir.join(TEMPORARY);
    let io_err = |error| DurabilityError::Io {
        path: tmp.clone(),
        error,
    };
    let snap_err = |e: SnapshotError| match e {
        SnapshotError::Io(error) => io_err(error),
        source => DurabilityError::Checkpoint {
            path: tmp.clone(),
            source,
        },
    };
    let mut out = Counted { file, bytes: 0 };
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&0u64.to_le_bytes());
    out.write_all(&head).map_err(io_err)?;
    // Notes wait for the checkpoint lock (held by the caller): this cut
    // and this note hold for the whole pass.
    let note_cut = d.log.next_seq();
    let note = lock(&d.note).clone();
    let mut w = engine
        .snapshot_head(
            out,
            SNAPSHOT_VERSION,
            engine.watermark().as_nanos(),
            engine.late_count(),
        )
        .map_err(io_err)?;
    let mut cuts = Vec::with_capacity(engine.shard_count());
    for s in 0..engine.shard_count() {
        // Serialized under the shard's lock (memory speed), written after:
        // the shard answers again while its bytes go to the file.
        let bytes = {
            let mut shard = engine.lock_shard(s);
            engine.seal(s, &mut shard);
            cuts.push(d.log.next_seq());
            w.serialize(&shard).map_err(snap_err)?
        };
        w.append(&bytes).map_err(io_err)?;
    }
    let next_seq = d.log.next_seq();
    let mut out = w.finish().map_err(io_err)?;
    let snapshot_len = out.bytes - HEAD;
    let mut trailer = Vec::new();
    trailer.extend_from_slice(&epoch.to_le_bytes());
    trailer.extend_from_slice(&note_cut.to_le_bytes());
    trailer.extend_from_slice(&next_seq.to_le_bytes());
    trailer.extend_from_slice(&(cuts.len() as u32).to_le_bytes());
    for cut in &cuts {
        trailer.extend_from_slice(&cut.to_le_bytes());
    }
    match &note {
        None => trailer.push(0),
        Some(note) => {
            trailer.push(1);
            trailer.extend_from_slice(&(note.len() as u32).to_le_bytes());
            trailer.extend_from_slice(note);
        }
    }
    head[12..20].copy_from_slice(&snapshot_len.to_le_bytes());
    let mut summed = head.clone();
    summed.extend_from_slice(&trailer);
    trailer.extend_from_slice(&xxh3_64(&summed).to_le_bytes());
    out.write_all(&trailer).map_err(io_err)?;
    let bytes = out.bytes;
    let mut file = out.file;
    file.seek(SeekFrom::Start(12))
        .and_then(|_| file.write_all(&snapshot_len.to_le_bytes()))
        .map_err(io_err)?;
    Ok((file, bytes))
}

/// Loads the checkpoint at `path` into `engine` (fresh, of the
/// configuration it must match).
pub(crate) fn read(path: &Path, engine: Deduper) -> Result<(Deduper, Meta), DurabilityError> {
    let refused = |source| DurabilityError::Checkpoint {
        path: path.to_owned(),
        source,
    };
    let io_err = |error| DurabilityError::Io {
        path: path.to_owned(),
        error,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut head = [0u8; HEAD as usize];
    if len < HEAD {
        return Err(refused(SnapshotError::Truncated));
    }
    file.read_exact(&mut head).map_err(io_err)?;
    if &head[..8] != MAGIC {
        return Err(refused(SnapshotError::NotASnapshot));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4"));
    if version != VERSION {
        return Err(refused(SnapshotError::Version {
            found: version,
            supported: VERSION,
        }));
    }
    let snapshot_len = u64::from_le_bytes(head[12..20].try_into().expect("8"));
    let trailer_at = HEAD
        .checked_add(snapshot_len)
        .filter(|&at| at <= len)
        .ok_or_else(|| refused(SnapshotError::Truncated))?;
    if len - trailer_at > MAX_TRAILER {
        return Err(refused(SnapshotError::Malformed(
            "checkpoint trailer length",
        )));
    }
    file.seek(SeekFrom::Start(trailer_at)).map_err(io_err)?;
    let mut trailer = Vec::new();
    file.read_to_end(&mut trailer).map_err(io_err)?;
    let meta = parse_trailer(&head, &trailer, engine.shard_count()).map_err(refused)?;
    file.seek(SeekFrom::Start(HEAD)).map_err(io_err)?;
    let engine = crate::snapshot::read_into(engine, file.take(snapshot_len)).map_err(refused)?;
    Ok((engine, meta))
}

fn parse_trailer(head: &[u8], trailer: &[u8], shards: usize) -> Result<Meta, SnapshotError> {
    if trailer.len() < 8 {
        return Err(SnapshotError::Truncated);
    }
    let (body, sum) = trailer.split_at(trailer.len() - 8);
    let mut summed = head.to_vec();
    summed.extend_from_slice(body);
    if xxh3_64(&summed) != u64::from_le_bytes(sum.try_into().expect("8")) {
        return Err(SnapshotError::Checksum);
    }
    let mut r = super::ops::Reader(body);
    let bad = |_| SnapshotError::Malformed("checkpoint trailer");
    let epoch = r.u64().map_err(bad)?;
    let note_cut = r.u64().map_err(bad)?;
    let next_seq = r.u64().map_err(bad)?;
    let n = u32::from_le_bytes(r.take::<4>().map_err(bad)?) as usize;
    if n != shards {
        return Err(SnapshotError::Mismatch("shard count"));
    }
    let mut cuts = Vec::with_capacity(n);
    for _ in 0..n {
        cuts.push(r.u64().map_err(bad)?);
    }
    let note = match r.take::<1>().map_err(bad)?[0] {
        0 => None,
        1 => {
            let len = u32::from_le_bytes(r.take::<4>().map_err(bad)?) as usize;
            if r.0.len() != len {
                return Err(SnapshotError::Malformed("checkpoint note length"));
            }
            Some(Arc::from(r.0))
        }
        _ => return Err(SnapshotError::Malformed("checkpoint note tag")),
    };
    if note.is_none() && !r.0.is_empty() {
        return Err(SnapshotError::Malformed(
            "trailing bytes after the checkpoint",
        ));
    }
    if cuts.iter().any(|&c| c > next_seq) || note_cut > next_seq {
        return Err(SnapshotError::Malformed("checkpoint cuts"));
    }
    Ok(Meta {
        epoch,
        note_cut,
        next_seq,
        cuts,
        note,
    })
}
