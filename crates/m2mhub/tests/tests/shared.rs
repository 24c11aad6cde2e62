//! Shared subscriptions (`$share/group/filter`).

use crate::common::*;
use mqtt_codec::{Packet, QoS};
use std::collections::BTreeSet;
use std::time::Duration;

/// Read PUBLISHes until `quiet` passes without one; ack them if `ack`.
async fn drain(c: &mut Raw, ack: bool, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        match c.next(quiet).await {
            Next::Packet(Packet::Publish(p)) => {
                if ack {
                    if let Some(id) = p.packet_id {
                        c.puback(id).await;
                    }
                }
                got.push(text(&p));
            }
            Next::Packet(other) => panic!("unexpected {other:?}"),
            Next::Timeout => return got,
            Next::Closed => panic!("connection closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_distributes_messages_across_members() {
    let srv = TestServer::start().await;
    let (mut a, _) = Raw::connect_ok(srv.mqtt(), v5("share-a")).await;
    let (mut b, _) = Raw::connect_ok(srv.mqtt(), v3("share-b")).await;
    a.subscribe(1, "$share/g/sh/t", QoS::AtLeastOnce).await;
    b.subscribe(1, "$share/g/sh/t", QoS::AtLeastOnce).await;
    // A normal subscriber still gets everything.
    let (mut normal, _) = Raw::connect_ok(srv.mqtt(), v5("share-normal")).await;
    normal.subscribe(1, "sh/#", QoS::AtMostOnce).await;

    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("share-pub")).await;
    let n = 20;
    for i in 0..n {
        p.publish(publish("sh/t", QoS::AtLeastOnce, i + 1, i.to_string()))
            .await;
    }
    let got_a = drain(&mut a, true, QUIET).await;
    let got_b = drain(&mut b, true, Duration::from_millis(50)).await;
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "a={got_a:?} b={got_b:?}"
    );
    assert_eq!(
        got_a.len() + got_b.len(),
        n as usize,
        "a={got_a:?} b={got_b:?}"
    );
    let all: BTreeSet<String> = got_a.iter().chain(&got_b).cloned().collect();
    assert_eq!(all.len(), n as usize, "no duplicates");
    // Round-robin: an even split.
    assert_eq!(got_a.len(), 10, "a={got_a:?} b={got_b:?}");
    assert_eq!(
        drain(&mut normal, false, Duration::from_millis(50))
            .await
            .len(),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_unacked_messages_go_to_another_member_on_disconnect() {
    let srv = TestServer::start().await;
    let (mut lazy, _) = Raw::connect_ok(srv.mqtt(), v5("share-lazy")).await;
    let (mut busy, _) = Raw::connect_ok(srv.mqtt(), v5("share-busy")).await;
    lazy.subscribe(1, "$share/grp/work", QoS::AtLeastOnce).await;
    busy.subscribe(1, "$share/grp/work", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("share-pub2")).await;
    let n = 10;
    for i in 0..n {
        p.publish(publish("work", QoS::AtLeastOnce, i + 1, i.to_string()))
            .await;
    }
    let unacked = drain(&mut lazy, false, QUIET).await;
    assert!(!unacked.is_empty(), "the lazy member got some");
    let mut done = drain(&mut busy, true, Duration::from_millis(50)).await;
    assert_eq!(unacked.len() + done.len(), n as usize);
    // The lazy member goes away without acknowledging.
    lazy.drop_abruptly().await;
    let mut more = Vec::new();
    while more.len() < unacked.len() {
        match busy.next(WAIT).await {
            Next::Packet(Packet::Publish(m)) => {
                busy.puback(m.packet_id.expect("pid")).await;
                more.push(text(&m));
            }
            other => panic!("expected the handed-over messages, got {other:?} after {more:?}"),
        }
    }
    let mut want = unacked.clone();
    want.sort();
    more.sort();
    assert_eq!(more, want, "exactly the unacknowledged messages move");
    done.extend(more);
    let all: BTreeSet<String> = done.into_iter().collect();
    assert_eq!(all.len(), n as usize);
    busy.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_with_no_local_is_a_protocol_error() {
    let srv = TestServer::start().await;
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("share-nl")).await;
    c.send(&Packet::Subscribe(mqtt_codec::Subscribe {
        packet_id: 1,
        properties: Default::default(),
        filters: vec![(
            "$share/g/nl".into(),
            mqtt_codec::SubscriptionOptions {
                qos: QoS::AtMostOnce,
                no_local: true,
                ..Default::default()
            },
        )],
    }))
    .await;
    c.expect_disconnect(mqtt_codec::reason::PROTOCOL_ERROR)
        .await;
}
