//! The HTTP server's defences against the real server: body limits with
//! 413 problem documents (uploads keep their own caps), the header read
//! timeout against slowloris, connections per address, requests in flight
//! per token, security headers on every response (HSTS over HTTPS only),
//! and CORS closed unless configured.

use crate::common::*;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// One request with raw header lines, over a fresh connection.
async fn send(addr: SocketAddr, head: &str, body: &[u8]) -> HttpResponse {
    within(&format!("request {head:?}"), async {
        let s = TcpStream::connect(addr).await.expect("connect HTTP");
        exchange(s, head, body).await
    })
    .await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    head: &str,
    body: &[u8],
) -> HttpResponse {
    let (request_line, headers) = head.split_once('\n').unwrap_or((head, ""));
    let mut req = format!(
        "{request_line} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers.lines().filter(|l| !l.is_empty()) {
        req.push_str(h.trim());
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).await.expect("write request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read response");
    parse_http(&raw)
}

/// Read until the peer closes; how long it took.
async fn closed_after(s: &mut TcpStream, limit: Duration) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    within_for(limit, "the server to close the connection", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_a_413_problem_and_uploads_keep_their_caps() {
    let srv = TestServer::with(|s| s.http.max_body_bytes = 2048).await;
    let admin = Api::admin(&srv);
    let auth = format!("Authorization: Bearer {}", admin.token);
    // A JSON route: 413, as a problem document.
    let big = json!({"id": "d1", "name": "x".repeat(4000)}).to_string();
    let r = send(
        srv.http(),
        &format!("POST /api/v1/devices\n{auth}\nContent-Type: application/json"),
        big.as_bytes(),
    )
    .await;
    assert_problem(&r, 413, "larger than this route accepts");
    assert_eq!(r.json()["type"], "/problems/too-large");
    // Under the limit, the same route works.
    admin
        .expect("POST", "/devices", Some(json!({"id": "d1"})), 201)
        .await;
    // A route reading raw bytes answers a problem document too.
    let r = send(
        srv.http(),
        &format!("POST /api/v1/devices/d1/diagnostics\n{auth}"),
        &[b' '; 4096],
    )
    .await;
    assert_problem(&r, 413, "larger than this route accepts");
    // Firmware uploads stream past it up to their own cap.
    let image = vec![7u8; 64 * 1024];
    let r = send(
        srv.http(),
        &format!("POST /api/v1/ota/artifacts?name=fw&version=1.0\n{auth}\nContent-Type: application/octet-stream"),
        &image,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["size"], 64 * 1024);
    // The framework's own refusals are problem documents as well.
    let r = send(srv.http(), "DELETE /api/v1/broker", b"").await;
    assert_problem(&r, 405, "Allow");
    assert!(r.header("allow").is_some_and(|a| a.contains("GET")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_header_is_cut_off_and_normal_requests_are_not() {
    let srv = TestServer::with(|s| s.http.header_read_timeout_secs = 1).await;
    // Half a request line, then nothing: closed after about a second.
    let mut s = TcpStream::connect(srv.http()).await.expect("connect");
    s.write_all(b"GET /api/v1/ HT").await.expect("write");
    let took = closed_after(&mut s, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    // A header trickled byte by byte is cut off the same way.
    let mut s = TcpStream::connect(srv.http()).await.expect("connect");
    let t = Instant::now();
    let trickle = async {
        let head = b"GET /api/v1/ HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    within_for(Duration::from_secs(5), "the trickle to be cut off", trickle).await;
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // An idle keep-alive connection is closed too.
    let mut s = TcpStream::connect(srv.http()).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let took = closed_after(&mut s, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    // Normal requests, even slow-ish ones, are unaffected.
    let mut s = TcpStream::connect(srv.http()).await.expect("connect");
    s.write_all(b"GET /api/v1/ HTTP/1.1\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"Host: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    within("response", s.read_to_end(&mut raw))
        .await
        .expect("read");
    assert_eq!(parse_http(&raw).status, 200);
    assert_eq!(http_get(srv.http(), "/api/v1/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_a_408() {
    let srv = TestServer::with(|s| s.http.body_read_timeout_secs = 1).await;
    let token = srv.admin_token();
    // The header and a part of the body, then nothing.
    let mut s = TcpStream::connect(srv.http()).await.expect("connect");
    s.write_all(
        format!(
            "POST /api/v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\": "
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let t = Instant::now();
    let mut raw = Vec::new();
    within("the 408", s.read_to_end(&mut raw))
        .await
        .expect("read");
    let r = parse_http(&raw);
    assert_problem(&r, 408, "http.body_read_timeout_secs");
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    // A body that keeps coming, even slowly, is fine.
    let mut s = TcpStream::connect(srv.http()).await.expect("connect");
    let body = br#"{"id": "slow-but-steady"}"#;
    s.write_all(
        format!(
            "POST /api/v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    for part in body.chunks(8) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(part).await.expect("write");
    }
    let mut raw = Vec::new();
    within("the answer", s.read_to_end(&mut raw))
        .await
        .expect("read");
    assert_eq!(parse_http(&raw).status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_bounded() {
    let srv = TestServer::with(|s| s.http.max_connections_per_ip = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(srv.http()).await.expect("connect");
        // A full exchange, so the server has surely accepted it.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 512];
        let n = within("response", s.read(&mut buf)).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // The fourth is closed without an answer.
    let mut s = TcpStream::connect(srv.http()).await.expect("connect");
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut raw = Vec::new();
    let _ = within("close", s.read_to_end(&mut raw)).await;
    assert!(raw.is_empty(), "{}", String::from_utf8_lossy(&raw));
    // One closes: there is room again (and the refusal was counted).
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        let s = TcpStream::connect(srv.http()).await.expect("connect");
        let mut s = s;
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut raw = Vec::new();
        let _ = within("response", s.read_to_end(&mut raw)).await;
        if raw.starts_with(b"HTTP/1.1 200") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a connection is accepted once one closed");
    drop(held);
    let refused = within("the metric", async {
        loop {
            let mut s = TcpStream::connect(srv.http()).await.expect("connect");
            let _ = s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut raw = Vec::new();
            let _ = s.read_to_end(&mut raw).await;
            if raw.starts_with(b"HTTP/1.1 200") {
                break metric(
                    &parse_http(&raw).body,
                    "m2mhub_http_connections_refused_total",
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(refused >= 1, "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_per_token_are_bounded() {
    let srv = TestServer::with(|s| {
        secure(s);
        s.http.max_requests_per_token = 2;
    })
    .await;
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/devices", Some(json!({"id": "poller"})), 201)
        .await;
    let secret = admin
        .expect("POST", "/devices/poller/tokens", Some(json!({})), 201)
        .await["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    let http = srv.http();
    // Two command polls hold the device token's two slots: each is seen
    // waiting (no answer yet) before the next request.
    let mut polls = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(http).await.expect("connect");
        s.write_all(
            format!(
                "GET /api/v1/devices/poller/commands/next?wait=30s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let mut buf = [0u8; 256];
        let early = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(early.is_err(), "the poll answered at once: {early:?}");
        polls.push(s);
    }
    let poll = format!(
        "GET /api/v1/devices/poller/commands/next?wait=1ms\nAuthorization: Bearer {secret}"
    );
    let r = send(http, &poll, b"").await;
    assert_problem(&r, 429, "http.max_requests_per_token");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Other tokens are not affected.
    assert_eq!(admin.call("GET", "/devices/poller", None).await.status, 200);
    assert_eq!(
        scrape(http, "m2mhub_http_requests_refused_per_token_total").await,
        1
    );
    // When the polls go away, so do their slots.
    drop(polls);
    let mut ok = false;
    for _ in 0..100 {
        if send(http, &poll, b"").await.status == 204 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the token's slots were given back");
}

fn assert_security_headers(r: &HttpResponse, what: &str) {
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{what}");
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{what}");
    assert!(
        r.header("content-security-policy")
            .is_some_and(|c| c.contains("frame-ancestors 'none'")),
        "{what}: {:?}",
        r.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_security_headers_and_hsts_only_over_https() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    for (path, auth) in [
        ("/", false),
        ("/console/app.js", false),
        ("/healthz", false),
        ("/api/v1/", false),
        ("/api/v1/devices", true),
        ("/api/v1/devices", false),
        ("/api/v1/nowhere", false),
        ("/metrics", false),
    ] {
        let r = if auth {
            http_get_as(srv.http(), path, &token).await
        } else {
            http_get(srv.http(), path).await
        };
        assert_security_headers(&r, path);
        assert_eq!(r.header("strict-transport-security"), None, "{path}");
        assert!(r.header("access-control-allow-origin").is_none());
    }
    // The console keeps its own policy (its scripts and styles are its own
    // files); the API's is the strictest.
    let console = http_get(srv.http(), "/").await;
    assert_eq!(
        console.header("content-security-policy"),
        Some(m2mhub_api_console_csp())
    );
    let api = http_get(srv.http(), "/api/v1/").await;
    assert_eq!(
        api.header("content-security-policy"),
        Some("default-src 'none'; frame-ancestors 'none'")
    );

    // Over HTTPS, HSTS as well.
    let https = srv.get().https_addr.expect("HTTPS listener");
    let ca = http_get(srv.http(), "/api/v1/ca").await.body;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("root");
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    for path in ["/healthz", "/api/v1/", "/"] {
        let r = within("HTTPS", async {
            let tcp = TcpStream::connect(https).await.expect("connect");
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await
                .expect("handshake");
            exchange(tls, &format!("GET {path}"), b"").await
        })
        .await;
        assert_security_headers(&r, path);
        assert_eq!(
            r.header("strict-transport-security"),
            Some("max-age=31536000"),
            "{path}"
        );
    }
}

/// The console's policy, as `crates/api/src/console.rs` states it.
/// The console's policy with the default tile server (`console.tile_url`),
/// the one origin besides its own it may load images from.
fn m2mhub_api_console_csp() -> &'static str {
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' https://tile.openstreetmap.org; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_closed_by_default_and_open_only_to_configured_origins() {
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /api/v1/devices\nOrigin: {origin}\nAccess-Control-Request-Method: POST\nAccess-Control-Request-Headers: authorization, content-type"
        )
    };
    // Closed by default: no CORS header, simple request or preflight.
    let srv = TestServer::start().await;
    let r = send(
        srv.http(),
        "GET /api/v1/\nOrigin: https://app.example.com",
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("access-control-allow-origin").is_none(),
        "{:?}",
        r.headers
    );
    let r = send(srv.http(), &preflight("https://app.example.com"), b"").await;
    assert!(
        r.header("access-control-allow-origin").is_none(),
        "{:?}",
        r.headers
    );
    assert!(r.header("access-control-allow-methods").is_none());
    drop(srv);

    // One configured origin: it may, others may not.
    let srv =
        TestServer::with(|s| s.http.cors_origins = vec!["https://app.example.com".into()]).await;
    let r = send(
        srv.http(),
        "GET /api/v1/\nOrigin: https://app.example.com",
        b"",
    )
    .await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(r.header("vary").is_some_and(|v| v.contains("origin")));
    let r = send(srv.http(), &preflight("https://app.example.com"), b"").await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(r
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("POST")));
    assert!(r
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("authorization")));
    assert_security_headers(&r, "preflight");
    for evil in [
        "https://evil.example.com",
        "https://app.example.com.evil.net",
    ] {
        let r = send(srv.http(), &preflight(evil), b"").await;
        assert!(r.header("access-control-allow-origin").is_none(), "{evil}");
        assert!(r.header("access-control-allow-methods").is_none(), "{evil}");
        let r = send(srv.http(), &format!("GET /api/v1/\nOrigin: {evil}"), b"").await;
        assert!(r.header("access-control-allow-origin").is_none(), "{evil}");
    }
}

/// Found by fuzzing: a policy body that is JSON but not an object made the
/// handler panic (the connection dropped with no answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_is_not_a_json_object_is_refused_not_a_crash() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    for body in [json!([]), json!(1e300), json!("x"), json!(true)] {
        let r = admin
            .call("PUT", "/tenants/default/policies/p1", Some(body.clone()))
            .await;
        assert_problem(&r, 422, "a policy is a JSON object");
    }
    admin
        .expect(
            "PUT",
            "/tenants/default/policies/p1",
            Some(json!({"group": null, "publish": [], "subscribe": []})),
            200,
        )
        .await;
}
