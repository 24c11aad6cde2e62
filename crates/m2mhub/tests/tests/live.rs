//! Live updates (`/api/v1/live`, server-sent events) and the connection
//! history, against the real server: a device connects with its token,
//! publishes, disconnects; an operator's stream sees each step, and the
//! device's events keep the history.

use crate::common::*;
use bytes::Bytes;
use mqtt_codec::{Connect, QoS};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A server-sent-events client over HTTP/1.1 with chunked transfer coding,
/// written out here so the test sees exactly what a browser gets.
struct Sse {
    reader: BufReader<TcpStream>,
    text: String,
}

impl Sse {
    /// Open `path` with `token`: the status and headers, and the stream if 200.
    async fn open(addr: SocketAddr, path: &str, token: &str) -> (u16, Vec<(String, String)>, Sse) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        within("status line", reader.read_line(&mut line))
            .await
            .expect("read");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            within("headers", reader.read_line(&mut line))
                .await
                .expect("read");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        (
            status,
            headers,
            Sse {
                reader,
                text: String::new(),
            },
        )
    }

    /// Read one chunk of the body into `text`.
    async fn read_chunk(&mut self) {
        let mut size = String::new();
        self.reader.read_line(&mut size).await.expect("chunk size");
        let n = usize::from_str_radix(size.trim(), 16)
            .unwrap_or_else(|_| panic!("chunk size line {size:?}"));
        assert!(n > 0, "the stream ended");
        let mut buf = vec![0u8; n + 2];
        self.reader.read_exact(&mut buf).await.expect("chunk");
        self.text
            .push_str(std::str::from_utf8(&buf[..n]).expect("utf-8"));
    }

    /// The next event (name, JSON data); comments (keep-alives) are skipped.
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut name = "message".to_string();
                let mut data = String::new();
                for l in block.lines() {
                    if let Some(v) = l.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = l.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return (
                    name,
                    serde_json::from_str(&data).expect("event data is JSON"),
                );
            }
            self.read_chunk().await;
        }
    }

    /// Events until one named `name` satisfies `pred`; panics after `wait`.
    async fn until(&mut self, name: &str, wait: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(wait, async {
            loop {
                let (n, v) = self.next().await;
                if n == name && pred(&v) {
                    return v;
                }
                seen.push(format!("{n}: {v}"));
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no matching {name} event in {wait:?}; saw {seen:#?}"))
    }

    /// No event named `name` arrives within `wait`.
    async fn none(&mut self, name: &str, wait: Duration) {
        let r = tokio::time::timeout(wait, async {
            loop {
                let (n, v) = self.next().await;
                if n == name {
                    return v;
                }
            }
        })
        .await;
        if let Ok(v) = r {
            panic!("unexpected {name} event: {v}");
        }
    }
}

/// A registered device of `tenant` with a token: its secret.
async fn device(srv: &TestServer, admin: &str, id: &str, tenant: &str) -> String {
    api(
        srv,
        admin,
        "POST",
        "/devices",
        Some(json!({"id": id, "tenant": tenant})),
    )
    .await;
    let t = api(srv, admin, "POST", &format!("/devices/{id}/tokens"), None).await;
    t["secret"].as_str().expect("secret").to_string()
}

fn creds(id: &str, secret: &str) -> Connect {
    let mut c = v5(id);
    c.username = Some(id.into());
    c.password = Some(Bytes::copy_from_slice(secret.as_bytes()));
    c
}

/// A viewer of `tenant` (None: platform-wide): its API token.
async fn viewer(srv: &TestServer, admin: &str, name: &str, tenant: Option<&str>) -> String {
    let mut body = json!({"username": name, "password": "correct horse battery", "role": "viewer"});
    if let Some(t) = tenant {
        body["tenant"] = json!(t);
    }
    api(srv, admin, "POST", "/users", Some(body)).await;
    let r = http_request(
        srv.http(),
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&json!({"username": name, "password": "correct horse battery"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["token"].as_str().expect("token").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_stream_shows_connections_values_and_alarms_as_they_happen() {
    let srv = TestServer::with(secure).await;
    let admin = srv.admin_token();
    api(&srv, &admin, "POST", "/tenants", Some(json!({"id": "t1"}))).await;
    let secret = device(&srv, &admin, "press-1", "t1").await;
    let token = viewer(&srv, &admin, "watcher", Some("t1")).await;

    let (status, headers, mut sse) =
        Sse::open(srv.http(), "/api/v1/live?device=press-1", &token).await;
    assert_eq!(status, 200);
    let ct = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(ct, Some("text/event-stream"), "{headers:?}");
    let hello = sse.until("hello", WAIT, |_| true).await;
    assert_eq!(hello["device"], "press-1");

    // The device connects: the stream says so, with the address.
    let (mut dev, ack) = Raw::connect(srv.mqtt(), creds("press-1", &secret)).await;
    assert_eq!(ack.reason_code, 0);
    let c = sse.until("connection", WAIT, |v| v["online"] == true).await;
    assert_eq!(c["device"], "press-1");
    assert!(
        c["detail"]
            .as_str()
            .is_some_and(|d| d.contains("127.0.0.1")),
        "{c}"
    );

    // Two readings: the stream carries the newest value of each metric.
    dev.publish(publish(
        "devices/press-1/telemetry",
        QoS::AtLeastOnce,
        1,
        r#"{"temp": 71.5, "state": "run"}"#,
    ))
    .await;
    let t = sse
        .until("telemetry", WAIT, |v| v["values"]["temp"].is_object())
        .await;
    assert_eq!(t["values"]["temp"]["value"], json!(71.5), "{t}");
    assert_eq!(t["values"]["state"]["value"], json!("run"), "{t}");
    dev.publish(publish(
        "devices/press-1/telemetry",
        QoS::AtLeastOnce,
        2,
        r#"{"temp": 88.25}"#,
    ))
    .await;
    sse.until("telemetry", WAIT, |v| {
        v["values"]["temp"]["value"] == json!(88.25)
    })
    .await;

    // An alarm on the device arrives as it is raised.
    srv.get()
        .fleet
        .raise_alarm(
            "t1",
            "press-1",
            "overheating",
            m2mhub_fleet::Severity::Critical,
            json!({"temp": 88.25}),
            None,
        )
        .expect("raise");
    let a = sse.until("alarm", WAIT, |_| true).await;
    assert_eq!(a["change"], "raised");
    assert_eq!(a["alarm"]["type"], "overheating");

    // It disconnects: the stream says so with the reason.
    dev.disconnect().await;
    let c = sse
        .until("connection", WAIT, |v| v["online"] == false)
        .await;
    assert!(
        c["detail"]
            .as_str()
            .is_some_and(|d| d.contains("disconnect")),
        "{c}"
    );

    // The connection history is kept with the device's events.
    srv.get().registry.flush().expect("flush");
    let ev = api(
        &srv,
        &token,
        "GET",
        "/devices/press-1/events?kind=connection",
        None,
    )
    .await;
    let details: Vec<&str> = ev["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["detail"].as_str().expect("detail"))
        .collect();
    assert_eq!(details.len(), 2, "{ev}");
    assert!(
        details[0].starts_with("disconnected"),
        "newest first: {details:?}"
    );
    assert!(
        details[1].starts_with("connected from 127.0.0.1"),
        "{details:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_respect_tenants_and_the_fleet_stream_carries_positions() {
    let srv = TestServer::with(secure).await;
    let admin = srv.admin_token();
    for t in ["t1", "t2"] {
        api(&srv, &admin, "POST", "/tenants", Some(json!({"id": t}))).await;
    }
    let s1 = device(&srv, &admin, "truck-1", "t1").await;
    let s2 = device(&srv, &admin, "truck-2", "t2").await;
    let t2 = viewer(&srv, &admin, "t2-viewer", Some("t2")).await;

    // Another tenant's device: 404, as everywhere in the API.
    let (status, _, _) = Sse::open(srv.http(), "/api/v1/live?device=truck-1", &t2).await;
    assert_eq!(status, 404);
    let (status, _, _) = Sse::open(srv.http(), "/api/v1/live?tenant=t1", &t2).await;
    assert_eq!(status, 404);
    // No token: 401.
    let r = http_get(srv.http(), "/api/v1/live").await;
    assert_eq!(r.status, 401, "{}", r.body);

    // The t2 fleet stream sees its own truck's position, never t1's.
    let (status, _, mut fleet) = Sse::open(srv.http(), "/api/v1/live", &t2).await;
    assert_eq!(status, 200);
    fleet.until("hello", WAIT, |_| true).await;
    let (mut d1, _) = Raw::connect(srv.mqtt(), creds("truck-1", &s1)).await;
    let (mut d2, _) = Raw::connect(srv.mqtt(), creds("truck-2", &s2)).await;
    d1.publish(publish(
        "devices/truck-1/telemetry",
        QoS::AtLeastOnce,
        1,
        r#"{"lat": 48.137, "lon": 11.575}"#,
    ))
    .await;
    d2.publish(publish(
        "devices/truck-2/telemetry",
        QoS::AtLeastOnce,
        1,
        r#"{"lat": 52.52, "lon": 13.405, "speed": 50}"#,
    ))
    .await;
    let p = fleet
        .until("positions", WAIT, |v| {
            v["items"]
                .as_array()
                .is_some_and(|i| i.iter().any(|p| p["device"] == "truck-2"))
        })
        .await;
    let items = p["items"].as_array().expect("items");
    assert!(items.iter().all(|p| p["device"] != "truck-1"), "{p}");
    let mine = items
        .iter()
        .find(|p| p["device"] == "truck-2")
        .expect("truck-2");
    assert_eq!(mine["lat"], json!(52.52));
    assert_eq!(mine["lon"], json!(13.405));
    // t1's truck keeps moving; nothing of it reaches t2's stream.
    d1.publish(publish(
        "devices/truck-1/telemetry",
        QoS::AtLeastOnce,
        2,
        r#"{"lat": 48.2, "lon": 11.6}"#,
    ))
    .await;
    srv.get()
        .fleet
        .raise_alarm(
            "t1",
            "truck-1",
            "geofence",
            m2mhub_fleet::Severity::Major,
            json!({}),
            None,
        )
        .expect("raise");
    let watch = tokio::time::timeout(Duration::from_millis(2500), async {
        loop {
            let (n, v) = fleet.next().await;
            let s = v.to_string();
            assert!(
                !s.contains("truck-1"),
                "t1's device leaked into t2's stream: {n}: {s}"
            );
        }
    });
    let _ = watch.await;
    fleet.none("alarm", Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_list_filters_by_online_state_across_pages() {
    let srv = TestServer::with(secure).await;
    let admin = srv.admin_token();
    let mut secrets = Vec::new();
    for id in ["a-1", "a-2", "a-3", "a-4", "a-5"] {
        secrets.push((id, device(&srv, &admin, id, "default").await));
    }
    // a-2 and a-4 connect; the others stay offline.
    let mut live = Vec::new();
    for (id, secret) in secrets
        .iter()
        .filter(|(id, _)| *id == "a-2" || *id == "a-4")
    {
        let (c, ack) = Raw::connect(srv.mqtt(), creds(id, secret)).await;
        assert_eq!(ack.reason_code, 0);
        live.push(c);
    }
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|d| d["id"].as_str().expect("id").to_string())
            .collect()
    };
    // One per page: the cursor skips the offline devices in between.
    let p1 = api(&srv, &admin, "GET", "/devices?online=true&limit=1", None).await;
    assert_eq!(ids(&p1), ["a-2"], "{p1}");
    assert_eq!(p1["items"][0]["online"], true);
    let next = p1["next"].as_str().expect("next");
    let p2 = api(
        &srv,
        &admin,
        "GET",
        &format!("/devices?online=true&limit=1&after={next}"),
        None,
    )
    .await;
    assert_eq!(ids(&p2), ["a-4"], "{p2}");
    let next = p2["next"].as_str().expect("next");
    let p3 = api(
        &srv,
        &admin,
        "GET",
        &format!("/devices?online=true&limit=1&after={next}"),
        None,
    )
    .await;
    assert_eq!(ids(&p3), Vec::<String>::new(), "{p3}");
    assert!(p3["next"].is_null());
    let off = api(&srv, &admin, "GET", "/devices?online=false", None).await;
    assert_eq!(ids(&off), ["a-1", "a-3", "a-5"], "{off}");
    // Combined with another filter.
    let both = api(
        &srv,
        &admin,
        "GET",
        "/devices?online=false&search=a-3",
        None,
    )
    .await;
    assert_eq!(ids(&both), ["a-3"], "{both}");
    let r = http_get_as(srv.http(), "/api/v1/devices?online=maybe", &admin).await;
    assert_eq!(r.status, 400, "{}", r.body);
    drop(live);
}

/// Shadow changes reach the live streams whoever makes them — the device
/// over MQTT, an operator through the API, a fleet-wide setting — with the
/// writer, the version and what changed; `kinds` keeps a stream to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_changes_reach_the_live_streams_from_every_writer() {
    let srv = TestServer::with(secure).await;
    let admin = srv.admin_token();
    api(&srv, &admin, "POST", "/tenants", Some(json!({"id": "t1"}))).await;
    let secret = device(&srv, &admin, "thermo-1", "t1").await;
    let token = viewer(&srv, &admin, "shadow-watcher", Some("t1")).await;

    let (status, _, _) = Sse::open(srv.http(), "/api/v1/live?kinds=shadows", &token).await;
    assert_eq!(status, 400, "an unknown kind is refused");
    let (status, _, mut dev_stream) = Sse::open(
        srv.http(),
        "/api/v1/live?device=thermo-1&kinds=shadow",
        &token,
    )
    .await;
    assert_eq!(status, 200);
    dev_stream.until("hello", WAIT, |_| true).await;
    let (status, _, mut fleet) = Sse::open(srv.http(), "/api/v1/live?kinds=shadow", &token).await;
    assert_eq!(status, 200);
    fleet.until("hello", WAIT, |_| true).await;

    // The device reports over MQTT.
    let (mut dev, ack) = Raw::connect(srv.mqtt(), creds("thermo-1", &secret)).await;
    assert_eq!(ack.reason_code, 0);
    dev.publish(publish(
        "devices/thermo-1/shadow/update",
        QoS::AtLeastOnce,
        1,
        r#"{"state": {"reported": {"temp": 20.5, "fan": "auto"}}, "clientToken": "r1"}"#,
    ))
    .await;
    let s = dev_stream
        .until("shadow", WAIT, |v| v["writer"] == "device")
        .await;
    assert_eq!(s["device"], "thermo-1");
    assert_eq!(s["tenant"], "t1");
    assert_eq!(s["shadow"], "");
    assert_eq!(s["version"], 1);
    assert_eq!(s["reported"], json!(["fan", "temp"]));
    assert_eq!(s["desired"], json!([]));

    // An operator sets desired through the API: the delta comes along.
    api(
        &srv,
        &admin,
        "PATCH",
        "/devices/thermo-1/shadow",
        Some(json!({"state": {"desired": {"setpoint": 21, "fan": "auto"}}})),
    )
    .await;
    let s = dev_stream
        .until("shadow", WAIT, |v| v["writer"] == "platform")
        .await;
    assert_eq!(s["version"], 2);
    assert_eq!(s["desired"], json!(["fan", "setpoint"]));
    assert_eq!(s["delta"], json!({"setpoint": 21}), "fan is already auto");

    // A fleet-wide setting: the tenant's fleet stream gets it, batched.
    api(
        &srv,
        &admin,
        "POST",
        "/settings",
        Some(json!({"tenant": "t1", "state": {"setpoint": 18.5}})),
    )
    .await;
    let batch = fleet
        .until("shadows", WAIT, |v| {
            v["items"]
                .as_array()
                .is_some_and(|i| i.iter().any(|s| s["version"] == 3))
        })
        .await;
    let s = batch["items"]
        .as_array()
        .and_then(|i| i.iter().find(|s| s["version"] == 3))
        .expect("version 3");
    assert_eq!(s["device"], "thermo-1");
    assert_eq!(s["writer"], "platform");
    assert_eq!(s["delta"], json!({"setpoint": 18.5}));
    dev_stream
        .until("shadow", WAIT, |v| v["version"] == 3)
        .await;

    // Only shadow events on these streams: the disconnect is not sent.
    dev.disconnect().await;
    dev_stream
        .none("connection", Duration::from_millis(600))
        .await;
}
