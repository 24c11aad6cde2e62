//! Telemetry queries: latest values, raw points (paged, JSON or CSV),
//! bucketed aggregates over one device or a group, retention rules, and
//! the ingest counters shown on `/metrics`.
//!
//! Times are accepted as epoch milliseconds, RFC 3339 (`2026-11-21T10:00:00Z`),
//! `now`, or relative to now (`-15m`, `-24h`, `-7d`); durations as `30s`,
//! `5m`, `1h`, `1d` or milliseconds.

use crate::caller::Caller;
use crate::devices::{audit, visible};
use crate::problem::{bad_json, Problem};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use m2mhub_identity::{now_ms, DeviceFilter, Role};
use m2mhub_tsdb::{
    Agg, AggFn, AggQuery, Cursor, RawQuery, Retention, RetentionRule, TsdbError, Value as TsValue,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::fmt::Write;

use std::time::Duration;

/// Prometheus text of the ingest counters and the store's figures.
pub fn metrics_text(state: &AppState, out: &mut String) {
    if let Some(g) = state.pipeline.as_ref().and_then(|p| p.gateways.as_ref()) {
        for (name, help, v) in g.counters.counters() {
            let _ = writeln!(out, "# HELP m2mhub_gateway_{name}_total {help}");
            let _ = writeln!(out, "# TYPE m2mhub_gateway_{name}_total counter");
            let _ = writeln!(out, "m2mhub_gateway_{name}_total {v}");
        }
    }
    if let Some(c) = &state.ingest {
        for (name, help, v) in c.counters() {
            let _ = writeln!(out, "# HELP m2mhub_telemetry_{name}_total {help}");
            let _ = writeln!(out, "# TYPE m2mhub_telemetry_{name}_total counter");
            let _ = writeln!(out, "m2mhub_telemetry_{name}_total {v}");
        }
    }
    let s = state.tsdb.stats();
    for (name, kind, help, v) in [
        ("series", "gauge", "time series", s.series),
        (
            "points_appended_total",
            "counter",
            "points written to the WAL",
            s.points_appended,
        ),
        (
            "wal_commits_total",
            "counter",
            "WAL group commits",
            s.wal_commits,
        ),
        (
            "wal_bytes_total",
            "counter",
            "bytes written to the WAL",
            s.wal_bytes,
        ),
        (
            "flushes_total",
            "counter",
            "flushes of head chunks to partitions",
            s.flushes,
        ),
        (
            "compactions_total",
            "counter",
            "partition compactions",
            s.compactions,
        ),
        (
            "compaction_peak_bytes",
            "gauge",
            "most data one compaction held in memory at once since start",
            s.compaction_peak_bytes,
        ),
        (
            "partitions",
            "gauge",
            "time partitions on disk",
            s.partitions,
        ),
        (
            "head_points",
            "gauge",
            "points in memory not yet flushed to partitions",
            s.head_points,
        ),
        (
            "head_bytes",
            "gauge",
            "memory held by head chunks",
            s.head_bytes,
        ),
        (
            "disk_bytes",
            "gauge",
            "bytes of partition files and WAL",
            s.disk_bytes,
        ),
        (
            "write_errors_total",
            "counter",
            "failed writes (full disk, I/O errors)",
            s.write_errors,
        ),
        (
            "disk_full",
            "gauge",
            "1 while points are refused for lack of disk space",
            u64::from(s.disk_full),
        ),
    ] {
        let _ = writeln!(out, "# HELP m2mhub_tsdb_{name} {help}");
        let _ = writeln!(out, "# TYPE m2mhub_tsdb_{name} {kind}");
        let _ = writeln!(out, "m2mhub_tsdb_{name} {v}");
    }
}

impl From<TsdbError> for Problem {
    fn from(e: TsdbError) -> Self {
        let (status, kind) = match &e {
            TsdbError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid-parameter"),
            TsdbError::NotNumeric(_) => (StatusCode::UNPROCESSABLE_ENTITY, "not-numeric"),
            TsdbError::DiskFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "disk-full"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "time-series store error");
        }
        Problem::new(status, kind, e.to_string())
    }
}

