//! OTA firmware against the real server: an image uploaded over HTTP is
//! hashed and signed; a campaign tells a device over MQTT; the device
//! downloads with `Range` (resuming), fetches a chunk over MQTT, reports its
//! progress and its new version (which lands in its shadow); a campaign of
//! 100 simulated devices runs in three waves and aborts when the last wave
//! fails; a tampered image is reported failed, never installed; tenants do
//! not see each other's artifacts and campaigns.

use crate::common::*;
use base64::Engine;
use bytes::Bytes;
use m2mhub_sim::fleet::{self, DeviceCredential, FleetOptions, FleetStats, Profile};
use mqtt_codec::{Connect, Packet, Protocol, Publish, QoS};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Raw HTTP: status, headers, body bytes.
pub(crate) struct Resp {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn raw_http(addr: SocketAddr, head: String, body: &[u8]) -> Resp {
    within("HTTP exchange", async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(body).await.expect("write body");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("head end");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Resp {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    })
    .await
}

/// Upload `image` as an artifact.
pub(crate) async fn upload(addr: SocketAddr, token: &str, query: &str, image: &[u8]) -> Resp {
    let head = format!(
        "POST /api/v1/ota/artifacts?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        image.len()
    );
    raw_http(addr, head, image).await
}

/// GET a download URL (`http://host:port/path`), optionally with a Range.
pub(crate) async fn fetch(url: &str, range: Option<&str>) -> Resp {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_at(rest.find('/').expect("path"));
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(r) = range {
        head.push_str(&format!("Range: {r}\r\n"));
    }
    head.push_str("\r\n");
    raw_http(host.parse().expect("addr"), head, &[]).await
}

pub(crate) fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

pub(crate) fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A registered device and its token secret.
async fn device(admin: &Api, id: &str) -> String {
    registered_device(admin, id, None).await
}

pub(crate) fn creds(mut c: Connect, id: &str, secret: &str) -> Connect {
    c.username = Some(id.into());
    c.password = Some(Bytes::copy_from_slice(secret.as_bytes()));
    c
}

pub(crate) async fn next_on(raw: &mut Raw, topic: &str) -> Publish {
    let p: Publish = raw
        .recv_where(topic, |p| match p {
            Packet::Publish(p) if p.topic == topic => Some(p.clone()),
            _ => None,
        })
        .await;
    if let Some(id) = p.packet_id {
        raw.puback(id).await;
    }
    p
}

pub(crate) async fn send(raw: &mut Raw, pid: u16, topic: &str, body: Value) {
    let code = raw
        .publish(publish(topic, QoS::AtLeastOnce, pid, body.to_string()))
        .await;
    assert!(code < 0x80, "{topic} refused: {code:#x}");
}

async fn one_device_job(protocol: Protocol) {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let token = admin.token.clone();
    let id = format!("pump-{protocol:?}").to_lowercase();
    let secret = device(&admin, &id).await;

    // Upload: hashed and signed by the platform key devices pin.
    let img = image(100_000, 7);
    let r = upload(
        srv.http(),
        &token,
        "name=pump-fw&version=2.1.0&hardware=rev-b",
        &img,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let art = r.json();
    assert_eq!(art["sha256"], sha256_hex(&img));
    assert_eq!(art["size"], 100_000);
    assert_eq!(art["signed_by"], "platform");
    let pk = admin.expect("GET", "/ota/public-key", None, 200).await;
    let pk = base64::engine::general_purpose::STANDARD
        .decode(pk["publicKey"].as_str().expect("key"))
        .expect("base64");
    let sig = base64::engine::general_purpose::STANDARD
        .decode(art["signature"].as_str().expect("sig"))
        .expect("base64");
    let digest = ring::digest::digest(&ring::digest::SHA256, &img);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &pk)
        .verify(digest.as_ref(), &sig)
        .expect("the signature verifies with the published key");
    // Immutable: the same name and version again is refused; bad input is a problem.
    let again = upload(srv.http(), &token, "name=pump-fw&version=2.1.0", &img).await;
    assert_eq!(again.status, 409);
    let empty = upload(srv.http(), &token, "name=pump-fw&version=9", &[]).await;
    assert_eq!(empty.status, 400);
    let art_id = art["id"].as_str().expect("id").to_string();

    // The device listens, then a campaign names it.
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), creds(connect(protocol, &id), &id, &secret)).await;
    for (pid, f) in [
        (1, format!("devices/{id}/ota/job")),
        (2, format!("devices/{id}/ota/status/+")),
        (3, format!("devices/{id}/ota/chunk/+")),
    ] {
        d.subscribe(pid, &f, QoS::AtLeastOnce).await;
    }
    let c = admin
        .expect(
            "POST",
            "/ota/campaigns",
            Some(json!({"artifact": art_id, "devices": [id]})),
            201,
        )
        .await;
    let cid = c["id"].as_str().expect("campaign id").to_string();
    assert_eq!(c["targets"], 1);
    // In use: the artifact cannot be deleted.
    admin
        .expect("DELETE", &format!("/ota/artifacts/{art_id}"), None, 409)
        .await;

    let job: Value = serde_json::from_slice(
        &next_on(&mut d, &format!("devices/{id}/ota/job"))
            .await
            .payload,
    )
    .expect("job JSON");
    assert_eq!(job["jobId"], cid.as_str());
    assert_eq!(job["state"], "notified");
    assert_eq!(job["artifact"]["version"], "2.1.0");
    assert_eq!(job["artifact"]["sha256"], sha256_hex(&img));
    let url = job["url"].as_str().expect("url").to_string();

    // An interrupted download resumes with Range.
    let first = fetch(&url, Some("bytes=0-39999")).await;
    assert_eq!(first.status, 206);
    assert_eq!(first.header("content-range"), Some("bytes 0-39999/100000"));
    let rest = fetch(&url, Some("bytes=40000-")).await;
    assert_eq!(rest.status, 206);
    let mut whole = first.body.clone();
    whole.extend_from_slice(&rest.body);
    assert_eq!(whole, img);
    let full = fetch(&url, None).await;
    assert_eq!((full.status, full.body.len()), (200, 100_000));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    let bad = fetch(&url, Some("bytes=100000-")).await;
    assert_eq!(bad.status, 416);
    assert_eq!(bad.header("content-range"), Some("bytes */100000"));
    // A forged URL is refused.
    let forged = url.replace(&format!("device={id}"), "device=other");
    assert_eq!(fetch(&forged, None).await.status, 403);

    // A chunk over MQTT, sized by the device.
    send(
        &mut d,
        10,
        &format!("devices/{id}/ota/chunk/get"),
        json!({"jobId": cid, "chunk": 3, "size": 4096}),
    )
    .await;
    let chunk = next_on(&mut d, &format!("devices/{id}/ota/chunk/3")).await;
    assert_eq!(&chunk.payload[..], &img[3 * 4096..4 * 4096]);
    send(
        &mut d,
        11,
        &format!("devices/{id}/ota/chunk/get"),
        json!({"jobId": cid, "chunk": 999, "size": 4096}),
    )
    .await;
    let rej: Value = serde_json::from_slice(
        &next_on(&mut d, &format!("devices/{id}/ota/chunk/rejected"))
            .await
            .payload,
    )
    .expect("JSON");
    assert_eq!(rej["code"], 416);

    // Progress, then the new version.
    for (pid, body) in [
        (
            12,
            json!({"jobId": cid, "state": "downloading", "progress": 50}),
        ),
        (13, json!({"jobId": cid, "state": "verifying"})),
        (14, json!({"jobId": cid, "state": "installing"})),
        (
            15,
            json!({"jobId": cid, "state": "succeeded", "version": "2.1.0"}),
        ),
    ] {
        send(
            &mut d,
            pid,
            &format!("devices/{id}/ota/status"),
            body.clone(),
        )
        .await;
        let acc: Value = serde_json::from_slice(
            &next_on(&mut d, &format!("devices/{id}/ota/status/accepted"))
                .await
                .payload,
        )
        .expect("JSON");
        assert_eq!(acc["state"], body["state"]);
    }
    // A report on a finished job is rejected with 409.
    send(
        &mut d,
        16,
        &format!("devices/{id}/ota/status"),
        json!({"jobId": cid, "state": "installing"}),
    )
    .await;
    let rej: Value = serde_json::from_slice(
        &next_on(&mut d, &format!("devices/{id}/ota/status/rejected"))
            .await
            .payload,
    )
    .expect("JSON");
    assert_eq!(rej["code"], 409, "{rej}");
    // Bad input is a clear rejection.
    send(
        &mut d,
        17,
        &format!("devices/{id}/ota/status"),
        json!({"state": 5}),
    )
    .await;
    let rej: Value = serde_json::from_slice(
        &next_on(&mut d, &format!("devices/{id}/ota/status/rejected"))
            .await
            .payload,
    )
    .expect("JSON");
    assert_eq!(rej["code"], 400, "{rej}");

    // The running version is in the shadow; the campaign completes; the URL
    // stops working with the job.
    let shadow = admin
        .expect("GET", &format!("/devices/{id}/shadow"), None, 200)
        .await;
    assert_eq!(shadow["state"]["reported"]["firmware"]["version"], "2.1.0");
    let mut done = Value::Null;
    for _ in 0..50 {
        done = admin
            .expect("GET", &format!("/ota/campaigns/{cid}"), None, 200)
            .await;
        if done["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["jobs"]["succeeded"], 1);
    assert_eq!(fetch(&url, None).await.status, 409);
    admin
        .expect("DELETE", &format!("/ota/artifacts/{art_id}"), None, 204)
        .await;
    // Audited.
    let audit = admin.expect("GET", "/audit?limit=50", None, 200).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for a in [
        "ota.artifact.upload",
        "ota.campaign.create",
        "ota.artifact.delete",
    ] {
        assert!(actions.contains(&a), "{a} not in {actions:?}");
    }
}

#[tokio::test]
async fn a_device_takes_a_firmware_job_over_mqtt_5() {
    one_device_job(Protocol::V5).await;
}

#[tokio::test]
async fn a_device_takes_a_firmware_job_over_mqtt_3_1_1() {
    one_device_job(Protocol::V311).await;
}

/// `n` devices `{prefix}{i:03}` registered with tokens, as the simulator's
/// credentials.
fn devices(srv: &TestServer, prefix: &str, n: usize) -> Vec<DeviceCredential> {
    let reg = &srv.get().registry;
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i:03}");
            reg.create_device(m2mhub_identity::NewDevice {
                id: Some(id.clone()),
                name: None,
                tenant: "default".into(),
                group: None,
                profile: None,
                labels: Default::default(),
                enabled: true,
            })
            .expect("device");
            let (_, token) = reg.issue_token(&id, None).expect("token");
            DeviceCredential {
                device_id: id,
                token,
            }
        })
        .collect()
}

