//! Remote diagnostics against the real server: an operator asks a device
//! (a real MQTT client) for a bundle, the device gets `diagnostics.upload`
//! with a one-time URL and PUTs the bundle there over a raw socket; the
//! bundle lists and downloads with the same bytes and SHA-256, the URL
//! works once, an oversized body is refused with nothing kept, an expired
//! URL is refused, another tenant sees nothing, and every step is audited.

use crate::common::*;
use bytes::Bytes;
use m2mhub_identity::{NewDevice, Role};
use mqtt_codec::{Packet, Protocol, Publish, QoS};
use serde_json::{json, Value};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Status, headers and raw body of one HTTP/1.1 exchange.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Body framing of a request: none, `Content-Length`, or chunked.
enum Framing<'a> {
    Empty,
    Length(&'a [u8]),
    Chunked(&'a [u8]),
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    framing: Framing<'_>,
) -> RawResponse {
    within(&format!("{method} {path}"), async {
        let mut s = TcpStream::connect(addr).await.expect("connect HTTP");
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let mut body = Vec::new();
        match framing {
            Framing::Empty => {}
            Framing::Length(b) => {
                head.push_str(&format!("Content-Length: {}\r\n", b.len()));
                body.extend_from_slice(b);
            }
            Framing::Chunked(b) => {
                head.push_str("Transfer-Encoding: chunked\r\n");
                for c in b.chunks(100) {
                    body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    body.extend_from_slice(c);
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\n\r\n");
            }
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.expect("write head");
        // The server may answer (413) and close before reading it all.
        let _ = s.write_all(&body).await;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("HTTP header end");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        }) {
            body = dechunk(&body);
        }
        RawResponse {
            status,
            headers,
            body,
        }
    })
    .await
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 4 + size..];
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A registered device and its token secret.
async fn device(admin: &Api, id: &str) -> String {
    registered_device(admin, id, None).await
}

/// The device, connected with its token and subscribed to its commands.
async fn online(srv: &TestServer, id: &str, secret: &str) -> Raw {
    let mut c = connect(Protocol::V5, id);
    c.username = Some(id.into());
    c.password = Some(Bytes::copy_from_slice(secret.as_bytes()));
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), c).await;
    d.subscribe(1, &format!("devices/{id}/commands"), QoS::AtLeastOnce)
        .await;
    d
}

/// The next command the device receives, as JSON.
async fn next_command(d: &mut Raw) -> Value {
    let p: Publish = d
        .recv_where("a command", |p| match p {
            Packet::Publish(p) if p.topic.ends_with("/commands") => Some(p.clone()),
            _ => None,
        })
        .await;
    if let Some(id) = p.packet_id {
        d.puback(id).await;
    }
    serde_json::from_slice(&p.payload).expect("a JSON command")
}

/// Ask for a bundle; the request and the upload path the device was sent.
async fn request(admin: &Api, d: &mut Raw, id: &str) -> (Value, String) {
    let req = admin
        .expect(
            "POST",
            &format!("/devices/{id}/diagnostics"),
            Some(json!({"reason": "slow responses"})),
            202,
        )
        .await;
    assert_eq!(req["status"], "requested");
    assert!(req.get("token_hash").is_none(), "{req}");
    let cmd = next_command(d).await;
    assert_eq!(cmd["name"], "diagnostics.upload");
    assert_eq!(cmd["id"], req["command_id"]);
    let params = &cmd["params"];
    assert_eq!(params["bundle_id"], req["id"]);
    assert_eq!(params["expires_at"], req["expires_ms"]);
    let url = params["url"].as_str().expect("url");
    // Absolute, from the Host the operator's request was addressed to.
    let path = url
        .strip_prefix("http://x")
        .unwrap_or_else(|| panic!("{url}"))
        .to_string();
    assert!(path.starts_with("/api/v1/diagnostics/upload/"), "{path}");
    (req, path)
}

