//! The operator console: served from the binary at `/` and `/console/*`,
//! with a strict Content-Security-Policy, and loading nothing from other
//! hosts (it must work on a machine with no internet).

use crate::common::*;
use mqtt_codec::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Our own files: checked for references to other hosts.
const FILES: [(&str, &str); 5] = [
    ("/", "text/html"),
    ("/console/app.js", "text/javascript"),
    ("/console/charts.js", "text/javascript"),
    ("/console/map.js", "text/javascript"),
    ("/console/app.css", "text/css"),
];

/// The vendored libraries and the basemap (third-party text mentions
/// their home pages, so only the types and the policy are checked).
const VENDOR: [(&str, &str); 7] = [
    ("/console/vendor/leaflet.js", "text/javascript"),
    ("/console/vendor/leaflet.css", "text/css"),
    (
        "/console/vendor/leaflet.markercluster.js",
        "text/javascript",
    ),
    ("/console/vendor/markercluster.css", "text/css"),
    ("/console/vendor/uplot.js", "text/javascript"),
    ("/console/vendor/uplot.css", "text/css"),
    ("/console/vendor/basemap.json", "application/json"),
];

/// The `src` and `href` attribute values of an HTML page.
fn referenced(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let end = rest.find('"').expect("closing quote");
            out.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    out
}

