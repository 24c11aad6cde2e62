//! The HTTP side of m2mhub: health, Prometheus metrics, MQTT over WebSocket
//! at `/mqtt`, the versioned JSON API under `/api/v1`, and the operator
//! console (static assets embedded in the binary, `console.rs`) at `/`.
//!
//! Every error leaves as an RFC 9457 problem document (`problem.rs`), so API
//! clients handle one error shape everywhere. The WebSocket endpoint hands
//! the byte stream to the broker exactly like a TCP connection.
#![forbid(unsafe_code)]

mod alarms;
mod audit_durable;
mod backtest;
pub mod broker_history;
mod caller;
mod cluster;
mod commands;
pub mod connections;
pub mod console;
mod dashboards;
mod device_events;
pub mod device_http;
mod devices;
pub mod diagnostics;
mod headers;
pub mod https;
pub mod limits;
pub mod live;
pub mod lockout;
pub mod openapi;
mod operators;
pub mod ota;
mod problem;
mod profiles;
pub mod provision;
mod psk;
mod reports;
mod routes;
pub mod rules;
mod security;
mod settings;
mod shadows;
mod state;
pub mod telemetry;
pub mod timing;
mod websocket;

pub use console::ConsoleConfig;
pub use https::serve_tls;
pub use limits::{HttpConfig, HttpLimits};
pub use lockout::{LoginConfig, LoginGuard};
pub use m2mhub_automation::{RuleProblem, RuleService};
pub use m2mhub_pki::PskKeys;
pub use problem::Problem;
pub use routes::router;
pub use state::AppState;

use std::future::Future;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// Serve HTTP on `listener` until `shutdown` resolves, within the
/// state's limits (`limits.rs`: connections per address, header read
/// timeout).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.http.clone();
    // Every response carries `Server-Timing: app;dur=<ms>` (timing.rs).
    let app = router(state).layer(axum::middleware::from_fn(timing::server_timing));
    connections::serve_router(listener, app, limits, |a: &SocketAddr| a.ip(), shutdown).await
}
