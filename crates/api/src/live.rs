//! Live updates for the console: `GET /api/v1/live`, a server-sent-events
//! stream of what happens to one device or to the caller's fleet.
//!
//! Producers (the telemetry ingest, the connection hook, the fleet's shadow
//! updates) hand events to the [`LiveHub`] (`m2mhub-ingest`), a broadcast
//! channel. Nothing is built for it while nobody listens
//! ([`LiveHub::active`] is one atomic load), so the MQTT hot path pays
//! nothing when no console is open.
//!
//! Each stream coalesces what it forwards, so a browser never receives more
//! than a few events per second however fast the fleet publishes:
//! - `?device=ID`: `telemetry` (the device's latest values, at most every
//!   250 ms), `connection`, `alarm` and `shadow` events of that device (one
//!   `shadow` per changed shadow and 250 ms, its changed keys merged);
//! - no device: `positions` (devices whose telemetry carried `lat` and
//!   `lon`, once a second), `connections` and `shadows` (batched once a
//!   second) and `alarm` events of the caller's tenant (all tenants for
//!   platform users, or `?tenant=`).
//!
//! `?kinds=shadow,alarm` keeps only those kinds (`telemetry` — which covers
//! `positions` —, `connection`, `alarm`, `shadow`); all by default.
//!
//! A listener that falls behind the broadcast channel skips ahead and gets a
//! `lagged` event (the console then reloads what it shows). Streams end
//! after [`MAX_STREAM`] so a revoked token stops receiving; the client
//! reconnects with its token, which is checked again. At most
//! [`MAX_STREAMS`] streams are open at once.

use crate::caller::Caller;
use crate::problem::{bad_query, Problem};
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use m2mhub_identity::Role;
pub use m2mhub_ingest::live::{LiveEvent, LiveHub, StreamSlot, MAX_STREAMS};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// A stream's lifetime; the client reconnects (and is authenticated again).
pub const MAX_STREAM: Duration = Duration::from_secs(300);
/// How often a device stream sends its coalesced values.
const DEVICE_TICK: Duration = Duration::from_millis(250);
/// How often a fleet stream sends positions and connection changes.
const FLEET_TICK: Duration = Duration::from_secs(1);
/// Changed shadows a stream holds between ticks at most; more are counted
/// as `lagged` (a fleet-wide setting to 10,000 devices), and the console
/// reloads.
const MAX_PENDING_SHADOWS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveQuery {
    /// One device's stream; absent: the fleet's.
    device: Option<String>,
    /// A platform user's fleet stream for one tenant.
    tenant: Option<String>,
    /// Comma-separated kinds to forward; absent: all.
    kinds: Option<String>,
}

/// Which kinds of event a stream forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kinds {
    telemetry: bool,
    connection: bool,
    alarm: bool,
    shadow: bool,
}

impl Kinds {
    const ALL: Kinds = Kinds {
        telemetry: true,
        connection: true,
        alarm: true,
        shadow: true,
    };

    /// `telemetry,shadow` → those two; an unknown kind is refused (a typo
    /// would otherwise be a stream that silently never says anything).
    fn parse(list: Option<&str>) -> Result<Kinds, Problem> {
        let Some(list) = list else {
            return Ok(Kinds::ALL);
        };
        let mut k = Kinds {
            telemetry: false,
            connection: false,
            alarm: false,
            shadow: false,
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "telemetry" => k.telemetry = true,
                "connection" => k.connection = true,
                "alarm" => k.alarm = true,
                "shadow" => k.shadow = true,
                other => {
                    return Err(Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-parameter",
                        format!(
                        "kinds: unknown kind {other:?}; use telemetry, connection, alarm, shadow"
                    ),
                    ))
                }
            }
        }
        Ok(k)
    }

    fn wants(&self, e: &LiveEvent) -> bool {
        match e {
            LiveEvent::Telemetry { .. } => self.telemetry,
            LiveEvent::Connection { .. } => self.connection,
            LiveEvent::Shadow { .. } => self.shadow,
        }
    }
}

/// A changed shadow waiting for the next tick: the newest version, with the
/// keys of every update since the last tick.
struct PendingShadow {
    tenant: Arc<str>,
    device: Arc<str>,
    name: String,
    version: u64,
    writer: &'static str,
    desired: BTreeSet<String>,
    reported: BTreeSet<String>,
    delta: Map<String, Value>,
    ts_ms: i64,
    updates: u64,
}

