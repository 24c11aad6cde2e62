//! The session protocol stepped with a fake clock: one `Instant` plus
//! durations, no sockets, no sleeps, no runtime.

use super::lifetime::{is_expired, will_delay, SessionTimers, TimerEvent, NEVER_EXPIRES};
use super::*;
use crate::message::Message;
use crate::session::ConnLink;
use crate::signal::Signal;
use mqtt_codec::{decode, DisconnectProperties};
use std::sync::Arc;
use std::time::Duration;

const SECOND: Duration = Duration::from_secs(1);

fn params(protocol: Protocol) -> Params {
    Params {
        protocol,
        keep_alive: 10,
        session_expiry: 60,
        max_session_expiry: 3600,
        receive_maximum: 2,
        topic_alias_maximum: 4,
        ..Params::default()
    }
}

fn session() -> Session {
    Session::new(1, "c".into(), Protocol::V5)
}

fn link(conn_id: u64) -> ConnLink {
    ConnLink {
        conn_id,
        waker: Arc::new(Signal::default()),
        identity: Arc::new(crate::auth::ClientIdentity::default()),
    }
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Default::default(),
        payload: bytes::Bytes::from_static(b"x"),
    })
}

fn enqueue(s: &Session, topic: &str, qos: QoS) {
    let msg = Arc::new(Message {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(b"m"),
        qos,
        retain: false,
        properties: Default::default(),
        expires_at: None,
        publisher: 0,
    });
    s.state.lock().queue.push_back(Outgoing {
        msg,
        qos,
        retain: false,
        sub_ids: vec![],
        seq: None,
        share: None,
    });
}

fn transmits(core: &mut ConnState) -> Vec<Transmit> {
    std::iter::from_fn(|| core.poll_output()).collect()
}

/// Everything the session lets this connection send now, as the client
/// would decode it.
fn sent(core: &mut ConnState, now: Instant, s: &Session) -> Vec<Packet> {
    let mut batch = Vec::new();
    let mut forget = Vec::new();
    core.fill(now, &mut s.state.lock(), &mut batch, 512, &mut forget);
    let mut wbuf = BytesMut::new();
    core.encode(now, &batch, &mut wbuf);
    let mut out = Vec::new();
    while let Some(p) = decode(&mut wbuf, core.params.protocol, usize::MAX).expect("decodes") {
        out.push(p);
    }
    out
}

fn publishes(packets: &[Packet]) -> Vec<(String, Option<u16>, bool)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((p.topic.clone(), p.packet_id, p.dup)),
            _ => None,
        })
        .collect()
}

fn ack(packet_id: u16) -> Packet {
    Packet::PubAck(PubResponse::new(packet_id, 0))
}

#[test]
fn keep_alive_expires_after_one_and_a_half_intervals_of_silence() {
    let t0 = Instant::now();
    let mut core = ConnState::new(params(Protocol::V5), t0);
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(15)));
    assert_eq!(
        core.handle_timeout(t0 + Duration::from_secs(14), true),
        Ok(())
    );
    assert_eq!(
        core.handle_timeout(t0 + Duration::from_secs(15), true),
        Err(Close(reason::KEEP_ALIVE_TIMEOUT))
    );
}

#[test]
fn keep_alive_is_reset_by_any_packet() {
    let t0 = Instant::now();
    let s = session();
    let mut core = ConnState::new(params(Protocol::V5), t0);
    let t1 = t0 + Duration::from_secs(10);
    let r = core.handle_input(t1, Packet::PingReq, &s);
    assert!(matches!(r, Ok(Input::Done)));
    assert_eq!(transmits(&mut core), vec![Transmit::PingResp]);
    // The first check finds the client alive and moves to 1.5 × 10 s after
    // the PINGREQ.
    let t15 = t0 + Duration::from_secs(15);
    assert_eq!(core.handle_timeout(t15, true), Ok(()));
    assert_eq!(core.poll_timeout(), Some(t1 + Duration::from_secs(15)));
    // An acknowledgement counts as much as a PINGREQ.
    let t2 = t1 + Duration::from_secs(14);
    let _ = core.handle_input(t2, ack(7), &s);
    assert_eq!(
        core.handle_timeout(t1 + Duration::from_secs(15), true),
        Ok(())
    );
    assert_eq!(
        core.handle_timeout(t2 + Duration::from_secs(15), true),
        Err(Close(reason::KEEP_ALIVE_TIMEOUT))
    );
}

