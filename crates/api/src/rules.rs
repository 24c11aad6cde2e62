//! Rules through HTTP, and the seam to the rules engine.
//!
//! Fleet operations store a rule as written; whether its SQL and actions make
//! sense is the rule service's call ([`RuleService`], from `m2mhub-automation`, installed in
//! [`AppState::rules`] by the binary). A create or update the service
//! refuses is a 422 problem with the position of the fault (`line`,
//! `column`). After every write — create, update, enable, disable, delete —
//! the service is told to reload the rule, so a change takes effect without
//! a restart. Without a service (tests, tools), rules are stored
//! unvalidated. Rules are tenant-scoped like devices; every write is
//! audited.

use crate::caller::Caller;
use crate::devices::audit;
use crate::problem::{bad_json, bad_query, Problem};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_automation::RuleProblem;
use m2mhub_fleet::{NewRule, Rule, RuleUpdate};
use m2mhub_identity::{Role, DEFAULT_TENANT};
use serde::Deserialize;
use serde_json::{json, Value};

impl From<RuleProblem> for Problem {
    /// 422 with the position as the extension members `line` and `column`
    /// (present when known).
    fn from(r: RuleProblem) -> Problem {
        let mut p = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-rule", r.message);
        if let Some(l) = r.line {
            p = p.with("line", l);
        }
        if let Some(c) = r.column {
            p = p.with("column", c);
        }
        p
    }
}

/// A rule with the engine's counters (`null` when not running or no
/// service is installed).
fn rule_json(state: &AppState, r: &Rule) -> Value {
    let mut v = json!(r);
    v["counters"] = state
        .rules
        .as_ref()
        .and_then(|s| s.counters(&r.id))
        .unwrap_or(Value::Null);
    v
}

fn no_rule(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no rule {id:?}"),
    )
}

/// A rule the caller may see, or 404.
fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<Rule, Problem> {
    let r = state.fleet.get_rule(id).map_err(|_| no_rule(id))?;
    match &caller.tenant {
        Some(t) if *t != r.tenant => Err(no_rule(id)),
        _ => Ok(r),
    }
}

fn validate(state: &AppState, tenant: &str, sql: &str, actions: &Value) -> Result<(), Problem> {
    match &state.rules {
        Some(s) => s.validate(tenant, sql, actions).map_err(Problem::from),
        None => Ok(()),
    }
}

/// Audit a write and let the engine pick it up.
fn changed(state: &AppState, caller: &Caller, action: &str, id: &str, detail: Value) {
    audit(state, caller, action, id, detail);
    if let Some(s) = &state.rules {
        s.reload(id);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    tenant: Option<String>,
}

/// Rules of the caller's tenant; platform users see every tenant's unless
/// they name one.
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let tenant = caller.scope(q.tenant.as_deref())?;
    let items: Vec<Value> = state
        .fleet
        .list_rules(tenant.as_deref())?
        .iter()
        .map(|r| rule_json(&state, r))
        .collect();
    Ok(Json(json!({ "items": items })))
}

fn default_actions() -> Value {
    json!([])
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    id: Option<String>,
    tenant: Option<String>,
    name: Option<String>,
    #[serde(default)]
    description: String,
    sql: String,
    #[serde(default = "default_actions")]
    actions: Value,
    #[serde(default = "yes")]
    enabled: bool,
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
    state.registry.get_tenant(&tenant)?;
    validate(&state, &tenant, &b.sql, &b.actions)?;
    let r = state.fleet.create_rule(
        &tenant,
        NewRule {
            id: b.id,
            name: b.name,
            description: b.description,
            sql: b.sql,
            actions: b.actions,
            enabled: b.enabled,
        },
    )?;
    changed(
        &state,
        &caller,
        "rule.create",
        &r.id,
        json!({"tenant": r.tenant, "name": r.name, "sql": r.sql, "actions": r.actions, "enabled": r.enabled}),
    );
    Ok((StatusCode::CREATED, Json(rule_json(&state, &r))))
}

pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let r = visible(&state, &caller, &id)?;
    Ok(Json(rule_json(&state, &r)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    name: Option<String>,
    description: Option<String>,
    sql: Option<String>,
    actions: Option<Value>,
    enabled: Option<bool>,
}

/// Change a rule (absent fields stay); a changed SQL or action list is
/// validated as a whole with the rest of the rule.
pub async fn update(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<UpdateBody>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let Json(b) = body.map_err(bad_json)?;
    let old = visible(&state, &caller, &id)?;
    if b.sql.is_some() || b.actions.is_some() {
        validate(
            &state,
            &old.tenant,
            b.sql.as_deref().unwrap_or(&old.sql),
            b.actions.as_ref().unwrap_or(&old.actions),
        )?;
    }
    let detail = json!({
        "name": b.name, "description": b.description, "sql": b.sql,
        "actions": b.actions, "enabled": b.enabled,
    });
    let r = state.fleet.update_rule(
        &id,
        RuleUpdate {
            name: b.name,
            description: b.description,
            sql: b.sql,
            actions: b.actions,
            enabled: b.enabled,
        },
    )?;
    changed(&state, &caller, "rule.update", &id, detail);
    Ok(Json(rule_json(&state, &r)))
}

pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let r = visible(&state, &caller, &id)?;
    state.fleet.delete_rule(&id)?;
    changed(
        &state,
        &caller,
        "rule.delete",
        &id,
        json!({"tenant": r.tenant, "name": r.name}),
    );
    Ok(StatusCode::NO_CONTENT)
}

async fn set_enabled(
    caller: Caller,
    state: AppState,
    id: String,
    enabled: bool,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    let r = state.fleet.set_rule_enabled(&id, enabled)?;
    changed(
        &state,
        &caller,
        if enabled {
            "rule.enable"
        } else {
            "rule.disable"
        },
        &id,
        json!({}),
    );
    Ok(Json(rule_json(&state, &r)))
}

pub async fn enable(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    set_enabled(caller, state, id, true).await
}

pub async fn disable(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    set_enabled(caller, state, id, false).await
}
