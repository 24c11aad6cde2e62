//! Flow control and size limits: Receive Maximum both ways, Maximum Packet
//! Size both ways.

use crate::common::*;
use mqtt_codec::{reason, Packet, QoS};
use rumqttc::v5::mqttbytes::QoS as Q5;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_client_receive_maximum_limits_unacknowledged_deliveries() {
    let srv = TestServer::start().await;
    let mut o = V5::options(srv.mqtt(), "rm-client");
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(2));
    let (mut s, _) = V5::connect(o).await;
    s.subscribe("rm/t", Q5::AtLeastOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("rm-pub")).await;
    for i in 0..5u16 {
        p.publish(publish("rm/t", QoS::AtLeastOnce, i + 1, i.to_string()))
            .await;
    }
    let m0 = s.recv_publish().await;
    let m1 = s.recv_publish().await;
    assert_eq!((&m0.payload[..], &m1.payload[..]), (&b"0"[..], &b"1"[..]));
    s.expect_no_publish(QUIET).await;
    // One acknowledgement frees one slot.
    s.client.ack(&m0).await.expect("ack");
    let m2 = s.recv_publish().await;
    assert_eq!(&m2.payload[..], b"2");
    s.expect_no_publish(QUIET).await;
    s.client.ack(&m1).await.expect("ack");
    s.client.ack(&m2).await.expect("ack");
    let m3 = s.recv_publish().await;
    let m4 = s.recv_publish().await;
    assert_eq!((&m3.payload[..], &m4.payload[..]), (&b"3"[..], &b"4"[..]));
    s.client.ack(&m3).await.expect("ack");
    s.client.ack(&m4).await.expect("ack");
    s.expect_no_publish(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_exceeding_the_broker_receive_maximum_gets_disconnect_0x93() {
    let srv = TestServer::with(|s| s.mqtt.receive_maximum = 2).await;
    let (mut c, ack) = Raw::connect_ok(srv.mqtt(), v5("rm-broker")).await;
    assert_eq!(ack.properties.receive_maximum, Some(2));
    // Two QoS 2 PUBLISHes, never released, fill the window...
    for id in 1..=2u16 {
        c.send(&Packet::Publish(publish(
            "rmb/t",
            QoS::ExactlyOnce,
            id,
            "x",
        )))
        .await;
        match c.recv().await {
            Packet::PubRec(r) => assert_eq!(
                (r.packet_id, r.reason_code),
                (id, reason::NO_MATCHING_SUBSCRIBERS)
            ),
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    // ...and a third one exceeds it.
    c.send(&Packet::Publish(publish("rmb/t", QoS::ExactlyOnce, 3, "x")))
        .await;
    c.expect_disconnect(reason::RECEIVE_MAXIMUM_EXCEEDED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_broker_receive_maximum_allows_completed_flows() {
    let srv = TestServer::with(|s| s.mqtt.receive_maximum = 2).await;
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("rm-broker-ok")).await;
    // Completed QoS 2 flows free their slot: many in sequence are fine.
    for id in 1..=6u16 {
        c.publish(publish("rmb/ok", QoS::ExactlyOnce, id, "x"))
            .await;
    }
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_client_maximum_packet_size_skips_larger_messages() {
    let srv = TestServer::start().await;
    let mut small = v5("mps-small");
    small.properties.maximum_packet_size = Some(128);
    let (mut small, _) = Raw::connect_ok(srv.mqtt(), small).await;
    small.subscribe(1, "mps/t", QoS::AtLeastOnce).await;
    let (mut big, _) = Raw::connect_ok(srv.mqtt(), v5("mps-big")).await;
    big.subscribe(1, "mps/t", QoS::AtLeastOnce).await;

    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("mps-pub")).await;
    p.publish(publish("mps/t", QoS::AtLeastOnce, 1, "small-1"))
        .await;
    p.publish(publish("mps/t", QoS::AtLeastOnce, 2, vec![b'x'; 500]))
        .await;
    p.publish(publish("mps/t", QoS::AtLeastOnce, 3, "small-2"))
        .await;

    for want in ["small-1", "small-2"] {
        let m = small.recv_publish().await;
        assert_eq!(text(&m), want, "the large message is skipped, not sent");
        small.puback(m.packet_id.expect("pid")).await;
    }
    small.expect_nothing(QUIET).await;
    let sizes: Vec<usize> = [
        big.recv_publish().await,
        big.recv_publish().await,
        big.recv_publish().await,
    ]
    .iter()
    .map(|m| m.payload.len())
    .collect();
    assert_eq!(sizes, [7, 500, 7]);
    assert_eq!(srv.counter("messages_dropped_too_large"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_packet_over_the_server_maximum_gets_disconnect_0x95() {
    let srv = TestServer::with(|s| s.mqtt.max_packet_size = 1024).await;
    let (mut c, ack) = Raw::connect_ok(srv.mqtt(), v5("mps-server")).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    // Just under the limit is fine.
    c.publish(publish("big/t", QoS::AtLeastOnce, 1, vec![0u8; 900]))
        .await;
    c.send(&Packet::Publish(publish(
        "big/t",
        QoS::AtLeastOnce,
        2,
        vec![0u8; 2000],
    )))
    .await;
    c.expect_disconnect(reason::PACKET_TOO_LARGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_packet_over_the_server_maximum_closes_the_connection() {
    let srv = TestServer::with(|s| s.mqtt.max_packet_size = 1024).await;
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v3("mps-server-v3")).await;
    c.send(&Packet::Publish(publish(
        "big/t",
        QoS::AtMostOnce,
        0,
        vec![0u8; 2000],
    )))
    .await;
    let seen = c.expect_close(WAIT).await;
    assert!(seen.is_empty(), "3.1.1: closed without a packet: {seen:?}");
}
