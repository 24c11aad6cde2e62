//! Alarms through HTTP: the active ones and their history, newest first and
//! paged backwards with `before`; operators acknowledge and clear them.
//! Tenant users see only their tenant's alarms (others answer 404); every
//! operator action is audited.

use crate::caller::Caller;
use crate::devices::audit;
use crate::problem::{bad_query, Problem};
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_fleet::{Alarm, AlarmFilter, ClearedBy};
use m2mhub_identity::Role;
use serde::Deserialize;
use serde_json::{json, Value};

const MAX_PAGE: usize = 1000;

fn invalid(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", detail)
}

fn no_alarm(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no alarm {id:?}"),
    )
}

/// An alarm the caller may see, or 404.
fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<Alarm, Problem> {
    let n: u64 = id.parse().map_err(|_| no_alarm(id))?;
    let a = state.fleet.get_alarm(n)?;
    match &caller.tenant {
        Some(t) if *t != a.tenant => Err(no_alarm(id)),
        _ => Ok(a),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant: Option<String>,
    device: Option<String>,
    /// `active` or `cleared`.
    status: Option<String>,
    severity: Option<String>,
    #[serde(rename = "type")]
    alarm_type: Option<String>,
    /// Only alarms older than this id (the `next` of the previous page).
    before: Option<u64>,
    limit: Option<usize>,
}

pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(invalid(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    let filter = AlarmFilter {
        tenant: caller.scope(q.tenant.as_deref())?,
        device_id: q.device,
        status: q
            .status
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: m2mhub_identity::RegistryError| invalid(e.to_string()))?,
        severity: q
            .severity
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: m2mhub_identity::RegistryError| invalid(e.to_string()))?,
        alarm_type: q.alarm_type,
        before: q.before,
        limit: Some(limit),
    };
    let items = state.fleet.list_alarms(&filter)?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|a| a.id))
        .flatten();
    Ok(Json(json!({ "items": items, "next": next })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryQuery {
    tenant: Option<String>,
}

/// Active alarms by severity: of the caller's tenant, of a named one, or
/// (platform users naming none) of all.
pub async fn summary(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<SummaryQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let tenant = caller.scope(q.tenant.as_deref())?;
    if let Some(t) = &tenant {
        state.registry.get_tenant(t)?;
    }
    let counts = state.fleet.alarm_counts(tenant.as_deref());
    let mut v = json!(counts);
    v["tenant"] = json!(tenant);
    Ok(Json(v))
}

pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(json!(visible(&state, &caller, &id)?)))
}

/// Acknowledge: the alarm stays active until cleared. Acknowledging again
/// changes nothing.
pub async fn ack(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let a = visible(&state, &caller, &id)?;
    let a = state.fleet.ack_alarm(a.id, &caller.username)?;
    audit(
        &state,
        &caller,
        "alarm.ack",
        &a.id.to_string(),
        json!({"tenant": a.tenant, "device": a.device_id, "type": a.alarm_type}),
    );
    Ok(Json(json!(a)))
}

/// Clear by hand (409 if it is already cleared).
pub async fn clear(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let a = visible(&state, &caller, &id)?;
    let a = state
        .fleet
        .clear_alarm_by_id(a.id, ClearedBy::Operator(caller.username.clone()))?;
    audit(
        &state,
        &caller,
        "alarm.clear",
        &a.id.to_string(),
        json!({"tenant": a.tenant, "device": a.device_id, "type": a.alarm_type}),
    );
    Ok(Json(json!(a)))
}
