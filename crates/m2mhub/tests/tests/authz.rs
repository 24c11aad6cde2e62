//! Authorization of every `/api/v1` operation, driven by the OpenAPI
//! document the server serves (`/api/v1/openapi.json`): each operation's
//! `x-access` says who may call it, and these tests hold the server to it.
//! A platform viewer and a platform operator are refused (403) whatever is
//! above their role and change nothing by trying; a tenant administrator
//! reaches nothing of another tenant by id, and sees nothing of it in any
//! list. A new route is covered as soon as it is documented; the only
//! hand-kept tables say which fixture fills a path parameter, which body a
//! write gets, and which query strings a list is probed with.
//!
//! Operations with `"x-stream": true` (server-sent events, e.g. `/live`)
//! never end: for them only the status line and headers are read (and, for
//! the tenant check, what arrives within a few seconds).

use crate::common::*;
use bytes::Bytes;
use mqtt_codec::{reason, QoS};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// The document

const ACCESS_LEVELS: [&str; 4] = ["public", "viewer", "operator", "admin"];

/// Exactly these operations need no credentials; anything else made public
/// by accident fails `every_operation_declares_who_may_call_it`.
const PUBLIC_OPERATIONS: [(&str, &str); 10] = [
    ("GET", "/"),
    // Authorized by the signed, short-lived URL a device's job carries.
    ("GET", "/ota/download/{artifact}"),
    // A public key.
    ("GET", "/ota/public-key"),
    // Authorized by the one-time token in its path alone.
    ("PUT", "/diagnostics/upload/{token}"),
    // The one dashboard a share token opens, read-only.
    ("GET", "/shared/{token}"),
    ("GET", "/openapi.json"),
    ("POST", "/auth/login"),
    ("POST", "/provision"),
    ("GET", "/ca"),
    ("GET", "/ca/crl"),
];

/// Exactly these operations are called by devices with their own
/// credential (`x-access: device`).
const DEVICE_OPERATIONS: [(&str, &str); 3] = [
    ("POST", "/devices/{id}/telemetry"),
    ("GET", "/devices/{id}/commands/next"),
    ("POST", "/devices/{id}/commands/{cid}/response"),
];

/// One documented operation.
#[derive(Debug, Clone)]
struct Op {
    method: String,
    /// The template, e.g. `/devices/{id}`.
    path: String,
    access: String,
    stream: bool,
}

impl Op {
    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    fn has_params(&self) -> bool {
        self.path.contains('{')
    }

    fn rank(&self) -> usize {
        ACCESS_LEVELS
            .iter()
            .position(|a| *a == self.access)
            .unwrap_or_else(|| panic!("{}: unknown x-access {:?}", self.name(), self.access))
    }
}

/// The served document and its operations (each checked to carry
/// `x-access`).
async fn operations(addr: SocketAddr) -> (Value, Vec<Op>) {
    let r = http_get(addr, "/api/v1/openapi.json").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let doc = r.json();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let access = op["x-access"].as_str().unwrap_or_else(|| {
                panic!("{} {path} has no x-access: {op}", method.to_uppercase())
            });
            // Device routes take a device's own credential, never an
            // operator's: `device_routes_refuse_operator_tokens` covers them.
            if access == "device" {
                continue;
            }
            ops.push(Op {
                method: method.to_ascii_uppercase(),
                path: path.clone(),
                access: access.to_string(),
                stream: op["x-stream"] == json!(true) || path == "/live",
            });
        }
    }
    assert!(ops.len() >= 40, "only {} operations documented", ops.len());
    (doc, ops)
}

// ---------------------------------------------------------------------------
// Fixtures: which object fills a path parameter

/// `(first path segment, parameter, fixture kind)`: the one table to extend
/// when a route with a new kind of path parameter is added.
const PARAMS: &[(&str, &str, &str)] = &[
    ("/devices", "id", "device"),
    ("/devices", "token_id", "token"),
    ("/devices", "fingerprint", "fingerprint"),
    ("/devices", "psk_id", "psk"),
    ("/devices", "metric", "metric"),
    ("/devices", "name", "shadow"),
    ("/devices", "bundle", "diagnostic"),
    ("/devices", "cid", "command"),
    ("/diagnostics", "token", "upload_token"),
    ("/rules", "id", "rule"),
    ("/dashboards", "id", "dashboard"),
    ("/dashboards", "share", "share"),
    ("/shared", "token", "share_token"),
    ("/alarms", "id", "alarm"),
    ("/commands", "id", "command"),
    ("/settings", "id", "setting"),
    ("/ota", "artifact", "artifact"),
    ("/ota", "campaign", "campaign"),
    ("/claim-tokens", "id", "claim"),
    ("/auth", "id", "api_token"),
    ("/tenants", "tenant", "tenant"),
    ("/tenants", "name", "policy"),
    ("/profiles", "name", "profile"),
    ("/sessions", "client_id", "device"),
    ("/users", "username", "user"),
    ("/security", "key", "ban"),
    ("/reports", "id", "report"),
    ("/reports", "run", "report_run"),
];

/// Fixture kind → the id of one such object.
type Ids = BTreeMap<&'static str, String>;

fn first_segment(template: &str) -> &str {
    let end = template[1..].find('/').map_or(template.len(), |i| i + 1);
    &template[..end]
}

