//! Events in the shape ChirpStack v4's MQTT integration publishes them
//! (`tests/fixtures/*.json`: `integration.proto` in the protobuf JSON
//! mapping, defaults omitted), and downlinks it accepts.

use super::*;

const APP: &str = "17c82e96-be03-4f38-aef3-f83d48582d97";
const NOW: i64 = 1_800_000_000_000;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/",
            $name
        ))
    };
}

fn topic(dev_eui: &str, kind: &str) -> String {
    format!("application/{APP}/device/{dev_eui}/event/{kind}")
}

fn decode(dev_eui: &str, kind: &str, payload: &[u8]) -> Result<DecodedEvent, ChirpstackError> {
    decode_event(&topic(dev_eui, kind), payload, NOW, &Limits::default())
}

fn p(metric: &str, ts_ms: i64, value: Value) -> Point {
    Point {
        metric: metric.into(),
        ts_ms,
        value,
    }
}

#[test]
fn uplink_with_object_becomes_readings_with_link_metrics() {
    let ev = decode("0018b20000001a2b", "up", fixture!("up_object.json")).expect("decodes");
    let ts = 1_709_633_730_123;
    assert_eq!(ev.ts_ms, ts, "the event's time, nanoseconds truncated");
    assert_eq!(ev.kind, EventKind::Up);
    assert_eq!(ev.application_id, APP);
    let info = ev.device_info.as_ref().expect("deviceInfo");
    assert_eq!(info.device_name, "freezer-3");
    assert_eq!(info.device_profile_name, "Temperature sensor");
    assert_eq!(
        info.tags.get("site").map(String::as_str),
        Some("depot-north")
    );
    assert_eq!(
        ev.output,
        Output::Readings(vec![
            p("battery.low", ts, Value::Bool(false)),
            p("battery.voltage", ts, Value::F64(3.61)),
            p("door", ts, Value::Str("closed".into())),
            p("samples.0", ts, Value::F64(1.0)),
            p("samples.1", ts, Value::F64(2.0)),
            p("temperature", ts, Value::F64(-18.5)),
            // The second gateway heard it best.
            p("rssi", ts, Value::F64(-97.0)),
            p("snr", ts, Value::F64(7.5)),
            p("fcnt", ts, Value::F64(421.0)),
        ])
    );
}

#[test]
fn uplink_document_fields_are_read() {
    let up: UplinkEvent = serde_json::from_slice(fixture!("up_object.json")).expect("parses");
    assert_eq!(up.f_port, 2);
    assert_eq!(up.dr, 5);
    assert!(up.adr);
    assert_eq!(up.rx_info[1].uplink_id, 4_217_106_255);
    assert_eq!(up.rx_info[1].crc_status, "CRC_OK");
    let tx = up.tx_info.expect("txInfo");
    assert_eq!(tx.frequency, 868_100_000);
    let lora = tx.modulation.and_then(|m| m.lora).expect("lora");
    assert_eq!(
        (
            lora.bandwidth,
            lora.spreading_factor,
            lora.code_rate.as_str()
        ),
        (125_000, 7, "CR_4_5")
    );
}

#[test]
fn uplink_without_object_hands_back_bytes_and_port() {
    let ev = decode("A84041000181C5E1", "up", fixture!("up_raw.json")).expect("decodes");
    assert_eq!(ev.dev_eui.as_str(), "a84041000181c5e1");
    let ts = 1_709_633_762_501;
    assert_eq!(
        ev.output,
        Output::Undecoded {
            f_port: 10,
            // Omitted in the document: a default of the JSON mapping.
            f_cnt: 0,
            data: vec![0, 1, 2, 3, 4],
            link: vec![
                p("rssi", ts, Value::F64(-61.0)),
                p("snr", ts, Value::F64(9.0)),
                p("fcnt", ts, Value::F64(0.0)),
            ],
        }
    );
}

#[test]
fn object_fields_win_over_link_metrics_of_the_same_name() {
    let doc = br#"{"fCnt":3,"object":{"rssi":-1},"rxInfo":[{"rssi":-80}]}"#;
    let ev = decode("0018b20000001a2b", "up", doc).expect("decodes");
    assert_eq!(
        ev.output,
        Output::Readings(vec![
            p("rssi", NOW, Value::F64(-1.0)),
            p("snr", NOW, Value::F64(0.0)),
            p("fcnt", NOW, Value::F64(3.0)),
        ])
    );
}