impl PendingShadow {
    fn json(self) -> Value {
        json!({
            "device": &*self.device,
            "tenant": &*self.tenant,
            "shadow": self.name,
            "version": self.version,
            "writer": self.writer,
            "desired": self.desired,
            "reported": self.reported,
            "delta": self.delta,
            "ts_ms": self.ts_ms,
            "updates": self.updates,
        })
    }
}

/// Fold one shadow event into what a stream holds; `false` when it is a
/// new shadow and the stream holds [`MAX_PENDING_SHADOWS`] already.
fn hold_shadow(pending: &mut HashMap<(Arc<str>, String), PendingShadow>, e: &LiveEvent) -> bool {
    let LiveEvent::Shadow {
        tenant,
        device,
        name,
        version,
        writer,
        desired,
        reported,
        delta,
        ts_ms,
    } = e
    else {
        return true;
    };
    let key = (device.clone(), name.clone());
    if let Some(p) = pending.get_mut(&key) {
        // Versions of one shadow arrive in order; keep the newest.
        p.version = p.version.max(*version);
        p.writer = writer.as_str();
        p.desired.extend(desired.iter().cloned());
        p.reported.extend(reported.iter().cloned());
        p.delta = delta.clone();
        p.ts_ms = *ts_ms;
        p.updates += 1;
        return true;
    }
    if pending.len() >= MAX_PENDING_SHADOWS {
        return false;
    }
    pending.insert(
        key,
        PendingShadow {
            tenant: tenant.clone(),
            device: device.clone(),
            name: name.clone(),
            version: *version,
            writer: writer.as_str(),
            desired: desired.iter().cloned().collect(),
            reported: reported.iter().cloned().collect(),
            delta: delta.clone(),
            ts_ms: *ts_ms,
            updates: 1,
        },
    );
    true
}

/// What a stream forwards.
enum Scope {
    Device { id: String, tenant: String },
    Fleet { tenant: Option<String> },
}

impl Scope {
    fn wants(&self, tenant: &str, device: &str) -> bool {
        match self {
            Scope::Device { id, tenant: t } => id == device && t == tenant,
            Scope::Fleet { tenant: Some(t) } => t == tenant,
            Scope::Fleet { tenant: None } => true,
        }
    }
}

