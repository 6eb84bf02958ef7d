//! `--state DIR`: the engine's state between runs (layout 2):
//!
//! ```text
//! DIR/dedup.lock       the run holding the directory (see `lock.rs`)
//! DIR/dedup.settings   "DEDUPCLI" | u32 version 2 | u32 manifest length | manifest (JSON settings) | u64 xxh3-64 of all before
//! DIR/engine/          the engine's durable directory: checkpoint, log segments (tiered_dedup::durability)
//! DIR/dedup.delivery   how far the output of the chunk being written got (see `delivery.rs`)
//! ```
//!
//! The settings are written once, by the first run (a temporary file in
//! `DIR`, created exclusively, synced and renamed), and fix the engine: a
//! later run whose flags contradict them is refused. The engine logs every
//! record it accepts (`--durability os|sync`), or is checkpointed when a run
//! ends without error (`none`). Layout 1 (`DIR/dedup.state`: the manifest
//! and a whole snapshot) is moved into layout 2 by the first run that finds
//! it. A file that is not a state, of another version, truncated or corrupt
//! is refused before anything is used. A run holds `DIR/dedup.lock` from
//! before it reads any input to its end ([`StateLock`]).

pub mod delivery;
mod lock;

pub use lock::StateLock;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tiered_dedup::{Deduper, Durability, DurabilityError};
use xxhash_rust::xxh3::xxh3_64;

use crate::cli::DurabilityArg;
use crate::settings::Settings;

/// The settings file's name inside `--state DIR`.
pub const SETTINGS_FILE: &str = "dedup.settings";
/// The engine's directory inside `--state DIR`.
pub const ENGINE_DIR: &str = "engine";
/// Layout 1's state file (manifest and snapshot), moved into layout 2.
pub const LEGACY_FILE: &str = "dedup.state";
const MAGIC: &[u8; 8] = b"DEDUPCLI";
/// The layout version this build writes.
const VERSION: u32 = 2;
/// Layout 1: the manifest followed by an engine snapshot, in one file.
const LEGACY_VERSION: u32 = 1;
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
                "{}: refused: {reason}; nothing was loaded (move the state directory away to \
                 start afresh)",
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

/// The durability a run asked for.
pub fn durability(arg: DurabilityArg, group_commit: Duration) -> Durability {
    match arg {
        DurabilityArg::None => Durability::None,
        DurabilityArg::Os => Durability::Os,
        DurabilityArg::Sync => Durability::sync(group_commit),
    }
}