/// The template with every `{param}` replaced by the fixture's object.
fn fill(template: &str, ids: &Ids) -> String {
    let prefix = first_segment(template);
    template
        .split('/')
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                None => seg.to_string(),
                Some(param) => {
                    let kind = PARAMS
                        .iter()
                        .find(|(p, n, _)| *p == prefix && *n == param)
                        .map(|(_, _, k)| *k)
                        .unwrap_or_else(|| {
                            panic!("{template}: no fixture for {{{param}}}: add a row to PARAMS")
                        });
                    ids.get(kind)
                        .unwrap_or_else(|| panic!("{template}: the fixture has no {kind}"))
                        .clone()
                }
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

/// The query string a platform caller needs to reach the fixture's object
/// (profiles are looked up in `?tenant=`, default `default`; an aggregate
/// needs a metric).
fn scoped_query(template: &str, ids: &Ids) -> String {
    let t = &ids["tenant"];
    match template {
        "/profiles/{name}" => format!("?tenant={t}"),
        "/telemetry/aggregate" => format!("?metric=temp&from=-1h&to=now&tenant={t}"),
        _ => String::new(),
    }
}

/// A plausible, valid body for a write (so that a refusal is about who
/// calls, not about what was sent).
fn body_for(method: &str, template: &str) -> Option<Value> {
    let b = match (method, template) {
        ("POST", "/auth/tokens") => json!({"name": "authz-test", "role": "viewer"}),
        ("POST", "/users") => {
            json!({"username": "intruder", "password": "long enough password", "role": "admin"})
        }
        ("POST", "/tenants") => json!({"id": "intruder-tenant"}),
        ("POST", "/tenants/{tenant}/groups") => json!({"id": "intruder-grp"}),
        ("PUT", "/tenants/{tenant}/policies/{name}") => {
            json!({"publish": ["tenants/{tenant}/#"], "subscribe": ["tenants/{tenant}/#"]})
        }
        ("POST", "/devices") => json!({"id": "intruder-dev"}),
        ("PATCH", "/devices/{id}") => {
            json!({"name": "hacked", "enabled": false, "labels": {"owned": "yes"}})
        }
        ("POST", "/devices/{id}/tokens/{token_id}/expire") => json!({"at_ms": 0}),
        ("POST", "/devices/{id}/commands") => {
            json!({"name": "unlock", "params": {"door": 1}, "timeout_secs": 60})
        }
        ("POST", "/rules") => json!({
            "id": "intruder-rule",
            "sql": "SELECT avg(temp) FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s) HAVING avg(temp) > 0",
            "actions": [],
        }),
        ("PUT", "/rules/{id}") => json!({"name": "hacked", "enabled": false}),
        ("POST", "/dashboards") => json!({"name": "intruder-dash"}),
        ("PUT", "/dashboards/{id}") => json!({"name": "hacked", "layout": {"widgets": []}}),
        ("PUT", "/telemetry/retention") => json!({"rules": []}),
        ("POST", "/profiles") => json!({"name": "intruder-prof"}),
        ("PUT", "/profiles/{name}") => json!({"description": "hacked", "content_type": null}),
        ("POST", "/claim-tokens") => json!({"max_uses": 1}),
        ("POST", "/settings") => json!({"state": {"hacked": true}}),
        ("POST", "/security/bans") => json!({"ip": "192.0.2.1", "seconds": 60}),
        ("POST", "/reports") => json!({
            "id": "intruder-report", "name": "intruder", "kind": {"type": "alarms"},
            "schedule": {"every": "daily", "at": "06:00", "time_zone": "UTC"},
        }),
        ("PUT", "/reports/{id}") => json!({
            "name": "hacked", "kind": {"type": "availability"}, "enabled": false,
            "schedule": {"every": "weekly", "weekday": 1, "at": "00:00", "time_zone": "UTC"},
        }),
        ("POST", "/reports/{id}/run") => return None,
        ("POST", "/alarms/{id}/ack" | "/alarms/{id}/clear")
        | ("POST", "/rules/{id}/enable" | "/rules/{id}/disable") => return None,
        ("POST" | "PUT" | "PATCH", _) => json!({}),
        _ => return None,
    };
    Some(b)
}

// ---------------------------------------------------------------------------
// HTTP as one caller, streams included

/// An answer; for a stream that was accepted, `body` is empty (never read).
struct Reply {
    status: u16,
    content_type: Option<String>,
    body: String,
}

impl Reply {
    /// The JSON body; a download that is not JSON (a report's CSV or
    /// HTML) as one string, so snapshots and leak checks read it too.
    fn json(&self) -> Value {
        let json = self
            .content_type
            .as_deref()
            .is_none_or(|c| c.contains("json"));
        if !json {
            return Value::String(self.body.clone());
        }
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

#[derive(Clone)]
struct Client {
    addr: SocketAddr,
    token: String,
}

impl Client {
    async fn call(&self, method: &str, path: &str, body: Option<&Value>, stream: bool) -> Reply {
        let path = format!("/api/v1{path}");
        if stream {
            let s = Sse::open(self.addr, &path, &self.token).await;
            let content_type = s.header("content-type");
            let status = s.status;
            let body = if status == 200 {
                String::new()
            } else {
                s.finish().await
            };
            return Reply {
                status,
                content_type,
                body,
            };
        }
        let r = http_request(self.addr, method, &path, Some(&self.token), body).await;
        Reply {
            status: r.status,
            content_type: r.header("content-type").map(str::to_string),
            body: r.body,
        }
    }

    /// Call and insist on `status`; the JSON body (Null if empty).
    async fn expect(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        let r = self.call(method, path, body.as_ref(), false).await;
        assert_eq!(
            r.status, status,
            "{method} {path}: expected {status}, got {}: {}",
            r.status, r.body
        );
        if r.body.is_empty() {
            Value::Null
        } else {
            r.json()
        }
    }

    /// Call `op` with the fixture's objects in its path and its body.
    async fn call_op(&self, op: &Op, ids: &Ids, query: &str) -> Reply {
        let path = format!("{}{query}", fill(&op.path, ids));
        let body = body_for(&op.method, &op.path);
        self.call(&op.method, &path, body.as_ref(), op.stream).await
    }
}

/// A server-sent-events request: the status line and headers are read,
/// the body only on demand and only for so long.
struct Sse {
    status: u16,
    headers: Vec<(String, String)>,
    /// Body bytes read so far.
    body: Vec<u8>,
    sock: TcpStream,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, token: &str) -> Sse {
        within(&format!("headers of GET {path}"), async {
            let mut sock = TcpStream::connect(addr).await.expect("connect HTTP");
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Accept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            sock.write_all(req.as_bytes()).await.expect("write request");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break i;
                }
                let n = sock.read(&mut chunk).await.expect("read headers");
                assert!(n > 0, "GET {path}: closed before the headers ended");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            Sse {
                status,
                headers,
                body: buf[end + 4..].to_vec(),
                sock,
            }
        })
        .await
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Read until `done` holds for what arrived, or `limit` passes: the
    /// text so far (chunk framing included, harmless for searching).
    async fn read_until(&mut self, limit: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        let mut chunk = [0u8; 4096];
        while !done(&String::from_utf8_lossy(&self.body)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.sock.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.body.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// A finite answer (a refusal): the whole body.
    async fn finish(mut self) -> String {
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        within("the end of a refused stream", async {
            self.sock
                .read_to_end(&mut self.body)
                .await
                .expect("read body")
        })
        .await;
        let text = String::from_utf8_lossy(&self.body).to_string();
        if chunked {
            dechunk(&text)
        } else {
            text
        }
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A refusal: one of `statuses`, as an RFC 9457 problem document.
fn assert_refused(r: &Reply, statuses: &[u16], what: &str) {
    assert!(
        statuses.contains(&r.status),
        "{what}: expected {statuses:?}, got {}: {}",
        r.status,
        r.body
    );
    assert_eq!(
        r.content_type.as_deref(),
        Some("application/problem+json"),
        "{what}: {}",
        r.body
    );
    let p = r.json();
    assert_eq!(p["status"], r.status, "{what}: {p}");
    assert!(
        p["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("/problems/")),
        "{what}: {p}"
    );
}

// ---------------------------------------------------------------------------
// The server and its population

const PASSWORD: &str = "correct horse battery";

fn platform_admin(srv: &TestServer) -> Client {
    Client {
        addr: srv.http(),
        token: srv.admin_token(),
    }
}

/// Create a user (through the API, as `admin`) and log in as them.
async fn login_as(admin: &Client, user: &str, role: &str, tenant: Option<&str>) -> Client {
    let mut body = json!({"username": user, "password": PASSWORD, "role": role});
    if let Some(t) = tenant {
        body["tenant"] = json!(t);
    }
    admin.expect("POST", "/users", Some(body), 201).await;
    let r = http_request(
        admin.addr,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&json!({"username": user, "password": PASSWORD})),
    )
    .await;
    assert_eq!(r.status, 200, "login {user}: {}", r.body);
    Client {
        addr: admin.addr,
        token: r.json()["token"].as_str().expect("token").to_string(),
    }
}

/// One tenant with one of everything, made by the platform admin: the ids
/// (for path parameters), the strings that betray its objects in another
/// tenant's answers, its own administrator, and its device's live MQTT
/// connection (so it has a session).
struct Tenant {
    ids: Ids,
    markers: Vec<String>,
    admin: Client,
    _device: Raw,
}

impl Tenant {
    fn id(&self) -> &str {
        &self.ids["tenant"]
    }

    /// The first of this tenant's markers found in `v`'s strings: equal to
    /// one, or (the longer ones) containing it, e.g. a topic with the
    /// device id.
    fn leak_in(&self, v: &Value) -> Option<String> {
        let mut strings = Vec::new();
        collect_strings(v, &mut strings);
        strings.into_iter().find(|s| {
            self.markers
                .iter()
                .any(|m| s == m || (m.len() > 3 && s.contains(m.as_str())))
        })
    }

    /// Like `leak_in`, for raw text (an event stream).
    fn leak_in_text(&self, text: &str) -> Option<String> {
        let quoted = format!("\"{}\"", self.id());
        self.markers
            .iter()
            .filter(|m| m.len() > 3)
            .chain(std::iter::once(&quoted))
            .find(|m| text.contains(m.as_str()))
            .cloned()
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => {
            for (k, x) in o {
                out.push(k.clone());
                collect_strings(x, out);
            }
        }
        _ => {}
    }
}

fn with_creds(mut c: mqtt_codec::Connect, user: &str, password: &str) -> mqtt_codec::Connect {
    c.username = Some(user.into());
    c.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    c
}

/// Tenant `t` with group, policy, profile, device (token, certificate,
/// DTLS PSK, telemetry, a session, a security event, a command, an alarm), a rule, a
/// claim token, a banned device and an administrator.
async fn populate(srv: &TestServer, admin: &Client, t: &str) -> Tenant {
    let grp = format!("{t}-grp");
    let pol = format!("{t}-pol");
    let prof = format!("{t}-prof");
    let dev = format!("{t}-dev");
    let banned = format!("{t}-banned");
    let rule = format!("{t}-rule");
    let user = format!("{t}-admin");
    admin
        .expect("POST", "/tenants", Some(json!({"id": t})), 201)
        .await;
    admin
        .expect(
            "POST",
            &format!("/tenants/{t}/groups"),
            Some(json!({"id": grp})),
            201,
        )
        .await;
    let pattern = "tenants/{tenant}/groups/{group}/#";
    admin
        .expect(
            "PUT",
            &format!("/tenants/{t}/policies/{pol}"),
            Some(json!({"publish": [pattern], "subscribe": [pattern]})),
            200,
        )
        .await;
    admin
        .expect(
            "POST",
            "/profiles",
            Some(json!({"name": prof, "tenant": t, "content_type": "application/json", "description": format!("{t} sensors")})),
            201,
        )
        .await;
    admin
        .expect(
            "POST",
            "/devices",
            Some(json!({"id": dev, "name": format!("{t} sensor"), "tenant": t, "group": grp, "profile": prof, "labels": {"site": format!("{t}-site")}})),
            201,
        )
        .await;
    let tok = admin
        .expect(
            "POST",
            &format!("/devices/{dev}/tokens"),
            Some(json!({})),
            201,
        )
        .await;
    let token_id = tok["token"]["id"].as_str().expect("token id").to_string();
    let secret = tok["secret"].as_str().expect("secret").to_string();
    let cert = admin
        .expect(
            "POST",
            &format!("/devices/{dev}/certificates"),
            Some(json!({})),
            201,
        )
        .await;
    let fingerprint = cert["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_string();
    let serial = cert["serial"].as_str().expect("serial").to_string();
    let psk = admin
        .expect(
            "POST",
            &format!("/devices/{dev}/psks"),
            Some(json!({})),
            201,
        )
        .await;
    let psk_id = psk["id"].as_str().expect("PSK id").to_string();
    admin
        .expect(
            "POST",
            "/devices",
            Some(json!({"id": banned, "tenant": t})),
            201,
        )
        .await;
    admin
        .expect(
            "POST",
            "/security/bans",
            Some(json!({"client_id": banned, "seconds": 600, "reason": format!("{t}-misbehaved")})),
            201,
        )
        .await;
    admin
        .expect(
            "POST",
            "/rules",
            Some(json!({
                "id": rule,
                "tenant": t,
                "name": format!("{t} heat"),
                "sql": "SELECT avg(temp) FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s) HAVING avg(temp) > 1000",
                "actions": [{"type": "alarm", "alarm_type": format!("{t}-heat"), "severity": "major"}],
            })),
            201,
        )
        .await;
    let dashboard = format!("{t}-dash");
    admin
        .expect(
            "POST",
            "/dashboards",
            Some(json!({
                "id": dashboard, "tenant": t, "name": format!("{t} board"),
                "layout": {"widgets": [{"type": "value", "device": dev, "metric": "temp"}]},
            })),
            201,
        )
        .await;
    let share = admin
        .expect(
            "POST",
            &format!("/dashboards/{dashboard}/shares"),
            Some(json!({"expires_in": "7d"})),
            201,
        )
        .await;
    let share_id = share["id"].as_str().expect("share id").to_string();
    let share_token = share["token"].as_str().expect("share token").to_string();
    let (alarm, _) = srv
        .get()
        .fleet
        .raise_alarm(
            t,
            &dev,
            &format!("{t}-overheat"),
            m2mhub_fleet::Severity::Major,
            json!({"temp": 99.5}),
            Some(&rule),
        )
        .expect("raise alarm");
    let command = admin
        .expect(
            "POST",
            &format!("/devices/{dev}/commands"),
            Some(json!({"name": format!("{t}-reboot"), "params": {"delay": 1}, "timeout_secs": 3600})),
            202,
        )
        .await;
    let command_id = command["id"].as_str().expect("command id").to_string();
    // The rule service publishes it in the background: wait for its status
    // to settle (nobody listens yet: `sent`).
    within("the command to be sent", async {
        while admin
            .expect("GET", &format!("/commands/{command_id}"), None, 200)
            .await["status"]
            == "pending"
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // A diagnostic bundle, uploaded (its content is JSON, so the snapshot
    // reads it like every other GET).
    let diag = admin
        .expect(
            "POST",
            &format!("/devices/{dev}/diagnostics"),
            Some(json!({"reason": format!("{t}-diag")})),
            202,
        )
        .await;
    let bundle_id = diag["id"].as_str().expect("bundle id").to_string();
    let diag_command = diag["command_id"].as_str().expect("command id").to_string();
    let url = srv
        .get()
        .fleet
        .get_command(&diag_command)
        .expect("diagnostics command")
        .params["url"]
        .as_str()
        .expect("upload url")
        .to_string();
    let up = http_request(
        srv.http(),
        "PUT",
        url.trim_start_matches("http://x"),
        None,
        Some(&json!({"bundle": format!("{t}-bundle")})),
    )
    .await;
    assert_eq!(up.status, 200, "{}", up.body);
    within("the diagnostics command to be sent", async {
        while admin
            .expect("GET", &format!("/commands/{diag_command}"), None, 200)
            .await["status"]
            == "pending"
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let claim = admin
        .expect(
            "POST",
            "/claim-tokens",
            Some(json!({"name": format!("{t}-claim"), "tenant": t, "group": grp, "profile": prof, "max_uses": 5})),
            201,
        )
        .await;
    let claim_id = claim["claim"]["id"].as_str().expect("claim id").to_string();
    let tenant_admin = login_as(admin, &user, "admin", Some(t)).await;
    let mine = tenant_admin.expect("GET", "/auth/tokens", None, 200).await;
    let api_token = mine["items"][0]["id"]
        .as_str()
        .expect("API token id")
        .to_string();

    // The device reports, and trips an ACL violation (a security event).
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), with_creds(v5(&dev), &dev, &secret)).await;
    let code = d
        .publish(publish(
            &format!("devices/{dev}/telemetry"),
            QoS::AtLeastOnce,
            1,
            r#"{"temp": 21.5, "lat": 48.1, "lon": 11.5}"#,
        ))
        .await;
    assert!(code < 0x80, "telemetry refused: {code:#x}");
    let ack = d.subscribe(2, "#", QoS::AtLeastOnce).await;
    assert_eq!(ack.reason_codes, vec![reason::NOT_AUTHORIZED]);
    within("the ACL violation as a security event", async {
        loop {
            let ev = admin.expect("GET", "/security/events", None, 200).await;
            if ev.to_string().contains(&dev) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A named shadow with a desired setting (and the classic one).
    for path in [
        format!("/devices/{dev}/shadow"),
        format!("/devices/{dev}/shadow/{t}-cfg"),
    ] {
        admin
            .expect(
                "PATCH",
                &path,
                Some(json!({"state": {"desired": {"setpoint": format!("{t}-setpoint")}}})),
                200,
            )
            .await;
    }

    let setting = admin
        .expect(
            "POST",
            "/settings",
            Some(json!({"tenant": t, "group": grp, "state": {"eco": format!("{t}-eco")}})),
            201,
        )
        .await;
    let setting_id = setting["id"].as_str().expect("setting id").to_string();

    // A firmware artifact and a campaign rolling it out to the device.
    let artifact = srv
        .get()
        .fleet
        .add_artifact(m2mhub_fleet::Artifact {
            id: srv.get().fleet.new_artifact_id(),
            tenant: t.to_string(),
            name: format!("{t}-fw"),
            version: "1.0".into(),
            hardware: None,
            profile: None,
            size: 0,
            sha256: "00".repeat(32),
            signature: String::new(),
            signed_by: m2mhub_fleet::SignedBy::Platform,
            created_ms: 1,
            created_by: "tests".into(),
        })
        .expect("artifact");
    let campaign = admin
        .expect(
            "POST",
            "/ota/campaigns",
            Some(json!({"tenant": t, "artifact": artifact.id, "devices": [dev], "name": format!("{t}-campaign")})),
            201,
        )
        .await;
    let campaign_id = campaign["id"].as_str().expect("campaign id").to_string();
    // The campaign timer tells the (connected) device within a second;
    // after that nothing changes for an hour (the job timeout).
    within("the campaign to tell the device", async {
        while admin
            .expect("GET", &format!("/ota/campaigns/{campaign_id}"), None, 200)
            .await["jobs"]["notified"]
            != 1
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // A scheduled report with one run (its files kept for download).
    let report = format!("{t}-report");
    admin
        .expect(
            "POST",
            "/reports",
            Some(json!({
                "id": report, "tenant": t, "name": format!("{t} energy"),
                "kind": {"type": "energy", "metric": "temp", "mode": "sum"},
                "schedule": {"every": "monthly", "day": 31, "at": "06:00", "time_zone": "Europe/Berlin"},
            })),
            201,
        )
        .await;
    let run = admin
        .expect("POST", &format!("/reports/{report}/run"), None, 201)
        .await;
    let run_id = run["id"].as_str().expect("run id").to_string();

    let ids: Ids = [
        ("tenant", t.to_string()),
        ("setting", setting_id.clone()),
        ("artifact", artifact.id.clone()),
        ("campaign", campaign_id.clone()),
        ("shadow", format!("{t}-cfg")),
        ("device", dev.clone()),
        ("token", token_id.clone()),
        ("fingerprint", fingerprint.clone()),
        ("psk", psk_id.clone()),
        ("metric", "temp".to_string()),
        ("rule", rule.clone()),
        ("dashboard", dashboard.clone()),
        ("share", share_id.clone()),
        ("share_token", share_token),
        ("alarm", alarm.id.to_string()),
        ("command", command_id.clone()),
        ("diagnostic", bundle_id.clone()),
        (
            "upload_token",
            url.rsplit('/').next().unwrap_or_default().to_string(),
        ),
        ("claim", claim_id.clone()),
        ("api_token", api_token.clone()),
        ("policy", pol.clone()),
        ("profile", prof.clone()),
        ("user", user.clone()),
        ("ban", format!("client:{banned}")),
        ("group", grp.clone()),
        ("report", report.clone()),
        ("report_run", run_id.clone()),
    ]
    .into_iter()
    .collect();
    let markers = vec![
        t.to_string(),
        dev,
        grp,
        pol,
        prof,
        rule,
        user,
        banned,
        dashboard,
        format!("{t} board"),
        share_id,
        format!("{t}-site"),
        format!("{t}-claim"),
        format!("{t}-overheat"),
        format!("{t}-reboot"),
        format!("{t}-misbehaved"),
        format!("{t}-setpoint"),
        format!("{t}-eco"),
        setting_id,
        artifact.id,
        format!("{t}-fw"),
        campaign_id,
        format!("{t}-campaign"),
        format!("{t} sensor"),
        token_id,
        fingerprint,
        serial,
        psk_id,
        command_id,
        bundle_id,
        diag_command,
        format!("{t}-diag"),
        claim_id,
        api_token,
        report,
        format!("{t} energy"),
        run_id,
    ];
    Tenant {
        ids,
        markers,
        admin: tenant_admin,
        _device: d,
    }
}

/// Retention rules naming each tenant.
async fn retention_per_tenant(admin: &Client, tenants: &[&str]) {
    let rules: Vec<Value> = tenants
        .iter()
        .map(|t| json!({"tenant": t, "days": 30}))
        .collect();
    admin
        .expect(
            "PUT",
            "/telemetry/retention",
            Some(json!({ "rules": rules })),
            200,
        )
        .await;
}

// ---------------------------------------------------------------------------
// State, as the platform administrator reads it

/// Reads whose answers change by themselves (clocks, counters, traffic) and
/// say nothing about the objects a refused write could have touched.
const VOLATILE_READS: [&str; 8] = [
    "/dashboards/{id}/data",
    "/broker",
    "/broker/history",
    "/telemetry/stats",
    "/sessions",
    "/sessions/{client_id}",
    "/audit",
    "/audit/verify",
];

/// Fields that change by themselves.
const VOLATILE_FIELDS: [&str; 10] = [
    "counters",
    "session",
    "online",
    "last_seen_ms",
    "last_addr",
    "offline_seconds",
    "remaining_secs",
    "from_ms",
    "to_ms",
    "uptime_seconds",
];

fn strip_volatile(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for f in VOLATILE_FIELDS {
                o.remove(f);
            }
            o.values_mut().for_each(strip_volatile);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_volatile),
        _ => {}
    }
}

/// Every documented read (but the volatile ones) of the fixture's objects,
/// each of which must exist (200): so a refusal of the same ids is about
/// the caller, not a wrong id.
async fn snapshot(admin: &Client, ops: &[Op], ids: &Ids) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for op in ops {
        if op.method != "GET"
            || op.stream
            || op.access == "public"
            || VOLATILE_READS.contains(&op.path.as_str())
        {
            continue;
        }
        let path = format!("{}{}", fill(&op.path, ids), scoped_query(&op.path, ids));
        let r = admin.call("GET", &path, None, false).await;
        assert_eq!(
            r.status, 200,
            "GET {path} as the platform admin: {}",
            r.body
        );
        let mut v = r.json();
        strip_volatile(&mut v);
        out.insert(path, v);
    }
    assert!(out.len() >= 25, "only {} reads in the snapshot", out.len());
    out
}

fn assert_unchanged(before: &BTreeMap<String, Value>, after: &BTreeMap<String, Value>, who: &str) {
    for (path, was) in before {
        let now = after.get(path).unwrap_or(&Value::Null);
        assert!(
            now == was,
            "GET {path} changed after {who}'s refused calls:\nbefore: {was}\nafter:  {now}"
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Every operation says who may call it

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_declares_who_may_call_it() {
    let srv = TestServer::with(secure).await;
    let (doc, ops) = operations(srv.http()).await;
    let mut by_level: BTreeMap<String, usize> = BTreeMap::new();
    for op in &ops {
        let level = op.rank();
        *by_level.entry(op.access.clone()).or_default() += 1;
        let item = &doc["paths"][&op.path][op.method.to_ascii_lowercase()];
        // The bearer requirement and x-access agree.
        assert_eq!(
            item["security"].is_array(),
            level > 0,
            "{}: x-access {} but security {}",
            op.name(),
            op.access,
            item["security"]
        );
        if op.stream {
            assert_eq!(op.method, "GET", "{} is a stream", op.name());
        }
    }
    let public: BTreeSet<(String, String)> = ops
        .iter()
        .filter(|o| o.access == "public")
        .map(|o| (o.method.clone(), o.path.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = PUBLIC_OPERATIONS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(public, expected, "the operations open to anyone");
    for level in ["viewer", "operator", "admin"] {
        assert!(
            by_level.get(level).copied().unwrap_or(0) >= 5,
            "few {level} operations: {by_level:?}"
        );
    }
    // Every parameterized path can be filled from a fixture.
    let ids: Ids = PARAMS
        .iter()
        .map(|(_, _, k)| (*k, "x".to_string()))
        .collect();
    for op in &ops {
        fill(&op.path, &ids);
    }
}

// ---------------------------------------------------------------------------
// 2. A platform viewer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_is_refused_every_write_above_its_role_and_changes_nothing() {
    let srv = TestServer::with(secure).await;
    let admin = platform_admin(&srv);
    let (_, ops) = operations(srv.http()).await;
    let t1 = populate(&srv, &admin, "t1").await;
    retention_per_tenant(&admin, &["t1"]).await;
    let viewer = login_as(&admin, "watcher", "viewer", None).await;
    let before = snapshot(&admin, &ops, &t1.ids).await;

    let mut refused = 0;
    for op in ops
        .iter()
        .filter(|o| o.access == "operator" || o.access == "admin")
    {
        let query = scoped_query(&op.path, &t1.ids);
        let r = viewer.call_op(op, &t1.ids, &query).await;
        assert_refused(&r, &[403], &format!("{} as a viewer", op.name()));
        refused += 1;
    }
    assert!(refused >= 30, "only {refused} operations above viewer");

    let after = snapshot(&admin, &ops, &t1.ids).await;
    assert_unchanged(&before, &after, "a viewer");
    // The ones that matter most, spelled out.
    let d = admin.expect("GET", "/devices/t1-dev", None, 200).await;
    assert_eq!(
        (d["name"].as_str(), d["enabled"].as_bool()),
        (Some("t1 sensor"), Some(true)),
        "{d}"
    );
    let tokens = admin
        .expect("GET", "/devices/t1-dev/tokens", None, 200)
        .await;
    assert_eq!(tokens["items"][0]["revoked"], false, "{tokens}");
    let rule = admin.expect("GET", "/rules/t1-rule", None, 200).await;
    assert_eq!(rule["enabled"], true, "{rule}");
    assert_eq!(rule["name"], "t1 heat", "{rule}");
    let alarm = admin
        .expect("GET", &format!("/alarms/{}", t1.ids["alarm"]), None, 200)
        .await;
    assert_eq!(
        (alarm["acked"].as_bool(), alarm["status"].as_str()),
        (Some(false), Some("active")),
        "{alarm}"
    );
    let bans = admin.expect("GET", "/security/bans", None, 200).await;
    assert!(bans.to_string().contains("client:t1-banned"), "{bans}");
    assert!(!bans.to_string().contains("192.0.2.1"), "{bans}");
    let users = admin.expect("GET", "/users", None, 200).await;
    assert!(!users.to_string().contains("intruder"), "{users}");

    // What a viewer may do, it may: never 401 or 403. (A spare token of its
    // own is the one it revokes.)
    let spare = viewer
        .expect(
            "POST",
            "/auth/tokens",
            Some(json!({"name": "spare", "role": "viewer"})),
            201,
        )
        .await;
    let mut ids = t1.ids.clone();
    ids.insert(
        "api_token",
        spare["token"]["id"].as_str().expect("id").into(),
    );
    let mut allowed = 0;
    for op in ops.iter().filter(|o| o.access == "viewer") {
        let query = scoped_query(&op.path, &ids);
        let r = viewer.call_op(op, &ids, &query).await;
        assert!(
            r.status != 401 && r.status != 403,
            "{} as a viewer: {} {}",
            op.name(),
            r.status,
            r.body
        );
        if op.method == "GET" {
            assert_eq!(r.status, 200, "{} as a viewer: {}", op.name(), r.body);
        }
        if op.stream {
            assert!(
                r.content_type
                    .as_deref()
                    .is_some_and(|c| c.starts_with("text/event-stream")),
                "{}: {:?}",
                op.name(),
                r.content_type
            );
        }
        allowed += 1;
    }
    assert!(allowed >= 20, "only {allowed} viewer operations");
}

// ---------------------------------------------------------------------------
// 3. A platform operator

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_is_refused_every_admin_operation_and_changes_nothing() {
    let srv = TestServer::with(secure).await;
    let admin = platform_admin(&srv);
    let (_, ops) = operations(srv.http()).await;
    let t1 = populate(&srv, &admin, "t1").await;
    retention_per_tenant(&admin, &["t1"]).await;
    let operator = login_as(&admin, "op", "operator", None).await;
    let before = snapshot(&admin, &ops, &t1.ids).await;
    let audit_before = admin.expect("GET", "/audit?limit=1000", None, 200).await;

    let mut refused = 0;
    for op in ops.iter().filter(|o| o.access == "admin") {
        let query = scoped_query(&op.path, &t1.ids);
        let r = operator.call_op(op, &t1.ids, &query).await;
        assert_refused(&r, &[403], &format!("{} as an operator", op.name()));
        refused += 1;
    }
    assert!(refused >= 10, "only {refused} admin operations");

    let after = snapshot(&admin, &ops, &t1.ids).await;
    assert_unchanged(&before, &after, "an operator");
    let retention = admin.expect("GET", "/telemetry/retention", None, 200).await;
    assert_eq!(retention["rules"][0]["tenant"], "t1", "{retention}");
    let policies = admin.expect("GET", "/tenants/t1/policies", None, 200).await;
    assert!(policies.to_string().contains("t1-pol"), "{policies}");
    admin.expect("GET", "/users", None, 200).await["items"]
        .as_array()
        .expect("users")
        .iter()
        .for_each(|u| assert_ne!(u["username"], "intruder"));
    // Nothing was done, so nothing was audited.
    let audit_after = admin.expect("GET", "/audit?limit=1000", None, 200).await;
    let actions = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|r| r["actor"] == "op" && r["action"] != "auth.login")
            .map(|r| r.to_string())
            .collect()
    };
    assert_eq!(actions(&audit_before), actions(&audit_after));
    assert!(actions(&audit_after).is_empty(), "{audit_after}");
}

// ---------------------------------------------------------------------------
// 4. Tenant isolation

/// Lists probed with more than `""` and `?tenant=<other>`.
fn list_queries(template: &str, other: &Ids) -> Vec<String> {
    let (t, dev, grp) = (&other["tenant"], &other["device"], &other["group"]);
    let agg = "?metric=temp&from=-1h&to=now";
    match template {
        "/telemetry/aggregate" => vec![
            agg.to_string(),
            format!("{agg}&tenant={t}"),
            format!("{agg}&device={dev}"),
            format!("{agg}&group={grp}"),
            format!("{agg}&combine=true"),
        ],
        "/alarms" => vec![format!("?device={dev}"), format!("?type={t}-overheat")],
        "/devices" => vec![
            format!("?search={dev}"),
            format!("?group={grp}"),
            format!("?profile={}", other["profile"]),
        ],
        "/live" => vec![format!("?device={dev}")],
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reaches_and_sees_nothing_of_another_tenant() {
    let srv = TestServer::with(secure).await;
    let admin = platform_admin(&srv);
    let (_, ops) = operations(srv.http()).await;
    let t1 = populate(&srv, &admin, "t1").await;
    let t2 = populate(&srv, &admin, "t2").await;
    retention_per_tenant(&admin, &["t1", "t2"]).await;
    let before = snapshot(&admin, &ops, &t1.ids).await;
    let intruder = &t2.admin;

    // By id: every operation on t1's objects (and on tenant t1) is a 404
    // (or 403) problem, reads and writes alike; profiles are tried both in
    // the caller's tenant and with `?tenant=t1`.
    let mut by_id = 0;
    for op in ops
        .iter()
        .filter(|o| o.access != "public" && o.has_params())
    {
        let mut queries = vec![String::new()];
        if op.path.starts_with("/profiles/") {
            queries.push(format!("?tenant={}", t1.id()));
        }
        for q in queries {
            let r = intruder.call_op(op, &t1.ids, &q).await;
            assert_refused(
                &r,
                &[403, 404],
                &format!("{}{q} with t1's objects, as t2's admin", op.name()),
            );
            by_id += 1;
        }
    }
    assert!(by_id >= 35, "only {by_id} operations by id");

    // Its own objects it reaches (so the refusals above are about t1), and
    // what it reads of them shows nothing of t1.
    for op in ops
        .iter()
        .filter(|o| o.method == "GET" && !o.stream && o.access != "public" && o.has_params())
    {
        let path = fill(&op.path, &t2.ids);
        let r = intruder.call(&op.method, &path, None, false).await;
        assert_eq!(r.status, 200, "GET {path} as t2's admin: {}", r.body);
        if let Some(leak) = t1.leak_in(&r.json()) {
            panic!("GET {path} shows t2's admin {leak:?} of t1: {}", r.body);
        }
    }

    // Lists: nothing of t1, whatever the query; the platform admin, asking
    // the same, does see t1 (so the fixture is there to be seen).
    let mut admin_sees = BTreeSet::new();
    let mut lists = 0;
    for op in ops
        .iter()
        .filter(|o| o.method == "GET" && o.access != "public" && !o.has_params())
    {
        let mut queries = vec![String::new(), format!("?tenant={}", t1.id())];
        queries.extend(list_queries(&op.path, &t1.ids));
        for q in queries {
            let path = format!("{}{q}", op.path);
            if !op.stream {
                let a = admin.call("GET", &path, None, false).await;
                if a.status == 200 && t1.leak_in(&a.json()).is_some() {
                    admin_sees.insert(op.path.clone());
                }
            }
            let r = intruder.call("GET", &path, None, op.stream).await;
            lists += 1;
            if r.status == 200 {
                if op.stream {
                    continue; // read below
                }
                if let Some(leak) = t1.leak_in(&r.json()) {
                    panic!("GET {path} shows t2's admin {leak:?} of t1: {}", r.body);
                }
            } else {
                assert_refused(&r, &[400, 403, 404], &format!("GET {path} as t2's admin"));
            }
        }
    }
    assert!(lists >= 40, "only {lists} list reads");
    for expected in [
        "/devices",
        "/rules",
        "/dashboards",
        "/alarms",
        "/profiles",
        "/claim-tokens",
        "/sessions",
        "/security/events",
        "/security/bans",
        "/tenants",
        "/users",
        "/telemetry/retention",
        "/telemetry/aggregate",
        "/audit",
    ] {
        assert!(
            admin_sees.contains(expected),
            "the platform admin does not see t1 in {expected}: the fixture is incomplete \
             (sees it in {admin_sees:?})"
        );
    }

    // And t2 does see its own objects in its lists.
    let mine = intruder.expect("GET", "/devices", None, 200).await;
    assert!(mine.to_string().contains("t2-dev"), "{mine}");
    let mine = intruder.expect("GET", "/alarms", None, 200).await;
    assert!(mine.to_string().contains("t2-overheat"), "{mine}");
    let mine = intruder.expect("GET", "/sessions", None, 200).await;
    assert!(mine.to_string().contains("t2-dev"), "{mine}");
    let mine = intruder.expect("GET", "/security/events", None, 200).await;
    assert!(mine.to_string().contains("t2-dev"), "{mine}");
    // Its audit view: its users' actions and its devices' connections,
    // paged like the platform's.
    let mine = intruder.expect("GET", "/audit", None, 200).await;
    let seen: BTreeSet<(String, String)> = mine["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| (r["action"].to_string(), r["actor"].to_string()))
        .collect();
    for (action, actor) in [("auth.login", "t2-admin"), ("mqtt.connect", "t2-dev")] {
        assert!(
            seen.contains(&(format!("{action:?}"), format!("{actor:?}"))),
            "{action} by {actor} missing from t2's audit view: {mine}"
        );
    }
    let page = intruder.expect("GET", "/audit?limit=1", None, 200).await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    let next = page["next"].as_u64().expect("next");
    let rest = intruder
        .expect("GET", &format!("/audit?after={next}"), None, 200)
        .await;
    assert_eq!(
        rest["items"].as_array().map(Vec::len),
        Some(mine["items"].as_array().map_or(0, Vec::len) - 1),
        "{rest}"
    );

    // Nothing of t1 changed.
    let after = snapshot(&admin, &ops, &t1.ids).await;
    assert_unchanged(&before, &after, "t2's admin");

    // Streams: t2's shows t2's alarms, never t1's, which the platform
    // admin's shows.
    for op in ops.iter().filter(|o| o.stream && !o.has_params()) {
        let path = format!("/api/v1{}", op.path);
        let mut mine = Sse::open(srv.http(), &path, &intruder.token).await;
        let mut all = Sse::open(srv.http(), &path, &admin.token).await;
        assert_eq!((mine.status, all.status), (200, 200), "GET {path}");
        // The streams are subscribed once they said hello.
        mine.read_until(WAIT, |s| s.contains("hello")).await;
        all.read_until(WAIT, |s| s.contains("hello")).await;
        let fleet = &srv.get().fleet;
        for t in ["t1", "t2"] {
            fleet
                .raise_alarm(
                    t,
                    &format!("{t}-dev"),
                    &format!("{t}-live"),
                    m2mhub_fleet::Severity::Minor,
                    json!({}),
                    None,
                )
                .expect("raise");
        }
        let seen = all
            .read_until(WAIT, |s| s.contains("t1-live") && s.contains("t2-live"))
            .await;
        assert!(
            seen.contains("t1-live") && seen.contains("t2-live"),
            "GET {path} as the platform admin: {seen}"
        );
        // t1's alarm was raised first: by the time t2's arrives, t1's has
        // been passed over.
        let text = mine.read_until(WAIT, |s| s.contains("t2-live")).await;
        assert!(text.contains("t2-live"), "GET {path} as t2's admin: {text}");
        if let Some(leak) = t1.leak_in_text(&text) {
            panic!("GET {path} streams t2's admin {leak:?} of t1: {text}");
        }
    }
}

// ---------------------------------------------------------------------------
// Device routes

/// The device routes are exactly the documented set, say how a device
/// authenticates, and refuse every operator token (401): an operator acts
/// on devices through the operator routes, never as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_routes_refuse_operator_tokens() {
    let srv = TestServer::with(secure).await;
    let r = http_get(srv.http(), "/api/v1/openapi.json").await;
    let doc = r.json();
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if op["x-access"] == "device" {
                let schemes: Vec<String> = op["security"]
                    .as_array()
                    .expect("security")
                    .iter()
                    .filter_map(|s| s.as_object()?.keys().next().cloned())
                    .collect();
                assert!(
                    schemes.contains(&"deviceToken".to_string())
                        && schemes.contains(&"deviceCertificate".to_string()),
                    "{method} {path}: {schemes:?}"
                );
                found.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = DEVICE_OPERATIONS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(found, expected, "the operations devices call");
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/devices", Some(json!({"id": "dev-x"})), 201)
        .await;
    let sent = admin
        .expect(
            "POST",
            "/devices/dev-x/commands",
            Some(json!({"name": "noop"})),
            202,
        )
        .await;
    let cid = sent["id"].as_str().expect("id");
    for (method, path) in DEVICE_OPERATIONS {
        let path = path.replace("{id}", "dev-x").replace("{cid}", cid);
        let r = admin.call(method, &path, Some(json!({"x": 1}))).await;
        assert_eq!(
            r.status, 401,
            "{method} {path} with the admin's token: {}",
            r.body
        );
    }
    // Nothing happened to the command.
    let c = admin
        .expect("GET", &format!("/commands/{cid}"), None, 200)
        .await;
    assert!(
        c["status"] != "answered" && c["status"] != "delivered",
        "{c}"
    );
}