/// `GET /api/v1/live`: the event stream.
pub async fn stream(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<LiveQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let kinds = Kinds::parse(q.kinds.as_deref())?;
    let scope = match &q.device {
        Some(id) => {
            if q.tenant.is_some() {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-parameter",
                    "give either device or tenant, not both",
                ));
            }
            let d = crate::devices::visible(&state, &caller, id)?;
            Scope::Device {
                id: d.id,
                tenant: d.tenant,
            }
        }
        None => Scope::Fleet {
            tenant: caller.scope(q.tenant.as_deref())?,
        },
    };
    let hub = state.live.clone();
    let Some((events, slot)) = hub.subscribe() else {
        let mut r = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too-many-streams",
            format!("{MAX_STREAMS} live streams are open already; try again later"),
        )
        .into_response();
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("10"),
        );
        return Ok(r);
    };
    let alarms = state.fleet.subscribe_alarms();
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    tokio::spawn(forward(scope, kinds, events, alarms, tx, slot));
    let body = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>))
    });
    let mut resp = Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    // Proxies must not buffer the stream.
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One stream's loop: read the hub and the alarm channel, coalesce, send
/// on every tick. Ends when the client goes away or the lifetime is over.
async fn forward(
    scope: Scope,
    kinds: Kinds,
    mut events: broadcast::Receiver<Arc<LiveEvent>>,
    mut alarms: broadcast::Receiver<m2mhub_fleet::AlarmEvent>,
    tx: mpsc::Sender<Event>,
    _slot: StreamSlot,
) {
    let tick_every = match scope {
        Scope::Device { .. } => DEVICE_TICK,
        Scope::Fleet { .. } => FLEET_TICK,
    };
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = tokio::time::sleep(MAX_STREAM);
    tokio::pin!(end);
    let hello = match &scope {
        Scope::Device { id, .. } => json!({"device": id, "max_seconds": MAX_STREAM.as_secs()}),
        Scope::Fleet { tenant } => json!({"tenant": tenant, "max_seconds": MAX_STREAM.as_secs()}),
    };
    if tx.send(event("hello", &hello)).await.is_err() {
        return;
    }
    // Device stream: metric → (ts, value), the newest of each.
    let mut values: Map<String, Value> = Map::new();
    let mut values_ts = 0i64;
    // Fleet stream: device → [lat, lon, ts], and connection changes.
    let mut positions: HashMap<String, (f64, f64, i64)> = HashMap::new();
    let mut connections: Vec<Value> = Vec::new();
    // Both streams: changed shadows since the last tick.
    let mut shadows: HashMap<(Arc<str>, String), PendingShadow> = HashMap::new();
    let mut lagged = 0u64;
    let mut alarms_open = kinds.alarm;
    loop {
        tokio::select! {
            _ = &mut end => break,
            _ = tx.closed() => break,
            r = events.recv() => match r {
                Ok(e) => {
                    if !kinds.wants(&e) || !scope.wants(e.tenant(), e.device()) {
                        continue;
                    }
                    match (&*e, &scope) {
                        (LiveEvent::Telemetry { points, .. }, Scope::Device { .. }) => {
                            for (metric, ts, v) in points {
                                values.insert(metric.clone(), json!({"ts_ms": ts, "value": v}));
                                values_ts = values_ts.max(*ts);
                            }
                        }
                        (LiveEvent::Telemetry { device, points, .. }, Scope::Fleet { .. }) => {
                            if let Some(p) = position(points) {
                                positions.insert(device.to_string(), p);
                            }
                        }
                        (LiveEvent::Connection { device, online, ts_ms, detail, tenant }, s) => {
                            let c = json!({"device": &**device, "tenant": &**tenant, "online": online, "ts_ms": ts_ms, "detail": detail});
                            match s {
                                Scope::Device { .. } => {
                                    if tx.send(event("connection", &c)).await.is_err() {
                                        break;
                                    }
                                }
                                // Bounded: a mass reconnect is summarized.
                                Scope::Fleet { .. } if connections.len() < 1000 => connections.push(c),
                                Scope::Fleet { .. } => lagged += 1,
                            }
                        }
                        (LiveEvent::Shadow { .. }, _) => {
                            if !hold_shadow(&mut shadows, &e) {
                                lagged += 1;
                            }
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => lagged += n,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            r = alarms.recv(), if alarms_open => match r {
                Ok(a) => {
                    if !scope.wants(&a.alarm.tenant, &a.alarm.device_id) {
                        continue;
                    }
                    let data = json!({"change": a.change, "alarm": &*a.alarm});
                    if tx.send(event("alarm", &data)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => lagged += n,
                Err(broadcast::error::RecvError::Closed) => alarms_open = false,
            },
            _ = tick.tick() => {
                let mut out = Vec::new();
                if !values.is_empty() {
                    let device = match &scope {
                        Scope::Device { id, .. } => id.as_str(),
                        Scope::Fleet { .. } => "",
                    };
                    out.push(event("telemetry", &json!({
                        "device": device,
                        "ts_ms": values_ts,
                        "values": std::mem::take(&mut values),
                    })));
                }
                if !positions.is_empty() {
                    let items: Vec<Value> = positions
                        .drain()
                        .map(|(d, (lat, lon, ts))| json!({"device": d, "lat": lat, "lon": lon, "ts_ms": ts}))
                        .collect();
                    out.push(event("positions", &json!({"items": items})));
                }
                if !connections.is_empty() {
                    out.push(event("connections", &json!({"items": std::mem::take(&mut connections)})));
                }
                if !shadows.is_empty() {
                    let mut items: Vec<PendingShadow> = shadows.drain().map(|(_, p)| p).collect();
                    items.sort_by(|a, b| (&a.device, &a.name).cmp(&(&b.device, &b.name)));
                    match scope {
                        Scope::Device { .. } => {
                            out.extend(items.into_iter().map(|p| event("shadow", &p.json())));
                        }
                        Scope::Fleet { .. } => {
                            let items: Vec<Value> = items.into_iter().map(PendingShadow::json).collect();
                            out.push(event("shadows", &json!({"items": items})));
                        }
                    }
                }
                if lagged > 0 {
                    out.push(event("lagged", &json!({"missed": lagged, "ts_ms": now_ms()})));
                    lagged = 0;
                }
                for e in out {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = tx
        .send(event(
            "end",
            &json!({"reason": "stream lifetime over; reconnect"}),
        ))
        .await;
}

/// `lat` and `lon` (or `latitude`/`longitude`) among a message's points,
/// if both are plausible coordinates.
fn position(points: &[(String, i64, Value)]) -> Option<(f64, f64, i64)> {
    let find = |names: [&str; 2]| {
        points
            .iter()
            .find(|(m, _, _)| names.contains(&m.as_str()))
            .and_then(|(_, ts, v)| Some((v.as_f64()?, *ts)))
    };
    let (lat, ts) = find(["lat", "latitude"])?;
    let (lon, _) = find(["lon", "longitude"])?;
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon, ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(m: &str, v: Value) -> (String, i64, Value) {
        (m.to_string(), 7, v)
    }

    #[test]
    fn positions_need_both_plausible_coordinates() {
        assert_eq!(
            position(&[p("lat", json!(48.1)), p("lon", json!(11.5))]),
            Some((48.1, 11.5, 7))
        );
        assert_eq!(
            position(&[p("latitude", json!(-33.9)), p("longitude", json!(151.2))]),
            Some((-33.9, 151.2, 7))
        );
        assert_eq!(position(&[p("lat", json!(48.1))]), None);
        assert_eq!(
            position(&[p("lat", json!(91.0)), p("lon", json!(0.0))]),
            None
        );
        assert_eq!(
            position(&[p("lat", json!("x")), p("lon", json!(0.0))]),
            None
        );
    }

    #[test]
    fn scopes_filter_by_tenant_and_device() {
        let d = Scope::Device {
            id: "d1".into(),
            tenant: "t1".into(),
        };
        assert!(d.wants("t1", "d1"));
        assert!(!d.wants("t2", "d1"));
        assert!(!d.wants("t1", "d2"));
        let f = Scope::Fleet {
            tenant: Some("t1".into()),
        };
        assert!(f.wants("t1", "anything"));
        assert!(!f.wants("t2", "d1"));
        assert!(Scope::Fleet { tenant: None }.wants("t9", "d9"));
    }

    #[test]
    fn kinds_default_to_all_and_refuse_unknown_names() {
        assert_eq!(Kinds::parse(None).ok(), Some(Kinds::ALL));
        let k = Kinds::parse(Some("shadow, alarm")).expect("kinds");
        assert!(k.shadow && k.alarm && !k.telemetry && !k.connection);
        assert!(Kinds::parse(Some("shadows")).is_err());
    }

    fn shadow_event(device: &str, name: &str, version: u64, desired: &[&str]) -> LiveEvent {
        LiveEvent::Shadow {
            tenant: "t".into(),
            device: device.into(),
            name: name.into(),
            version,
            writer: m2mhub_fleet::ShadowWriter::Platform,
            desired: desired.iter().map(|k| k.to_string()).collect(),
            reported: Vec::new(),
            delta: Map::new(),
            ts_ms: version as i64,
        }
    }

    #[test]
    fn shadow_events_coalesce_per_shadow_keeping_every_changed_key() {
        let mut pending = HashMap::new();
        assert!(hold_shadow(
            &mut pending,
            &shadow_event("d1", "", 1, &["a"])
        ));
        assert!(hold_shadow(
            &mut pending,
            &shadow_event("d1", "", 2, &["b"])
        ));
        assert!(hold_shadow(
            &mut pending,
            &shadow_event("d1", "cfg", 1, &["c"])
        ));
        assert_eq!(pending.len(), 2);
        let classic = pending
            .remove(&(Arc::from("d1"), String::new()))
            .expect("classic")
            .json();
        assert_eq!(classic["version"], 2);
        assert_eq!(classic["updates"], 2);
        assert_eq!(classic["desired"], json!(["a", "b"]));
        assert_eq!(classic["writer"], "platform");
        for i in 0..MAX_PENDING_SHADOWS {
            hold_shadow(&mut pending, &shadow_event(&format!("x{i}"), "", 1, &[]));
        }
        assert!(!hold_shadow(&mut pending, &shadow_event("new", "", 1, &[])));
        // A shadow already held still folds in.
        assert!(hold_shadow(
            &mut pending,
            &shadow_event("d1", "cfg", 2, &[])
        ));
    }

    #[tokio::test]
    async fn the_hub_builds_nothing_without_listeners_and_fans_out_with_them() {
        let hub = Arc::new(LiveHub::default());
        assert!(!hub.active());
        let (mut rx, _slot) = hub.subscribe().expect("a stream");
        assert!(hub.active());
        hub.send(LiveEvent::Connection {
            tenant: "t".into(),
            device: "d".into(),
            online: true,
            ts_ms: 1,
            detail: "127.0.0.1".into(),
        });
        let e = rx.recv().await.expect("event");
        assert_eq!(e.device(), "d");
    }
}
