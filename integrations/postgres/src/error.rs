//! Errors of building a tier or handle (connect, authenticate, schema),
//! and of transactional claims.

use postgres::error::SqlState;

/// Why a [`crate::PgTier`] or [`crate::PgClaims`] could not be built, or
/// why a transactional claim failed. Each message says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The configuration is invalid (connection string, names, timeout).
    #[error("PostgreSQL tier configuration: {0}")]
    Config(String),
    /// The server could not be reached (refused, timed out, closed).
    #[error("cannot reach PostgreSQL at {target}: {source}")]
    Unreachable {
        /// Host and port (no password).
        target: String,
        /// The client's error.
        source: postgres::Error,
    },
    /// The server refused the user or password.
    #[error("PostgreSQL refused the login of user {user:?}: check the user name and password ({source})")]
    Authentication {
        /// The user name.
        user: String,
        /// The server's error.
        source: postgres::Error,
    },
    /// The database does not exist.
    #[error("database {database:?} does not exist: create it (CREATE DATABASE {database}) or fix the URL")]
    NoDatabase {
        /// The database name.
        database: String,
    },
    /// The server only reads (a hot standby, or
    /// `default_transaction_read_only`): the tier writes.
    #[error("PostgreSQL at {target} is read-only ({why}): connect to the primary")]
    ReadOnly {
        /// Host and port.
        target: String,
        /// A standby in recovery, or read-only transactions by default.
        why: &'static str,
    },
    /// The tables are missing, of another version, or made for another
    /// slicing.
    #[error("PostgreSQL tier schema: {0}")]
    Schema(String),
    /// A transactional claim needs `READ COMMITTED` or `SERIALIZABLE`.
    #[error("transactional claims need READ COMMITTED (the default) or SERIALIZABLE, not {0}: a REPEATABLE READ snapshot predates the wait for another holder, so its commit would be missed")]
    Isolation(String),
    /// Any other database error.
    #[error("PostgreSQL: {0}")]
    Db(#[from] postgres::Error),
}

impl PgError {
    /// True when the database refused a statement for a serialization
    /// failure or a deadlock: retry the whole transaction.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            PgError::Db(e) => matches!(
                e.code(),
                Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::LOCK_NOT_AVAILABLE
            ),
            _ => false,
        }
    }

    /// The error of a failed connection attempt, told apart by cause.
    pub(crate) fn from_connect(config: &postgres::Config, e: postgres::Error) -> PgError {
        let target = describe_target(config);
        match e.code() {
            Some(c)
                if *c == SqlState::INVALID_PASSWORD
                    || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
            {
                PgError::Authentication {
                    user: config.get_user().unwrap_or("").to_owned(),
                    source: e,
                }
            }
            Some(c) if *c == SqlState::INVALID_CATALOG_NAME => PgError::NoDatabase {
                database: config
                    .get_dbname()
                    .or(config.get_user())
                    .unwrap_or("")
                    .to_owned(),
            },
            Some(_) => PgError::Db(e),
            None => PgError::Unreachable { target, source: e },
        }
    }
}

/// `host:port` of a configuration, for messages (never the password).
pub(crate) fn describe_target(config: &postgres::Config) -> String {
    let host = config.get_hosts().first().map_or_else(
        || "localhost".to_owned(),
        |h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            postgres::config::Host::Unix(p) => p.display().to_string(),
        },
    );
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}
