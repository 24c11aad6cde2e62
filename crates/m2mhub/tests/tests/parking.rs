//! Idle connections parked without a task (`broker/src/park.rs`): every
//! kind of work still reaches them — a delivery, a ping, the keep-alive
//! deadline, a kick, an address ban, shutdown — and they park again.

use crate::common::*;
use m2mhub_broker::BanKey;
use mqtt_codec::{reason, Packet, QoS};
use std::time::Duration;

async fn wait_parked(s: &BrokerServer, n: u64) {
    let broker = s.broker.clone();
    within_for(Duration::from_secs(10), "connections park", async move {
        while broker.gauges().connections_parked < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_wake_for_every_kind_of_work() {
    let s = BrokerServer::start(|_| {}).await;
    let mut subs = Vec::new();
    for i in 0..10 {
        let (mut c, _) = Raw::connect_ok(s.addr, v5(&format!("sub-{i}"))).await;
        c.subscribe(1, "park/#", QoS::AtLeastOnce).await;
        subs.push(c);
    }
    let (mut pinger, _) = Raw::connect_ok(s.addr, v3("pinger")).await;
    let (mut kicked, _) = Raw::connect_ok(s.addr, v5("kicked")).await;
    // Fresh connections park at their first idle moment.
    wait_parked(&s, 12).await;
    assert_eq!(s.broker.gauges().connections, 12);

    // A delivery wakes each subscriber; QoS 1 is acknowledged both ways.
    let (mut publisher, _) = Raw::connect_ok(s.addr, v5("publisher")).await;
    let code = publisher
        .publish(publish("park/a", QoS::AtLeastOnce, 7, "hello"))
        .await;
    assert_eq!(code, reason::SUCCESS);
    for c in subs.iter_mut() {
        let p = c.recv_publish().await;
        assert_eq!(text(&p), "hello");
        c.puback(p.packet_id.expect("qos 1 id")).await;
    }
    publisher.disconnect().await;
    // They were woken from parking, went quiet for a second and park again.
    wait_parked(&s, 12).await;

    // A packet from the client wakes it.
    pinger.ping().await;
    // And a second delivery after re-parking still arrives, in order.
    let (mut publisher, _) = Raw::connect_ok(s.addr, v3("publisher-2")).await;
    for n in 0..3 {
        publisher
            .publish(publish("park/b", QoS::AtLeastOnce, n + 1, format!("m{n}")))
            .await;
    }
    for c in subs.iter_mut() {
        for n in 0..3 {
            let p = c.recv_publish().await;
            assert_eq!(text(&p), format!("m{n}"));
            c.puback(p.packet_id.expect("qos 1 id")).await;
        }
    }
    publisher.disconnect().await;

    // An operator's kick reaches a parked connection.
    wait_parked(&s, 12).await;
    assert!(s.broker.kick("kicked", reason::ADMINISTRATIVE_ACTION));
    kicked
        .expect_disconnect(reason::ADMINISTRATIVE_ACTION)
        .await;

    // Shutdown wakes the rest: MQTT 5 clients get DISCONNECT 0x8B.
    wait_parked(&s, 11).await;
    within("shutdown", s.broker.shutdown(Duration::from_secs(5))).await;
    for c in subs.iter_mut() {
        let packets = c.expect_close(Duration::from_secs(5)).await;
        assert!(
            packets.iter().any(|p| matches!(p, Packet::Disconnect(d)
                if d.reason_code == reason::SERVER_SHUTTING_DOWN)),
            "expected DISCONNECT 0x8B, got {packets:?}"
        );
    }
    pinger.expect_close(Duration::from_secs(5)).await;
    assert_eq!(s.broker.gauges().connections, 0);
    assert_eq!(s.broker.gauges().connections_parked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_still_times_out_and_is_banned() {
    let s = BrokerServer::start(|_| {}).await;
    // Keep alive 1 s: the broker closes it 1.5 s after its last packet,
    // while it is parked.
    let mut c = v5("sleepy");
    c.keep_alive = 1;
    let (mut sleepy, _) = Raw::connect_ok(s.addr, c).await;
    let (mut other, _) = Raw::connect_ok(s.addr, v3("other")).await;
    wait_parked(&s, 2).await;
    sleepy.expect_disconnect(reason::KEEP_ALIVE_TIMEOUT).await;
    assert_eq!(s.counter("keepalive_timeouts"), 1);

    // An address ban closes the parked connections from that address.
    wait_parked(&s, 1).await;
    s.broker
        .ban_ip("127.0.0.1".parse().expect("ip"), "test", None);
    let packets = other.expect_close(Duration::from_secs(5)).await;
    assert!(packets.is_empty(), "3.1.1 gets no DISCONNECT: {packets:?}");
    assert!(s
        .broker
        .unban(&BanKey::ip("127.0.0.1".parse().expect("ip"))));
    assert_eq!(s.broker.gauges().connections_parked, 0);
}
