//! Device shadows against the real server: a registered device speaks the
//! shadow topics over MQTT 3.1.1 and 5 with its own token (get, update,
//! accepted/documents/delta/rejected, stale versions, named shadows, bad
//! input), an operator changes desired state over HTTP while the device is
//! offline and the device gets the delta when it returns, and accepted
//! updates survive a restart.

use crate::common::*;
use bytes::Bytes;
use mqtt_codec::{Connect, Packet, Protocol, Publish, QoS};
use serde_json::{json, Value};

/// A registered device and its token secret.
async fn device(admin: &Api, id: &str) -> String {
    registered_device(admin, id, None).await
}

fn creds(mut c: Connect, id: &str, secret: &str) -> Connect {
    c.username = Some(id.into());
    c.password = Some(Bytes::copy_from_slice(secret.as_bytes()));
    c
}

/// The next PUBLISH whose topic ends with `suffix`, as JSON.
async fn answer(raw: &mut Raw, suffix: &str) -> Value {
    let p: Publish = raw
        .recv_where(suffix, |p| match p {
            Packet::Publish(p) if p.topic.ends_with(suffix) => Some(p.clone()),
            _ => None,
        })
        .await;
    if let Some(id) = p.packet_id {
        raw.puback(id).await;
    }
    serde_json::from_slice(&p.payload).expect("a JSON answer")
}

async fn request(raw: &mut Raw, pid: u16, topic: &str, body: Value) {
    let code = raw
        .publish(publish(topic, QoS::AtLeastOnce, pid, body.to_string()))
        .await;
    assert!(code < 0x80, "{topic} refused: {code:#x}");
}

