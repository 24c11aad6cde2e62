//! `POST /rules/backtest`: what a rule would have done over stored
//! telemetry, before it is enabled.
//!
//! The stored points of the tenant's devices in the range (or of the
//! devices named) are read, regrouped into the messages they came from —
//! one per device and timestamp, dotted metrics nested again — and
//! replayed in time order through the rule's compiled plan by
//! [`m2mhub_automation::backtest`], on the data's own clock. Only
//! `devices/{id}/telemetry` is stored, so a rule reading another topic
//! (or an `$events/…` source) cannot be replayed (422).
//!
//! Bounded so that one request cannot take the server: the range is at
//! most [`MAX_RANGE_MS`] (422), at most [`MAX_POINTS`] points are read
//! (413), and the whole run has a time budget of [`BUDGET`] (422, narrow
//! the range or the devices). The replay runs on the blocking pool.

use crate::caller::Caller;
use crate::problem::{bad_json, Problem};
use crate::state::AppState;
use crate::telemetry::parse_time;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use m2mhub_automation::backtest::{device_meta, payload_of, Backtest, MAX_LISTED};
use m2mhub_identity::{Role, DEFAULT_TENANT};
use m2mhub_tsdb::{RawQuery, TimeSeriesStore, Value as TsValue};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The longest range a backtest replays.
pub const MAX_RANGE_MS: i64 = 31 * 86_400_000;
/// The most points a backtest reads.
pub const MAX_POINTS: usize = 2_000_000;
/// The most devices a request may name.
const MAX_DEVICES: usize = 10_000;
/// How long reading and replaying may take.
pub const BUDGET: Duration = Duration::from_secs(20);
/// Points per store read.
const PAGE: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// A stored rule to replay; `sql` and `actions`, when given, replace
    /// its own (a changed rule tried before it is saved).
    rule_id: Option<String>,
    sql: Option<String>,
    actions: Option<Value>,
    tenant: Option<String>,
    /// Epoch ms, RFC 3339, `now` or `-24h`.
    from: Value,
    to: Option<Value>,
    /// Only these devices (default: every device of the tenant).
    devices: Option<Vec<String>>,
}

fn invalid(kind: &str, detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, kind, detail)
}

fn time_of(name: &str, v: &Value, now: i64) -> Result<i64, Problem> {
    let t = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => parse_time(s, now),
        _ => None,
    };
    t.ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            format!("`{name}`: {v} is not a time (epoch ms, RFC 3339, now, or -24h)"),
        )
    })
}

/// How much one replay may read and how long it may take.
struct Bounds {
    max_points: usize,
    deadline: tokio::time::Instant,
}

/// Why a replay stopped early.
#[derive(Debug, PartialEq)]
enum Stop {
    TooManyPoints,
    OverBudget,
    Store(String),
}

