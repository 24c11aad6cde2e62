//! `/api/v1/cluster`: the nodes of a cluster, as any node sees them.

use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;

pub async fn show(
    caller: crate::caller::Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    caller.require(m2mhub_identity::Role::Viewer)?;
    let Some(cluster) = &state.cluster else {
        return Ok(Json(json!({
            "enabled": false,
            "node_id": null,
            "nodes": [],
            "counters": {},
        })));
    };
    let nodes = cluster.nodes().await.map_err(|e| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster-unavailable",
            format!("cannot read the cluster's members from NATS: {e}"),
        )
    })?;
    let mut counters = Map::new();
    for (name, _, v) in cluster.stats().counters() {
        counters.insert(name.to_string(), json!(v));
    }
    Ok(Json(json!({
        "enabled": true,
        "node_id": cluster.node_id(),
        "nodes": nodes,
        "counters": counters,
    })))
}

/// In a cluster, tell the other nodes when a request here changed shared
/// metadata (any successful write under `/api/v1` but a device's
/// telemetry), so they read it again: a device created here can connect
/// there, a token revoked here stops working there.
pub async fn announce_changes(
    State(cluster): State<Option<Arc<m2mhub_cluster::Cluster>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(cluster) = cluster else {
        return next.run(req).await;
    };
    let write = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let path = req.uri().path();
    let metadata = write && path.starts_with("/api/v1/") && !path.ends_with("/telemetry");
    let resp = next.run(req).await;
    if metadata && resp.status().is_success() {
        cluster.changed("metadata");
    }
    resp
}
