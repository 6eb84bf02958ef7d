//! One run at a time per `--state` directory: an exclusive `flock` on
//! `DIR/dedup.lock`, held for the whole run and released when the process
//! ends (however it ends: the kernel drops the lock with the descriptor).
//! The file names its holder (pid and start time) for the refusal message
//! of a second run.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::StateError;

/// The lock file's name inside `--state DIR`.
pub const LOCK_FILE: &str = "dedup.lock";

/// The held lock of a state directory; released on drop.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Locks `dir` (created if missing) for this run, checks that a file
    /// can be created in it, and removes temporary files that runs which
    /// died left behind.
    ///
    /// # Errors
    /// [`StateError::Busy`] when another run holds the lock;
    /// [`StateError::Io`] when the directory cannot be made, locked or
    /// written.
    pub fn acquire(dir: &Path) -> Result<Self, StateError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |error| StateError::Io { path, error }
        };
        if dir.exists() && !dir.is_dir() {
            return Err(StateError::Io {
                path: dir.to_owned(),
                error: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
            });
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(LOCK_FILE);
        // Never through a symbolic link: a link planted at the lock's name
        // would make the run truncate the file it points to.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::WouldBlock {
                return Err(StateError::Io { path, error });
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(StateError::Busy {
                dir: dir.to_owned(),
                holder: if holder.is_empty() {
                    "a run that has not written its name yet".to_owned()
                } else {
                    holder
                },
            });
        }
        let started = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        let note = format!("pid {}, started {started}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(note.as_bytes()))
            .map_err(io_err(&path))?;
        // Held: nobody else writes here now, so temporary files are dead
        // runs' leftovers. Then prove a file can be created (before any
        // input is read, not at the save).
        remove_stale_temporaries(dir).map_err(io_err(dir))?;
        let probe = temporary_path(dir, "probe");
        create_exclusive(&probe).map_err(io_err(&probe))?;
        fs::remove_file(&probe).map_err(io_err(&probe))?;
        Ok(StateLock { _file: file })
    }
}

/// Prefix of every temporary file a run makes in the state directory.
const TEMPORARY_PREFIX: &str = ".dedup.state.";
/// Suffix of every temporary file a run makes in the state directory.
const TEMPORARY_SUFFIX: &str = ".tmp";

/// `DIR/.dedup.state.<pid>.<what>.tmp`.
pub fn temporary_path(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!(
        "{TEMPORARY_PREFIX}{}.{what}{TEMPORARY_SUFFIX}",
        std::process::id()
    ))
}

/// Creates `path` new, never opening what is there already (a file, or a
/// symbolic link planted to redirect the write): `O_CREAT | O_EXCL`.
pub fn create_exclusive(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn remove_stale_temporaries(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMPORARY_PREFIX) && name.ends_with(TEMPORARY_SUFFIX) {
            // A link is removed, not followed.
            match fs::remove_file(entry.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path()).unwrap();
        match StateLock::acquire(dir.path()) {
            Err(StateError::Busy { holder, .. }) => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id())),
                    "{holder}"
                );
                assert!(holder.contains("started 20"), "{holder}");
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(held);
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn stale_temporaries_are_removed_and_links_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let stale = dir.path().join(".dedup.state.99999.tmp");
        std::os::unix::fs::symlink(&victim, &stale).unwrap();
        let _lock = StateLock::acquire(dir.path()).unwrap();
        assert!(
            fs::symlink_metadata(&stale).is_err(),
            "the stale link is gone"
        );
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        let planted = temporary_path(dir.path(), "save");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        assert_eq!(
            create_exclusive(&planted).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }
}