pub async fn backtest(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<Body>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let Json(b) = body.map_err(bad_json)?;
    let now = m2mhub_identity::now_ms();
    let from = time_of("from", &b.from, now)?;
    let to = match &b.to {
        Some(t) => time_of("to", t, now)?,
        None => now,
    };
    // Far outside any stored time (and so no arithmetic on them overflows).
    const FAR: i64 = 1_000_000_000_000_000;
    if !(-FAR..=FAR).contains(&from) || !(-FAR..=FAR).contains(&to) {
        return Err(invalid(
            "invalid-range",
            "`from` and `to` must be within ±10^15 ms of the epoch",
        ));
    }
    if from >= to {
        return Err(invalid("invalid-range", "`from` must be before `to`"));
    }
    if to - from > MAX_RANGE_MS {
        return Err(invalid(
            "range-too-long",
            format!(
                "a backtest covers at most {} days; narrow `from`..`to`",
                MAX_RANGE_MS / 86_400_000
            ),
        )
        .with("max_range_ms", MAX_RANGE_MS));
    }
    // The rule: a stored one (the caller's tenant's), possibly changed.
    let (tenant, sql, actions, rule_id) = match &b.rule_id {
        Some(id) => {
            let r = state.fleet.get_rule(id).ok().filter(|r| {
                caller.tenant.as_ref().is_none_or(|t| *t == r.tenant)
                    && b.tenant.as_ref().is_none_or(|t| *t == r.tenant)
            });
            let Some(r) = r else {
                return Err(Problem::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no rule {id:?}"),
                ));
            };
            (
                r.tenant,
                b.sql.unwrap_or(r.sql),
                b.actions.unwrap_or(r.actions),
                Some(r.id),
            )
        }
        None => {
            let tenant = caller
                .scope(b.tenant.as_deref())?
                .unwrap_or_else(|| DEFAULT_TENANT.into());
            state.registry.get_tenant(&tenant)?;
            let Some(sql) = b.sql else {
                return Err(invalid(
                    "invalid-rule",
                    "give `sql` (and `actions`), or the `rule_id` of a stored rule",
                ));
            };
            (tenant, sql, b.actions.unwrap_or_else(|| json!([])), None)
        }
    };
    let bt = Backtest::new(&sql, &actions).map_err(Problem::from)?;
    if bt.source().is_event_source() {
        return Err(invalid(
            "not-replayable",
            format!(
                "the rule reads {:?}, which is not stored; only device telemetry (devices/{{id}}/telemetry) can be replayed",
                bt.source().as_str()
            ),
        ));
    }
    if let Some(d) = &b.devices {
        if d.len() > MAX_DEVICES {
            return Err(invalid(
                "too-many-devices",
                format!("at most {MAX_DEVICES} devices"),
            ));
        }
    }
    // The devices whose telemetry topic the rule reads, with the
    // attributes it may read under `meta`.
    let wanted: Option<std::collections::HashSet<&str>> = b
        .devices
        .as_ref()
        .map(|d| d.iter().map(String::as_str).collect());
    let mut series: Vec<(Arc<str>, Arc<str>)> = state
        .tsdb
        .series(&tenant, None, None)
        .into_iter()
        .filter(|s| wanted.as_ref().is_none_or(|w| w.contains(&*s.key.device)))
        .filter(|s| {
            bt.source()
                .matches(&format!("devices/{}/telemetry", s.key.device))
        })
        .map(|s| (s.key.device, s.key.metric))
        .collect();
    series.sort();
    let mut metas: HashMap<Arc<str>, Value> = HashMap::new();
    for (d, _) in &series {
        if !metas.contains_key(d) {
            if let Ok(dev) = state.registry.get_device(d) {
                metas.insert(d.clone(), device_meta(&dev));
            }
        }
    }
    let source = bt.source().as_str().to_string();
    let kind = format!("{:?}", bt.kind()).to_lowercase();
    let store = state.tsdb.clone();
    let started = tokio::time::Instant::now();
    let deadline = started + BUDGET;
    let bounds = Bounds {
        max_points: MAX_POINTS,
        deadline,
    };
    let run = tokio::task::spawn_blocking(move || {
        replay(&*store, &tenant, &series, &metas, bt, (from, to), &bounds)
    })
    .await
    .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let (report, devices, points) = match run {
        Ok(r) => r,
        Err(Stop::TooManyPoints) => {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-many-points",
                format!("the range holds more than {MAX_POINTS} points; narrow the range or name fewer devices"),
            )
            .with("max_points", MAX_POINTS as u64))
        }
        Err(Stop::OverBudget) => {
            return Err(invalid(
                "over-budget",
                format!(
                    "the backtest took more than {} s; narrow the range or name fewer devices",
                    BUDGET.as_secs()
                ),
            ))
        }
        Err(Stop::Store(e)) => {
            return Err(Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage",
                e,
            ))
        }
    };
    Ok(Json(json!({
        "rule_id": rule_id,
        "sql": sql,
        "source": source,
        "kind": kind,
        "from_ms": from,
        "to_ms": to,
        "devices": devices,
        "points": points,
        "messages": report.messages,
        "fired": report.fired,
        "repeated": report.repeated,
        "cleared": report.cleared,
        "failed": report.failed,
        "late": report.late,
        "last_error": report.last_error,
        "firings": report.firings.iter().map(|f| f.to_json()).collect::<Vec<_>>(),
        "truncated": report.truncated,
        "max_listed": MAX_LISTED,
        "elapsed_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })))
}

/// A stored point on its way back into a message.
struct Point {
    ts_ms: i64,
    /// Index into the sorted series list: device order, then metric.
    series: usize,
    value: Value,
}

fn value_json(v: &TsValue) -> Value {
    match v {
        TsValue::F64(x) => json!(x),
        TsValue::Bool(b) => json!(b),
        TsValue::Str(s) => json!(&**s),
    }
}

/// Read every series in the range, then replay the messages in time
/// order (ties by device). Returns the report, the devices replayed and
/// the points read.
fn replay(
    store: &dyn TimeSeriesStore,
    tenant: &str,
    series: &[(Arc<str>, Arc<str>)],
    metas: &HashMap<Arc<str>, Value>,
    mut bt: Backtest,
    (from, to): (i64, i64),
    bounds: &Bounds,
) -> Result<(m2mhub_automation::backtest::Report, usize, usize), Stop> {
    let deadline = bounds.deadline;
    let mut points: Vec<Point> = Vec::new();
    for (i, (device, metric)) in series.iter().enumerate() {
        let mut after = None;
        loop {
            if tokio::time::Instant::now() > deadline {
                return Err(Stop::OverBudget);
            }
            let page = store
                .raw(&RawQuery {
                    tenant,
                    device,
                    metric,
                    from_ms: from,
                    to_ms: to,
                    limit: PAGE,
                    after,
                })
                .map_err(|e| Stop::Store(e.to_string()))?;
            if points.len() + page.points.len() > bounds.max_points {
                return Err(Stop::TooManyPoints);
            }
            points.extend(page.points.iter().map(|p| Point {
                ts_ms: p.ts_ms,
                series: i,
                value: value_json(&p.value),
            }));
            after = page.next;
            if after.is_none() {
                break;
            }
        }
    }
    // Stable: a series' points keep their stored order within a time.
    points.sort_by_key(|p| (p.ts_ms, &series[p.series].0));
    let read = points.len();
    let mut devices = std::collections::HashSet::new();
    let mut i = 0;
    let mut messages = 0u32;
    while i < points.len() {
        let (ts, device) = (points[i].ts_ms, &series[points[i].series].0);
        let mut j = i;
        while j < points.len() && points[j].ts_ms == ts && series[points[j].series].0 == *device {
            j += 1;
        }
        messages = messages.wrapping_add(1);
        if messages.is_multiple_of(4096) && tokio::time::Instant::now() > deadline {
            return Err(Stop::OverBudget);
        }
        let mut payload = payload_of(
            points[i..j]
                .iter_mut()
                .map(|p| (&*series[p.series].1, p.value.take())),
        );
        if let (Value::Object(obj), Some(meta)) = (&mut payload, metas.get(device)) {
            obj.entry("meta").or_insert_with(|| meta.clone());
        }
        bt.feed(&format!("devices/{device}/telemetry"), &payload, ts);
        devices.insert(device.clone());
        i = j;
    }
    Ok((bt.finish(to), devices.len(), read))
}

#[cfg(test)]
mod tests {
    use super::*;
    use m2mhub_tsdb::{InPoint, Options, Tsdb};
    use std::time::Duration;

    /// A store with `n` readings a second of `temp` from `m1`, from 0 s.
    fn store(n: i64) -> (tempfile::TempDir, Tsdb) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Tsdb::open(dir.path(), Options::default()).expect("tsdb");
        let points: Vec<InPoint<'_>> = (0..n)
            .map(|i| InPoint {
                metric: "temp",
                ts_ms: 1_000 * i,
                value: TsValue::F64(if i % 10 < 5 { 90.0 } else { 70.0 }),
            })
            .collect();
        db.append("t", "m1", &points)
            .expect("append")
            .ticket
            .wait_blocking()
            .expect("durable");
        (dir, db)
    }

    fn run(db: &Tsdb, max_points: usize, budget: Duration) -> Result<(u64, usize), Stop> {
        let bt = Backtest::new(
            "SELECT * FROM 'devices/+/telemetry' WHERE temp > 80",
            &json!([]),
        )
        .expect("rule");
        let series = [(Arc::from("m1"), Arc::from("temp"))];
        let bounds = Bounds {
            max_points,
            deadline: tokio::time::Instant::now() + budget,
        };
        replay(
            db,
            "t",
            &series,
            &HashMap::new(),
            bt,
            (0, 1_000_000),
            &bounds,
        )
        .map(|(r, _, points)| (r.fired, points))
    }

    #[test]
    fn replays_within_its_bounds() {
        let (_dir, db) = store(100);
        // Hot for five readings in every ten: ten fires.
        assert_eq!(run(&db, 1_000, Duration::from_secs(10)), Ok((10, 100)));
        assert_eq!(
            run(&db, 99, Duration::from_secs(10)),
            Err(Stop::TooManyPoints)
        );
        assert_eq!(run(&db, 1_000, Duration::ZERO), Err(Stop::OverBudget));
        db.close();
    }
}
