//! Property tests for the network-facing decoders: round trips, and no
//! panics on arbitrary input.

use proptest::prelude::*;

use crate::chirpstack::{decode_event_payload, DevEui, EventKind, EventTopic};
use crate::sparkplug::edge::BD_SEQ;
use crate::sparkplug::{
    decode_payload, encode_payload, metric_value, DataType, Event, Metric, MetricValue, Payload,
    PropertySet, PropertyValue, Rejection, SparkplugHost,
};
use crate::Value;
use m2mhub_telemetry::Limits;

fn metric_value_strategy() -> impl Strategy<Value = MetricValue> {
    prop_oneof![
        any::<u32>().prop_map(MetricValue::IntValue),
        any::<u64>().prop_map(MetricValue::LongValue),
        (-1e6f32..1e6).prop_map(MetricValue::FloatValue),
        (-1e12f64..1e12).prop_map(MetricValue::DoubleValue),
        any::<bool>().prop_map(MetricValue::BooleanValue),
        ".{0,12}".prop_map(MetricValue::StringValue),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(MetricValue::BytesValue),
    ]
}

fn properties_strategy() -> impl Strategy<Value = Option<PropertySet>> {
    proptest::option::of(
        proptest::collection::vec(("[a-z]{1,6}", any::<u32>()), 0..3).prop_map(|kv| PropertySet {
            keys: kv.iter().map(|(k, _)| k.clone()).collect(),
            values: kv
                .iter()
                .map(|(_, v)| PropertyValue {
                    r#type: Some(DataType::UInt32.code()),
                    is_null: None,
                    value: Some(crate::sparkplug::payload::PropertyValueKind::IntValue(*v)),
                })
                .collect(),
        }),
    )
}

fn metric_strategy() -> impl Strategy<Value = Metric> {
    (
        proptest::option::of("[a-zA-Z/ ]{1,16}"),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(0u32..40),
        proptest::option::of(any::<bool>()),
        proptest::option::of(metric_value_strategy()),
        properties_strategy(),
    )
        .prop_map(
            |(name, alias, timestamp, datatype, is_null, value, properties)| Metric {
                name,
                alias,
                timestamp,
                datatype,
                is_null,
                value,
                properties,
                ..Metric::default()
            },
        )
}

fn payload_strategy() -> impl Strategy<Value = Payload> {
    (
        proptest::option::of(any::<u64>()),
        proptest::collection::vec(metric_strategy(), 0..8),
        proptest::option::of(0u64..300),
        proptest::option::of("[a-f0-9-]{0,36}"),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
    )
        .prop_map(|(timestamp, metrics, seq, uuid, body)| Payload {
            timestamp,
            metrics,
            seq,
            uuid,
            body,
        })
}