fn bad(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", detail)
}

/// A duration: `500ms`, `30s`, `5m`, `1h`, `1d`, `1w` or plain milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let mult = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A point in time (see the module docs).
pub fn parse_time(s: &str, now: i64) -> Option<i64> {
    let s = s.trim();
    if s == "now" {
        return Some(now);
    }
    if let Some(rel) = s.strip_prefix('-') {
        if rel.chars().next().is_some_and(|c| c.is_ascii_digit())
            && rel.ends_with(|c: char| c.is_ascii_alphabetic())
        {
            return Some(now - parse_duration_ms(rel)?);
        }
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    m2mhub_telemetry::parse_rfc3339(s).ok()
}

/// RFC 3339 in UTC with milliseconds.
pub fn format_time(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

fn range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), Problem> {
    let now = now_ms();
    let to = match to {
        Some(t) => parse_time(t, now).ok_or_else(|| {
            bad(format!(
                "`to`: {t:?} is not a time (epoch ms, RFC 3339, now, or -24h)"
            ))
        })?,
        None => now,
    };
    let from = match from {
        Some(f) => parse_time(f, now).ok_or_else(|| {
            bad(format!(
                "`from`: {f:?} is not a time (epoch ms, RFC 3339, now, or -24h)"
            ))
        })?,
        None => to.saturating_sub(86_400_000),
    };
    if from >= to {
        return Err(bad("`from` must be before `to`"));
    }
    Ok((from, to))
}

fn value_json(v: &TsValue) -> Value {
    match v {
        TsValue::F64(x) if x.is_finite() => json!(x),
        // JSON has no NaN or infinities: they travel as strings.
        TsValue::F64(x) => json!(x.to_string()),
        TsValue::Bool(b) => json!(b),
        TsValue::Str(s) => json!(&**s),
    }
}

fn value_csv(v: &TsValue) -> String {
    match v {
        TsValue::F64(x) => x.to_string(),
        TsValue::Bool(b) => b.to_string(),
        TsValue::Str(s) => csv_field(s),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv(body: String, filename: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response()
}

fn want_csv(format: Option<&str>) -> Result<bool, Problem> {
    match format {
        None | Some("json") => Ok(false),
        Some("csv") => Ok(true),
        Some(f) => Err(bad(format!("`format`: {f:?}; use json or csv"))),
    }
}

/// `GET /devices/{id}/telemetry`: the latest value of every metric.
pub async fn latest(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let d = visible(&state, &caller, &id)?;
    let store = state.tsdb.clone();
    let (tenant, device) = (d.tenant.clone(), d.id.clone());
    // The store may be across the network (PostgreSQL): off the async workers.
    let latest = tokio::task::spawn_blocking(move || store.latest(&tenant, &device))
        .await
        .map_err(|e| {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    let items: Vec<Value> = latest
        .iter()
        .map(|l| {
            json!({
                "metric": &*l.metric,
                "kind": l.kind.name(),
                "ts_ms": l.ts_ms,
                "time": format_time(l.ts_ms),
                "value": value_json(&l.value),
            })
        })
        .collect();
    Ok(Json(json!({ "device": d.id, "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParams {
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    format: Option<String>,
    /// CSV: follow the cursor to the end of the range (an export).
    all: Option<bool>,
}

/// `GET /devices/{id}/telemetry/{metric}`: raw points, oldest first.
pub async fn raw(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, metric)): Path<(String, String)>,
    q: Result<Query<RawParams>, QueryRejection>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(crate::problem::bad_query)?;
    let d = visible(&state, &caller, &id)?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > m2mhub_tsdb::MAX_PAGE {
        return Err(bad(format!(
            "limit must be between 1 and {}",
            m2mhub_tsdb::MAX_PAGE
        )));
    }
    let mut after = match q.cursor.as_deref() {
        Some(c) => Some(
            Cursor::decode(c).ok_or_else(|| bad("`cursor` is not a cursor this API returned"))?,
        ),
        None => None,
    };
    let csv_out = want_csv(q.format.as_deref())?;
    let export = q.all.unwrap_or(false);
    if export && !csv_out {
        return Err(bad("`all=true` exports a whole range and needs format=csv"));
    }
    let store = state.tsdb.clone();
    let (tenant, device) = (d.tenant.clone(), d.id.clone());
    let metric2 = metric.clone();
    // Decoding is CPU work: keep it off the async workers.
    let pages = tokio::task::spawn_blocking(move || -> Result<_, TsdbError> {
        let mut pages = Vec::new();
        loop {
            let page = store.raw(&RawQuery {
                tenant: &tenant,
                device: &device,
                metric: &metric2,
                from_ms: from,
                to_ms: to,
                limit,
                after,
            })?;
            after = page.next;
            let done = page.next.is_none() || !export;
            pages.push(page);
            if done {
                return Ok(pages);
            }
        }
    })
    .await
    .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    if csv_out {
        let mut body = String::from("ts_ms,time,value\n");
        for p in pages.iter().flat_map(|p| p.points.iter()) {
            let _ = writeln!(
                body,
                "{},{},{}",
                p.ts_ms,
                format_time(p.ts_ms),
                value_csv(&p.value)
            );
        }
        return Ok(csv(body, &format!("{}-{}.csv", d.id, metric)));
    }
    let page = pages.into_iter().next_back().ok_or_else(|| bad("empty"))?;
    Ok(Json(json!({
        "device": d.id,
        "metric": metric,
        "kind": page.kind.name(),
        "from_ms": from,
        "to_ms": to,
        "points": page.points.iter().map(|p| json!([p.ts_ms, value_json(&p.value)])).collect::<Vec<_>>(),
        "next": page.next.map(|c| c.encode()),
    }))
    .into_response())
}

/// `GET /devices/{id}/series`: the metrics a device has reported.
pub async fn series(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let d = visible(&state, &caller, &id)?;
    let store = state.tsdb.clone();
    let (tenant, device) = (d.tenant.clone(), d.id.clone());
    let series = tokio::task::spawn_blocking(move || store.series(&tenant, Some(&device), None))
        .await
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let items: Vec<Value> = series
        .iter()
        .map(|s| json!({"metric": &*s.key.metric, "kind": s.kind.name()}))
        .collect();
    Ok(Json(json!({ "device": d.id, "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggParams {
    metric: String,
    /// Comma-separated device ids.
    device: Option<String>,
    group: Option<String>,
    tenant: Option<String>,
    from: Option<String>,
    to: Option<String>,
    bucket: Option<String>,
    /// Comma-separated: avg, min, max, sum, count, first, last (default all).
    #[serde(rename = "fn")]
    fns: Option<String>,
    /// Merge all devices into one series (`"device": "*"`).
    combine: Option<bool>,
    format: Option<String>,
}

/// `GET /telemetry/aggregate`: per-bucket aggregates of one metric.
pub async fn aggregate(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<AggParams>, QueryRejection>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(crate::problem::bad_query)?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let bucket_txt = q.bucket.as_deref().unwrap_or("1h");
    let bucket = parse_duration_ms(bucket_txt)
        .filter(|b| *b > 0)
        .ok_or_else(|| {
            bad(format!(
                "`bucket`: {bucket_txt:?}; use e.g. 30s, 5m, 1h, 1d"
            ))
        })?;
    let fns: Vec<AggFn> = match q.fns.as_deref() {
        None => AggFn::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|f| {
                AggFn::parse(f.trim()).ok_or_else(|| {
                    bad(format!(
                        "`fn`: {f:?}; use avg, min, max, sum, count, first or last"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    // Which devices: listed ones (each must be visible), a group's, or
    // every device of the tenant that has the metric.
    let (tenant, devices): (String, Vec<String>) = match (&q.device, &q.group) {
        (Some(_), Some(_)) => return Err(bad("give `device` or `group`, not both")),
        (Some(list), None) => {
            let mut tenant = None;
            let mut devs = Vec::new();
            for id in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let d = visible(&state, &caller, id)?;
                if tenant.as_ref().is_some_and(|t| *t != d.tenant) {
                    return Err(bad(
                        "the devices belong to different tenants; query one tenant at a time",
                    ));
                }
                tenant = Some(d.tenant.clone());
                devs.push(d.id);
            }
            (tenant.ok_or_else(|| bad("`device` lists no device"))?, devs)
        }
        (None, group) => {
            let tenant = caller
                .scope(q.tenant.as_deref())?
                .unwrap_or_else(|| m2mhub_identity::DEFAULT_TENANT.into());
            let devs = match group {
                Some(g) => {
                    // The whole group, page by page (the registry answers
                    // at most 10,000 devices a call).
                    const PAGE: usize = 10_000;
                    let mut ids = Vec::new();
                    let mut filter = DeviceFilter {
                        tenant: Some(tenant.clone()),
                        group: Some(g.clone()),
                        limit: Some(PAGE),
                        ..Default::default()
                    };
                    loop {
                        let page = state.registry.list_devices(&filter)?;
                        let full = page.len() == PAGE;
                        filter.after = page.last().map(|d| d.id.clone());
                        ids.extend(page.into_iter().map(|d| d.id));
                        if !full {
                            break;
                        }
                    }
                    if ids.is_empty() {
                        return Ok(Json(
                            json!({"metric": q.metric, "bucket_ms": bucket, "series": []}),
                        )
                        .into_response());
                    }
                    ids
                }
                None => Vec::new(),
            };
            (tenant, devs)
        }
    };
    let store = state.tsdb.clone();
    let metric = q.metric.clone();
    let (mut series, sources) = tokio::task::spawn_blocking(move || {
        store.aggregate(&AggQuery {
            tenant: &tenant,
            metric: &metric,
            devices: &devices,
            from_ms: from,
            to_ms: to,
            bucket_ms: bucket,
        })
    })
    .await
    .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    if q.combine.unwrap_or(false) && !series.is_empty() {
        let mut merged: std::collections::BTreeMap<i64, Agg> = std::collections::BTreeMap::new();
        for s in &series {
            for (b, a) in &s.buckets {
                merged.entry(*b).and_modify(|x| x.merge(a)).or_insert(*a);
            }
        }
        series = vec![m2mhub_tsdb::SeriesBuckets {
            device: "*".into(),
            buckets: merged.into_iter().collect(),
        }];
    }
    if want_csv(q.format.as_deref())? {
        let mut body = String::from("device,bucket_ms,time");
        for f in &fns {
            let _ = write!(body, ",{}", f.name());
        }
        body.push('\n');
        for s in &series {
            for (b, a) in &s.buckets {
                let _ = write!(body, "{},{},{}", csv_field(&s.device), b, format_time(*b));
                for f in &fns {
                    let _ = write!(body, ",{}", f.apply(a));
                }
                body.push('\n');
            }
        }
        return Ok(csv(body, &format!("{}-{}.csv", q.metric, bucket_txt)));
    }
    let series_json: Vec<Value> = series
        .iter()
        .map(|s| {
            let buckets: Vec<Value> = s
                .buckets
                .iter()
                .map(|(b, a)| {
                    let mut o = serde_json::Map::new();
                    o.insert("ts_ms".into(), json!(b));
                    for f in &fns {
                        let v = f.apply(a);
                        o.insert(
                            f.name().into(),
                            if v.is_finite() {
                                json!(v)
                            } else {
                                json!(v.to_string())
                            },
                        );
                    }
                    Value::Object(o)
                })
                .collect();
            json!({"device": &*s.device, "buckets": buckets})
        })
        .collect();
    Ok(Json(json!({
        "metric": q.metric,
        "from_ms": from,
        "to_ms": to,
        "bucket_ms": bucket,
        "series": series_json,
        "sources": {"raw_points": sources.raw_points, "rollup_rows": sources.rollup_rows},
    }))
    .into_response())
}

fn retention_json(r: &Retention) -> Value {
    let days = |d: Option<Duration>| d.map(|d| d.as_secs() / 86_400);
    json!({
        "default_days": days(r.default),
        "rules": r.rules.iter().map(|x| json!({"tenant": x.tenant, "metric": x.metric, "days": days(x.keep)})).collect::<Vec<_>>(),
    })
}

/// `GET /telemetry/retention`.
pub async fn get_retention(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let mut r = state.tsdb.retention();
    // Tenant users see the rules for everyone and their own tenant's, not
    // other tenants'.
    if let Some(own) = &caller.tenant {
        r.rules
            .retain(|x| x.tenant.as_deref().is_none_or(|t| t == own));
    }
    Ok(Json(retention_json(&r)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    tenant: Option<String>,
    metric: Option<String>,
    /// Days to keep; null keeps forever.
    days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionBody {
    rules: Vec<RuleBody>,
}

/// `PUT /telemetry/retention`: replace the per-tenant/per-metric rules
/// (the default comes from the configuration).
pub async fn put_retention(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<RetentionBody>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require_platform_admin()?;
    let Json(b) = body.map_err(bad_json)?;
    if b.rules.len() > 1000 {
        return Err(bad("at most 1000 retention rules"));
    }
    let mut r = state.tsdb.retention();
    r.rules = b
        .rules
        .into_iter()
        .map(|x| {
            if x.days == Some(0) {
                return Err(bad("`days` must be at least 1 (null keeps forever)"));
            }
            Ok(RetentionRule {
                tenant: x.tenant,
                metric: x.metric,
                keep: x.days.map(|d| Duration::from_secs(u64::from(d) * 86_400)),
            })
        })
        .collect::<Result<_, _>>()?;
    state.tsdb.set_retention(r.clone())?;
    let out = retention_json(&r);
    audit(
        &state,
        &caller,
        "telemetry.retention.set",
        "telemetry",
        out.clone(),
    );
    Ok(Json(out))
}

/// `GET /telemetry/stats`.
pub async fn stats(caller: Caller, State(state): State<AppState>) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let s = state.tsdb.stats();
    let mut ingest = serde_json::Map::new();
    if let Some(c) = &state.ingest {
        for (name, _, v) in c.counters() {
            ingest.insert(name.into(), json!(v));
        }
    }
    Ok(Json(json!({
        "series": s.series,
        "points_appended": s.points_appended,
        "wal_commits": s.wal_commits,
        "flushes": s.flushes,
        "compactions": s.compactions,
        "partitions": s.partitions,
        "head_points": s.head_points,
        "head_bytes": s.head_bytes,
        "disk_bytes": s.disk_bytes,
        "write_errors": s.write_errors,
        "disk_full": s.disk_full,
        "ingest": ingest,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_parse() {
        let now = 1_000_000_000;
        assert_eq!(parse_time("now", now), Some(now));
        assert_eq!(parse_time("-1h", now), Some(now - 3_600_000));
        assert_eq!(parse_time("12345", now), Some(12345));
        assert_eq!(parse_time("-12345", now), Some(-12345));
        assert_eq!(parse_time("1970-01-01T00:00:01Z", now), Some(1000));
        assert_eq!(parse_time("yesterday", now), None);
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        assert_eq!(parse_duration_ms("h"), None);
        assert_eq!(parse_duration_ms("5y"), None);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_time(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
