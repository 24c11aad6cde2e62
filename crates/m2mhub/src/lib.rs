//! The m2mhub binary's library half: configuration and wiring, so that the
//! integration tests start exactly what `m2mhub serve` starts.
#![forbid(unsafe_code)]

pub mod admin;
pub mod broker_auth;
pub mod client;
pub mod coaps;
pub mod fd_limit;
pub mod ota_cluster;
pub mod server;
pub mod settings;
