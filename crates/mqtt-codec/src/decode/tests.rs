//! Hand-written byte vectors for every validation rule.

use crate::*;
use bytes::{Bytes, BytesMut};
use Protocol::{V311, V5};

fn dec(bytes: &[u8], protocol: Protocol) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, protocol, usize::MAX)
}

fn ok(bytes: &[u8], protocol: Protocol) -> Packet {
    let mut buf = BytesMut::from(bytes);
    match decode(&mut buf, protocol, usize::MAX) {
        Ok(Some(p)) => {
            assert!(buf.is_empty(), "left over bytes");
            p
        }
        other => panic!("expected a packet, got {other:?}"),
    }
}

fn err(bytes: &[u8], protocol: Protocol) -> DecodeError {
    match dec(bytes, protocol) {
        Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn malformed(bytes: &[u8], protocol: Protocol) {
    let e = err(bytes, protocol);
    assert_eq!(e.reason_code(), reason::MALFORMED_PACKET, "{e:?}");
}

fn protocol_error(bytes: &[u8], protocol: Protocol) {
    let e = err(bytes, protocol);
    assert_eq!(e.reason_code(), reason::PROTOCOL_ERROR, "{e:?}");
}

/// Frame a body with a fixed header.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    crate::encode::put_varint(&mut out, body.len());
    let mut v = vec![first];
    v.extend_from_slice(&out);
    v.extend_from_slice(body);
    v
}

/// A v5 PUBLISH QoS 0 on topic "a" with the given raw property bytes and payload.
fn publish_v5(props: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01, b'a', props.len() as u8];
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    frame(0x30, &body)
}

/// A v5 CONNECT with client id "c" and the given raw property bytes.
fn connect_v5(props: &[u8]) -> Vec<u8> {
    let mut body = vec![
        0x00,
        0x04,
        b'M',
        b'Q',
        b'T',
        b'T',
        0x05,
        0x02,
        0x00,
        0x3C,
        props.len() as u8,
    ];
    body.extend_from_slice(props);
    body.extend_from_slice(&[0x00, 0x01, b'c']);
    frame(0x10, &body)
}

fn connect_v311(flags: u8, tail: &[u8]) -> Vec<u8> {
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x3C, 0x00, 0x01, b'c',
    ];
    body.extend_from_slice(tail);
    frame(0x10, &body)
}

#[test]
fn mosquitto_pub_v311_connect() {
    // mosquitto_pub -V mqttv311 -i mosq-abc -t t -m x (clean session, keep alive 60)
    let bytes = [
        0x10, 0x14, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x08, b'm',
        b'o', b's', b'q', b'-', b'a', b'b', b'c',
    ];
    let p = ok(&bytes, V311);
    assert_eq!(
        p,
        Packet::Connect(Box::new(Connect {
            protocol: V311,
            clean_start: true,
            keep_alive: 60,
            client_id: "mosq-abc".into(),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        }))
    );
    // The protocol argument is irrelevant for CONNECT.
    assert_eq!(ok(&bytes, V5), p);
    assert_eq!(decode_connect_protocol(&bytes), Some(V311));
}

#[test]
fn spec_v5_connect_example() {
    // Variable header example of MQTT 5 section 3.1.2.12, with a payload of
    // client id "id", user name "u" and password "p".
    let bytes = frame(
        0x10,
        &[
            0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xC2, 0x00, 0x0A, 0x05, 0x11, 0x00, 0x00,
            0x00, 0x0A, 0x00, 0x02, b'i', b'd', 0x00, 0x01, b'u', 0x00, 0x01, b'p',
        ],
    );
    assert_eq!(decode_connect_protocol(&bytes), Some(V5));
    let Packet::Connect(c) = ok(&bytes, V311) else {
        panic!("not a CONNECT")
    };
    assert_eq!(c.protocol, V5);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 10);
    assert_eq!(c.properties.session_expiry_interval, Some(10));
    assert_eq!(c.client_id, "id");
    assert_eq!(c.username.as_deref(), Some("u"));
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
}

#[test]
fn v31_mqisdp_connect() {
    let bytes = [
        0x10, 0x0F, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C, 0x00,
        0x01, b'c',
    ];
    let Packet::Connect(c) = ok(&bytes, V311) else {
        panic!("not a CONNECT")
    };
    assert_eq!(c.protocol, V311);
    assert_eq!(c.client_id, "c");
}

