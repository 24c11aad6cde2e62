//! Sessions: persistent sessions (3.1.1 clean session false, MQTT 5 session
//! expiry), clean start, expiry, and the bound of the offline queue.

use crate::common::*;
use mqtt_codec::QoS;
use rumqttc::v5::mqttbytes::v5::ConnectProperties;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_persistent_session_receives_messages_queued_while_offline() {
    let srv = TestServer::start().await;
    let mut o = V3::options(srv.mqtt(), "persist-v3");
    o.set_clean_session(false);
    let (mut s, ack) = V3::connect(o.clone()).await;
    assert!(!ack.session_present);
    s.subscribe("pq3/#", rumqttc::QoS::AtLeastOnce).await;
    s.disconnect().await;

    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("persist-v3-pub")).await;
    for i in 0..3 {
        p.publish(publish("pq3/t", QoS::AtLeastOnce, i + 1, format!("m{i}")))
            .await;
    }
    // QoS 0 is not queued for offline sessions.
    p.publish(publish("pq3/t", QoS::AtMostOnce, 0, "q0")).await;

    let (mut s, ack) = V3::connect(o).await;
    assert!(ack.session_present);
    for i in 0..3 {
        let m = s.recv_publish().await;
        assert_eq!(&m.payload[..], format!("m{i}").as_bytes());
        assert_eq!(m.qos, rumqttc::QoS::AtLeastOnce);
    }
    s.expect_no_publish(QUIET).await;
    // The subscription is still active.
    p.publish(publish("pq3/t", QoS::AtLeastOnce, 9, "live"))
        .await;
    assert_eq!(&s.recv_publish().await.payload[..], b"live");
}

