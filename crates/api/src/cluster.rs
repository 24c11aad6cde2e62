//! `/api/v1/cluster`: the nodes of a cluster, as any node sees them.

use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Map, Value};

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
