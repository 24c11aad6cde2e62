//! The HTTP front door for devices that do not speak MQTT: cheap Wi-Fi
//! modules, scripts, gateways behind proxies. A device posts telemetry and
//! polls for its commands with its **own** credential — its token secret
//! as `Authorization: Bearer <secret>` or as the Basic password (user name
//! = device id), or its client certificate on the HTTPS listener — never
//! an operator's API token.
//!
//! Every request is authenticated by the broker's own authenticator
//! ([`Broker::authenticate_request`]): the same registry check, bans and
//! failure counting as an MQTT CONNECT, so guessing a token over HTTP bans
//! the address just as it would over MQTT. Telemetry then goes through
//! the same pipeline as `devices/{id}/telemetry` over MQTT
//! ([`m2mhub_ingest::Ingest::ingest`]: decode → store, answered only when
//! durable) and is routed through the broker, so MQTT subscribers and the
//! rules see it exactly as if the device had published it.
//!
//! Commands: the rule service and operators publish a command on the
//! device's command topic; an HTTP device instead long-polls
//! `GET …/commands/next?wait=30s`. A broker observer on
//! `devices/+/commands` wakes the waiting poll; the command is taken from
//! the fleet's open commands (oldest first) and marked `delivered` in the
//! same step, so two polls never receive the same command.

use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use m2mhub_broker::auth::{ClientIdentity, ConnectInfo as MqttConnectInfo, TlsPeer};
use m2mhub_broker::Broker;
use m2mhub_fleet::CommandUpdate;
use m2mhub_ingest::{Invalid, Outcome, Refusal};
use mqtt_codec::{reason, PublishProperties, QoS};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The longest a command poll may wait: below the idle timeouts of most
/// proxies and carrier NATs.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The largest telemetry request body: a generous batch, far below what
/// would let one device tie up the decoder.
pub const MAX_TELEMETRY_BODY: usize = 1024 * 1024;

/// The verified client certificate of an HTTPS connection, put into each
/// request's extensions by the HTTPS listener.
#[derive(Clone)]
pub struct ClientCert(pub Arc<TlsPeer>);

/// Whether the request came over the HTTPS listener (a request extension).
#[derive(Clone, Copy)]
pub struct OverTls;

/// A device that proved who it is, for one request.
pub struct DeviceCaller {
    pub device: Arc<str>,
    pub tenant: Arc<str>,
    identity: Arc<ClientIdentity>,
}

/// What an `Authorization` header carries for a device.
#[derive(Debug, PartialEq, Eq)]
enum Presented {
    /// `Bearer <secret>`: the device named in the path.
    Bearer(String),
    /// `Basic base64(user:secret)`.
    Basic(String, String),
}

fn parse_authorization(value: &str) -> Result<Presented, &'static str> {
    let (scheme, rest) = value.trim().split_once(' ').ok_or(
        "Authorization must be `Bearer <token secret>` or `Basic <base64 of device-id:secret>`",
    )?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err("the Bearer credential is empty");
        }
        return Ok(Presented::Bearer(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| "the Basic credential is not base64")?;
        let text = String::from_utf8(raw).map_err(|_| "the Basic credential is not UTF-8")?;
        let (user, secret) = text
            .split_once(':')
            .ok_or("the Basic credential must be device-id:secret")?;
        return Ok(Presented::Basic(user.to_string(), secret.to_string()));
    }
    Err("Authorization must be `Bearer <token secret>` or `Basic <base64 of device-id:secret>`")
}

fn unauthorized(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
}

