//! Property tests: strategies for every valid packet of both versions, and
//! the round-trip / framing properties the broker relies on.

use super::{put_varint, varint_len};
use crate::decode::{
    AUTH_CODES, CONNACK_CODES, DISCONNECT_CODES, PUBACK_CODES, PUBREL_CODES, SUBACK_CODES,
    UNSUBACK_CODES,
};
use crate::*;
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::select;

fn string() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _é€😀-]{0,8}"
}

fn bin() -> BoxedStrategy<Bytes> {
    prop::collection::vec(any::<u8>(), 0..24)
        .prop_map(Bytes::from)
        .boxed()
}

pub(crate) fn topic_name() -> BoxedStrategy<String> {
    prop::collection::vec("[a-z0-9é$]{0,4}", 1..4)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("topic names are non-empty", |t| !t.is_empty())
        .boxed()
}

/// `(filter, is_shared)`.
pub(crate) fn topic_filter() -> BoxedStrategy<(String, bool)> {
    let level = prop_oneof![Just("+".to_string()), "[a-z0-9]{0,4}"];
    (
        prop::collection::vec(level, 1..4),
        any::<bool>(),
        prop::option::of("[a-z0-9]{1,4}"),
    )
        .prop_map(|(levels, hash, share)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str("/#");
            }
            if f.is_empty() {
                f.push('x');
            }
            match share {
                Some(group) => (format!("$share/{group}/{f}"), true),
                None => (f, false),
            }
        })
        .boxed()
}

fn user_props() -> BoxedStrategy<Vec<UserProperty>> {
    prop::collection::vec((string(), string()), 0..3).boxed()
}

fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    prop::option::of(0u8..=1)
}

fn nonzero_u16() -> impl Strategy<Value = u16> {
    1u16..
}

fn sub_id() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..300, 1u32..=268_435_455]
}

/// Payload and payload format indicator, consistent with each other.
fn payload_with_format() -> BoxedStrategy<(Bytes, Option<u8>)> {
    prop_oneof![
        (bin(), Just(None)),
        (bin(), Just(Some(0u8))),
        (string(), Just(Some(1u8))).prop_map(|(s, f)| (Bytes::from(s), f)),
    ]
    .boxed()
}

fn connect_props() -> BoxedStrategy<ConnectProperties> {
    (
        (
            prop::option::of(any::<u32>()),
            prop::option::of(nonzero_u16()),
            prop::option::of(1u32..),
            prop::option::of(any::<u16>()),
            flag(),
            flag(),
        ),
        user_props(),
        prop::option::of((string(), prop::option::of(bin()))),
    )
        .prop_map(|((sei, rm, mps, tam, rri, rpi), user, auth)| {
            let (authentication_method, authentication_data) = match auth {
                Some((m, d)) => (Some(m), d),
                None => (None, None),
            };
            ConnectProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                user_properties: user,
                authentication_method,
                authentication_data,
            }
        })
        .boxed()
}

fn will(v5: bool) -> BoxedStrategy<LastWill> {
    (
        topic_name(),
        payload_with_format(),
        qos(),
        any::<bool>(),
        (
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
            prop::option::of(string()),
            prop::option::of(topic_name()),
            prop::option::of(bin()),
            user_props(),
        ),
    )
        .prop_map(
            move |(topic, (payload, pfi), qos, retain, (wdi, mei, ct, rt, cd, user))| {
                let properties = if v5 {
                    WillProperties {
                        will_delay_interval: wdi,
                        payload_format_indicator: pfi,
                        message_expiry_interval: mei,
                        content_type: ct,
                        response_topic: rt,
                        correlation_data: cd,
                        user_properties: user,
                    }
                } else {
                    WillProperties::default()
                };
                LastWill {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties,
                }
            },
        )
        .boxed()
}

fn connect(v5: bool) -> BoxedStrategy<Packet> {
    (
        any::<bool>(),
        any::<u16>(),
        string(),
        prop::option::of(will(v5)),
        prop::option::of(string()),
        prop::option::of(bin()),
        connect_props(),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, props)| {
                let password = if !v5 && username.is_none() {
                    None
                } else {
                    password
                };
                Packet::Connect(Box::new(Connect {
                    protocol: if v5 { Protocol::V5 } else { Protocol::V311 },
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties: if v5 { props } else { Default::default() },
                }))
            },
        )
        .boxed()
}

