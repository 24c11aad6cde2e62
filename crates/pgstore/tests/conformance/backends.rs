//! The stores under test, each opened fresh for one test and reopened on
//! demand (the "load after reopen" checks).

use m2mhub_fleet::sqlite::SqliteFleetStore;
use m2mhub_fleet::FleetStore;
use m2mhub_identity::sqlite::SqliteStore;
use m2mhub_identity::RegistryStore;
use m2mhub_pgstore::testing::TestDatabase;
use m2mhub_pgstore::{PgFleetStore, PgRegistryStore};

pub trait Backend {
    /// Open (again) the registry store of this test's database.
    fn registry(&self) -> Box<dyn RegistryStore>;
    /// Open (again) the fleet store of this test's database.
    fn fleet(&self) -> Box<dyn FleetStore>;
    /// Whether several nodes share the store: then an audit batch is
    /// numbered and chained again from the store's own tail (another node
    /// may have appended since this one's last batch) rather than refused
    /// for a sequence number already taken.
    fn shared(&self) -> bool {
        false
    }
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
    db: TestDatabase,
}

impl Postgres {
    pub fn new() -> Postgres {
        Postgres {
            db: TestDatabase::create().unwrap_or_else(|e| panic!("{e}")),
        }
    }
}

impl Backend for Postgres {
    fn shared(&self) -> bool {
        true
    }

    fn registry(&self) -> Box<dyn RegistryStore> {
        Box::new(PgRegistryStore::open(self.db.url()).expect("open the PostgreSQL registry store"))
    }
    fn fleet(&self) -> Box<dyn FleetStore> {
        Box::new(PgFleetStore::open(self.db.url()).expect("open the PostgreSQL fleet store"))
    }
}
