//! SIGINT and SIGTERM: the first asks the run to stop gracefully (stop
//! reading, judge and write what was read, write the marks, save the state,
//! print the summary); a second one ends the process at once.
//!
//! `signal-hook` installs the handlers: they only store into atomics (what a
//! signal handler may safely do), and the run polls them between chunks and
//! while it waits for input.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};

/// The signals a run stops on, and the exit status each ends it with
/// (128 + the signal number, as shells report a death by that signal).
const STOP_SIGNALS: [(i32, u8); 2] = [(SIGINT, 130), (SIGTERM, 143)];

/// Which stop signal arrived first, if any.
#[derive(Clone)]
pub struct StopSignals {
    /// Raised by the first signal; a second one with it raised exits.
    raised: Arc<AtomicBool>,
    /// The first signal's number (0: none yet).
    which: Arc<AtomicUsize>,
}

impl StopSignals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// When a handler cannot be installed.
    pub fn install() -> io::Result<Self> {
        let raised = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicUsize::new(0));
        for (signal, status) in STOP_SIGNALS {
            // Registered first, so it sees the flag as the earlier signal
            // left it: the second signal exits (no flush, no summary).
            signal_hook::flag::register_conditional_shutdown(
                signal,
                i32::from(status),
                Arc::clone(&raised),
            )?;
            signal_hook::flag::register_usize(signal, Arc::clone(&which), signal as usize)?;
            signal_hook::flag::register(signal, Arc::clone(&raised))?;
        }
        Ok(StopSignals { raised, which })
    }

    /// The flag the first signal raises (the reader stops on it).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.raised)
    }

    /// The exit status of the signal that asked to stop, if one did.
    pub fn requested(&self) -> Option<(&'static str, u8)> {
        if !self.raised.load(Ordering::Acquire) {
            return None;
        }
        let which = self.which.load(Ordering::Acquire) as i32;
        Some(match which {
            SIGTERM => ("SIGTERM", 143),
            _ => ("SIGINT", 130),
        })
    }
}