async fn device_side_flow(protocol: Protocol) {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let id = format!("thermo-{protocol:?}").to_lowercase();
    let secret = device(&admin, &id).await;
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), creds(connect(protocol, &id), &id, &secret)).await;
    // The answers only (a device subscribed to its own request topics
    // would get its requests back too).
    for (pid, f) in [
        (1, format!("devices/{id}/shadow/+/accepted")),
        (2, format!("devices/{id}/shadow/+/rejected")),
        (3, format!("devices/{id}/shadow/update/delta")),
        (4, format!("devices/{id}/shadow/update/documents")),
        (5, format!("devices/{id}/shadow/name/+/update/+")),
    ] {
        d.subscribe(pid, &f, QoS::AtLeastOnce).await;
    }
    let base = format!("devices/{id}/shadow");

    // No shadow yet: get is rejected with 404.
    request(
        &mut d,
        10,
        &format!("{base}/get"),
        json!({"clientToken": "g0"}),
    )
    .await;
    let r = answer(&mut d, "/get/rejected").await;
    assert_eq!(
        (r["code"].clone(), r["clientToken"].clone()),
        (json!(404), json!("g0"))
    );

    // The device reports: accepted (version 1) and documents.
    request(
        &mut d,
        11,
        &format!("{base}/update"),
        json!({"state": {"reported": {"temp": 20.5, "mode": "heat"}}, "clientToken": "u1"}),
    )
    .await;
    let acc = answer(&mut d, "/update/accepted").await;
    assert_eq!(acc["version"], 1);
    assert_eq!(acc["clientToken"], "u1");
    assert_eq!(acc["state"]["reported"]["temp"], 20.5);
    assert!(acc["metadata"]["reported"]["temp"]["timestamp_ms"].is_i64());
    let docs = answer(&mut d, "/update/documents").await;
    assert_eq!(docs["previous"], Value::Null);
    assert_eq!(docs["current"]["state"]["reported"]["mode"], "heat");

    // Desired differs from reported: a delta with just that key.
    request(
        &mut d,
        12,
        &format!("{base}/update"),
        json!({"state": {"desired": {"mode": "cool", "temp": 20.5}}, "version": 1}),
    )
    .await;
    assert_eq!(answer(&mut d, "/update/accepted").await["version"], 2);
    let delta = answer(&mut d, "/update/delta").await;
    assert_eq!(delta["state"], json!({"mode": "cool"}));
    assert_eq!(delta["version"], 2);

    // A stale version is refused (409) and changes nothing.
    request(
        &mut d,
        13,
        &format!("{base}/update"),
        json!({"state": {"reported": {"mode": "off"}}, "version": 1, "clientToken": "stale"}),
    )
    .await;
    let rej = answer(&mut d, "/update/rejected").await;
    assert_eq!(
        (rej["code"].clone(), rej["clientToken"].clone()),
        (json!(409), json!("stale"))
    );

    // Get: the whole document with its delta.
    request(&mut d, 14, &format!("{base}/get"), json!({})).await;
    let doc = answer(&mut d, "/get/accepted").await;
    assert_eq!(doc["version"], 2);
    assert_eq!(doc["state"]["reported"]["mode"], "heat");
    assert_eq!(doc["state"]["delta"], json!({"mode": "cool"}));

    // Bad input: not JSON, and the wrong shape.
    d.publish(publish(
        &format!("{base}/update"),
        QoS::AtLeastOnce,
        15,
        "not json",
    ))
    .await;
    let rej = answer(&mut d, "/update/rejected").await;
    assert_eq!(rej["code"], 400, "{rej}");
    request(
        &mut d,
        16,
        &format!("{base}/update"),
        json!({"state": {"reported": 5}}),
    )
    .await;
    assert_eq!(answer(&mut d, "/update/rejected").await["code"], 400);

    // A named shadow is a shadow of its own (version 1).
    request(
        &mut d,
        17,
        &format!("{base}/name/firmware/update"),
        json!({"state": {"reported": {"version": "1.2.0"}}}),
    )
    .await;
    let acc = answer(&mut d, "/name/firmware/update/accepted").await;
    assert_eq!(acc["version"], 1);

    // The operator sees both.
    let names = admin
        .expect("GET", &format!("/devices/{id}/shadows"), None, 200)
        .await;
    assert_eq!(names["items"], json!(["", "firmware"]));
    let fw = admin
        .expect("GET", &format!("/devices/{id}/shadow/firmware"), None, 200)
        .await;
    assert_eq!(fw["state"]["reported"]["version"], "1.2.0");
    d.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gets_updates_and_deltas_over_mqtt_v5() {
    device_side_flow(Protocol::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gets_updates_and_deltas_over_mqtt_v311() {
    device_side_flow(Protocol::V311).await;
}

/// The operator changes a setpoint while the device is offline; the device
/// (persistent session) gets the delta when it reconnects. Concurrency
/// control over HTTP; the change survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_the_delta_it_missed_and_changes_are_durable() {
    let mut srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let secret = device(&admin, "valve-1").await;
    let login = |c: Connect| creds(c, "valve-1", &secret);
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), login(v5_persistent("valve-1", true, 3600))).await;
    d.subscribe(1, "devices/valve-1/shadow/update/delta", QoS::AtLeastOnce)
        .await;
    d.disconnect().await;

    let doc = admin
        .expect(
            "PATCH",
            "/devices/valve-1/shadow",
            Some(json!({"state": {"desired": {"open": true, "flow": 3}}, "version": 0})),
            200,
        )
        .await;
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["state"]["delta"], json!({"open": true, "flow": 3}));

    // Reconnect: the delta waited in the session.
    let (mut d, ack) =
        Raw::connect_ok(srv.mqtt(), login(v5_persistent("valve-1", false, 3600))).await;
    assert!(ack.session_present);
    let delta = answer(&mut d, "/update/delta").await;
    assert_eq!(delta["state"], json!({"open": true, "flow": 3}));

    // Optimistic concurrency over HTTP: a stale version is 409; operators
    // may not write reported state.
    let r = admin
        .call(
            "PATCH",
            "/devices/valve-1/shadow",
            Some(json!({"state": {"desired": {"open": false}}, "version": 0})),
        )
        .await;
    assert_problem(&r, 409, "version");
    let r = admin
        .call(
            "PATCH",
            "/devices/valve-1/shadow",
            Some(json!({"state": {"reported": {"open": false}}})),
        )
        .await;
    assert_problem(&r, 422, "device's to write");
    d.disconnect().await;

    srv.restart().await;
    let admin = Api::admin(&srv);
    let doc = admin
        .expect("GET", "/devices/valve-1/shadow", None, 200)
        .await;
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["state"]["desired"]["flow"], 3);
    admin
        .expect("DELETE", "/devices/valve-1/shadow", None, 204)
        .await;
    let r = admin.call("GET", "/devices/valve-1/shadow", None).await;
    assert_eq!(r.status, 404);
}

