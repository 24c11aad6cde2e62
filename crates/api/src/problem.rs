//! RFC 9457 problem documents.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

/// An error response: `application/problem+json`.
#[derive(Debug, Serialize)]
pub struct Problem {
    /// A URI naming the kind of problem; relative to the API documentation.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// RFC 9457 extension members, serialized beside the standard ones
    /// (e.g. `line` and `column` of a rule that does not parse); `None` for
    /// most problems. Boxed so every `Result<_, Problem>` stays small.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    /// A `retry_after_secs` member is also sent as the `Retry-After`
    /// header (429, 503: when trying again can succeed).
    pub extensions: Option<Box<Map<String, Value>>>,
}

impl Problem {
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: Some(detail.into()),
            instance: None,
            extensions: None,
        }
    }

    /// Tell the client when to try again: the `Retry-After` header and a
    /// `retry_after_secs` member (at least one second).
    pub fn retry_after(self, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let secs = secs.max(1);
        self.with("retry_after_secs", secs)
    }

    /// Add an extension member.
    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extensions
            .get_or_insert_with(Default::default)
            .insert(name.to_string(), value.into());
        self
    }

    pub fn not_found(path: &str) -> Self {
        let mut p = Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no resource at {path}"),
        );
        p.instance = Some(path.to_string());
        p
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response();
        let retry_after = self
            .extensions
            .as_ref()
            .and_then(|e| e.get("retry_after_secs"))
            .and_then(Value::as_u64);
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        resp
    }
}

impl From<m2mhub_identity::RegistryError> for Problem {
    /// The one place registry errors become HTTP statuses.
    fn from(e: m2mhub_identity::RegistryError) -> Self {
        use m2mhub_identity::RegistryError as E;
        let (status, kind) = match &e {
            E::NotFound(..) => (StatusCode::NOT_FOUND, "not-found"),
            E::AlreadyExists(..) => (StatusCode::CONFLICT, "already-exists"),
            E::Validation(..) => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            E::Conflict(..) => (StatusCode::CONFLICT, "conflict"),
            E::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            E::DiskFull(..) => (StatusCode::INSUFFICIENT_STORAGE, "disk-full"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "registry error");
        }
        Problem::new(status, kind, e.to_string())
    }
}

impl From<m2mhub_fleet::UploadError> for Problem {
    /// A refused diagnostic upload: a spent or expired URL is gone (410),
    /// a body past the cap is too large (413).
    fn from(e: m2mhub_fleet::UploadError) -> Self {
        use m2mhub_fleet::UploadError as E;
        let (status, kind) = match e {
            E::Storage(inner) => return inner.into(),
            E::UnknownToken => (StatusCode::NOT_FOUND, "not-found"),
            E::Used => (StatusCode::GONE, "upload-used"),
            E::Expired => (StatusCode::GONE, "upload-expired"),
            E::Busy => (StatusCode::CONFLICT, "upload-busy"),
            E::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
        };
        Problem::new(status, kind, e.to_string())
    }
}

/// A JSON body that failed to parse: 400 with serde's reason; 413 when it
/// is over the route's body limit, 415 when it is not JSON.
pub fn bad_json(e: axum::extract::rejection::JsonRejection) -> Problem {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        _ => Problem::new(StatusCode::BAD_REQUEST, "invalid-body", e.body_text()),
    }
}

/// A request body over the route's limit (`http.max_body_bytes` for the
/// JSON routes; uploads have their own caps).
pub fn too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        "the request body is larger than this route accepts",
    )
}

/// Query parameters that failed to parse: 400 with serde's reason.
pub fn bad_query(e: axum::extract::rejection::QueryRejection) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", e.body_text())
}

/// Middleware: error responses the framework makes itself (a body over
/// the limit, a method the route does not have, a path parameter that
/// does not parse) come as plain text; rewrite them as problem documents,
/// so clients see one error shape everywhere. Headers such as `Allow` are
/// kept; a route's own non-problem error bodies (none today) would be
/// left alone unless they are plain text.
pub async fn uniform_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let plain = match resp.headers().get(header::CONTENT_TYPE) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|t| t.starts_with("text/plain")),
    };
    if !plain {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (kind, detail) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => return keep_headers(too_large(), parts.headers),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method-not-allowed",
            "this resource does not support the method; the Allow header lists those it does"
                .to_string(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported-media-type", text),
        StatusCode::NOT_FOUND => ("not-found", text),
        StatusCode::UNAUTHORIZED => ("unauthorized", text),
        StatusCode::FORBIDDEN => ("forbidden", text),
        s if s.is_server_error() => ("internal", text),
        _ => ("invalid-request", text),
    };
    let detail = if detail.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        detail
    };
    keep_headers(Problem::new(status, kind, detail), parts.headers)
}

/// Middleware: a handler that panics answers 500 with a problem document
/// (and the panic is logged), instead of the connection being dropped
/// with no answer. Panics are bugs; this keeps them visible to clients as
/// what they are.
pub async fn catch_panic(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use futures_util::FutureExt;
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(resp) => resp,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%method, %path, panic = %what, "HTTP handler panicked");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the server failed to handle this request (a bug: it is logged)",
            )
            .into_response()
        }
    }
}

fn keep_headers(p: Problem, headers: axum::http::HeaderMap) -> Response {
    let mut resp = p.into_response();
    for (name, value) in headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            resp.headers_mut().append(name.clone(), value.clone());
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_panicking_handler_answers_a_500_problem() {
        use axum::routing::get;
        let mut app: axum::Router = axum::Router::new()
            .route(
                "/boom",
                get(|| async {
                    if true {
                        panic!("boom");
                    }
                    "unreachable"
                }),
            )
            .layer(axum::middleware::from_fn(catch_panic));
        let req = axum::http::Request::get("/boom")
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = tower_service::Service::call(&mut app, req)
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }

    #[test]
    fn retry_after_is_a_header_and_a_member() {
        let resp = Problem::new(StatusCode::TOO_MANY_REQUESTS, "x", "wait")
            .retry_after(std::time::Duration::from_millis(1500))
            .into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn extension_members_sit_beside_the_standard_ones() {
        let plain = Problem::new(StatusCode::NOT_FOUND, "not-found", "no device");
        assert_eq!(
            serde_json::to_value(&plain).expect("json"),
            json!({"type": "/problems/not-found", "title": "Not Found", "status": 404, "detail": "no device"})
        );
        let rule: Problem = m2mhub_automation::RuleProblem {
            message: "unexpected token".into(),
            line: Some(2),
            column: Some(7),
        }
        .into();
        assert_eq!(
            serde_json::to_value(&rule).expect("json"),
            json!({
                "type": "/problems/invalid-rule", "title": "Unprocessable Entity", "status": 422,
                "detail": "unexpected token", "line": 2, "column": 7
            })
        );
    }
}