fn sim_options(srv: &TestServer, failure_rate: f64, interrupt_rate: f64) -> FleetOptions {
    FleetOptions {
        host: srv.mqtt().to_string(),
        profile: Profile::Meter,
        interval: Duration::from_secs(3600),
        seed: 7,
        protocol: Protocol::V5,
        ota: m2mhub_sim::ota::OtaOptions {
            public_key: Some(srv.get().ota.signer.public_key().to_vec()),
            failure_rate,
            interrupt_rate,
        },
    }
}

async fn wait_campaign(admin: &Api, cid: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..600 {
        last = admin
            .expect("GET", &format!("/ota/campaigns/{cid}"), None, 200)
            .await;
        if done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("campaign did not get there in 60 s: {last:#}");
}

/// 100 simulated devices in three waves (10 %, 30 %, 60 %): the first two
/// install for real (downloads cut and resumed, signatures checked, reboot,
/// new version reported); the third wave's devices fail half of their
/// installs, which passes the 20 % threshold and aborts the campaign.
#[tokio::test]
async fn a_campaign_of_100_simulated_devices_runs_in_waves_and_aborts_on_failures() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let all = devices(&srv, "meter-", 100);
    let img = image(64 * 1024, 3);
    let r = upload(
        srv.http(),
        &admin.token,
        "name=meter-fw&version=1.1.0",
        &img,
    )
    .await;
    assert_eq!(r.status, 201);
    let art_id = r.json()["id"].as_str().expect("id").to_string();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let good = Arc::new(FleetStats::default());
    let bad = Arc::new(FleetStats::default());
    let a = tokio::spawn(fleet::run(
        all[..40].to_vec(),
        sim_options(&srv, 0.0, 0.5),
        good.clone(),
        stop_rx.clone(),
    ));
    let b = tokio::spawn(fleet::run(
        all[40..].to_vec(),
        sim_options(&srv, 0.5, 0.0),
        bad.clone(),
        stop_rx.clone(),
    ));
    eventually("100 devices connected", || {
        good.connected.load(Ordering::Relaxed) + bad.connected.load(Ordering::Relaxed) == 100
    })
    .await;

    let ids: Vec<&str> = all.iter().map(|d| d.device_id.as_str()).collect();
    let c = admin
        .expect(
            "POST",
            "/ota/campaigns",
            Some(json!({
                "artifact": art_id,
                "devices": ids,
                "waves": [{"percent": 10}, {"percent": 30}, {"percent": 60}],
                "failure_threshold": 0.2,
            })),
            201,
        )
        .await;
    let sizes: Vec<u64> = c["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| w["size"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(sizes, vec![10, 30, 60]);
    let cid = c["id"].as_str().expect("id").to_string();

    let end = wait_campaign(&admin, &cid, |v| v["status"] != "running").await;
    assert_eq!(end["status"], "aborted", "{end:#}");
    assert!(
        end["reason"].as_str().unwrap_or("").contains("wave 3"),
        "{end:#}"
    );
    // Waves 1 and 2 installed everywhere, for real.
    for w in 0..2 {
        assert_eq!(
            end["waves"][w]["jobs"]["succeeded"],
            end["waves"][w]["size"],
            "wave {}: {end:#}",
            w + 1
        );
    }
    assert!(
        good.ota_resumed.load(Ordering::Relaxed) > 0,
        "no download was resumed"
    );
    assert_eq!(good.ota_failed.load(Ordering::Relaxed), 0);
    // Every one of them reports the new version in its shadow.
    let shadow = admin
        .expect("GET", "/devices/meter-017/shadow", None, 200)
        .await;
    assert_eq!(shadow["state"]["reported"]["firmware"]["version"], "1.1.0");
    // The failures are listed with their reasons.
    let failures = end["failures"].as_array().expect("failures");
    assert!(failures.len() > 12, "{end:#}");
    assert!(
        failures
            .iter()
            .all(|f| f["wave"] == 3 && f["reason"].as_str().unwrap_or("").contains("flash")),
        "{failures:?}"
    );
    // Nothing is left waiting: what had not begun is cancelled.
    let waiting = ["queued", "pending"]
        .iter()
        .map(|s| end["jobs"][s].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert_eq!(waiting, 0, "{end:#}");

    let _ = stop_tx.send(true);
    let _ = a.await;
    let _ = b.await;
}

/// An image changed on disk after it was signed: the simulated device's
/// hash check catches it and reports `failed`; the version never changes.
#[tokio::test]
async fn a_tampered_image_is_reported_failed_and_never_installed() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let devs = devices(&srv, "valve-", 1);
    let img = image(20_000, 9);
    let r = upload(srv.http(), &admin.token, "name=valve-fw&version=3.0", &img).await;
    let art_id = r.json()["id"].as_str().expect("id").to_string();
    let file = srv
        .settings
        .data_dir
        .join("ota")
        .join("artifacts")
        .join(&art_id);
    let mut tampered = img.clone();
    tampered[100] ^= 0xff;
    std::fs::write(&file, &tampered).expect("tamper");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stats = Arc::new(FleetStats::default());
    let run = tokio::spawn(fleet::run(
        devs,
        sim_options(&srv, 0.0, 0.0),
        stats.clone(),
        stop_rx,
    ));
    eventually("connected", || stats.connected.load(Ordering::Relaxed) == 1).await;
    let c = admin
        .expect(
            "POST",
            "/ota/campaigns",
            Some(json!({"artifact": art_id, "devices": ["valve-000"]})),
            201,
        )
        .await;
    let cid = c["id"].as_str().expect("id").to_string();
    let end = wait_campaign(&admin, &cid, |v| v["status"] != "running").await;
    assert_eq!(end["jobs"]["failed"], 1, "{end:#}");
    let reason = end["failures"][0]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("SHA-256 mismatch"), "{reason}");
    assert_eq!(stats.ota_installed.load(Ordering::Relaxed), 0);
    let shadow = admin.call("GET", "/devices/valve-000/shadow", None).await;
    assert!(
        shadow.status == 404 || shadow.json()["state"]["reported"]["firmware"]["version"] != "3.0",
        "{}",
        shadow.body
    );
    let _ = stop_tx.send(true);
    let _ = run.await;
}

