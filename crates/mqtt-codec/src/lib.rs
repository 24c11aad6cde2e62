//! Sans-IO codec for MQTT 3.1.1 and 5.0.
//!
//! The codec knows nothing about sockets, clocks or sessions: [`decode`] takes
//! bytes that arrived from somewhere and returns at most one [`Packet`] (or
//! `Ok(None)` when more bytes are needed), and [`encode`] appends a packet's
//! wire form to a buffer. Every rule of the two specifications that can be
//! checked on a single packet is checked here (reserved flags, property
//! multiplicity, UTF-8 well-formedness, topic syntax, packet size), so the
//! broker above it can trust what it gets. Each [`DecodeError`] carries the
//! MQTT 5 reason code it is reported with.
#![forbid(unsafe_code)]

mod decode;
mod encode;
mod error;
pub mod fuzz;
pub mod packet;
mod properties;
pub mod reason;
pub mod topic;

pub use decode::{decode, decode_connect_protocol};
pub use encode::{encode, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::*;

/// The largest remaining length a fixed header can express (268,435,455 bytes).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;
