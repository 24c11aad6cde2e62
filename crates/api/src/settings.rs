//! Fleet-wide desired settings through HTTP: one call sets desired keys in
//! the shadows of every device of a tenant that a group, label or profile
//! selects (demand response: thousands of setpoints at once), and the
//! setting's page shows how many of those devices have reported the value.
//! Every device is told its delta over MQTT, as for a single shadow change.

use crate::caller::Caller;
use crate::devices::audit;
use crate::problem::{bad_json, bad_query, Problem};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_fleet::{FleetSetting, Selector};
use m2mhub_identity::{Role, DEFAULT_TENANT};
use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Platform users: the tenant (default `default`).
    tenant: Option<String>,
    group: Option<String>,
    /// `key=value`, or `key` for "has this label".
    label: Option<String>,
    profile: Option<String>,
    /// A named shadow; absent: the classic one.
    shadow: Option<String>,
    /// The desired keys to set (`null` deletes a key).
    state: Map<String, Value>,
}

fn setting_json(state: &AppState, s: &FleetSetting) -> Value {
    let progress = state.fleet.setting_progress(s);
    json!({
        "id": s.id,
        "tenant": s.tenant,
        "selector": s.selector,
        "shadow": s.shadow,
        "state": s.state,
        "created_ms": s.created_ms,
        "created_by": s.created_by,
        "failed": s.failed.iter().map(|(d, e)| json!({"device": d, "error": e})).collect::<Vec<_>>(),
        "progress": progress,
    })
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
    let selector = Selector {
        group: b.group,
        label: b.label,
        profile: b.profile,
    };
    let fleet = state.fleet.clone();
    let (t, shadow, desired, by) = (
        tenant.clone(),
        b.shadow.unwrap_or_default(),
        b.state,
        caller.username.clone(),
    );
    // One transaction for every shadow, off the async workers.
    let (setting, changes) = tokio::task::spawn_blocking(move || {
        fleet.apply_setting(&t, selector, &shadow, desired, &by)
    })
    .await
    .map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the setting did not finish: {e}"),
        )
    })??;
    let request = m2mhub_fleet::ShadowUpdate {
        state: m2mhub_fleet::shadow::UpdateState {
            desired: Some(Value::Object(setting.state.clone())),
            reported: None,
        },
        version: None,
        client_token: Some(setting.id.clone()),
    };
    for c in &changes {
        m2mhub_ingest::shadow_topics::publish_update(
            &state.broker,
            c,
            &request,
            mqtt_codec::PublishProperties::default(),
        )
        .await;
    }
    audit(
        &state,
        &caller,
        "setting.apply",
        &setting.id,
        json!({"tenant": setting.tenant, "selector": setting.selector, "shadow": setting.shadow,
               "state": setting.state, "targets": setting.targets.len(), "failed": setting.failed.len()}),
    );
    Ok((StatusCode::CREATED, Json(setting_json(&state, &setting))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let tenant = caller.scope(q.tenant.as_deref())?;
    let items: Vec<Value> = state
        .fleet
        .list_settings(tenant.as_deref(), q.limit.unwrap_or(50))?
        .iter()
        .map(|s| setting_json(&state, s))
        .collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let s = state.fleet.get_setting(caller.tenant.as_deref(), &id)?;
    Ok(Json(setting_json(&state, &s)))
}
