//! Device shadows through HTTP: read a device's shadows, change their
//! desired state (optimistic concurrency: send the `version` you read and a
//! concurrent change is a 409, never a silent overwrite), delete them.
//!
//! Operators write `state.desired` only — `reported` is the device's. Every
//! accepted change is also published to the device on its shadow topics
//! (`…/update/accepted`, `…/documents` and, when desired now differs from
//! reported, `…/delta`), exactly as if it had come over MQTT, and audited.

use crate::caller::Caller;
use crate::devices::{audit, visible};
use crate::problem::{bad_json, Problem};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_fleet::{ShadowUpdate, ShadowWriter};
use m2mhub_identity::Role;
use serde_json::{json, Value};

/// `GET /devices/{id}/shadows`: the names of a device's shadows (`""` is
/// the classic one).
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let d = visible(&state, &caller, &id)?;
    let mut names = state.fleet.list_shadows(Some(&d.tenant), &id)?;
    names.sort();
    Ok(Json(json!({ "items": names })))
}

pub async fn get_classic(
    caller: Caller,
    state: State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    get(caller, state, id, String::new()).await
}

pub async fn get_named(
    caller: Caller,
    state: State<AppState>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<Value>, Problem> {
    get(caller, state, id, name).await
}

async fn get(
    caller: Caller,
    State(state): State<AppState>,
    id: String,
    name: String,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let d = visible(&state, &caller, &id)?;
    let s = state.fleet.get_shadow(Some(&d.tenant), &id, &name)?;
    Ok(Json(s.document()))
}

pub async fn patch_classic(
    caller: Caller,
    state: State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<ShadowUpdate>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    patch(caller, state, id, String::new(), body).await
}

pub async fn patch_named(
    caller: Caller,
    state: State<AppState>,
    Path((id, name)): Path<(String, String)>,
    body: Result<Json<ShadowUpdate>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    patch(caller, state, id, name, body).await
}

async fn patch(
    caller: Caller,
    State(state): State<AppState>,
    id: String,
    name: String,
    body: Result<Json<ShadowUpdate>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let d = visible(&state, &caller, &id)?;
    let Json(update) = body.map_err(bad_json)?;
    let fleet = state.fleet.clone();
    let (tenant, device, shadow) = (d.tenant.clone(), id.clone(), name.clone());
    let request = update.clone();
    // The write is synchronous (durable before the answer): off the workers.
    let change = tokio::task::spawn_blocking(move || {
        fleet.update_shadow(&tenant, &device, &shadow, &request, ShadowWriter::Platform)
    })
    .await
    .map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the shadow update did not finish: {e}"),
        )
    })??;
    m2mhub_ingest::shadow_topics::publish_update(
        &state.broker,
        &change,
        &update,
        mqtt_codec::PublishProperties::default(),
    )
    .await;
    audit(
        &state,
        &caller,
        "shadow.update",
        &id,
        json!({"shadow": name, "version": change.current.version, "desired": update.state.desired}),
    );
    Ok(Json(change.current.document()))
}

pub async fn delete_classic(
    caller: Caller,
    state: State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    delete(caller, state, id, String::new()).await
}

pub async fn delete_named(
    caller: Caller,
    state: State<AppState>,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    delete(caller, state, id, name).await
}

async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    id: String,
    name: String,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let d = visible(&state, &caller, &id)?;
    let old = state.fleet.delete_shadow(Some(&d.tenant), &id, &name)?;
    audit(
        &state,
        &caller,
        "shadow.delete",
        &id,
        json!({"shadow": name, "version": old.version}),
    );
    Ok(StatusCode::NO_CONTENT)
}