#[test]
fn keep_alive_does_not_expire_while_the_driver_is_not_reading() {
    let t0 = Instant::now();
    let mut core = ConnState::new(params(Protocol::V5), t0);
    let t = t0 + Duration::from_secs(20);
    assert_eq!(core.handle_timeout(t, false), Ok(()));
    assert_eq!(core.poll_timeout(), Some(t + Duration::from_secs(15)));
}

#[test]
fn keep_alive_zero_never_expires() {
    let t0 = Instant::now();
    let p = Params {
        keep_alive: 0,
        ..params(Protocol::V5)
    };
    let mut core = ConnState::new(p, t0);
    assert_eq!(core.poll_timeout(), None);
    assert_eq!(core.handle_timeout(t0 + 1000 * SECOND, true), Ok(()));
}

#[test]
fn will_waits_for_its_delay_when_the_session_outlives_it() {
    let t0 = Instant::now();
    let mut timers = SessionTimers::default();
    timers.disconnected(t0, 60, Some(will_delay(true, Some(10), 60)));
    assert_eq!(timers.poll_timeout(), Some(t0 + 10 * SECOND));
    assert_eq!(timers.handle_timeout(t0 + 9 * SECOND), None);
    assert_eq!(
        timers.handle_timeout(t0 + 10 * SECOND),
        Some(TimerEvent::PublishWill)
    );
    assert_eq!(timers.poll_timeout(), Some(t0 + 60 * SECOND));
    assert_eq!(
        timers.handle_timeout(t0 + 60 * SECOND),
        Some(TimerEvent::EndSession)
    );
    assert_eq!(timers.poll_timeout(), None);
}

#[test]
fn will_goes_out_when_the_session_expires_before_its_delay() {
    let t0 = Instant::now();
    let mut timers = SessionTimers::default();
    let delay = will_delay(true, Some(100), 30);
    assert_eq!(delay, 30);
    timers.disconnected(t0, 30, Some(delay));
    assert_eq!(timers.handle_timeout(t0 + 29 * SECOND), None);
    let t = t0 + 30 * SECOND;
    assert_eq!(timers.handle_timeout(t), Some(TimerEvent::PublishWill));
    assert_eq!(timers.handle_timeout(t), Some(TimerEvent::EndSession));
    assert_eq!(timers.handle_timeout(t), None);
}

#[test]
fn mqtt311_will_goes_out_at_once() {
    assert_eq!(will_delay(false, Some(100), NEVER_EXPIRES), 0);
    let t0 = Instant::now();
    let mut timers = SessionTimers::default();
    timers.disconnected(t0, NEVER_EXPIRES, Some(0));
    assert_eq!(timers.handle_timeout(t0), Some(TimerEvent::PublishWill));
    assert_eq!(timers.poll_timeout(), None, "the session never expires");
}

#[test]
fn reconnect_before_the_will_delay_cancels_the_will() {
    let t0 = Instant::now();
    let mut timers = SessionTimers::default();
    timers.disconnected(t0, 60, Some(10));
    assert_eq!(timers.handle_timeout(t0 + 5 * SECOND), None);
    timers.reconnected();
    assert_eq!(timers.poll_timeout(), None);
    assert_eq!(timers.handle_timeout(t0 + 100 * SECOND), None);
}