fn connack_props() -> BoxedStrategy<ConnAckProperties> {
    (
        (
            prop::option::of(any::<u32>()),
            prop::option::of(nonzero_u16()),
            flag(),
            flag(),
            prop::option::of(1u32..),
            prop::option::of(string()),
            prop::option::of(any::<u16>()),
            prop::option::of(string()),
        ),
        (
            user_props(),
            flag(),
            flag(),
            flag(),
            prop::option::of(any::<u16>()),
            prop::option::of(string()),
            prop::option::of(string()),
            prop::option::of(string()),
            prop::option::of(bin()),
        ),
    )
        .prop_map(
            |((sei, rm, mq, ra, mps, aci, tam, rs), (user, wsa, sia, ssa, ska, ri, sr, am, ad))| {
                ConnAckProperties {
                    session_expiry_interval: sei,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: user,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            },
        )
        .boxed()
}

fn connack(v5: bool) -> BoxedStrategy<Packet> {
    let codes = if v5 {
        CONNACK_CODES.to_vec()
    } else {
        // The 3.1.1 return codes' canonical MQTT 5 equivalents.
        vec![0x00, 0x84, 0x85, 0x88, 0x86, 0x87]
    };
    (any::<bool>(), select(codes), connack_props())
        .prop_map(move |(session_present, reason_code, props)| {
            Packet::ConnAck(Box::new(ConnAck {
                session_present,
                reason_code,
                properties: if v5 { props } else { Default::default() },
            }))
        })
        .boxed()
}

fn publish_props() -> BoxedStrategy<PublishProperties> {
    (
        prop::option::of(any::<u32>()),
        prop::option::of(nonzero_u16()),
        prop::option::of(topic_name()),
        prop::option::of(bin()),
        user_props(),
        prop::collection::vec(sub_id(), 0..3),
        prop::option::of(string()),
    )
        .prop_map(|(mei, ta, rt, cd, user, ids, ct)| PublishProperties {
            payload_format_indicator: None,
            message_expiry_interval: mei,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: user,
            subscription_identifiers: ids,
            content_type: ct,
        })
        .boxed()
}

fn publish(v5: bool) -> BoxedStrategy<Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        nonzero_u16(),
        publish_props(),
        payload_with_format(),
    )
        .prop_map(
            move |(qos, dup, retain, topic, empty_topic, id, mut props, (payload, pfi))| {
                let topic = if v5 && empty_topic && props.topic_alias.is_some() {
                    String::new()
                } else {
                    topic
                };
                props.payload_format_indicator = pfi;
                Packet::Publish(Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos,
                    retain,
                    topic,
                    packet_id: (qos != QoS::AtMostOnce).then_some(id),
                    properties: if v5 { props.into() } else { Default::default() },
                    payload,
                })
            },
        )
        .boxed()
}

fn ack_props() -> BoxedStrategy<AckProperties> {
    (prop::option::of(string()), user_props())
        .prop_map(|(reason_string, user_properties)| AckProperties {
            reason_string,
            user_properties,
        })
        .boxed()
}

fn pub_response(v5: bool) -> BoxedStrategy<Packet> {
    (
        0usize..4,
        nonzero_u16(),
        select(PUBACK_CODES),
        select(PUBREL_CODES),
        ack_props(),
    )
        .prop_map(move |(kind, packet_id, puback_code, pubrel_code, props)| {
            let code = if kind < 2 { puback_code } else { pubrel_code };
            let r = if v5 {
                PubResponse {
                    packet_id,
                    reason_code: code,
                    properties: props,
                }
            } else {
                PubResponse::new(packet_id, 0)
            };
            match kind {
                0 => Packet::PubAck(r),
                1 => Packet::PubRec(r),
                2 => Packet::PubRel(r),
                _ => Packet::PubComp(r),
            }
        })
        .boxed()
}

fn sub_options(v5: bool, shared: bool) -> BoxedStrategy<SubscriptionOptions> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        select(vec![
            RetainHandling::SendAtSubscribe,
            RetainHandling::SendIfNew,
            RetainHandling::DoNotSend,
        ]),
    )
        .prop_map(move |(qos, no_local, rap, rh)| {
            if v5 {
                SubscriptionOptions {
                    qos,
                    no_local: no_local && !shared,
                    retain_as_published: rap,
                    retain_handling: rh,
                }
            } else {
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                }
            }
        })
        .boxed()
}

