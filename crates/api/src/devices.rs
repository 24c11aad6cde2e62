//! Devices and their credentials: the registry through HTTP, with every
//! change audited and every revocation enforced on live sessions at once.

use crate::caller::Caller;
use crate::problem::{bad_json, Problem};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use m2mhub_identity::{now_ms, Device, DeviceFilter, DeviceUpdate, NewDevice, Role};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Reason code sent to a device whose session is ended by an operator.
const ADMINISTRATIVE_ACTION: u8 = 0x98;

pub(crate) fn device_json(d: &Device, online: Option<bool>) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "tenant": d.tenant,
        "group": d.group,
        "profile": d.profile,
        "labels": d.labels,
        "enabled": d.enabled,
        "created_ms": d.created_ms,
        "last_seen_ms": d.last_seen_ms,
        "last_addr": d.last_addr,
        "online": online,
    })
}

fn online(state: &AppState, id: &str) -> Option<bool> {
    state.broker.session(id).map(|s| s.online).or(Some(false))
}

/// Audit an operator's action; a failure to audit is logged, not hidden.
pub(crate) fn audit(state: &AppState, caller: &Caller, action: &str, target: &str, detail: Value) {
    if let Err(e) = state
        .registry
        .audit(&caller.username, action, target, "ok", detail)
    {
        tracing::error!(error = %e, action, target, "cannot write the audit log");
    }
}

/// A device the caller may see, or 404.
pub(crate) fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<Device, Problem> {
    let d = state.registry.get_device(id)?;
    caller.see(&d)?;
    Ok(d)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant: Option<String>,
    group: Option<String>,
    profile: Option<String>,
    /// `key=value`
    label: Option<String>,
    /// Substring of the id or name.
    search: Option<String>,
    enabled: Option<bool>,
    /// Only devices with (true) or without (false) a live MQTT connection.
    online: Option<bool>,
    after: Option<String>,
    limit: Option<usize>,
}

/// Registry rows read per step when filtering by online state.
const ONLINE_SCAN_BATCH: usize = 1000;

pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(crate::problem::bad_query)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            "limit must be between 1 and 1000",
        ));
    }
    let filter = DeviceFilter {
        tenant: caller.scope(q.tenant.as_deref())?,
        group: q.group,
        profile: q.profile,
        label: q.label,
        search: q.search,
        enabled: q.enabled,
        after: q.after,
        limit: Some(limit),
    };
    let tenant = filter.tenant.clone();
    let (items, next) = match q.online {
        None => {
            let items = state.registry.list_devices(&filter)?;
            let next = (items.len() == limit)
                .then(|| items.last().map(|d| d.id.clone()))
                .flatten();
            (items, next)
        }
        // Online is the broker's, not the registry's: read the registry's
        // pages and keep the devices whose state matches, until the page
        // is full. `next` is the last device looked at.
        Some(want) => {
            let mut filter = filter;
            filter.limit = Some(ONLINE_SCAN_BATCH);
            let mut items = Vec::with_capacity(limit);
            let mut next = None;
            'scan: loop {
                let batch = state.registry.list_devices(&filter)?;
                let full = batch.len() == ONLINE_SCAN_BATCH;
                for d in batch {
                    filter.after = Some(d.id.clone());
                    if state.broker.is_online(&d.id) == want {
                        items.push(d);
                        if items.len() == limit {
                            next = filter.after.clone();
                            break 'scan;
                        }
                    }
                }
                if !full {
                    break;
                }
            }
            (items, next)
        }
    };
    let total = state.registry.count_devices(tenant.as_deref())?;
    Ok(Json(json!({
        "items": items.iter().map(|d| device_json(d, online(&state, &d.id))).collect::<Vec<_>>(),
        "next": next,
        "total": total,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    id: Option<String>,
    name: Option<String>,
    tenant: Option<String>,
    group: Option<String>,
    profile: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
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
        .unwrap_or_else(|| m2mhub_identity::DEFAULT_TENANT.into());
    let d = state.registry.create_device(NewDevice {
        id: b.id,
        name: b.name,
        tenant,
        group: b.group,
        profile: b.profile,
        labels: b.labels,
        enabled: true,
    })?;
    audit(
        &state,
        &caller,
        "device.create",
        &d.id,
        json!({"tenant": d.tenant, "group": d.group}),
    );
    Ok((StatusCode::CREATED, Json(device_json(&d, Some(false)))))
}

pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let d = visible(&state, &caller, &id)?;
    let mut v = device_json(&d, online(&state, &id));
    if let Some(s) = state.broker.session(&id) {
        v["session"] = json!({
            "online": s.online,
            "queued": s.queued,
            "inflight": s.inflight,
            "dropped": s.dropped,
            "subscriptions": s.subscriptions.iter().map(|(f, q)| json!({"filter": f, "qos": q})).collect::<Vec<_>>(),
        });
    }
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    name: Option<String>,
    group: Option<Option<String>>,
    profile: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    enabled: Option<bool>,
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
    let mut d = state.registry.update_device(
        &id,
        DeviceUpdate {
            name: b.name.clone(),
            group: b.group.clone(),
            profile: b.profile.clone(),
            labels: b.labels.clone(),
        },
    )?;
    if b.group.is_some() {
        // The device's identity (and so its authorization) includes its
        // group: make it reconnect under the new one.
        state.broker.kick(&id, ADMINISTRATIVE_ACTION);
    }
    if let Some(enabled) = b.enabled {
        state.registry.set_device_enabled(&id, enabled)?;
        if !enabled {
            state.broker.kick(&id, ADMINISTRATIVE_ACTION);
        }
        d = state.registry.get_device(&id)?;
    }
    audit(
        &state,
        &caller,
        "device.update",
        &id,
        json!({
            "name": b.name, "group": b.group, "profile": b.profile, "labels": b.labels, "enabled": b.enabled,
        }),
    );
    Ok(Json(device_json(&d, online(&state, &id))))
}

pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    state.registry.delete_device(&id)?;
    // Its session (subscriptions, queued messages) goes too: a later device
    // with the same id must not inherit it.
    state.broker.discard_session(&id);
    audit(&state, &caller, "device.delete", &id, json!({}));
    Ok(StatusCode::NO_CONTENT)
}

// ---- token credentials ----

pub async fn list_tokens(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    visible(&state, &caller, &id)?;
    let tokens = state.registry.list_tokens(&id)?;
    Ok(Json(json!({ "items": tokens })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// Expiry, Unix milliseconds.
    expires_ms: Option<i64>,
}

pub async fn issue_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<TokenBody>>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let (info, secret) = state.registry.issue_token(&id, b.expires_ms)?;
    audit(
        &state,
        &caller,
        "credential.token.issue",
        &id,
        json!({"token_id": info.id}),
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": info,
            "secret": secret,
            "note": "the secret is shown once; connect with username = device id and password = secret",
        })),
    ))
}

