//! Fingerprints as PostgreSQL `uuid`s (16 bytes, compared as bytes), and
//! the advisory-lock key of a fingerprint.

use std::error::Error;

use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tiered_dedup::Fingerprint;

/// A fingerprint sent or read as a `uuid` (its 16 little-endian bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Fp(pub(crate) Fingerprint);

impl ToSql for Fp {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.0.to_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Fp {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        let bytes: [u8; 16] = raw
            .try_into()
            .map_err(|_| format!("a uuid of {} bytes", raw.len()))?;
        Ok(Fp(Fingerprint::from_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }
}

/// The advisory-lock key of a fingerprint on one set of tables (`salt`:
/// [`crate::schema::Names::lock_salt`]): both halves and the salt folded
/// into one `bigint`. Advisory locks are database-wide, so the salt keeps
/// two tiers (prefixes, schemas) of one database from taking each other's
/// keys for their own; two keys that share a lock only serialise each
/// other.
pub(crate) fn lock_key(fp: Fingerprint, salt: u64) -> i64 {
    (fp.high() ^ fp.low().rotate_left(32) ^ salt) as i64
}

/// Nanoseconds as a `bigint` (times are below 2^63 until the year 2262).
pub(crate) fn nanos(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// A `bigint` read back as nanoseconds.
pub(crate) fn from_nanos(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
