//! The tables, their DDL (versioned, idempotent), and the check made at
//! every connect.
//!
//! ```text
//! <prefix>_meta     (name text primary key, value text)      schema_version, slice_nanos
//! <prefix>_records  (fp uuid, slice int8, at int8, payload int8, result bytea)
//!                   partitioned by list (slice % 10): <prefix>_records_0 … _9,
//!                   each with primary key (fp)
//! <prefix>_leases   (fp uuid primary key, token int8, at int8, until int8, payload int8)
//! <prefix>_tokens   sequence: fencing tokens
//! ```
//!
//! A record is a completed key: its fingerprint (as a `uuid`, 16 bytes),
//! the slice it was written in, the time it was first accepted (the
//! window's anchor, nanoseconds since the epoch), and for a committed
//! claim its payload fingerprint and result. Slice `s` lives in ring
//! partition `s % 10`; a ring partition is emptied whole (`TRUNCATE`) when
//! its slice is eight slices old, so expiry never scans a live row (see
//! [`RING`]). A lease is a shared-mode claim in flight: taken, committed
//! (the lease row becomes a record), released or expired.

use postgres::Client;

use crate::config::{PgConfig, SchemaAction};
use crate::error::PgError;

/// The schema version this library writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Ring partitions of the records table. At slice `c` the engine reads
/// slices `c−6 ..= c`; slice `c−7` is kept for an instance whose clock is a
/// slice behind, and slice `c+1`'s partition is left alone for one a slice
/// ahead: entering slice `c` empties the partition of slice `c−8`, which
/// slice `c+2` uses next. Ten partitions: seven live, one behind, the one
/// being emptied, one ahead.
pub const RING: u64 = 10;

/// How far back of the current slice the partition emptied on entering it
/// lies (see [`RING`]).
pub(crate) const RETIRE_BACK: u64 = 8;

/// The quoted, qualified names of one tier's tables (built only from
/// validated identifiers).
#[derive(Clone, Debug)]
pub(crate) struct Names {
    pub(crate) meta: String,
    pub(crate) records: String,
    pub(crate) rings: Vec<String>,
    pub(crate) leases: String,
    pub(crate) tokens: String,
    /// `<prefix>_claim_read(keys, wait, fps, slices)`: isolation, locks,
    /// leases and records (see the DDL).
    pub(crate) claim_read_fn: String,
    /// `<prefix>_record(ring, fps, slices, ats, payloads)`.
    pub(crate) record_fn: String,
    /// `<prefix>_complete(ring, fps, slices, results)`.
    pub(crate) complete_fn: String,
    /// `schema.prefix`, unquoted, for messages and the DDL lock.
    pub(crate) label: String,
    schema: String,
}

impl Names {
    pub(crate) fn new(config: &PgConfig) -> Self {
        let q = |table: &str| format!("\"{}\".\"{}_{table}\"", config.schema, config.prefix);
        Names {
            meta: q("meta"),
            records: q("records"),
            rings: (0..RING).map(|r| q(&format!("records_{r}"))).collect(),
            leases: q("leases"),
            tokens: q("tokens"),
            claim_read_fn: q("claim_read"),
            record_fn: q("record"),
            complete_fn: q("complete"),
            label: format!("{}.{}", config.schema, config.prefix),
            schema: format!("\"{}\"", config.schema),
        }
    }

    /// What [`crate::fp::lock_key`] folds into every advisory-lock key of
    /// these tables.
    pub(crate) fn lock_salt(&self) -> u64 {
        name_hash(self.label.as_bytes())
    }

    /// The ring partition of slice `slice`.
    pub(crate) fn ring(&self, slice: u64) -> &str {
        &self.rings[(slice % RING) as usize]
    }
}

/// A 64-bit FNV-1a hash (no dependency for one hash of a name).
fn name_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The DDL of version [`SCHEMA_VERSION`] for `config`'s schema and prefix:
/// what [`SchemaAction::Create`] runs (every statement idempotent), for a
/// DBA to run by hand with [`SchemaAction::CheckOnly`].
///
/// # Errors
/// [`PgError::Config`] for a schema or prefix that is not a plain
/// identifier.
pub fn schema_sql(config: &PgConfig) -> Result<String, PgError> {
    config.validate()?;
    Ok(ddl(&Names::new(config)))
}