#[test]
fn join_is_an_online_event() {
    let ev = decode("0018b20000001a2b", "join", fixture!("join.json")).expect("decodes");
    assert_eq!(ev.ts_ms, 1_709_632_691_004);
    assert_eq!(
        ev.output,
        Output::Joined {
            dev_addr: "01ab5c3d".into()
        }
    );
}

#[test]
fn status_becomes_battery_and_margin_readings() {
    let ev = decode("0018b20000001a2b", "status", fixture!("status.json")).expect("decodes");
    let ts = 1_709_634_000_250;
    let Output::Readings(points) = ev.output else {
        panic!("{:?}", ev.output)
    };
    assert_eq!(points[0], p("margin", ts, Value::F64(7.0)));
    assert_eq!(
        points[1],
        p("external_power_source", ts, Value::Bool(false))
    );
    assert_eq!(points[2].metric, "battery_level");
    assert!(matches!(points[2].value, Value::F64(v) if (v - 87.4).abs() < 1e-4));

    let mains = br#"{"margin":3,"externalPowerSource":true}"#;
    let ev = decode("0018b20000001a2b", "status", mains).expect("decodes");
    let Output::Readings(points) = ev.output else {
        panic!()
    };
    assert!(points.iter().all(|p| p.metric != "battery_level"));
}

#[test]
fn ack_txack_log_and_location() {
    let eui = "0018b20000001a2b";
    assert_eq!(
        decode(eui, "ack", fixture!("ack.json"))
            .expect("ack")
            .output,
        Output::Ack {
            queue_item_id: "8e1f45b0-7c47-4b2e-9d8c-5a2f7e0c6d41".into(),
            acknowledged: true,
            f_cnt_down: 17
        }
    );
    assert_eq!(
        decode(eui, "txack", fixture!("txack.json"))
            .expect("txack")
            .output,
        Output::TxAck {
            queue_item_id: "8e1f45b0-7c47-4b2e-9d8c-5a2f7e0c6d41".into(),
            f_cnt_down: 17,
            gateway_id: "0016c001f153a14c".into()
        }
    );
    assert_eq!(
        decode(eui, "log", fixture!("log.json"))
            .expect("log")
            .output,
        Output::Log {
            level: "ERROR".into(),
            code: "UPLINK_CODEC".into(),
            description: "TypeError: Cannot read properties of undefined".into()
        }
    );
    // Enums may come as numbers too.
    let numeric = br#"{"level":2,"code":2,"description":"x"}"#;
    assert!(matches!(
        decode(eui, "log", numeric).expect("log").output,
        Output::Log { level, .. } if level == "2"
    ));
    let ts = 1_709_633_731_000;
    assert_eq!(
        decode(eui, "location", fixture!("location.json"))
            .expect("location")
            .output,
        Output::Readings(vec![
            p("latitude", ts, Value::F64(52.3701)),
            p("longitude", ts, Value::F64(4.8951)),
            p("altitude", ts, Value::F64(3.5)),
        ])
    );
    assert_eq!(
        decode(eui, "integration", b"{}")
            .expect("integration")
            .output,
        Output::Ignored
    );
}

#[test]
fn event_for_another_device_is_refused() {
    let err = decode("0018b20000009999", "up", fixture!("up_object.json")).unwrap_err();
    assert!(
        matches!(err, ChirpstackError::DevEuiMismatch { .. }),
        "{err}"
    );
    let other_app = topic("0018b20000001a2b", "up").replace(APP, "other");
    let err = decode_event(
        &other_app,
        fixture!("up_object.json"),
        NOW,
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ChirpstackError::ApplicationMismatch { .. }));
}

