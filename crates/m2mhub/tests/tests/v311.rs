//! MQTT 3.1.1 flows: round trips, wildcards, `$` topics, client identifiers,
//! redelivery, takeover and keep-alive.

use crate::common::*;
use mqtt_codec::{Packet, Protocol, QoS};
use rumqttc::QoS as RQoS;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_publish_subscribe_round_trip_qos0_qos1_qos2() {
    let srv = TestServer::start().await;
    let (mut sub, _) = V3::connect(V3::options(srv.mqtt(), "v3-sub")).await;
    sub.subscribe("rt/#", RQoS::ExactlyOnce).await;
    let (mut publ, _) = V3::connect(V3::options(srv.mqtt(), "v3-pub")).await;

    publ.client
        .publish("rt/q0", RQoS::AtMostOnce, false, "zero")
        .await
        .expect("publish");
    publ.client
        .publish("rt/q1", RQoS::AtLeastOnce, false, "one")
        .await
        .expect("publish");
    publ.client
        .publish("rt/q2", RQoS::ExactlyOnce, false, "two")
        .await
        .expect("publish");
    // The publisher's flows complete: PUBACK for QoS 1, PUBCOMP for QoS 2.
    publ.wait("PUBACK", |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    publ.wait("PUBCOMP", |p| {
        matches!(p, rumqttc::Packet::PubComp(_)).then_some(())
    })
    .await;

    for (topic, qos, payload) in [
        ("rt/q0", RQoS::AtMostOnce, "zero"),
        ("rt/q1", RQoS::AtLeastOnce, "one"),
        ("rt/q2", RQoS::ExactlyOnce, "two"),
    ] {
        let p = sub.recv_publish().await;
        assert_eq!(p.topic, topic);
        assert_eq!(p.qos, qos, "delivered at the published QoS");
        assert_eq!(&p.payload[..], payload.as_bytes());
        assert!(!p.retain && !p.dup);
    }
    sub.expect_no_publish(QUIET).await;
    publ.disconnect().await;
    sub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_delivery_qos_is_the_minimum_of_publish_and_subscription() {
    let srv = TestServer::start().await;
    let (mut s0, _) = Raw::connect_ok(srv.mqtt(), v3("min-s0")).await;
    let (mut s1, _) = Raw::connect_ok(srv.mqtt(), v3("min-s1")).await;
    assert_eq!(
        s0.subscribe(1, "min/t", QoS::AtMostOnce).await.reason_codes,
        vec![0]
    );
    assert_eq!(
        s1.subscribe(1, "min/t", QoS::AtLeastOnce)
            .await
            .reason_codes,
        vec![1]
    );
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("min-pub")).await;
    p.publish(publish("min/t", QoS::ExactlyOnce, 1, "x")).await;
    assert_eq!(s0.recv_publish().await.qos, QoS::AtMostOnce);
    let m = s1.recv_publish().await;
    assert_eq!(m.qos, QoS::AtLeastOnce);
    s1.puback(m.packet_id.expect("pid")).await;
    p.publish(publish("min/t", QoS::AtMostOnce, 0, "y")).await;
    assert_eq!(s1.recv_publish().await.qos, QoS::AtMostOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_wildcards_plus_and_hash_match() {
    let srv = TestServer::start().await;
    let mut subs = Vec::new();
    for (i, filter) in ["w/+/c", "w/#", "w/b/+", "+"].into_iter().enumerate() {
        let (mut s, _) = Raw::connect_ok(srv.mqtt(), v3(&format!("wild-{i}"))).await;
        s.subscribe(1, filter, QoS::AtMostOnce).await;
        subs.push(s);
    }
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("wild-pub")).await;
    let topics = ["w/b/c", "w/x/c", "w/b/d", "w", "w/b/c/d", "other/b/c"];
    for t in topics {
        p.publish(publish(t, QoS::AtMostOnce, 0, t)).await;
    }
    p.publish(publish("end", QoS::AtMostOnce, 0, "end")).await;
    let expected: [&[&str]; 4] = [
        &["w/b/c", "w/x/c"],
        &["w/b/c", "w/x/c", "w/b/d", "w", "w/b/c/d"],
        &["w/b/c", "w/b/d"],
        // `+` matches one level only: `w` and `end`.
        &["w", "end"],
    ];
    for (s, want) in subs.iter_mut().zip(expected) {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            got.push(s.recv_publish().await.topic);
        }
        assert_eq!(got, want);
        s.expect_nothing(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_dollar_topics_not_matched_by_wildcards_but_sys_by_explicit_filter() {
    let srv = TestServer::with(|s| s.mqtt.sys_interval_secs = 1).await;
    let (mut all, _) = Raw::connect_ok(srv.mqtt(), v3("dollar-all")).await;
    all.subscribe(1, "#", QoS::AtMostOnce).await;
    all.subscribe(2, "+/broker/version", QoS::AtMostOnce).await;
    let (mut sys, _) = Raw::connect_ok(srv.mqtt(), v3("dollar-sys")).await;
    sys.subscribe(1, "$SYS/broker/version", QoS::AtMostOnce)
        .await;
    // Retained (sent at subscribe) or the next tick, at most a second away.
    let v = sys.recv_publish().await;
    assert_eq!(v.topic, "$SYS/broker/version");
    assert!(text(&v).starts_with("m2mhub "), "{v:?}");
    // Across at least one more `$SYS` tick, `#` and `+/…` see nothing.
    all.expect_nothing(Duration::from_millis(1300)).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("dollar-pub")).await;
    p.publish(publish("plain/t", QoS::AtMostOnce, 0, "x")).await;
    assert_eq!(all.recv_publish().await.topic, "plain/t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_empty_client_id_with_clean_session_is_accepted() {
    let srv = TestServer::start().await;
    let (mut c, ack) = Raw::connect(srv.mqtt(), v3("")).await;
    assert_eq!(ack.reason_code, 0);
    c.subscribe(1, "anon/t", QoS::AtMostOnce).await;
    c.publish(publish("anon/t", QoS::AtMostOnce, 0, "hi")).await;
    assert_eq!(text(&c.recv_publish().await), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_empty_client_id_with_persistent_session_is_refused_with_return_code_2() {
    let srv = TestServer::start().await;
    let mut s = tokio::net::TcpStream::connect(srv.mqtt())
        .await
        .expect("connect");
    s.write_all(&bytes_of(
        &Packet::Connect(Box::new(v3_persistent(""))),
        Protocol::V311,
    ))
    .await
    .expect("write");
    let mut connack = [0u8; 4];
    within("CONNACK", s.read_exact(&mut connack))
        .await
        .expect("CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x02], "identifier rejected");
    let mut rest = Vec::new();
    let n = within("close", s.read_to_end(&mut rest)).await.unwrap_or(0);
    assert_eq!(n, 0, "connection closed after the refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_unacked_qos1_is_redelivered_with_dup_after_reconnect() {
    let srv = TestServer::start().await;
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v3_persistent("redeliver-v3")).await;
    sub.subscribe(1, "redo/t", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("redeliver-v3-pub")).await;
    p.publish(publish("redo/t", QoS::AtLeastOnce, 7, "m1"))
        .await;
    let first = sub.recv_publish().await;
    assert!(!first.dup);
    let pid = first.packet_id.expect("pid");
    // No PUBACK: the connection just ends.
    sub.drop_abruptly().await;

    let (mut sub, ack) = Raw::connect_ok(srv.mqtt(), v3_persistent("redeliver-v3")).await;
    assert!(ack.session_present);
    let again = sub.recv_publish().await;
    assert!(again.dup, "redelivery carries DUP: {again:?}");
    assert_eq!(again.packet_id, Some(pid));
    assert_eq!(text(&again), "m1");
    sub.puback(pid).await;
    sub.ping().await;
    sub.drop_abruptly().await;

    // Acknowledged now: not sent a third time.
    let (mut sub, ack) = Raw::connect_ok(srv.mqtt(), v3_persistent("redeliver-v3")).await;
    assert!(ack.session_present);
    sub.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_session_takeover_closes_the_first_connection() {
    let srv = TestServer::start().await;
    let (mut first, _) = Raw::connect_ok(srv.mqtt(), v3_persistent("takeover-v3")).await;
    first.subscribe(1, "take/t", QoS::AtLeastOnce).await;
    let (mut second, ack) = Raw::connect_ok(srv.mqtt(), v3_persistent("takeover-v3")).await;
    assert!(
        ack.session_present,
        "the session moves to the new connection"
    );
    let seen = first.expect_close(WAIT).await;
    assert!(seen.is_empty(), "3.1.1 has no server DISCONNECT: {seen:?}");
    // The subscription went along with the session.
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("takeover-v3-pub")).await;
    p.publish(publish("take/t", QoS::AtLeastOnce, 1, "x")).await;
    assert_eq!(text(&second.recv_publish().await), "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_keepalive_timeout_closes_a_silent_client() {
    let srv = TestServer::start().await;
    let mut c = v3("ka-v3");
    c.keep_alive = 1;
    let (mut raw, _) = Raw::connect_ok(srv.mqtt(), c).await;
    let t0 = Instant::now();
    let seen = raw.expect_close(Duration::from_secs(4)).await;
    let took = t0.elapsed();
    assert!(seen.is_empty(), "{seen:?}");
    assert!(
        took >= Duration::from_millis(1300) && took <= Duration::from_millis(2800),
        "closed after {took:?}, expected about 1.5 s"
    );
    assert_eq!(srv.counter("keepalive_timeouts"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_mqisdp_connect_is_accepted() {
    let srv = TestServer::start().await;
    let mut s = tokio::net::TcpStream::connect(srv.mqtt())
        .await
        .expect("connect");
    // CONNECT "MQIsdp" level 3, clean session, keep-alive 60, client id "old".
    s.write_all(&[
        0x10, 17, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0x00, 60, 0x00, 0x03,
        b'o', b'l', b'd',
    ])
    .await
    .expect("write");
    let mut connack = [0u8; 4];
    within("CONNACK", s.read_exact(&mut connack))
        .await
        .expect("CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_unsubscribe_stops_delivery() {
    let srv = TestServer::start().await;
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v3("unsub3")).await;
    c.subscribe(1, "un3/#", QoS::AtMostOnce).await;
    c.send(&Packet::Unsubscribe(mqtt_codec::Unsubscribe {
        packet_id: 2,
        user_properties: Vec::new(),
        filters: vec!["un3/#".into()],
    }))
    .await;
    match c.recv().await {
        Packet::UnsubAck(a) => assert_eq!(a.packet_id, 2),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    c.publish(publish("un3/x", QoS::AtLeastOnce, 3, "x")).await;
    c.expect_nothing(QUIET).await;
}