/// `m2mhub shadow …` against the real server: set desired keys (nested,
/// JSON values), read them back, refuse a stale version, delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_reads_and_deletes_shadows() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    device(&admin, "pump-7").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = dir.path().join("cli.toml").display().to_string();
    let server = format!("http://{}", srv.http());
    let token = srv.admin_token();
    let env = [
        ("M2MHUB_PROFILE", profile.as_str()),
        ("M2MHUB_SERVER", server.as_str()),
        ("M2MHUB_TOKEN", token.as_str()),
    ];
    let (code, out, err) = run_bin(
        &[
            "shadow",
            "set",
            "pump-7",
            "rpm=1200",
            "mode.auto=true",
            "note=night shift",
            "--json",
        ],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{err}{out}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["version"], 1);
    assert_eq!(
        v["state"]["desired"],
        json!({"rpm": 1200, "mode": {"auto": true}, "note": "night shift"})
    );
    let (code, out, err) = run_bin(&["shadow", "get", "pump-7"], &env).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"rpm\":1200") && out.contains("version"),
        "{out}"
    );
    // A stale version: the server's 409 problem, exit 1.
    let (code, _, err) = run_bin(
        &["shadow", "set", "pump-7", "rpm=900", "--version", "0"],
        &env,
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("version"), "{err}");
    let (code, _, err) = run_bin(&["shadow", "delete", "pump-7"], &env).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_bin(&["shadow", "get", "pump-7"], &env).await;
    assert_eq!(code, 1, "{err}");

    // Fleet-wide: every device of the tenant, then its progress.
    device(&admin, "pump-8").await;
    let (code, out, err) = run_bin(&["shadow", "set-fleet", "eco=true", "--json"], &env).await;
    assert_eq!(code, 0, "{err}{out}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["progress"]["targeted"], 2, "{v}");
    assert_eq!(v["progress"]["reported"], 0, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let (code, out, err) = run_bin(&["shadow", "settings", &id], &env).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("pump-7") && out.contains("pump-8"),
        "pending devices listed: {out}"
    );
    let (code, out, err) = run_bin(&["shadow", "settings"], &env).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&id) && out.contains("reported 0 of 2"),
        "{out}"
    );
    let (code, _, err) = run_bin(&["shadow", "set-fleet", "--group", "nope", "x=1"], &env).await;
    assert_eq!(
        code, 1,
        "an unknown group selects nothing or is refused: {err}"
    );
}

/// A rule's `desired` action: a dry soil probe's reading opens its valve
/// through the irrigation shadow, and the device is told the delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_sets_desired_state_and_the_device_is_told() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    let secret = device(&admin, "probe-3").await;
    admin
        .expect(
            "POST",
            "/rules",
            Some(json!({
                "id": "irrigate",
                "sql": "SELECT device, moisture FROM 'devices/+/telemetry' WHERE moisture < 20",
                "actions": [{"type": "desired", "state": {"valve": "open"}, "shadow": "irrigation"}]
            })),
            201,
        )
        .await;
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), creds(v5("probe-3"), "probe-3", &secret)).await;
    d.subscribe(
        1,
        "devices/probe-3/shadow/name/irrigation/update/delta",
        QoS::AtLeastOnce,
    )
    .await;
    request(
        &mut d,
        2,
        "devices/probe-3/telemetry",
        json!({"moisture": 12.5}),
    )
    .await;
    let delta = answer(&mut d, "/update/delta").await;
    assert_eq!(delta["state"], json!({"valve": "open"}));
    let doc = admin
        .expect("GET", "/devices/probe-3/shadow/irrigation", None, 200)
        .await;
    assert_eq!(doc["state"]["desired"]["valve"], "open");
    d.disconnect().await;
}