#[test]
fn session_expires_after_its_interval_and_not_before() {
    let t0 = Instant::now();
    assert!(!is_expired(None, 10, t0 + 100 * SECOND), "online");
    assert!(!is_expired(Some(t0), 10, t0 + 9 * SECOND));
    assert!(is_expired(Some(t0), 10, t0 + 10 * SECOND));
    assert!(!is_expired(Some(t0), NEVER_EXPIRES, t0 + 100_000 * SECOND));
    let mut timers = SessionTimers::default();
    timers.disconnected(t0, 10, None);
    assert_eq!(timers.poll_timeout(), Some(t0 + 10 * SECOND));
    assert_eq!(
        timers.handle_timeout(t0 + 10 * SECOND),
        Some(TimerEvent::EndSession)
    );
}

#[test]
fn inbound_qos2_publish_pubrec_pubrel_pubcomp_routes_once() {
    let t0 = Instant::now();
    let s = session();
    let mut core = ConnState::new(params(Protocol::V5), t0);
    let input = core.handle_input(t0, publish("a", QoS::ExactlyOnce, Some(5)), &s);
    assert!(matches!(input, Ok(Input::Publish(_))));
    assert_eq!(core.accept_qos2(&s, 5), Ok(Qos2::New));
    core.ack(QoS::ExactlyOnce, 5, reason::SUCCESS);
    assert_eq!(transmits(&mut core), vec![Transmit::PubRec(5, 0)]);
    // The client did not see the PUBREC and sends again: not routed twice.
    let again = core.handle_input(t0, publish("a", QoS::ExactlyOnce, Some(5)), &s);
    assert!(matches!(again, Ok(Input::Publish(_))));
    assert_eq!(core.accept_qos2(&s, 5), Ok(Qos2::Duplicate));
    let rel = Packet::PubRel(PubResponse::new(5, 0));
    assert!(matches!(core.handle_input(t0, rel, &s), Ok(Input::Done)));
    assert_eq!(transmits(&mut core), vec![Transmit::PubComp(5, 0)]);
    // Released: the same id is a new message now.
    assert_eq!(core.accept_qos2(&s, 5), Ok(Qos2::New));
}

#[test]
fn pubrel_for_an_unknown_id_is_answered_0x92_in_mqtt5_and_0_in_mqtt311() {
    let t0 = Instant::now();
    let s = session();
    let rel = || Packet::PubRel(PubResponse::new(9, 0));
    let mut v5 = ConnState::new(params(Protocol::V5), t0);
    let _ = v5.handle_input(t0, rel(), &s);
    assert_eq!(
        transmits(&mut v5),
        vec![Transmit::PubComp(9, reason::PACKET_IDENTIFIER_NOT_FOUND)]
    );
    let mut v3 = ConnState::new(params(Protocol::V311), t0);
    let _ = v3.handle_input(t0, rel(), &s);
    assert_eq!(transmits(&mut v3), vec![Transmit::PubComp(9, 0)]);
}

#[test]
fn inbound_qos2_beyond_our_receive_maximum_disconnects_with_0x93() {
    let t0 = Instant::now();
    let s = session();
    let mut core = ConnState::new(params(Protocol::V5), t0);
    assert_eq!(core.accept_qos2(&s, 1), Ok(Qos2::New));
    assert_eq!(core.accept_qos2(&s, 2), Ok(Qos2::New));
    assert_eq!(
        core.accept_qos2(&s, 3),
        Err(Close(reason::RECEIVE_MAXIMUM_EXCEEDED))
    );
    // A refused message ends its flow: the slot is free again.
    core.forget_qos2(&s, [1]);
    assert_eq!(core.accept_qos2(&s, 3), Ok(Qos2::New));
}

#[test]
fn mqtt311_acknowledgements_carry_no_reason_code() {
    let mut core = ConnState::new(params(Protocol::V311), Instant::now());
    core.ack(QoS::AtLeastOnce, 1, reason::NOT_AUTHORIZED);
    core.ack(QoS::AtMostOnce, 2, reason::SUCCESS);
    assert_eq!(transmits(&mut core), vec![Transmit::PubAck(1, 0)]);
}