fn assert_console_headers(r: &HttpResponse, path: &str) {
    let csp = r
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{path}: no CSP"));
    assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
    assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
    assert!(!csp.contains("unsafe-eval"), "{path}: {csp}");
    assert!(
        r.header("cache-control").is_some(),
        "{path}: no Cache-Control"
    );
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{path}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_serves_the_console_page_with_a_strict_csp() {
    let srv = TestServer::start().await;
    let r = http_get(srv.http(), "/").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/html")));
    assert_console_headers(&r, "/");
    assert!(r.body.starts_with("<!doctype html>"), "{}", r.body);
    let refs = referenced(&r.body);
    assert!(refs.iter().any(|x| x == "/console/app.js"), "{refs:?}");
    assert!(refs.iter().any(|x| x == "/console/app.css"), "{refs:?}");
    // No inline script: the CSP would block it anyway.
    assert!(!r.body.contains("<script>"), "inline script in the page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_have_their_content_types() {
    let srv = TestServer::start().await;
    for (path, ty) in FILES.iter().chain(VENDOR.iter()) {
        let r = http_get(srv.http(), path).await;
        assert_eq!(r.status, 200, "{path}");
        let ct = r.header("content-type").unwrap_or_default();
        assert!(ct.starts_with(ty), "{path}: {ct}");
        assert_console_headers(&r, path);
        assert!(!r.body.is_empty(), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_asset_the_page_references_is_served() {
    let srv = TestServer::start().await;
    let page = http_get(srv.http(), "/").await;
    let refs = referenced(&page.body);
    assert!(!refs.is_empty());
    for path in refs {
        assert!(
            path.starts_with("/console/"),
            "{path}: the page may reference only its own files"
        );
        let r = http_get(srv.http(), &path).await;
        assert_eq!(r.status, 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_asset_points_to_another_host() {
    // The SVG namespace is a name, never fetched.
    const NAMESPACES: [&str; 1] = ["http://www.w3.org/2000/svg"];
    let srv = TestServer::start().await;
    for (path, _) in FILES {
        let mut body = http_get(srv.http(), path).await.body;
        for ns in NAMESPACES {
            body = body.replace(ns, "");
        }
        for scheme in ["http://", "https://", "url(//", "src=\"//", "href=\"//"] {
            assert!(
                !body.contains(scheme),
                "{path} refers to another host ({scheme}): {}",
                &body[body.find(scheme).unwrap_or(0)..][..60.min(body.len())]
            );
        }
        assert!(!body.contains("@import"), "{path}: CSS import");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_console_files_are_404_problems() {
    let srv = TestServer::start().await;
    for path in [
        "/console/x",
        "/console/app.jsx",
        "/console/..%2Fsrc%2Flib.rs",
        "/console/a/b",
        "/console/vendor/app.js",
        "/console/vendor/..%2Fapp.js",
        "/console/vendor/x/leaflet.js",
    ] {
        let r = http_get(srv.http(), path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_assets_revalidate_with_304() {
    let srv = TestServer::start().await;
    let r = http_get(srv.http(), "/console/app.js").await;
    let etag = r.header("etag").expect("ETag").to_string();
    let mut s = tokio::net::TcpStream::connect(srv.http()).await.unwrap();
    let req = format!(
        "GET /console/app.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    within("304 answer", s.read_to_end(&mut raw)).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 304"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_and_other_routes_still_answer() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    assert_eq!(http_get(srv.http(), "/healthz").await.status, 200);
    assert_eq!(http_get(srv.http(), "/metrics").await.status, 200);
    let r = http_get_as(srv.http(), "/api/v1/broker", &token).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["counters"]["messages_received"].is_u64());
    let r = http_get_as(srv.http(), "/api/v1/devices?limit=1", &token).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["total"].is_u64());
    assert_eq!(
        http_get(srv.http(), "/api/v1/openapi.json").await.status,
        200
    );
    // The API's own 404s are still problem documents under /api/v1.
    let r = http_get(srv.http(), "/api/v1/console/app.js").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["instance"], "/api/v1/console/app.js");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tile_server_is_the_one_other_image_origin_and_the_console_is_told_it() {
    let srv = TestServer::start().await;
    let r = http_get(srv.http(), "/").await;
    let csp = r.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("img-src 'self' https://tile.openstreetmap.org;"),
        "{csp}"
    );
    for directive in [
        "script-src 'self';",
        "connect-src 'self';",
        "style-src 'self';",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    let token = srv.admin_token();
    let r = http_get_as(srv.http(), "/api/v1/console/config", &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["tile_url"],
        "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
    );
    assert!(r.json()["tile_attribution"]
        .as_str()
        .is_some_and(|a| a.contains("OpenStreetMap")));
    // Operators only: it is part of the API.
    assert_eq!(
        http_get(srv.http(), "/api/v1/console/config").await.status,
        401
    );

    // No tiles configured: the policy is our origin alone, and the console
    // is told there is no tile server.
    let srv = TestServer::with(|s| s.console.tile_url = String::new()).await;
    let csp = http_get(srv.http(), "/console/app.js")
        .await
        .header("content-security-policy")
        .unwrap_or_default()
        .to_string();
    assert!(csp.contains("img-src 'self';"), "{csp}");
    let token = srv.admin_token();
    let r = http_get_as(srv.http(), "/api/v1/console/config", &token).await;
    assert!(r.json()["tile_url"].is_null(), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_history_gives_rates_minute_by_minute() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    // Some traffic: a client publishes a few messages (QoS 1, so each is
    // counted before its PUBACK arrives) and stays connected.
    let (mut client, _) = Raw::connect_ok(srv.mqtt(), v5("history-client")).await;
    for pid in 1..=5 {
        client
            .publish(publish("history/test", QoS::AtLeastOnce, pid, "x"))
            .await;
    }
    let r = http_get_as(srv.http(), "/api/v1/broker/history", &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["interval_s"], 60);
    let points = v["points"].as_array().expect("points");
    // A fresh server has its first sample and the minute in progress.
    assert!(!points.is_empty(), "{v}");
    let last = points.last().expect("a point");
    assert!(
        last["messages_in_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "{v}"
    );
    assert!(last["connections"].as_u64().is_some_and(|c| c >= 1), "{v}");
    for key in [
        "ts_ms",
        "seconds",
        "messages_out_per_s",
        "connects_per_s",
        "bytes_in_per_s",
        "dropped_per_s",
        "auth_failures_per_s",
    ] {
        assert!(!last[key].is_null(), "{key} in {last}");
    }
    // Anonymous callers may not read it.
    assert_eq!(
        http_get(srv.http(), "/api/v1/broker/history").await.status,
        401
    );
    client.disconnect().await;
}
