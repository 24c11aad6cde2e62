//! Integration tests of m2mhub: the real server (in-process, or the binary)
//! on ephemeral loopback ports, driven by rumqttc (MQTT 3.1.1 and 5) and by
//! raw sockets speaking bytes crafted with `mqtt-codec`.
//!
//! One test binary; the modules live in `tests/tests/`.

#[path = "tests/common.rs"]
mod common;

#[path = "tests/alarms.rs"]
mod alarms;
#[path = "tests/architecture.rs"]
mod architecture;
#[path = "tests/auth.rs"]
mod auth;
#[path = "tests/authz.rs"]
mod authz;
#[path = "tests/backtest.rs"]
mod backtest;
#[path = "tests/bad_input.rs"]
mod bad_input;
#[path = "tests/cli.rs"]
mod cli;
#[path = "tests/cluster.rs"]
mod cluster;
#[path = "tests/coap.rs"]
mod coap;
#[path = "tests/conformance.rs"]
mod conformance;
#[path = "tests/console.rs"]
mod console;
#[path = "tests/dashboards.rs"]
mod dashboards;
#[path = "tests/demo.rs"]
mod demo;
#[path = "tests/diagnostics.rs"]
mod diagnostics;
#[path = "tests/fleet.rs"]
mod fleet;
#[path = "tests/flow.rs"]
mod flow;
#[path = "tests/gateways.rs"]
mod gateways;
#[path = "tests/http.rs"]
mod http;
#[path = "tests/http_devices.rs"]
mod http_devices;
#[path = "tests/http_hardening.rs"]
mod http_hardening;
#[path = "tests/identity.rs"]
mod identity;
#[path = "tests/limits.rs"]
mod limits;
#[path = "tests/live.rs"]
mod live;
#[path = "tests/login.rs"]
mod login;
#[path = "tests/ota.rs"]
mod ota;
#[path = "tests/parking.rs"]
mod parking;
#[path = "tests/persistence.rs"]
mod persistence;
#[path = "tests/postgres.rs"]
mod postgres;
#[path = "tests/process.rs"]
mod process;
#[path = "tests/profiles.rs"]
mod profiles;
#[path = "tests/psk.rs"]
mod psk;
#[path = "tests/query_cli.rs"]
mod query_cli;
#[path = "tests/reports.rs"]
mod reports;
#[path = "tests/retained.rs"]
mod retained;
#[path = "tests/rules.rs"]
mod rules;
#[path = "tests/rules_cli.rs"]
mod rules_cli;
#[path = "tests/server_timing.rs"]
mod server_timing;
#[path = "tests/sessions.rs"]
mod sessions;
#[path = "tests/shadows.rs"]
mod shadows;
#[path = "tests/shared.rs"]
mod shared;
#[path = "tests/telemetry.rs"]
mod telemetry;
#[path = "tests/transports.rs"]
mod transports;
#[path = "tests/v311.rs"]
mod v311;
#[path = "tests/v5.rs"]
mod v5;
#[path = "tests/will.rs"]
mod will;