#[test]
fn bad_documents_are_typed_errors() {
    let eui = "0018b20000001a2b";
    assert_eq!(
        decode(eui, "up", b"\x0a\x03abc"),
        Err(ChirpstackError::NotJson)
    );
    assert!(matches!(
        decode(eui, "up", br#"{"fCnt":"many"}"#),
        Err(ChirpstackError::Json { kind: "up", .. })
    ));
    assert_eq!(
        decode(eui, "up", br#"{"data":"***"}"#),
        Err(ChirpstackError::Base64)
    );
    let deep = format!(
        r#"{{"object":{}1{}}}"#,
        r#"{"a":"#.repeat(20),
        "}".repeat(20)
    );
    assert_eq!(
        decode(eui, "up", deep.as_bytes()),
        Err(ChirpstackError::TooDeep)
    );
    let tight = Limits {
        max_points: 2,
        ..Limits::default()
    };
    assert_eq!(
        decode_event(
            &topic(eui, "up"),
            br#"{"object":{"a":1,"b":2,"c":3}}"#,
            NOW,
            &tight
        ),
        Err(ChirpstackError::TooManyReadings(2))
    );
    assert_eq!(
        decode(eui, "up", br#"{"object":{"":1}}"#),
        Err(ChirpstackError::EmptyName)
    );
}

#[test]
fn base64_variants_are_accepted() {
    assert_eq!(decode_base64("AAECAwQ="), Ok(vec![0, 1, 2, 3, 4]));
    assert_eq!(decode_base64("AAECAwQ"), Ok(vec![0, 1, 2, 3, 4]));
    assert_eq!(decode_base64("-_8="), Ok(vec![0xfb, 0xff]));
    assert_eq!(decode_base64(""), Ok(vec![]));
}

#[test]
fn topics() {
    let t =
        parse_event_topic("application/app-1/device/0018B20000001A2B/event/txack").expect("parses");
    assert_eq!(t.application_id, "app-1");
    assert_eq!(t.dev_eui.as_str(), "0018b20000001a2b");
    assert_eq!(t.event, EventKind::TxAck);
    for kind in EventKind::ALL {
        let t = parse_event_topic(&topic("0018b20000001a2b", kind.as_str())).expect("kind");
        assert_eq!(t.event, kind);
    }
    let bad = [
        (
            "application/a/device/0018b20000001a2b/event",
            ChirpstackError::Topic,
        ),
        (
            "application/a/device/0018b20000001a2b/event/up/x",
            ChirpstackError::Topic,
        ),
        (
            "application/a/device/0018b20000001a2b/command/down",
            ChirpstackError::Topic,
        ),
        (
            "application/a/device/0018b2000001a2b/event/up",
            ChirpstackError::InvalidDevEui("0018b2000001a2b".into()),
        ),
        (
            "application/a/device/0018b20000001a2g/event/up",
            ChirpstackError::InvalidDevEui("0018b20000001a2g".into()),
        ),
        (
            "application/+/device/0018b20000001a2b/event/up",
            ChirpstackError::InvalidApplicationId("+".into()),
        ),
        (
            "application/a/device/0018b20000001a2b/event/upp",
            ChirpstackError::UnknownEvent("upp".into()),
        ),
    ];
    for (topic, err) in bad {
        assert_eq!(parse_event_topic(topic), Err(err), "{topic}");
    }
}

#[test]
fn downlink_with_bytes() {
    let down = Downlink {
        application_id: APP.into(),
        dev_eui: DevEui::parse("0018B20000001A2B").expect("eui"),
        confirmed: true,
        f_port: 10,
        body: DownlinkBody::Data(vec![0x01, 0x02, 0xff]),
    };
    let (topic, body) = down.encode().expect("encodes");
    assert_eq!(
        topic,
        format!("application/{APP}/device/0018b20000001a2b/command/down")
    );
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "devEui": "0018b20000001a2b",
            "confirmed": true,
            "fPort": 10,
            "data": "AQL/"
        })
    );
}

#[test]
fn downlink_with_object_and_port_checks() {
    let mut object = serde_json::Map::new();
    object.insert("setpoint".into(), serde_json::json!(-20));
    let mut down = Downlink {
        application_id: APP.into(),
        dev_eui: DevEui::parse("0018b20000001a2b").expect("eui"),
        confirmed: false,
        f_port: 1,
        body: DownlinkBody::Object(object),
    };
    let (_, body) = down.encode().expect("encodes");
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "devEui": "0018b20000001a2b",
            "confirmed": false,
            "fPort": 1,
            "object": {"setpoint": -20}
        })
    );
    for port in [0, 224, 255] {
        down.f_port = port;
        assert_eq!(down.encode(), Err(ChirpstackError::InvalidFPort(port)));
    }
    down.f_port = 1;
    down.application_id = "a/b".into();
    assert!(matches!(
        down.encode(),
        Err(ChirpstackError::InvalidApplicationId(_))
    ));
}

#[test]
fn dev_eui_is_normalised() {
    let eui: DevEui = "ABCDEF0123456789".parse().expect("eui");
    assert_eq!(eui.to_string(), "abcdef0123456789");
    assert!(DevEui::parse("abcdef012345678").is_err());
    assert!(DevEui::parse("abcdef01234567890").is_err());
    assert!(DevEui::parse("ab:cd:ef:01:23:45").is_err());
    // Multi-byte characters whose byte length happens to be 16.
    assert!(DevEui::parse("éééééééé").is_err());
}
