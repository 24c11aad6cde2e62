//! Dashboards through HTTP: CRUD under `/dashboards`, the data of their
//! widgets, and read-only share links.
//!
//! Fleet operations store a dashboard's layout (`fleet/src/dashboard.rs`);
//! this module *resolves* it: `GET /dashboards/{id}/data` answers, for
//! each widget in order, what it shows — a latest value, a series of
//! buckets, positions, active alarms, a device table, a group's
//! aggregate — read within the dashboard's tenant only, whatever a widget
//! names. The console draws from that one document, and so does a shared
//! link: `GET /shared/{token}` (no login; the token is the credential)
//! answers the same document for the one dashboard the token was made
//! for, and nothing else — a share token is not an API token, so every
//! other route, writes included, refuses it (401).
//!
//! A dashboard that is a device profile's default is opened for a device
//! with `?device=`: widgets that name no device show that one.

use crate::caller::Caller;
use crate::devices::audit;
use crate::problem::{bad_json, bad_query, Problem};
use crate::state::AppState;
use crate::telemetry::parse_duration_ms;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_fleet::alarm::{AlarmFilter, AlarmStatus};
use m2mhub_fleet::{Dashboard, DashboardShare, DashboardUpdate, NewDashboard};
use m2mhub_identity::{DeviceFilter, Role, DEFAULT_TENANT};
use m2mhub_tsdb::{AggQuery, Value as TsValue};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Devices a map or device-table widget lists, at most.
const MAX_LISTED_DEVICES: usize = 500;
/// Devices a group aggregate reads, at most.
const MAX_GROUP_DEVICES: usize = 5_000;
/// A chart widget's points, about.
const CHART_POINTS: i64 = 200;

fn no_dashboard(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no dashboard {id:?}"),
    )
}

/// A dashboard the caller may see, or 404.
fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<Dashboard, Problem> {
    let d = state
        .fleet
        .get_dashboard(id)
        .map_err(|_| no_dashboard(id))?;
    match &caller.tenant {
        Some(t) if *t != d.tenant => Err(no_dashboard(id)),
        _ => Ok(d),
    }
}

