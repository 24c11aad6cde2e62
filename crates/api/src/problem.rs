//! RFC 9457 problem documents.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

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
}

impl Problem {
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: Some(detail.into()),
            instance: None,
        }
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

impl From<m2mhub_registry::RegistryError> for Problem {
    /// The one place registry errors become HTTP statuses.
    fn from(e: m2mhub_registry::RegistryError) -> Self {
        use m2mhub_registry::RegistryError as E;
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

/// A JSON body that failed to parse: 400 with serde's reason.
pub fn bad_json(e: axum::extract::rejection::JsonRejection) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-body", e.body_text())
}

/// Query parameters that failed to parse: 400 with serde's reason.
pub fn bad_query(e: axum::extract::rejection::QueryRejection) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", e.body_text())
}
