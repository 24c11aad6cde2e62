//! DTLS pre-shared keys of CoAPS devices, through HTTP.
//!
//! The API makes the key (16 random bytes), seals it under the master key
//! ([`m2mhub_pki::PskKeys`], bound to the device id) and hands the registry
//! only the sealed bytes. The plain key leaves once, in the answer to the
//! issue or rotate call (marked `Cache-Control: no-store`); it is never
//! logged, audited or listed.

use crate::caller::Caller;
use crate::devices::{audit, hex, visible};
use crate::problem::Problem;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use m2mhub_identity::{now_ms, PskInfo, Role};
use m2mhub_pki::PskKeys;
use serde::Deserialize;
use serde_json::{json, Value};

/// The longest validity a PSK may be issued with (100 years).
const MAX_EXPIRY_DAYS: u32 = 36_500;
const DAY_MS: i64 = 86_400_000;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    /// The PSK identity the device will send; the device id when absent.
    identity: Option<String>,
    expires_in_days: Option<u32>,
    /// A key the device already has (factory-provisioned), hex, 16 to 64
    /// bytes; generated when absent.
    key_hex: Option<String>,
}

/// The smallest and largest key a device may bring (RFC 4279 allows up
/// to 64 bytes; fewer than 16 is too weak).
const MIN_KEY: usize = 16;
const MAX_KEY: usize = 64;

fn parse_key_hex(s: &str) -> Result<Vec<u8>, Problem> {
    let s = s.trim();
    let bad = || {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            format!("key_hex must be {MIN_KEY} to {MAX_KEY} bytes as hex digits (two per byte)"),
        )
    };
    if !s.len().is_multiple_of(2) {
        return Err(bad());
    }
    let key: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    if !(MIN_KEY..=MAX_KEY).contains(&key.len()) {
        return Err(bad());
    }
    Ok(key)
}

/// An optional JSON body: empty means all defaults; anything else must
/// parse (400 with the parser's complaint otherwise).
fn optional_body<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-body", e.to_string()))
}

/// The one answer that carries a key: never cached by anything between
/// the server and the operator.
fn key_response(status: StatusCode, info: &PskInfo, key: &[u8], extra: Value) -> Response {
    let mut v = json!({
        "id": info.id,
        "device_id": info.device_id,
        "identity": info.identity,
        "key_hex": hex(key),
        "created_ms": info.created_ms,
        "expires_ms": info.expires_ms,
        "note": "the key is shown once; configure the device with this PSK identity and key",
    });
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    let mut r = (status, Json(v)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn new_sealed_key(
    keys: &PskKeys,
    device_id: &str,
) -> Result<([u8; m2mhub_pki::PSK_LEN], Vec<u8>), Problem> {
    let key = PskKeys::generate().map_err(|e| {
        tracing::error!(error = %e, "cannot generate a PSK");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the system random number generator failed",
        )
    })?;
    let sealed = keys.seal(device_id, &key);
    Ok((key, sealed))
}

/// `GET /devices/{id}/psks`: the device's PSKs, never their keys.
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    visible(&state, &caller, &id)?;
    Ok(Json(json!({ "items": state.registry.list_psks(&id)? })))
}

/// `POST /devices/{id}/psks`: a new PSK; 201 with its key, shown once.
pub async fn issue(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    let b: IssueBody = optional_body(&body)?;
    let expires_ms = match b.expires_in_days {
        None => None,
        Some(d) if (1..=MAX_EXPIRY_DAYS).contains(&d) => Some(now_ms() + i64::from(d) * DAY_MS),
        Some(_) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                format!("expires_in_days must be between 1 and {MAX_EXPIRY_DAYS}; leave it out for a PSK that does not expire"),
            ))
        }
    };
    let (key, sealed) = match &b.key_hex {
        Some(h) => {
            let key = parse_key_hex(h)?;
            let sealed = state.psk_keys.seal(&id, &key);
            (key, sealed)
        }
        None => {
            let (key, sealed) = new_sealed_key(&state.psk_keys, &id)?;
            (key.to_vec(), sealed)
        }
    };
    let info = state
        .registry
        .create_psk(&id, b.identity, sealed, expires_ms)?;
    audit(
        &state,
        &caller,
        "credential.psk.issue",
        &id,
        json!({"psk_id": info.id, "identity": info.identity, "expires_ms": info.expires_ms, "key": if b.key_hex.is_some() { "brought" } else { "generated" }}),
    );
    Ok(key_response(StatusCode::CREATED, &info, &key, json!({})))
}

/// `POST /devices/{id}/psks/{psk_id}/rotate`: a new key under the same
/// identity (a new PSK id; the old PSK is revoked at once). 201 with the
/// new key, shown once.
pub async fn rotate(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, psk_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    let (key, sealed) = new_sealed_key(&state.psk_keys, &id)?;
    let info = state.registry.rotate_psk(&id, &psk_id, sealed)?;
    audit(
        &state,
        &caller,
        "credential.psk.rotate",
        &id,
        json!({"psk_id": info.id, "replaces": psk_id, "identity": info.identity}),
    );
    Ok(key_response(
        StatusCode::CREATED,
        &info,
        &key,
        json!({"replaces": psk_id}),
    ))
}

/// `DELETE /devices/{id}/psks/{psk_id}`: revoke; DTLS sessions using it
/// end when their server next asks `Registry::psk_still_valid`.
pub async fn revoke(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, psk_id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    visible(&state, &caller, &id)?;
    state.registry.revoke_psk(&id, &psk_id)?;
    audit(
        &state,
        &caller,
        "credential.psk.revoke",
        &id,
        json!({"psk_id": psk_id}),
    );
    Ok(StatusCode::NO_CONTENT)
}