/// Demand response: one call sets a setpoint on every device of a group;
/// each is told its delta (clientToken = the setting's id), and the
/// setting's progress counts the devices that have reported the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_wide_setting_reaches_a_group_and_counts_reports() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    admin
        .expect(
            "POST",
            "/tenants/default/groups",
            Some(json!({"id": "homes"})),
            201,
        )
        .await;
    for i in 0..12 {
        let group = if i < 10 { json!("homes") } else { Value::Null };
        admin
            .expect(
                "POST",
                "/devices",
                Some(json!({"id": format!("home-{i:02}"), "group": group})),
                201,
            )
            .await;
    }
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), v5("home-03")).await;
    d.subscribe(1, "devices/home-03/shadow/update/delta", QoS::AtLeastOnce)
        .await;

    let set = admin
        .expect(
            "POST",
            "/settings",
            Some(json!({"group": "homes", "state": {"setpoint": 18.5}})),
            201,
        )
        .await;
    let id = set["id"].as_str().expect("id").to_string();
    assert_eq!(set["progress"]["targeted"], 10);
    assert_eq!(set["progress"]["reported"], 0);
    let delta = answer(&mut d, "/update/delta").await;
    assert_eq!(delta["state"], json!({"setpoint": 18.5}));
    assert_eq!(delta["clientToken"], json!(id));

    // The device applies it and reports.
    request(
        &mut d,
        2,
        "devices/home-03/shadow/update",
        json!({"state": {"reported": {"setpoint": 18.5}}}),
    )
    .await;
    within("the report counted", async {
        loop {
            let s = admin
                .expect("GET", &format!("/settings/{id}"), None, 200)
                .await;
            if s["progress"]["reported"] == 1 {
                assert_eq!(s["progress"]["pending"], 9);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let list = admin.expect("GET", "/settings", None, 200).await;
    assert_eq!(list["items"][0]["id"], json!(id));
    // Nothing selected outside the group.
    let outside = admin
        .expect("GET", "/devices/home-11/shadow", None, 404)
        .await;
    assert_eq!(outside["status"], 404);
    d.disconnect().await;
}

/// Rule SQL reads the device's shadow: the alarm threshold is each
/// machine's own desired `max_temp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_read_the_shadow_of_the_device() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    for m in ["oven-1", "oven-2"] {
        admin
            .expect("POST", "/devices", Some(json!({"id": m})), 201)
            .await;
    }
    for (m, max) in [("oven-1", 200), ("oven-2", 300)] {
        admin
            .expect(
                "PATCH",
                &format!("/devices/{m}/shadow"),
                Some(json!({"state": {"desired": {"max_temp": max}}})),
                200,
            )
            .await;
    }
    admin
        .expect(
            "POST",
            "/rules",
            Some(json!({
                "id": "too-hot",
                "sql": "SELECT device, temp FROM 'devices/+/telemetry' WHERE temp > shadow.desired.max_temp",
                "actions": [{"type": "alarm", "alarm_type": "too-hot", "severity": "major"}]
            })),
            201,
        )
        .await;
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), v5("ovens")).await;
    // 250 is too hot for oven-1 (max 200), not for oven-2 (max 300).
    for (i, m) in ["oven-1", "oven-2"].iter().enumerate() {
        request(
            &mut d,
            i as u16 + 1,
            &format!("devices/{m}/telemetry"),
            json!({"temp": 250}),
        )
        .await;
    }
    // Then 350 for oven-2: over its own limit.
    request(&mut d, 3, "devices/oven-2/telemetry", json!({"temp": 350})).await;
    let alarms = within("both alarms", async {
        loop {
            let a = admin
                .expect("GET", "/alarms?status=active&type=too-hot", None, 200)
                .await;
            if a["items"].as_array().expect("items").len() == 2 {
                break a;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    // oven-2 fired once (at 350), never at 250: its own threshold applied.
    for a in alarms["items"].as_array().expect("items") {
        assert_eq!(a["count"], 1, "{a}");
    }
    d.disconnect().await;
}

/// Rules can react to a shadow change: the platform's answers are
/// published through the broker, so a rule whose FROM is
/// `devices/+/shadow/update/accepted` sees every accepted update with the
/// state as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_fires_on_an_accepted_shadow_update() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/devices", Some(json!({"id": "vault-1"})), 201)
        .await;
    admin
        .expect(
            "POST",
            "/rules",
            Some(json!({
                "id": "vault-warm",
                "sql": "SELECT device, state.reported.temp AS t FROM 'devices/+/shadow/update/accepted' WHERE state.reported.temp > 30",
                "actions": [{"type": "alarm", "alarm_type": "vault-warm", "severity": "minor"}]
            })),
            201,
        )
        .await;
    let (mut d, _) = Raw::connect_ok(srv.mqtt(), v5("vault-1")).await;
    request(
        &mut d,
        1,
        "devices/vault-1/shadow/update",
        json!({"state": {"reported": {"temp": 35}}}),
    )
    .await;
    within("the alarm", async {
        loop {
            let a = admin
                .expect("GET", "/alarms?status=active&type=vault-warm", None, 200)
                .await;
            if a["items"].as_array().expect("items").len() == 1 {
                assert_eq!(a["items"][0]["device_id"], "vault-1", "{a}");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    d.disconnect().await;
}
