//! What both stores' SQL shares: statements that must hit a row, rows
//! turned into records, the column conventions (0/1 booleans, BIGINT
//! limits).

use crate::error::PgResult;
use m2mhub_identity::RegistryError;
use postgres::types::ToSql;
use postgres::{GenericClient, Row};

/// Execute one statement, whatever it hits.
pub(crate) fn execute(
    c: &mut impl GenericClient,
    sql: &str,
    p: &[&(dyn ToSql + Sync)],
) -> PgResult<()> {
    c.execute(sql, p)?;
    Ok(())
}

/// Execute an UPDATE/DELETE that must hit a row (`NotFound(what)` if none).
pub(crate) fn execute_one(
    c: &mut impl GenericClient,
    what: &str,
    sql: &str,
    p: &[&(dyn ToSql + Sync)],
) -> PgResult<()> {
    if c.execute(sql, p)? == 0 {
        return Err(RegistryError::NotFound(what.into()).into());
    }
    Ok(())
}

/// A limit as PostgreSQL's BIGINT.
pub(crate) fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Every row of `sql`, each turned into a `T` by `f`.
pub(crate) fn rows<T>(
    c: &mut impl GenericClient,
    sql: &str,
    p: &[&(dyn ToSql + Sync)],
    f: impl Fn(&Row) -> PgResult<T>,
) -> PgResult<Vec<T>> {
    c.query(sql, p)?.iter().map(f).collect()
}

/// A boolean as stored: INTEGER 0/1, as in SQLite.
pub(crate) fn flag(b: bool) -> i32 {
    i32::from(b)
}