#[tokio::test]
async fn tenants_do_not_see_each_others_firmware() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/tenants", Some(json!({"id": "acme"})), 201)
        .await;
    let acme = Api::user(&srv, "acme-op", m2mhub_identity::Role::Operator, "acme");
    let r = upload(
        srv.http(),
        &admin.token,
        "name=fw&version=1",
        &image(1000, 1),
    )
    .await;
    let art_id = r.json()["id"].as_str().expect("id").to_string();
    device(&admin, "dflt-1").await;
    let c = admin
        .expect(
            "POST",
            "/ota/campaigns",
            Some(json!({"artifact": art_id, "devices": ["dflt-1"]})),
            201,
        )
        .await;
    let cid = c["id"].as_str().expect("id");

    let list = acme.expect("GET", "/ota/artifacts", None, 200).await;
    assert_eq!(list["items"], json!([]));
    acme.expect("GET", &format!("/ota/artifacts/{art_id}"), None, 404)
        .await;
    acme.expect("GET", &format!("/ota/campaigns/{cid}"), None, 404)
        .await;
    acme.expect("POST", &format!("/ota/campaigns/{cid}/cancel"), None, 404)
        .await;
    assert_eq!(
        acme.expect("GET", "/ota/campaigns", None, 200).await["items"],
        json!([])
    );
    // Another tenant's artifact or device cannot be used.
    acme.expect(
        "POST",
        "/ota/campaigns",
        Some(json!({"artifact": art_id, "devices": ["dflt-1"]})),
        404,
    )
    .await;
    let own = upload(
        srv.http(),
        &acme.token,
        "name=fw&version=1",
        &image(1000, 2),
    )
    .await;
    assert_eq!(own.status, 201, "{}", String::from_utf8_lossy(&own.body));
    assert_eq!(own.json()["tenant"], "acme");
    let own_id = own.json()["id"].as_str().expect("id").to_string();
    let r = acme
        .call(
            "POST",
            "/ota/campaigns",
            Some(json!({"artifact": own_id, "devices": ["dflt-1"]})),
        )
        .await;
    assert_problem(&r, 404, "dflt-1");
    // A viewer may look but not upload.
    let viewer = Api::user(&srv, "acme-viewer", m2mhub_identity::Role::Viewer, "acme");
    let r = upload(srv.http(), &viewer.token, "name=x&version=1", &image(10, 1)).await;
    assert_eq!(r.status, 403);
}