/// Authenticate the request as device `id`.
fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    cert: Option<&ClientCert>,
    tls: bool,
    id: &str,
) -> Result<DeviceCaller, Problem> {
    let peer = peer.unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let transport = if tls { "https" } else { "http" };
    let presented = match headers.get(header::AUTHORIZATION) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| unauthorized("the Authorization header is not text"))
                .and_then(|v| parse_authorization(v).map_err(unauthorized))?,
        ),
        None => None,
    };
    let (username, password) = match &presented {
        Some(Presented::Bearer(secret)) => (Some(id), Some(secret.as_bytes())),
        Some(Presented::Basic(user, secret)) => (Some(user.as_str()), Some(secret.as_bytes())),
        None => (None, None),
    };
    // A token, when one is given, wins over the certificate of the
    // connection (the authenticator looks at a certificate first).
    let tls_peer = if presented.is_none() {
        cert.map(|c| &*c.0)
    } else {
        None
    };
    if presented.is_none() && tls_peer.is_none() {
        return Err(unauthorized(
            "a device authenticates with its token (Authorization: Bearer <secret>, or Basic with the device id as user name) or, over HTTPS, its client certificate",
        ));
    }
    let info = MqttConnectInfo {
        client_id: id,
        username,
        password,
        peer,
        transport,
        tls: tls_peer,
    };
    match state.broker.authenticate_request(&info) {
        Ok(identity) => match (identity.device_id.clone(), identity.tenant.clone()) {
            (Some(device), Some(tenant)) if &*device == id => Ok(DeviceCaller {
                device,
                tenant,
                identity,
            }),
            // Anonymous access (when configured) never speaks for a device.
            _ => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this credential does not belong to device {id:?}"),
            )),
        },
        Err(code) => Err(match code {
            reason::BAD_USER_NAME_OR_PASSWORD => {
                unauthorized(format!("unknown device {id:?} or wrong secret"))
            }
            reason::CLIENT_IDENTIFIER_NOT_VALID => Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this credential does not belong to device {id:?}"),
            ),
            reason::BANNED => Problem::new(
                StatusCode::FORBIDDEN,
                "banned",
                "this address, client id or device is banned for now",
            ),
            reason::SERVER_UNAVAILABLE => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the registry cannot answer now; retry later",
            ),
            _ => Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "device {id:?} may not connect: {} (disabled, expired or revoked credential)",
                    reason::name(code)
                ),
            ),
        }),
    }
}

/// The pieces of a request that authentication needs, taken by handlers
/// as extractors.
#[derive(Clone, Default)]
pub struct Transport {
    peer: Option<SocketAddr>,
    cert: Option<ClientCert>,
    tls: bool,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Transport {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Transport {
            peer: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
            cert: parts.extensions.get::<ClientCert>().cloned(),
            tls: parts.extensions.get::<OverTls>().is_some(),
        })
    }
}

/// The media type of a request body, without parameters
/// (`application/json; charset=utf-8` → `application/json`).
fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    (!mime.is_empty()).then_some(mime)
}

fn refused(r: Refusal) -> Problem {
    match r {
        Refusal::DiskFull => Problem::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "storage-full",
            "the platform's disk is full: nothing of this request was stored; retry later",
        ),
        Refusal::Storage => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage-failed",
            "the readings could not be stored; retry later",
        ),
    }
}