fn subscribe(v5: bool) -> BoxedStrategy<Packet> {
    let filter =
        topic_filter().prop_flat_map(move |(f, shared)| (Just(f), sub_options(v5, shared)));
    (
        nonzero_u16(),
        prop::option::of(sub_id()),
        user_props(),
        prop::collection::vec(filter, 1..4),
    )
        .prop_map(move |(packet_id, id, user, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties: if v5 {
                    SubscribeProperties {
                        subscription_identifier: id,
                        user_properties: user,
                    }
                } else {
                    Default::default()
                },
                filters,
            })
        })
        .boxed()
}

fn suback(v5: bool) -> BoxedStrategy<Packet> {
    let codes = if v5 {
        SUBACK_CODES.to_vec()
    } else {
        vec![0, 1, 2, 0x80]
    };
    (
        nonzero_u16(),
        ack_props(),
        prop::collection::vec(select(codes), 1..5),
    )
        .prop_map(move |(packet_id, props, reason_codes)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties: if v5 { props } else { Default::default() },
                reason_codes,
            })
        })
        .boxed()
}

fn unsubscribe(v5: bool) -> BoxedStrategy<Packet> {
    (
        nonzero_u16(),
        user_props(),
        prop::collection::vec(topic_filter().prop_map(|(f, _)| f), 1..4),
    )
        .prop_map(move |(packet_id, user, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                user_properties: if v5 { user } else { Vec::new() },
                filters,
            })
        })
        .boxed()
}

fn unsuback(v5: bool) -> BoxedStrategy<Packet> {
    (
        nonzero_u16(),
        ack_props(),
        prop::collection::vec(select(UNSUBACK_CODES), 1..5),
    )
        .prop_map(move |(packet_id, props, codes)| {
            Packet::UnsubAck(if v5 {
                UnsubAck {
                    packet_id,
                    properties: props,
                    reason_codes: codes,
                }
            } else {
                UnsubAck {
                    packet_id,
                    properties: Default::default(),
                    reason_codes: Vec::new(),
                }
            })
        })
        .boxed()
}

fn disconnect(v5: bool) -> BoxedStrategy<Packet> {
    (
        select(DISCONNECT_CODES),
        prop::option::of(any::<u32>()),
        prop::option::of(string()),
        user_props(),
        prop::option::of(string()),
    )
        .prop_map(move |(reason_code, sei, rs, user, sr)| {
            Packet::Disconnect(Box::new(if v5 {
                Disconnect {
                    reason_code,
                    properties: DisconnectProperties {
                        session_expiry_interval: sei,
                        reason_string: rs,
                        user_properties: user,
                        server_reference: sr,
                    },
                }
            } else {
                Disconnect::default()
            }))
        })
        .boxed()
}

fn auth() -> BoxedStrategy<Packet> {
    (
        select(AUTH_CODES),
        prop::option::of(string()),
        prop::option::of(bin()),
        prop::option::of(string()),
        user_props(),
    )
        .prop_map(|(reason_code, am, ad, rs, user)| {
            Packet::Auth(Box::new(Auth {
                reason_code,
                properties: AuthProperties {
                    authentication_method: am,
                    authentication_data: ad,
                    reason_string: rs,
                    user_properties: user,
                },
            }))
        })
        .boxed()
}

/// Any valid packet for `protocol` that round-trips exactly.
pub(crate) fn packet(protocol: Protocol) -> BoxedStrategy<Packet> {
    let v5 = protocol.is_v5();
    let mut options = vec![
        connect(v5),
        connack(v5),
        publish(v5),
        publish(v5),
        pub_response(v5),
        subscribe(v5),
        suback(v5),
        unsubscribe(v5),
        unsuback(v5),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v5),
    ];
    if v5 {
        options.push(auth());
    }
    prop::strategy::Union::new(options).boxed()
}

pub(crate) fn protocol_and_packet() -> BoxedStrategy<(Protocol, Packet)> {
    prop_oneof![Just(Protocol::V311), Just(Protocol::V5)]
        .prop_flat_map(|p| (Just(p), packet(p)))
        .boxed()
}

fn encode_vec(p: &Packet, protocol: Protocol) -> BytesMut {
    let mut out = BytesMut::new();
    encode(p, protocol, &mut out).expect("valid packet encodes");
    out
}