#[tokio::test]
async fn request_upload_list_download_once_and_isolated() {
    let srv = TestServer::with(|s| {
        secure(s);
        s.diagnostics.max_bundle_bytes = 1000;
    })
    .await;
    let admin = Api::admin(&srv);
    let secret = device(&admin, "probe").await;
    let mut d = online(&srv, "probe", &secret).await;

    let (req, path) = request(&admin, &mut d, "probe").await;
    assert_eq!(
        srv.get()
            .fleet
            .get_command(req["command_id"].as_str().expect("id"))
            .expect("command")
            .params["max_bytes"],
        1000
    );
    let bundle_id = req["id"].as_str().expect("id").to_string();
    // Not all UTF-8, and streamed in pieces.
    let mut bundle = b"{\"uptime_s\": 42}\n".to_vec();
    bundle.extend((0..=255u8).cycle().take(600));
    let up = exchange(srv.http(), "PUT", &path, None, Framing::Chunked(&bundle)).await;
    assert_eq!(up.status, 200, "{}", String::from_utf8_lossy(&up.body));
    let sha = sha256_hex(&bundle);
    assert_eq!(up.json()["sha256"], sha.as_str());
    assert_eq!(up.json()["size"], bundle.len());

    // Once only.
    let again = exchange(srv.http(), "PUT", &path, None, Framing::Length(b"x")).await;
    assert_eq!(
        again.status,
        410,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    let unknown = exchange(
        srv.http(),
        "PUT",
        &format!("/api/v1/diagnostics/upload/{}", "ab".repeat(32)),
        None,
        Framing::Length(b"x"),
    )
    .await;
    assert_eq!(unknown.status, 404);

    let list = admin
        .expect("GET", "/devices/probe/diagnostics", None, 200)
        .await;
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["status"], "uploaded");
    assert_eq!(items[0]["sha256"], sha.as_str());
    assert_eq!(items[0]["reason"], "slow responses");
    assert_eq!(items[0]["requested_by"], "admin");
    let content = format!("/api/v1/devices/probe/diagnostics/{bundle_id}/content");
    let got = exchange(
        srv.http(),
        "GET",
        &content,
        Some(&admin.token),
        Framing::Empty,
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert!(got
        .header("content-disposition")
        .is_some_and(|v| v.starts_with("attachment;")));
    assert_eq!(got.body, bundle);
    assert_eq!(sha256_hex(&got.body), sha);

    // Too large, declared (Content-Length) or streamed (chunked): 413, the
    // request fails and nothing is kept.
    for framing in ["length", "chunked"] {
        let (req, path) = request(&admin, &mut d, "probe").await;
        let big = vec![7u8; 1001];
        let r = exchange(
            srv.http(),
            "PUT",
            &path,
            None,
            if framing == "length" {
                Framing::Length(&big)
            } else {
                Framing::Chunked(&big)
            },
        )
        .await;
        assert_eq!(
            r.status,
            413,
            "{framing}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let id = req["id"].as_str().expect("id");
        let b = admin
            .expect(
                "GET",
                &format!("/devices/probe/diagnostics/{id}"),
                None,
                200,
            )
            .await;
        assert_eq!(b["status"], "failed", "{framing}");
        let c = admin
            .call(
                "GET",
                &format!("/devices/probe/diagnostics/{id}/content"),
                None,
            )
            .await;
        assert_eq!(c.status, 409, "{framing}");
        let dir = srv.settings.data_dir.join("diagnostics");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, std::slice::from_ref(&bundle_id), "{framing}");
    }

    // Another tenant's operator sees none of it.
    admin
        .expect("POST", "/tenants", Some(json!({"id": "acme"})), 201)
        .await;
    let other = Api::user(&srv, "eve", Role::Operator, "acme");
    for (method, path) in [
        ("GET", "/devices/probe/diagnostics".to_string()),
        ("POST", "/devices/probe/diagnostics".to_string()),
        ("GET", format!("/devices/probe/diagnostics/{bundle_id}")),
        (
            "GET",
            format!("/devices/probe/diagnostics/{bundle_id}/content"),
        ),
        ("DELETE", format!("/devices/probe/diagnostics/{bundle_id}")),
    ] {
        let r = other.call(method, &path, None).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }
    // A viewer of the right tenant reads but may not ask.
    let viewer = Api::user(&srv, "vic", Role::Viewer, "default");
    viewer
        .expect("GET", "/devices/probe/diagnostics", None, 200)
        .await;
    let r = viewer
        .call("POST", "/devices/probe/diagnostics", Some(json!({})))
        .await;
    assert_eq!(r.status, 403);

    admin
        .expect(
            "DELETE",
            &format!("/devices/probe/diagnostics/{bundle_id}"),
            None,
            204,
        )
        .await;
    let r = admin
        .call(
            "GET",
            &format!("/devices/probe/diagnostics/{bundle_id}"),
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert!(!srv
        .settings
        .data_dir
        .join("diagnostics")
        .join(&bundle_id)
        .exists());

    let audit = admin.expect("GET", "/audit?limit=1000", None, 200).await;
    let actions: Vec<(String, String)> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|r| {
            r["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("diagnostics."))
        })
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_string(),
                r["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let count = |a: &str, o: &str| actions.iter().filter(|(x, y)| x == a && y == o).count();
    assert_eq!(count("diagnostics.request", "ok"), 3, "{actions:?}");
    assert_eq!(count("diagnostics.upload", "ok"), 1, "{actions:?}");
    assert_eq!(count("diagnostics.upload", "denied"), 2, "{actions:?}");
    assert_eq!(count("diagnostics.download", "ok"), 1, "{actions:?}");
    assert_eq!(count("diagnostics.delete", "ok"), 1, "{actions:?}");
}

#[tokio::test]
async fn expired_url_is_refused_and_open_requests_are_limited() {
    let srv = TestServer::with(|s| {
        secure(s);
        s.diagnostics.upload_url_ttl_s = 1;
    })
    .await;
    let admin = Api::admin(&srv);
    srv.get()
        .registry
        .create_device(NewDevice {
            id: Some("quiet".into()),
            tenant: "default".into(),
            ..Default::default()
        })
        .expect("device");
    // Nobody listening: the command is still recorded, the request made.
    let mut paths = Vec::new();
    for _ in 0..3 {
        let req = admin
            .expect("POST", "/devices/quiet/diagnostics", None, 202)
            .await;
        let cmd = srv
            .get()
            .fleet
            .get_command(req["command_id"].as_str().expect("id"))
            .expect("command");
        let url = cmd.params["url"].as_str().expect("url").to_string();
        paths.push(url.trim_start_matches("http://x").to_string());
    }
    let r = admin.call("POST", "/devices/quiet/diagnostics", None).await;
    assert_problem(&r, 409, "waiting for an upload");

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = exchange(srv.http(), "PUT", &paths[0], None, Framing::Length(b"late")).await;
    assert_eq!(r.status, 410, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("expired"));
    let list = admin
        .expect("GET", "/devices/quiet/diagnostics", None, 200)
        .await;
    assert!(list["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|b| b["status"] == "expired"));
    // Expired requests no longer count against the limit.
    admin
        .expect("POST", "/devices/quiet/diagnostics", None, 202)
        .await;
}

/// `m2mhub sim` devices answer `diagnostics.upload` by uploading a bundle;
/// `m2mhub diagnostics request --wait`, `list`, `download` and `delete`
/// drive it from the command line.
#[tokio::test]
async fn simulated_device_uploads_and_the_cli_downloads() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    let claim = api(
        &srv,
        &token,
        "POST",
        "/claim-tokens",
        Some(json!({"name": "diagnostics sim", "max_uses": 1})),
    )
    .await;
    let secret = claim["secret"].as_str().expect("secret").to_string();
    let state_dir = srv.dir.path().join("sim-state");
    let profile = srv.dir.path().join("cli-profile.toml");
    let env: Vec<(String, String)> = vec![
        ("M2MHUB_PROFILE".into(), profile.display().to_string()),
        ("M2MHUB_SERVER".into(), format!("http://{}", srv.http())),
        ("M2MHUB_TOKEN".into(), token.clone()),
    ];
    let run = |args: Vec<String>| {
        let env = env.clone();
        tokio::spawn(async move {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            run_bin(&a, &e).await
        })
    };
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let sim = run(strings(&[
        "sim",
        "--profile",
        "meter",
        "--count",
        "1",
        "--interval",
        "200ms",
        "--duration",
        "8s",
        "--mqtt",
        &srv.mqtt().to_string(),
        "--state-dir",
        state_dir.to_str().expect("utf-8 path"),
        "--claim-token",
        &secret,
    ]));
    // A reading means the device has subscribed to its commands.
    let id = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let devices = srv
                .get()
                .registry
                .list_devices(&m2mhub_identity::DeviceFilter::default())
                .expect("devices");
            if let Some(d) = devices.first() {
                let latest = api(
                    &srv,
                    &token,
                    "GET",
                    &format!("/devices/{}/telemetry", d.id),
                    None,
                )
                .await;
                if latest["items"].as_array().is_some_and(|i| !i.is_empty()) {
                    break d.id.clone();
                }
            }
            assert!(std::time::Instant::now() < deadline, "no simulated reading");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };

    let (code, out, err) = run(strings(&[
        "diagnostics",
        "request",
        &id,
        "--reason",
        "field report",
        "--wait",
        "--json",
    ]))
    .await
    .expect("cli");
    assert_eq!(code, 0, "{err}{out}");
    let b: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(b["status"], "uploaded", "{b}");
    let bundle_id = b["id"].as_str().expect("id").to_string();

    let file = srv.dir.path().join("bundle.json");
    let (code, out, err) = run(strings(&[
        "diagnostics",
        "download",
        &id,
        &bundle_id,
        "-o",
        file.to_str().expect("utf-8 path"),
    ]))
    .await
    .expect("cli");
    assert_eq!(code, 0, "{err}{out}");
    let bytes = std::fs::read(&file).expect("downloaded");
    assert_eq!(Some(sha256_hex(&bytes).as_str()), b["sha256"].as_str());
    let doc: Value = serde_json::from_slice(&bytes).expect("a JSON bundle");
    assert_eq!(doc["device_id"], id.as_str());
    assert!(
        doc["counters"]["readings_sent"].as_u64() >= Some(1),
        "{doc}"
    );
    assert!(doc["last_reading"].is_object(), "{doc}");

    // The device answered the command once it had uploaded.
    let commands = api(
        &srv,
        &token,
        "GET",
        &format!("/devices/{id}/commands"),
        None,
    )
    .await;
    let cmd = &commands["items"][0];
    assert_eq!(cmd["name"], "diagnostics.upload");
    let cmd_id = cmd["id"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let c = api(&srv, &token, "GET", &format!("/commands/{cmd_id}"), None).await;
        if c["status"] == "answered" {
            assert_eq!(c["response"]["status"], "ok", "{c}");
            assert_eq!(c["response"]["bundle_id"], bundle_id.as_str(), "{c}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not answered: {c}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let (code, out, err) = run(strings(&["diagnostics", "list", &id]))
        .await
        .expect("cli");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&bundle_id) && out.contains("uploaded"),
        "{out}"
    );
    let (code, _, err) = run(strings(&["diagnostics", "delete", &id, &bundle_id]))
        .await
        .expect("cli");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(strings(&["diagnostics", "show", &id, &bundle_id]))
        .await
        .expect("cli");
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let _ = sim.await;
}
