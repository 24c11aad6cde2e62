//! CoAP (RFC 7252) for m2mhub.
#![forbid(unsafe_code)]

pub mod block;
pub mod config;
pub mod exchange;
pub mod message;
pub mod observe;
pub mod rate_limit;
pub mod server;