#[test]
fn connect_protocol_name_and_level() {
    let mut bad_name = connect_v311(0x02, &[]);
    bad_name[7] = b'X';
    assert_eq!(
        err(&bad_name, V311),
        DecodeError::UnsupportedProtocolVersion(4)
    );
    let mut level6 = connect_v311(0x02, &[]);
    level6[8] = 6;
    assert_eq!(
        err(&level6, V311),
        DecodeError::UnsupportedProtocolVersion(6)
    );
    assert_eq!(
        err(&level6, V311).reason_code(),
        reason::UNSUPPORTED_PROTOCOL_VERSION
    );
    assert_eq!(decode_connect_protocol(&level6), Some(V311));
    let mut level3 = connect_v311(0x02, &[]);
    level3[8] = 3;
    assert_eq!(
        err(&level3, V311),
        DecodeError::UnsupportedProtocolVersion(3)
    );
}

#[test]
fn connect_flags() {
    // Reserved bit 0.
    malformed(&connect_v311(0x03, &[]), V311);
    // Will QoS / retain without will flag.
    malformed(&connect_v311(0x0A, &[]), V311);
    malformed(&connect_v311(0x22, &[]), V311);
    // Will QoS 3.
    malformed(&connect_v311(0x1E, &[0x00, 0x01, b't', 0x00, 0x00]), V311);
    // Valid will.
    let Packet::Connect(c) = ok(
        &connect_v311(0x36, &[0x00, 0x01, b't', 0x00, 0x01, b'x']),
        V311,
    ) else {
        panic!()
    };
    let w = c.will.expect("will");
    assert_eq!(
        (w.qos, w.retain, &w.topic[..]),
        (QoS::ExactlyOnce, true, "t")
    );
    // Will topic with a wildcard.
    assert!(matches!(
        err(&connect_v311(0x06, &[0x00, 0x01, b'#', 0x00, 0x00]), V311),
        DecodeError::TopicNameInvalid(_)
    ));
    // Password without user name: malformed in 3.1.1 ...
    malformed(&connect_v311(0x42, &[0x00, 0x01, b'p']), V311);
    // ... but allowed in MQTT 5.
    let mut v5 = connect_v5(&[]);
    v5[9] = 0x42;
    v5[1] += 3;
    v5.extend_from_slice(&[0x00, 0x01, b'p']);
    let Packet::Connect(c) = ok(&v5, V5) else {
        panic!()
    };
    assert_eq!((c.username, c.password.as_deref()), (None, Some(&b"p"[..])));
    // Missing payload fields.
    malformed(&connect_v311(0x82, &[]), V311);
    // Trailing bytes.
    malformed(&connect_v311(0x02, &[0x00]), V311);
}

#[test]
fn connect_properties() {
    assert!(matches!(
        ok(&connect_v5(&[0x21, 0x00, 0x05]), V5),
        Packet::Connect(_)
    ));
    // Receive maximum 0, maximum packet size 0.
    protocol_error(&connect_v5(&[0x21, 0x00, 0x00]), V5);
    protocol_error(&connect_v5(&[0x27, 0x00, 0x00, 0x00, 0x00]), V5);
    // Request problem / response information must be 0 or 1.
    protocol_error(&connect_v5(&[0x17, 0x02]), V5);
    protocol_error(&connect_v5(&[0x19, 0x02]), V5);
    // Duplicate session expiry interval.
    protocol_error(&connect_v5(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]), V5);
    // Topic alias is a PUBLISH property.
    protocol_error(&connect_v5(&[0x23, 0x00, 0x01]), V5);
    // Authentication data without method.
    protocol_error(&connect_v5(&[0x16, 0x00, 0x00]), V5);
    // Unknown property identifier.
    malformed(&connect_v5(&[0x7F, 0x00]), V5);
    // Property value cut short by the property length.
    malformed(&connect_v5(&[0x21, 0x00]), V5);
    // User properties repeat and keep their order.
    let Packet::Connect(c) = ok(
        &connect_v5(&[0x26, 0, 1, b'a', 0, 1, b'1', 0x26, 0, 1, b'a', 0, 1, b'2']),
        V5,
    ) else {
        panic!()
    };
    assert_eq!(
        c.properties.user_properties,
        vec![("a".into(), "1".into()), ("a".into(), "2".into())]
    );
}

