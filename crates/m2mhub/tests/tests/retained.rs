//! Retained messages: set, replace, delete; MQTT 5 retain handling and
//! retain-as-published.

use crate::common::*;
use mqtt_codec::{Packet, QoS, RetainHandling, SubscriptionOptions};
use rumqttc::QoS as RQoS;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_retained_message_set_replace_and_delete() {
    let srv = TestServer::start().await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("ret-pub")).await;
    p.publish(retained("ret/a", QoS::AtLeastOnce, 1, "one"))
        .await;

    let (mut s1, _) = Raw::connect_ok(srv.mqtt(), v3("ret-s1")).await;
    s1.subscribe(1, "ret/#", QoS::AtLeastOnce).await;
    let m = s1.recv_publish().await;
    assert_eq!((m.topic.as_str(), text(&m).as_str()), ("ret/a", "one"));
    assert!(m.retain, "sent because it is retained: RETAIN set");
    s1.puback(m.packet_id.expect("pid")).await;

    // Replace: live subscribers get it as a normal message (RETAIN 0 in 3.1.1).
    p.publish(retained("ret/a", QoS::AtLeastOnce, 2, "two"))
        .await;
    let m = s1.recv_publish().await;
    assert_eq!(text(&m), "two");
    assert!(
        !m.retain,
        "forwarded to an existing subscription: RETAIN clear"
    );
    s1.puback(m.packet_id.expect("pid")).await;

    let (mut s2, _) = Raw::connect_ok(srv.mqtt(), v3("ret-s2")).await;
    s2.subscribe(1, "ret/+", QoS::AtLeastOnce).await;
    let m = s2.recv_publish().await;
    assert_eq!(text(&m), "two", "only the latest retained message");
    assert!(m.retain);
    s2.puback(m.packet_id.expect("pid")).await;
    s2.expect_nothing(QUIET).await;
    assert_eq!(srv.get().broker.gauges().retained, 1);

    // Delete with an empty payload; it is still delivered to live subscribers.
    p.publish(retained("ret/a", QoS::AtLeastOnce, 3, "")).await;
    let m = s1.recv_publish().await;
    assert!(m.payload.is_empty());
    let (mut s3, _) = Raw::connect_ok(srv.mqtt(), v3("ret-s3")).await;
    s3.subscribe(1, "ret/#", QoS::AtLeastOnce).await;
    s3.expect_nothing(QUIET).await;
    assert_eq!(srv.get().broker.gauges().retained, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_retained_message_via_rumqttc() {
    let srv = TestServer::start().await;
    let (mut p, _) = V3::connect(V3::options(srv.mqtt(), "ret-r-pub")).await;
    p.client
        .publish("retr/x", RQoS::AtLeastOnce, true, "kept")
        .await
        .expect("publish");
    p.wait("PUBACK", |x| {
        matches!(x, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    let (mut s, _) = V3::connect(V3::options(srv.mqtt(), "ret-r-sub")).await;
    s.subscribe("retr/#", RQoS::AtMostOnce).await;
    let m = s.recv_publish().await;
    assert_eq!(m.topic, "retr/x");
    assert!(m.retain);
    assert_eq!(
        m.qos,
        RQoS::AtMostOnce,
        "downgraded to the subscription QoS"
    );
    assert_eq!(&m.payload[..], b"kept");
}

fn opts(rh: RetainHandling, rap: bool) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: QoS::AtMostOnce,
        no_local: false,
        retain_as_published: rap,
        retain_handling: rh,
    }
}

/// After a SUBACK, check whether a retained message followed it: the
/// broker queues retained messages right behind the SUBACK, so after a ping
/// round trip they have arrived.
async fn retained_after_subscribe(c: &mut Raw) -> Vec<String> {
    c.ping().await;
    let mut got = Vec::new();
    while let Next::Packet(p) = c.next(Duration::from_millis(50)).await {
        match p {
            Packet::Publish(p) => {
                assert!(p.retain, "{p:?}");
                got.push(text(&p));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_handling_0_1_2() {
    let srv = TestServer::start().await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("rh-pub")).await;
    p.publish(retained("rh/t", QoS::AtLeastOnce, 1, "r")).await;
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("rh-sub")).await;

    c.subscribe_with(
        1,
        "rh/t",
        opts(RetainHandling::SendAtSubscribe, false),
        None,
    )
    .await;
    assert_eq!(retained_after_subscribe(&mut c).await, ["r"], "RH 0, new");
    c.subscribe_with(
        2,
        "rh/t",
        opts(RetainHandling::SendAtSubscribe, false),
        None,
    )
    .await;
    assert_eq!(
        retained_after_subscribe(&mut c).await,
        ["r"],
        "RH 0, existing"
    );
    c.subscribe_with(3, "rh/+", opts(RetainHandling::SendIfNew, false), None)
        .await;
    assert_eq!(retained_after_subscribe(&mut c).await, ["r"], "RH 1, new");
    c.subscribe_with(4, "rh/+", opts(RetainHandling::SendIfNew, false), None)
        .await;
    assert!(
        retained_after_subscribe(&mut c).await.is_empty(),
        "RH 1, existing subscription: nothing"
    );
    c.subscribe_with(5, "rh/#", opts(RetainHandling::DoNotSend, false), None)
        .await;
    assert!(
        retained_after_subscribe(&mut c).await.is_empty(),
        "RH 2: nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_as_published() {
    let srv = TestServer::start().await;
    let (mut keep, _) = Raw::connect_ok(srv.mqtt(), v5("rap-keep")).await;
    keep.subscribe_with(
        1,
        "rap/t",
        opts(RetainHandling::SendAtSubscribe, true),
        None,
    )
    .await;
    let (mut clear, _) = Raw::connect_ok(srv.mqtt(), v5("rap-clear")).await;
    clear
        .subscribe_with(
            1,
            "rap/t",
            opts(RetainHandling::SendAtSubscribe, false),
            None,
        )
        .await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("rap-pub")).await;
    p.publish(retained("rap/t", QoS::AtMostOnce, 0, "live"))
        .await;
    p.publish(publish("rap/t", QoS::AtMostOnce, 0, "plain"))
        .await;

    let m = keep.recv_publish().await;
    assert!(m.retain, "retain as published: RETAIN kept");
    assert!(!keep.recv_publish().await.retain);
    let m = clear.recv_publish().await;
    assert!(!m.retain, "not retain as published: RETAIN cleared");
    assert!(!clear.recv_publish().await.retain);

    // Messages sent because of a new subscription always carry RETAIN.
    let (mut late, _) = Raw::connect_ok(srv.mqtt(), v5("rap-late")).await;
    late.subscribe_with(
        1,
        "rap/t",
        opts(RetainHandling::SendAtSubscribe, false),
        None,
    )
    .await;
    let m = late.recv_publish().await;
    assert_eq!(text(&m), "live");
    assert!(m.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retained_message_expires() {
    let srv = TestServer::start().await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("rexp-pub")).await;
    let mut m = retained("rexp/short", QoS::AtLeastOnce, 1, "short");
    m.properties.message_expiry_interval = Some(1);
    p.publish(m).await;
    let mut m = retained("rexp/long", QoS::AtLeastOnce, 2, "long");
    m.properties.message_expiry_interval = Some(100);
    p.publish(m).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5("rexp-sub")).await;
    s.subscribe(1, "rexp/#", QoS::AtMostOnce).await;
    let m = s.recv_publish().await;
    assert_eq!(m.topic, "rexp/long");
    let left = m.properties.message_expiry_interval.expect("expiry");
    assert!((98..=99).contains(&left), "remaining {left}");
    s.expect_nothing(QUIET).await;
}
