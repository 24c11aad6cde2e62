//! An operator's write is acknowledged only once its audit records are in
//! the store.
//!
//! Audit records are queued and written by the registry's background
//! thread in batches (a CONNECT never waits for the disk). For a write
//! through the API that is not enough: a `kill -9` right after the `2xx`
//! lost the `device.create` or `shadow.update` records of writes the
//! caller had been told succeeded (found by `scripts/chaos.py`). So after
//! a successful write under `/api/v1` (but a device's own telemetry, which
//! is not audited per request), the answer waits for the queue to be
//! committed up to that point — one store write shared by every request
//! waiting at the time. If the audit log cannot be written, the caller gets
//! a `503` rather than a success with no record of it.

use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub async fn wait(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let write = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let path = req.uri().path();
    let audited = write && path.starts_with("/api/v1/") && !path.ends_with("/telemetry");
    let resp = next.run(req).await;
    if !audited || !resp.status().is_success() {
        return resp;
    }
    let registry = state.registry.clone();
    let mark = registry.audit_mark();
    let written = tokio::task::spawn_blocking(move || registry.audit_durable(mark)).await;
    match written {
        Ok(Ok(())) => resp,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "audit log not written; the write is not acknowledged");
            let p: Problem = e.into();
            if p.status == StatusCode::INSUFFICIENT_STORAGE.as_u16() {
                p.into_response()
            } else {
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit-unavailable",
                    "the change was made but its audit record could not be written; check the server's storage",
                )
                .into_response()
            }
        }
        Err(e) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("audit write task failed: {e}"),
        )
        .into_response(),
    }
}