#[test]
fn fixed_header() {
    // Incomplete remaining length.
    assert_eq!(dec(&[0x30], V311), Ok(None));
    assert_eq!(dec(&[0x30, 0x80], V311), Ok(None));
    assert_eq!(dec(&[0x30, 0x80, 0x80, 0x80], V311), Ok(None));
    // Remaining length over 4 bytes.
    malformed(&[0x30, 0x80, 0x80, 0x80, 0x80], V311);
    malformed(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], V311);
    // Not minimally encoded.
    malformed(&[0xC0, 0x80, 0x00], V311);
    // Packet type 0 and AUTH in 3.1.1.
    malformed(&[0x00, 0x00], V311);
    malformed(&[0xF0, 0x00], V311);
    // Reserved flags.
    for first in [
        0x11, 0x21, 0x41, 0x51, 0x60, 0x63, 0x71, 0x80, 0x91, 0xA0, 0xB1, 0xC1, 0xD8, 0xE1, 0xF1,
    ] {
        malformed(&[first, 0x00], V5);
    }
    // PINGREQ / PINGRESP must be empty.
    assert_eq!(ok(&[0xC0, 0x00], V311), Packet::PingReq);
    assert_eq!(ok(&[0xD0, 0x00], V311), Packet::PingResp);
    malformed(&[0xC0, 0x01, 0x00], V311);
    malformed(&[0xD0, 0x01, 0x00], V5);
}

#[test]
fn packet_too_large_before_body() {
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x01][..]);
    assert_eq!(
        decode(&mut buf, V311, 100),
        Err(DecodeError::PacketTooLarge {
            size: 131,
            max: 100
        })
    );
    assert_eq!(
        DecodeError::PacketTooLarge { size: 1, max: 0 }.reason_code(),
        reason::PACKET_TOO_LARGE
    );
    // Exactly at the limit is fine.
    let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
    assert_eq!(decode(&mut buf, V311, 2), Ok(Some(Packet::PingReq)));
}

#[test]
fn incomplete_body_is_not_consumed() {
    let mut buf = BytesMut::from(&[0x30, 0x05, 0x00, 0x01, b'a'][..]);
    assert_eq!(decode(&mut buf, V311, usize::MAX), Ok(None));
    assert_eq!(buf.len(), 5);
    buf.extend_from_slice(b"xy");
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, V311, usize::MAX) else {
        panic!()
    };
    assert_eq!(&p.payload[..], b"xy");
    assert!(buf.is_empty());
}

#[test]
fn publish_rules() {
    let p = ok(
        &[0x33, 0x07, 0x00, 0x01, b'a', 0x00, 0x05, b'h', b'i'],
        V311,
    );
    assert_eq!(
        p,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "a".into(),
            packet_id: Some(5),
            properties: Default::default(),
            payload: Bytes::from_static(b"hi"),
        })
    );
    // QoS 3.
    malformed(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], V311);
    // DUP on QoS 0.
    malformed(&[0x38, 0x03, 0x00, 0x01, b'a'], V311);
    // Packet id 0.
    protocol_error(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], V311);
    // Wildcards and empty topic names.
    for topic in [&b"a/+"[..], b"#"] {
        let mut body = vec![0x00, topic.len() as u8];
        body.extend_from_slice(topic);
        assert!(matches!(
            err(&frame(0x30, &body), V311),
            DecodeError::TopicNameInvalid(_)
        ));
    }
    assert_eq!(
        err(&[0x30, 0x02, 0x00, 0x00], V311).reason_code(),
        reason::TOPIC_NAME_INVALID
    );
    assert_eq!(
        err(&[0x30, 0x03, 0x00, 0x00, 0x00], V5).reason_code(),
        reason::TOPIC_NAME_INVALID
    );
    // ... but an empty topic with a topic alias is fine in MQTT 5.
    let Packet::Publish(p) = ok(&[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x07], V5) else {
        panic!()
    };
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("", Some(7)));
    // Invalid UTF-8 and U+0000 in the topic.
    malformed(&[0x30, 0x04, 0x00, 0x02, 0xC3, 0x28], V311);
    malformed(&[0x30, 0x04, 0x00, 0x02, b'a', 0x00], V311);
    // Surrogate code point encoded in UTF-8 (CESU style) is not valid UTF-8.
    malformed(&[0x30, 0x05, 0x00, 0x03, 0xED, 0xA0, 0x80], V311);
    // Truncated topic.
    malformed(&[0x30, 0x02, 0x00, 0x05], V311);
}

