//! Telemetry end to end: MQTT in (rumqttc and raw sockets), the
//! time-series store, the query API out, restarts, kill -9 under load,
//! undecodable payloads, content types, a full disk.

use crate::common::*;
use mqtt_codec::{Packet, Protocol, QoS};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

fn add_device(srv: &TestServer, id: &str, tenant: &str) {
    let reg = &srv.get().registry;
    if tenant != m2mhub_identity::DEFAULT_TENANT && reg.get_tenant(tenant).is_err() {
        reg.create_tenant(tenant, tenant).expect("tenant");
    }
    reg.create_device(m2mhub_identity::NewDevice {
        id: Some(id.into()),
        tenant: tenant.into(),
        ..Default::default()
    })
    .expect("device");
}

async fn get(srv: &TestServer, token: &str, path: &str) -> Value {
    let r = http_get_as(srv.http(), path, token).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.json()
}

fn latest_of(v: &Value, metric: &str) -> Value {
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["metric"] == metric)
        .unwrap_or_else(|| panic!("no {metric} in {v}"))["value"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_readings_are_queryable_and_survive_a_restart() {
    let mut srv = TestServer::start().await;
    add_device(&srv, "m1", m2mhub_identity::DEFAULT_TENANT);
    let token = srv.admin_token();
    let t0: i64 = 1_763_700_000_000 - 1_763_700_000_000 % 3_600_000;

    // MQTT 5 with rumqttc: a JSON batch with nested fields, QoS 1.
    let (mut c, _) = V5::connect(V5::options(srv.mqtt(), "m1")).await;
    let batch: Vec<Value> = (0..120)
        .map(|i| json!({"ts": t0 + i * 60_000, "temp": 20.0 + i as f64 / 10.0, "engine": {"rpm": 1000 + i}, "ok": i % 2 == 0}))
        .collect();
    c.client
        .publish(
            "devices/m1/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&batch).expect("json"),
        )
        .await
        .expect("publish");
    c.wait("PUBACK", |p| matches!(p, V5Packet::PubAck(_)).then_some(()))
        .await;
    // And a plain number over MQTT 3.1.1 (metric `value`, arrival time).
    let (mut c3, _) = V3::connect(V3::options(srv.mqtt(), "m1")).await;
    c3.client
        .publish(
            "devices/m1/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"42.5".to_vec(),
        )
        .await
        .expect("publish");
    c3.wait("PUBACK", |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    let latest = get(&srv, &token, "/api/v1/devices/m1/telemetry").await;
    assert_eq!(latest_of(&latest, "temp"), json!(31.9));
    assert_eq!(latest_of(&latest, "engine.rpm"), json!(1119.0));
    assert_eq!(latest_of(&latest, "ok"), json!(false));
    assert_eq!(latest_of(&latest, "value"), json!(42.5));

    let series = get(&srv, &token, "/api/v1/devices/m1/series").await;
    assert_eq!(series["items"].as_array().expect("items").len(), 4);

    let check = |srv: &TestServer, token: String| {
        let http = srv.http();
        async move {
            // Raw, paged.
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!(
                    "/api/v1/devices/m1/telemetry/temp?from={t0}&to={}&limit=50",
                    t0 + 86_400_000
                );
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let r = http_get_as(http, &path, &token).await;
                assert_eq!(r.status, 200, "{}", r.body);
                let v = r.json();
                all.extend(v["points"].as_array().expect("points").iter().cloned());
                match v["next"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => break,
                }
            }
            assert_eq!(all.len(), 120);
            assert_eq!(all[0], json!([t0, 20.0]));
            // Hourly aggregates: two full hours of one-minute data.
            let r = http_get_as(
                http,
                &format!("/api/v1/telemetry/aggregate?metric=temp&device=m1&from={t0}&to={}&bucket=1h&fn=avg,min,max,count", t0 + 2 * 3_600_000),
                &token,
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            let v = r.json();
            let b = &v["series"][0]["buckets"];
            assert_eq!(b[0]["count"], json!(60.0));
            assert_eq!(b[0]["min"], json!(20.0));
            assert_eq!(b[0]["max"], json!(25.9));
            assert_eq!(b[1]["count"], json!(60.0));
            assert!((b[0]["avg"].as_f64().expect("avg") - 22.95).abs() < 1e-9);
            // CSV export of the whole range.
            let r = http_get_as(
                http,
                &format!(
                    "/api/v1/devices/m1/telemetry/temp?from={t0}&to={}&format=csv&all=true&limit=7",
                    t0 + 86_400_000
                ),
                &token,
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(r
                .header("content-type")
                .is_some_and(|h| h.starts_with("text/csv")));
            let lines: Vec<&str> = r.body.lines().collect();
            assert_eq!(lines.len(), 121, "{}", r.body);
            assert_eq!(lines[0], "ts_ms,time,value");
            assert!(lines[1].starts_with(&format!("{t0},")), "{}", lines[1]);
        }
    };
    check(&srv, token.clone()).await;
    c3.disconnect().await;
    srv.restart().await;
    let token = srv.admin_token();
    check(&srv, token.clone()).await;
    // The latest values come back too (from the WAL replay).
    let latest = get(&srv, &token, "/api/v1/devices/m1/telemetry").await;
    assert_eq!(latest_of(&latest, "temp"), json!(31.9));
    // After a flush to partition files, and another restart.
    srv.get().tsdb.flush().expect("flush");
    srv.restart().await;
    check(&srv, srv.admin_token()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payloads_are_kept_as_device_events() {
    let srv = TestServer::start().await;
    add_device(&srv, "m2", m2mhub_identity::DEFAULT_TENANT);
    let token = srv.admin_token();
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("m2")).await;
    // Acknowledged normally (the broker took the message) and routed.
    let code = c
        .publish(publish(
            "devices/m2/telemetry",
            QoS::AtLeastOnce,
            1,
            "{not json",
        ))
        .await;
    assert_eq!(code, 0x10, "no subscribers, but accepted");
    let code = c
        .publish(publish(
            "devices/m2/telemetry",
            QoS::AtLeastOnce,
            2,
            "{\"t\": 1}",
        ))
        .await;
    assert!(code < 0x80);
    srv.get().registry.flush().expect("flush");
    let v = get(&srv, &token, "/api/v1/devices/m2/events?kind=decode_error").await;
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{v}");
    let detail = items[0]["detail"].as_str().expect("detail");
    assert!(detail.contains("invalid JSON"), "{detail}");
    let metrics = http_get(srv.http(), "/metrics").await.body;
    assert!(
        metrics.contains("m2mhub_telemetry_decode_errors_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("m2mhub_telemetry_points_total 1"),
        "{metrics}"
    );
    // The good reading was stored.
    let latest = get(&srv, &token, "/api/v1/devices/m2/telemetry").await;
    assert_eq!(latest_of(&latest, "t"), json!(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_comes_from_the_property_then_the_profile() {
    let srv = TestServer::start().await;
    add_device(&srv, "m3", m2mhub_identity::DEFAULT_TENANT);
    let token = srv.admin_token();
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("m3")).await;
    // A SenML pack declared by the MQTT 5 content-type property.
    let mut p = publish(
        "devices/m3/telemetry",
        QoS::AtLeastOnce,
        1,
        r#"[{"bn":"m3/","n":"temp","v":21.5,"t":1700000000},{"n":"hum","v":40}]"#,
    );
    p.properties.content_type = Some("application/senml+json".into());
    assert!(c.publish(p).await < 0x80);
    let latest = get(&srv, &token, "/api/v1/devices/m3/telemetry").await;
    assert_eq!(latest_of(&latest, "m3/temp"), json!(21.5));
    // A plain number declared as JSON-in-text by the profile: `text/plain`.
    let r = http_request(
        srv.http(),
        "POST",
        "/api/v1/profiles",
        Some(&token),
        Some(&json!({"name": "plain", "content_type": "text/plain"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = http_request(
        srv.http(),
        "PATCH",
        "/api/v1/devices/m3",
        Some(&token),
        Some(&json!({"profile": "plain"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // `[7]` would be sniffed as a JSON batch (and refused: not an object);
    // the profile says plain text, which is not a number either: refused
    // with the profile's content type named in the event.
    assert!(
        c.publish(publish("devices/m3/telemetry", QoS::AtLeastOnce, 2, "7.25"))
            .await
            < 0x80
    );
    let latest = get(&srv, &token, "/api/v1/devices/m3/telemetry").await;
    assert_eq!(latest_of(&latest, "value"), json!(7.25));
    assert!(
        c.publish(publish(
            "devices/m3/telemetry",
            QoS::AtLeastOnce,
            3,
            r#"{"x":1}"#
        ))
        .await
            < 0x80
    );
    srv.get().registry.flush().expect("flush");
    let v = get(&srv, &token, "/api/v1/devices/m3/events").await;
    let detail = v["items"][0]["detail"].as_str().expect("event").to_string();
    assert!(detail.contains("PlainNumber"), "{detail}");
    // An unknown declared type is an event, not a guess.
    let mut p = publish("devices/m3/telemetry", QoS::AtLeastOnce, 4, "1");
    p.properties.content_type = Some("image/png".into());
    assert!(c.publish(p).await < 0x80);
    srv.get().registry.flush().expect("flush");
    let v = get(&srv, &token, "/api/v1/devices/m3/events").await;
    assert!(v["items"][0]["detail"]
        .as_str()
        .expect("event")
        .contains("image/png"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_user_sees_only_its_own_telemetry() {
    let srv = TestServer::start().await;
    add_device(&srv, "a1", "alpha");
    add_device(&srv, "b1", "beta");
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("a1")).await;
    assert!(
        c.publish(publish(
            "devices/a1/telemetry",
            QoS::AtLeastOnce,
            1,
            r#"{"temp":5}"#
        ))
        .await
            < 0x80
    );
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("b1")).await;
    assert!(
        c.publish(publish(
            "devices/b1/telemetry",
            QoS::AtLeastOnce,
            1,
            r#"{"temp":7}"#
        ))
        .await
            < 0x80
    );
    let reg = &srv.get().registry;
    reg.create_user(
        "alice",
        "a-long-password-1",
        m2mhub_identity::Role::Viewer,
        Some("alpha"),
    )
    .expect("user");
    let (_, alice) = reg
        .create_api_token("alice", m2mhub_identity::Role::Viewer, None, "tests")
        .expect("token");
    assert_eq!(
        http_get_as(srv.http(), "/api/v1/devices/a1/telemetry", &alice)
            .await
            .status,
        200
    );
    assert_eq!(
        http_get_as(srv.http(), "/api/v1/devices/b1/telemetry", &alice)
            .await
            .status,
        404
    );
    assert_eq!(
        http_get_as(srv.http(), "/api/v1/devices/b1/telemetry/temp", &alice)
            .await
            .status,
        404
    );
    // The tenant-wide aggregate covers alpha's devices only.
    let v = get(
        &srv,
        &alice,
        "/api/v1/telemetry/aggregate?metric=temp&from=-1h&to=now&bucket=1h",
    )
    .await;
    let devices: Vec<&str> = v["series"]
        .as_array()
        .expect("series")
        .iter()
        .map(|s| s["device"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(devices, ["a1"]);
    let r = http_get_as(
        srv.http(),
        "/api/v1/telemetry/aggregate?metric=temp&device=b1",
        &alice,
    )
    .await;
    assert_eq!(r.status, 404);
    // Viewers cannot change retention.
    let r = http_request(
        srv.http(),
        "PUT",
        "/api/v1/telemetry/retention",
        Some(&alice),
        Some(&json!({"rules": []})),
    )
    .await;
    assert_eq!(r.status, 403);
    // Bad parameters are problem documents naming the parameter.
    let r = http_get_as(
        srv.http(),
        "/api/v1/telemetry/aggregate?metric=temp&bucket=1y",
        &alice,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("bucket"), "{}", r.body);
    let r = http_get_as(
        srv.http(),
        "/api/v1/devices/a1/telemetry/temp?from=yesterday",
        &alice,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_rules_are_set_through_the_api_and_audited() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    let r = http_request(
        srv.http(),
        "PUT",
        "/api/v1/telemetry/retention",
        Some(&token),
        Some(&json!({"rules": [{"tenant": "alpha", "days": 7}, {"metric": "debug.trace", "days": 1}]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = get(&srv, &token, "/api/v1/telemetry/retention").await;
    assert_eq!(v["rules"].as_array().expect("rules").len(), 2);
    assert_eq!(v["rules"][0]["days"], json!(7));
    let audit = get(&srv, &token, "/api/v1/audit").await;
    assert!(
        audit.to_string().contains("telemetry.retention.set"),
        "{audit}"
    );
    let r = http_request(
        srv.http(),
        "PUT",
        "/api/v1/telemetry/retention",
        Some(&token),
        Some(&json!({"rules": [{"days": 0}]})),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_telemetry_with_a_reason_code() {
    let srv = TestServer::with(|s| s.telemetry.min_free_mb = u64::MAX / (1 << 20)).await;
    add_device(&srv, "m4", m2mhub_identity::DEFAULT_TENANT);
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("m4")).await;
    let code = c
        .publish(publish(
            "devices/m4/telemetry",
            QoS::AtLeastOnce,
            1,
            r#"{"t":1}"#,
        ))
        .await;
    assert_eq!(code, 0x97, "quota exceeded: the store cannot take it");
    // Other topics are unaffected, and the connection stays up.
    let code = c
        .publish(publish("devices/m4/state", QoS::AtLeastOnce, 2, "on"))
        .await;
    assert_eq!(code, 0x10);
    let code = c
        .publish(publish(
            "devices/m4/telemetry",
            QoS::AtLeastOnce,
            3,
            r#"{"t":2}"#,
        ))
        .await;
    assert_eq!(code, 0x97);
    let metrics = http_get(srv.http(), "/metrics").await.body;
    assert!(metrics.contains("m2mhub_tsdb_disk_full 1"), "{metrics}");
    assert!(
        metrics.contains("m2mhub_telemetry_refused_messages_total 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    {
        let reg = m2mhub_identity::Registry::open(&data.join("registry")).expect("registry");
        reg.create_device(m2mhub_identity::NewDevice {
            id: Some("k9".into()),
            tenant: m2mhub_identity::DEFAULT_TENANT.into(),
            ..Default::default()
        })
        .expect("device");
        reg.flush().expect("flush");
    }
    let mut srv = BinServer::start(&data, &dir.path().join("log-1")).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt, v5("k9")).await;
    // A pipelined stream of QoS 1 readings, each with its own timestamp;
    // the process is killed while they are being acknowledged.
    let n: u16 = 20_000;
    let t0: i64 = 1_700_000_000_000;
    let mut stream = Vec::new();
    for i in 0..n {
        let body = format!(
            "{{\"ts\":{},\"seq\":{i},\"a\":1.5,\"b\":2.5,\"c\":3.5}}",
            t0 + i64::from(i)
        );
        stream.extend_from_slice(&bytes_of(
            &Packet::Publish(publish(
                "devices/k9/telemetry",
                QoS::AtLeastOnce,
                i + 1,
                body,
            )),
            Protocol::V5,
        ));
    }
    p.send_raw(&stream).await;
    let mut acked = BTreeSet::new();
    while acked.len() < usize::from(n / 10) {
        match p.recv().await {
            Packet::PubAck(a) => {
                assert_eq!(a.reason_code, 0x10);
                acked.insert(a.packet_id - 1);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    srv.kill9().await;
    loop {
        match p.next(Duration::from_secs(2)).await {
            Next::Packet(Packet::PubAck(a)) => {
                acked.insert(a.packet_id - 1);
            }
            Next::Packet(other) => panic!("unexpected {other:?}"),
            Next::Closed => break,
            Next::Timeout => panic!("publisher connection not closed by the kill"),
        }
    }
    let srv = BinServer::start(&data, &dir.path().join("log-2")).await;
    drop(srv);
    // Read the store directly (the server is gone; the data directory is
    // what a restart would load).
    let db = m2mhub_tsdb::Tsdb::open(&data.join("tsdb"), m2mhub_tsdb::Options::default())
        .expect("open tsdb");
    let mut stored = BTreeSet::new();
    let mut after = None;
    loop {
        let page = db
            .raw(&m2mhub_tsdb::RawQuery {
                tenant: m2mhub_identity::DEFAULT_TENANT,
                device: "k9",
                metric: "seq",
                from_ms: t0,
                to_ms: t0 + i64::from(n),
                limit: 10_000,
                after,
            })
            .expect("raw");
        for pt in &page.points {
            if let m2mhub_tsdb::Value::F64(v) = pt.value {
                stored.insert(v as u16);
                assert_eq!(pt.ts_ms, t0 + v as i64, "point at its own timestamp");
            }
        }
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    eprintln!(
        "telemetry kill -9: {} of {n} acknowledged before the kill, {} stored after the restart",
        acked.len(),
        stored.len()
    );
    let missing: Vec<u16> = acked.difference(&stored).copied().collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged readings lost after kill -9: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
}
