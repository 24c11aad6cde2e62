//! Device commands through HTTP: an operator sends one (the rule service
//! publishes it when it runs; without it the command is only recorded,
//! `pending`), and anyone who may see the device follows its status.

use crate::caller::Caller;
use crate::devices::{audit, visible};
use crate::problem::{bad_json, bad_query, Problem};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_fleet::NewCommand;
use m2mhub_identity::Role;
use serde::Deserialize;
use serde_json::{json, Value};

const MAX_PAGE: usize = 1000;
/// When the request names no timeout.
const DEFAULT_TIMEOUT_SECS: u64 = 30;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    name: String,
    #[serde(default)]
    params: Value,
    timeout_secs: Option<u64>,
}

/// 202: the command is recorded (and handed to the rule service, which
/// publishes it); its status tells what became of it.
pub async fn send(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<SendBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let Json(b) = body.map_err(bad_json)?;
    let device = visible(&state, &caller, &id)?;
    let timeout_ms = b
        .timeout_secs
        .unwrap_or(DEFAULT_TIMEOUT_SECS)
        .saturating_mul(1000);
    let origin = format!("operator:{}", caller.username);
    let command = match &state.rules {
        Some(service) => {
            let cid = service
                .send_command(
                    &device.tenant,
                    &device.id,
                    &b.name,
                    b.params,
                    timeout_ms,
                    &origin,
                )
                .map_err(|e| {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "command-refused", e)
                })?;
            // The service records the command before it answers; if it did
            // not, the id is all there is to show.
            match state.fleet.get_command(&cid) {
                Ok(c) => json!(c),
                Err(_) => json!({"id": cid, "device_id": device.id, "name": b.name}),
            }
        }
        None => json!(state.fleet.create_command(NewCommand {
            tenant: device.tenant.clone(),
            device_id: device.id.clone(),
            name: b.name,
            params: b.params,
            origin,
            timeout_ms,
        })?),
    };
    audit(
        &state,
        &caller,
        "command.send",
        &device.id,
        json!({"command": command["id"], "name": command["name"], "timeout_ms": timeout_ms}),
    );
    Ok((StatusCode::ACCEPTED, Json(command)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only commands older than this one (the `next` of the previous page).
    before: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
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
    let device = visible(&state, &caller, &id)?;
    let items =
        state
            .fleet
            .list_commands(Some(&device.tenant), &device.id, q.before.as_deref(), limit)?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|c| c.id.clone()))
        .flatten();
    Ok(Json(json!({ "items": items, "next": next })))
}

pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let c = state.fleet.get_command(&id)?;
    if caller.tenant.as_ref().is_some_and(|t| *t != c.tenant) {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no command {id:?}"),
        ));
    }
    Ok(Json(json!(c)))
}
