//! Errors of the registry, shaped like ChirpStack's storage errors so the
//! HTTP layer can map them one to one (404, 409, 400, 409, 401, 500).

use thiserror::Error;

/// Everything a registry operation can fail with.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The named object does not exist (the string says which one).
    #[error("not found: {0}")]
    NotFound(String),
    /// An object with that id already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The input is malformed (the string says what and how to fix it).
    #[error("invalid input: {0}")]
    Validation(String),
    /// The request is well-formed but conflicts with the current state
    /// (for example a third active token, or deleting a group in use).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Wrong credentials. Deliberately carries no detail, so callers cannot
    /// tell an unknown user from a wrong password.
    #[error("unauthorized")]
    Unauthorized,
    /// The storage backend failed (I/O, SQL, corrupt stored data).
    #[error("storage error: {0}")]
    Storage(String),
    /// The disk is full: nothing was written; the same request succeeds
    /// once space is freed.
    #[error("disk full: {0}")]
    DiskFull(String),
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, ref msg) = e {
            if f.code == rusqlite::ErrorCode::ConstraintViolation {
                return RegistryError::AlreadyExists(
                    msg.clone().unwrap_or_else(|| "unique constraint".into()),
                );
            }
            if f.code == rusqlite::ErrorCode::DiskFull {
                return RegistryError::DiskFull(e.to_string());
            }
        }
        RegistryError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for RegistryError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::StorageFull {
            return RegistryError::DiskFull(e.to_string());
        }
        RegistryError::Storage(e.to_string())
    }
}

impl From<serde_json::Error> for RegistryError {
    fn from(e: serde_json::Error) -> Self {
        RegistryError::Storage(format!("stored JSON: {e}"))
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Why a claim (fleet provisioning) token was refused.
#[derive(Debug, Error)]
pub enum ClaimError {
    #[error("unknown claim token")]
    Unknown,
    #[error("claim token has expired")]
    Expired,
    #[error("claim token has no uses left")]
    Exhausted,
    #[error("claim token has been revoked")]
    Revoked,
    /// The claim was valid but creating the device failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}