/// A share as the API shows it (never the token's hash).
fn share_json(s: &DashboardShare, now: i64) -> Value {
    json!({
        "id": s.id, "dashboard_id": s.dashboard_id, "created_by": s.created_by,
        "created_ms": s.created_ms, "expires_ms": s.expires_ms, "revoked_ms": s.revoked_ms,
        "live": s.live(now),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant: Option<String>,
    /// Only the default dashboard of this device profile.
    profile: Option<String>,
}

pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let tenant = caller.scope(q.tenant.as_deref())?;
    let items: Vec<Dashboard> = state
        .fleet
        .list_dashboards(tenant.as_deref())?
        .into_iter()
        .filter(|d| q.profile.is_none() || d.profile == q.profile)
        .collect();
    Ok(Json(json!({ "items": items })))
}

fn empty_layout() -> Value {
    json!({"widgets": []})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    id: Option<String>,
    tenant: Option<String>,
    name: String,
    #[serde(default)]
    description: String,
    profile: Option<String>,
    #[serde(default = "empty_layout")]
    layout: Value,
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
    let d = state.fleet.create_dashboard(
        &tenant,
        NewDashboard {
            id: b.id,
            name: b.name,
            description: b.description,
            profile: b.profile,
            layout: b.layout,
        },
        &caller.username,
    )?;
    audit(
        &state,
        &caller,
        "dashboard.create",
        &d.id,
        json!({"tenant": d.tenant, "name": d.name}),
    );
    Ok((StatusCode::CREATED, Json(json!(d))))
}

pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(json!(visible(&state, &caller, &id)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    name: Option<String>,
    description: Option<String>,
    /// A profile name, or `null` to stop being a profile's default.
    #[serde(default, deserialize_with = "present")]
    profile: Option<Option<String>>,
    layout: Option<Value>,
}

/// `Some(None)` for an explicit `null`, `None` when absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

pub async fn update(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<UpdateBody>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let Json(b) = body.map_err(bad_json)?;
    visible(&state, &caller, &id)?;
    let d = state.fleet.update_dashboard(
        &id,
        DashboardUpdate {
            name: b.name,
            description: b.description,
            profile: b.profile,
            layout: b.layout,
        },
        &caller.username,
    )?;
    audit(
        &state,
        &caller,
        "dashboard.update",
        &id,
        json!({"name": d.name, "widgets": d.layout["widgets"].as_array().map_or(0, Vec::len)}),
    );
    Ok(Json(json!(d)))
}

pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let d = visible(&state, &caller, &id)?;
    state.fleet.delete_dashboard(&id)?;
    audit(
        &state,
        &caller,
        "dashboard.delete",
        &id,
        json!({"tenant": d.tenant, "name": d.name}),
    );
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataQuery {
    /// The device that widgets naming none show (a profile's default
    /// dashboard opened for a device).
    device: Option<String>,
}

/// `GET /dashboards/{id}/data`: what each widget shows.
pub async fn data(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<DataQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let d = visible(&state, &caller, &id)?;
    Ok(Json(resolved(&state, &d, q.device.as_deref(), false).await))
}

/// `GET /shared/{token}`: the one dashboard a share opens, with its data,
/// read-only. Unknown, revoked and expired tokens are all 404.
pub async fn shared(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Json<Value>, Problem> {
    let now = m2mhub_identity::now_ms();
    let (share, d) = state.fleet.open_share(&token, now)?;
    let mut v = resolved(&state, &d, None, true).await;
    v["read_only"] = json!(true);
    v["expires_ms"] = json!(share.expires_ms);
    Ok(Json(v))
}

/// The dashboard (for a share: without its owner's bookkeeping) and the
/// data of every widget, read on the blocking pool (store reads), the
/// widgets side by side: a dashboard loads in the time of its slowest
/// widgets (group aggregates over thousands of series), not their sum.
async fn resolved(state: &AppState, d: &Dashboard, device: Option<&str>, shared: bool) -> Value {
    let list = d.layout["widgets"].as_array().cloned().unwrap_or_default();
    let tenant: Arc<str> = d.tenant.as_str().into();
    let device: Option<Arc<str>> = device.map(Into::into);
    let tasks: Vec<_> = list
        .into_iter()
        .map(|w| {
            let (st, tenant, device) = (state.clone(), tenant.clone(), device.clone());
            tokio::task::spawn_blocking(move || {
                match widget_data(&st, &tenant, &w, device.as_deref()) {
                    Ok(v) => v,
                    Err(e) => json!({"error": e}),
                }
            })
        })
        .collect();
    let mut widgets = Vec::with_capacity(tasks.len());
    for t in tasks {
        widgets.push(
            t.await
                .unwrap_or_else(|e| json!({"error": format!("widget failed: {e}")})),
        );
    }
    let dashboard = if shared {
        json!({"id": d.id, "name": d.name, "description": d.description, "layout": d.layout})
    } else {
        json!(d)
    };
    json!({"dashboard": dashboard, "data": widgets, "ts_ms": m2mhub_identity::now_ms()})
}

fn text<'a>(w: &'a Value, key: &str) -> Option<&'a str> {
    w.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn ts_json(v: &TsValue) -> Value {
    match v {
        TsValue::F64(x) => json!(x),
        TsValue::Bool(b) => json!(b),
        TsValue::Str(s) => json!(&**s),
    }
}

/// A device of the tenant, or why not (a widget may name one that was
/// deleted or belongs elsewhere: it shows the reason, the others draw).
fn tenant_device(
    state: &AppState,
    tenant: &str,
    id: &str,
) -> Result<m2mhub_identity::Device, String> {
    match state.registry.get_device(id) {
        Ok(d) if d.tenant == tenant => Ok(d),
        _ => Err(format!("no device {id:?}")),
    }
}

/// A widget's range: `1h`, `24h`, `7d`… (default 24 h, at most 31 days).
fn range_ms(w: &Value, default: i64) -> Result<i64, String> {
    match text(w, "range") {
        None => Ok(default),
        Some(r) => parse_duration_ms(r)
            .filter(|ms| (60_000..=31 * 86_400_000).contains(ms))
            .ok_or_else(|| format!("range {r:?}: use e.g. 1h, 24h or 7d (1 minute to 31 days)")),
    }
}

/// The devices of a tenant (of a group if given), at most `max`.
fn devices_of(
    state: &AppState,
    tenant: &str,
    group: Option<&str>,
    max: usize,
) -> Result<Vec<m2mhub_identity::Device>, String> {
    state
        .registry
        .list_devices(&DeviceFilter {
            tenant: Some(tenant.into()),
            group: group.map(str::to_string),
            limit: Some(max),
            ..Default::default()
        })
        .map_err(|e| e.to_string())
}

fn latest_of(state: &AppState, tenant: &str, device: &str, metric: &str) -> Value {
    state
        .tsdb
        .latest(tenant, device)
        .ok()
        .and_then(|l| l.into_iter().find(|p| &*p.metric == metric))
        .map_or(
            json!({"value": null, "ts_ms": null}),
            |p| json!({"value": ts_json(&p.value), "ts_ms": p.ts_ms}),
        )
}

/// What one widget shows; the error is shown in its place.
fn widget_data(
    state: &AppState,
    tenant: &str,
    w: &Value,
    device: Option<&str>,
) -> Result<Value, String> {
    let ty = text(w, "type").unwrap_or_default();
    let now = m2mhub_identity::now_ms();
    let the_device = || -> Result<m2mhub_identity::Device, String> {
        let id = text(w, "device")
            .or(device)
            .ok_or("choose a device for this widget")?;
        tenant_device(state, tenant, id)
    };
    let metric = || text(w, "metric").ok_or_else(|| "choose a metric for this widget".to_string());
    match ty {
        "value" | "gauge" => {
            let d = the_device()?;
            let m = metric()?;
            let mut v = latest_of(state, tenant, &d.id, m);
            v["device"] = json!(d.id);
            v["metric"] = json!(m);
            Ok(v)
        }
        "chart" => {
            let d = the_device()?;
            let m = metric()?;
            let span = range_ms(w, 86_400_000)?;
            // Whole seconds, about CHART_POINTS buckets.
            let bucket = (span / CHART_POINTS).max(1_000) / 1_000 * 1_000;
            let devices = [d.id.clone()];
            let (series, _) = state
                .tsdb
                .aggregate(&AggQuery {
                    tenant,
                    metric: m,
                    devices: &devices,
                    from_ms: now - span,
                    to_ms: now,
                    bucket_ms: bucket,
                })
                .map_err(|e| e.to_string())?;
            let points: Vec<Value> = series
                .first()
                .map(|s| {
                    s.buckets
                        .iter()
                        .map(|(t, a)| json!([t + bucket / 2, a.avg(), a.min, a.max]))
                        .collect()
                })
                .unwrap_or_default();
            Ok(
                json!({"device": d.id, "metric": m, "from_ms": now - span, "to_ms": now, "bucket_ms": bucket, "points": points}),
            )
        }
        "map" => {
            let list = devices_of(state, tenant, text(w, "group"), MAX_LISTED_DEVICES)?;
            let items: Vec<Value> = list
                .iter()
                .filter_map(|d| {
                    let latest = state.tsdb.latest(tenant, &d.id).ok()?;
                    let num = |name: &str| {
                        latest.iter().find(|p| &*p.metric == name).and_then(|p| match p.value {
                            TsValue::F64(x) => Some((x, p.ts_ms)),
                            _ => None,
                        })
                    };
                    let ((lat, t), (lon, _)) = (num("lat")?, num("lon")?);
                    Some(json!({"id": d.id, "name": d.name, "lat": lat, "lon": lon, "ts_ms": t, "online": state.broker.is_online(&d.id)}))
                })
                .collect();
            Ok(json!({"items": items}))
        }
        "alarms" => {
            let device_id = match text(w, "device").or(device) {
                Some(id) => Some(tenant_device(state, tenant, id)?.id),
                None => None,
            };
            let alarms = state
                .fleet
                .list_alarms(&AlarmFilter {
                    tenant: Some(tenant.into()),
                    device_id,
                    status: Some(AlarmStatus::Active),
                    limit: Some(20),
                    ..Default::default()
                })
                .map_err(|e| e.to_string())?;
            let items: Vec<Value> = alarms
                .iter()
                .map(|a| json!({"id": a.id, "device": a.device_id, "type": a.alarm_type, "severity": a.severity.as_str(), "acked": a.acked, "created_ms": a.created_ms, "count": a.count}))
                .collect();
            Ok(json!({"items": items}))
        }
        "devices" => {
            let list = devices_of(state, tenant, text(w, "group"), MAX_LISTED_DEVICES.min(50))?;
            let metrics: Vec<&str> = w
                .get("metrics")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).take(6).collect())
                .unwrap_or_default();
            let items: Vec<Value> = list
                .iter()
                .map(|d| {
                    let latest = state.tsdb.latest(tenant, &d.id).unwrap_or_default();
                    let values: Map<String, Value> = metrics
                        .iter()
                        .map(|m| {
                            let v = latest
                                .iter()
                                .find(|p| &*p.metric == *m)
                                .map_or(Value::Null, |p| ts_json(&p.value));
                            (m.to_string(), v)
                        })
                        .collect();
                    json!({"id": d.id, "name": d.name, "group": d.group, "online": state.broker.is_online(&d.id), "values": values})
                })
                .collect();
            Ok(json!({"metrics": metrics, "items": items}))
        }
        "group" => {
            let m = metric()?;
            let span = range_ms(w, 3_600_000)?;
            let f = text(w, "fn").unwrap_or("avg");
            let list = devices_of(state, tenant, text(w, "group"), MAX_GROUP_DEVICES)?;
            let ids: Vec<String> = list.into_iter().map(|d| d.id).collect();
            if ids.is_empty() {
                return Ok(json!({"value": null, "devices": 0, "fn": f, "metric": m}));
            }
            let (series, _) = state
                .tsdb
                .aggregate(&AggQuery {
                    tenant,
                    metric: m,
                    devices: &ids,
                    from_ms: now - span,
                    to_ms: now,
                    bucket_ms: span,
                })
                .map_err(|e| e.to_string())?;
            let mut all: Option<m2mhub_tsdb::Agg> = None;
            let mut reporting = 0;
            for s in &series {
                for (_, a) in &s.buckets {
                    match &mut all {
                        Some(x) => x.merge(a),
                        None => all = Some(*a),
                    }
                }
                reporting += usize::from(!s.buckets.is_empty());
            }
            let value = all.and_then(|a| match f {
                "avg" => Some(a.avg()),
                "min" => Some(a.min),
                "max" => Some(a.max),
                "sum" => Some(a.sum),
                "count" => Some(a.count as f64),
                _ => None,
            });
            if !["avg", "min", "max", "sum", "count"].contains(&f) {
                return Err(format!("fn {f:?}: use avg, min, max, sum or count"));
            }
            Ok(
                json!({"value": value, "fn": f, "metric": m, "devices": ids.len(), "reporting": reporting, "range_ms": span}),
            )
        }
        other => Err(format!("unknown widget type {other:?}")),
    }
}