pub async fn revoke_token(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    state.registry.revoke_token(&id, &token_id)?;
    state.broker.kick(&id, ADMINISTRATIVE_ACTION);
    audit(
        &state,
        &caller,
        "credential.token.revoke",
        &id,
        json!({"token_id": token_id}),
    );
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpireBody {
    /// When the token stops working (Unix ms); now if absent.
    at_ms: Option<i64>,
}

pub async fn expire_token(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, token_id)): Path<(String, String)>,
    body: Option<Json<ExpireBody>>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    let at = body.and_then(|Json(b)| b.at_ms).unwrap_or_else(now_ms);
    state.registry.expire_token(&id, &token_id, at)?;
    audit(
        &state,
        &caller,
        "credential.token.expire",
        &id,
        json!({"token_id": token_id, "at_ms": at}),
    );
    Ok(StatusCode::NO_CONTENT)
}

// ---- certificates ----

pub async fn list_certs(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    visible(&state, &caller, &id)?;
    let certs = state.registry.list_certificates(&id)?;
    // Fingerprints in hex: the form DELETE …/certificates/{fingerprint} takes.
    let items: Vec<Value> = certs
        .iter()
        .map(|c| {
            json!({
                "device_id": c.device_id,
                "fingerprint": hex(&c.fingerprint),
                "serial_hex": c.serial_hex,
                "not_after_ms": c.not_after_ms,
                "issuer": c.issuer,
                "created_ms": c.created_ms,
                "revoked_ms": c.revoked_ms,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CertBody {
    /// PEM certificate signing request; without it a key pair is generated
    /// and its private key returned once.
    csr: Option<String>,
    days: Option<u32>,
}

/// Issue a certificate from the built-in CA and register it.
pub(crate) fn issue_cert(
    state: &AppState,
    device_id: &str,
    csr: Option<&str>,
    days: u32,
) -> Result<Value, Problem> {
    let (cert, key) = match csr {
        Some(csr) => (
            state.ca.issue_from_csr(device_id, csr, days).map_err(|e| {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-csr",
                    e.to_string(),
                )
            })?,
            None,
        ),
        None => {
            let (c, k) = state.ca.issue_with_key(device_id, days).map_err(|e| {
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
            (c, Some(k))
        }
    };
    state.registry.add_certificate(
        device_id,
        m2mhub_identity::CertRecord {
            fingerprint: cert.fingerprint,
            serial_hex: cert.serial_hex.clone(),
            not_after_ms: cert.not_after_ms,
            issuer: "builtin".into(),
        },
    )?;
    Ok(json!({
        "device_id": device_id,
        "certificate": cert.pem,
        "private_key": key,
        "ca": state.ca.ca_pem(),
        "serial": cert.serial_hex,
        "fingerprint": hex(&cert.fingerprint),
        "not_after_ms": cert.not_after_ms,
    }))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub async fn issue_cert_route(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<CertBody>>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let v = issue_cert(
        &state,
        &id,
        b.csr.as_deref(),
        b.days.unwrap_or(state.cert_days),
    )?;
    audit(
        &state,
        &caller,
        "credential.cert.issue",
        &id,
        json!({"serial": v["serial"], "from_csr": b.csr.is_some()}),
    );
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn revoke_cert(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, fingerprint)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    let fp = unhex32(&fingerprint).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            "the fingerprint must be 64 hex characters (SHA-256 of the DER certificate)",
        )
    })?;
    state.registry.revoke_certificate(&id, &fp)?;
    state.broker.kick(&id, ADMINISTRATIVE_ACTION);
    audit(
        &state,
        &caller,
        "credential.cert.revoke",
        &id,
        json!({"fingerprint": fingerprint}),
    );
    Ok(StatusCode::NO_CONTENT)
}
