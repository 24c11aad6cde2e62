//! Remote diagnostics through HTTP: an operator asks a device for a
//! diagnostic bundle, the device is sent the command `diagnostics.upload`
//! with a one-time upload URL, and PUTs the bundle there; operators list,
//! download and delete the bundles of the devices they may see.
//!
//! The upload route is public: the random token in its path is the only
//! credential (it is in the command, which only the device receives, and
//! only its hash is stored). Its body is streamed to disk by a blocking
//! task fed through a small channel, so a bundle is never held in memory
//! and a slow disk never stalls a runtime worker; the size cap is counted
//! as the body arrives (413 past it, with nothing kept).

use crate::caller::Caller;
use crate::devices::{audit, visible};
use crate::problem::{bad_query, Problem};
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use m2mhub_fleet::{DiagnosticBundle, NewCommand, UploadError};
use m2mhub_identity::Role;
use serde::Deserialize;
use serde_json::{json, Value};

/// The command a device receives.
pub const COMMAND: &str = "diagnostics.upload";
/// The upload route, below `/api/v1`, with the token appended.
const UPLOAD_PATH: &str = "/api/v1/diagnostics/upload/";
/// Pieces of a body in flight between the connection and the disk writer.
const PIECES_IN_FLIGHT: usize = 8;
/// Bytes read from a bundle's file per piece of a download.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    /// Why the bundle is wanted (kept with it).
    reason: Option<String>,
}

fn bundle_json(b: &DiagnosticBundle) -> Value {
    json!(b)
}

/// Without `http.public_url`, the absolute base of the upload URL: what the operator's request was
/// addressed to (its `Host`), which is how the device reaches us too in
/// the common case of one address for the API and the devices.
fn base_url(headers: &HeaderMap) -> Result<String, Problem> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        })
        .ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-host",
                "the request needs a Host header (host[:port]) to build the device's upload URL from",
            )
        })?;
    Ok(format!("http://{host}"))
}

/// `POST /devices/{id}/diagnostics`: record the request and send the
/// device the command with its upload URL; 202 with the request.
pub async fn request(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let b: RequestBody = if body.iter().all(u8::is_ascii_whitespace) {
        RequestBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid-body", e.to_string()))?
    };
    let device = visible(&state, &caller, &id)?;
    // The configured public URL (`http.public_url`) when there is one.
    let base = match state.ota.as_ref().and_then(|o| o.public_url.clone()) {
        Some(u) => u,
        None => base_url(&headers)?,
    };
    let requested =
        state
            .fleet
            .request_diagnostic(&device.tenant, &device.id, &caller.username, b.reason)?;
    let bundle = requested.bundle;
    let config = state.fleet.diagnostics_config();
    let params = json!({
        "bundle_id": bundle.id,
        "url": format!("{base}{UPLOAD_PATH}{}", requested.token),
        "max_bytes": config.max_bundle_bytes,
        "expires_at": bundle.expires_ms,
    });
    // The device has until the URL expires to answer.
    let timeout_ms = u64::try_from(config.upload_ttl.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let origin = format!("operator:{}", caller.username);
    let sent = match &state.rules {
        Some(service) => service
            .send_command(
                &device.tenant,
                &device.id,
                COMMAND,
                params,
                timeout_ms,
                &origin,
            )
            .map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "command-refused", e)),
        None => state
            .fleet
            .create_command(NewCommand {
                tenant: device.tenant.clone(),
                device_id: device.id.clone(),
                name: COMMAND.into(),
                params,
                origin,
                timeout_ms,
            })
            .map(|c| c.id)
            .map_err(Problem::from),
    };
    let command = match sent {
        Ok(c) => c,
        Err(p) => {
            // A request the device was never told about only blocks a slot.
            if let Err(e) = state.fleet.delete_diagnostic(None, &device.id, &bundle.id) {
                tracing::warn!(bundle = %bundle.id, error = %e, "cannot delete an unsent diagnostic request");
            }
            return Err(p);
        }
    };
    audit(
        &state,
        &caller,
        "diagnostics.request",
        &device.id,
        json!({"bundle": bundle.id, "command": command, "reason": bundle.reason}),
    );
    let mut out = bundle_json(&bundle);
    out["command_id"] = json!(command);
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
}

/// `GET /devices/{id}/diagnostics`: newest first.
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let Query(q) = q.map_err(bad_query)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > m2mhub_fleet::diagnostic::MAX_LIST {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            format!(
                "limit must be between 1 and {}",
                m2mhub_fleet::diagnostic::MAX_LIST
            ),
        ));
    }
    let device = visible(&state, &caller, &id)?;
    let items = state
        .fleet
        .list_diagnostics(Some(&device.tenant), &device.id, limit)?;
    Ok(Json(json!({ "items": items })))
}