#[test]
fn publish_properties() {
    // Payload format indicator 1 requires a UTF-8 payload.
    assert!(ok(&publish_v5(&[0x01, 0x01], "é".as_bytes()), V5) != Packet::PingReq);
    assert_eq!(
        err(&publish_v5(&[0x01, 0x01], &[0xFF]), V5),
        DecodeError::PayloadFormatInvalid
    );
    assert_eq!(
        DecodeError::PayloadFormatInvalid.reason_code(),
        reason::PAYLOAD_FORMAT_INVALID
    );
    ok(&publish_v5(&[0x01, 0x00], &[0xFF]), V5);
    protocol_error(&publish_v5(&[0x01, 0x02], b""), V5);
    // Topic alias 0, duplicate topic alias.
    protocol_error(&publish_v5(&[0x23, 0x00, 0x00], b""), V5);
    protocol_error(&publish_v5(&[0x23, 0x00, 0x01, 0x23, 0x00, 0x02], b""), V5);
    // Subscription identifiers repeat in PUBLISH; 0 is a protocol error.
    let Packet::Publish(p) = ok(&publish_v5(&[0x0B, 0x01, 0x0B, 0x80, 0x01], b""), V5) else {
        panic!()
    };
    assert_eq!(p.properties.subscription_identifiers, vec![1, 128]);
    protocol_error(&publish_v5(&[0x0B, 0x00], b""), V5);
    // Subscription identifier varint not minimal / too long.
    malformed(&publish_v5(&[0x0B, 0x81, 0x00], b""), V5);
    malformed(&publish_v5(&[0x0B, 0x80, 0x80, 0x80, 0x80], b""), V5);
    // A CONNECT-only property.
    protocol_error(&publish_v5(&[0x21, 0x00, 0x01], b""), V5);
    // Property length past the end of the packet.
    malformed(&[0x30, 0x04, 0x00, 0x01, b'a', 0x09], V5);
    // Response topic must be a topic name.
    protocol_error(&publish_v5(&[0x08, 0x00, 0x01, b'+'], b""), V5);
    // Correlation data is sliced out of the packet.
    let Packet::Publish(p) = ok(&publish_v5(&[0x09, 0x00, 0x02, 0xAB, 0xCD], b"x"), V5) else {
        panic!()
    };
    assert_eq!(
        p.properties.correlation_data.as_deref(),
        Some(&[0xAB, 0xCD][..])
    );
}

#[test]
fn pub_responses() {
    for (first, name) in [
        (0x40, "PUBACK"),
        (0x50, "PUBREC"),
        (0x62, "PUBREL"),
        (0x70, "PUBCOMP"),
    ] {
        let p = ok(&[first, 0x02, 0x00, 0x09], V311);
        assert_eq!(p.name(), name);
        // Packet id 0.
        protocol_error(&[first, 0x02, 0x00, 0x00], V311);
        // 3.1.1 has no reason code.
        malformed(&[first, 0x03, 0x00, 0x09, 0x00], V311);
        // MQTT 5 short forms.
        assert_eq!(
            ok(&[first, 0x02, 0x00, 0x09], V5),
            ok(&[first, 0x04, 0x00, 0x09, 0x00, 0x00], V5)
        );
        assert_eq!(
            ok(&[first, 0x03, 0x00, 0x09, 0x00], V5),
            ok(&[first, 0x02, 0x00, 0x09], V5)
        );
        malformed(&[first, 0x01, 0x00], V5);
    }
    let Packet::PubAck(a) = ok(&[0x40, 0x03, 0x00, 0x09, 0x10], V5) else {
        panic!()
    };
    assert_eq!(a.reason_code, reason::NO_MATCHING_SUBSCRIBERS);
    // Reason codes valid for the packet type only.
    malformed(&[0x40, 0x03, 0x00, 0x09, 0x92], V5);
    malformed(&[0x62, 0x03, 0x00, 0x09, 0x10], V5);
    // Reason string once, user properties many.
    let Packet::PubAck(a) = ok(
        &[
            0x40, 0x0D, 0x00, 0x09, 0x80, 0x09, 0x1F, 0x00, 0x01, b'x', 0x26, 0, 0, 0, 0,
        ],
        V5,
    ) else {
        panic!()
    };
    assert_eq!(a.properties.reason_string.as_deref(), Some("x"));
    protocol_error(
        &frame(
            0x40,
            &[0x00, 0x09, 0x80, 0x06, 0x1F, 0x00, 0x00, 0x1F, 0x00, 0x00],
        ),
        V5,
    );
    protocol_error(&[0x40, 0x07, 0x00, 0x09, 0x80, 0x03, 0x23, 0x00, 0x01], V5);
}