proptest! {
    #[test]
    fn round_trip((protocol, p) in protocol_and_packet()) {
        let mut buf = encode_vec(&p, protocol);
        prop_assert_eq!(buf.len(), encoded_len(&p, protocol));
        let decoded = decode(&mut buf, protocol, usize::MAX);
        prop_assert_eq!(decoded, Ok(Some(p)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn encode_appends_exactly_encoded_len((protocol, p) in protocol_and_packet(), prefix in bin()) {
        let mut buf = BytesMut::from(&prefix[..]);
        encode(&p, protocol, &mut buf).expect("valid packet encodes");
        prop_assert_eq!(&buf[..prefix.len()], &prefix[..]);
        prop_assert_eq!(buf.len() - prefix.len(), encoded_len(&p, protocol));
    }

    #[test]
    fn every_prefix_is_incomplete((protocol, p) in protocol_and_packet()) {
        let full = encode_vec(&p, protocol);
        for n in 0..full.len() {
            let mut buf = BytesMut::from(&full[..n]);
            prop_assert_eq!(decode(&mut buf, protocol, usize::MAX), Ok(None), "prefix {}", n);
            prop_assert_eq!(buf.len(), n);
        }
    }

    #[test]
    fn concatenated_packets_decode_in_order(
        (protocol, a, b) in prop_oneof![Just(Protocol::V311), Just(Protocol::V5)]
            .prop_flat_map(|p| (Just(p), packet(p), packet(p)))
    ) {
        let mut buf = encode_vec(&a, protocol);
        buf.extend_from_slice(&encode_vec(&b, protocol));
        prop_assert_eq!(decode(&mut buf, protocol, usize::MAX), Ok(Some(a)));
        prop_assert_eq!(decode(&mut buf, protocol, usize::MAX), Ok(Some(b)));
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decode(&mut buf, protocol, usize::MAX), Ok(None));
    }

    #[test]
    fn max_packet_size_is_enforced_from_the_header((protocol, p) in protocol_and_packet()) {
        let full = encode_vec(&p, protocol);
        let total = full.len();
        // Only the fixed header is needed to refuse the packet.
        let header_len = 1 + varint_len_of(&full);
        let mut buf = BytesMut::from(&full[..header_len]);
        prop_assert_eq!(
            decode(&mut buf, protocol, total - 1),
            Err(DecodeError::PacketTooLarge { size: total, max: total - 1 })
        );
        let mut buf = full.clone();
        prop_assert_eq!(decode(&mut buf, protocol, total), Ok(Some(p)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..96)) {
        crate::fuzz::fuzz_decode(&data);
    }

    #[test]
    fn mutated_packets_never_panic(
        (protocol, p) in protocol_and_packet(),
        idx in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut data = encode_vec(&p, protocol).to_vec();
        let i = idx.index(data.len());
        data[i] = byte;
        crate::fuzz::fuzz_decode(&data);
        data.truncate(i);
        crate::fuzz::fuzz_decode(&data);
    }
}

/// The number of bytes of the remaining-length field of an encoded packet.
fn varint_len_of(full: &[u8]) -> usize {
    full[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1
}

#[test]
fn varint_boundaries() {
    for (v, bytes) in [
        (0usize, &[0x00][..]),
        (127, &[0x7f]),
        (128, &[0x80, 0x01]),
        (16_383, &[0xff, 0x7f]),
        (16_384, &[0x80, 0x80, 0x01]),
        (2_097_151, &[0xff, 0xff, 0x7f]),
        (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
        (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
    ] {
        let mut out = BytesMut::new();
        put_varint(&mut out, v);
        assert_eq!(&out[..], bytes, "{v}");
        assert_eq!(varint_len(v), bytes.len(), "{v}");
    }
}

#[test]
fn v311_drops_v5_fields() {
    let ack = Packet::PubAck(PubResponse {
        packet_id: 7,
        reason_code: reason::NO_MATCHING_SUBSCRIBERS,
        properties: AckProperties {
            reason_string: Some("x".into()),
            user_properties: vec![],
        },
    });
    assert_eq!(
        &encode_vec(&ack, Protocol::V311)[..],
        &[0x40, 0x02, 0x00, 0x07]
    );

    let connack = Packet::ConnAck(Box::new(ConnAck {
        session_present: true,
        reason_code: reason::BAD_AUTHENTICATION_METHOD,
        properties: ConnAckProperties {
            reason_string: Some("nope".into()),
            ..Default::default()
        },
    }));
    assert_eq!(
        &encode_vec(&connack, Protocol::V311)[..],
        &[0x20, 0x02, 0x01, 0x04]
    );

    let suback = Packet::SubAck(SubAck {
        packet_id: 1,
        properties: AckProperties::default(),
        reason_codes: vec![0, 2, reason::NOT_AUTHORIZED, reason::QUOTA_EXCEEDED],
    });
    assert_eq!(
        &encode_vec(&suback, Protocol::V311)[..],
        &[0x90, 0x06, 0x00, 0x01, 0x00, 0x02, 0x80, 0x80]
    );

    let unsuback = Packet::UnsubAck(UnsubAck {
        packet_id: 3,
        properties: AckProperties::default(),
        reason_codes: vec![0, 0x11],
    });
    assert_eq!(
        &encode_vec(&unsuback, Protocol::V311)[..],
        &[0xB0, 0x02, 0x00, 0x03]
    );

    let disconnect = Packet::Disconnect(Box::new(Disconnect {
        reason_code: reason::DISCONNECT_WITH_WILL,
        properties: Default::default(),
    }));
    assert_eq!(&encode_vec(&disconnect, Protocol::V311)[..], &[0xE0, 0x00]);

    let mut out = BytesMut::from(&b"keep"[..]);
    assert_eq!(
        encode(&Packet::Auth(Box::default()), Protocol::V311, &mut out),
        Err(EncodeError::NotInProtocol("AUTH"))
    );
    assert_eq!(&out[..], b"keep");
}

#[test]
fn v5_short_forms() {
    let ack = Packet::PubAck(PubResponse::new(7, 0));
    assert_eq!(
        &encode_vec(&ack, Protocol::V5)[..],
        &[0x40, 0x02, 0x00, 0x07]
    );
    let rel = Packet::PubRel(PubResponse::new(7, reason::PACKET_IDENTIFIER_NOT_FOUND));
    assert_eq!(
        &encode_vec(&rel, Protocol::V5)[..],
        &[0x62, 0x03, 0x00, 0x07, 0x92]
    );
    assert_eq!(
        &encode_vec(&Packet::Disconnect(Box::default()), Protocol::V5)[..],
        &[0xE0, 0x00]
    );
    let d = Packet::Disconnect(Box::new(Disconnect {
        reason_code: reason::SESSION_TAKEN_OVER,
        properties: Default::default(),
    }));
    assert_eq!(&encode_vec(&d, Protocol::V5)[..], &[0xE0, 0x01, 0x8E]);
    assert_eq!(
        &encode_vec(&Packet::Auth(Box::default()), Protocol::V5)[..],
        &[0xF0, 0x00]
    );
    let ack = Packet::PubAck(PubResponse {
        packet_id: 1,
        reason_code: 0,
        properties: AckProperties {
            reason_string: Some("ok".into()),
            user_properties: vec![],
        },
    });
    assert_eq!(
        &encode_vec(&ack, Protocol::V5)[..],
        &[0x40, 0x09, 0x00, 0x01, 0x00, 0x05, 0x1F, 0x00, 0x02, b'o', b'k']
    );
}

#[test]
fn publish_v5_bytes() {
    let p = Packet::Publish(Publish {
        dup: true,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "a/b".into(),
        packet_id: Some(10),
        properties: PublishProperties {
            topic_alias: Some(3),
            subscription_identifiers: vec![200],
            ..Default::default()
        }
        .into(),
        payload: Bytes::from_static(b"hi"),
    });
    assert_eq!(
        &encode_vec(&p, Protocol::V5)[..],
        &[
            0x3B, 0x10, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, 0x06, 0x23, 0x00, 0x03, 0x0B,
            0xC8, 0x01, b'h', b'i'
        ]
    );
}

#[test]
fn encode_errors() {
    let long = "x".repeat(65_536);
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: long.clone(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::new(),
    });
    let mut out = BytesMut::new();
    assert_eq!(
        encode(&p, Protocol::V5, &mut out),
        Err(EncodeError::StringTooLong)
    );
    assert!(out.is_empty());

    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::new(),
    });
    assert!(matches!(
        encode(&p, Protocol::V311, &mut out),
        Err(EncodeError::Invalid(_))
    ));

    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::from(vec![0u8; MAX_REMAINING_LENGTH]),
    });
    assert!(matches!(
        encode(&p, Protocol::V311, &mut out),
        Err(EncodeError::TooLarge(_))
    ));
    assert!(out.is_empty());

    let c = Packet::Connect(Box::new(Connect {
        protocol: Protocol::V311,
        clean_start: true,
        keep_alive: 0,
        client_id: String::new(),
        will: None,
        username: None,
        password: Some(Bytes::from_static(b"pw")),
        properties: Default::default(),
    }));
    assert!(matches!(
        encode(&c, Protocol::V311, &mut out),
        Err(EncodeError::Invalid(_))
    ));
}