/// `kill -9` right after the answers: an accepted shadow update and a job
/// report the device saw accepted are on disk, and the campaign resumes
/// where it stood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_shadow_updates_and_job_reports_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (mut bin, before) = BinServer::start_secure(&data, &dir.path().join("log-1")).await;
    let field = |key: &str| {
        before
            .iter()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key:?} line: {before:?}"))
    };
    let (user, password) = (field("user:"), field("password:"));
    let login = |addr| {
        let body = json!({"username": user, "password": password});
        async move {
            let r = http_request(addr, "POST", "/api/v1/auth/login", None, Some(&body)).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["token"].as_str().expect("token").to_string()
        }
    };
    let admin = Api {
        addr: bin.http,
        token: login(bin.http).await,
    };
    let secret = device(&admin, "boiler-1").await;
    let r = upload(
        bin.http,
        &admin.token,
        "name=boiler-fw&version=4.0",
        &image(5000, 4),
    )
    .await;
    assert_eq!(r.status, 201);
    let art = r.json()["id"].as_str().expect("id").to_string();

    let (mut d, _) = Raw::connect_ok(
        bin.mqtt,
        creds(connect(Protocol::V5, "boiler-1"), "boiler-1", &secret),
    )
    .await;
    d.subscribe(
        1,
        "devices/boiler-1/shadow/update/accepted",
        QoS::AtLeastOnce,
    )
    .await;
    d.subscribe(2, "devices/boiler-1/ota/#", QoS::AtLeastOnce)
        .await;
    send(
        &mut d,
        3,
        "devices/boiler-1/shadow/update",
        json!({"state": {"reported": {"pressure": 1.7}}}),
    )
    .await;
    next_on(&mut d, "devices/boiler-1/shadow/update/accepted").await;
    let c = admin
        .expect(
            "POST",
            "/ota/campaigns",
            Some(json!({"artifact": art, "devices": ["boiler-1"]})),
            201,
        )
        .await;
    let cid = c["id"].as_str().expect("id").to_string();
    next_on(&mut d, "devices/boiler-1/ota/job").await;
    send(
        &mut d,
        4,
        "devices/boiler-1/ota/status",
        json!({"jobId": cid, "state": "installing"}),
    )
    .await;
    next_on(&mut d, "devices/boiler-1/ota/status/accepted").await;
    bin.kill9().await;

    let (bin2, _) = BinServer::start_secure(&data, &dir.path().join("log-2")).await;
    let admin = Api {
        addr: bin2.http,
        token: login(bin2.http).await,
    };
    let shadow = admin
        .expect("GET", "/devices/boiler-1/shadow", None, 200)
        .await;
    assert_eq!(shadow["state"]["reported"]["pressure"], 1.7);
    assert_eq!(shadow["version"], 1);
    let c = admin
        .expect("GET", &format!("/ota/campaigns/{cid}"), None, 200)
        .await;
    assert_eq!(c["jobs"]["installing"], 1, "{c:#}");
    assert_eq!(c["status"], "running");
    // The device comes back and finishes the job on the restarted server.
    let (mut d, _) = Raw::connect_ok(
        bin2.mqtt,
        creds(connect(Protocol::V5, "boiler-1"), "boiler-1", &secret),
    )
    .await;
    d.subscribe(1, "devices/boiler-1/ota/status/+", QoS::AtLeastOnce)
        .await;
    send(
        &mut d,
        2,
        "devices/boiler-1/ota/status",
        json!({"jobId": cid, "state": "succeeded", "version": "4.0"}),
    )
    .await;
    next_on(&mut d, "devices/boiler-1/ota/status/accepted").await;
}
