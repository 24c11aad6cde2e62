//! Host-application flows of the Sparkplug 3.0 specification, stepped with
//! a fake clock: no broker, no sleeps.

use super::edge::{BD_SEQ, REBIRTH_METRIC};
use super::*;
use crate::{Point, Value};

const T0: i64 = 1_700_000_000_000;
const NODE_BIRTH_TOPIC: &str = "spBv1.0/plant/NBIRTH/gw1";

fn bd_seq(v: u64) -> Metric {
    Metric::birth(BD_SEQ, None, DataType::Int64, MetricValue::LongValue(v))
}

/// An NBIRTH as the specification describes it: bdSeq, the rebirth
/// control, and two metrics with aliases and current values.
pub(crate) fn nbirth(seq: u64, bd: u64) -> Payload {
    Payload {
        timestamp: Some(T0 as u64),
        seq: Some(seq),
        metrics: vec![
            bd_seq(bd),
            Metric::birth(
                REBIRTH_METRIC,
                Some(0),
                DataType::Boolean,
                MetricValue::BooleanValue(false),
            ),
            Metric::birth(
                "Supply/Voltage",
                Some(1),
                DataType::Float,
                MetricValue::FloatValue(229.5),
            )
            .at(T0 as u64 - 5),
            Metric::birth(
                "Cabinet/Door open",
                Some(2),
                DataType::Boolean,
                MetricValue::BooleanValue(false),
            ),
        ],
        ..Payload::default()
    }
}

/// An NDATA carrying only aliases, as the specification requires.
pub(crate) fn ndata(seq: u64) -> Payload {
    Payload {
        timestamp: Some(T0 as u64 + 1000),
        seq: Some(seq),
        metrics: vec![
            Metric::aliased(1, MetricValue::FloatValue(231.25)).at(T0 as u64 + 990),
            Metric::aliased(2, MetricValue::BooleanValue(true)),
        ],
        ..Payload::default()
    }
}

fn dbirth(seq: u64) -> Payload {
    Payload {
        timestamp: Some(T0 as u64 + 10),
        seq: Some(seq),
        metrics: vec![
            Metric::birth(
                "Flow",
                Some(10),
                DataType::Int16,
                MetricValue::IntValue(0xFFFF_FFF6), // -10, sign-extended
            ),
            Metric::birth(
                "Mode",
                Some(11),
                DataType::String,
                MetricValue::StringValue("auto".into()),
            ),
        ],
        ..Payload::default()
    }
}

fn ddata(seq: u64, alias: u64, value: MetricValue) -> Payload {
    Payload {
        timestamp: Some(T0 as u64 + 2000),
        seq: Some(seq),
        metrics: vec![Metric::aliased(alias, value)],
        ..Payload::default()
    }
}

fn death(bd: u64) -> Payload {
    Payload {
        timestamp: Some(T0 as u64),
        metrics: vec![bd_seq(bd)],
        ..Payload::default()
    }
}

fn send(host: &mut SparkplugHost, topic: &str, payload: &Payload, now: i64) -> Vec<Event> {
    host.handle(topic, &encode_payload(payload), now)
}

fn node() -> EdgeKey {
    EdgeKey::node("plant", "gw1")
}

fn pump() -> EdgeKey {
    EdgeKey::device("plant", "gw1", "pump")
}

fn points(events: &[Event]) -> Vec<(EdgeKey, Vec<Point>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Points { device, points } => Some((device.clone(), points.clone())),
            _ => None,
        })
        .collect()
}

fn rebirths(events: &[Event]) -> Vec<(String, Payload)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Rebirth { topic, payload } => Some((
                topic.clone(),
                decode_payload(payload).expect("our own encoding"),
            )),
            _ => None,
        })
        .collect()
}

fn rejections(events: &[Event]) -> Vec<Rejection> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

fn p(metric: &str, ts_ms: i64, value: Value) -> Point {
    Point {
        metric: metric.into(),
        ts_ms,
        value,
    }
}

fn born() -> SparkplugHost {
    let mut host = SparkplugHost::default();
    send(&mut host, NODE_BIRTH_TOPIC, &nbirth(0, 3), T0);
    host
}

#[test]
fn nbirth_then_ndata_resolves_aliases() {
    let mut host = SparkplugHost::new(HostConfig::default());
    let events = send(&mut host, NODE_BIRTH_TOPIC, &nbirth(0, 3), T0);
    assert_eq!(events[0], Event::Online { device: node() });
    // Birth values are readings too; bdSeq and Node Control are not.
    assert_eq!(
        points(&events),
        vec![(
            node(),
            vec![
                p("Supply/Voltage", T0 - 5, Value::F64(229.5)),
                p("Cabinet/Door open", T0, Value::Bool(false)),
            ]
        )]
    );
    assert!(host.is_online(&node()));

    let events = send(&mut host, "spBv1.0/plant/NDATA/gw1", &ndata(1), T0 + 5000);
    assert_eq!(
        events,
        vec![Event::Points {
            device: node(),
            points: vec![
                // The metric's own timestamp, else the payload's.
                p("Supply/Voltage", T0 + 990, Value::F64(231.25)),
                p("Cabinet/Door open", T0 + 1000, Value::Bool(true)),
            ]
        }]
    );
}

