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
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
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

/// A JSON body that failed to parse: 400 with serde's reason.
pub fn bad_json(e: axum::extract::rejection::JsonRejection) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-body", e.body_text())
}

/// Query parameters that failed to parse: 400 with serde's reason.
pub fn bad_query(e: axum::extract::rejection::QueryRejection) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", e.body_text())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
