//! Persistence across a graceful restart (in-process: shutdown, then start
//! again on the same data directory).

use crate::common::*;
use mqtt_codec::{Packet, PublishProperties, QoS, SubscriptionOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart() {
    let mut srv = TestServer::start().await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("keep-pub")).await;
    let mut a = retained("keep/a", QoS::AtLeastOnce, 1, "A");
    a.properties = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("u".into(), "1".into())],
        ..Default::default()
    }
    .into();
    p.publish(a).await;
    p.publish(retained("keep/b", QoS::AtMostOnce, 0, "B")).await;
    p.publish(retained("keep/c", QoS::AtLeastOnce, 2, "C"))
        .await;
    p.publish(retained("keep/c", QoS::AtLeastOnce, 3, "")).await;
    drop(p);
    srv.restart().await;

    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5("keep-sub")).await;
    s.subscribe(1, "keep/#", QoS::AtLeastOnce).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = s.recv_publish().await;
        assert!(m.retain);
        if let Some(id) = m.packet_id {
            s.puback(id).await;
        }
        got.push(m);
    }
    got.sort_by(|x, y| x.topic.cmp(&y.topic));
    assert_eq!(got[0].topic, "keep/a");
    assert_eq!(text(&got[0]), "A");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(
        got[0].properties.content_type.as_deref(),
        Some("text/plain")
    );
    assert_eq!(
        got[0].properties.user_properties,
        vec![("u".into(), "1".into())]
    );
    assert_eq!(
        (got[1].topic.as_str(), text(&got[1]).as_str()),
        ("keep/b", "B")
    );
    s.expect_nothing(QUIET).await;
    assert_eq!(
        srv.get().broker.gauges().retained,
        2,
        "the deleted one stays deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_and_queued_messages_survive_a_restart() {
    let mut srv = TestServer::start().await;
    let (mut s5, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("ps-v5", true, 3600)).await;
    s5.subscribe(1, "ps/#", QoS::AtLeastOnce).await;
    s5.disconnect().await;
    let (mut s3, _) = Raw::connect_ok(srv.mqtt(), v3_persistent("ps-v3")).await;
    s3.subscribe(1, "ps/#", QoS::AtLeastOnce).await;
    s3.disconnect().await;
    let (mut clean, _) = Raw::connect_ok(srv.mqtt(), v5("ps-clean")).await;
    clean.subscribe(1, "ps/#", QoS::AtLeastOnce).await;
    clean.disconnect().await;

    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("ps-pub")).await;
    for i in 0..5u16 {
        p.publish(publish("ps/t", QoS::AtLeastOnce, i + 1, format!("q{i}")))
            .await;
    }
    drop(p);
    srv.restart().await;

    let (mut s5, ack5) = Raw::connect_ok(srv.mqtt(), v5_persistent("ps-v5", false, 3600)).await;
    let (mut s3, ack3) = Raw::connect_ok(srv.mqtt(), v3_persistent("ps-v3")).await;
    assert!(
        ack5.session_present && ack3.session_present,
        "sessions restored"
    );
    for s in [&mut s5, &mut s3] {
        for i in 0..5 {
            let m = s.recv_publish().await;
            assert_eq!(text(&m), format!("q{i}"));
            s.puback(m.packet_id.expect("pid")).await;
        }
        s.expect_nothing(QUIET).await;
    }
    // The subscriptions were restored too.
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("ps-pub-2")).await;
    p.publish(publish("ps/live", QoS::AtLeastOnce, 1, "live"))
        .await;
    for s in [&mut s5, &mut s3] {
        let m = s.recv_publish().await;
        assert_eq!(text(&m), "live");
        s.puback(m.packet_id.expect("pid")).await;
        s.ping().await;
    }
    s5.disconnect().await;
    s3.disconnect().await;
    let (_c, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("ps-clean", false, 3600)).await;
    assert!(!ack.session_present, "a clean session is not restored");

    // Acknowledged messages are not delivered again after another restart.
    srv.restart().await;
    let (mut s, ack) = Raw::connect_ok(srv.mqtt(), v5_persistent("ps-v5", false, 3600)).await;
    assert!(ack.session_present);
    s.expect_nothing(QUIET).await;
}

