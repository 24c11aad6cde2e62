//! Gateways against the real server: a Sparkplug B edge node (a registered
//! device whose node id is its device id) publishes births, data and its
//! death over MQTT; a ChirpStack bridge publishes v4 integration events in
//! its own namespace. Points are stored and routed on the devices'
//! telemetry topics, devices behind the gateways are registered in the
//! gateway's tenant, rebirths are requested, commands become downlinks,
//! and nothing crosses tenants.

use crate::common::*;
use bytes::Bytes;
use m2mhub_gateways::sparkplug::{encode_payload, DataType, Metric, MetricValue, Payload};
use mqtt_codec::{reason, Packet, Publish, QoS};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn connect_as(srv: &TestServer, id: &str, secret: &str) -> Raw {
    let mut c = v5(id);
    c.username = Some(id.into());
    c.password = Some(Bytes::from(secret.to_string()));
    Raw::connect_ok(srv.mqtt(), c).await.0
}

fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    encode_payload(&Payload {
        timestamp: Some(u64::try_from(m2mhub_identity::now_ms()).expect("now")),
        metrics,
        seq: Some(seq),
        ..Payload::default()
    })
}

async fn send(raw: &mut Raw, pid: u16, topic: &str, body: Vec<u8>) -> u8 {
    raw.publish(publish(topic, QoS::AtLeastOnce, pid, body))
        .await
}

/// PUBACK success (0x10: nobody subscribed, which is fine).
fn accepted(code: u8) {
    assert!(code < 0x80, "refused: {code:#x}");
}