#[test]
fn outbound_qos2_publish_pubrec_pubrel_pubcomp() {
    let t0 = Instant::now();
    let s = session();
    s.state.lock().conn = Some(link(1));
    let mut core = ConnState::new(params(Protocol::V5), t0);
    enqueue(&s, "q2", QoS::ExactlyOnce);
    let out = sent(&mut core, t0, &s);
    assert_eq!(publishes(&out), vec![("q2".to_string(), Some(1), false)]);
    let rec = Packet::PubRec(PubResponse::new(1, 0));
    assert!(matches!(core.handle_input(t0, rec, &s), Ok(Input::Done)));
    assert_eq!(transmits(&mut core), vec![Transmit::PubRel(1, 0)]);
    assert_eq!(
        s.state.lock().inflight.get(&1).map(|f| f.stage),
        Some(Stage::Released)
    );
    // A repeated PUBREC gets the PUBREL again; a PUBACK does not end QoS 2.
    let rec = Packet::PubRec(PubResponse::new(1, 0));
    let _ = core.handle_input(t0, rec, &s);
    let _ = core.handle_input(t0, ack(1), &s);
    assert_eq!(transmits(&mut core), vec![Transmit::PubRel(1, 0)]);
    assert_eq!(s.state.lock().inflight.len(), 1);
    let comp = Packet::PubComp(PubResponse::new(1, 0));
    let _ = core.handle_input(t0, comp, &s);
    assert!(s.state.lock().inflight.is_empty());
}

#[test]
fn outbound_qos2_refused_at_pubrec_ends_its_flow() {
    let t0 = Instant::now();
    let s = session();
    let mut core = ConnState::new(params(Protocol::V5), t0);
    enqueue(&s, "q2", QoS::ExactlyOnce);
    let _ = sent(&mut core, t0, &s);
    let rec = Packet::PubRec(PubResponse::new(1, reason::NOT_AUTHORIZED));
    let _ = core.handle_input(t0, rec, &s);
    assert!(transmits(&mut core).is_empty());
    assert!(s.state.lock().inflight.is_empty());
}

#[test]
fn outbound_window_never_exceeds_the_client_receive_maximum() {
    let t0 = Instant::now();
    let s = session();
    let mut p = params(Protocol::V5);
    p.client_receive_max = 2;
    let mut core = ConnState::new(p, t0);
    for t in ["a", "b", "c", "d"] {
        enqueue(&s, t, QoS::AtLeastOnce);
    }
    let first = publishes(&sent(&mut core, t0, &s));
    assert_eq!(first.len(), 2);
    assert!(sent(&mut core, t0, &s).is_empty(), "window full");
    assert!(matches!(core.handle_input(t0, ack(1), &s), Ok(Input::Done)));
    let next = publishes(&sent(&mut core, t0, &s));
    assert_eq!(next, vec![("c".to_string(), Some(3), false)]);
    assert_eq!(s.state.lock().inflight.len(), 2);
    // QoS 0 is not held back by the window once it reaches the front.
    let _ = core.handle_input(t0, ack(2), &s);
    let _ = core.handle_input(t0, ack(3), &s);
    enqueue(&s, "zero", QoS::AtMostOnce);
    let rest = publishes(&sent(&mut core, t0, &s));
    assert_eq!(
        rest,
        vec![
            ("d".to_string(), Some(4), false),
            ("zero".to_string(), None, false)
        ]
    );
}

#[test]
fn outbound_messages_larger_than_the_client_maximum_are_dropped() {
    let t0 = Instant::now();
    let s = session();
    let mut p = params(Protocol::V5);
    p.client_max_packet = 10;
    let mut core = ConnState::new(p, t0);
    enqueue(&s, "a/rather/long/topic", QoS::AtLeastOnce);
    enqueue(&s, "t", QoS::AtMostOnce);
    let mut batch = Vec::new();
    let mut forget = Vec::new();
    let stats = core.fill(t0, &mut s.state.lock(), &mut batch, 512, &mut forget);
    assert_eq!(stats.too_large, 1);
    assert_eq!(batch.len(), 1);
    assert_eq!(s.state.lock().dropped, 1);
}