/// Subscribe a persistent v5 session at QoS 1 (with a subscription
/// identifier), queue one message for it while offline, restart the
/// server, and return the message as delivered after the restart.
async fn queued_then_restarted(
    publish_qos: QoS,
    retain: bool,
    v5_client: bool,
) -> mqtt_codec::Publish {
    let mut srv = TestServer::start().await;
    let c = if v5_client {
        v5_persistent("qr-sub", true, 3600)
    } else {
        v3_persistent("qr-sub")
    };
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), c).await;
    let opts = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    s.subscribe_with(1, "qr/t", opts, v5_client.then_some(42))
        .await;
    s.disconnect().await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("qr-pub")).await;
    let mut m = publish("qr/t", publish_qos, 1, "m");
    m.retain = retain;
    p.publish(m).await;
    drop(p);
    srv.restart().await;
    let c = if v5_client {
        v5_persistent("qr-sub", false, 3600)
    } else {
        v3_persistent("qr-sub")
    };
    let (mut s, ack) = Raw::connect_ok(srv.mqtt(), c).await;
    assert!(ack.session_present);
    let m = s.recv_publish().await;
    srv.stop().await;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_keeps_the_granted_qos_across_a_restart() {
    let m = queued_then_restarted(QoS::ExactlyOnce, false, true).await;
    assert_eq!(
        m.qos,
        QoS::AtLeastOnce,
        "subscribed at QoS 1, published at QoS 2: must arrive at QoS 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_keeps_its_subscription_identifier_across_a_restart() {
    let m = queued_then_restarted(QoS::AtLeastOnce, false, true).await;
    assert_eq!(m.properties.subscription_identifiers, vec![42]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_has_retain_cleared_across_a_restart() {
    let m = queued_then_restarted(QoS::AtLeastOnce, true, false).await;
    assert!(
        !m.retain,
        "matched an established subscription: RETAIN must be 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_properties_without_restart_for_reference() {
    // The same flows without a restart: the broker gets them right, which
    // is what the ignored tests above compare against.
    let srv = TestServer::start().await;
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("ref-sub", true, 3600)).await;
    let opts = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    s.subscribe_with(1, "ref/t", opts, Some(42)).await;
    s.disconnect().await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("ref-pub")).await;
    p.publish(retained("ref/t", QoS::ExactlyOnce, 1, "m")).await;
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("ref-sub", false, 3600)).await;
    let m = s.recv_publish().await;
    assert_eq!(m.qos, QoS::AtLeastOnce);
    assert_eq!(m.properties.subscription_identifiers, vec![42]);
    assert!(!m.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_message_is_delivered_again_after_a_restart() {
    let mut srv = TestServer::start().await;
    let (mut s, _) = Raw::connect_ok(srv.mqtt(), v5_persistent("inflight-sub", true, 3600)).await;
    s.subscribe(1, "inf/t", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v5("inflight-pub")).await;
    p.publish(publish("inf/t", QoS::AtLeastOnce, 1, "unacked"))
        .await;
    p.publish(publish("inf/t", QoS::AtLeastOnce, 2, "acked"))
        .await;
    let a = s.recv_publish().await;
    let b = s.recv_publish().await;
    assert_eq!((text(&a).as_str(), text(&b).as_str()), ("unacked", "acked"));
    s.puback(b.packet_id.expect("pid")).await;
    s.ping().await;
    drop(p);
    // A graceful restart with the subscriber still connected.
    srv.restart().await;
    assert!(
        matches!(
            s.next(WAIT).await,
            Next::Packet(Packet::Disconnect(_)) | Next::Closed
        ),
        "the old connection is closed"
    );
    let (mut s, ack) =
        Raw::connect_ok(srv.mqtt(), v5_persistent("inflight-sub", false, 3600)).await;
    assert!(ack.session_present);
    let m = s.recv_publish().await;
    assert_eq!(text(&m), "unacked");
    s.puback(m.packet_id.expect("pid")).await;
    s.expect_nothing(QUIET).await;
}
