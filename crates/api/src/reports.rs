//! Scheduled reports through HTTP: definitions (CRUD), runs on request,
//! the list of runs and each run's CSV and HTML.
//!
//! Definitions are checked by the report service (`m2mhub-reports`: time
//! zone, schedule, recipients, webhook URL) before fleet operations store
//! them. Tenant users see only their tenant's reports (others are 404).
//! Webhook secrets are write-only: answers say whether one is set.
//! Creating, changing, deleting and running a report are audited.

use crate::caller::Caller;
use crate::devices::audit;
use crate::problem::{bad_json, bad_query, Problem};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use m2mhub_fleet::{Delivery, Report, ReportKind, ReportRun, RunRetention, RunTrigger, Schedule};
use m2mhub_identity::{now_ms, Role, DEFAULT_TENANT};
use m2mhub_reports::{ReportError, Reports, RunRequest};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

impl From<ReportError> for Problem {
    fn from(e: ReportError) -> Problem {
        match e {
            ReportError::Store(s) => s.into(),
            ReportError::Invalid(m) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", m)
            }
            // Date arithmetic fails only on instants outside the calendar's
            // range, which only a request can bring.
            ReportError::Time(t) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                format!("date out of range: {t}"),
            ),
            ReportError::Busy(_) => Problem::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            ReportError::Tsdb(_) | ReportError::Io(_) => {
                tracing::error!(error = %e, "report failed");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

fn service(state: &AppState) -> Result<&Arc<Reports>, Problem> {
    state.reports.as_ref().ok_or_else(|| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "reports are not enabled on this server",
        )
    })
}

fn no_report(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no report {id:?}"),
    )
}

/// A report the caller may see, or 404.
fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<Report, Problem> {
    let r = state.fleet.get_report(id).map_err(|_| no_report(id))?;
    match &caller.tenant {
        Some(t) if *t != r.tenant => Err(no_report(id)),
        _ => Ok(r),
    }
}

/// The definition as answered: the webhook's secret replaced by whether
/// one is set.
fn report_json(r: &Report) -> Value {
    let mut v = json!(r);
    if let Some(w) = v
        .pointer_mut("/delivery/webhook")
        .and_then(Value::as_object_mut)
    {
        let set = w.remove("secret").is_some();
        w.insert("secret_set".into(), json!(set));
    }
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    tenant: Option<String>,
}

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
        .list_reports(tenant.as_deref())?
        .iter()
        .map(report_json)
        .collect();
    Ok(Json(json!({ "items": items })))
}

fn yes() -> bool {
    true
}

/// A definition as written by the client.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    id: Option<String>,
    tenant: Option<String>,
    name: String,
    kind: ReportKind,
    #[serde(default)]
    devices: Vec<String>,
    schedule: Schedule,
    #[serde(default)]
    delivery: Delivery,
    #[serde(default)]
    retention: RunRetention,
    #[serde(default = "yes")]
    enabled: bool,
}

pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<Body>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let reports = service(&state)?;
    let Json(b) = body.map_err(bad_json)?;
    let tenant = caller
        .scope(b.tenant.as_deref())?
        .unwrap_or_else(|| DEFAULT_TENANT.into());
    state.registry.get_tenant(&tenant)?;
    let now = now_ms();
    let mut r = Report {
        id: b.id.unwrap_or_default(),
        tenant,
        name: b.name,
        kind: b.kind,
        devices: b.devices,
        schedule: b.schedule,
        delivery: b.delivery,
        retention: b.retention,
        enabled: b.enabled,
        next_run_ms: None,
        created_by: caller.username.clone(),
        created_ms: now,
        updated_ms: now,
    };
    reports.prepare(&mut r, now)?;
    let r = state.fleet.create_report(r)?;
    let v = report_json(&r);
    audit(&state, &caller, "report.create", &r.id, v.clone());
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(report_json(&visible(&state, &caller, &id)?)))
}