fn ddl(n: &Names) -> String {
    let mut sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};\n\
         CREATE TABLE IF NOT EXISTS {meta} (name text PRIMARY KEY, value text NOT NULL);\n\
         CREATE TABLE IF NOT EXISTS {records} (\n  \
           fp uuid NOT NULL,\n  \
           slice bigint NOT NULL,\n  \
           at bigint NOT NULL,\n  \
           payload bigint,\n  \
           result bytea\n\
         ) PARTITION BY LIST ((slice % {RING}));\n",
        schema = n.schema,
        meta = n.meta,
        records = n.records,
    );
    for (r, ring) in n.rings.iter().enumerate() {
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {ring} PARTITION OF {records} (PRIMARY KEY (fp)) FOR VALUES IN ({r});\n",
            records = n.records
        ));
    }
    sql.push_str(&format!(
        "CREATE TABLE IF NOT EXISTS {leases} (\n  \
           fp uuid PRIMARY KEY,\n  \
           token bigint NOT NULL,\n  \
           at bigint NOT NULL,\n  \
           until bigint NOT NULL,\n  \
           payload bigint\n\
         );\n\
         CREATE SEQUENCE IF NOT EXISTS {tokens};\n\
         INSERT INTO {meta} VALUES ('schema_version', '{SCHEMA_VERSION}') ON CONFLICT (name) DO NOTHING;\n",
        leases = n.leases,
        tokens = n.tokens,
        meta = n.meta,
    ));
    // What a transactional claim does in the caller's transaction, as
    // PL/pgSQL functions: their static statements keep cached plans for
    // the session, and their SET clauses (no sequential scans, no parallel
    // workers) hold during the call and never touch the caller's session.
    //
    // <prefix>_claim_read: the isolation level (kind 3), the keys' advisory
    // locks taken in the order given (waiting, or not: a busy key is a kind
    // 4 row), then — statements of their own, so under READ COMMITTED their
    // snapshots are taken after the locks — the keys' leases (kind 0) and
    // records in the slices asked (kind 1; `slices[r + 1]` for ring r, NULL
    // for none).
    let mut read = format!(
        "  RETURN QUERY SELECT 0::int2, l.fp, l.token, l.at, l.until, l.payload, NULL::bytea \
         FROM {leases} AS l WHERE l.fp = ANY(fps);\n",
        leases = n.leases
    );
    let mut record = String::new();
    let mut complete = String::new();
    for (r, ring) in n.rings.iter().enumerate() {
        read.push_str(&format!(
            "  IF slices[{i}] IS NOT NULL THEN\n    RETURN QUERY SELECT 1::int2, r.fp, r.slice, r.at, NULL::int8, r.payload, r.result \
             FROM {ring} AS r WHERE r.fp = ANY(fps) AND r.slice = slices[{i}];\n  END IF;\n",
            i = r + 1
        ));
        record.push_str(&format!(
            "    WHEN {r} THEN\n      INSERT INTO {ring} AS x (fp, slice, at, payload, result) \
             SELECT u.fp, u.slice, u.at, u.payload, NULL FROM unnest(fps, slices, ats, payloads) AS u(fp, slice, at, payload) \
             ON CONFLICT (fp) DO UPDATE SET slice = excluded.slice, at = excluded.at, \
             payload = excluded.payload, result = NULL;\n"
        ));
        complete.push_str(&format!(
            "    WHEN {r} THEN\n      UPDATE {ring} AS x SET result = u.result \
             FROM unnest(fps, slices, results) AS u(fp, slice, result) \
             WHERE x.fp = ANY(fps) AND x.fp = u.fp AND x.slice = u.slice;\n"
        ));
    }
    sql.push_str(&format!(
        "CREATE OR REPLACE FUNCTION {claim_read_fn}(keys bigint[], wait boolean, fps uuid[], slices bigint[])\n\
         RETURNS TABLE (kind int2, fp uuid, a bigint, b bigint, c bigint, payload bigint, result bytea)\n\
         LANGUAGE plpgsql VOLATILE\n{PLANNER}\
         AS $f$\nDECLARE\n  k bigint;\n  isolation text := current_setting('transaction_isolation');\nBEGIN\n  \
         RETURN QUERY SELECT 3::int2, NULL::uuid, NULL::int8, NULL::int8, NULL::int8, NULL::int8, convert_to(isolation, 'UTF8');\n  \
         IF isolation <> 'read committed' THEN\n    RETURN;\n  END IF;\n  \
         FOREACH k IN ARRAY keys LOOP\n    IF wait THEN\n      PERFORM pg_advisory_xact_lock(k);\n    \
         ELSIF NOT pg_try_advisory_xact_lock(k) THEN\n      \
         RETURN QUERY SELECT 4::int2, NULL::uuid, k, NULL::int8, NULL::int8, NULL::int8, NULL::bytea;\n    \
         END IF;\n  END LOOP;\n{read}END\n$f$;\n\
         CREATE OR REPLACE FUNCTION {record_fn}(ring int, fps uuid[], slices bigint[], ats bigint[], payloads bigint[])\n\
         RETURNS void LANGUAGE plpgsql VOLATILE\n{PLANNER}\
         AS $f$\nBEGIN\n  DELETE FROM {leases} AS l WHERE l.fp = ANY(fps);\n  CASE ring\n{record}  END CASE;\nEND\n$f$;\n\
         CREATE OR REPLACE FUNCTION {complete_fn}(ring int, fps uuid[], slices bigint[], results bytea[])\n\
         RETURNS void LANGUAGE plpgsql VOLATILE\n{PLANNER}\
         AS $f$\nBEGIN\n  CASE ring\n{complete}  END CASE;\nEND\n$f$;\n",
        claim_read_fn = n.claim_read_fn,
        record_fn = n.record_fn,
        complete_fn = n.complete_fn,
        leases = n.leases,
    ));
    sql
}

