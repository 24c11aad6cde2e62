//! The platform's metadata in PostgreSQL, so that several m2mhub nodes
//! share one registry: the identity store ([`PgRegistryStore`]: tenants,
//! devices, credentials, operators, policies, the hash-chained audit log)
//! and the fleet store ([`PgFleetStore`]: alarms, commands, rules, shadows,
//! OTA, diagnostics), implementing the same traits as the SQLite stores
//! with the same semantics, so the rest of the platform cannot tell them
//! apart.
//!
//! # The model
//!
//! - **One connection per store, on a thread of its own**
//!   (`connection.rs`): the blocking client must not run on a tokio thread,
//!   and the traits are called from async handlers. A trait call is a job
//!   sent to that thread and a wait for its answer. A lost connection fails
//!   one call with a `Storage` error and is reopened by the next.
//! - **A schema per domain** (`identity`, `fleet`) with its own
//!   `schema_migrations`; the steps are the SQLite stores' own
//!   (`migrate.rs`), applied at open under an advisory lock so nodes starting
//!   together migrate once.
//! - **The same SQL shapes as SQLite**: text, BIGINT and INTEGER columns,
//!   booleans as 0/1, hashes as hex, JSON as text; multi-row changes in one
//!   transaction; a unique violation is `AlreadyExists`.
//!
//! What this crate does not do (yet): tell other nodes' in-memory caches
//! about a change. Each node loads the snapshot at open.

#![forbid(unsafe_code)]

mod connection;
mod error;
mod fleet;
mod migrate;
mod registry;
mod sql;
mod telemetry;
pub mod testing;
mod tls;
mod url;

pub use fleet::PgFleetStore;
pub use registry::PgRegistryStore;
pub use telemetry::{PgTelemetryOptions, PgTelemetryStore};
pub use url::PgUrl;
