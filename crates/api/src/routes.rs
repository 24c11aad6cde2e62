//! Route table. New parts of the platform add their routes under `/api/v1`.

use crate::problem::Problem;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use m2mhub_broker::Broker;
use serde_json::json;

pub fn router(broker: Broker) -> Router {
    let api = Router::new()
        .route("/", get(api_index))
        .route("/broker", get(broker_stats))
        .fallback(api_not_found);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/mqtt", get(crate::websocket::upgrade))
        .nest("/api/v1", api)
        .fallback(not_found)
        .with_state(broker)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(broker): State<Broker>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        broker.metrics_text(),
    )
}

async fn api_index() -> impl IntoResponse {
    Json(json!({
        "name": "m2mhub",
        "version": env!("CARGO_PKG_VERSION"),
        "links": { "broker": "/api/v1/broker" },
    }))
}

async fn broker_stats(State(broker): State<Broker>) -> impl IntoResponse {
    let g = broker.gauges();
    let mut counters = serde_json::Map::new();
    for (name, _, v) in broker_counters(&broker) {
        counters.insert(name.to_string(), json!(v));
    }
    Json(json!({
        "connections": g.connections,
        "sessions": g.sessions,
        "subscriptions": g.subscriptions,
        "retained_messages": g.retained,
        "uptime_seconds": g.uptime_secs,
        "counters": counters,
    }))
}

fn broker_counters(broker: &Broker) -> Vec<(&'static str, &'static str, u64)> {
    broker.metrics().counters()
}

async fn api_not_found(uri: Uri) -> Problem {
    Problem::not_found(&format!("/api/v1{}", uri.path()))
}

async fn not_found(uri: Uri) -> Problem {
    let _ = StatusCode::NOT_FOUND;
    Problem::not_found(uri.path())
}