#[test]
fn connack() {
    assert_eq!(
        ok(&[0x20, 0x02, 0x01, 0x00], V311),
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            reason_code: 0,
            properties: Default::default(),
        }))
    );
    for (code, v5) in [
        (1, reason::UNSUPPORTED_PROTOCOL_VERSION),
        (2, reason::CLIENT_IDENTIFIER_NOT_VALID),
        (3, reason::SERVER_UNAVAILABLE),
        (4, reason::BAD_USER_NAME_OR_PASSWORD),
        (5, reason::NOT_AUTHORIZED),
    ] {
        let Packet::ConnAck(c) = ok(&[0x20, 0x02, 0x00, code], V311) else {
            panic!()
        };
        assert_eq!(c.reason_code, v5);
    }
    malformed(&[0x20, 0x02, 0x00, 0x06], V311);
    malformed(&[0x20, 0x02, 0x02, 0x00], V311);
    malformed(&[0x20, 0x03, 0x00, 0x00, 0x00], V311);
    let Packet::ConnAck(c) = ok(&[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x00], V5) else {
        panic!()
    };
    assert_eq!(c.properties.maximum_qos, Some(0));
    protocol_error(&[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02], V5);
    malformed(&[0x20, 0x03, 0x00, 0x05, 0x00], V5);
    // Property length is mandatory in a v5 CONNACK.
    malformed(&[0x20, 0x02, 0x00, 0x00], V5);
}

#[test]
fn subscribe() {
    let p = ok(
        &[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'#', 0x01],
        V311,
    );
    let Packet::Subscribe(s) = p else { panic!() };
    assert_eq!(s.filters[0].0, "a/#");
    assert_eq!(s.filters[0].1.qos, QoS::AtLeastOnce);
    // No filters.
    protocol_error(&[0x82, 0x02, 0x00, 0x01], V311);
    protocol_error(&[0x82, 0x03, 0x00, 0x01, 0x00], V5);
    // Packet id 0.
    protocol_error(&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00], V311);
    // Invalid filter.
    let bad = [
        0x82, 0x0A, 0x00, 0x01, 0x00, 0x05, b'a', b'/', b'#', b'/', b'b', 0x00,
    ];
    assert_eq!(err(&bad, V311).reason_code(), reason::TOPIC_FILTER_INVALID);
    // 3.1.1: only QoS bits in the options byte.
    malformed(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04], V311);
    malformed(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03], V311);
    // MQTT 5 options byte.
    let Packet::Subscribe(s) = ok(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x2E], V5)
    else {
        panic!()
    };
    assert_eq!(
        s.filters[0].1,
        SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::DoNotSend,
        }
    );
    malformed(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40], V5);
    malformed(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30], V5);
    malformed(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x03], V5);
    // Missing options byte.
    malformed(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'], V5);
    // No Local on a shared subscription.
    let mut shared = vec![0x00, 0x01, 0x00, 0x00, 0x0A];
    shared.extend_from_slice(b"$share/g/a");
    shared.push(0x04);
    protocol_error(&frame(0x82, &shared), V5);
    // Subscription identifier: once, non-zero.
    let Packet::Subscribe(s) = ok(
        &[
            0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x05, 0x00, 0x01, b'a', 0x00,
        ],
        V5,
    ) else {
        panic!()
    };
    assert_eq!(s.properties.subscription_identifier, Some(5));
    protocol_error(
        &[
            0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x00, 0x00, 0x01, b'a', 0x00,
        ],
        V5,
    );
    protocol_error(
        &[
            0x82, 0x0B, 0x00, 0x01, 0x04, 0x0B, 0x05, 0x0B, 0x06, 0x00, 0x01, b'a', 0x00,
        ],
        V5,
    );
}

#[test]
fn suback() {
    let Packet::SubAck(s) = ok(&[0x90, 0x06, 0x00, 0x01, 0x00, 0x01, 0x02, 0x80], V311) else {
        panic!()
    };
    assert_eq!(s.reason_codes, vec![0, 1, 2, 0x80]);
    malformed(&[0x90, 0x03, 0x00, 0x01, 0x03], V311);
    malformed(&[0x90, 0x03, 0x00, 0x01, 0x87], V311);
    protocol_error(&[0x90, 0x02, 0x00, 0x01], V311);
    let Packet::SubAck(s) = ok(&[0x90, 0x05, 0x00, 0x01, 0x00, 0x87, 0xA2], V5) else {
        panic!()
    };
    assert_eq!(s.reason_codes, vec![0x87, 0xA2]);
    malformed(&[0x90, 0x04, 0x00, 0x01, 0x00, 0x03], V5);
}

