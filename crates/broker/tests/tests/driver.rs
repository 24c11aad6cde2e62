//! The connection task as a thin driver of the sans-IO protocol core
//! (`src/protocol/`): the core's decisions reach the socket. The protocol
//! flows themselves are tested in the core with a fake clock; these check
//! the wiring (resend on reconnect, takeover, keep alive, will delay).

use crate::common::{publish, v5, Raw, TestBroker};
use mqtt_codec::{reason, Connect, LastWill, Packet, PubResponse, Publish, QoS};
use std::time::Duration;

/// A v5 CONNECT for a session that outlives its connection.
fn persistent(client_id: &str, clean_start: bool, receive_maximum: Option<u16>) -> Connect {
    let mut c = v5(client_id);
    c.clean_start = clean_start;
    c.properties.session_expiry_interval = Some(60);
    c.properties.receive_maximum = receive_maximum;
    c
}

async fn recv_publish(c: &mut Raw) -> Publish {
    match c.recv().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn text(p: &Publish) -> &str {
    std::str::from_utf8(&p.payload).expect("utf-8")
}

/// Publish `payloads` at QoS 1 from a fresh client.
async fn publish_all(b: &TestBroker, topic: &str, payloads: &[&str]) {
    let mut p = Raw::connect(b.addr, v5("publisher")).await;
    for (i, m) in payloads.iter().enumerate() {
        let pid = i as u16 + 1;
        p.send(&publish(topic, QoS::AtLeastOnce, pid, m)).await;
        p.expect_puback(pid).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resends_unacknowledged_messages_with_dup_within_the_new_receive_maximum() {
    let b = TestBroker::start(|_| {}).await;
    let mut sub = Raw::connect(b.addr, persistent("resend", true, None)).await;
    sub.subscribe(1, "resend/t", QoS::AtLeastOnce).await;
    publish_all(&b, "resend/t", &["a", "b", "c"]).await;
    let first: Vec<Publish> = vec![
        recv_publish(&mut sub).await,
        recv_publish(&mut sub).await,
        recv_publish(&mut sub).await,
    ];
    assert!(first.iter().all(|p| !p.dup));
    drop(sub);

    // Whether or not the old connection has detached yet, the session is
    // resumed (or taken over) with everything still in flight.
    let mut sub = Raw::connect(b.addr, persistent("resend", false, Some(2))).await;
    let a = recv_publish(&mut sub).await;
    let b2 = recv_publish(&mut sub).await;
    assert_eq!((text(&a), text(&b2)), ("a", "b"));
    assert!(a.dup && b2.dup);
    assert_eq!(a.packet_id, first[0].packet_id);
    // The window of 2 is full: "c" waits for an acknowledgement.
    sub.expect_nothing().await;
    sub.send(&Packet::PubAck(PubResponse::new(
        a.packet_id.expect("pid"),
        0,
    )))
    .await;
    let c = recv_publish(&mut sub).await;
    assert_eq!(text(&c), "c");
    assert!(c.dup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_sends_0x8e_to_the_old_connection_and_resends_to_the_new_one() {
    let b = TestBroker::start(|_| {}).await;
    let mut first = Raw::connect(b.addr, persistent("taken", true, None)).await;
    first.subscribe(1, "taken/t", QoS::AtLeastOnce).await;
    publish_all(&b, "taken/t", &["x"]).await;
    let m = recv_publish(&mut first).await;
    let mut second = Raw::connect(b.addr, persistent("taken", false, None)).await;
    match first.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, reason::SESSION_TAKEN_OVER),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    let again = recv_publish(&mut second).await;
    assert!(again.dup);
    assert_eq!((again.packet_id, text(&again)), (m.packet_id, "x"));
    assert_eq!(b.counter("sessions_taken_over"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_gets_disconnect_0x8d_after_one_and_a_half_keep_alives() {
    let b = TestBroker::start(|_| {}).await;
    let mut c = v5("silent");
    c.keep_alive = 1;
    let mut c = Raw::connect(b.addr, c).await;
    let started = tokio::time::Instant::now();
    match c.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, reason::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(1400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_waits_for_its_delay_and_a_reconnect_cancels_it() {
    let b = TestBroker::start(|_| {}).await;
    let mut watcher = Raw::connect(b.addr, v5("watcher")).await;
    watcher.subscribe(1, "wills/#", QoS::AtMostOnce).await;
    let with_will = |id: &str, clean_start| {
        let mut c = persistent(id, clean_start, None);
        let mut will = LastWill {
            topic: format!("wills/{id}"),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        };
        will.properties.will_delay_interval = Some(1);
        c.will = Some(will);
        c
    };
    // Dropped and back within the delay: no will.
    drop(Raw::connect(b.addr, with_will("back", true)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _back = Raw::connect(b.addr, with_will("back", false)).await;
    // Dropped for good: the will comes after its delay, not at once.
    drop(Raw::connect(b.addr, with_will("gone", true)).await);
    watcher.expect_nothing().await;
    match watcher.recv().await {
        Packet::Publish(p) => assert_eq!(p.topic, "wills/gone"),
        other => panic!("expected the will, got {other:?}"),
    }
    watcher.expect_nothing().await;
}

/// Send `qos2` QoS 2 PUBLISHes (never released) and 128 KiB more in one
/// write, then keep writing about 2 MiB more, as a client that does not look at what comes
/// back would. Every write must succeed: the broker keeps reading after it
/// closed its side, so the client is not reset mid-write.
async fn overrun(c: &mut Raw, qos2: u16) {
    let filler = "f".repeat(16 * 1024);
    // The burst and more behind it in one write.
    let mut burst = Vec::new();
    for pid in 1..=qos2 {
        burst.push(publish("burst/t", QoS::ExactlyOnce, pid, "x"));
    }
    for _ in 0..8 {
        burst.push(publish("burst/t", QoS::AtMostOnce, 0, &filler));
    }
    c.send_all(&burst).await;
    let mut bytes = bytes::BytesMut::new();
    mqtt_codec::encode(
        &publish("burst/t", QoS::AtMostOnce, 0, &filler),
        c.protocol,
        &mut bytes,
    )
    .expect("encode");
    for i in 0..128 {
        if let Err(e) = c.try_write(&bytes).await {
            panic!("write {i} after the burst failed: {e} (the broker reset the connection)");
        }
    }
}

/// A QoS 2 burst past our Receive Maximum, the client still writing behind
/// it: the client reads the PUBRECs, DISCONNECT 0x93 and then an orderly
/// end of stream, never a reset (which can throw away the DISCONNECT before
/// the client reads it, and fails the client's writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_exceeded_sends_0x93_and_closes_without_a_reset() {
    const RECEIVE_MAXIMUM: u16 = 4;
    let b = TestBroker::start(|c| c.receive_maximum = RECEIVE_MAXIMUM).await;
    let mut c = Raw::connect(b.addr, v5("greedy")).await;
    overrun(&mut c, RECEIVE_MAXIMUM + 1).await;
    let (seen, end) = c.read_until_closed().await;
    let pubrecs: Vec<u16> = seen
        .iter()
        .filter_map(|p| match p {
            Packet::PubRec(r) => Some(r.packet_id),
            _ => None,
        })
        .collect();
    assert_eq!(pubrecs, (1..=RECEIVE_MAXIMUM).collect::<Vec<_>>());
    match seen.last() {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, reason::RECEIVE_MAXIMUM_EXCEEDED)
        }
        other => panic!("expected DISCONNECT 0x93 last, got {other:?} in {seen:?}"),
    }
    if let Err(e) = end {
        panic!("the connection ended with {e} instead of an orderly close");
    }
}

/// The same for MQTT 3.1.1, which has no server DISCONNECT: the client gets
/// the acknowledgements of what was accepted, then an orderly end of stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_receive_maximum_exceeded_closes_without_a_reset() {
    let b = TestBroker::start(|c| c.receive_maximum = 2).await;
    let mut c = Raw::connect(b.addr, crate::common::v3("greedy3")).await;
    overrun(&mut c, 3).await;
    let (seen, end) = c.read_until_closed().await;
    let pubrecs: Vec<u16> = seen
        .iter()
        .filter_map(|p| match p {
            Packet::PubRec(r) => Some(r.packet_id),
            _ => None,
        })
        .collect();
    assert_eq!(pubrecs, [1, 2], "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    if let Err(e) = end {
        panic!("the connection ended with {e} instead of an orderly close");
    }
}