/// `POST /devices/{id}/telemetry`: one payload in any format the MQTT
/// telemetry topic takes (JSON object or array of objects — the batch
/// form —, SenML JSON/CBOR packs, CBOR, a plain number). 204 once the
/// points are durable.
pub async fn post_telemetry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    t: Transport,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Problem> {
    let caller = authenticate(&state, &headers, t.peer, t.cert.as_ref(), t.tls, &id)?;
    let topic = format!("devices/{id}/telemetry");
    if !state
        .broker
        .may_publish(&caller.device, &caller.identity, &topic)
    {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("device {id:?} may not publish telemetry (policy)"),
        ));
    }
    if body.is_empty() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "empty-body",
            "the request has no body: send the readings, e.g. {\"temperature\": 21.5}",
        ));
    }
    let Some(pipeline) = state.pipeline.clone() else {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "telemetry ingest is not running on this server",
        ));
    };
    let content_type = media_type(&headers);
    let outcome = pipeline.ingest(
        Some(&caller.tenant),
        &caller.device,
        content_type.as_deref(),
        &body,
        true,
    );
    let durable = match outcome {
        Outcome::Done => None,
        Outcome::Pending(d) => Some(d),
        Outcome::Refused(r) => return Err(refused(r)),
        Outcome::Invalid(Invalid::UnsupportedType(detail)) => {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-content-type",
                detail,
            ))
        }
        Outcome::Invalid(Invalid::Undecodable(detail)) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "undecodable-payload",
                detail,
            ))
        }
    };
    // Routed like the device's own MQTT publish: subscribers and the rules
    // see it; the publish hook is not run again (it was ingested above).
    let props = PublishProperties {
        content_type: content_type.clone(),
        ..Default::default()
    };
    state
        .broker
        .publish_with(&topic, body, QoS::AtMostOnce, false, props)
        .await;
    if let Some(d) = durable {
        d.await.map_err(refused)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextQuery {
    /// `30s`, `500ms`, `2m` or plain seconds; at most [`MAX_WAIT`].
    wait: Option<String>,
}

/// Parse a poll's `wait`: `30s`, `500ms`, `1m`, or plain seconds.
pub fn parse_wait(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("wait {s:?} must be a whole number with s, ms or m, e.g. 30s"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => {
            return Err(format!(
                "wait {s:?} must be a whole number with s, ms or m, e.g. 30s"
            ))
        }
    };
    if d > MAX_WAIT {
        return Err(format!("wait must be at most {} s", MAX_WAIT.as_secs()));
    }
    Ok(d)
}

/// The devices waiting in a command poll, woken by a broker observer on
/// the command topics.
#[derive(Default)]
pub struct CommandWaiters {
    waiting: Mutex<HashMap<Arc<str>, Arc<Notify>>>,
}

/// How many command publications the observer may hold before it drops
/// (a dropped wake-up only delays a poll until its next check).
const OBSERVER_QUEUE: usize = 4096;
/// A poll re-checks the open commands this often even without a wake-up
/// (a command recorded while no rule service publishes it).
const RECHECK: Duration = Duration::from_secs(5);

impl CommandWaiters {
    /// Start the observer task; the waiters live as long as the broker.
    pub fn start(broker: &Broker) -> Arc<CommandWaiters> {
        let waiters = Arc::new(CommandWaiters::default());
        let (id, mut rx) = broker.observer(OBSERVER_QUEUE);
        broker.set_observed(id, &["devices/+/commands".to_string()]);
        let w = Arc::downgrade(&waiters);
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let Some(w) = w.upgrade() else { return };
                let device = msg
                    .topic
                    .strip_prefix("devices/")
                    .and_then(|t| t.strip_suffix("/commands"));
                if let Some(device) = device {
                    w.wake(device);
                }
            }
        });
        waiters
    }

    fn wake(&self, device: &str) {
        if let Some(n) = self.waiting.lock().get(device) {
            n.notify_waiters();
        }
    }

    fn register(&self, device: &Arc<str>) -> Arc<Notify> {
        self.waiting
            .lock()
            .entry(device.clone())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Forget the device's entry when no other poll holds it.
    fn release(&self, device: &str, notify: Arc<Notify>) {
        let mut map = self.waiting.lock();
        // The map's reference and ours: nobody else waits.
        if Arc::strong_count(&notify) <= 2 {
            map.remove(device);
        }
    }
}

fn command_json(c: &m2mhub_fleet::Command) -> Value {
    json!({
        "id": c.id,
        "name": c.name,
        "params": c.params,
        "created_ms": c.created_ms,
        "timeout_ms": c.timeout_ms,
    })
}