#[test]
fn unsubscribe_and_unsuback() {
    let Packet::Unsubscribe(u) = ok(&[0xA2, 0x05, 0x00, 0x02, 0x00, 0x01, b'#'], V311) else {
        panic!()
    };
    assert_eq!(u.filters, vec!["#".to_string()]);
    protocol_error(&[0xA2, 0x02, 0x00, 0x02], V311);
    protocol_error(&[0xA2, 0x03, 0x00, 0x02, 0x00], V5);
    protocol_error(&[0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b'#'], V311);
    assert_eq!(
        err(&[0xA2, 0x06, 0x00, 0x02, 0x00, 0x02, b'#', b'a'], V311).reason_code(),
        reason::TOPIC_FILTER_INVALID
    );
    // Only user properties.
    protocol_error(
        &[0xA2, 0x08, 0x00, 0x02, 0x02, 0x0B, 0x01, 0x00, 0x01, b'#'],
        V5,
    );

    let Packet::UnsubAck(u) = ok(&[0xB0, 0x02, 0x00, 0x02], V311) else {
        panic!()
    };
    assert!(u.reason_codes.is_empty());
    malformed(&[0xB0, 0x03, 0x00, 0x02, 0x00], V311);
    let Packet::UnsubAck(u) = ok(&[0xB0, 0x05, 0x00, 0x02, 0x00, 0x00, 0x11], V5) else {
        panic!()
    };
    assert_eq!(u.reason_codes, vec![0x00, 0x11]);
    malformed(&[0xB0, 0x04, 0x00, 0x02, 0x00, 0x01], V5);
}

#[test]
fn disconnect_and_auth() {
    assert_eq!(ok(&[0xE0, 0x00], V311), Packet::Disconnect(Box::default()));
    malformed(&[0xE0, 0x01, 0x00], V311);
    assert_eq!(ok(&[0xE0, 0x00], V5), Packet::Disconnect(Box::default()));
    let Packet::Disconnect(d) = ok(&[0xE0, 0x01, 0x04], V5) else {
        panic!()
    };
    assert_eq!(d.reason_code, reason::DISCONNECT_WITH_WILL);
    let Packet::Disconnect(d) = ok(&[0xE0, 0x07, 0x8B, 0x05, 0x11, 0, 0, 0, 9], V5) else {
        panic!()
    };
    assert_eq!(d.properties.session_expiry_interval, Some(9));
    malformed(&[0xE0, 0x01, 0x05], V5);
    protocol_error(&[0xE0, 0x05, 0x00, 0x03, 0x21, 0x00, 0x01], V5);

    assert_eq!(ok(&[0xF0, 0x00], V5), Packet::Auth(Box::default()));
    let Packet::Auth(a) = ok(&[0xF0, 0x06, 0x18, 0x04, 0x15, 0x00, 0x01, b'X'], V5) else {
        panic!()
    };
    assert_eq!(a.reason_code, reason::CONTINUE_AUTHENTICATION);
    assert_eq!(a.properties.authentication_method.as_deref(), Some("X"));
    malformed(&[0xF0, 0x01, 0x01], V5);
}

#[test]
fn connect_protocol_peek() {
    assert_eq!(decode_connect_protocol(&[]), None);
    assert_eq!(decode_connect_protocol(&[0x10]), None);
    assert_eq!(
        decode_connect_protocol(&[0x10, 0x10, 0x00, 0x04, b'M']),
        None
    );
    assert_eq!(decode_connect_protocol(&[0x30, 0x00]), None);
    assert_eq!(
        decode_connect_protocol(&[0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05]),
        Some(V5)
    );
    // Even a malformed CONNECT is answered in the client's version.
    assert_eq!(
        decode_connect_protocol(&[0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x01]),
        Some(V5)
    );
}

#[test]
fn payload_is_zero_copy() {
    let mut buf = BytesMut::from(&publish_v5(&[], b"payload")[..]);
    let base = buf.as_ptr() as usize;
    let end = base + buf.len();
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, V5, usize::MAX) else {
        panic!()
    };
    let ptr = p.payload.as_ptr() as usize;
    assert!(ptr >= base && ptr < end, "payload was copied");
}