/// Replace a definition. A webhook given without a secret keeps the
/// stored secret when its URL is unchanged (answers never show it).
pub async fn update(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<Body>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let reports = service(&state)?;
    let Json(b) = body.map_err(bad_json)?;
    let old = visible(&state, &caller, &id)?;
    if b.id.as_ref().is_some_and(|i| *i != old.id)
        || b.tenant.as_ref().is_some_and(|t| *t != old.tenant)
    {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "a report's id and tenant cannot change",
        ));
    }
    let mut delivery = b.delivery;
    if let (Some(new), Some(was)) = (delivery.webhook.as_mut(), old.delivery.webhook.as_ref()) {
        if new.secret.is_none() && new.url == was.url {
            new.secret.clone_from(&was.secret);
        }
    }
    let now = now_ms();
    let mut r = Report {
        name: b.name,
        kind: b.kind,
        devices: b.devices,
        schedule: b.schedule,
        delivery,
        retention: b.retention,
        enabled: b.enabled,
        updated_ms: now,
        ..old
    };
    reports.prepare(&mut r, now)?;
    let r = state.fleet.update_report(&r)?;
    let v = report_json(&r);
    audit(&state, &caller, "report.update", &r.id, v.clone());
    Ok(Json(v))
}

pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let reports = service(&state)?;
    let r = visible(&state, &caller, &id)?;
    reports.delete(&r.id)?;
    audit(
        &state,
        &caller,
        "report.delete",
        &r.id,
        json!({"tenant": r.tenant, "name": r.name}),
    );
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunBody {
    from_ms: Option<i64>,
    to_ms: Option<i64>,
}

/// Latest instant a period may name (the end of year 9999).
const MAX_MS: i64 = 253_402_300_799_999;

/// Run now (an empty body: the period a scheduled run now would cover) and
/// deliver; 201 with the run once it is done.
pub async fn run(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let reports = service(&state)?;
    let r = visible(&state, &caller, &id)?;
    let b: RunBody = if body.iter().all(u8::is_ascii_whitespace) {
        RunBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("invalid JSON body: {e}"),
            )
        })?
    };
    let in_range = |v: Option<i64>| v.is_none_or(|v| (0..=MAX_MS).contains(&v));
    if !in_range(b.from_ms) || !in_range(b.to_ms) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            format!("from_ms and to_ms must be 0 to {MAX_MS}"),
        ));
    }
    let req = RunRequest {
        from_ms: b.from_ms,
        to_ms: b.to_ms,
    };
    audit(
        &state,
        &caller,
        "report.run",
        &r.id,
        json!({"from_ms": b.from_ms, "to_ms": b.to_ms}),
    );
    let run = reports.run(&r.id, RunTrigger::Manual, req).await?;
    Ok((StatusCode::CREATED, Json(json!(run))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    limit: Option<usize>,
}

pub async fn runs(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let r = visible(&state, &caller, &id)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let items = state.fleet.list_report_runs(&r.id, limit)?;
    Ok(Json(json!({ "items": items })))
}

fn find_run(state: &AppState, caller: &Caller, id: &str, run: &str) -> Result<ReportRun, Problem> {
    let r = visible(state, caller, id)?;
    state
        .fleet
        .list_report_runs(&r.id, 1000)?
        .into_iter()
        .find(|x| x.id == run && x.ok)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no run {run:?} with files"),
            )
        })
}

async fn file(
    state: AppState,
    caller: Caller,
    id: String,
    run: String,
    ext: &'static str,
    ctype: &'static str,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let reports = service(&state)?;
    let run = find_run(&state, &caller, &id, &run)?;
    let path = reports.ensure_file(&run, ext).await.map_err(|e| {
        tracing::warn!(run = %run.id, error = %e, "cannot render a report file");
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("the {ext} of run {} is gone", run.id),
        )
    })?;
    let data = tokio::fs::read(&path).await.map_err(|e| {
        tracing::warn!(run = %run.id, error = %e, "cannot read a report file");
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("the {ext} of run {} is gone", run.id),
        )
    })?;
    // Ids are [A-Za-z0-9._-]: safe in a quoted file name.
    let disposition = format!(
        "attachment; filename=\"{}-{}.{ext}\"",
        run.report_id, run.id
    );
    Ok((
        [
            (header::CONTENT_TYPE, ctype.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        data,
    )
        .into_response())
}

pub async fn csv(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, run)): Path<(String, String)>,
) -> Result<Response, Problem> {
    file(state, caller, id, run, "csv", "text/csv; charset=utf-8").await
}

pub async fn html(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, run)): Path<(String, String)>,
) -> Result<Response, Problem> {
    file(state, caller, id, run, "html", "text/html; charset=utf-8").await
}