/// `GET /devices/{id}/commands/next?wait=30s`: the oldest command not yet
/// delivered (200, now `delivered`), or 204 when none arrives in time.
pub async fn next_command(
    State(state): State<AppState>,
    Path(id): Path<String>,
    t: Transport,
    headers: HeaderMap,
    q: Result<Query<NextQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let caller = authenticate(&state, &headers, t.peer, t.cert.as_ref(), t.tls, &id)?;
    let Query(q) = q.map_err(crate::problem::bad_query)?;
    let wait = match q.wait.as_deref() {
        Some(w) => parse_wait(w)
            .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", e))?,
        None => Duration::ZERO,
    };
    let deadline = tokio::time::Instant::now() + wait;
    // Without the observer (a server without the broker's command topics)
    // a poll only re-checks every RECHECK.
    let notify = match &state.command_waiters {
        Some(w) => w.register(&caller.device),
        None => Arc::new(Notify::new()),
    };
    let result = loop {
        // Enabled before looking, so a command published between the look
        // and the wait still wakes it.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(c) = state.fleet.take_next_command(&caller.device) {
            break Some(c);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break None;
        }
        let _ = tokio::time::timeout_at(deadline.min(now + RECHECK), notified).await;
    };
    if let Some(w) = &state.command_waiters {
        w.release(&caller.device, notify);
    }
    Ok(match result {
        Some(c) => (StatusCode::OK, Json(command_json(&c))).into_response(),
        None => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
    })
}

/// `POST /devices/{id}/commands/{cid}/response`: the device's answer (any
/// JSON; `"status": "failed"` marks the command failed, as over MQTT).
pub async fn command_response(
    State(state): State<AppState>,
    Path((id, cid)): Path<(String, String)>,
    t: Transport,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let caller = authenticate(&state, &headers, t.peer, t.cert.as_ref(), t.tls, &id)?;
    let not_found = || {
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no command {cid:?} for device {id:?}"),
        )
    };
    let answer: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-json",
                format!("the response must be JSON: {e}"),
            )
        })?
    };
    let command = state.fleet.get_command(&cid).map_err(|_| not_found())?;
    if *command.device_id != *caller.device {
        return Err(not_found());
    }
    match state
        .fleet
        .update_command(&cid, CommandUpdate::answer(answer))?
    {
        Some(c) => Ok(Json(json!({"id": c.id, "status": c.status}))),
        None => Err(Problem::new(
            StatusCode::CONFLICT,
            "command-finished",
            format!(
                "command {cid:?} is already {}: it takes one answer",
                command.status.as_str()
            ),
        )),
    }
}

/// The extension a request carries when it came over the HTTPS listener.
pub fn tls_extensions(
    req: &mut axum::http::Request<axum::body::Body>,
    peer: SocketAddr,
    cert: Option<Arc<TlsPeer>>,
) {
    req.extensions_mut().insert(ConnectInfo(peer));
    req.extensions_mut().insert(OverTls);
    if let Some(c) = cert {
        req.extensions_mut().insert(ClientCert(c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn authorization_headers_parse() {
        assert_eq!(
            parse_authorization("Bearer s3cret"),
            Ok(Presented::Bearer("s3cret".into()))
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("meter-1:s3:cret");
        assert_eq!(
            parse_authorization(&format!("basic {basic}")),
            Ok(Presented::Basic("meter-1".into(), "s3:cret".into()))
        );
        assert!(parse_authorization("Bearer ").is_err());
        assert!(parse_authorization("Basic !!!").is_err());
        assert!(parse_authorization("Digest x").is_err());
        assert!(parse_authorization("token").is_err());
    }

    #[test]
    fn waits_parse_with_units_and_a_ceiling() {
        assert_eq!(parse_wait("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_wait("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_wait("2m").is_err());
        assert!(parse_wait("-1s").is_err());
        assert!(parse_wait("s").is_err());
        assert!(parse_wait("10h").is_err());
    }

    proptest! {
        #[test]
        fn authorization_parsing_never_panics(s in ".{0,200}") {
            let _ = parse_authorization(&s);
        }

        #[test]
        fn wait_parsing_never_panics_and_respects_the_ceiling(s in ".{0,40}") {
            if let Ok(d) = parse_wait(&s) {
                prop_assert!(d <= MAX_WAIT);
            }
        }
    }
}
