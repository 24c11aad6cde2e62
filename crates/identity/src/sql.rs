//! SQLite plumbing every domain store shares: opening `registry.db` with the
//! platform's settings, per-domain schema migrations, and the column
//! conversions that turn a bad stored value into a typed error.
//!
//! Each domain (identity here, fleet operations in `m2mhub-fleet`) owns its
//! tables and lists its own [`Migration`]s; `schema_migrations` records which
//! of them a database has, per domain, so domains evolve independently and a
//! database written by a newer build is refused with a clear message instead
//! of being misread.

use crate::error::{RegistryError, Result};
use rusqlite::{params, Connection};
use std::path::Path;
use std::time::Duration;

/// One step of a domain's schema, applied once, in version order.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    /// Statements run in one transaction with the version record.
    pub sql: &'static str,
}

/// Open (or create) a database file with the settings every store uses: WAL
/// so readers (and `m2mhub audit verify` on a live system) never block the
/// writer, `synchronous = NORMAL` (consistent after a crash, only the last
/// transactions at risk on power loss), and a busy timeout so the domains'
/// writers, each on its own connection, wait for each other.
pub fn open_sqlite(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "SQLite did not switch to WAL mode");
    }
    conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
    Ok(conn)
}

/// Bring `domain`'s tables up to the newest of `migrations`.
pub fn migrate(conn: &mut Connection, domain: &str, migrations: &[Migration]) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            domain TEXT NOT NULL,
            version INTEGER NOT NULL,
            applied_ms BIGINT NOT NULL,
            PRIMARY KEY (domain, version)
        );",
    )?;
    let have: Option<i64> = conn.query_row(
        "SELECT MAX(version) FROM schema_migrations WHERE domain = ?",
        params![domain],
        |r| r.get(0),
    )?;
    let have = have.unwrap_or(0);
    let known = migrations.iter().map(|m| i64::from(m.version)).max();
    if known.is_some_and(|k| have > k) {
        return Err(RegistryError::Storage(format!(
            "the {domain} tables are at schema version {have}, newer than this build \
             understands ({}); run the newer m2mhub or restore a backup",
            known.unwrap_or(0)
        )));
    }
    for m in migrations.iter().filter(|m| i64::from(m.version) > have) {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (domain, version, applied_ms) VALUES (?, ?, ?)",
            params![domain, m.version, crate::now_ms()],
        )?;
        tx.commit()?;
        tracing::debug!(domain, version = m.version, "schema migration applied");
    }
    Ok(())
}

/// Execute an UPDATE/DELETE that must hit a row (`NotFound(what)` if none).
pub fn execute_one(c: &Connection, what: &str, sql: &str, p: impl rusqlite::Params) -> Result<()> {
    if c.execute(sql, p)? == 0 {
        return Err(RegistryError::NotFound(what.into()));
    }
    Ok(())
}

pub fn corrupt(what: &str) -> RegistryError {
    RegistryError::Storage(format!("corrupt stored {what}"))
}

pub fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| RegistryError::Validation(format!("{v} is out of range")))
}

pub fn u64_of(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(what))
}

pub fn u32_of(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| corrupt(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &[Migration] = &[
        Migration {
            version: 1,
            sql: "CREATE TABLE IF NOT EXISTS t (a INTEGER);",
        },
        Migration {
            version: 2,
            sql: "ALTER TABLE t ADD COLUMN b INTEGER;",
        },
    ];

    #[test]
    fn migrations_apply_once_per_domain_and_newer_schemas_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.db");
        let mut c = open_sqlite(&path).expect("open");
        migrate(&mut c, "one", M).expect("first");
        // Again: nothing to do (ALTER TABLE would fail if rerun).
        migrate(&mut c, "one", M).expect("second");
        c.execute("INSERT INTO t (a, b) VALUES (1, 2)", [])
            .expect("both columns");
        // Another domain's versions are its own.
        migrate(&mut c, "two", &M[..1]).expect("other domain");
        // A build that knows only version 1 refuses a version-2 database.
        let e = migrate(&mut c, "one", &M[..1]).expect_err("newer schema");
        assert!(e.to_string().contains("newer than this build"), "{e}");
    }
}
