//! Schemas and migrations. Each domain has a PostgreSQL schema of its own
//! (`identity`, `fleet`) holding its tables and a `schema_migrations` table
//! of the steps applied. The steps are the SQLite store's own (the SQL is
//! plain enough for both), so the two backends share one schema history;
//! steps only PostgreSQL needs are a second list, recorded under the domain
//! `postgres`.
//!
//! Nodes of a cluster start at the same time: the whole migration runs
//! under a PostgreSQL advisory lock, so one node migrates and the others
//! wait and then find nothing to do. A database written by a newer build is
//! refused with a clear message instead of being misread.

use crate::error::PgResult;
use m2mhub_identity::sql::Migration;
use m2mhub_identity::RegistryError;
use postgres::Client;

/// The advisory lock key every m2mhub node takes to migrate ("m2mhub" in
/// ASCII): one lock for all domains keeps the order simple.
const MIGRATION_LOCK: i64 = 0x6d32_6d68_7562;

/// One list of steps and the name its versions are recorded under.
pub(crate) struct Steps {
    pub domain: &'static str,
    pub migrations: &'static [Migration],
}

/// Bring `schema` up to the newest of every list in `steps`.
pub(crate) fn migrate(c: &mut Client, schema: &str, steps: &[Steps]) -> PgResult<()> {
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let out = migrate_locked(c, schema, steps);
    // A session lock: released on disconnect anyway, but the connection
    // lives on.
    let unlocked = c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    out?;
    unlocked?;
    Ok(())
}

fn migrate_locked(c: &mut Client, schema: &str, steps: &[Steps]) -> PgResult<()> {
    c.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
             domain TEXT NOT NULL,
             version INTEGER NOT NULL,
             applied_ms BIGINT NOT NULL,
             PRIMARY KEY (domain, version)
         );"
    ))?;
    for s in steps {
        let have: Option<i32> = c
            .query_one(
                &format!("SELECT MAX(version) FROM {schema}.schema_migrations WHERE domain = $1"),
                &[&s.domain],
            )?
            .try_get(0)?;
        let have = i64::from(have.unwrap_or(0));
        let known = s.migrations.iter().map(|m| i64::from(m.version)).max();
        if known.is_some_and(|k| have > k) {
            return Err(RegistryError::Storage(format!(
                "the {} tables in PostgreSQL schema {schema} are at version {have} of {}, newer \
                 than this build understands ({}); run the newer m2mhub or restore a backup",
                s.domain,
                s.domain,
                known.unwrap_or(0)
            ))
            .into());
        }
        for m in s.migrations.iter().filter(|m| i64::from(m.version) > have) {
            let mut tx = c.transaction()?;
            tx.batch_execute(&format!("SET LOCAL search_path TO {schema};"))?;
            tx.batch_execute(m.sql)?;
            let version = i32::try_from(m.version).map_err(|_| {
                RegistryError::Storage(format!("migration version {} out of range", m.version))
            })?;
            tx.execute(
                "INSERT INTO schema_migrations (domain, version, applied_ms) VALUES ($1, $2, $3)",
                &[&s.domain, &version, &m2mhub_identity::now_ms()],
            )?;
            tx.commit()?;
            tracing::info!(
                schema,
                domain = s.domain,
                version,
                "PostgreSQL schema migration applied"
            );
        }
    }
    Ok(())
}

/// Make `schema` the connection's default, so the SQL names tables plainly.
pub(crate) fn use_schema(c: &mut Client, schema: &str) -> PgResult<()> {
    c.batch_execute(&format!("SET search_path TO {schema};"))?;
    Ok(())
}
