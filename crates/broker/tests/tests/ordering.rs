//! Subscription changes and routing order across connections: an
//! UNSUBSCRIBE (or a SUBSCRIBE with No Local) takes effect before anything
//! published after it was read is routed.
//!
//! No sleeps: the order is made by the protocol itself. The subscriber sends
//! its subscription change and, in the same write, a QoS 0 PUBLISH on a
//! "sync" topic the other client listens to. The broker handles a
//! connection's packets in order, so once the other client has the sync
//! message, the change was read; whatever that client publishes next must
//! be routed under it. The subscriber then reads until a marker on a topic
//! it still holds, which arrives after everything routed before it.

use crate::common::{publish, v3, v5, Raw, TestBroker};
use bytes::Bytes;
use mqtt_codec::{
    reason, Connect, Packet, Protocol, PubResponse, QoS, Subscribe, SubscribeProperties,
    SubscriptionOptions, Unsubscribe,
};

fn subscribe(pid: u16, filters: &[&str], qos: QoS, no_local: bool) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid,
        properties: SubscribeProperties::default(),
        filters: filters
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    SubscriptionOptions {
                        qos,
                        no_local,
                        ..Default::default()
                    },
                )
            })
            .collect(),
    })
}

fn unsubscribe(pid: u16, filter: &str) -> Packet {
    Packet::Unsubscribe(Unsubscribe {
        packet_id: pid,
        user_properties: Vec::new(),
        filters: vec![filter.to_string()],
    })
}

fn connect(protocol: Protocol, id: &str) -> Connect {
    match protocol {
        Protocol::V5 => v5(id),
        _ => v3(id),
    }
}

/// A broker without the connection-rate and flapping limits, which a test
/// that connects many times from one address would trip.
async fn broker() -> TestBroker {
    TestBroker::start(|c| {
        c.max_connect_rate_per_ip = 0;
        c.max_connects_per_client_id = 0;
    })
    .await
}

/// Wait for the sync PUBLISH carrying `payload` (other packets are not
/// expected on the listener's connection).
async fn await_sync(listener: &mut Raw, payload: &str) {
    match listener.recv().await {
        Packet::Publish(p) if p.payload == payload.as_bytes() => {}
        other => panic!("expected the sync message {payload:?}, got {other:?}"),
    }
}

/// Read (and acknowledge) until the PUBLISH whose payload is `marker`;
/// returns every packet seen, the marker included.
async fn read_until_marker(c: &mut Raw, marker: &str) -> Vec<Packet> {
    let mut seen = Vec::new();
    loop {
        let p = c.recv().await;
        let done = matches!(&p, Packet::Publish(m) if m.payload == marker.as_bytes());
        if let Packet::Publish(m) = &p {
            if let Some(id) = m.packet_id {
                c.send(&Packet::PubAck(PubResponse::new(id, 0))).await;
            }
        }
        seen.push(p);
        if done {
            return seen;
        }
    }
}

