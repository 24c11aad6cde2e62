//! HTTP devices against the real server: a device posts telemetry with its
//! own token (Bearer or Basic) or, over HTTPS, its client certificate; the
//! points are stored and routed like an MQTT publish; bad input gets a
//! problem document naming the fix; commands are long-polled and answered;
//! failed authentications ban the address as they would over MQTT.

use crate::common::*;
use base64::Engine;
use mqtt_codec::QoS;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use tokio_rustls::rustls::pki_types::ServerName;

/// One HTTP/1.1 request over any stream, with raw headers and body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HttpResponse {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).await.expect("write request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read response");
    parse_http(&raw)
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HttpResponse {
    within_for(
        Duration::from_secs(90),
        &format!("{method} {path}"),
        async {
            let s = TcpStream::connect(addr).await.expect("connect HTTP");
            exchange(s, method, path, headers, body).await
        },
    )
    .await
}

fn bearer(secret: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {secret}"))
}

fn basic(user: &str, secret: &str) -> (&'static str, String) {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
    ("Authorization", format!("Basic {b}"))
}

fn json_ct() -> (&'static str, String) {
    ("Content-Type", "application/json".to_string())
}

async fn post_telemetry(
    addr: SocketAddr,
    id: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HttpResponse {
    send(
        addr,
        "POST",
        &format!("/api/v1/devices/{id}/telemetry"),
        headers,
        body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_posts_telemetry_with_its_token_and_it_is_stored_and_routed() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let secret = registered_device(&admin, "pump-1", None).await;
    let other = registered_device(&admin, "pump-2", None).await;
    let http = srv.http();

    // The device also listens to its own telemetry topic over MQTT: an
    // HTTP reading is routed exactly like a published one.
    let mut c = v5("pump-1");
    c.username = Some("pump-1".into());
    c.password = Some(bytes::Bytes::from(secret.clone()));
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), c).await;
    sub.subscribe(1, "devices/pump-1/telemetry", QoS::AtMostOnce)
        .await;

    let r = post_telemetry(
        http,
        "pump-1",
        &[bearer(&secret), json_ct()],
        br#"{"pressure": 2.5}"#,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let got = sub.recv_publish().await;
    assert_eq!(text(&got), r#"{"pressure": 2.5}"#);
    let latest = admin
        .expect("GET", "/devices/pump-1/telemetry", None, 200)
        .await;
    assert!(latest.to_string().contains("pressure"), "stored: {latest}");

    // Basic with the device id as user name; SenML without a declared
    // type is sniffed.
    let r = post_telemetry(
        http,
        "pump-1",
        &[basic("pump-1", &secret)],
        br#"[{"n":"flow","v":7}]"#,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);

    // The batch form: an array of readings, each with its own time.
    let t0 = m2mhub_identity::now_ms() - 60_000;
    let batch: Vec<Value> = (0..5)
        .map(|i| json!({"ts": t0 + i * 1000, "rpm": 1000 + i}))
        .collect();
    let r = post_telemetry(
        http,
        "pump-1",
        &[bearer(&secret), json_ct()],
        json!(batch).to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let raw = admin
        .expect(
            "GET",
            &format!(
                "/devices/pump-1/telemetry/rpm?from={}&to={}",
                t0,
                t0 + 10_000
            ),
            None,
            200,
        )
        .await;
    let points = raw["points"].as_array().expect("points");
    assert_eq!(points.len(), 5, "{raw}");

    // Wrong or missing credentials, someone else's, an operator's token.
    let r = post_telemetry(http, "pump-1", &[bearer("nope"), json_ct()], b"1").await;
    assert_problem(&r, 401, "wrong secret");
    let r = post_telemetry(http, "pump-1", &[json_ct()], b"1").await;
    assert_problem(&r, 401, "authenticates with its token");
    let r = post_telemetry(http, "pump-1", &[basic("pump-2", &other)], b"1").await;
    assert_problem(&r, 403, "does not belong");
    let r = post_telemetry(http, "pump-1", &[bearer(&other)], b"1").await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post_telemetry(http, "pump-1", &[bearer(&srv.admin_token())], b"1").await;
    assert_eq!(
        r.status, 401,
        "an operator token is not a device credential"
    );
    let r = post_telemetry(
        http,
        "pump-1",
        &[("Authorization", "Digest x".into())],
        b"1",
    )
    .await;
    assert_problem(&r, 401, "Bearer");

    // Bad input: a clear problem, nothing stored, the event kept.
    let r = post_telemetry(http, "pump-1", &[bearer(&secret), json_ct()], b"{oops").await;
    assert_problem(&r, 400, "bytes");
    assert!(r.body.contains("undecodable-payload"), "{}", r.body);
    let r = post_telemetry(
        http,
        "pump-1",
        &[bearer(&secret), ("Content-Type", "image/png".into())],
        b"\x89PNG",
    )
    .await;
    assert_problem(&r, 415, "application/senml+cbor");
    let r = post_telemetry(http, "pump-1", &[bearer(&secret), json_ct()], b"").await;
    assert_problem(&r, 400, "no body");
    let too_big = vec![b'1'; 1024 * 1024 + 1];
    let r = post_telemetry(http, "pump-1", &[bearer(&secret)], &too_big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let events = admin
        .expect("GET", "/devices/pump-1/events?kind=decode_error", None, 200)
        .await;
    assert!(
        events.to_string().contains("image/png"),
        "bad input is kept as a device event: {events}"
    );

    // Successes are audited once per device and address, refusals always
    // (the audit queue is written in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = admin
            .expect("GET", "/audit?action=http.auth&limit=1000", None, 200)
            .await;
        let items = audit["items"].as_array().expect("items").clone();
        let ok = items.iter().filter(|r| r["outcome"] == "ok").count();
        let refused = items.len() - ok;
        if refused >= 3 {
            assert_eq!(
                ok, 1,
                "one success audited per device and address: {items:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "refusals not audited: {items:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_long_polls_its_commands_and_answers_them() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let secret = registered_device(&admin, "valve-1", None).await;
    let other = registered_device(&admin, "valve-2", None).await;
    let http = srv.http();
    let poll = |wait: &'static str, secret: String| async move {
        send(
            http,
            "GET",
            &format!("/api/v1/devices/valve-1/commands/next?wait={wait}"),
            &[bearer(&secret)],
            b"",
        )
        .await
    };

    // Nothing waits: 204 after the wait.
    let t = Instant::now();
    let r = poll("300ms", secret.clone()).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(t.elapsed() >= Duration::from_millis(250));

    // A command sent before the poll is there at once.
    let sent = admin
        .expect(
            "POST",
            "/devices/valve-1/commands",
            Some(json!({"name": "close", "params": {"percent": 40}})),
            202,
        )
        .await;
    let cid = sent["id"].as_str().expect("id").to_string();
    let r = poll("5s", secret.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let cmd = r.json();
    assert_eq!(cmd["id"], json!(cid));
    assert_eq!(cmd["name"], "close");
    assert_eq!(cmd["params"]["percent"], 40);
    let status = admin
        .expect("GET", &format!("/commands/{cid}"), None, 200)
        .await;
    assert_eq!(status["status"], "delivered");

    // A poll that waits gets the command the moment it is sent.
    let waiting = tokio::spawn(poll("30s", secret.clone()));
    // The poll must be parked before the command is sent for this to test
    // the wake-up; a poll that has not arrived yet still finds it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let sent = admin
        .expect(
            "POST",
            "/devices/valve-1/commands",
            Some(json!({"name": "open"})),
            202,
        )
        .await;
    let r = waiting.await.expect("poll task");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], sent["id"]);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "woken by the command, not by the re-check: {:?}",
        t.elapsed()
    );
    let open_id = sent["id"].as_str().expect("id").to_string();

    // The answer.
    let answer = |cid: String, secret: String, body: Value| async move {
        send(
            http,
            "POST",
            &format!("/api/v1/devices/valve-1/commands/{cid}/response"),
            &[bearer(&secret), json_ct()],
            body.to_string().as_bytes(),
        )
        .await
    };
    let r = answer(cid.clone(), secret.clone(), json!({"closed_to": 40})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let done = admin
        .expect("GET", &format!("/commands/{cid}"), None, 200)
        .await;
    assert_eq!(done["status"], "answered");
    assert_eq!(done["response"]["closed_to"], 40);
    let r = answer(cid.clone(), secret.clone(), json!({})).await;
    assert_problem(&r, 409, "already answered");
    let r = answer(
        open_id.clone(),
        secret.clone(),
        json!({"status": "failed", "error": "stuck"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let failed = admin
        .expect("GET", &format!("/commands/{open_id}"), None, 200)
        .await;
    assert_eq!(failed["status"], "failed");

    // Another device cannot see or answer valve-1's commands.
    let theirs = admin
        .expect(
            "POST",
            "/devices/valve-1/commands",
            Some(json!({"name": "flush"})),
            202,
        )
        .await;
    let r = send(
        http,
        "POST",
        &format!(
            "/api/v1/devices/valve-2/commands/{}/response",
            theirs["id"].as_str().expect("id")
        ),
        &[bearer(&other), json_ct()],
        b"{}",
    )
    .await;
    assert_problem(&r, 404, "no command");
    let r = send(
        http,
        "GET",
        "/api/v1/devices/valve-2/commands/next",
        &[bearer(&other)],
        b"",
    )
    .await;
    assert_eq!(r.status, 204, "valve-2 has no command: {}", r.body);

    // Bad input.
    let r = poll("90s", secret.clone()).await;
    assert_problem(&r, 400, "at most 60");
    let r = answer("cmd-0000000000000000".into(), secret.clone(), json!({})).await;
    assert_problem(&r, 404, "no command");
    let r = send(
        http,
        "POST",
        &format!("/api/v1/devices/valve-1/commands/{open_id}/response"),
        &[bearer(&secret), json_ct()],
        b"{not json",
    )
    .await;
    assert_problem(&r, 400, "JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_a_device_token_over_http_bans_the_address() {
    let srv = TestServer::with(|s| {
        secure(s);
        s.mqtt.auth_failures_before_ban = 3;
    })
    .await;
    let admin = Api::admin(&srv);
    let secret = registered_device(&admin, "meter-9", None).await;
    let http = srv.http();
    let mut codes = Vec::new();
    for _ in 0..5 {
        let r = post_telemetry(http, "meter-9", &[bearer("guess")], b"1").await;
        codes.push(r.status);
    }
    assert_eq!(&codes[..3], &[401, 401, 401], "{codes:?}");
    let r = post_telemetry(http, "meter-9", &[bearer(&secret)], b"1").await;
    assert_problem(&r, 403, "banned");
    // The same ban holds for MQTT from that address.
    let mut c = v5("meter-9");
    c.username = Some("meter-9".into());
    c.password = Some(bytes::Bytes::from(secret));
    let (_, ack) = Raw::connect(srv.mqtt(), c).await;
    assert_eq!(ack.reason_code, mqtt_codec::reason::BANNED);
}

async fn send_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HttpResponse {
    within(&format!("HTTPS {method} {path}"), async {
        let tcp = TcpStream::connect(addr).await.expect("connect HTTPS");
        let name = ServerName::try_from("localhost").expect("name");
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        exchange(tls, method, path, headers, body).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_a_device_authenticates_with_its_client_certificate() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let https = srv.get().https_addr.expect("the HTTPS listener");
    admin
        .expect("POST", "/devices", Some(json!({"id": "gw-1"})), 201)
        .await;
    let (csr, key) = m2mhub_pki::make_csr("gw-1").expect("CSR");
    let issued = admin
        .expect(
            "POST",
            "/devices/gw-1/certificates",
            Some(json!({"csr": csr})),
            201,
        )
        .await;
    let cert = issued["certificate"].as_str().expect("certificate");
    let ca = issued["ca"].as_str().expect("ca").to_string();
    let fingerprint = issued["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_string();
    let with_cert = client_tls_config(&ca, Some((cert, &key)));
    let without = client_tls_config(&ca, None);

    // The operator API works over HTTPS without a client certificate.
    let r = send_tls(
        https,
        without.clone(),
        "GET",
        "/api/v1/devices/gw-1",
        &[("Authorization", format!("Bearer {}", srv.admin_token()))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The certificate alone authenticates the device.
    let r = send_tls(
        https,
        with_cert.clone(),
        "POST",
        "/api/v1/devices/gw-1/telemetry",
        &[json_ct()],
        br#"{"temp": 31.5}"#,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let latest = admin
        .expect("GET", "/devices/gw-1/telemetry", None, 200)
        .await;
    assert!(latest.to_string().contains("temp"), "{latest}");
    // ...but only for itself.
    admin
        .expect("POST", "/devices", Some(json!({"id": "gw-2"})), 201)
        .await;
    let r = send_tls(
        https,
        with_cert.clone(),
        "POST",
        "/api/v1/devices/gw-2/telemetry",
        &[json_ct()],
        b"1",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // No certificate, no token: refused.
    let r = send_tls(
        https,
        without,
        "POST",
        "/api/v1/devices/gw-1/telemetry",
        &[json_ct()],
        b"1",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);

    // Revoked: refused.
    admin
        .expect(
            "DELETE",
            &format!("/devices/gw-1/certificates/{fingerprint}"),
            None,
            204,
        )
        .await;
    let r = send_tls(
        https,
        with_cert,
        "POST",
        "/api/v1/devices/gw-1/telemetry",
        &[json_ct()],
        b"1",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_devices_stay_inside_their_tenant() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    admin
        .expect(
            "POST",
            "/tenants",
            Some(json!({"id": "blue", "name": "Blue"})),
            201,
        )
        .await;
    let red = registered_device(&admin, "red-1", None).await;
    let _blue = registered_device(&admin, "blue-1", Some("blue")).await;
    let http = srv.http();
    // A red device's secret does not open a blue device's routes, in any form.
    for h in [bearer(&red), basic("red-1", &red), basic("blue-1", &red)] {
        let r = post_telemetry(http, "blue-1", &[h.clone(), json_ct()], b"1").await;
        assert!(matches!(r.status, 401 | 403), "{h:?}: {}", r.body);
        let r = send(
            http,
            "GET",
            "/api/v1/devices/blue-1/commands/next",
            &[h],
            b"",
        )
        .await;
        assert!(matches!(r.status, 401 | 403), "{}", r.body);
    }
    let latest = admin
        .expect("GET", "/devices/blue-1/telemetry", None, 200)
        .await;
    assert!(
        !latest.to_string().contains("value"),
        "nothing was stored for blue-1: {latest}"
    );
}
