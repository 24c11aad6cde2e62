//! Device profiles through HTTP: what a tenant's devices of one kind send
//! (the payload content type the ingest decodes). Tenant-scoped like
//! devices: `?tenant=` (or `tenant` in a POST body) picks the tenant for
//! platform operators and defaults to `default`; tenant operators always
//! act on their own. Every change is audited.

use crate::caller::Caller;
use crate::devices::audit;
use crate::problem::{bad_json, bad_query, Problem};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_identity::{NewProfile, ProfileUpdate, Role, DEFAULT_TENANT};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    tenant: Option<String>,
}

/// The tenant a request on one profile acts on.
fn tenant_of(
    caller: &Caller,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<String, Problem> {
    let Query(q) = q.map_err(bad_query)?;
    Ok(caller
        .scope(q.tenant.as_deref())?
        .unwrap_or_else(|| DEFAULT_TENANT.into()))
}

/// Profiles of the caller's tenant; platform operators see every tenant's
/// unless they name one.
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let tenant = caller.scope(q.tenant.as_deref())?;
    let items = state.registry.list_profiles(tenant.as_deref())?;
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    tenant: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    description: String,
}

pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let Json(b) = body.map_err(bad_json)?;
    let tenant = caller
        .scope(b.tenant.as_deref())?
        .unwrap_or_else(|| DEFAULT_TENANT.into());
    let p = state.registry.create_profile(
        &tenant,
        NewProfile {
            name: b.name,
            content_type: b.content_type,
            description: b.description,
        },
    )?;
    audit(
        &state,
        &caller,
        "profile.create",
        &format!("{tenant}/{}", p.name),
        json!({"content_type": p.content_type, "description": p.description}),
    );
    Ok((StatusCode::CREATED, Json(json!(p))))
}

pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let tenant = tenant_of(&caller, q)?;
    Ok(Json(json!(state.registry.get_profile(&tenant, &name)?)))
}

/// `Some(None)` for an explicit `null`, so a PUT can clear a field while an
/// absent field leaves it alone.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    /// A MIME type, or `null` to let the ingest detect the format.
    #[serde(default, deserialize_with = "present")]
    content_type: Option<Option<String>>,
    description: Option<String>,
}

/// Change a profile's settings (absent fields stay); devices using it see
/// the change on their next message.
pub async fn update(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
    body: Result<Json<UpdateBody>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let tenant = tenant_of(&caller, q)?;
    let Json(b) = body.map_err(bad_json)?;
    let detail = json!({"content_type": b.content_type, "description": b.description});
    let p = state.registry.update_profile(
        &tenant,
        &name,
        ProfileUpdate {
            content_type: b.content_type,
            description: b.description,
        },
    )?;
    audit(
        &state,
        &caller,
        "profile.update",
        &format!("{tenant}/{name}"),
        detail,
    );
    Ok(Json(json!(p)))
}

pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let tenant = tenant_of(&caller, q)?;
    state.registry.delete_profile(&tenant, &name)?;
    audit(
        &state,
        &caller,
        "profile.delete",
        &format!("{tenant}/{name}"),
        json!({}),
    );
    Ok(StatusCode::NO_CONTENT)
}
