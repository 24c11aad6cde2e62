//! Compression core of m2mhub's embedded time-series store.
//!
//! # Model
//!
//! A series is a sequence of `(timestamp_ms: i64, value: f64)` points. Points
//! are grouped into *chunks*, each an independent, self-describing byte string
//! (a later layer adds the WAL, partitions and queries on top of them).
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

pub use chunk::{decode_chunk, ChunkEncoder, ChunkError, ChunkIter};
