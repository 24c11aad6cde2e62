//! The ingest: what devices send, whatever protocol carried it (MQTT today;
//! CoAP, HTTP, LoRaWAN and Sparkplug gateways next) — telemetry through the
//! one pipeline (decode a payload into points, store them with the
//! durable-acknowledgement gate, keep what went wrong as device events, tell
//! open live views), shadow requests and OTA firmware jobs.
//!
//! - [`pipeline`]: [`Ingest::ingest`] (protocol-neutral) and the MQTT
//!   publish hook that adapts it for `devices/{id}/telemetry`.
//! - [`shadow_topics`]: device shadows over MQTT (`devices/{id}/shadow/…`).
//! - [`ota_topics`]: firmware jobs over MQTT (`devices/{id}/ota/…`), MQTT
//!   chunked downloads, signed download URLs and the campaign timer.
//! - [`connection_history`]: connects and disconnects as device events.
//! - [`live`]: the broadcast hub the API's live streams read.
//! - [`counters`]: what was counted, for `/metrics`.

#![forbid(unsafe_code)]

pub mod coap_resources;
pub mod connection_history;
pub mod counters;
pub mod gateways;
pub mod live;
pub mod ota_topics;
pub mod pipeline;
pub mod shadow_topics;

pub use connection_history::ConnectionHistory;
pub use counters::IngestCounters;
pub use live::{LiveEvent, LiveHub};
pub use pipeline::{telemetry_device, Durable, Ingest, Invalid, Outcome, Refusal};