/// `(topic, payload)` of every PUBLISH among `packets`.
fn publishes(packets: &[Packet]) -> Vec<(String, String)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(m) => Some((
                m.topic.clone(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

fn position(packets: &[Packet], f: impl Fn(&Packet) -> bool) -> usize {
    packets
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("missing packet in {packets:?}"))
}

/// The scenario, made deterministic: subscribed to three topics,
/// the client leaves one without waiting for UNSUBACK; the other client
/// publishes to all three after the UNSUBSCRIBE was read. Several rounds on
/// live connections, for both protocol versions.
async fn unsubscribe_then_publish(protocol: Protocol) {
    let b = broker().await;
    let mut other = Raw::connect(b.addr, v5("other")).await;
    other.subscribe(1, "sync/#", QoS::AtMostOnce).await;
    let mut sub = Raw::connect(b.addr, connect(protocol, "leaver")).await;
    for round in 0..10u16 {
        let t: Vec<String> = (0..3).map(|i| format!("ord/{round}/{i}")).collect();
        let pid = 10 * round + 1;
        let filters: Vec<&str> = t.iter().map(String::as_str).collect();
        sub.send(&subscribe(pid, &filters, QoS::AtLeastOnce, false))
            .await;
        match sub.recv().await {
            Packet::SubAck(a) if a.packet_id == pid => assert_eq!(a.reason_codes, [1, 1, 1]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
        let sync = format!("left {round}");
        sub.send_all(&[
            unsubscribe(pid + 1, &t[0]),
            publish("sync/leaver", QoS::AtMostOnce, 0, &sync),
        ])
        .await;
        await_sync(&mut other, &sync).await;
        for (i, topic) in t.iter().enumerate() {
            let id = pid + i as u16;
            other
                .send(&publish(topic, QoS::AtLeastOnce, id, &i.to_string()))
                .await;
            let code = other.expect_puback(id).await;
            // The PUBACK says it too: nobody holds topic 0 any more.
            let expected = if i == 0 {
                reason::NO_MATCHING_SUBSCRIBERS
            } else {
                reason::SUCCESS
            };
            assert_eq!(code, expected, "round {round}, {topic}");
        }
        other
            .send(&publish(&t[2], QoS::AtLeastOnce, pid + 9, "end"))
            .await;
        other.expect_puback(pid + 9).await;
        let seen = read_until_marker(&mut sub, "end").await;
        assert_eq!(
            publishes(&seen),
            [
                (t[1].clone(), "1".to_string()),
                (t[2].clone(), "2".to_string()),
                (t[2].clone(), "end".to_string())
            ],
            "round {round}: {seen:?}"
        );
        let unsuback = position(&seen, |p| matches!(p, Packet::UnsubAck(_)));
        assert_eq!(unsuback, 0, "UNSUBACK comes first: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_unsubscribe_applies_to_everything_published_after_it_was_read() {
    unsubscribe_then_publish(Protocol::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_unsubscribe_applies_to_everything_published_after_it_was_read() {
    unsubscribe_then_publish(Protocol::V311).await;
}

/// CONNECT, SUBSCRIBE, UNSUBSCRIBE and a PUBLISH in one write: the packets
/// behind the CONNECT are handled at once, not when the client next sends
/// something (it may never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_pipelined_behind_connect_are_handled_before_later_publishes() {
    let b = broker().await;
    let mut other = Raw::connect(b.addr, v5("other")).await;
    other.subscribe(1, "sync/#", QoS::AtMostOnce).await;
    let mut sub = Raw::tcp(b.addr, Protocol::V5).await;
    sub.send_all(&[
        Packet::Connect(Box::new(v5("eager"))),
        subscribe(1, &["pipe/0", "pipe/1"], QoS::AtLeastOnce, false),
        unsubscribe(2, "pipe/0"),
        publish("sync/eager", QoS::AtMostOnce, 0, "ready"),
    ])
    .await;
    await_sync(&mut other, "ready").await;
    other
        .send(&publish("pipe/0", QoS::AtLeastOnce, 2, "left"))
        .await;
    assert_eq!(
        other.expect_puback(2).await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
    other
        .send(&publish("pipe/1", QoS::AtLeastOnce, 3, "end"))
        .await;
    assert_eq!(other.expect_puback(3).await, reason::SUCCESS);
    let seen = read_until_marker(&mut sub, "end").await;
    assert!(matches!(seen[0], Packet::ConnAck(_)), "{seen:?}");
    assert!(matches!(seen[1], Packet::SubAck(_)), "{seen:?}");
    assert!(matches!(seen[2], Packet::UnsubAck(_)), "{seen:?}");
    assert_eq!(
        publishes(&seen),
        [("pipe/1".to_string(), "end".to_string())]
    );
}

/// A SUBSCRIBE that sets No Local on a filter the client already holds,
/// followed in the same write by the client's own PUBLISH on it: the new
/// options apply to that PUBLISH. The other client's message still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_set_by_a_subscribe_applies_to_the_next_own_publish() {
    let b = broker().await;
    let mut other = Raw::connect(b.addr, v5("other")).await;
    other.subscribe(1, "nl/#", QoS::AtMostOnce).await;
    let mut me = Raw::connect(b.addr, v5("me")).await;
    for round in 0..10u16 {
        let topic = format!("nl/{round}");
        let pid = 10 * round + 1;
        // First without No Local: the client gets its own message back.
        me.send(&subscribe(pid, &[&topic], QoS::AtLeastOnce, false))
            .await;
        assert!(matches!(me.recv().await, Packet::SubAck(_)));
        let own = format!("own {round}");
        let no_local = format!("own again {round}");
        me.send_all(&[
            publish(&topic, QoS::AtMostOnce, 0, &own),
            subscribe(pid + 1, &[&topic], QoS::AtLeastOnce, true),
            publish(&topic, QoS::AtMostOnce, 0, &no_local),
        ])
        .await;
        // The other client got both: both were read and routed.
        await_sync(&mut other, &own).await;
        await_sync(&mut other, &no_local).await;
        other
            .send(&Packet::Publish(mqtt_codec::Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: Some(pid),
                properties: Default::default(),
                payload: Bytes::from("end"),
            }))
            .await;
        other.expect_puback(pid).await;
        await_sync(&mut other, "end").await;
        let seen = read_until_marker(&mut me, "end").await;
        assert_eq!(
            publishes(&seen),
            [
                (topic.clone(), own.clone()),
                (topic.clone(), "end".to_string())
            ],
            "round {round}: {seen:?}"
        );
    }
}

/// MQTT 5 §3.10.4 leaves open whether messages already buffered for the
/// client are still delivered after an UNSUBSCRIBE; m2mhub drops the ones
/// not yet sent (here waiting behind a full Receive Maximum) and completes
/// the one in flight, so after UNSUBACK nothing new arrives on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_drops_messages_queued_for_the_topic_and_completes_the_one_in_flight() {
    let b = broker().await;
    let mut other = Raw::connect(b.addr, v5("other")).await;
    other.subscribe(1, "sync/#", QoS::AtMostOnce).await;
    let mut c = v5("slow");
    c.properties.receive_maximum = Some(1);
    let mut sub = Raw::connect(b.addr, c).await;
    sub.send(&subscribe(1, &["buf/0", "buf/1"], QoS::AtLeastOnce, false))
        .await;
    assert!(matches!(sub.recv().await, Packet::SubAck(_)));
    for (pid, m) in [(1, "a"), (2, "b"), (3, "c")] {
        other
            .send(&publish("buf/0", QoS::AtLeastOnce, pid, m))
            .await;
        assert_eq!(other.expect_puback(pid).await, reason::SUCCESS);
    }
    // "a" is in flight (window of one); "b" and "c" wait in the session.
    let a = match sub.recv().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    assert_eq!(a.payload, "a".as_bytes());
    sub.send_all(&[
        unsubscribe(2, "buf/0"),
        publish("sync/slow", QoS::AtMostOnce, 0, "left"),
        Packet::PubAck(PubResponse::new(a.packet_id.expect("pid"), 0)),
    ])
    .await;
    await_sync(&mut other, "left").await;
    other
        .send(&publish("buf/0", QoS::AtLeastOnce, 4, "d"))
        .await;
    assert_eq!(
        other.expect_puback(4).await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
    other
        .send(&publish("buf/1", QoS::AtLeastOnce, 5, "end"))
        .await;
    other.expect_puback(5).await;
    let seen = read_until_marker(&mut sub, "end").await;
    assert!(matches!(seen[0], Packet::UnsubAck(_)), "{seen:?}");
    assert_eq!(publishes(&seen), [("buf/1".to_string(), "end".to_string())]);
    assert_eq!(b.counter("messages_dropped_unsubscribed"), 2);
}

/// A subscriber under a continuous stream of QoS 0 messages (its queue
/// full of them) leaves the topic: its UNSUBSCRIBE is read and answered
/// while the stream goes on, its queue is dropped with the subscription,
/// and the stream stops right after the UNSUBACK (at most the few messages
/// whose routing was under way when the subscription went).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_subscriber_stream_stops_at_the_unsuback() {
    let b = broker().await;
    let mut sub = Raw::connect(b.addr, v5("flooded")).await;
    sub.subscribe(1, "flood/#", QoS::AtMostOnce).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let addr = b.addr;
        tokio::spawn(async move {
            let mut p = Raw::connect(addr, v5("flooder")).await;
            let mut burst = Vec::new();
            for i in 0..200 {
                burst.push(publish("flood/x", QoS::AtMostOnce, 0, &format!("m{i}")));
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                p.send_all(&burst).await;
            }
        })
    };
    // The stream is flowing.
    for _ in 0..100 {
        assert!(matches!(sub.recv().await, Packet::Publish(_)));
    }
    sub.send(&unsubscribe(2, "flood/#")).await;
    let mut after = 0u64;
    loop {
        match sub.recv().await {
            Packet::UnsubAck(a) => {
                assert_eq!(a.packet_id, 2);
                break;
            }
            Packet::Publish(_) => after += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Still flooding. What was queued for the client was dropped with the
    // subscription; a message the publisher's task had already matched when
    // the subscription went (routing in flight, which MQTT 5 §3.10.4 lets the
    // server finish) may still slip through, but the stream stops: within
    // two PINGREQ round trips, and a third sees nothing but its PINGRESP.
    let mut stragglers = 0u64;
    for _ in 0..2 {
        sub.send(&Packet::PingReq).await;
        loop {
            match sub.recv().await {
                Packet::PingResp => break,
                Packet::Publish(_) => stragglers += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // Before the queue was dropped with the subscription, thousands came.
    assert!(stragglers <= 16, "{stragglers} messages after the UNSUBACK");
    sub.send(&Packet::PingReq).await;
    match sub.recv().await {
        Packet::PingResp => {}
        other => panic!("the stream did not stop after the UNSUBACK: {other:?}"),
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flooder.await.expect("flooder");
    println!("{after} messages after the UNSUBSCRIBE was sent, {stragglers} in flight after the UNSUBACK");
}

/// Queued messages another subscription of the session still matches are
/// kept when one filter is left: only what nobody in the session wants goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_keeps_queued_messages_another_subscription_wants() {
    let b = broker().await;
    let mut other = Raw::connect(b.addr, v5("other")).await;
    let mut c = v5("overlap");
    c.properties.receive_maximum = Some(1);
    let mut sub = Raw::connect(b.addr, c).await;
    sub.send(&subscribe(1, &["ov/a", "ov/#"], QoS::AtLeastOnce, false))
        .await;
    assert!(matches!(sub.recv().await, Packet::SubAck(_)));
    for (pid, m) in [(1, "a"), (2, "b"), (3, "c")] {
        other.send(&publish("ov/a", QoS::AtLeastOnce, pid, m)).await;
        assert_eq!(other.expect_puback(pid).await, reason::SUCCESS);
    }
    let a = match sub.recv().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    sub.send_all(&[
        unsubscribe(2, "ov/a"),
        Packet::PubAck(PubResponse::new(a.packet_id.expect("pid"), 0)),
    ])
    .await;
    other
        .send(&publish("ov/z", QoS::AtLeastOnce, 4, "end"))
        .await;
    other.expect_puback(4).await;
    let seen = read_until_marker(&mut sub, "end").await;
    assert!(matches!(seen[0], Packet::UnsubAck(_)), "{seen:?}");
    assert_eq!(
        publishes(&seen),
        [
            ("ov/a".to_string(), "b".to_string()),
            ("ov/a".to_string(), "c".to_string()),
            ("ov/z".to_string(), "end".to_string())
        ]
    );
    assert_eq!(b.counter("messages_dropped_unsubscribed"), 0);
}

/// A publisher that keeps publishing on one topic has its route cached
/// (see `route_cache.rs`): an UNSUBSCRIBE, a new SUBSCRIBE and a switch to
/// No Local must each reach the very next message on that topic all the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishers_cached_route_follows_every_subscription_change() {
    let b = broker().await;
    let mut other = Raw::connect(b.addr, v5("other")).await;
    other.subscribe(1, "sync/#", QoS::AtMostOnce).await;
    let mut sub = Raw::connect(b.addr, v5("changer")).await;
    sub.subscribe(1, "warm/t", QoS::AtLeastOnce).await;
    sub.subscribe(2, "mark", QoS::AtLeastOnce).await;
    // Warm the route: the same topic, again and again.
    for i in 0..5u16 {
        other
            .send(&publish("warm/t", QoS::AtLeastOnce, 100 + i, "warm"))
            .await;
        assert_eq!(other.expect_puback(100 + i).await, reason::SUCCESS);
    }
    other
        .send(&publish("mark", QoS::AtLeastOnce, 110, "m0"))
        .await;
    other.expect_puback(110).await;
    assert_eq!(
        publishes(&read_until_marker(&mut sub, "m0").await).len(),
        6,
        "five warm-up messages and the marker"
    );

    // Gone: the next message on the warm topic reaches nobody.
    sub.send_all(&[
        unsubscribe(3, "warm/t"),
        publish("sync/changer", QoS::AtMostOnce, 0, "left"),
    ])
    .await;
    await_sync(&mut other, "left").await;
    other
        .send(&publish("warm/t", QoS::AtLeastOnce, 120, "after-leave"))
        .await;
    assert_eq!(
        other.expect_puback(120).await,
        reason::NO_MATCHING_SUBSCRIBERS
    );

    // Back: the next one reaches it again.
    sub.send_all(&[
        subscribe(4, &["warm/+"], QoS::AtLeastOnce, false),
        publish("sync/changer", QoS::AtMostOnce, 0, "back"),
    ])
    .await;
    await_sync(&mut other, "back").await;
    other
        .send(&publish("warm/t", QoS::AtLeastOnce, 121, "after-return"))
        .await;
    assert_eq!(other.expect_puback(121).await, reason::SUCCESS);
    other
        .send(&publish("mark", QoS::AtLeastOnce, 122, "m1"))
        .await;
    other.expect_puback(122).await;
    let seen = read_until_marker(&mut sub, "m1").await;
    assert_eq!(
        publishes(&seen),
        [
            ("warm/t".to_string(), "after-return".to_string()),
            ("mark".to_string(), "m1".to_string())
        ],
        "{seen:?}"
    );

    // Its own messages on a warm route, then No Local on the same filter.
    for _ in 0..3 {
        sub.send(&publish("warm/t", QoS::AtMostOnce, 0, "own"))
            .await;
    }
    sub.send(&publish("mark", QoS::AtMostOnce, 0, "m2")).await;
    let own = publishes(&read_until_marker(&mut sub, "m2").await);
    assert_eq!(own.iter().filter(|(_, p)| p == "own").count(), 3, "{own:?}");
    sub.send_all(&[
        subscribe(5, &["warm/+"], QoS::AtLeastOnce, true),
        publish("warm/t", QoS::AtMostOnce, 0, "own-after-no-local"),
        publish("mark", QoS::AtMostOnce, 0, "m3"),
    ])
    .await;
    let seen = read_until_marker(&mut sub, "m3").await;
    assert!(
        !publishes(&seen)
            .iter()
            .any(|(_, p)| p == "own-after-no-local"),
        "No Local applies to the next message on a warm route: {seen:?}"
    );
}

/// The platform's own subscriptions (ingest, the rule engine's observer)
/// are part of a cached route too: one that starts, or an observer whose
/// filters change, gets the very next message on a warm topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_route_reaches_platform_subscriptions_made_after_it() {
    let b = broker().await;
    let mut device = Raw::connect(b.addr, v5("device")).await;
    for i in 0..5u16 {
        device
            .send(&publish("dev/1/up", QoS::AtLeastOnce, 1 + i, "warm"))
            .await;
        assert_eq!(
            device.expect_puback(1 + i).await,
            reason::NO_MATCHING_SUBSCRIBERS
        );
    }
    let mut ingest = b.broker.subscribe_internal("dev/+/up", 16);
    device
        .send(&publish("dev/1/up", QoS::AtLeastOnce, 10, "seen"))
        .await;
    assert_eq!(device.expect_puback(10).await, reason::SUCCESS);
    let m = ingest.try_recv().expect("delivered before the PUBACK");
    assert_eq!(&m.payload[..], b"seen");

    let (id, mut rules) = b.broker.observer(16);
    device
        .send(&publish("dev/1/up", QoS::AtLeastOnce, 11, "before-rule"))
        .await;
    device.expect_puback(11).await;
    assert!(rules.try_recv().is_err(), "no filters yet");
    b.broker.set_observed(id, &["dev/#".to_string()]);
    device
        .send(&publish("dev/1/up", QoS::AtLeastOnce, 12, "after-rule"))
        .await;
    device.expect_puback(12).await;
    let m = rules.try_recv().expect("the new filter applies at once");
    assert_eq!(&m.payload[..], b"after-rule");
}