/// Poll `GET path` until `pred` holds on the JSON (the API reads what the
/// store has; points arrive with the publish's acknowledgement).
async fn until(admin: &Api, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin.call("GET", path, None).await;
        if r.status == 200 {
            let v = r.json();
            if pred(&v) {
                return v;
            }
        }
        assert!(Instant::now() < deadline, "{what}: GET {path}: {}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn latest_value(v: &Value, metric: &str) -> Option<Value> {
    v["items"]
        .as_array()?
        .iter()
        .find(|m| m["metric"] == metric)
        .map(|m| m["value"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparkplug_edge_node_births_publishes_and_dies() {
    let srv = TestServer::with(|s| s.gateways.sparkplug_host_id = "scada".into()).await;
    let admin = Api::admin(&srv);
    let secret = registered_device(&admin, "plc-1", None).await;
    let other = registered_device(&admin, "plc-2", None).await;

    // An observer of the telemetry topics: Sparkplug data is routed there.
    let (mut watch, _) = Raw::connect_ok(srv.mqtt(), v5("watcher")).await;
    watch
        .subscribe(1, "devices/+/telemetry", QoS::AtMostOnce)
        .await;

    let mut node = connect_as(&srv, "plc-1", &secret).await;
    // The primary host says it is online (retained), as edge nodes expect.
    node.subscribe(1, "spBv1.0/STATE/+", QoS::AtMostOnce).await;
    let state = node.recv_publish().await;
    assert_eq!(state.topic, "spBv1.0/STATE/scada");
    assert!(state.retain);
    let state: Value = serde_json::from_slice(&state.payload).expect("STATE JSON");
    assert_eq!(state["online"], true);
    node.subscribe(2, "spBv1.0/plant/NCMD/plc-1", QoS::AtMostOnce)
        .await;
    let birth = payload(
        0,
        vec![
            Metric::birth("bdSeq", None, DataType::UInt64, MetricValue::LongValue(0)),
            Metric::birth(
                "Temperature",
                Some(1),
                DataType::Double,
                MetricValue::DoubleValue(20.5),
            ),
            Metric::birth(
                "Running",
                Some(2),
                DataType::Boolean,
                MetricValue::BooleanValue(true),
            ),
        ],
    );
    accepted(send(&mut node, 1, "spBv1.0/plant/NBIRTH/plc-1", birth).await);
    let data = payload(1, vec![Metric::aliased(1, MetricValue::DoubleValue(21.25))]);
    accepted(send(&mut node, 2, "spBv1.0/plant/NDATA/plc-1", data).await);
    let dbirth = payload(
        2,
        vec![Metric::birth(
            "Speed",
            Some(10),
            DataType::Float,
            MetricValue::FloatValue(100.0),
        )],
    );
    accepted(send(&mut node, 3, "spBv1.0/plant/DBIRTH/plc-1/pump", dbirth).await);
    let ddata = payload(3, vec![Metric::aliased(10, MetricValue::FloatValue(120.0))]);
    accepted(send(&mut node, 4, "spBv1.0/plant/DDATA/plc-1/pump", ddata).await);

    // Stored, by the birth's metric names.
    until(&admin, "/devices/plc-1/telemetry", "NDATA stored", |v| {
        latest_value(v, "Temperature") == Some(json!(21.25))
    })
    .await;
    // The device behind the node was registered in the node's tenant.
    let pump = admin.expect("GET", "/devices/plc-1.pump", None, 200).await;
    assert_eq!(pump["labels"]["sparkplug"], "plant/plc-1/pump", "{pump}");
    assert_eq!(pump["labels"]["gateway"], "plc-1");
    until(
        &admin,
        "/devices/plc-1.pump/telemetry",
        "DDATA stored",
        |v| latest_value(v, "Speed") == Some(json!(120.0)),
    )
    .await;
    // Routed as JSON on the devices' telemetry topics.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let p = watch.recv_publish().await;
        seen.push((p.topic.clone(), text(&p)));
    }
    assert!(
        seen.iter()
            .any(|(t, b)| t == "devices/plc-1/telemetry" && b.contains("\"Temperature\":21.25")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(t, b)| t == "devices/plc-1.pump/telemetry" && b.contains("\"Speed\":120")),
        "{seen:?}"
    );

    // Data with an alias no birth defined: the node is asked to rebirth.
    let unknown = payload(4, vec![Metric::aliased(99, MetricValue::DoubleValue(1.0))]);
    accepted(send(&mut node, 5, "spBv1.0/plant/NDATA/plc-1", unknown).await);
    let rebirth: Publish = node
        .recv_where("a rebirth request", |p| match p {
            Packet::Publish(p) if p.topic == "spBv1.0/plant/NCMD/plc-1" => Some(p.clone()),
            _ => None,
        })
        .await;
    let cmd = m2mhub_gateways::sparkplug::decode_payload(&rebirth.payload).expect("NCMD payload");
    assert!(
        cmd.metrics
            .iter()
            .any(|m| m.name.as_deref() == Some("Node Control/Rebirth")
                && m.value == Some(MetricValue::BooleanValue(true))),
        "{cmd:?}"
    );

    // Another device cannot speak for this node.
    let mut intruder = connect_as(&srv, "plc-2", &other).await;
    let forged = payload(5, vec![Metric::aliased(1, MetricValue::DoubleValue(-1.0))]);
    assert_eq!(
        send(&mut intruder, 1, "spBv1.0/plant/NDATA/plc-1", forged).await,
        reason::NOT_AUTHORIZED
    );

    // The death certificate takes the node offline (a device event).
    let death = payload(
        0,
        vec![Metric::birth(
            "bdSeq",
            None,
            DataType::UInt64,
            MetricValue::LongValue(0),
        )],
    );
    accepted(send(&mut node, 6, "spBv1.0/plant/NDEATH/plc-1", death).await);
    until(
        &admin,
        "/devices/plc-1/events?kind=sparkplug_offline",
        "the death is recorded",
        |v| !v["items"].as_array().map(Vec::is_empty).unwrap_or(true),
    )
    .await;
    assert_eq!(
        scrape(srv.http(), "m2mhub_gateway_sparkplug_rebirths_total").await,
        1
    );
    assert!(scrape(srv.http(), "m2mhub_gateway_sparkplug_messages_total").await >= 6);
    let latest = admin
        .expect("GET", "/devices/plc-1/telemetry", None, 200)
        .await;
    assert_eq!(
        latest_value(&latest, "Temperature"),
        Some(json!(21.25)),
        "the forged value was not stored"
    );
}

/// ChirpStack v4's `up` event as its MQTT integration publishes it (JSON
/// mapping of `integration.proto`).
fn uplink(dev_eui: &str, object: Option<Value>, data: &str) -> Vec<u8> {
    let mut up = json!({
        "deduplicationId": "5f2c7a4e-8e1a-4f4b-9b7c-3b1f0d6a9e21",
        "time": "2026-12-06T10:15:30.123456789+00:00",
        "deviceInfo": {
            "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
            "tenantName": "ChirpStack",
            "applicationId": "cold-chain",
            "applicationName": "Cold chain",
            "deviceProfileId": "14855bf7-d10d-4aee-b618-ebfcb64dc7ad",
            "deviceProfileName": "Temperature sensor",
            "deviceName": "freezer-3",
            "devEui": dev_eui,
            "tags": {"site": "depot-north"}
        },
        "devAddr": "01ab5c3d",
        "adr": true,
        "dr": 5,
        "fCnt": 421,
        "fPort": 2,
        "data": data,
        "rxInfo": [{
            "gatewayId": "0016c001f153a14d",
            "uplinkId": 1234,
            "rssi": -97,
            "snr": 7.5,
            "crcStatus": "CRC_OK"
        }],
        "txInfo": {"frequency": 868100000, "modulation": {"lora": {"bandwidth": 125000, "spreadingFactor": 7, "codeRate": "CR_4_5"}}}
    });
    if let Some(o) = object {
        up["object"] = o;
    }
    up.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chirpstack_bridge_feeds_lorawan_devices_and_carries_their_downlinks() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    admin
        .expect("POST", "/tenants", Some(json!({"id": "cold"})), 201)
        .await;
    let secret = registered_device(&admin, "lns-1", Some("cold")).await;
    let mut bridge = connect_as(&srv, "lns-1", &secret).await;
    // ChirpStack's command_topic, inside the bridge's namespace.
    bridge
        .subscribe(
            1,
            "devices/lns-1/chirpstack/application/+/device/+/command/+",
            QoS::AtMostOnce,
        )
        .await;
    let eui = "0018b20000001a2b";
    let topic = format!("devices/lns-1/chirpstack/application/cold-chain/device/{eui}/event/up");
    let object =
        json!({"temperature": -18.5, "battery": {"voltage": 3.61, "low": false}, "door": "closed"});
    accepted(
        send(
            &mut bridge,
            1,
            &topic,
            uplink(eui, Some(object), "AQnEAmQ="),
        )
        .await,
    );

    // The device was registered by its DevEUI in the bridge's tenant.
    let d = admin
        .expect("GET", &format!("/devices/{eui}"), None, 200)
        .await;
    assert_eq!(d["tenant"], "cold", "{d}");
    assert_eq!(d["name"], "freezer-3");
    assert_eq!(d["labels"]["lorawan"], "true");
    let latest = until(
        &admin,
        &format!("/devices/{eui}/telemetry"),
        "uplink stored",
        |v| latest_value(v, "temperature") == Some(json!(-18.5)),
    )
    .await;
    assert_eq!(latest_value(&latest, "battery.voltage"), Some(json!(3.61)));
    assert_eq!(latest_value(&latest, "rssi"), Some(json!(-97.0)));

    // An uplink without `object`: the device profile's decoder reads the
    // bytes (here a CBOR map {"t": 4.5}).
    let cbor = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode([0xa1, 0x61, b't', 0xf9, 0x44, 0x80])
    };
    accepted(send(&mut bridge, 2, &topic, uplink(eui, None, &cbor)).await);
    until(
        &admin,
        &format!("/devices/{eui}/telemetry"),
        "raw uplink decoded",
        |v| latest_value(v, "t") == Some(json!(4.5)),
    )
    .await;

    // A command to the LoRaWAN device becomes a ChirpStack downlink.
    let sent = admin
        .expect(
            "POST",
            &format!("/devices/{eui}/commands"),
            Some(json!({"name": "defrost", "params": {"f_port": 5, "minutes": 10}})),
            202,
        )
        .await;
    let down: Publish = bridge
        .recv_where("a downlink", |p| match p {
            Packet::Publish(p) if p.topic.ends_with("/command/down") => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        down.topic,
        format!("devices/lns-1/chirpstack/application/cold-chain/device/{eui}/command/down")
    );
    let body: Value = serde_json::from_slice(&down.payload).expect("downlink JSON");
    assert_eq!(body["devEui"], eui);
    assert_eq!(body["fPort"], 5);
    assert_eq!(body["object"]["command"], "defrost");
    assert_eq!(body["object"]["id"], sent["id"]);

    // Bad documents are kept as events of the bridge, never stored.
    accepted(send(&mut bridge, 3, &topic, b"{\"fCnt\": \"x\"".to_vec()).await);
    until(
        &admin,
        "/devices/lns-1/events?kind=chirpstack_rejected",
        "a bad event is recorded",
        |v| !v["items"].as_array().map(Vec::is_empty).unwrap_or(true),
    )
    .await;

    // A device of another tenant cannot be fed through this bridge.
    registered_device(&admin, "00aabbccddeeff00", None).await;
    let foreign =
        "devices/lns-1/chirpstack/application/cold-chain/device/00aabbccddeeff00/event/up";
    accepted(
        send(
            &mut bridge,
            4,
            foreign,
            uplink("00aabbccddeeff00", Some(json!({"temperature": 99})), ""),
        )
        .await,
    );
    until(
        &admin,
        "/devices/lns-1/events?kind=gateway_device_refused",
        "the foreign device is refused",
        |v| v.to_string().contains("another tenant"),
    )
    .await;
    let theirs = admin
        .expect("GET", "/devices/00aabbccddeeff00/telemetry", None, 200)
        .await;
    assert_eq!(latest_value(&theirs, "temperature"), None, "{theirs}");
    // Counted in /metrics.
    assert!(scrape(srv.http(), "m2mhub_gateway_chirpstack_events_total").await >= 4);
    assert_eq!(
        scrape(srv.http(), "m2mhub_gateway_downlinks_total").await,
        1
    );
    assert!(scrape(srv.http(), "m2mhub_gateway_refused_total").await >= 2);
    assert_eq!(
        scrape(srv.http(), "m2mhub_gateway_devices_registered_total").await,
        1
    );
}
