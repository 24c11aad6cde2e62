//! The stores under test, each opened fresh for one test and reopened on
//! demand (the "load after reopen" checks).

use m2mhub_fleet::sqlite::SqliteFleetStore;
use m2mhub_fleet::FleetStore;
use m2mhub_identity::sqlite::SqliteStore;
use m2mhub_identity::RegistryStore;
use m2mhub_pgstore::{PgFleetStore, PgRegistryStore, PgUrl};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the PostgreSQL tests find their server.
pub const POSTGRES_URL_ENV: &str = "M2MHUB_TEST_POSTGRES_URL";

pub trait Backend {
    /// Open (again) the registry store of this test's database.
    fn registry(&self) -> Box<dyn RegistryStore>;
    /// Open (again) the fleet store of this test's database.
    fn fleet(&self) -> Box<dyn FleetStore>;
}

pub struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    pub fn new() -> Sqlite {
        Sqlite {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl Backend for Sqlite {
    fn registry(&self) -> Box<dyn RegistryStore> {
        Box::new(SqliteStore::open(&self.dir.path().join("registry.db")).expect("open SQLite"))
    }
    fn fleet(&self) -> Box<dyn FleetStore> {
        Box::new(SqliteFleetStore::open(&self.dir.path().join("registry.db")).expect("open SQLite"))
    }
}

/// A database of its own on the test server, dropped at the end.
pub struct Postgres {
    admin: PgUrl,
    name: String,
    url: PgUrl,
}

/// The server the PostgreSQL tests use; a loud failure when it is not
/// configured, since those tests only run when asked for.
pub fn server_url() -> PgUrl {
    let Ok(url) = std::env::var(POSTGRES_URL_ENV) else {
        panic!(
            "{POSTGRES_URL_ENV} is not set: start a throwaway server with \
             `scripts/postgres.sh start target/postgres 55432` and export the URL it prints"
        );
    };
    PgUrl::parse(&url).expect("a PostgreSQL URL in M2MHUB_TEST_POSTGRES_URL")
}

/// A client for administrative statements (create and drop databases); a
/// test thread is not a tokio thread, so the blocking client is fine here.
pub fn admin_client(url: &PgUrl) -> postgres::Client {
    postgres::Client::connect(url.expose(), postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to the test server at {url}: {e}"))
}

impl Postgres {
    pub fn new() -> Postgres {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let admin = server_url();
        let name = format!(
            "m2mhub_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = admin_client(&admin);
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .expect("drop a leftover test database");
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create the test database");
        let url = admin.with_dbname(&name);
        Postgres { admin, name, url }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = admin_client(&self.admin).batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

impl Backend for Postgres {
    fn registry(&self) -> Box<dyn RegistryStore> {
        Box::new(PgRegistryStore::open(&self.url).expect("open the PostgreSQL registry store"))
    }
    fn fleet(&self) -> Box<dyn FleetStore> {
        Box::new(PgFleetStore::open(&self.url).expect("open the PostgreSQL fleet store"))
    }
}
