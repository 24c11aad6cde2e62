//! MQTT 5 flows: round trips, assigned identifiers, redelivery, takeover,
//! keep-alive, topic aliases, message expiry, properties, subscription
//! identifiers and No Local.

use crate::common::*;
use bytes::Bytes;
use mqtt_codec::{
    reason, Packet, PubResponse, Publish, PublishProperties, QoS, SubscriptionOptions,
};
use rumqttc::v5::mqttbytes::QoS as Q5;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_subscribe_round_trip_qos0_qos1_qos2() {
    let srv = TestServer::start().await;
    let (mut sub, _) = V5::connect(V5::options(srv.mqtt(), "v5-sub")).await;
    sub.subscribe("rt5/#", Q5::ExactlyOnce).await;
    let (mut publ, _) = V5::connect(V5::options(srv.mqtt(), "v5-pub")).await;
    for (topic, qos, payload) in [
        ("rt5/q0", Q5::AtMostOnce, "zero"),
        ("rt5/q1", Q5::AtLeastOnce, "one"),
        ("rt5/q2", Q5::ExactlyOnce, "two"),
    ] {
        publ.client
            .publish(topic, qos, false, payload)
            .await
            .expect("publish");
    }
    publ.wait("PUBACK", |p| match p {
        V5Packet::PubAck(a) => Some(a.clone()),
        _ => None,
    })
    .await;
    publ.wait("PUBCOMP", |p| {
        matches!(p, V5Packet::PubComp(_)).then_some(())
    })
    .await;
    for (topic, qos, payload) in [
        ("rt5/q0", Q5::AtMostOnce, "zero"),
        ("rt5/q1", Q5::AtLeastOnce, "one"),
        ("rt5/q2", Q5::ExactlyOnce, "two"),
    ] {
        let p = sub.recv_publish().await;
        assert_eq!(&p.topic[..], topic.as_bytes());
        assert_eq!(p.qos, qos);
        assert_eq!(&p.payload[..], payload.as_bytes());
        assert!(!p.retain);
    }
    sub.expect_no_publish(QUIET).await;
    publ.disconnect().await;
    sub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_puback_reports_no_matching_subscribers() {
    let srv = TestServer::start().await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("nomatch")).await;
    let code = p
        .publish(publish("nobody/here", QoS::AtLeastOnce, 1, "x"))
        .await;
    assert_eq!(code, reason::NO_MATCHING_SUBSCRIBERS);
    p.subscribe(1, "nobody/here", QoS::AtMostOnce).await;
    let code = p
        .publish(publish("nobody/here", QoS::AtLeastOnce, 2, "x"))
        .await;
    assert_eq!(code, reason::SUCCESS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_wildcards_and_dollar_topics() {
    let srv = TestServer::with(|s| s.mqtt.sys_interval_secs = 1).await;
    let (mut all, _) = Raw::connect_ok(srv.mqtt(), v5("w5-all")).await;
    all.subscribe(1, "#", QoS::AtMostOnce).await;
    let (mut plus, _) = Raw::connect_ok(srv.mqtt(), v5("w5-plus")).await;
    plus.subscribe(1, "+/+/c", QoS::AtMostOnce).await;
    let (mut sys, _) = Raw::connect_ok(srv.mqtt(), v5("w5-sys")).await;
    sys.subscribe(1, "$SYS/#", QoS::AtMostOnce).await;
    let v = sys
        .recv_where("$SYS/broker/version", |p| match p {
            Packet::Publish(p) if p.topic == "$SYS/broker/version" => Some(p.clone()),
            _ => None,
        })
        .await;
    assert!(text(&v).starts_with("m2mhub "));
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("w5-pub")).await;
    p.publish(publish("a/b/c", QoS::AtMostOnce, 0, "1")).await;
    p.publish(publish("a/b/d", QoS::AtMostOnce, 0, "2")).await;
    // A client may not publish to `$` topics: refused, never delivered.
    let code = p
        .publish(publish("$SYS/fake", QoS::AtLeastOnce, 1, "x"))
        .await;
    assert_eq!(code, reason::NOT_AUTHORIZED);
    assert_eq!(all.recv_publish().await.topic, "a/b/c");
    assert_eq!(all.recv_publish().await.topic, "a/b/d");
    assert_eq!(plus.recv_publish().await.topic, "a/b/c");
    // Over a further `$SYS` tick nothing `$`-prefixed reaches `#`.
    all.expect_nothing(Duration::from_millis(1200)).await;
    plus.expect_nothing(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_empty_client_id_gets_an_assigned_client_identifier() {
    let srv = TestServer::start().await;
    let (mut a, ack_a) = Raw::connect_ok(srv.mqtt(), v5("")).await;
    let (_b, ack_b) = Raw::connect_ok(srv.mqtt(), v5("")).await;
    let id_a = ack_a
        .properties
        .assigned_client_identifier
        .expect("assigned client identifier");
    let id_b = ack_b
        .properties
        .assigned_client_identifier
        .expect("assigned client identifier");
    assert!(!id_a.is_empty());
    assert_ne!(id_a, id_b, "each connection gets its own identifier");
    a.subscribe(1, "assigned/t", QoS::AtLeastOnce).await;
    a.publish(publish("assigned/t", QoS::AtLeastOnce, 2, "ok"))
        .await;
    assert_eq!(text(&a.recv_publish().await), "ok");
    // An explicit identifier is not echoed.
    let (_c, ack) = Raw::connect_ok(srv.mqtt(), v5("explicit")).await;
    assert_eq!(ack.properties.assigned_client_identifier, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_unacked_qos1_is_redelivered_with_dup_after_reconnect() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("redeliver-v5", true, 60)).await;
    sub.subscribe(1, "redo5/t", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("redeliver-v5-pub")).await;
    p.publish(publish("redo5/t", QoS::AtLeastOnce, 1, "a"))
        .await;
    p.publish(publish("redo5/t", QoS::AtLeastOnce, 2, "b"))
        .await;
    let a = sub.recv_publish().await;
    let b = sub.recv_publish().await;
    assert!(!a.dup && !b.dup);
    // Acknowledge only the second.
    sub.puback(b.packet_id.expect("pid")).await;
    sub.ping().await;
    sub.drop_abruptly().await;

    let (mut sub, ack) =
        Raw::connect_ok(srv.mqtt(), v5_persistent("redeliver-v5", false, 60)).await;
    assert!(ack.session_present);
    let again = sub.recv_publish().await;
    assert!(again.dup, "{again:?}");
    assert_eq!(again.packet_id, a.packet_id);
    assert_eq!(text(&again), "a");
    sub.expect_nothing(QUIET).await;
    sub.puback(again.packet_id.expect("pid")).await;
    sub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos2_pubrel_is_resent_after_reconnect() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("q2-resume", true, 60)).await;
    sub.subscribe(1, "q2/t", QoS::ExactlyOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("q2-pub")).await;
    p.publish(publish("q2/t", QoS::ExactlyOnce, 1, "x")).await;
    let m = sub.recv_publish().await;
    assert_eq!(m.qos, QoS::ExactlyOnce);
    let pid = m.packet_id.expect("pid");
    sub.send(&Packet::PubRec(PubResponse::new(pid, 0))).await;
    match sub.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, pid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    // No PUBCOMP: the broker must repeat the PUBREL (not the PUBLISH).
    sub.drop_abruptly().await;
    let (mut sub, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("q2-resume", false, 60)).await;
    assert!(ack.session_present);
    match sub.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, pid),
        other => panic!("expected PUBREL again, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubResponse::new(pid, 0))).await;
    sub.expect_nothing(QUIET).await;
    sub.disconnect().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("q2-resume", false, 60)).await;
    sub.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_takeover_sends_disconnect_0x8e_to_the_first_connection() {
    let srv = TestServer::start().await;
    let (mut first, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("take5", true, 60)).await;
    first.subscribe(1, "take5/t", QoS::AtLeastOnce).await;
    let (mut second, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("take5", false, 60)).await;
    assert!(ack.session_present);
    first.expect_disconnect(reason::SESSION_TAKEN_OVER).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("take5-pub")).await;
    p.publish(publish("take5/t", QoS::AtLeastOnce, 1, "x"))
        .await;
    assert_eq!(text(&second.recv_publish().await), "x");
    assert_eq!(srv.counter("sessions_taken_over"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_takeover_by_rumqttc_client() {
    let srv = TestServer::start().await;
    let (mut first, _) = V5::connect(V5::options(srv.mqtt(), "take5r")).await;
    let (_second, _) = V5::connect(V5::options(srv.mqtt(), "take5r")).await;
    let err = first.wait_error().await;
    assert!(err.contains("SessionTakenOver"), "first client saw: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_keepalive_timeout_sends_disconnect_0x8d() {
    let srv = TestServer::start().await;
    let mut c = v5("ka-v5");
    c.keep_alive = 1;
    let (mut raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    let t0 = Instant::now();
    raw.expect_disconnect(reason::KEEP_ALIVE_TIMEOUT).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1300) && took <= Duration::from_millis(2800),
        "disconnected after {took:?}, expected about 1.5 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_keepalive_is_kept_by_pings() {
    let srv = TestServer::start().await;
    let mut c = v5("ka-ping");
    c.keep_alive = 1;
    let (mut raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        raw.ping().await;
    }
    raw.disconnect().await;
}

fn with_alias(mut p: Publish, alias: u16) -> Publish {
    p.properties.topic_alias = Some(alias);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_client_topic_alias_maps_to_the_topic() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5("alias-in-sub")).await;
    sub.subscribe(1, "al/#", QoS::AtMostOnce).await;
    let (mut p, ack) = Raw::connect_ok(srv.mqtt(), v5("alias-in-pub")).await;
    assert_eq!(ack.properties.topic_alias_maximum, Some(64));
    p.publish(with_alias(publish("al/x", QoS::AtLeastOnce, 1, "1"), 3))
        .await;
    p.publish(with_alias(publish("", QoS::AtLeastOnce, 2, "2"), 3))
        .await;
    // Remap alias 3 to another topic.
    p.publish(with_alias(publish("al/y", QoS::AtMostOnce, 0, "3"), 3))
        .await;
    p.publish(with_alias(publish("", QoS::AtMostOnce, 0, "4"), 3))
        .await;
    for (topic, payload) in [("al/x", "1"), ("al/x", "2"), ("al/y", "3"), ("al/y", "4")] {
        let m = sub.recv_publish().await;
        assert_eq!((m.topic.as_str(), text(&m).as_str()), (topic, payload));
        assert_eq!(
            m.properties.topic_alias, None,
            "no alias toward this client"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_invalid_topic_alias_gets_disconnect() {
    let srv = TestServer::with(|s| s.mqtt.topic_alias_maximum = 4).await;
    let (mut p, ack) = Raw::connect_ok(srv.mqtt(), v5("alias-bad-1")).await;
    assert_eq!(ack.properties.topic_alias_maximum, Some(4));
    p.send(&Packet::Publish(with_alias(
        publish("t", QoS::AtMostOnce, 0, "x"),
        5,
    )))
    .await;
    p.expect_disconnect(reason::TOPIC_ALIAS_INVALID).await;

    // Alias 0 is never allowed: the codec reports it as a protocol error,
    // the spec's table of reason codes suggests 0x94; either is acceptable.
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("alias-bad-2")).await;
    p.send(&Packet::Publish(with_alias(
        publish("t", QoS::AtMostOnce, 0, "x"),
        0,
    )))
    .await;
    match p.expect_close(WAIT).await.last() {
        Some(Packet::Disconnect(d)) => assert!(
            [reason::TOPIC_ALIAS_INVALID, reason::PROTOCOL_ERROR].contains(&d.reason_code),
            "{d:?}"
        ),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }

    // An alias that was never set, with an empty topic.
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("alias-bad-3")).await;
    p.send(&Packet::Publish(with_alias(
        publish("", QoS::AtMostOnce, 0, "x"),
        2,
    )))
    .await;
    p.expect_disconnect(reason::PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_broker_sends_topic_aliases_when_the_client_allows_them() {
    let srv = TestServer::start().await;
    let mut c = v5("alias-out");
    c.properties.topic_alias_maximum = Some(2);
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), c).await;
    sub.subscribe(1, "ao/#", QoS::AtMostOnce).await;
    let (mut plain, _) = Raw::connect_ok(srv.mqtt(), v5("alias-out-plain")).await;
    plain.subscribe(1, "ao/#", QoS::AtMostOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("alias-out-pub")).await;
    let topics = ["ao/1", "ao/1", "ao/2", "ao/2", "ao/3", "ao/3", "ao/1"];
    for (i, t) in topics.iter().enumerate() {
        p.publish(publish(t, QoS::AtMostOnce, 0, i.to_string()))
            .await;
    }
    let mut map: HashMap<u16, String> = HashMap::new();
    let mut empty_topics = 0;
    for (i, t) in topics.iter().enumerate() {
        let m = sub.recv_publish().await;
        assert_eq!(text(&m), i.to_string());
        let resolved = match m.properties.topic_alias {
            Some(a) => {
                assert!(
                    (1..=2).contains(&a),
                    "alias {a} above the client's maximum 2"
                );
                if m.topic.is_empty() {
                    empty_topics += 1;
                    map.get(&a).cloned().expect("alias was set before use")
                } else {
                    map.insert(a, m.topic.clone());
                    m.topic.clone()
                }
            }
            None => m.topic.clone(),
        };
        assert_eq!(resolved, *t);
        let m = plain.recv_publish().await;
        assert_eq!(m.topic, *t);
        assert_eq!(m.properties.topic_alias, None);
    }
    assert!(
        empty_topics >= 2,
        "repeated topics are sent as aliases only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_message_expiry_drops_expired_queued_messages_and_reduces_the_interval() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("exp-sub", true, 60)).await;
    sub.subscribe(1, "exp/#", QoS::AtLeastOnce).await;
    let (mut live, _) = Raw::connect_ok(srv.mqtt(), v5("exp-live")).await;
    live.subscribe(1, "exp/#", QoS::AtMostOnce).await;
    sub.disconnect().await;

    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("exp-pub")).await;
    let mut short = publish("exp/short", QoS::AtLeastOnce, 1, "short");
    short.properties.message_expiry_interval = Some(1);
    let mut long = publish("exp/long", QoS::AtLeastOnce, 2, "long");
    long.properties.message_expiry_interval = Some(10);
    p.publish(short).await;
    p.publish(long).await;
    // Delivered at once, the full interval is announced.
    let m = live.recv_publish().await;
    assert_eq!(m.properties.message_expiry_interval, Some(1));
    let m = live.recv_publish().await;
    assert_eq!(m.properties.message_expiry_interval, Some(10));

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut sub, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("exp-sub", false, 60)).await;
    assert!(ack.session_present);
    let m = sub.recv_publish().await;
    assert_eq!(m.topic, "exp/long", "the expired message is not delivered");
    let left = m.properties.message_expiry_interval.expect("expiry");
    assert!(
        (6..=8).contains(&left),
        "remaining expiry {left}, expected 10 - 2 s"
    );
    sub.puback(m.packet_id.expect("pid")).await;
    sub.expect_nothing(QUIET).await;
    assert_eq!(srv.counter("messages_expired"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_properties_pass_through_unchanged() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5("props-sub")).await;
    sub.subscribe(1, "props/t", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("props-pub")).await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr\xff")),
        user_properties: vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "3".into()),
        ],
        ..Default::default()
    };
    let mut m = publish("props/t", QoS::AtLeastOnce, 1, "{\"v\":1}");
    m.properties = props.clone().into();
    p.publish(m).await;
    let got = sub.recv_publish().await;
    assert_eq!(*got.properties, props);
    assert_eq!(&got.payload[..], b"{\"v\":1}");

    // And to a rumqttc client.
    let (mut r, _) = V5::connect(V5::options(srv.mqtt(), "props-rumqttc")).await;
    r.subscribe("props/t", Q5::AtLeastOnce).await;
    let mut m = publish("props/t", QoS::AtLeastOnce, 2, "{}");
    m.properties = props.clone().into();
    p.publish(m).await;
    let got = r.recv_publish().await;
    let rp = got.properties.expect("properties");
    assert_eq!(rp.payload_format_indicator, Some(1));
    assert_eq!(rp.content_type.as_deref(), Some("application/json"));
    assert_eq!(rp.response_topic.as_deref(), Some("props/reply"));
    assert_eq!(
        rp.correlation_data.as_deref(),
        Some(&b"\x00\x01corr\xff"[..])
    );
    assert_eq!(rp.user_properties, props.user_properties);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_subscription_identifiers_are_delivered() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5("sid-sub")).await;
    let opts = SubscriptionOptions {
        qos: QoS::AtMostOnce,
        ..Default::default()
    };
    sub.subscribe_with(1, "sid/a/#", opts, Some(7)).await;
    sub.subscribe_with(2, "sid/+/b", opts, Some(300)).await;
    sub.subscribe_with(3, "sid/c", opts, None).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("sid-pub")).await;
    for t in ["sid/a/x", "sid/z/b", "sid/a/b", "sid/c"] {
        p.publish(publish(t, QoS::AtMostOnce, 0, t)).await;
    }
    let mut expect: Vec<(&str, Vec<u32>)> = vec![
        ("sid/a/x", vec![7]),
        ("sid/z/b", vec![300]),
        ("sid/a/b", vec![7, 300]),
        ("sid/c", vec![]),
    ];
    for (topic, ids) in expect.drain(..) {
        let m = sub.recv_publish().await;
        assert_eq!(m.topic, topic);
        let mut got = m.properties.subscription_identifiers.clone();
        got.sort_unstable();
        assert_eq!(got, ids, "subscription identifiers of {topic}");
    }
    sub.expect_nothing(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_no_local_suppresses_own_messages() {
    let srv = TestServer::start().await;
    let (mut me, _) = Raw::connect_ok(srv.mqtt(), v5("nl-me")).await;
    me.subscribe_with(
        1,
        "nl/t",
        SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            ..Default::default()
        },
        None,
    )
    .await;
    let (mut other, _) = Raw::connect_ok(srv.mqtt(), v5("nl-other")).await;
    other.subscribe(1, "nl/t", QoS::AtLeastOnce).await;
    me.publish(publish("nl/t", QoS::AtLeastOnce, 1, "mine"))
        .await;
    assert_eq!(text(&other.recv_publish().await), "mine");
    me.expect_nothing(QUIET).await;
    // Messages from others still arrive.
    other
        .publish(publish("nl/t", QoS::AtLeastOnce, 2, "theirs"))
        .await;
    assert_eq!(text(&me.recv_publish().await), "theirs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_unsubscribe_stops_delivery_and_reports_missing_subscriptions() {
    let srv = TestServer::start().await;
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("unsub5")).await;
    c.subscribe(1, "un/a", QoS::AtMostOnce).await;
    c.subscribe(2, "un/b", QoS::AtMostOnce).await;
    c.send(&Packet::Unsubscribe(mqtt_codec::Unsubscribe {
        packet_id: 3,
        user_properties: Vec::new(),
        filters: vec!["un/a".into(), "un/never".into()],
    }))
    .await;
    match c.recv().await {
        Packet::UnsubAck(a) => {
            assert_eq!(a.packet_id, 3);
            assert_eq!(
                a.reason_codes,
                vec![reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("unsub5-pub")).await;
    p.publish(publish("un/a", QoS::AtMostOnce, 0, "a")).await;
    p.publish(publish("un/b", QoS::AtMostOnce, 0, "b")).await;
    assert_eq!(c.recv_publish().await.topic, "un/b");
    c.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos2_retransmitted_publish_is_delivered_once() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5("once-sub")).await;
    sub.subscribe(1, "once/t", QoS::ExactlyOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("once-pub")).await;
    let m = publish("once/t", QoS::ExactlyOnce, 5, "exactly once");
    for dup in [false, true, true] {
        p.send(&Packet::Publish(Publish { dup, ..m.clone() })).await;
        match p.recv().await {
            Packet::PubRec(r) => assert_eq!((r.packet_id, r.reason_code), (5, 0)),
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    p.send(&Packet::PubRel(PubResponse::new(5, 0))).await;
    match p.recv().await {
        Packet::PubComp(r) => assert_eq!((r.packet_id, r.reason_code), (5, 0)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let got = sub.recv_publish().await;
    assert_eq!(text(&got), "exactly once");
    let id = got.packet_id.expect("pid");
    sub.send(&Packet::PubRec(PubResponse::new(id, 0))).await;
    match sub.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubResponse::new(id, 0))).await;
    sub.expect_nothing(QUIET).await;
    // The identifier is free again: a new message with it is a new message.
    p.publish(publish("once/t", QoS::ExactlyOnce, 5, "again"))
        .await;
    assert_eq!(text(&sub.recv_publish().await), "again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_can_end_the_session_but_not_create_one() {
    let srv = TestServer::start().await;
    // Expiry set at CONNECT, cleared by DISCONNECT: the session ends.
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("dx-clear", true, 60)).await;
    c.subscribe(1, "dx/t", QoS::AtLeastOnce).await;
    c.send(&Packet::Disconnect(Box::new(mqtt_codec::Disconnect {
        reason_code: 0,
        properties: mqtt_codec::DisconnectProperties {
            session_expiry_interval: Some(0),
            ..Default::default()
        },
    })))
    .await;
    assert!(c.expect_close(WAIT).await.is_empty());
    let broker = srv.get().broker.clone();
    eventually("the session to end", || broker.gauges().sessions == 0).await;
    let (_c, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("dx-clear", false, 60)).await;
    assert!(!ack.session_present);

    // Expiry 0 at CONNECT cannot be raised by DISCONNECT: protocol error.
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("dx-raise")).await;
    c.send(&Packet::Disconnect(Box::new(mqtt_codec::Disconnect {
        reason_code: 0,
        properties: mqtt_codec::DisconnectProperties {
            session_expiry_interval: Some(30),
            ..Default::default()
        },
    })))
    .await;
    c.expect_disconnect(reason::PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_server_keep_alive_caps_the_client_keep_alive() {
    let srv = TestServer::with(|s| s.mqtt.max_keep_alive = 1).await;
    let mut c = v5("ska");
    c.keep_alive = 0;
    let (mut raw, ack) = Raw::connect_ok(srv.mqtt(), c).await;
    assert_eq!(ack.properties.server_keep_alive, Some(1));
    let t0 = Instant::now();
    raw.expect_disconnect(reason::KEEP_ALIVE_TIMEOUT).await;
    assert!(
        t0.elapsed() <= Duration::from_millis(2600),
        "{:?}",
        t0.elapsed()
    );
    let (_ok, ack) = Raw::connect_ok(srv.mqtt(), {
        let mut c = v5("ska-ok");
        c.keep_alive = 1;
        c
    })
    .await;
    assert_eq!(ack.properties.server_keep_alive, None, "within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_not_available_refuses_retained_publishes() {
    let srv = TestServer::with(|s| s.mqtt.retain_available = false).await;
    let (mut c, ack) = Raw::connect_ok(srv.mqtt(), v5("noretain")).await;
    assert_eq!(ack.properties.retain_available, Some(0));
    c.publish(publish("nr/t", QoS::AtLeastOnce, 1, "plain"))
        .await;
    c.send(&Packet::Publish(retained(
        "nr/t",
        QoS::AtLeastOnce,
        2,
        "kept",
    )))
    .await;
    c.expect_disconnect(reason::RETAIN_NOT_SUPPORTED).await;
    assert_eq!(srv.get().broker.gauges().retained, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_with_server_busy() {
    let srv = TestServer::with(|s| s.mqtt.max_connections = 2).await;
    let (_a, _) = Raw::connect_ok(srv.mqtt(), v5("mc-1")).await;
    let (_b, _) = Raw::connect_ok(srv.mqtt(), v3("mc-2")).await;
    let (mut c, ack) = Raw::connect(srv.mqtt(), v5("mc-3")).await;
    assert_eq!(ack.reason_code, reason::SERVER_BUSY);
    assert!(c.expect_close(WAIT).await.is_empty());
    let (mut d, ack) = Raw::connect(srv.mqtt(), v3("mc-4")).await;
    // 3.1.1 return code 3 (server unavailable), decoded as 0x88.
    assert_eq!(ack.reason_code, reason::SERVER_UNAVAILABLE);
    assert!(d.expect_close(WAIT).await.is_empty());
}
