//! Sans-IO decoding of what gateways publish on MQTT, for devices that do
//! not speak the platform's own `devices/{id}/telemetry` topics.
//!
//! # Model
//!
//! A gateway speaks for many devices, and what it publishes needs context
//! to be read: a Sparkplug B data message names its metrics by aliases
//! defined in an earlier birth message, a ChirpStack event carries the
//! device's identity inside the document. This crate turns one message
//! (topic, payload, arrival time) into typed outputs for the platform:
//! online/offline changes, [`Point`]s named by metric, bytes still to be
//! decoded, and messages to publish back (Sparkplug rebirth requests,
//! ChirpStack downlinks). It has no sockets, no clock (the caller passes
//! the time) and no async; the platform's MQTT side is the driver.
//!
//! * [`sparkplug`]: the Sparkplug B protobuf payload, topic parsing, and
//!   [`sparkplug::SparkplugHost`], the state machine of a host application
//!   (births bind aliases, sequence numbers and `bdSeq` are checked,
//!   deaths take nodes and devices offline, rebirths are requested, rate-
//!   limited, when data cannot be read).
//! * [`chirpstack`]: ChirpStack v4's MQTT integration (JSON events on
//!   `application/{app}/device/{dev_eui}/event/{kind}`, downlinks on
//!   `…/command/down`). Stateless.
//!
//! Device identity stays with the caller: Sparkplug devices are named by
//! [`sparkplug::EdgeKey`] (`group/node[/device]`), LoRaWAN devices by
//! [`chirpstack::DevEui`]; the platform maps either to its own device id.
//! Every decoder bounds the memory one message can cost and reports
//! problems as values, never by panicking.
//!
//! [`Point`]: m2mhub_telemetry::Point

#![forbid(unsafe_code)]

pub mod chirpstack;
pub mod fuzz;
pub mod sparkplug;

#[cfg(test)]
mod proptests;

pub use m2mhub_telemetry::{Point, Value};
