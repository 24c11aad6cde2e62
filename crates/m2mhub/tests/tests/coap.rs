//! CoAP devices against the real server (plain CoAP on a loopback UDP
//! port, the token in the path): SenML+CBOR readings are stored, a rule's
//! command reaches the device through Observe and is answered, a
//! retransmitted CON is stored once, a 64 KiB body arrives in Block1
//! blocks, the shadow is read and written, and bad credentials or input
//! get the right codes.

use crate::common::*;
use m2mhub_coap::client::Client;
use m2mhub_coap::message::content_format as cf;
use m2mhub_coap::{Code, Message, MessageType};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

async fn coap_server() -> TestServer {
    TestServer::with(|s| {
        secure(s);
        s.coap.listen = "127.0.0.1:0".into();
        // The tests send bursts from one address.
        s.coap.rate_per_second = 10_000;
        s.coap.rate_burst = 10_000;
    })
    .await
}

/// SenML+CBOR `[{0: name, 2: value}]` (RFC 8428 integer labels).
fn senml_cbor(name: &str, value: f64) -> Vec<u8> {
    let mut b = vec![0x81, 0xa2, 0x00];
    assert!(name.len() < 24);
    b.push(0x60 | name.len() as u8);
    b.extend_from_slice(name.as_bytes());
    b.push(0x02);
    b.push(0xfb);
    b.extend_from_slice(&value.to_bits().to_be_bytes());
    b
}

fn post(client: &mut Client, path: &str, format: u16, body: &[u8]) -> Message {
    let mut m = client.request(Code::POST, path);
    m.set_content_format(format);
    m.payload = bytes::Bytes::copy_from_slice(body);
    m
}

async fn post_call(
    client: &mut Client,
    path: &str,
    format: u16,
    body: &[u8],
) -> Result<Message, m2mhub_coap::client::ClientError> {
    let m = post(client, path, format, body);
    client.call(m).await
}