/// `GET /devices/{id}/diagnostics/{bundle}`: the metadata.
pub async fn show(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, bundle)): Path<(String, String)>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let device = visible(&state, &caller, &id)?;
    let b = state
        .fleet
        .get_diagnostic(Some(&device.tenant), &device.id, &bundle)?;
    Ok(Json(bundle_json(&b)))
}

/// `GET /devices/{id}/diagnostics/{bundle}/content`: the bytes, streamed
/// from the file. Audited: a bundle may hold what a device knows.
pub async fn content(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, bundle)): Path<(String, String)>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let device = visible(&state, &caller, &id)?;
    let (b, path) = state
        .fleet
        .diagnostic_file(Some(&device.tenant), &device.id, &bundle)?;
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        tracing::error!(bundle = %b.id, error = %e, "cannot open a diagnostic bundle's file");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot read diagnostic bundle {}", b.id),
        )
    })?;
    audit(
        &state,
        &caller,
        "diagnostics.download",
        &device.id,
        json!({"bundle": b.id, "size": b.size}),
    );
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; READ_CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    // Ids are [A-Za-z0-9._-]: safe in a quoted file name.
    let disposition = format!("attachment; filename=\"{}-{}.bin\"", b.device_id, b.id);
    let mut headers = vec![
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_DISPOSITION, disposition),
    ];
    if let Some(size) = b.size {
        headers.push((header::CONTENT_LENGTH, size.to_string()));
    }
    if let Some(sha) = &b.sha256 {
        headers.push((header::ETAG, format!("\"{sha}\"")));
    }
    let mut response = Body::from_stream(stream).into_response();
    for (k, v) in headers {
        if let Ok(v) = v.parse() {
            response.headers_mut().insert(k, v);
        }
    }
    Ok(response)
}

/// `DELETE /devices/{id}/diagnostics/{bundle}`: the record and its file.
pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, bundle)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let device = visible(&state, &caller, &id)?;
    let b = state
        .fleet
        .delete_diagnostic(Some(&device.tenant), &device.id, &bundle)?;
    audit(
        &state,
        &caller,
        "diagnostics.delete",
        &device.id,
        json!({"bundle": b.id, "status": b.status}),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// A piece of an upload's body for the disk writer; `End` means the body
/// arrived whole (without it, the upload was interrupted).
enum Piece {
    Data(Bytes),
    End,
}

/// `PUT /diagnostics/upload/{token}`: the device's upload, authorized by
/// the token alone.
pub async fn upload(
    State(state): State<AppState>,
    Path(token): Path<String>,
    request: Request,
) -> Result<Json<Value>, Problem> {
    let mut upload = state.fleet.begin_upload(&token)?;
    let (bundle_id, device_id) = (
        upload.bundle().id.clone(),
        upload.bundle().device_id.clone(),
    );
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        if let Err(e) = upload.check_length(n) {
            device_audit(
                &state,
                &device_id,
                &bundle_id,
                "denied",
                json!({"declared": n}),
            );
            return Err(e.into());
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(PIECES_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || {
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Data(b) => upload.write(&b)?,
                Piece::End => return upload.finish().map(Some),
            }
        }
        // Dropping the upload removes what was written; the URL still works.
        Ok(None)
    });
    let mut body = request.into_body().into_data_stream();
    let mut whole = true;
    while let Some(frame) = body.next().await {
        match frame {
            Ok(b) => {
                if tx.send(Piece::Data(b)).await.is_err() {
                    // The writer stopped (too large, or a disk error).
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(bundle = %bundle_id, error = %e, "diagnostic upload interrupted");
                whole = false;
                break;
            }
        }
    }
    if whole {
        let _ = tx.send(Piece::End).await;
    }
    drop(tx);
    let outcome = writer.await.map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the upload did not finish: {e}"),
        )
    })?;
    match outcome {
        Ok(Some(b)) => {
            device_audit(
                &state,
                &device_id,
                &bundle_id,
                "ok",
                json!({"size": b.size, "sha256": b.sha256}),
            );
            Ok(Json(json!({
                "id": b.id, "status": b.status, "size": b.size, "sha256": b.sha256,
            })))
        }
        Ok(None) => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "upload-interrupted",
            "the body did not arrive whole; the upload URL still works until it expires",
        )),
        Err(e) => {
            if matches!(e, UploadError::TooLarge { .. }) {
                device_audit(
                    &state,
                    &device_id,
                    &bundle_id,
                    "denied",
                    json!({"error": e.to_string()}),
                );
            }
            Err(e.into())
        }
    }
}

/// Uploads are the device's doing: audited under its id.
fn device_audit(state: &AppState, device_id: &str, bundle: &str, outcome: &str, detail: Value) {
    let mut detail = detail;
    detail["bundle"] = json!(bundle);
    if let Err(e) = state.registry.audit(
        &format!("device:{device_id}"),
        "diagnostics.upload",
        device_id,
        outcome,
        detail,
    ) {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}
