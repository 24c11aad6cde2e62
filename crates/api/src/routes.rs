//! Route table. New parts of the platform add their routes under `/api/v1`.

use crate::problem::Problem;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
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
        .route("/sessions", get(list_sessions))
        .route("/sessions/{client_id}", get(show_session))
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
        "links": { "broker": "/api/v1/broker", "sessions": "/api/v1/sessions" },
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

#[derive(serde::Deserialize)]
struct Page {
    /// Client id to continue after (the `next` of the previous page).
    after: Option<String>,
    limit: Option<usize>,
}

const MAX_PAGE: usize = 1000;

fn session_json(s: &m2mhub_broker::SessionInfo) -> serde_json::Value {
    json!({
        "client_id": s.client_id,
        "online": s.online,
        "protocol": if s.protocol_v5 { "5.0" } else { "3.1.1" },
        "persistent": s.persistent,
        "expiry_interval": s.expiry_interval,
        "offline_seconds": s.offline_secs,
        "subscriptions": s.subscriptions.iter().map(|(f, q)| json!({"filter": f, "qos": q})).collect::<Vec<_>>(),
        "queued": s.queued,
        "inflight": s.inflight,
        "dropped": s.dropped,
    })
}

/// Sessions, online and offline, paged by client id.
async fn list_sessions(
    State(broker): State<Broker>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<impl IntoResponse, Problem> {
    let Query(page) = page
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", e.body_text()))?;
    let limit = page.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let items = broker.sessions(page.after.as_deref(), limit);
    let next = (items.len() == limit)
        .then(|| items.last().map(|s| s.client_id.clone()))
        .flatten();
    Ok(Json(json!({
        "items": items.iter().map(session_json).collect::<Vec<_>>(),
        "next": next,
    })))
}

async fn show_session(
    State(broker): State<Broker>,
    Path(client_id): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    match broker.session(&client_id) {
        Some(s) => Ok(Json(session_json(&s))),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no session with client id {client_id:?}"),
        )),
    }
}

async fn api_not_found(uri: Uri) -> Problem {
    Problem::not_found(&format!("/api/v1{}", uri.path()))
}

async fn not_found(uri: Uri) -> Problem {
    Problem::not_found(uri.path())
}
