//! Headers every response carries: the browser-side hardening ones
//! (no MIME sniffing, no framing, no referrer, a restrictive
//! Content-Security-Policy where a route set none, HSTS over HTTPS) and
//! CORS, which is closed unless `http.cors_origins` names the origin.
//!
//! The API is called with bearer tokens, never cookies, so CORS is not
//! what protects it; keeping it closed still stops pages on other origins
//! from reading responses with a token they obtained some other way, and
//! keeps the surface small.

use crate::device_http::OverTls;
use crate::limits::HttpLimits;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// For responses that are not the console's pages: nothing may be loaded
/// or framed on their behalf.
pub const API_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

/// One year, as browsers' preload lists expect.
const HSTS: &str = "max-age=31536000";

/// Whether `origin` may read responses, and the value to answer with.
fn allowed_origin(allowed: &[String], origin: &HeaderValue) -> Option<HeaderValue> {
    if allowed.iter().any(|a| a == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let o = origin.to_str().ok()?;
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(o))
        .then(|| origin.clone())
}

/// Middleware: security headers and CORS on every response; an allowed
/// origin's preflight is answered here (204).
pub async fn secure(State(limits): State<Arc<HttpLimits>>, req: Request, next: Next) -> Response {
    let cors = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| allowed_origin(&limits.config.cors_origins, o));
    let tls = req.extensions().get::<OverTls>().is_some();
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight && cors.is_some() {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, if-none-match, range"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    add_security_headers(h, tls);
    if let Some(origin) = cors {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("retry-after, server-timing, etag"),
        );
    }
    if !limits.config.cors_origins.is_empty() {
        // The answer depends on the Origin: caches must keep them apart.
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

fn add_security_headers(h: &mut HeaderMap, tls: bool) {
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The console sets its own policy; everything else gets the strictest.
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(API_CONTENT_SECURITY_POLICY),
        );
    }
    // Only over HTTPS: over plain HTTP the header is meaningless and an
    // attacker in the middle could strip it anyway.
    if tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_or_by_wildcard() {
        let o = HeaderValue::from_static("https://app.example.com");
        assert_eq!(allowed_origin(&[], &o), None);
        let list = vec!["https://app.example.com".to_string()];
        assert_eq!(allowed_origin(&list, &o), Some(o.clone()));
        let evil = HeaderValue::from_static("https://app.example.com.evil.net");
        assert_eq!(allowed_origin(&list, &evil), None);
        assert_eq!(
            allowed_origin(&["*".to_string()], &evil),
            Some(HeaderValue::from_static("*"))
        );
    }

    #[test]
    fn hsts_only_over_tls_and_a_route_policy_is_kept() {
        let mut h = HeaderMap::new();
        add_security_headers(&mut h, false);
        assert!(!h.contains_key(header::STRICT_TRANSPORT_SECURITY));
        assert_eq!(
            h[header::CONTENT_SECURITY_POLICY],
            API_CONTENT_SECURITY_POLICY
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'self'"),
        );
        add_security_headers(&mut h, true);
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], "default-src 'self'");
        assert_eq!(h[header::STRICT_TRANSPORT_SECURITY], HSTS);
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    }
}
