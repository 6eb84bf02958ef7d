//! `tracing` events where something an operator cares about happens
//! (feature `tracing`): rotations (debug), Redis connection failures and
//! reconnects (warn / info), decisions made without the exact tier (warn),
//! snapshot save and restore (info). Without the feature the macro expands
//! to nothing.

/// `event!(level, fields…, "message")`, forwarded to `tracing` when the
/// feature is on; evaluates nothing otherwise.
macro_rules! event {
    ($level:ident, $($arg:tt)+) => {{
        #[cfg(feature = "tracing")]
        {
            ::tracing::$level!(target: "tiered_dedup", $($arg)+);
        }
    }};
}

pub(crate) use event;