#[test]
fn dbirth_then_ddata_uses_the_device_aliases() {
    let mut host = born();
    let events = send(&mut host, "spBv1.0/plant/DBIRTH/gw1/pump", &dbirth(1), T0);
    assert_eq!(events[0], Event::Online { device: pump() });
    assert_eq!(
        points(&events),
        vec![(
            pump(),
            vec![
                p("Flow", T0 + 10, Value::F64(-10.0)),
                p("Mode", T0 + 10, Value::Str("auto".into())),
            ]
        )]
    );
    let events = send(
        &mut host,
        "spBv1.0/plant/DDATA/gw1/pump",
        &ddata(2, 10, MetricValue::IntValue(42)),
        T0,
    );
    assert_eq!(
        events,
        vec![Event::Points {
            device: pump(),
            points: vec![p("Flow", T0 + 2000, Value::F64(42.0))]
        }]
    );
    // The node's aliases are not the device's.
    let events = send(
        &mut host,
        "spBv1.0/plant/DDATA/gw1/pump",
        &ddata(3, 1, MetricValue::FloatValue(1.0)),
        T0,
    );
    assert!(matches!(
        rejections(&events)[..],
        [Rejection::UnknownMetrics { count: 1, .. }]
    ));
}

#[test]
fn no_timestamps_fall_back_to_arrival_time() {
    let mut host = born();
    let mut data = ndata(1);
    data.timestamp = None;
    data.metrics[0].timestamp = None;
    let events = send(&mut host, "spBv1.0/plant/NDATA/gw1", &data, T0 + 7);
    assert_eq!(points(&events)[0].1[0].ts_ms, T0 + 7);
}

#[test]
fn sequence_gap_requests_a_rebirth_and_keeps_the_data() {
    let mut host = born();
    send(&mut host, "spBv1.0/plant/NDATA/gw1", &ndata(1), T0);
    // seq 2 lost.
    let events = send(&mut host, "spBv1.0/plant/NDATA/gw1", &ndata(3), T0 + 100);
    assert_eq!(
        rejections(&events),
        vec![Rejection::SequenceGap {
            expected: 2,
            got: Some(3)
        }]
    );
    assert_eq!(points(&events).len(), 1, "data of a gap is still stored");
    let rb = rebirths(&events);
    assert_eq!(rb.len(), 1);
    assert_eq!(rb[0].0, "spBv1.0/plant/NCMD/gw1");
    let metric = &rb[0].1.metrics[0];
    assert_eq!(metric.name.as_deref(), Some(REBIRTH_METRIC));
    assert_eq!(metric.datatype, Some(DataType::Boolean.code()));
    assert_eq!(metric.value, Some(MetricValue::BooleanValue(true)));
    assert_eq!(rb[0].1.timestamp, Some((T0 + 100) as u64));
    // Resynchronised: the next one in order is fine.
    let events = send(&mut host, "spBv1.0/plant/NDATA/gw1", &ndata(4), T0 + 200);
    assert!(rejections(&events).is_empty());
}

#[test]
fn sequence_wraps_after_255() {
    let mut host = SparkplugHost::default();
    send(&mut host, NODE_BIRTH_TOPIC, &nbirth(254, 0), T0);
    for seq in [255, 0, 1] {
        let events = send(&mut host, "spBv1.0/plant/NDATA/gw1", &ndata(seq), T0);
        assert!(rejections(&events).is_empty(), "seq {seq}: {events:?}");
    }
    let events = send(&mut host, "spBv1.0/plant/NDATA/gw1", &ndata(256), T0);
    assert_eq!(
        rejections(&events),
        vec![Rejection::SequenceGap {
            expected: 2,
            got: Some(256)
        }]
    );
}

#[test]
fn unknown_alias_requests_a_rebirth_rate_limited() {
    let mut host = born();
    let interval = host.config().rebirth_interval_ms;
    let unknown = |seq| ddata(seq, 99, MetricValue::IntValue(1));
    let events = send(&mut host, "spBv1.0/plant/NDATA/gw1", &unknown(1), T0);
    assert_eq!(
        rejections(&events),
        vec![Rejection::UnknownMetrics {
            count: 1,
            first: "alias 99".into()
        }]
    );
    assert_eq!(rebirths(&events).len(), 1);
    // Within the interval: reported, not asked again.
    let events = send(
        &mut host,
        "spBv1.0/plant/NDATA/gw1",
        &unknown(2),
        T0 + interval - 1,
    );
    assert_eq!(rejections(&events).len(), 1);
    assert!(rebirths(&events).is_empty());
    // After it: asked again.
    let events = send(
        &mut host,
        "spBv1.0/plant/NDATA/gw1",
        &unknown(3),
        T0 + interval,
    );
    assert_eq!(rebirths(&events).len(), 1);
}

