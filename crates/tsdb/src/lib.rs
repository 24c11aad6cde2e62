//! m2mhub's embedded time-series store.
//!
//! # Model
//!
//! A series is one metric of one device of one tenant: a sequence of
//! `(timestamp_ms, value)` points, the value a float, a boolean (stored as
//! 0/1) or text. Points are grouped into *chunks*, each an independent,
//! self-describing byte string.
//!
//! # Layout and life of a point
//!
//! 1. [`Tsdb::append`] resolves series ids and queues the points; the WAL
//!    writer thread writes everything queued as one group, `fdatasync`s it
//!    (durable mode) and only then applies the points to the in-memory
//!    *head* chunks and completes the appenders' [`Ticket`]s (`wal.rs`).
//! 2. The maintenance thread periodically *flushes*: the WAL is rotated,
//!    the heads frozen and written to *partitions* (one directory per day)
//!    as sealed chunks plus 1 min / 1 h rollup blocks; a checkpoint file
//!    then commits the flush and older WAL segments are deleted (`part.rs`).
//! 3. Closed partitions are *compacted* into one sorted chunk run and one
//!    rollup block per series; retention drops whole partitions, or the
//!    series of a partition whose own retention has expired (`engine.rs`).
//! 4. Queries gather chunk references under a short read lock and decode
//!    without it (`query.rs`); hourly and per-minute aggregates come from
//!    the rollups, so a month of a 10 Hz series costs a few hundred rows.
//!
//! The platform programs against [`TimeSeriesStore`], so another backend
//! can take the engine's place.
//!
//! # Why Gorilla
//!
//! The encoding follows Facebook's Gorilla (Pelkonen et al., *Gorilla: A Fast,
//! Scalable, In-Memory Time Series Database*, VLDB 2015), because machine data
//! has exactly the two regularities it exploits:
//!
//! * **Timestamps** arrive at a (nearly) fixed interval, so the *delta of the
//!   delta* is almost always zero and costs one bit. Jitter falls into short
//!   variable-length buckets; anything else (out-of-order, duplicate, huge
//!   gaps, `i64::MIN`/`i64::MAX`) falls back to a 64-bit escape, so every
//!   sequence of timestamps is representable.
//! * **Values** change slowly (sensors report to a fixed resolution and often
//!   repeat), so XOR-ing a value with its predecessor yields zero (one bit) or
//!   a word whose meaningful bits sit in a narrow window that can often be
//!   reused from the previous point.
//!
//! Values are handled purely as bit patterns (`f64::to_bits`), so every `f64`
//! round-trips exactly: NaN payloads, `±inf`, `-0.0`, subnormals.
//!
//! A regular 1 s sensor series encodes to well under 2 bytes per point (see
//! the `size` integration test). Decoding never panics or loops on corrupt
//! input; it returns a [`ChunkError`] instead.
//!
//! The byte format is documented on [`chunk`].
#![forbid(unsafe_code)]

pub mod bits;
pub mod chunk;
mod codec;
mod engine;
mod error;
mod head;
pub mod model;
mod part;
mod query;
mod rollup;
mod series;
mod store;
mod text;
mod wal;

pub use chunk::{decode_chunk, ChunkEncoder, ChunkError, ChunkIter};
pub use engine::{Appended, Completion, Options, Ticket, Tsdb, MAX_NAME};
pub use error::TsdbError;
pub use model::*;
pub use query::{Bucketer, MAX_PAGE};
pub use rollup::{interior as rollup_interior, HOUR, MINUTE};
pub use store::TimeSeriesStore;
