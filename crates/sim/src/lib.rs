//! MQTT load generator used to benchmark m2mhub (and, for comparison, any
//! other MQTT broker such as Mosquitto).
//!
//! The model: a run opens plain-TCP MQTT connections with the project's
//! sans-IO codec — all subscribers first (each waits for its SUBACK), then
//! the publishers — and lets every publisher stream PUBLISH packets to
//! `bench/<i>/data` for a warmup period and then a measurement window.
//! Every payload starts with the send time (nanoseconds since the run's
//! common start instant) and a sequence number, so a subscriber knows each
//! message's latency and whether it was *sent* inside the window; the
//! report counts exactly the messages published inside the window and the
//! deliveries of those same messages, so `lost = expected - received` is
//! exact. Each connection is driven by one task with non-blocking reads and
//! writes: publishers copy a pre-encoded PUBLISH template into one write
//! buffer (up to 64 per write), keep QoS 1/2 flows in an in-flight window,
//! and are either unpaced or paced in millisecond bursts; subscribers decode
//! whatever one large read brought and answer with batched acks. The
//! [`Scenario::Idle`] run instead holds many idle connections and reports
//! the broker's resident memory per connection, and [`Scenario::Connect`]
//! measures the connection rate (optionally a reconnect storm);
//! [`Scenario::Shadow`] measures device shadow updates per second and their
//! latency to `…/update/accepted` ([`shadow`]). Idle and
//! Connect can use per-connection credentials from a file and TLS or mutual
//! TLS (see [`BenchOptions`]); the traffic scenarios use plain TCP.
//!
//! The process must be allowed enough file descriptors (`ulimit -n`) for
//! all its connections; running out is reported as
//! [`BenchError::TooManyOpenFiles`].
#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod coap_load;
pub mod connect;
pub mod diagnostics;
pub mod fleet;
pub mod histogram;
pub mod memory;
pub mod metrics_probe;
pub mod ota;
pub mod shadow;

pub use bench::{run, BenchError, BenchOptions, BenchReport, Scenario};
pub use client::{ClientConfig, Conn, Stream, TlsClient};
pub use connect::{parse_credentials, Credential};
pub use histogram::Histogram;