/// The planner setting of every statement on the records: every read
/// names its keys (`fp = ANY($1)`), so it is an index scan — unless the
/// planner believes the partition nearly empty, which a ring partition
/// filled since its last `ANALYZE` (every slice, after its `TRUNCATE`)
/// is: then it scanned 30 000 rows for 500 keys, 38 ms per lookup batch
/// instead of 0.3 (measured with auto_explain in the bench). The tier's
/// own sessions set it at connect; the functions above per call.
/// No parallel plans either: a parallel worker costs 5–20 ms to start, which
/// the planner, misled the same way, took for a bargain (45 ms lookups of
/// 500 keys in the bench).
const PLANNER: &str = "SET enable_seqscan = off SET max_parallel_workers_per_gather = 0\n";

/// [`PLANNER`] as connection options.
pub(crate) const PLANNER_OPTIONS: &str =
    " -c enable_seqscan=off -c max_parallel_workers_per_gather=0";

/// Creates (if asked) and checks the tables.
pub(crate) fn prepare(
    client: &mut Client,
    config: &PgConfig,
    names: &Names,
) -> Result<(), PgError> {
    if config.schema_action == SchemaAction::Create {
        let mut tx = client.transaction()?;
        // Two processes creating at once would race on the catalogs.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!("tiered-dedup schema {}", names.label)],
        )?;
        tx.batch_execute(&ddl(names))?;
        tx.commit()?;
    }
    let version = client
        .query_opt(
            &format!(
                "SELECT value FROM {} WHERE name = 'schema_version'",
                names.meta
            ),
            &[],
        )
        .map_err(|e| {
            if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) {
                PgError::Schema(format!(
                    "the tables of {} do not exist: create them with tiered_dedup_postgres::schema_sql \
                     (docs/postgres.md), or use SchemaAction::Create",
                    names.label
                ))
            } else {
                PgError::Db(e)
            }
        })?;
    let version: Option<String> = version.map(|r| r.get(0));
    match version.as_deref().map(str::parse::<u32>) {
        Some(Ok(SCHEMA_VERSION)) => {}
        Some(Ok(v)) if v > SCHEMA_VERSION => {
            return Err(PgError::Schema(format!(
                "the tables of {} are at version {v}, newer than this library's {SCHEMA_VERSION}: upgrade tiered-dedup-postgres",
                names.label
            )))
        }
        other => {
            return Err(PgError::Schema(format!(
                "the tables of {} carry schema version {other:?}, not {SCHEMA_VERSION}: \
                 migrate them with the SQL of schema_sql (docs/postgres.md)",
                names.label
            )))
        }
    }
    for table in names.rings.iter().chain([&names.leases, &names.records]) {
        let found: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[table])?
            .get(0);
        if found.is_none() {
            return Err(PgError::Schema(format!(
                "table {table} is missing: recreate the tables with schema_sql (docs/postgres.md)"
            )));
        }
    }
    Ok(())
}