/// The first connection receives QoS 1 and 2 messages without
/// acknowledging them, then ends; `resume` makes the second connection.
fn redelivery(resume: impl FnOnce(&Session)) {
    let t0 = Instant::now();
    let s = session();
    s.state.lock().conn = Some(link(1));
    let mut first = ConnState::new(params(Protocol::V5), t0);
    enqueue(&s, "a", QoS::AtLeastOnce);
    enqueue(&s, "b", QoS::ExactlyOnce);
    enqueue(&s, "c", QoS::AtLeastOnce);
    let out = publishes(&sent(&mut first, t0, &s));
    assert_eq!(out.len(), 3);
    // "b" got as far as PUBREL.
    let _ = first.handle_input(t0, Packet::PubRec(PubResponse::new(2, 0)), &s);
    assert_eq!(transmits(&mut first), vec![Transmit::PubRel(2, 0)]);
    enqueue(&s, "d", QoS::AtLeastOnce);

    resume(&s);
    let t1 = t0 + 5 * SECOND;
    let mut p = params(Protocol::V5);
    p.client_receive_max = 2;
    let mut second = ConnState::new(p, t1);
    second.start_resend(&s.state.lock());
    // In order, with DUP, the PUBREL repeated, within a window of 2.
    let out = sent(&mut second, t1, &s);
    assert_eq!(publishes(&out), vec![("a".to_string(), Some(1), true)]);
    assert!(matches!(&out[1], Packet::PubRel(r) if r.packet_id == 2));
    assert_eq!(out.len(), 2);
    let _ = second.handle_input(t1, ack(1), &s);
    let out = publishes(&sent(&mut second, t1, &s));
    assert_eq!(out, vec![("c".to_string(), Some(3), true)]);
    // Only once every resend went out does the queue move.
    let _ = second.handle_input(t1, Packet::PubComp(PubResponse::new(2, 0)), &s);
    let out = publishes(&sent(&mut second, t1, &s));
    assert_eq!(out, vec![("d".to_string(), Some(4), false)]);
}

#[test]
fn reconnect_resends_unacknowledged_messages_with_dup_in_order_within_receive_maximum() {
    redelivery(|s| {
        let mut st = s.state.lock();
        st.conn = None;
        st.conn = Some(link(2));
    });
}

#[test]
fn takeover_closes_the_old_connection_with_0x8e_and_the_new_one_resends() {
    redelivery(|s| {
        let mut st = s.state.lock();
        assert_eq!(kicked(&st, 1), None);
        let old = take_over(&mut st).expect("the first connection held it");
        assert_eq!(old.conn_id, 1);
        st.conn = Some(link(2));
        assert_eq!(kicked(&st, 1), Some(reason::SESSION_TAKEN_OVER));
        assert_eq!(kicked(&st, 2), None);
    });
}

#[test]
fn operator_kick_closes_with_its_reason() {
    let s = session();
    let mut st = s.state.lock();
    st.conn = Some(link(1));
    st.kicked = Some((1, reason::ADMINISTRATIVE_ACTION));
    assert_eq!(kicked(&st, 1), Some(reason::ADMINISTRATIVE_ACTION));
}

