//! Fresh databases for tests that run against a real server: each test
//! gets a database of its own on the server named by
//! `M2MHUB_TEST_POSTGRES_URL` (see `scripts/postgres.sh`), so tests run in
//! parallel and leave nothing behind.

use crate::error::PgError;
use crate::url::PgUrl;
use m2mhub_identity::{RegistryError, Result};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where tests find their server.
pub const TEST_URL_ENV: &str = "M2MHUB_TEST_POSTGRES_URL";

/// A database created for one test, dropped (with its connections) when
/// this is dropped.
pub struct TestDatabase {
    admin: PgUrl,
    name: String,
    url: PgUrl,
}

impl TestDatabase {
    /// Create `m2mhub_test_<pid>_<n>` on the server of
    /// `M2MHUB_TEST_POSTGRES_URL`; an error that says how to start one when
    /// the variable is missing.
    pub fn create() -> Result<TestDatabase> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let Ok(url) = std::env::var(TEST_URL_ENV) else {
            return Err(RegistryError::Validation(format!(
                "{TEST_URL_ENV} is not set: start a throwaway server with \
                 `scripts/postgres.sh start target/postgres 55432` and export the URL it prints"
            )));
        };
        let admin = PgUrl::parse(&url)?;
        let name = format!(
            "m2mhub_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin_statements(
            &admin,
            &[
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                format!("CREATE DATABASE {name}"),
            ],
        )?;
        let url = admin.with_dbname(&name);
        Ok(TestDatabase { admin, name, url })
    }

    /// The test database's URL (password included: pass it on, never log it).
    pub fn url(&self) -> &PgUrl {
        &self.url
    }

    /// How many sessions on this database use TLS, and how many do not (the
    /// server's own view, `pg_stat_ssl`), read over the admin connection.
    pub fn tls_sessions(&self) -> Result<(i64, i64)> {
        let q = format!(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{}'",
            self.name
        );
        let admin = &self.admin;
        std::thread::scope(|sc| {
            sc.spawn(|| -> Result<(i64, i64)> {
                let mut c = admin
                    .connect_with(admin.config())
                    .map_err(|e| RegistryError::Storage(PgError::from(e).to_string()))?;
                let row = c.query_one(q.as_str(), &[]).map_err(PgError::from)?;
                Ok((row.get(0), row.get(1)))
            })
            .join()
            .map_err(|_| RegistryError::Storage("the test database thread panicked".into()))?
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = admin_statements(&self.admin, &[drop]) {
            tracing::warn!(database = %self.name, error = %e, "could not drop a test database");
        }
    }
}

/// Run statements one by one (CREATE/DROP DATABASE refuse a transaction)
/// on a plain thread, since the caller may be a tokio test.
fn admin_statements(url: &PgUrl, statements: &[String]) -> Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            let mut c = url.connect_with(url.config()).map_err(|e| {
                RegistryError::Storage(format!(
                    "cannot connect to the test server at {url}: {}",
                    RegistryError::from(PgError::from(e))
                ))
            })?;
            for st in statements {
                c.batch_execute(st).map_err(PgError::from)?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| RegistryError::Storage("the test database thread panicked".into()))?
    })
}
