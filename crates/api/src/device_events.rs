//! A device's events (undecodable payloads and the like) through HTTP,
//! newest first and paged backwards with `before`, next to the exact counts
//! the registry keeps in memory (stored events are rate limited and capped,
//! the counts are not).

use crate::caller::Caller;
use crate::devices::visible;
use crate::problem::{bad_query, Problem};
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_identity::Role;
use serde::Deserialize;
use serde_json::{json, Value};

const MAX_PAGE: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    kind: Option<String>,
    /// Only events older than this id (the `next` of the previous page).
    before: Option<u64>,
    limit: Option<usize>,
}

pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    visible(&state, &caller, &id)?;
    let items = state.fleet.list_device_events(
        caller.tenant.as_deref(),
        &id,
        q.kind.as_deref(),
        q.before,
        limit,
    )?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|e| e.id))
        .flatten();
    Ok(Json(json!({
        "items": items,
        "next": next,
        "counts": state.fleet.device_event_counts(&id).unwrap_or_default(),
    })))
}
