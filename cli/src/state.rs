//! `--state DIR`: the engine's state between runs, in one file,
//! `DIR/dedup.state`:
//!
//! ```text
//! "DEDUPCLI"  u32 version  u32 manifest length  manifest (JSON settings)
//! u64 xxh3-64 of everything before it
//! the engine snapshot (its own magic, version and checksum)
//! ```
//!
//! All integers little-endian. It is written to a temporary file in `DIR`
//! (created exclusively: never through a file or link already there),
//! synced, and renamed over the old one, so a crash leaves the old state or
//! the new one, never a mix. A file that is not a state, of another version,
//! truncated or corrupt is refused before anything is used. A run holds
//! `DIR/dedup.lock` from before it reads any input to its end
//! ([`StateLock`]): one run at a time per directory.

mod lock;

pub use lock::StateLock;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use tiered_dedup::{Deduper, SnapshotError};
use xxhash_rust::xxh3::xxh3_64;

use crate::settings::Settings;

/// The state file's name inside `--state DIR`.
pub const STATE_FILE: &str = "dedup.state";
const MAGIC: &[u8; 8] = b"DEDUPCLI";
/// The layout version this build writes and reads.
const VERSION: u32 = 1;
/// Largest manifest accepted (it is a few hundred bytes).
const MAX_MANIFEST: u32 = 1 << 20;

/// Why a state could not be used or written.
#[derive(Debug)]
pub enum StateError {
    /// Reading or writing failed.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// The file is not a dedup state, or is damaged.
    Refused {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another run holds the directory's lock.
    Busy {
        /// The directory.
        dir: PathBuf,
        /// Who holds it: `pid N, started TIME`.
        holder: String,
    },
    /// This run's flags contradict the ones the state was written with.
    Contradicts {
        /// The file.
        path: PathBuf,
        /// One line per flag.
        differences: Vec<String>,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            StateError::Refused { path, reason } => write!(
                f,
                "{}: refused: {reason}; nothing was loaded (move the file away to start afresh)",
                path.display()
            ),
            StateError::Busy { dir, holder } => write!(
                f,
                "{}: in use by another dedup run ({holder}); one run at a time per --state \
                 directory: wait for it to end, or use another directory",
                dir.display()
            ),
            StateError::Contradicts { path, differences } => {
                write!(
                    f,
                    "{}: the flags of this run contradict the state's:",
                    path.display()
                )?;
                for d in differences {
                    write!(f, "\n  {d}")?;
                }
                write!(
                    f,
                    "\n(give the same flags, or another --state directory to start afresh)"
                )
            }
        }
    }
}

/// A state that was found and checked.
pub struct Loaded {
    /// The engine, restored.
    pub engine: Deduper,
    /// The settings it was written with.
    pub settings: Settings,
}

/// Loads the state in `dir`, if there is one. `now` are this run's settings:
/// where they leave the sizing open, the state's is used; where they
/// contradict it, the state is refused.
///
/// # Errors
/// [`StateError`]: unreadable, not a state, damaged, or contradicting.
pub fn load(dir: &Path, now: &Settings) -> Result<Option<Loaded>, StateError> {
    let path = dir.join(STATE_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir.exists() && !dir.is_dir() {
                return Err(StateError::Io {
                    path: dir.to_owned(),
                    error: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
                });
            }
            // A first run: make the directory now, so that a path that
            // cannot be written fails before the input is read.
            fs::create_dir_all(dir).map_err(|error| StateError::Io {
                path: dir.to_owned(),
                error,
            })?;
            return Ok(None);
        }
        Err(error) => return Err(StateError::Io { path, error }),
    };
    let refused = |reason: String| StateError::Refused {
        path: path.clone(),
        reason,
    };
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; 16];
    read_exact_or(&mut r, &mut header, || {
        refused("truncated (no header)".into())
    })?;
    if &header[..8] != MAGIC {
        return Err(refused("not a dedup state file (bad magic bytes)".into()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(refused(format!(
            "state layout version {version}, this build reads version {VERSION}"
        )));
    }
    let len = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
    if len > MAX_MANIFEST {
        return Err(refused("corrupt (manifest length)".into()));
    }
    let mut manifest = vec![0u8; len as usize];
    read_exact_or(&mut r, &mut manifest, || {
        refused("truncated (manifest)".into())
    })?;
    let mut stored = [0u8; 8];
    read_exact_or(&mut r, &mut stored, || {
        refused("truncated (manifest checksum)".into())
    })?;
    let mut hashed = header.to_vec();
    hashed.extend_from_slice(&manifest);
    if u64::from_le_bytes(stored) != xxh3_64(&hashed) {
        return Err(refused("corrupt (manifest checksum mismatch)".into()));
    }
    let saved: Settings = serde_json::from_slice(&manifest)
        .map_err(|e| refused(format!("unreadable manifest ({e})")))?;
    let differences = now.contradictions(&saved);
    if !differences.is_empty() {
        return Err(StateError::Contradicts { path, differences });
    }
    let engine = saved.builder().restore(r).map_err(|e| match e {
        SnapshotError::Io(error) => StateError::Io {
            path: path.clone(),
            error,
        },
        other => refused(format!("engine snapshot: {other}")),
    })?;
    Ok(Some(Loaded {
        engine,
        settings: saved,
    }))
}

fn read_exact_or(
    r: &mut impl Read,
    buf: &mut [u8],
    err: impl FnOnce() -> StateError,
) -> Result<(), StateError> {
    r.read_exact(buf).map_err(|_| err())
}

/// Writes `engine` and `settings` as the state in `dir` (created if needed):
/// a temporary file, synced, then renamed over the old state.
///
/// # Errors
/// [`StateError::Io`] when the directory or file cannot be written.
pub fn save(dir: &Path, settings: &Settings, engine: &Deduper) -> Result<(), StateError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |error| StateError::Io { path, error }
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = lock::temporary_path(dir, "save");
    let file = lock::create_exclusive(&tmp).map_err(io_err(&tmp))?;
    let result = write_file(file, &tmp, settings, engine);
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let path = dir.join(STATE_FILE);
    if let Err(error) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::Io { path, error });
    }
    // Make the rename itself durable.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn write_file(
    file: File,
    tmp: &Path,
    settings: &Settings,
    engine: &Deduper,
) -> Result<(), StateError> {
    let io_err = |error| StateError::Io {
        path: tmp.to_owned(),
        error,
    };
    let manifest = serde_json::to_vec_pretty(settings).map_err(|e| io_err(e.into()))?;
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    head.extend_from_slice(&manifest);
    let checksum = xxh3_64(&head);
    head.extend_from_slice(&checksum.to_le_bytes());
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&head).map_err(io_err)?;
    engine.snapshot(&mut w).map_err(|e| match e {
        SnapshotError::Io(error) => io_err(error),
        other => io_err(io::Error::other(other.to_string())),
    })?;
    let file = w.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)
}