async fn until(admin: &Api, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin.call("GET", path, None).await;
        if r.status == 200 && pred(&r.json()) {
            return r.json();
        }
        assert!(Instant::now() < deadline, "{what}: GET {path}: {}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn latest(v: &Value, metric: &str) -> Option<Value> {
    v["items"]
        .as_array()?
        .iter()
        .find(|m| m["metric"] == metric)
        .map(|m| m["value"].clone())
}

fn coap_addr(srv: &TestServer) -> SocketAddr {
    srv.get().coap_addr.expect("the CoAP listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coap_device_posts_senml_cbor_and_gets_a_rules_command_through_observe() {
    let srv = coap_server().await;
    let admin = Api::admin(&srv);
    let secret = registered_device(&admin, "probe-1", None).await;
    admin
        .expect(
            "POST",
            "/rules",
            Some(json!({
                "id": "too-dry",
                "sql": "SELECT device, moisture FROM 'devices/+/telemetry' WHERE moisture < 10",
                "actions": [{"type": "command", "name": "irrigate", "params": {"minutes": 5}, "timeout_secs": 60}]
            })),
            201,
        )
        .await;
    let mut c = Client::new(coap_addr(&srv)).await.expect("client");
    let prefix = format!("probe-1/{secret}");

    // Observe the command resource: nothing waits yet.
    let mut obs = c.request(Code::GET, &format!("{prefix}/commands"));
    obs.set_observe(0);
    let token = obs.token;
    let obs_id = c.send(obs).expect("observe");
    let first = c
        .next_response(obs_id, Duration::from_secs(5))
        .await
        .expect("first answer");
    assert_eq!(first.code, Code::CONTENT);
    assert!(first.observe().is_some(), "registered as an observer");
    assert!(first.payload.is_empty(), "no command yet");

    // A dry reading: stored, and the rule's command is pushed to the device.
    let r = post_call(
        &mut c,
        &format!("{prefix}/telemetry"),
        cf::SENML_CBOR,
        &senml_cbor("moisture", 7.5),
    )
    .await
    .expect("POST telemetry");
    assert_eq!(
        r.code,
        Code::CHANGED,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    until(&admin, "/devices/probe-1/telemetry", "stored", |v| {
        latest(v, "moisture") == Some(json!(7.5))
    })
    .await;
    let note = c
        .next_response(obs_id, Duration::from_secs(10))
        .await
        .expect("a notification");
    let cmd: Value = serde_json::from_slice(&note.payload).expect("command JSON");
    assert_eq!(cmd["name"], "irrigate");
    assert_eq!(cmd["params"]["minutes"], 5);
    let cid = cmd["id"].as_str().expect("id").to_string();
    let status = admin
        .expect("GET", &format!("/commands/{cid}"), None, 200)
        .await;
    assert_eq!(status["status"], "delivered");
    c.cancel(token);

    // The answer.
    let r = post_call(
        &mut c,
        &format!("{prefix}/commands/{cid}"),
        cf::JSON,
        br#"{"watered": true}"#,
    )
    .await
    .expect("answer");
    assert_eq!(r.code, Code::CHANGED);
    let done = admin
        .expect("GET", &format!("/commands/{cid}"), None, 200)
        .await;
    assert_eq!(done["status"], "answered");
    assert_eq!(done["response"]["watered"], true);
    let again = post_call(&mut c, &format!("{prefix}/commands/{cid}"), cf::JSON, b"{}")
        .await
        .expect("answer again");
    assert_eq!(again.code, Code::PRECONDITION_FAILED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmitted_con_is_stored_once_and_large_bodies_arrive_in_blocks() {
    let srv = coap_server().await;
    let admin = Api::admin(&srv);
    let secret = registered_device(&admin, "meter-7", None).await;
    let addr = coap_addr(&srv);

    // The same CON (same message id) three times, as a device whose ACK
    // was lost would send it: one stored point, the same answer each time.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    let t0 = m2mhub_identity::now_ms() - 30_000;
    let mut m = Message::new(
        MessageType::Confirmable,
        Code::POST,
        0x4242,
        m2mhub_coap::Token::new(&[1, 2, 3, 4]).expect("token"),
    );
    m.set_uri_path(&format!("meter-7/{secret}/telemetry"));
    m.set_content_format(cf::JSON);
    m.payload = bytes::Bytes::from(json!({"ts": t0, "energy": 12.5}).to_string());
    let bytes = m.encode().expect("encode");
    let mut answers = Vec::new();
    for _ in 0..3 {
        sock.send_to(&bytes, addr).await.expect("send");
        let mut buf = [0u8; 1500];
        let (n, _) = within("the ACK", sock.recv_from(&mut buf))
            .await
            .expect("recv");
        let ack = Message::decode(&buf[..n]).expect("decode");
        assert_eq!(ack.message_id, 0x4242);
        answers.push((ack.mtype, ack.code));
    }
    assert!(
        answers
            .iter()
            .all(|a| *a == (MessageType::Acknowledgement, Code::CHANGED)),
        "{answers:?}"
    );
    let raw = until(
        &admin,
        &format!(
            "/devices/meter-7/telemetry/energy?from={}&to={}",
            t0 - 1,
            t0 + 1
        ),
        "stored",
        |v| v["points"].as_array().is_some_and(|p| !p.is_empty()),
    )
    .await;
    assert_eq!(
        raw["points"].as_array().map(Vec::len),
        Some(1),
        "stored once: {raw}"
    );

    // 64 KiB of readings in Block1 blocks of 1 KiB.
    let base = m2mhub_identity::now_ms() - 3_600_000;
    let mut rows = Vec::new();
    let mut body = Vec::new();
    let mut i = 0;
    while body.len() < 64 * 1024 {
        rows.push(json!({"ts": base + i * 1000, "power": i}));
        i += 1;
        body = serde_json::to_vec(&rows).expect("json");
    }
    let mut c = Client::new(addr).await.expect("client");
    let r = c
        .upload_blockwise(
            Code::POST,
            &format!("meter-7/{secret}/telemetry"),
            Some(cf::JSON),
            &body,
            1024,
        )
        .await
        .expect("block-wise upload");
    assert_eq!(
        r.code,
        Code::CHANGED,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    let raw = admin
        .expect(
            "GET",
            &format!(
                "/devices/meter-7/telemetry/power?from={base}&to={}&limit=10000",
                base + i * 1000
            ),
            None,
            200,
        )
        .await;
    assert_eq!(
        raw["points"].as_array().map(Vec::len),
        Some(i as usize),
        "every reading of the {} byte body",
        body.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_refuses_bad_credentials_bad_input_and_other_tenants() {
    let srv = coap_server().await;
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/tenants", Some(json!({"id": "green"})), 201)
        .await;
    let secret = registered_device(&admin, "soil-1", None).await;
    let theirs = registered_device(&admin, "soil-2", Some("green")).await;
    let mut c = Client::new(coap_addr(&srv)).await.expect("client");
    let cases: Vec<(String, u16, &[u8], Code)> = vec![
        (
            "soil-1/wrong/telemetry".into(),
            cf::JSON,
            b"1",
            Code::UNAUTHORIZED,
        ),
        ("telemetry".into(), cf::JSON, b"1", Code::UNAUTHORIZED),
        (
            format!("soil-1/{theirs}/telemetry"),
            cf::JSON,
            b"1",
            Code::UNAUTHORIZED,
        ),
        (
            format!("soil-2/{secret}/telemetry"),
            cf::JSON,
            b"1",
            Code::UNAUTHORIZED,
        ),
        (
            format!("soil-1/{secret}/telemetry"),
            9999,
            b"1",
            Code::UNSUPPORTED_CONTENT_FORMAT,
        ),
        (
            format!("soil-1/{secret}/telemetry"),
            cf::JSON,
            b"{nope",
            Code::BAD_REQUEST,
        ),
        (
            format!("soil-1/{secret}/telemetry"),
            cf::JSON,
            b"",
            Code::BAD_REQUEST,
        ),
        (
            format!("soil-1/{secret}/nothing"),
            cf::JSON,
            b"1",
            Code::NOT_FOUND,
        ),
    ];
    for (path, format, body, want) in cases {
        let r = post_call(&mut c, &path, format, body)
            .await
            .expect("an answer");
        assert_eq!(
            r.code,
            want,
            "{path}: {:?}",
            String::from_utf8_lossy(&r.payload)
        );
    }
    // The shadow: the device reports, the operator sees it.
    let mut upd = c.request(Code::POST, &format!("soil-1/{secret}/shadow"));
    upd.set_content_format(cf::JSON);
    upd.payload = bytes::Bytes::from(r#"{"state":{"reported":{"valve":"open"}}}"#);
    let r = c.call(upd).await.expect("shadow update");
    assert_eq!(
        r.code,
        Code::CONTENT,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    let shadow = admin
        .expect("GET", "/devices/soil-1/shadow", None, 200)
        .await;
    assert_eq!(shadow["state"]["reported"]["valve"], "open", "{shadow}");
    let get = c.request(Code::GET, &format!("soil-1/{secret}/shadow"));
    let r = c.call(get).await.expect("shadow get");
    let doc: Value = serde_json::from_slice(&r.payload).expect("shadow JSON");
    assert_eq!(doc["state"]["reported"]["valve"], "open");
    // Nothing reached the other tenant's device.
    let latest = admin
        .expect("GET", "/devices/soil-2/telemetry", None, 200)
        .await;
    assert_eq!(
        latest["items"].as_array().map(Vec::len),
        Some(0),
        "{latest}"
    );
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coaps_device_posts_with_its_psk_and_a_revoked_psk_ends_the_session() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/devices", Some(json!({"id": "probe-s"})), 201)
        .await;
    let psk = admin
        .expect("POST", "/devices/probe-s/psks", Some(json!({})), 201)
        .await;
    let identity = psk["identity"].as_str().expect("identity").to_string();
    let key = unhex(psk["key_hex"].as_str().expect("key"));
    let psk_id = psk["id"].as_str().expect("id").to_string();
    let addr = srv.get().coaps_addr.expect("the CoAPS listener");

    let mut c = Client::new_psk(addr, identity.as_bytes(), &key)
        .await
        .expect("DTLS handshake with the issued key");
    // No credentials in the path: the session's key names the device.
    let r = post_call(
        &mut c,
        "telemetry",
        cf::SENML_CBOR,
        &senml_cbor("depth", 0.75),
    )
    .await
    .expect("POST over DTLS");
    assert_eq!(
        r.code,
        Code::CHANGED,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    until(&admin, "/devices/probe-s/telemetry", "stored", |v| {
        latest(v, "depth") == Some(json!(0.75))
    })
    .await;

    // A wrong key gets no session.
    let wrong = tokio::time::timeout(
        Duration::from_secs(15),
        Client::new_psk(addr, identity.as_bytes(), b"0000000000000000"),
    )
    .await;
    assert!(!matches!(wrong, Ok(Ok(_))), "a wrong key got a session");

    // Revoked: the live session ends and a new handshake fails.
    admin
        .expect(
            "DELETE",
            &format!("/devices/probe-s/psks/{psk_id}"),
            None,
            204,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.timeout = Duration::from_secs(3);
    let r = post_call(
        &mut c,
        "telemetry",
        cf::SENML_CBOR,
        &senml_cbor("depth", 0.5),
    )
    .await;
    assert!(
        r.is_err() || !c.is_open(),
        "the revoked session still answers: {r:?}"
    );
    let again = tokio::time::timeout(
        Duration::from_secs(15),
        Client::new_psk(addr, identity.as_bytes(), &key),
    )
    .await;
    assert!(!matches!(again, Ok(Ok(_))), "a revoked key got a session");
    let latest_now = admin
        .expect("GET", "/devices/probe-s/telemetry", None, 200)
        .await;
    assert_eq!(latest(&latest_now, "depth"), Some(json!(0.75)));
    // The handshakes are audited.
    let audit = admin
        .expect("GET", "/audit?action=coap.auth&limit=100", None, 200)
        .await;
    let outcomes: Vec<&str> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    assert!(
        outcomes.contains(&"ok") && outcomes.contains(&"denied"),
        "{outcomes:?}"
    );
}

async fn upload_artifact(srv: &TestServer, query: &str, image: &[u8]) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST /api/v1/ota/artifacts?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        srv.admin_token(),
        image.len()
    );
    let mut s = tokio::net::TcpStream::connect(srv.http())
        .await
        .expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(image).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let r = parse_http(&raw);
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_coaps_a_device_is_told_of_commands_and_takes_a_firmware_update_block_wise() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/devices", Some(json!({"id": "pump-s"})), 201)
        .await;
    let psk = admin
        .expect("POST", "/devices/pump-s/psks", Some(json!({})), 201)
        .await;
    let key = unhex(psk["key_hex"].as_str().expect("key"));
    admin
        .expect(
            "POST",
            "/rules",
            Some(json!({
                "id": "overpressure",
                "sql": "SELECT device, pressure FROM 'devices/+/telemetry' WHERE pressure > 8",
                "actions": [{"type": "command", "name": "vent", "timeout_secs": 60}]
            })),
            201,
        )
        .await;
    let addr = srv.get().coaps_addr.expect("CoAPS");
    let mut c = Client::new_psk(addr, b"pump-s", &key)
        .await
        .expect("handshake");

    // Observe commands; a high reading makes the rule send one.
    let mut obs = c.request(Code::GET, "commands");
    obs.set_observe(0);
    let obs_id = c.send(obs).expect("observe");
    let first = c
        .next_response(obs_id, Duration::from_secs(5))
        .await
        .expect("registered");
    assert!(first.observe().is_some());
    let r = post_call(
        &mut c,
        "telemetry",
        cf::SENML_CBOR,
        &senml_cbor("pressure", 9.5),
    )
    .await
    .expect("reading");
    assert_eq!(r.code, Code::CHANGED);
    let note = c
        .next_response(obs_id, Duration::from_secs(10))
        .await
        .expect("the rule's command");
    let cmd: Value = serde_json::from_slice(&note.payload).expect("JSON");
    assert_eq!(cmd["name"], "vent");

    // A firmware job: told by GET ota, the image fetched in Block2 blocks,
    // verified, and the success reported.
    let image: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let art = upload_artifact(&srv, "name=pump-fw&version=3.0.0", &image).await;
    admin
        .expect(
            "POST",
            "/ota/campaigns",
            Some(json!({"artifact": art["id"], "devices": ["pump-s"]})),
            201,
        )
        .await;
    let job = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = c.request(Code::GET, "ota");
            let r = c.call(m).await.expect("GET ota");
            let doc: Value = serde_json::from_slice(&r.payload).expect("job JSON");
            if !doc["jobId"].is_null() {
                break doc;
            }
            assert!(std::time::Instant::now() < deadline, "no job: {doc}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let job_id = job["jobId"].as_str().expect("job id").to_string();
    assert_eq!(job["artifact"]["size"], image.len());
    let got = c
        .download_blockwise(&format!("ota/{job_id}"), 1024, 1 << 20)
        .await
        .expect("block-wise download");
    assert_eq!(got, image, "the image arrives whole");
    let digest: String = ring::digest::digest(&ring::digest::SHA256, &got)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(job["artifact"]["sha256"], digest);
    for state in ["downloading", "installing", "succeeded"] {
        let r = post_call(
            &mut c,
            "ota",
            cf::JSON,
            json!({"jobId": job_id, "state": state, "version": "3.0.0"})
                .to_string()
                .as_bytes(),
        )
        .await
        .expect("status");
        assert_eq!(
            r.code,
            Code::CHANGED,
            "{state}: {:?}",
            String::from_utf8_lossy(&r.payload)
        );
    }
    let shadow = admin
        .expect("GET", "/devices/pump-s/shadow", None, 200)
        .await;
    assert_eq!(
        shadow["state"]["reported"]["firmware"]["version"], "3.0.0",
        "{shadow}"
    );
    // Another job id is not this device's.
    let m = c.request(Code::GET, "ota/cmp-0000000000000000");
    assert_eq!(c.call(m).await.expect("answer").code, Code::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coaps_device_observing_its_shadow_is_told_of_desired_changes() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/devices", Some(json!({"id": "thermo-s"})), 201)
        .await;
    let psk = admin
        .expect("POST", "/devices/thermo-s/psks", Some(json!({})), 201)
        .await;
    let key = unhex(psk["key_hex"].as_str().expect("key"));
    let addr = srv.get().coaps_addr.expect("CoAPS");
    let mut c = Client::new_psk(addr, b"thermo-s", &key)
        .await
        .expect("handshake");
    // The device reports, then observes its shadow.
    let mut upd = c.request(Code::new(0, 6), "shadow");
    upd.set_content_format(cf::JSON);
    upd.payload = bytes::Bytes::from(r#"{"state":{"reported":{"setpoint":20}}}"#);
    let r = c.call(upd).await.expect("report");
    assert_eq!(
        r.code,
        Code::CONTENT,
        "{:?}",
        String::from_utf8_lossy(&r.payload)
    );
    let mut obs = c.request(Code::GET, "shadow");
    obs.set_observe(0);
    let obs_id = c.send(obs).expect("observe");
    let first = c
        .next_response(obs_id, Duration::from_secs(5))
        .await
        .expect("the document");
    assert!(first.observe().is_some(), "registered");
    // An operator changes the desired setpoint while the device sleeps.
    admin
        .expect(
            "PATCH",
            "/devices/thermo-s/shadow",
            Some(json!({"state": {"desired": {"setpoint": 17}}})),
            200,
        )
        .await;
    let note = c
        .next_response(obs_id, Duration::from_secs(10))
        .await
        .expect("the delta");
    let delta: Value = serde_json::from_slice(&note.payload).expect("delta JSON");
    assert_eq!(delta["state"]["setpoint"], 17, "{delta}");
}