#[test]
fn inbound_topic_alias_is_defined_then_used() {
    let t0 = Instant::now();
    let s = session();
    let mut core = ConnState::new(params(Protocol::V5), t0);
    let with_alias = |topic: &str, alias: u16| {
        let Packet::Publish(mut p) = publish(topic, QoS::AtMostOnce, None) else {
            unreachable!()
        };
        p.properties.topic_alias = Some(alias);
        Packet::Publish(p)
    };
    let r = core.handle_input(t0, with_alias("sensors/1", 1), &s);
    assert!(matches!(r, Ok(Input::Publish(p)) if p.topic == "sensors/1"));
    let r = core.handle_input(t0, with_alias("", 1), &s);
    assert!(matches!(r, Ok(Input::Publish(p)) if p.topic == "sensors/1"));
    let r = core.handle_input(t0, with_alias("", 2), &s);
    assert_eq!(r.err(), Some(Close(reason::PROTOCOL_ERROR)));
    let r = core.handle_input(t0, with_alias("x", 5), &s);
    assert_eq!(r.err(), Some(Close(reason::TOPIC_ALIAS_INVALID)));
}

#[test]
fn outbound_topic_alias_sends_the_topic_once() {
    let t0 = Instant::now();
    let s = session();
    let mut p = params(Protocol::V5);
    p.client_alias_max = 1;
    let mut core = ConnState::new(p, t0);
    for t in ["a", "a", "b"] {
        enqueue(&s, t, QoS::AtMostOnce);
    }
    let out: Vec<(String, Option<u16>)> = sent(&mut core, t0, &s)
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((p.topic, p.properties.topic_alias)),
            _ => None,
        })
        .collect();
    assert_eq!(
        out,
        vec![
            ("a".to_string(), Some(1)),
            (String::new(), Some(1)),
            ("b".to_string(), None)
        ]
    );
}

#[test]
fn disconnect_may_not_set_an_expiry_when_connect_had_none() {
    let t0 = Instant::now();
    let s = session();
    let disconnect = |expiry| {
        Packet::Disconnect(Box::new(Disconnect {
            reason_code: reason::DISCONNECT_WITH_WILL,
            properties: DisconnectProperties {
                session_expiry_interval: Some(expiry),
                ..Default::default()
            },
        }))
    };
    let mut p = params(Protocol::V5);
    p.session_expiry = 0;
    let mut core = ConnState::new(p, t0);
    let r = core.handle_input(t0, disconnect(30), &s);
    assert_eq!(r.err(), Some(Close(reason::PROTOCOL_ERROR)));
    let mut core = ConnState::new(params(Protocol::V5), t0);
    let r = core.handle_input(t0, disconnect(7200), &s);
    assert!(matches!(r, Ok(Input::Disconnect { publish_will: true })));
    assert_eq!(s.state.lock().expiry_interval, 3600, "capped");
}

#[test]
fn server_packets_from_the_client_are_a_protocol_error() {
    let t0 = Instant::now();
    let s = session();
    let mut core = ConnState::new(params(Protocol::V5), t0);
    let r = core.handle_input(t0, Packet::PingResp, &s);
    assert_eq!(r.err(), Some(Close(reason::PROTOCOL_ERROR)));
}

#[test]
fn will_is_kept_only_when_the_ending_publishes_it() {
    let mut core = ConnState::new(params(Protocol::V5), Instant::now());
    let will = || mqtt_codec::LastWill {
        topic: "w".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    };
    core.set_will(Some(will()));
    assert!(core.take_will(false).is_none());
    core.set_will(Some(will()));
    assert_eq!(core.take_will(true).map(|w| w.topic), Some("w".to_string()));
    assert!(core.take_will(true).is_none());
}