#[test]
fn data_before_any_birth_requests_a_rebirth() {
    let mut host = SparkplugHost::default();
    let events = send(&mut host, "spBv1.0/plant/NDATA/gw1", &ndata(7), T0);
    assert_eq!(
        rejections(&events),
        vec![Rejection::UnknownNode(MessageType::NData)]
    );
    assert_eq!(rebirths(&events).len(), 1);
    let events = send(
        &mut host,
        "spBv1.0/plant/DDATA/gw1/pump",
        &dbirth(8),
        T0 + 1,
    );
    assert!(rebirths(&events).is_empty(), "rate-limited per node");
    // The rebirth arrives; the stale state is gone.
    let events = send(&mut host, NODE_BIRTH_TOPIC, &nbirth(0, 0), T0 + 2);
    assert!(rejections(&events).is_empty());
    assert!(host.is_online(&node()));
}

#[test]
fn ddata_for_a_device_without_dbirth_requests_a_rebirth() {
    let mut host = born();
    let events = send(
        &mut host,
        "spBv1.0/plant/DDATA/gw1/valve",
        &ddata(1, 10, MetricValue::IntValue(1)),
        T0,
    );
    assert_eq!(
        rejections(&events),
        vec![Rejection::UnknownDevice(MessageType::DData)]
    );
    assert_eq!(rebirths(&events).len(), 1);
}

#[test]
fn ndeath_with_matching_bdseq_takes_node_and_devices_offline() {
    let mut host = born();
    send(&mut host, "spBv1.0/plant/DBIRTH/gw1/pump", &dbirth(1), T0);
    let events = send(&mut host, "spBv1.0/plant/NDEATH/gw1", &death(3), T0 + 1);
    assert_eq!(
        events,
        vec![
            Event::Offline { device: pump() },
            Event::Offline { device: node() },
        ]
    );
    assert!(!host.is_online(&node()));
    assert!(!host.is_online(&pump()));
    // The broker's copy of the will after an explicit NDEATH: nothing new.
    assert!(send(&mut host, "spBv1.0/plant/NDEATH/gw1", &death(3), T0 + 2).is_empty());
}

#[test]
fn stale_ndeath_of_an_earlier_session_is_ignored() {
    let mut host = SparkplugHost::default();
    send(&mut host, NODE_BIRTH_TOPIC, &nbirth(0, 4), T0);
    send(&mut host, "spBv1.0/plant/DBIRTH/gw1/pump", &dbirth(1), T0);
    // The will of session bdSeq 3 arrives after the NBIRTH of session 4.
    let events = send(&mut host, "spBv1.0/plant/NDEATH/gw1", &death(3), T0 + 1);
    assert!(events.is_empty(), "{events:?}");
    assert!(host.is_online(&node()));
    assert!(host.is_online(&pump()));
}

#[test]
fn ddeath_takes_only_that_device_offline() {
    let mut host = born();
    send(&mut host, "spBv1.0/plant/DBIRTH/gw1/pump", &dbirth(1), T0);
    let ddeath = Payload {
        timestamp: Some(T0 as u64),
        seq: Some(2),
        ..Payload::default()
    };
    let events = send(&mut host, "spBv1.0/plant/DDEATH/gw1/pump", &ddeath, T0);
    assert_eq!(events, vec![Event::Offline { device: pump() }]);
    assert!(host.is_online(&node()));
    assert!(!host.is_online(&pump()));
    // Data for it now needs a rebirth.
    let events = send(
        &mut host,
        "spBv1.0/plant/DDATA/gw1/pump",
        &ddata(3, 10, MetricValue::IntValue(1)),
        T0,
    );
    assert_eq!(rebirths(&events).len(), 1);
}

#[test]
fn a_new_nbirth_ends_the_devices_of_the_old_session() {
    let mut host = born();
    send(&mut host, "spBv1.0/plant/DBIRTH/gw1/pump", &dbirth(1), T0);
    let events = send(&mut host, NODE_BIRTH_TOPIC, &nbirth(0, 3), T0 + 1);
    assert_eq!(events[0], Event::Offline { device: pump() });
    assert_eq!(events[1], Event::Online { device: node() });
}

