//! Fleet provisioning by claim: a device that knows only a claim token
//! (limited in tenant, group, profile, uses and time) obtains its own
//! identity and credentials — a certificate from its CSR, or a token. The
//! same exchange serves HTTP (`POST /api/v1/provision`) and MQTT
//! (`$provision/{client_id}/request` → `$provision/{client_id}/response`).

use crate::devices::issue_cert;
use crate::problem::{bad_json, Problem};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use m2mhub_identity::{now_ms, ClaimError};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    pub claim_token: String,
    /// PEM CSR: the device keeps its private key and gets a certificate.
    pub csr: Option<String>,
    /// A display name for the new device.
    pub name: Option<String>,
}

/// Redeem the claim and issue credentials. Errors carry an HTTP status and
/// a message a device log can show.
pub fn provision(state: &AppState, req: &ProvisionRequest, via: &str) -> Result<Value, Problem> {
    let (device, claim) =
        match state
            .registry
            .redeem_claim(req.claim_token.as_bytes(), now_ms(), req.name.as_deref())
        {
            Ok(x) => x,
            Err(e) => {
                let status = match e {
                    ClaimError::Unknown => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::FORBIDDEN,
                };
                let _ = state.registry.audit(
                    "claim",
                    "provision.redeem",
                    "-",
                    "denied",
                    json!({"via": via, "reason": e.to_string()}),
                );
                return Err(Problem::new(status, "claim-refused", e.to_string()));
            }
        };
    let mut out = json!({
        "device_id": device.id,
        "tenant": device.tenant,
        "group": device.group,
        "profile": device.profile,
    });
    match &req.csr {
        Some(csr) => {
            let cert = match issue_cert(state, &device.id, Some(csr), state.cert_days) {
                Ok(c) => c,
                Err(p) => {
                    // Do not leave a device without credentials behind.
                    let _ = state.registry.delete_device(&device.id);
                    return Err(p);
                }
            };
            out["certificate"] = cert["certificate"].clone();
            out["ca"] = cert["ca"].clone();
        }
        None => {
            let (_, secret) = state.registry.issue_token(&device.id, None)?;
            out["username"] = json!(device.id);
            out["token"] = json!(secret);
        }
    }
    let _ = state.registry.audit(
        &format!("claim:{}", claim.id),
        "provision.redeem",
        &device.id,
        "ok",
        json!({"via": via, "credential": if req.csr.is_some() { "certificate" } else { "token" }}),
    );
    Ok(out)
}

pub async fn http(
    State(state): State<AppState>,
    body: Result<Json<ProvisionRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let Json(req) = body.map_err(bad_json)?;
    let out = provision(&state, &req, "http")?;
    Ok((StatusCode::CREATED, Json(out)))
}

/// Serve provisioning requests published over MQTT until the broker stops.
pub async fn serve_mqtt(state: AppState) {
    let mut rx = state
        .broker
        .subscribe_internal("$provision/+/request", 1024);
    while let Some(msg) = rx.recv().await {
        let Some(client_id) = msg
            .topic
            .strip_prefix("$provision/")
            .and_then(|t| t.strip_suffix("/request"))
            .map(str::to_string)
        else {
            continue;
        };
        let state = state.clone();
        // CSR signing takes milliseconds: keep it off the receive loop.
        tokio::task::spawn_blocking(move || {
            let reply = match serde_json::from_slice::<ProvisionRequest>(&msg.payload) {
                Ok(req) => match provision(&state, &req, "mqtt") {
                    Ok(v) => json!({"ok": true, "result": v}),
                    Err(p) => json!({"ok": false, "status": p.status, "error": p.detail}),
                },
                Err(e) => {
                    json!({"ok": false, "status": 400, "error": format!("the request must be JSON {{\"claim_token\": \"…\", \"csr\": \"…\"}}: {e}")})
                }
            };
            let topic = format!("$provision/{client_id}/response");
            let payload = bytes::Bytes::from(reply.to_string());
            let broker = state.broker.clone();
            tokio::runtime::Handle::current().block_on(async move {
                broker
                    .publish(&topic, payload, mqtt_codec::QoS::AtLeastOnce, false)
                    .await;
            });
        });
    }
}
