//! One conformance suite for the storage traits, run against every
//! backend: SQLite always, PostgreSQL when a server is given
//! (`M2MHUB_TEST_POSTGRES_URL`, see `scripts/postgres.sh`; those tests are
//! ignored otherwise and run with `cargo test -p m2mhub-pgstore -- --ignored
//! postgres`). Each test gets a fresh store: a temporary directory, or a
//! database of its own, so the tests run in parallel.

mod backends;
mod bench;
mod fleet;
mod registry;
mod server;
mod telemetry;

/// Define each listed test (a `fn(&dyn Backend)` of the enclosing module)
/// once per backend: `sqlite::name` and `postgres::name`.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $test() {
                    super::$test(&crate::backends::Sqlite::new());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
                fn $test() {
                    super::$test(&crate::backends::Postgres::new());
                }
            )*
        }
    };
}
pub(crate) use conformance;
