//! The operator console: a single-page app of three hand-written files
//! (`crates/api/console/`), embedded in the binary so `m2mhub serve` shows
//! it on a machine with no internet and no build tools. It talks only to
//! `/api/v1`, like any other client; authorization is the API's job.
//!
//! The files are not content-hashed, so they are served with `no-cache`
//! and a strong ETag computed at compile time: browsers revalidate on each
//! load and get a 304 until the binary changes. Every response carries a
//! strict Content-Security-Policy: the app loads nothing but its own files
//! and builds its DOM without inline scripts or styles.

use crate::problem::Problem;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Only our own origin, for everything; no inline code, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: u64,
}

const fn asset(body: &'static str, content_type: &'static str) -> Asset {
    Asset {
        body,
        content_type,
        etag: fnv1a(body.as_bytes()),
    }
}

/// FNV-1a: enough to tell two builds' files apart, and `const`.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

const INDEX: Asset = asset(
    include_str!("../console/index.html"),
    "text/html; charset=utf-8",
);
const APP_JS: Asset = asset(
    include_str!("../console/app.js"),
    "text/javascript; charset=utf-8",
);
const APP_CSS: Asset = asset(
    include_str!("../console/app.css"),
    "text/css; charset=utf-8",
);

fn lookup(name: &str) -> Option<&'static Asset> {
    match name {
        "index.html" => Some(&INDEX),
        "app.js" => Some(&APP_JS),
        "app.css" => Some(&APP_CSS),
        _ => None,
    }
}

/// `GET /`: the app's page (its routes live in the URL fragment).
pub async fn index(headers: HeaderMap) -> Response {
    respond(&INDEX, &headers)
}

/// `GET /console/{file}`: one of the embedded files, or a 404 problem.
pub async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match lookup(&name) {
        Some(a) => respond(a, &headers),
        None => Problem::not_found(&format!("/console/{name}")).into_response(),
    }
}

fn respond(a: &Asset, headers: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", a.etag);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(a.content_type),
            )],
            a.body,
        )
            .into_response()
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_file_has_a_distinct_etag() {
        let tags = [INDEX.etag, APP_JS.etag, APP_CSS.etag];
        assert!(tags[0] != tags[1] && tags[1] != tags[2] && tags[0] != tags[2]);
        assert!(lookup("nope.js").is_none());
        assert!(lookup("../lib.rs").is_none());
    }
}
