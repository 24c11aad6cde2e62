//! Rules end to end, the seeds' own scenarios: a factory machine that
//! overheats gets a critical alarm and a `shutdown` command, answers it,
//! and the alarm clears when it cools down; a truck leaving its geofence
//! raises an alarm and calls a signed webhook served by the test.
//!
//! Durations are scaled down (1 s windows, 3 s instead of 30 s) because
//! the server runs on the wall clock; the full 10 s / 30 s rule is tested
//! with explicit time in `crates/rules`.

use crate::common::*;
use mqtt_codec::{Packet, QoS};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn alarms(srv: &TestServer, token: &str, query: &str) -> Vec<Value> {
    api(srv, token, "GET", &format!("/alarms?{query}"), None).await["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overheating_machine_gets_an_alarm_and_a_shutdown_command() {
    let srv = TestServer::start().await;
    add_default_device(&srv, "press-1");
    let token = srv.admin_token();
    let rule = api(
        &srv,
        &token,
        "POST",
        "/rules",
        Some(json!({
            "id": "overheating",
            "sql": "SELECT device, avg(temperature) AS t, max(vibration) AS v FROM 'devices/+/telemetry' \
                    GROUP BY device, TUMBLING(1s) \
                    HAVING avg(temperature) > 85 FOR 3s OR max(vibration) > 7 \
                    CLEAR WHEN avg(temperature) < 75",
            "actions": [
                {"type": "alarm", "alarm_type": "overheating", "severity": "critical"},
                {"type": "command", "name": "shutdown", "params": {"reason": "overheating"}, "timeout_secs": 30}
            ]
        })),
    )
    .await;
    assert_eq!(rule["enabled"], true);

    // The machine listens for commands and reports every 100 ms.
    let (mut m, _) = Raw::connect_ok(srv.mqtt(), v5("press-1")).await;
    m.subscribe(1, "devices/press-1/commands", QoS::AtLeastOnce)
        .await;
    let start = Instant::now();
    let mut pid = 10u16;
    let command = loop {
        pid += 1;
        let code = m
            .publish(publish(
                "devices/press-1/telemetry",
                QoS::AtLeastOnce,
                pid,
                r#"{"temperature": 91.5, "vibration": 2.0}"#,
            ))
            .await;
        assert!(code < 0x80);
        match m.next(Duration::from_millis(100)).await {
            Next::Packet(Packet::Publish(p)) => break p,
            Next::Packet(other) => panic!("unexpected {other:?}"),
            Next::Timeout => {}
            Next::Closed => panic!("machine disconnected"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no shutdown command after 15 s of heat"
        );
    };
    let waited = start.elapsed();
    // Hot for 3 s, not for one reading. The duration counts from the start
    // of the first hot window, which is aligned to the second and so may
    // begin up to 1 s before the first reading: at least 2 s after it.
    assert!(
        waited >= Duration::from_millis(2_000),
        "fired after {waited:?}: too early"
    );
    assert_eq!(command.topic, "devices/press-1/commands");
    let body: Value = serde_json::from_slice(&command.payload).expect("JSON command");
    assert_eq!(body["name"], "shutdown");
    assert_eq!(body["params"]["reason"], "overheating");
    let id = body["id"].as_str().expect("command id").to_string();
    assert_eq!(
        command.properties.correlation_data.as_deref(),
        Some(id.as_bytes()),
        "MQTT 5 correlation data carries the command id"
    );
    assert_eq!(
        command.properties.response_topic.as_deref(),
        Some("devices/press-1/commands/response")
    );
    if let Some(pid) = command.packet_id {
        m.puback(pid).await;
    }
    let active = alarms(&srv, &token, "status=active&device=press-1").await;
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(active[0]["type"], "overheating");
    assert_eq!(active[0]["severity"], "critical");
    assert_eq!(active[0]["rule_id"], "overheating");

    // The machine shuts down and answers, correlated.
    let mut answer = publish(
        "devices/press-1/commands/response",
        QoS::AtLeastOnce,
        900,
        r#"{"status": "ok", "state": "stopped"}"#,
    );
    answer.properties.correlation_data = Some(bytes::Bytes::from(id.clone().into_bytes()));
    assert!(m.publish(answer).await < 0x80);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = api(&srv, &token, "GET", &format!("/commands/{id}"), None).await;
        if c["status"] == "answered" {
            assert_eq!(c["response"]["state"], "stopped");
            assert_eq!(c["origin"], "rule:overheating");
            break;
        }
        assert!(Instant::now() < deadline, "command not answered: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Cooling down below 75 clears the alarm (hysteresis: 80 would not).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        pid += 1;
        m.publish(publish(
            "devices/press-1/telemetry",
            QoS::AtLeastOnce,
            pid,
            r#"{"temperature": 70.0, "vibration": 1.0}"#,
        ))
        .await;
        let cleared = alarms(&srv, &token, "status=cleared&device=press-1").await;
        if !cleared.is_empty() {
            assert_eq!(cleared[0]["cleared_by"], "rule");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alarm not cleared after cooling down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(alarms(&srv, &token, "status=active&device=press-1")
        .await
        .is_empty());
    let shown = api(&srv, &token, "GET", "/rules/overheating", None).await;
    assert!(
        shown["counters"]["fired"].as_u64().unwrap_or(0) >= 1,
        "{shown}"
    );
    assert_eq!(shown["counters"]["cleared"], 1, "{shown}");
    assert_eq!(shown["counters"]["action_failures"], 0, "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vibration_alone_fires_at_once() {
    let srv = TestServer::start().await;
    add_default_device(&srv, "press-2");
    let token = srv.admin_token();
    api(
        &srv,
        &token,
        "POST",
        "/rules",
        Some(json!({
            "sql": "SELECT device, max(vibration) AS v FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(1s) HAVING avg(temperature) > 85 FOR 30s OR max(vibration) > 7",
            "actions": [{"type": "alarm", "alarm_type": "overheating", "severity": "critical"}]
        })),
    )
    .await;
    let (mut m, _) = Raw::connect_ok(srv.mqtt(), v5("press-2")).await;
    m.publish(publish(
        "devices/press-2/telemetry",
        QoS::AtLeastOnce,
        1,
        r#"{"temperature": 40, "vibration": 9.5}"#,
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while alarms(&srv, &token, "status=active&device=press-2")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "a vibration spike raises the alarm when its window closes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A one-shot HTTP server: records each request's head and body, answers 200.
async fn webhook_server() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        let body = buf[end + 4..end + 4 + len].to_vec();
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        let _ = tx.send((head, body));
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truck_leaving_its_geofence_raises_an_alarm_and_calls_a_signed_webhook() {
    let srv = TestServer::start().await;
    add_default_device(&srv, "truck-7");
    let token = srv.admin_token();
    let (hook, mut calls) = webhook_server().await;
    api(
        &srv,
        &token,
        "POST",
        "/rules",
        Some(json!({
            "id": "depot-fence",
            "sql": "SELECT device, lat, lon FROM 'devices/+/telemetry' WHERE NOT inside(lat, lon, 'POLYGON((2.30 48.80, 2.40 48.80, 2.40 48.90, 2.30 48.90))')",
            "actions": [
                {"type": "alarm", "alarm_type": "geofence_exit", "severity": "major"},
                {"type": "webhook", "url": format!("http://{hook}/fleet/events"), "secret": "s3cret"}
            ]
        })),
    )
    .await;
    let (mut t, _) = Raw::connect_ok(srv.mqtt(), v5("truck-7")).await;
    // Inside the depot: nothing happens.
    t.publish(publish(
        "devices/truck-7/telemetry",
        QoS::AtLeastOnce,
        1,
        r#"{"lat": 48.85, "lon": 2.35}"#,
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(calls.try_recv().is_err(), "no webhook while inside");
    assert!(alarms(&srv, &token, "status=active&device=truck-7")
        .await
        .is_empty());
    // Out of the fence.
    t.publish(publish(
        "devices/truck-7/telemetry",
        QoS::AtLeastOnce,
        2,
        r#"{"lat": 48.95, "lon": 2.35}"#,
    ))
    .await;
    let (head, body) = within("webhook call", calls.recv())
        .await
        .expect("a webhook call");
    assert!(head.starts_with("POST /fleet/events HTTP/1.1"), "{head}");
    let sig = head
        .lines()
        .find_map(|l| l.strip_prefix("X-M2mhub-Signature: "))
        .expect("signature header");
    assert_eq!(sig, m2mhub_automation::webhook::sign("s3cret", &body));
    let event: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(event["rule"], "depot-fence");
    assert_eq!(event["event"], "fire");
    assert_eq!(event["device"], "truck-7");
    assert_eq!(event["row"]["lat"], 48.95);
    let active = alarms(&srv, &token, "status=active&device=truck-7").await;
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["type"], "geofence_exit");
    // Back inside: the alarm clears and the webhook hears about it.
    t.publish(publish(
        "devices/truck-7/telemetry",
        QoS::AtLeastOnce,
        3,
        r#"{"lat": 48.85, "lon": 2.36}"#,
    ))
    .await;
    let (_, body) = within("webhook call on clear", calls.recv())
        .await
        .expect("a second call");
    let event: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(event["event"], "clear");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !alarms(&srv, &token, "status=active&device=truck-7")
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "alarm not cleared on re-entry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = http_get(srv.http(), "/metrics").await.body;
    assert!(
        metrics.contains("m2mhub_rules_webhooks_delivered_total 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_see_only_their_own_tenant_and_bad_messages_are_counted() {
    let srv = TestServer::start().await;
    let reg = &srv.get().registry;
    reg.create_tenant("beta", "Beta").expect("tenant");
    add_default_device(&srv, "a-1");
    reg.create_device(m2mhub_identity::NewDevice {
        id: Some("b-1".into()),
        tenant: "beta".into(),
        ..Default::default()
    })
    .expect("device");
    let token = srv.admin_token();
    api(
        &srv,
        &token,
        "POST",
        "/rules",
        Some(json!({
            "id": "hot",
            "sql": "SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > 85",
            "actions": [{"type": "alarm", "alarm_type": "hot"}]
        })),
    )
    .await;
    let (mut b, _) = Raw::connect_ok(srv.mqtt(), v5("b-1")).await;
    b.publish(publish(
        "devices/b-1/telemetry",
        QoS::AtLeastOnce,
        1,
        r#"{"temperature": 99}"#,
    ))
    .await;
    let (mut a, _) = Raw::connect_ok(srv.mqtt(), v5("a-1")).await;
    a.publish(publish(
        "devices/a-1/telemetry",
        QoS::AtLeastOnce,
        1,
        r#"{"humidity": 40}"#,
    ))
    .await;
    a.publish(publish(
        "devices/a-1/telemetry",
        QoS::AtLeastOnce,
        2,
        r#"{"temperature": 95}"#,
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while alarms(&srv, &token, "status=active&device=a-1")
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "a-1's alarm");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        alarms(&srv, &token, "status=active&device=b-1")
            .await
            .is_empty(),
        "a default-tenant rule never sees beta's devices"
    );
    let shown = api(&srv, &token, "GET", "/rules/hot", None).await;
    let c = &shown["counters"];
    assert_eq!(c["received"], 2, "{shown}");
    assert_eq!(c["failed"], 1, "the reading without a temperature: {shown}");
    assert!(
        c["last_error"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("temperature"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_read_device_attributes() {
    let srv = TestServer::start().await;
    let reg = &srv.get().registry;
    for (id, site) in [("n-1", "north"), ("s-1", "south")] {
        reg.create_device(m2mhub_identity::NewDevice {
            id: Some(id.into()),
            tenant: m2mhub_identity::DEFAULT_TENANT.into(),
            labels: [("site".to_string(), site.to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .expect("device");
    }
    let token = srv.admin_token();
    api(
        &srv,
        &token,
        "POST",
        "/rules",
        Some(json!({
            "sql": "SELECT device FROM 'devices/+/telemetry' WHERE meta.labels.site = 'north' AND temperature > 50",
            "actions": [{"type": "alarm", "alarm_type": "north-hot"}]
        })),
    )
    .await;
    for id in ["s-1", "n-1"] {
        let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5(id)).await;
        c.publish(publish(
            &format!("devices/{id}/telemetry"),
            QoS::AtLeastOnce,
            1,
            r#"{"temperature": 60}"#,
        ))
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while alarms(&srv, &token, "status=active&device=n-1")
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "n-1 is north and hot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(alarms(&srv, &token, "status=active&device=s-1")
        .await
        .is_empty());
}