fn v5_session_options(srv: &TestServer, id: &str, expiry: u32) -> rumqttc::v5::MqttOptions {
    let mut o = V5::options(srv.mqtt(), id);
    o.set_clean_start(false);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(expiry);
    o.set_connect_properties(props);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_keeps_the_session_and_its_queue() {
    let srv = TestServer::start().await;
    let o = v5_session_options(&srv, "persist-v5", 60);
    let (mut s, ack) = V5::connect(o.clone()).await;
    assert!(!ack.session_present);
    s.subscribe("pq5/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await;
    s.disconnect().await;

    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("persist-v5-pub")).await;
    for i in 0..3 {
        p.publish(publish("pq5/t", QoS::AtLeastOnce, i + 1, format!("m{i}")))
            .await;
    }
    let (mut s, ack) = V5::connect(o).await;
    assert!(ack.session_present);
    for i in 0..3 {
        assert_eq!(
            &s.recv_publish().await.payload[..],
            format!("m{i}").as_bytes()
        );
    }
    s.expect_no_publish(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_start_discards_the_previous_session() {
    let srv = TestServer::start().await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("clean-pub")).await;

    // MQTT 5: clean start.
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("clean-v5", true, 60)).await;
    s.subscribe(1, "clean/t", QoS::AtLeastOnce).await;
    s.disconnect().await;
    // 3.1.1: clean session.
    let (mut s3, _) = Raw::connect_ok(srv.mqtt(), v3_persistent("clean-v3")).await;
    s3.subscribe(1, "clean/t", QoS::AtLeastOnce).await;
    s3.disconnect().await;

    p.publish(publish("clean/t", QoS::AtLeastOnce, 1, "queued"))
        .await;

    let (mut s, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("clean-v5", true, 60)).await;
    assert!(!ack.session_present);
    let (mut s3, ack) = Raw::connect_ok(srv.mqtt(), v3("clean-v3")).await;
    assert!(!ack.session_present);
    // Neither the queue nor the subscription survive.
    p.publish(publish("clean/t", QoS::AtLeastOnce, 2, "after"))
        .await;
    s.expect_nothing(QUIET).await;
    s3.expect_nothing(Duration::from_millis(50)).await;
    s3.disconnect().await;
    // A clean 3.1.1 session ends with its connection.
    let (_s3, ack) = Raw::connect_ok(srv.mqtt(), v3_persistent("clean-v3")).await;
    assert!(!ack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_is_gone_after_its_expiry_interval() {
    let srv = TestServer::start().await;
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("expire-me", true, 1)).await;
    s.subscribe(1, "gone/t", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let broker = srv.get().broker.clone();
    assert_eq!(broker.gauges().sessions, 1, "kept while the interval runs");
    eventually("the session to expire", || broker.gauges().sessions == 0).await;
    assert_eq!(srv.counter("sessions_expired"), 1);
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("expire-pub")).await;
    let code = p.publish(publish("gone/t", QoS::AtLeastOnce, 1, "x")).await;
    assert_eq!(code, mqtt_codec::reason::NO_MATCHING_SUBSCRIBERS);
    let (mut s, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("expire-me", false, 1)).await;
    assert!(!ack.session_present);
    s.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_zero_ends_the_session_with_the_connection() {
    let srv = TestServer::start().await;
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("expiry-zero", false, 0)).await;
    s.subscribe(1, "zero/t", QoS::AtLeastOnce).await;
    s.drop_abruptly().await;
    let broker = srv.get().broker.clone();
    eventually("the session to end", || broker.gauges().sessions == 0).await;
    let (_s, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("expiry-zero", false, 0)).await;
    assert!(!ack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_bound_drops_the_overflow_and_counts_it() {
    let srv = TestServer::with(|s| s.mqtt.max_queued_messages = 5).await;
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("bounded", true, 60)).await;
    s.subscribe(1, "bound/t", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let before = scrape(srv.http(), "m2mhub_mqtt_messages_dropped_queue_full_total").await;
    assert_eq!(before, 0);

    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("bounded-pub")).await;
    for i in 0..8u16 {
        p.publish(publish("bound/t", QoS::AtLeastOnce, i + 1, format!("{i}")))
            .await;
    }
    let after = scrape(srv.http(), "m2mhub_mqtt_messages_dropped_queue_full_total").await;
    assert_eq!(after, 3, "8 published, 5 queued, 3 dropped");

    let (mut s, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("bounded", false, 60)).await;
    assert!(ack.session_present);
    for i in 0..5 {
        let m = s.recv_publish().await;
        assert_eq!(text(&m), i.to_string(), "the oldest messages are kept");
        s.puback(m.packet_id.expect("pid")).await;
    }
    s.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_offline_queue_is_delivered_completely_and_in_order() {
    let srv = TestServer::start().await;
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("bulk", true, 60)).await;
    s.subscribe(1, "bulk/t", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let n: u16 = 1500;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("bulk-pub")).await;
    let mut all = Vec::new();
    for i in 0..n {
        all.extend_from_slice(&bytes_of(
            &mqtt_codec::Packet::Publish(publish("bulk/t", QoS::AtLeastOnce, i + 1, i.to_string())),
            mqtt_codec::Protocol::V5,
        ));
    }
    p.send_raw(&all).await;
    for _ in 0..n {
        match p.recv().await {
            mqtt_codec::Packet::PubAck(_) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    let (mut s, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("bulk", false, 60)).await;
    assert!(ack.session_present);
    for i in 0..n {
        let m = s.recv_publish().await;
        assert_eq!(text(&m), i.to_string());
        s.puback(m.packet_id.expect("pid")).await;
    }
    s.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_is_capped_by_the_server_maximum() {
    let srv = TestServer::with(|s| s.mqtt.max_session_expiry_secs = 10).await;
    let (_c, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("capped", true, 3600)).await;
    assert_eq!(ack.properties.session_expiry_interval, Some(10));
    let (_d, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("uncapped", true, 5)).await;
    assert_eq!(
        ack.properties.session_expiry_interval, None,
        "not echoed when granted"
    );
}
