//! Integration tests of the broker crate: a real broker on an ephemeral
//! loopback port, driven by a raw MQTT client speaking bytes crafted with
//! `mqtt-codec`, so every acknowledgement (or its absence) is visible.
//!
//! One test binary; the modules live in `tests/tests/`.

#[path = "tests/common.rs"]
mod common;

#[path = "tests/publish_hook.rs"]
mod publish_hook;

#[path = "tests/driver.rs"]
mod driver;

#[path = "tests/ordering.rs"]
mod ordering;

#[path = "tests/refusals.rs"]
mod refusals;
