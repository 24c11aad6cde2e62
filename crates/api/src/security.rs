//! The audit log, security events, bans and the device CA's public parts.

use crate::caller::Caller;
use crate::devices::audit;
use crate::problem::{bad_json, Problem};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use m2mhub_identity::{AuditQuery, AuditRecord, Role};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    after: Option<u64>,
    limit: Option<usize>,
    actor: Option<String>,
    action: Option<String>,
}

pub async fn list_audit(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Admin)?;
    let Query(q) = q.map_err(crate::problem::bad_query)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let query = |after_seq, limit| AuditQuery {
        after_seq,
        before_seq: None,
        limit: Some(limit),
        actor: q.actor.clone(),
        action: q.action.clone(),
        newest_first: false,
    };
    let items = if caller.is_platform() {
        state.registry.list_audit(&query(q.after, limit))?
    } else {
        // The log is one chain for the whole platform: a tenant
        // administrator reads only what their tenant's users did, and the
        // connections of their tenant's devices. Scanned in batches until
        // the page is full.
        let users: HashSet<String> = state
            .registry
            .list_users()?
            .into_iter()
            .filter(|u| u.tenant == caller.tenant)
            .map(|u| u.username)
            .collect();
        let sees = |r: &AuditRecord| {
            if r.action.starts_with("mqtt.") || r.action == "http.auth" || r.action == "coap.auth" {
                caller.sees_client(&state.registry, &r.target)
                    && (r.actor == r.target || caller.sees_client(&state.registry, &r.actor))
            } else {
                users.contains(&r.actor)
            }
        };
        const BATCH: usize = 1000;
        let mut items = Vec::new();
        let mut after = q.after;
        'scan: loop {
            let batch = state.registry.list_audit(&query(after, BATCH))?;
            let full = batch.len() == BATCH;
            for r in batch {
                after = Some(r.seq);
                if sees(&r) {
                    items.push(r);
                    if items.len() == limit {
                        break 'scan;
                    }
                }
            }
            if !full {
                break;
            }
        }
        items
    };
    let next = (items.len() == limit)
        .then(|| items.last().map(|r| r.seq))
        .flatten();
    Ok(Json(json!({"items": items, "next": next})))
}

pub async fn verify_audit(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Admin)?;
    let report = state.registry.verify_audit()?;
    Ok(Json(json!(report)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    after: Option<u64>,
    limit: Option<usize>,
}

pub async fn list_events(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<EventParams>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(crate::problem::bad_query)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let mut items = state.registry.list_security_events(q.after, limit)?;
    // Tenant users see only events about their own devices.
    items.retain(|e| {
        caller.is_platform()
            || e.device_id
                .as_deref()
                .is_some_and(|d| caller.sees_client(&state.registry, d))
    });
    Ok(Json(json!({"items": items})))
}

pub async fn list_bans(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    // Tenant users see the bans of their own devices; address bans and
    // other client ids concern every tenant and are the platform's.
    let visible = |key: &m2mhub_broker::BanKey| match key {
        _ if caller.is_platform() => true,
        m2mhub_broker::BanKey::ClientId(id) | m2mhub_broker::BanKey::Device(id) => {
            caller.sees_client(&state.registry, id)
        }
        m2mhub_broker::BanKey::Ip(_) => false,
    };
    let items: Vec<Value> = state
        .broker
        .bans()
        .into_iter()
        .filter(|b| visible(&b.key))
        .map(|b| json!({"key": b.key.to_string(), "reason": b.reason, "remaining_secs": b.remaining.as_secs(), "strikes": b.strikes}))
        .collect();
    Ok(Json(json!({"items": items})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanBody {
    /// An IP address, or a client id.
    ip: Option<String>,
    client_id: Option<String>,
    reason: Option<String>,
    seconds: Option<u64>,
}

pub async fn create_ban(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<BanBody>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    caller.require_platform_admin()?;
    let Json(b) = body.map_err(bad_json)?;
    let reason = b
        .reason
        .unwrap_or_else(|| format!("banned by {}", caller.username));
    let duration = b.seconds.map(Duration::from_secs);
    match (b.ip, b.client_id) {
        (Some(ip), None) => {
            let ip = ip.parse().map_err(|_| {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "validation",
                    "ip must be an IPv4 or IPv6 address",
                )
            })?;
            state.broker.ban_ip(ip, &reason, duration);
            audit(
                &state,
                &caller,
                "ban.create",
                &ip.to_string(),
                json!({"reason": reason}),
            );
        }
        (None, Some(id)) => {
            state.broker.ban_client(&id, &reason, duration);
            audit(
                &state,
                &caller,
                "ban.create",
                &id,
                json!({"reason": reason}),
            );
        }
        _ => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "give exactly one of ip or client_id",
            ))
        }
    }
    Ok(StatusCode::CREATED)
}

pub async fn delete_ban(
    caller: Caller,
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require_platform_admin()?;
    let parsed: m2mhub_broker::BanKey = key.parse().map_err(|_| {
        Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", "a ban key is ip:<address>, client:<id> or device:<id> (as listed by GET /security/bans)")
    })?;
    if !state.broker.unban(&parsed) {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no ban for {key:?}"),
        ));
    }
    audit(&state, &caller, "ban.delete", &key, json!({}));
    Ok(StatusCode::NO_CONTENT)
}

/// The device CA certificate (public), for devices and TLS clients.
pub async fn ca(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca.ca_pem(),
    )
}

/// The certificate revocation list of the device CA.
pub async fn crl(State(state): State<AppState>) -> Result<impl IntoResponse, Problem> {
    let revoked = state.registry.revoked_certificates()?;
    let list: Vec<(Vec<u8>, i64)> = revoked
        .iter()
        .filter_map(|c| Some((unhex(&c.serial_hex)?, c.revoked_ms.unwrap_or(0))))
        .collect();
    let pem = state
        .ca
        .crl_pem(&list, 24)
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/pkix-crl")], pem))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
