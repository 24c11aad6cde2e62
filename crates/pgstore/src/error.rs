//! How PostgreSQL's errors become the registry's error kinds: a unique
//! violation is `AlreadyExists` (as a SQLite constraint failure is), a lost
//! connection or anything else the server says is `Storage`.

use m2mhub_identity::RegistryError;
use postgres::error::SqlState;
use thiserror::Error;

/// What a store's SQL can fail with, before it is reported as a
/// [`RegistryError`]: kept apart so `?` works on the client's, JSON's and the
/// registry's own errors inside one job.
#[derive(Debug, Error)]
pub(crate) enum PgError {
    #[error(transparent)]
    Postgres(#[from] postgres::Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<serde_json::Error> for PgError {
    fn from(e: serde_json::Error) -> Self {
        PgError::Registry(e.into())
    }
}

impl From<PgError> for RegistryError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Registry(e) => e,
            PgError::Postgres(e) => match e.code() {
                Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
                    RegistryError::AlreadyExists(db_message(&e))
                }
                Some(c) if *c == SqlState::DISK_FULL => {
                    RegistryError::DiskFull(format!("PostgreSQL: {}", db_message(&e)))
                }
                _ => RegistryError::Storage(format!("PostgreSQL: {}", db_message(&e))),
            },
        }
    }
}

/// The server's own message and detail when there is one (the client's
/// `Display` says only "db error").
fn db_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        },
        // The client's own errors (a refused TLS handshake, a reset
        // connection) say what failed in their source: keep the chain.
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

pub(crate) type PgResult<T> = std::result::Result<T, PgError>;