// ---- Shares -----------------------------------------------------------------

pub async fn list_shares(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    let now = m2mhub_identity::now_ms();
    let items: Vec<Value> = state
        .fleet
        .list_shares(&id)?
        .iter()
        .map(|s| share_json(s, now))
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareBody {
    /// How long the link works: `1h`, `7d`… (default 7 days, at most a
    /// year).
    expires_in: Option<String>,
}

pub async fn create_share(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<ShareBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let Json(b) = body.map_err(bad_json)?;
    visible(&state, &caller, &id)?;
    let valid = match b.expires_in.as_deref() {
        None => 7 * 86_400_000,
        Some(s) => parse_duration_ms(s).ok_or_else(|| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-parameter",
                format!("`expires_in` {s:?}: use e.g. 1h, 24h or 7d"),
            )
        })?,
    };
    let (s, token) = state.fleet.create_share(&id, valid, &caller.username)?;
    audit(
        &state,
        &caller,
        "dashboard.share",
        &id,
        json!({"share": s.id, "expires_ms": s.expires_ms}),
    );
    let mut v = share_json(&s, m2mhub_identity::now_ms());
    v["token"] = json!(token);
    v["console_path"] = json!(format!("/#/shared/{token}"));
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn revoke_share(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, share)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    state.fleet.revoke_share(&id, &share)?;
    audit(
        &state,
        &caller,
        "dashboard.unshare",
        &id,
        json!({"share": share}),
    );
    Ok(StatusCode::NO_CONTENT)
}
