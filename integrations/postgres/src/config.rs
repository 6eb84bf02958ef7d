//! `PgConfig`: where the tier connects, which tables it uses, and what a
//! failure means.

use std::time::Duration;

use crate::error::PgError;

/// What a PostgreSQL failure does to a verdict (the same three choices as
/// the Redis tier's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Keys that need the database get `Verdict::Unavailable` (claims
    /// `Claim::Unavailable`): the caller retries them later. Nothing is
    /// accepted that could be a duplicate.
    #[default]
    FailClosed,
    /// Keys that need the database are treated as new (counted in
    /// [`crate::PgStats::degraded_decisions`]): availability over
    /// exactness.
    FailOpen,
    /// Keys are judged by a local memory tier that holds every mark this
    /// process made (counted in [`crate::PgStats::degraded_decisions`]):
    /// exact for this process's own keys, blind to other engines' while
    /// the database is down.
    FallbackToMemory,
}

impl FailurePolicy {
    /// True for [`FailurePolicy::FailClosed`].
    #[must_use]
    pub fn is_fail_closed(self) -> bool {
        self == FailurePolicy::FailClosed
    }
}

/// What the tier does about its tables when it connects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SchemaAction {
    /// Creates whatever is missing (idempotent DDL, serialised between
    /// processes by an advisory lock), then checks the version. The
    /// database user needs `CREATE` on the schema.
    #[default]
    Create,
    /// Only checks that the tables exist at this library's version: for
    /// deployments where migrations are run by a DBA from
    /// [`crate::schema_sql`]. A missing or older schema is an error that
    /// says so.
    CheckOnly,
}

/// Configures a [`crate::PgTier`] or [`crate::PgClaims`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PgConfig {
    /// A libpq-style connection string: `postgresql://user:pw@host:port/db`
    /// or `host=… user=… dbname=…`.
    pub url: String,
    /// The schema the tables live in. Default: `public`.
    pub schema: String,
    /// The prefix of every table name (`<prefix>_records`,
    /// `<prefix>_leases`, …). Default: `td`. Several tiers with different
    /// prefixes (or namespaces) can share one database.
    pub prefix: String,
    /// What the tier does about its tables. Default: create them.
    pub schema_action: SchemaAction,
    /// What a failure means. Default: fail closed.
    pub policy: FailurePolicy,
    /// Connect timeout, and the `statement_timeout` of the tier's own
    /// sessions. Default: 5 s.
    pub timeout: Duration,
    /// Marks kept for retry while the database is unreachable, per shard
    /// (the batch in flight included). Default: 100 000.
    pub max_unsent_marks: usize,
    /// `synchronous_commit` of the tier's own sessions (not of the caller's
    /// transactions): `None` keeps the server's (`on` by default). `off`
    /// lets a mark batch return before its WAL is flushed: a server crash
    /// may then lose the last few hundred milliseconds of marks (never
    /// corrupt anything); a transactional claim always commits as the
    /// caller's transaction does. Default: `None`.
    pub synchronous_commit: Option<bool>,
    /// Write mark batches on a connection and a thread of their own per
    /// shard, while the engine goes on (`true`), or in the engine's call
    /// (`false`: one connection per shard, and each mark batch's latency
    /// under the shard's lock). Default: `true`.
    pub pipeline_marks: bool,
}

impl PgConfig {
    /// A tier at `url` with the defaults.
    #[must_use]
    pub fn new(url: &str) -> Self {
        PgConfig {
            url: url.to_owned(),
            schema: "public".to_owned(),
            prefix: "td".to_owned(),
            schema_action: SchemaAction::Create,
            policy: FailurePolicy::FailClosed,
            timeout: Duration::from_secs(5),
            max_unsent_marks: 100_000,
            synchronous_commit: None,
            pipeline_marks: true,
        }
    }

    /// Pipelined mark batches (`true`, the default) or written in the
    /// engine's call.
    #[must_use]
    pub fn pipeline_marks(mut self, on: bool) -> Self {
        self.pipeline_marks = on;
        self
    }

    /// With the tables in `schema`.
    #[must_use]
    pub fn schema(mut self, schema: &str) -> Self {
        schema.clone_into(&mut self.schema);
        self
    }

    /// With table names starting `prefix_`.
    #[must_use]
    pub fn prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.prefix);
        self
    }

    /// With `policy` on failures.
    #[must_use]
    pub fn policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Create the tables, or only check them.
    #[must_use]
    pub fn schema_action(mut self, action: SchemaAction) -> Self {
        self.schema_action = action;
        self
    }

    /// With this connect and statement timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// With `synchronous_commit` on or off for the tier's own sessions.
    #[must_use]
    pub fn synchronous_commit(mut self, on: bool) -> Self {
        self.synchronous_commit = Some(on);
        self
    }

    /// With at most `marks` marks kept per shard while the database is down.
    #[must_use]
    pub fn max_unsent_marks(mut self, marks: usize) -> Self {
        self.max_unsent_marks = marks;
        self
    }

    /// The parsed connection settings, with the tier's timeouts.
    pub(crate) fn client_config(&self) -> Result<postgres::Config, PgError> {
        let mut c: postgres::Config = self.url.parse().map_err(|e: postgres::Error| {
            PgError::Config(format!(
                "the connection string is not valid ({e}): write postgresql://user:password@host:port/database"
            ))
        })?;
        c.connect_timeout(self.timeout);
        c.application_name("tiered-dedup");
        let mut options = format!(
            "-c statement_timeout={} -c lock_timeout={}",
            self.timeout.as_millis().max(1),
            self.timeout.as_millis().max(1)
        );
        options.push_str(crate::schema::PLANNER_OPTIONS);
        if let Some(on) = self.synchronous_commit {
            options.push_str(if on {
                " -c synchronous_commit=on"
            } else {
                " -c synchronous_commit=off"
            });
        }
        c.options(&options);
        Ok(c)
    }

    /// Checks the names: an identifier is a letter or `_`, then letters,
    /// digits or `_`, lower case, at most 40 bytes (table names are built
    /// from them, always quoted, never from anything else).
    pub(crate) fn validate(&self) -> Result<(), PgError> {
        check_identifier("schema", &self.schema)?;
        check_identifier("prefix", &self.prefix)?;
        if self.timeout.is_zero() {
            return Err(PgError::Config(
                "timeout is zero: give the connect and statement timeout, e.g. 5 s".to_owned(),
            ));
        }
        Ok(())
    }
}

fn check_identifier(what: &str, name: &str) -> Result<(), PgError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PgError::Config(format!(
            "{what} {name:?} is not a plain identifier: use 1 to 40 of a-z, 0-9 and _, not starting with a digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain_lower_case_names() {
        for ok in ["td", "_x", "orders_dedup_2"] {
            assert!(check_identifier("prefix", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Td",
            "2td",
            "td-x",
            "td\"; DROP TABLE x; --",
            "a b",
            &"x".repeat(41),
        ] {
            assert!(check_identifier("prefix", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_url_is_a_config_error() {
        let e = PgConfig::new("postgresql://u@h:notaport/db")
            .client_config()
            .unwrap_err();
        assert!(e.to_string().contains("not valid"), "{e}");
    }
}
