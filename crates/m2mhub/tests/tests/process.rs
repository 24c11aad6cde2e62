//! The real binary: durability across `kill -9`, graceful SIGTERM.

use crate::common::*;
use mqtt_codec::{reason, Packet, Protocol, QoS};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_every_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut srv = BinServer::start(&data, &dir.path().join("log-1")).await;

    let (mut sub, _) = Raw::connect_ok(srv.mqtt, v5_persistent("k9-sub", true, 86_400)).await;
    sub.subscribe(1, "k9/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let (mut p, _) = Raw::connect_ok(srv.mqtt, v5("k9-pub")).await;
    // Retained messages first, each acknowledged.
    for i in 0..5u16 {
        let code = p
            .publish(retained(
                &format!("k9/r/{i}"),
                QoS::AtLeastOnce,
                i + 1,
                format!("r{i}"),
            ))
            .await;
        assert!(code < 0x80);
    }
    // Then a pipelined stream of QoS 1 messages; the process dies while
    // they are being acknowledged.
    let n: u16 = 5000;
    let mut stream = Vec::new();
    let mut index_of = HashMap::new();
    for i in 0..n {
        let pid = 100 + i;
        index_of.insert(pid, i);
        stream.extend_from_slice(&bytes_of(
            &Packet::Publish(publish("k9/t", QoS::AtLeastOnce, pid, format!("m{i}"))),
            Protocol::V5,
        ));
    }
    p.send_raw(&stream).await;
    let mut acked = BTreeSet::new();
    while acked.len() < usize::from(n / 20) {
        match p.recv().await {
            Packet::PubAck(a) => {
                assert_eq!(a.reason_code, 0);
                acked.insert(index_of[&a.packet_id]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    srv.kill9().await;
    // PUBACKs already on their way count as acknowledged too.
    loop {
        match p.next(Duration::from_secs(2)).await {
            Next::Packet(Packet::PubAck(a)) => {
                acked.insert(index_of[&a.packet_id]);
            }
            Next::Packet(other) => panic!("unexpected {other:?}"),
            Next::Closed => break,
            Next::Timeout => panic!("publisher connection not closed by the kill"),
        }
    }
    assert!(!acked.is_empty());

    let srv = BinServer::start(&data, &dir.path().join("log-2")).await;
    let (mut sub, ack) = Raw::connect_ok(srv.mqtt, v5_persistent("k9-sub", false, 86_400)).await;
    assert!(
        ack.session_present,
        "the persistent session survived kill -9"
    );
    let mut got = BTreeSet::new();
    loop {
        match sub.next(Duration::from_millis(500)).await {
            Next::Packet(Packet::Publish(m)) => {
                let i: u16 = text(&m)
                    .strip_prefix('m')
                    .and_then(|s| s.parse().ok())
                    .expect("payload m<i>");
                got.insert(i);
                sub.puback(m.packet_id.expect("pid")).await;
            }
            Next::Packet(other) => panic!("unexpected {other:?}"),
            Next::Timeout => break,
            Next::Closed => panic!("subscriber connection closed"),
        }
    }
    eprintln!(
        "kill -9: {} of {n} acknowledged before the kill, {} delivered after the restart",
        acked.len(),
        got.len()
    );
    let missing: Vec<u16> = acked.difference(&got).copied().collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost after kill -9 (acked {}, delivered {}): {missing:?}",
        missing.len(),
        acked.len(),
        got.len()
    );
    assert!(got.len() >= acked.len());

    let (mut r, _) = Raw::connect_ok(srv.mqtt, v5("k9-retained")).await;
    r.subscribe(1, "k9/r/#", QoS::AtMostOnce).await;
    let mut retained_seen = BTreeSet::new();
    for _ in 0..5 {
        let m = r.recv_publish().await;
        assert!(m.retain);
        retained_seen.insert(text(&m));
    }
    assert_eq!(retained_seen.len(), 5);
    r.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_disconnects_v5_clients_with_0x8b_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = BinServer::start(&dir.path().join("data"), &dir.path().join("log")).await;
    let (mut c5, _) = Raw::connect_ok(srv.mqtt, v5("term-5")).await;
    let (mut c3, _) = Raw::connect_ok(srv.mqtt, v3("term-3")).await;
    c5.ping().await;
    srv.signal("-TERM");
    c5.expect_disconnect(reason::SERVER_SHUTTING_DOWN).await;
    assert!(c3.expect_close(WAIT).await.is_empty());
    let status = srv.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "clean exit after SIGTERM");
}