/// The settings a state in `dir` was written with, if it holds one: where
/// this run's settings (`now`) leave the sizing open the state's is used;
/// where they contradict it, the state is refused.
///
/// # Errors
/// [`StateError`]: unreadable, not a state, damaged, or contradicting.
pub fn saved_settings(dir: &Path, now: &Settings) -> Result<Option<Settings>, StateError> {
    if dir.exists() && !dir.is_dir() {
        return Err(StateError::Io {
            path: dir.to_owned(),
            error: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    let settings_path = dir.join(SETTINGS_FILE);
    let (path, version) = if settings_path.exists() {
        (settings_path, VERSION)
    } else if dir.join(LEGACY_FILE).exists() {
        (dir.join(LEGACY_FILE), LEGACY_VERSION)
    } else {
        return Ok(None);
    };
    let file = File::open(&path).map_err(|error| StateError::Io {
        path: path.clone(),
        error,
    })?;
    let saved = read_manifest(&mut BufReader::new(file), &path, version)?;
    let differences = now.contradictions(&saved);
    if !differences.is_empty() {
        return Err(StateError::Contradicts { path, differences });
    }
    Ok(Some(saved))
}

/// Reads the header and manifest of a settings (or layout-1 state) file of
/// `version`, leaving `r` after them; the settings.
fn read_manifest<R: Read>(r: &mut R, path: &Path, version: u32) -> Result<Settings, StateError> {
    let refused = |reason: String| StateError::Refused {
        path: path.to_owned(),
        reason,
    };
    let mut header = [0u8; 16];
    r.read_exact(&mut header)
        .map_err(|_| refused("truncated (no header)".into()))?;
    if &header[..8] != MAGIC {
        return Err(refused("not a dedup state file (bad magic bytes)".into()));
    }
    let found = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if found != version {
        return Err(refused(format!(
            "state layout version {found}, this build reads versions {LEGACY_VERSION} and \
             {VERSION} (version {version} in this file)"
        )));
    }
    let len = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
    if len > MAX_MANIFEST {
        return Err(refused("corrupt (manifest length)".into()));
    }
    let mut manifest = vec![0u8; len as usize];
    r.read_exact(&mut manifest)
        .map_err(|_| refused("truncated (manifest)".into()))?;
    let mut stored = [0u8; 8];
    r.read_exact(&mut stored)
        .map_err(|_| refused("truncated (manifest checksum)".into()))?;
    let mut hashed = header.to_vec();
    hashed.extend_from_slice(&manifest);
    if u64::from_le_bytes(stored) != xxh3_64(&hashed) {
        return Err(refused("corrupt (manifest checksum mismatch)".into()));
    }
    let saved: Settings = serde_json::from_slice(&manifest)
        .map_err(|e| refused(format!("unreadable manifest ({e})")))?;
    Ok(saved)
}

/// Opens the engine of the state in `dir` (the directory locked by this
/// run) with `settings` (the saved ones, or this run's for a new state,
/// which are then written), logging as `durability` says. A layout-1
/// state is moved into layout 2 first.
///
/// # Errors
/// [`StateError`]: a damaged checkpoint or log (refused), or I/O.
pub fn open(
    dir: &Path,
    settings: &Settings,
    durability: Durability,
) -> Result<Deduper, StateError> {
    let engine_dir = dir.join(ENGINE_DIR);
    let builder = || {
        settings
            .builder()
            .durability(durability)
            // Checkpoints are taken between chunks, when no output is in
            // flight (see `delivery.rs`).
            .automatic_checkpoints(false)
    };
    let refused = |e: DurabilityError| match e {
        DurabilityError::Io { path, error } => StateError::Io { path, error },
        DurabilityError::Busy { dir } => StateError::Busy {
            dir,
            holder: "another engine of this process".into(),
        },
        other => StateError::Refused {
            path: engine_dir.clone(),
            reason: other.to_string(),
        },
    };
    let legacy = dir.join(LEGACY_FILE);
    if !dir.join(SETTINGS_FILE).exists() {
        if legacy.exists() {
            let engine = import_legacy(builder(), &engine_dir, &legacy)?;
            return migrate(dir, &legacy, settings, engine);
        }
        // A new state: the settings first, so that a log never exists
        // without them.
        write_settings(dir, settings)?;
    }
    builder().open(&engine_dir).map_err(refused)
}

/// Imports the snapshot of the layout-1 state file `legacy` into a new
/// engine directory.
fn import_legacy(
    builder: tiered_dedup::DeduperBuilder,
    engine_dir: &Path,
    legacy: &Path,
) -> Result<Deduper, StateError> {
    {
        let file = File::open(legacy).map_err(|error| StateError::Io {
            path: legacy.to_owned(),
            error,
        })?;
        let mut r = BufReader::with_capacity(1 << 20, file);
        read_manifest(&mut r, legacy, LEGACY_VERSION)?;
        // A directory a crashed migration left half made is made again.
        if engine_dir.exists() {
            fs::remove_dir_all(engine_dir).map_err(|error| StateError::Io {
                path: engine_dir.to_owned(),
                error,
            })?;
        }
        builder.import(engine_dir, r).map_err(|e| match e {
            DurabilityError::Io { path, error } => StateError::Io { path, error },
            other => StateError::Refused {
                path: legacy.to_owned(),
                reason: other.to_string(),
            },
        })
    }
}

/// Finishes moving a layout-1 state: its engine is checkpointed in the
/// engine directory; the settings are written, then the old file removed.
fn migrate(
    dir: &Path,
    legacy: &Path,
    settings: &Settings,
    engine: Deduper,
) -> Result<Deduper, StateError> {
    write_settings(dir, settings)?;
    fs::remove_file(legacy).map_err(|error| StateError::Io {
        path: legacy.to_owned(),
        error,
    })?;
    sync_dir(dir)?;
    Ok(engine)
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|error| StateError::Io {
            path: dir.to_owned(),
            error,
        })
}

/// Writes the settings file: a temporary file, synced, renamed.
fn write_settings(dir: &Path, settings: &Settings) -> Result<(), StateError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |error| StateError::Io { path, error }
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let manifest = serde_json::to_vec_pretty(settings).map_err(|e| io_err(dir)(e.into()))?;
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    head.extend_from_slice(&manifest);
    let checksum = xxh3_64(&head);
    head.extend_from_slice(&checksum.to_le_bytes());
    let tmp = lock::temporary_path(dir, "settings");
    let written = lock::create_exclusive(&tmp)
        .and_then(|mut f| f.write_all(&head).and_then(|()| f.sync_all()));
    if let Err(error) = written {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::Io { path: tmp, error });
    }
    let path = dir.join(SETTINGS_FILE);
    if let Err(error) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::Io { path, error });
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            format: "lines".into(),
            keys: Vec::new(),
            time_field: None,
            time_unit: None,
            window_ns: None,
            allowed_lateness_ns: None,
            namespace: String::new(),
            exact: "memory".into(),
            shards: crate::settings::SHARDS,
            expected_keys: 10_000,
            false_positive_rate: 0.01,
        }
    }

    /// A layout-1 state (`dedup.state`: manifest and snapshot in one file)
    /// is moved into layout 2 by the first run that finds it: the keys it
    /// held are there, the old file is gone, the settings are written.
    #[test]
    fn a_layout_one_state_is_moved_into_layout_two() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings();
        let old = s.builder().build().unwrap();
        let keys: Vec<u64> = (0..1000).collect();
        assert!(old.check_batch(&keys).iter().all(|v| v.is_new()));
        let manifest = serde_json::to_vec_pretty(&s).unwrap();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&LEGACY_VERSION.to_le_bytes());
        file.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
        file.extend_from_slice(&manifest);
        let sum = xxh3_64(&file);
        file.extend_from_slice(&sum.to_le_bytes());
        old.snapshot(&mut file).unwrap();
        std::fs::write(dir.path().join(LEGACY_FILE), &file).unwrap();
        assert_eq!(saved_settings(dir.path(), &s).unwrap(), Some(s.clone()));
        let engine = open(dir.path(), &s, Durability::Os).unwrap();
        assert!(engine.check_batch(&keys).iter().all(|v| v.is_duplicate()));
        assert!(engine.check(&5000u64).is_new());
        assert!(!dir.path().join(LEGACY_FILE).exists());
        drop(engine);
        assert_eq!(saved_settings(dir.path(), &s).unwrap(), Some(s.clone()));
        let engine = open(dir.path(), &s, Durability::Os).unwrap();
        assert!(engine.check(&5000u64).is_duplicate());
        assert!(engine.check(&999u64).is_duplicate());
    }
}