/// Agrees on the slicing: the first user stores its slice length; a later
/// one with another is refused (its slices would land in the wrong
/// partitions, and its window would be judged against the wrong ones).
pub(crate) fn agree_slicing(
    client: &mut Client,
    names: &Names,
    slice_nanos: Option<u64>,
) -> Result<(), PgError> {
    let ours = slice_nanos.unwrap_or(0).to_string();
    client.execute(
        &format!(
            "INSERT INTO {} VALUES ('slice_nanos', $1) ON CONFLICT (name) DO NOTHING",
            names.meta
        ),
        &[&ours],
    )?;
    let stored: String = client
        .query_one(
            &format!(
                "SELECT value FROM {} WHERE name = 'slice_nanos'",
                names.meta
            ),
            &[],
        )?
        .get(0);
    if stored != ours {
        let describe = |s: &str| match s {
            "0" => "no window".to_owned(),
            s => format!("slices of {s} ns"),
        };
        return Err(PgError::Schema(format!(
            "the tables of {} were made for {}, and this engine cuts its window into {}: \
             use the same window and allowed lateness everywhere, or another prefix",
            names.label,
            describe(&stored),
            describe(&ours)
        )));
    }
    Ok(())
}

/// Refuses a server that only reads (a standby, or read-only by default).
pub(crate) fn check_writable(client: &mut Client, target: &str) -> Result<(), PgError> {
    let row = client.query_one(
        "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on'",
        &[],
    )?;
    let (recovery, read_only): (bool, bool) = (row.get(0), row.get(1));
    if recovery {
        return Err(PgError::ReadOnly {
            target: target.to_owned(),
            why: "a hot standby in recovery",
        });
    }
    if read_only {
        return Err(PgError::ReadOnly {
            target: target.to_owned(),
            why: "default_transaction_read_only is on",
        });
    }
    Ok(())
}

/// Empties the ring partition of slice `slice` (eight slices old) if it
/// can get the lock within 200 ms; false if not (a long transaction reads
/// it: the next rotation tries again, and a stale row is never read, since
/// every read names the slice it wants).
pub(crate) fn retire(client: &mut Client, names: &Names, slice: u64) -> bool {
    let run = |client: &mut Client| -> Result<(), postgres::Error> {
        let mut tx = client.transaction()?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '200ms'; TRUNCATE {}",
            names.ring(slice)
        ))?;
        tx.commit()
    };
    run(client).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ddl_names_every_table_quoted() {
        let sql = schema_sql(&PgConfig::new("").schema("app").prefix("orders")).unwrap();
        assert!(
            sql.contains("\"app\".\"orders_records_9\" PARTITION OF \"app\".\"orders_records\"")
        );
        assert!(sql.contains("CREATE SEQUENCE IF NOT EXISTS \"app\".\"orders_tokens\""));
        assert!(schema_sql(&PgConfig::new("").prefix("x; drop")).is_err());
    }
}