#[test]
fn births_that_cannot_be_used_are_rejected_whole() {
    let mut host = SparkplugHost::new(HostConfig {
        max_metrics_per_birth: 3,
        ..HostConfig::default()
    });
    let events = send(&mut host, NODE_BIRTH_TOPIC, &nbirth(0, 0), T0);
    assert_eq!(
        rejections(&events),
        vec![Rejection::TooManyMetrics { count: 4, limit: 3 }]
    );
    assert!(!host.is_online(&node()));

    let mut host = SparkplugHost::default();
    let mut birth = nbirth(0, 0);
    birth.metrics[3].alias = Some(1);
    let events = send(&mut host, NODE_BIRTH_TOPIC, &birth, T0);
    assert_eq!(rejections(&events), vec![Rejection::DuplicateAlias(1)]);
}

#[test]
fn unsupported_metric_types_are_reported_not_fatal() {
    let mut host = SparkplugHost::default();
    let mut birth = nbirth(0, 0);
    birth.metrics.push(Metric::birth(
        "Raw",
        Some(5),
        DataType::Bytes,
        MetricValue::BytesValue(vec![1, 2]),
    ));
    let events = send(&mut host, NODE_BIRTH_TOPIC, &birth, T0);
    assert_eq!(
        rejections(&events),
        vec![Rejection::MetricsSkipped {
            count: 1,
            metric: "Raw".into(),
            error: ValueError::Unsupported(DataType::Bytes)
        }]
    );
    assert_eq!(points(&events)[0].1.len(), 2);
}

#[test]
fn node_limit_forgets_offline_nodes_first() {
    let mut host = SparkplugHost::new(HostConfig {
        max_nodes: 2,
        ..HostConfig::default()
    });
    send(&mut host, "spBv1.0/g/NBIRTH/a", &nbirth(0, 0), T0);
    send(&mut host, "spBv1.0/g/NBIRTH/b", &nbirth(0, 0), T0);
    let events = send(&mut host, "spBv1.0/g/NBIRTH/c", &nbirth(0, 0), T0);
    assert_eq!(rejections(&events), vec![Rejection::TooManyNodes(2)]);
    send(&mut host, "spBv1.0/g/NDEATH/a", &death(0), T0);
    let events = send(&mut host, "spBv1.0/g/NBIRTH/c", &nbirth(0, 0), T0);
    assert!(rejections(&events).is_empty());
    assert_eq!(host.node_count(), 2);
    assert!(host.is_online(&EdgeKey::node("g", "c")));
}

#[test]
fn device_limit_per_node() {
    let mut host = SparkplugHost::new(HostConfig {
        max_devices_per_node: 1,
        ..HostConfig::default()
    });
    send(&mut host, NODE_BIRTH_TOPIC, &nbirth(0, 0), T0);
    send(&mut host, "spBv1.0/plant/DBIRTH/gw1/pump", &dbirth(1), T0);
    let events = send(&mut host, "spBv1.0/plant/DBIRTH/gw1/valve", &dbirth(2), T0);
    assert_eq!(rejections(&events), vec![Rejection::TooManyDevices(1)]);
    // A rebirth of the same device still fits.
    let events = send(&mut host, "spBv1.0/plant/DBIRTH/gw1/pump", &dbirth(3), T0);
    assert!(rejections(&events).is_empty());
}

#[test]
fn bad_topics_and_payloads_are_rejected_and_commands_ignored() {
    let mut host = SparkplugHost::default();
    let events = host.handle("spBv1.0/plant/NDATA", b"", T0);
    assert!(matches!(rejections(&events)[..], [Rejection::Topic(_)]));
    let events = host.handle(NODE_BIRTH_TOPIC, &[0xff, 0xff, 0xff], T0);
    assert!(matches!(rejections(&events)[..], [Rejection::Payload(_)]));
    assert!(host
        .handle("spBv1.0/plant/NCMD/gw1", &[0xff], T0)
        .is_empty());
    assert!(host.handle("spBv1.0/STATE/scada", b"{}", T0).is_empty());
    assert_eq!(host.node_count(), 0);
}

#[test]
fn edge_key_display() {
    assert_eq!(node().to_string(), "plant/gw1");
    assert_eq!(pump().to_string(), "plant/gw1/pump");
}

#[test]
fn rebirth_request_is_a_valid_ncmd() {
    let (topic, bytes) = rebirth_request("g", "n", T0);
    assert_eq!(
        parse_topic(&topic),
        Ok(Topic::Edge(EdgeTopic {
            group_id: "g".into(),
            message_type: MessageType::NCmd,
            edge_node_id: "n".into(),
            device_id: None
        }))
    );
    let payload = decode_payload(&bytes).expect("decodes");
    assert_eq!(payload.metrics.len(), 1);
    assert_eq!(
        metric_value(&payload.metrics[0], DataType::Boolean),
        Ok(Some(Value::Bool(true)))
    );
}
