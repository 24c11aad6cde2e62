//! Refusals by configuration: `refused_subscriptions` (SUBACK 0x80 under
//! both protocol versions) and the connect-flapping ban, which a client
//! that ends its connections with DISCONNECT does not trip.

use crate::common::{publish, v3, v5, Raw, TestBroker};
use mqtt_codec::{
    reason, Connect, Packet, Protocol, QoS, Subscribe, SubscribeProperties, SubscriptionOptions,
};

/// One SUBSCRIBE with several filters; returns the SUBACK's codes.
async fn subscribe_codes(c: &mut Raw, pid: u16, filters: &[&str]) -> Vec<u8> {
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: pid,
        properties: SubscribeProperties::default(),
        filters: filters
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                )
            })
            .collect(),
    }))
    .await;
    match c.recv().await {
        Packet::SubAck(a) if a.packet_id == pid => a.reason_codes,
        other => panic!("expected SUBACK {pid}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscriptions_are_answered_0x80_under_both_versions() {
    let b = TestBroker::start(|c| {
        c.refused_subscriptions = vec!["test/nosubscribe".into(), "retired/#".into()];
    })
    .await;
    let filters = [
        "test/nosubscribe",
        "test/other",
        "retired/x/+",
        "retired",
        "#",
    ];
    let mut five = Raw::connect(b.addr, v5("five")).await;
    let mut three = Raw::connect(b.addr, v3("three")).await;
    let expected = [0x80, 1, 0x80, 0x80, 1];
    assert_eq!(subscribe_codes(&mut five, 1, &filters).await, expected);
    assert_eq!(subscribe_codes(&mut three, 1, &filters).await, expected);
    assert_eq!(b.counter("subscriptions_refused"), 6);
    // The refused filters were not registered; the wide one was, and is
    // not access control: it still gets the topic.
    let mut p = Raw::connect(b.addr, v5("publisher")).await;
    p.send(&publish("test/nosubscribe", QoS::AtLeastOnce, 1, "m"))
        .await;
    assert_eq!(p.expect_puback(1).await, reason::SUCCESS);
    for c in [&mut five, &mut three] {
        match c.recv().await {
            Packet::Publish(m) => {
                assert_eq!(m.topic, "test/nosubscribe");
                assert!(m.properties.subscription_identifiers.is_empty());
            }
            other => panic!("expected the message through `#`, got {other:?}"),
        }
    }
}

/// CONNECT and return the CONNACK's reason code (the connection is kept
/// only if it succeeded).
async fn try_connect(addr: std::net::SocketAddr, c: Connect) -> (Raw, u8) {
    let mut raw = Raw::tcp(addr, c.protocol).await;
    raw.send(&Packet::Connect(Box::new(c))).await;
    match raw.recv().await {
        Packet::ConnAck(a) => (raw, a.reason_code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_disconnects_do_not_count_as_connect_flapping() {
    let b = TestBroker::start(|c| {
        c.max_connect_rate_per_ip = 0;
        c.max_connects_per_client_id = 3;
    })
    .await;
    for protocol in [Protocol::V5, Protocol::V311] {
        let id = format!("polite-{protocol:?}");
        let connect = || match protocol {
            Protocol::V5 => v5(&id),
            _ => v3(&id),
        };
        // Ten times the limit, each ended with DISCONNECT: never banned.
        for i in 0..30 {
            let (mut c, code) = try_connect(b.addr, connect()).await;
            assert_eq!(code, 0, "clean reconnect {i} refused");
            c.send(&Packet::Disconnect(Box::default())).await;
            let (_, end) = c.read_until_closed().await;
            end.expect("orderly close after DISCONNECT");
        }
        // Dropped connections count: the fourth within the window is banned.
        let mut kept = Vec::new();
        for i in 0..3 {
            let (c, code) = try_connect(b.addr, connect()).await;
            assert_eq!(code, 0, "reconnect {i} refused");
            kept.push(c);
        }
        let (_, code) = try_connect(b.addr, connect()).await;
        // MQTT 3.1.1 says "not authorized" (return code 5, read as 0x87).
        let banned = match protocol {
            Protocol::V5 => reason::BANNED,
            _ => reason::NOT_AUTHORIZED,
        };
        assert_eq!(code, banned, "{protocol:?}: flapping not caught");
    }
}
