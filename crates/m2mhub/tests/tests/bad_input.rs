//! Bad input: malformed packets, protocol errors, missing or wrong first
//! packet, and a client that stops reading.

use crate::common::*;
use mqtt_codec::{reason, Packet, Protocol, QoS};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Malformed packets, each sent after a successful CONNECT.
const MALFORMED: [(&str, &[u8]); 5] = [
    // PUBLISH with QoS 3.
    (
        "publish-qos3",
        &[0x36, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, 0x00],
    ),
    // SUBSCRIBE with reserved flags 0000 instead of 0010.
    (
        "subscribe-bad-flags",
        &[0x80, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x00],
    ),
    // PUBLISH whose topic is not UTF-8.
    (
        "publish-bad-utf8",
        &[0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, 0x00],
    ),
    // A remaining length of five bytes.
    (
        "bad-remaining-length",
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
    ),
    // Packet type 0 is reserved.
    ("reserved-type", &[0x00, 0x00]),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_malformed_packets_get_disconnect_0x81_then_close() {
    let srv = TestServer::start().await;
    for (i, (name, bytes)) in MALFORMED.iter().enumerate() {
        let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5(&format!("bad5-{i}"))).await;
        c.send_raw(bytes).await;
        let seen = c.expect_close(WAIT).await;
        match seen.last() {
            Some(Packet::Disconnect(d)) => assert_eq!(
                d.reason_code,
                reason::MALFORMED_PACKET,
                "{name}: DISCONNECT 0x{:02x}",
                d.reason_code
            ),
            other => panic!("{name}: expected DISCONNECT 0x81, got {other:?}"),
        }
    }
    assert_eq!(srv.counter("malformed_packets"), MALFORMED.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_malformed_packets_close_the_connection_without_a_packet() {
    let srv = TestServer::start().await;
    for (i, (name, bytes)) in MALFORMED.iter().enumerate() {
        let (mut c, _) = Raw::connect_ok(srv.mqtt(), v3(&format!("bad3-{i}"))).await;
        c.send_raw(bytes).await;
        let seen = c.expect_close(WAIT).await;
        assert!(
            seen.is_empty(),
            "{name}: 3.1.1 gets no DISCONNECT: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_protocol_errors_get_disconnect_0x82() {
    let srv = TestServer::start().await;
    // A second CONNECT.
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("proto-1")).await;
    c.send(&Packet::Connect(Box::new(v5("proto-1")))).await;
    c.expect_disconnect(reason::PROTOCOL_ERROR).await;
    // A packet only the server may send.
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("proto-2")).await;
    c.send_raw(&[0xD0, 0x00]).await; // PINGRESP
    c.expect_disconnect(reason::PROTOCOL_ERROR).await;
    // Packet identifier 0 on a QoS 1 PUBLISH.
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("proto-3")).await;
    c.send_raw(&[0x32, 0x06, 0x00, 0x01, b'a', 0x00, 0x00, 0x00])
        .await;
    c.expect_disconnect(reason::PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_that_never_comes_is_dropped_after_the_connect_timeout() {
    let srv = TestServer::with(|s| s.mqtt.connect_timeout_secs = 1).await;
    let mut s = tokio::net::TcpStream::connect(srv.mqtt())
        .await
        .expect("connect");
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = within("close after the connect timeout", s.read(&mut buf))
        .await
        .unwrap_or(0);
    let took = t0.elapsed();
    assert_eq!(n, 0, "closed without a reply");
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(2500),
        "dropped after {took:?}, expected about 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_packet_that_is_not_connect_closes_the_connection() {
    let srv = TestServer::start().await;
    for first in [
        bytes_of(&Packet::PingReq, Protocol::V311).to_vec(),
        bytes_of(
            &Packet::Publish(publish("a", QoS::AtMostOnce, 0, "x")),
            Protocol::V311,
        )
        .to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ] {
        let mut s = tokio::net::TcpStream::connect(srv.mqtt())
            .await
            .expect("connect");
        s.write_all(&first).await.expect("write");
        let mut rest = Vec::new();
        let n = within_for(Duration::from_secs(2), "close", s.read_to_end(&mut rest))
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without a reply to {first:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level_gets_connack_return_code_1() {
    let srv = TestServer::start().await;
    let mut s = tokio::net::TcpStream::connect(srv.mqtt())
        .await
        .expect("connect");
    // CONNECT "MQTT" level 6, clean session, keep-alive 60, client id "x".
    s.write_all(&[
        0x10, 13, 0x00, 0x04, b'M', b'Q', b'T', b'T', 6, 0x02, 0x00, 60, 0x00, 0x01, b'x',
    ])
    .await
    .expect("write");
    let mut reply = Vec::new();
    within("reply and close", s.read_to_end(&mut reply))
        .await
        .expect("read");
    assert_eq!(
        reply,
        [0x20, 0x02, 0x00, 0x01],
        "3.1.1 CONNACK, return code 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_does_not_stall_the_broker() {
    let srv = TestServer::with(|s| {
        s.mqtt.max_queued_messages = 100;
        s.mqtt.write_timeout_secs = 1;
    })
    .await;
    // A subscriber with a small receive buffer that never reads.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = sock.connect(srv.mqtt()).await.expect("connect");
    let mut slow = Raw::over(Box::new(stream), Protocol::V311);
    let ack = slow.handshake(v3("slow-reader")).await;
    assert_eq!(ack.reason_code, 0);
    slow.subscribe(1, "flood/#", QoS::AtMostOnce).await;

    // Flood: 1000 QoS 0 messages of 16 KiB in one write.
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("flooder")).await;
    let mut flood = Vec::new();
    let payload = vec![b'z'; 16 * 1024];
    for _ in 0..1000 {
        flood.extend_from_slice(&bytes_of(
            &Packet::Publish(publish("flood/t", QoS::AtMostOnce, 0, &payload)),
            Protocol::V311,
        ));
    }
    within_for(Duration::from_secs(10), "flood written", p.send_raw(&flood)).await;
    within_for(Duration::from_secs(10), "flood handled", p.ping()).await;

    // Another client still gets a prompt round trip.
    let t0 = Instant::now();
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("still-alive")).await;
    c.subscribe(1, "alive/t", QoS::AtLeastOnce).await;
    c.publish(publish("alive/t", QoS::AtLeastOnce, 1, "pong"))
        .await;
    assert_eq!(text(&c.recv_publish().await), "pong");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    let dropped = scrape(srv.http(), "m2mhub_mqtt_messages_dropped_queue_full_total").await;
    assert!(
        dropped > 0,
        "the slow reader's overflow is dropped and counted"
    );
    // The slow reader itself is cut off after the write timeout.
    let broker = srv.get().broker.clone();
    eventually("the slow reader to be dropped", || {
        broker.gauges().connections == 2
    })
    .await;
    drop(slow);
}