/// A JSON document built from the field names ChirpStack events use, so
/// that generated input reaches the typed readers, not only the parser.
fn json_strategy() -> impl Strategy<Value = serde_json::Value> {
    let keys = prop_oneof![
        Just("object"),
        Just("data"),
        Just("fCnt"),
        Just("fPort"),
        Just("rxInfo"),
        Just("rssi"),
        Just("snr"),
        Just("time"),
        Just("deviceInfo"),
        Just("devEui"),
        Just("applicationId"),
        Just("batteryLevel"),
        Just("location"),
        Just("level"),
        Just("a"),
        Just(""),
    ];
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,8}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("AAECAwQ=")),
        Just(serde_json::Value::from("0018b20000001a2b")),
        Just(serde_json::Value::from("2024-03-05T10:15:30Z")),
    ];
    leaf.prop_recursive(6, 64, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::vec((keys.clone(), inner), 0..6).prop_map(|kv| {
                serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

fn decode_all_kinds(data: &[u8]) {
    let dev_eui = DevEui::parse("0018b20000001a2b").expect("valid literal");
    for event in EventKind::ALL {
        let topic = EventTopic {
            application_id: "app".into(),
            dev_eui: dev_eui.clone(),
            event,
        };
        let _ = decode_event_payload(&topic, data, 0, &Limits::default());
    }
}

proptest! {
    #[test]
    fn payload_round_trips(payload in payload_strategy()) {
        let bytes = encode_payload(&payload);
        prop_assert_eq!(decode_payload(&bytes), Ok(payload));
    }

    #[test]
    fn payload_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        crate::fuzz::sparkplug_payload(&bytes);
    }

    #[test]
    fn host_never_panics_on_generated_sessions(
        steps in proptest::collection::vec((0usize..7, payload_strategy()), 0..12)
    ) {
        let topics = [
            "spBv1.0/g/NBIRTH/n",
            "spBv1.0/g/NDATA/n",
            "spBv1.0/g/DBIRTH/n/d",
            "spBv1.0/g/DDATA/n/d",
            "spBv1.0/g/DDEATH/n/d",
            "spBv1.0/g/NDEATH/n",
            "spBv1.0/g/NDATA/m",
        ];
        let mut host = SparkplugHost::default();
        for (i, (topic, payload)) in steps.iter().enumerate() {
            let _ = host.handle(topics[*topic], &encode_payload(payload), i as i64);
        }
    }

    /// Any run of in-order sequence numbers, wrapping at 255, passes.
    #[test]
    fn in_order_sequences_never_gap(start in 0u64..=255, len in 1usize..600) {
        let mut host = SparkplugHost::default();
        let birth = Payload {
            seq: Some(start),
            metrics: vec![Metric::birth(BD_SEQ, None, DataType::Int64, MetricValue::LongValue(0))],
            ..Payload::default()
        };
        host.handle("spBv1.0/g/NBIRTH/n", &encode_payload(&birth), 0);
        for i in 1..=len as u64 {
            let data = Payload { seq: Some((start + i) % 256), ..Payload::default() };
            let events = host.handle("spBv1.0/g/NDATA/n", &encode_payload(&data), 0);
            let gaps = events
                .iter()
                .filter(|e| matches!(e, Event::Rejected { reason: Rejection::SequenceGap { .. }, .. }))
                .count();
            prop_assert_eq!(gaps, 0);
        }
    }

    /// Java's encoders sign-extend small signed integers to 32 bits, Python's
    /// mask them to their width; both read back as the same number.
    #[test]
    fn signed_integer_encodings_agree(v8 in any::<i8>(), v16 in any::<i16>()) {
        let read = |dt, raw: u32| metric_value(&Metric::birth("m", None, dt, MetricValue::IntValue(raw)), dt);
        prop_assert_eq!(read(DataType::Int8, v8 as i32 as u32), Ok(Some(Value::F64(f64::from(v8)))));
        prop_assert_eq!(read(DataType::Int8, u32::from(v8 as u8)), Ok(Some(Value::F64(f64::from(v8)))));
        prop_assert_eq!(read(DataType::Int16, v16 as i32 as u32), Ok(Some(Value::F64(f64::from(v16)))));
        prop_assert_eq!(read(DataType::Int16, u32::from(v16 as u16)), Ok(Some(Value::F64(f64::from(v16)))));
    }

    #[test]
    fn chirpstack_never_panics_on_arbitrary_strings(s in ".{0,256}") {
        decode_all_kinds(s.as_bytes());
        crate::fuzz::chirpstack_event(s.as_bytes());
    }

    #[test]
    fn chirpstack_never_panics_on_arbitrary_json(doc in json_strategy()) {
        let bytes = serde_json::to_vec(&doc).expect("serialises");
        crate::fuzz::chirpstack_event(&bytes);
    }

    #[test]
    fn chirpstack_topics_never_panic(s in "(application|[a-z]{0,4})(/[a-zA-Z0-9+#]{0,17}){0,7}") {
        let _ = crate::chirpstack::parse_event_topic(&s);
        let _ = crate::sparkplug::parse_topic(&s);
    }
}