#[test]
fn suback_codes_follow_the_protocol_version() {
    let t0 = Instant::now();
    let v5 = ConnState::new(params(Protocol::V5), t0);
    let v3 = ConnState::new(params(Protocol::V311), t0);
    let granted = Granted::Qos(QoS::ExactlyOnce);
    assert_eq!(v5.suback_code(granted), 2);
    assert_eq!(v3.suback_code(granted), 2);
    assert_eq!(
        v5.suback_code(Granted::NotAuthorized),
        reason::NOT_AUTHORIZED
    );
    assert_eq!(
        v5.suback_code(Granted::QuotaExceeded),
        reason::QUOTA_EXCEEDED
    );
    assert_eq!(
        v3.suback_code(Granted::QuotaExceeded),
        reason::UNSPECIFIED_ERROR
    );
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error_in_mqtt5_only() {
    let t0 = Instant::now();
    let opts = SubscriptionOptions {
        no_local: true,
        retain_as_published: true,
        retain_handling: RetainHandling::DoNotSend,
        ..Default::default()
    };
    let v5 = ConnState::new(params(Protocol::V5), t0);
    assert_eq!(
        v5.subscription_options(true, opts),
        Err(Close(reason::PROTOCOL_ERROR))
    );
    assert_eq!(v5.subscription_options(false, opts), Ok(opts));
    let v3 = ConnState::new(params(Protocol::V311), t0);
    let plain = v3
        .subscription_options(true, opts)
        .expect("3.1.1 has no No Local");
    assert!(!plain.no_local && !plain.retain_as_published);
    assert_eq!(plain.retain_handling, RetainHandling::SendAtSubscribe);
}

#[test]
fn unsuback_and_disconnect_carry_reason_codes_in_mqtt5_only() {
    let t0 = Instant::now();
    let v5 = ConnState::new(params(Protocol::V5), t0);
    let v3 = ConnState::new(params(Protocol::V311), t0);
    let codes = vec![reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED];
    assert!(
        matches!(v5.unsuback(3, codes.clone()), Packet::UnsubAck(u) if u.reason_codes == codes)
    );
    assert!(matches!(v3.unsuback(3, codes), Packet::UnsubAck(u) if u.reason_codes.is_empty()));
    assert!(matches!(
        v5.disconnect(reason::SESSION_TAKEN_OVER),
        Some(Packet::Disconnect(d)) if d.reason_code == reason::SESSION_TAKEN_OVER
    ));
    assert!(v3.disconnect(reason::SESSION_TAKEN_OVER).is_none());
}

#[test]
fn negotiation_caps_keep_alive_and_session_expiry() {
    let cfg = BrokerConfig {
        max_keep_alive: 60,
        max_session_expiry: 100,
        ..BrokerConfig::default()
    };
    let connect = |protocol, clean_start, keep_alive, expiry| Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id: "c".into(),
        will: None,
        username: None,
        password: None,
        properties: mqtt_codec::ConnectProperties {
            session_expiry_interval: expiry,
            receive_maximum: Some(5),
            ..Default::default()
        },
    };
    let p = Params::negotiate(&connect(Protocol::V5, true, 0, Some(1000)), &cfg);
    assert_eq!((p.keep_alive, p.server_keep_alive), (60, Some(60)));
    assert_eq!(p.session_expiry, 100);
    assert_eq!(p.client_receive_max, 5);
    let p = Params::negotiate(&connect(Protocol::V5, true, 30, None), &cfg);
    assert_eq!((p.keep_alive, p.server_keep_alive), (30, None));
    assert_eq!(p.session_expiry, 0);
    // 3.1.1: a persistent session lasts as long as the server allows.
    let p = Params::negotiate(&connect(Protocol::V311, false, 30, None), &cfg);
    assert_eq!(p.session_expiry, 100);
    assert_eq!(p.client_alias_max, 0);
}

#[test]
fn refused_subscriptions_cover_narrower_filters_and_answer_0x80_in_both_versions() {
    let refused = vec!["test/nosubscribe".to_string(), "retired/#".to_string()];
    for f in [
        "test/nosubscribe",
        "retired",
        "retired/a",
        "retired/+",
        "retired/#",
    ] {
        assert!(refused_subscription(&refused, f), "{f}");
    }
    for f in [
        "test/nosubscribe/x",
        "test/+",
        "#",
        "+/nosubscribe",
        "$SYS/retired",
    ] {
        assert!(!refused_subscription(&refused, f), "{f}");
    }
    assert!(!refused_subscription(&[], "a"));
    for protocol in [Protocol::V5, Protocol::V311] {
        let core = ConnState::new(params(protocol), Instant::now());
        assert_eq!(core.suback_code(Granted::Refused), 0x80);
    }
}
