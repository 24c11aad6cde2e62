//! CoAP (RFC 7252) for m2mhub.
#![forbid(unsafe_code)]

pub mod exchange;
pub mod message;
