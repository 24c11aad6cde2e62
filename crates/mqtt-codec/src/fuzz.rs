//! The body of the `decode` fuzz target, kept in the library so that plain
//! `cargo test` can replay the checked-in corpus on stable Rust.

use crate::{decode, decode_connect_protocol, encode, encoded_len, Packet, Protocol};
use bytes::BytesMut;

/// Decode `data` as a stream of packets under both protocol versions and a
/// few size limits, and check every decoded packet survives re-encoding.
///
/// Panics (the fuzzer's signal) if the codec panics, if a decoded packet
/// cannot be re-encoded, if `encoded_len` disagrees with `encode`, or if the
/// re-encoded packet does not decode back to the same value.
pub fn fuzz_decode(data: &[u8]) {
    let _ = decode_connect_protocol(data);
    for protocol in [Protocol::V311, Protocol::V5] {
        for max in [usize::MAX, 65_536, 64, 5] {
            let mut buf = BytesMut::from(data);
            loop {
                let before = buf.len();
                match decode(&mut buf, protocol, max) {
                    Ok(Some(packet)) => {
                        assert!(buf.len() < before, "decode consumed nothing");
                        check_reencode(&packet, protocol);
                    }
                    Ok(None) => {
                        assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

/// Decoding normalises (short-form acks, "MQIsdp", long-form empty
/// properties) into values that encode canonically, so one round trip must
/// reproduce the value exactly, and a second one the same bytes.
fn check_reencode(packet: &Packet, protocol: Protocol) {
    let mut out = BytesMut::new();
    if let Err(e) = encode(packet, protocol, &mut out) {
        panic!("decoded {} does not re-encode: {e}", packet.name());
    }
    assert_eq!(out.len(), encoded_len(packet, protocol), "encoded_len");
    let first = out.clone().freeze();
    let again = match decode(&mut out, protocol, usize::MAX) {
        Ok(Some(p)) => p,
        other => panic!("re-encoded {} does not decode: {other:?}", packet.name()),
    };
    assert!(out.is_empty(), "re-encoded packet has trailing bytes");
    assert_eq!(&again, packet, "round trip changed the packet");
    let mut second = BytesMut::new();
    if encode(&again, protocol, &mut second).is_err() {
        panic!("second encoding failed");
    }
    assert_eq!(first, second.freeze(), "encoding is not canonical");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use bytes::Bytes;
    use std::path::PathBuf;

    fn corpus_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode")
    }

    #[test]
    fn fuzz_corpus() {
        let mut n = 0;
        for entry in std::fs::read_dir(corpus_dir()).expect("corpus directory exists") {
            let path = entry.expect("readable entry").path();
            let data = std::fs::read(&path).expect("readable corpus file");
            fuzz_decode(&data);
            n += 1;
        }
        assert!(n >= 20, "corpus has only {n} files");
    }

    fn enc(p: &Packet, protocol: Protocol) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(p, protocol, &mut out).expect("encodes");
        out.to_vec()
    }

    fn corpus_entries() -> Vec<(&'static str, Vec<u8>)> {
        use Protocol::{V311, V5};
        let will = LastWill {
            topic: "dev/1/status".into(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: WillProperties::default(),
        };
        let connect = |protocol, will: Option<LastWill>| {
            Packet::Connect(Box::new(Connect {
                protocol,
                clean_start: true,
                keep_alive: 60,
                client_id: "sensor-1".into(),
                will,
                username: Some("user".into()),
                password: Some(Bytes::from_static(b"secret")),
                properties: ConnectProperties::default(),
            }))
        };
        let mut v5_will = will.clone();
        v5_will.properties = WillProperties {
            will_delay_interval: Some(5),
            payload_format_indicator: Some(1),
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let mut connect_v5 = connect(V5, Some(v5_will));
        if let Packet::Connect(c) = &mut connect_v5 {
            c.properties = ConnectProperties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(100),
                maximum_packet_size: Some(1 << 20),
                topic_alias_maximum: Some(10),
                request_problem_information: Some(1),
                authentication_method: Some("PLAIN".into()),
                authentication_data: Some(Bytes::from_static(b"\x00u\x00p")),
                ..Default::default()
            };
        }
        let publish = |qos, props: PublishProperties| {
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: "dev/1/temp".into(),
                packet_id: (qos != QoS::AtMostOnce).then_some(42),
                properties: props.into(),
                payload: Bytes::from_static(b"21.5"),
            })
        };
        let publish_v5 = publish(
            QoS::ExactlyOnce,
            PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                topic_alias: Some(1),
                response_topic: Some("reply/1".into()),
                correlation_data: Some(Bytes::from_static(b"\x01\x02")),
                user_properties: vec![("a".into(), "b".into())],
                subscription_identifiers: vec![1, 300],
                content_type: Some("text/plain".into()),
            },
        );
        let subscribe = |protocol: Protocol| {
            let v5 = protocol.is_v5();
            Packet::Subscribe(Subscribe {
                packet_id: 7,
                properties: if v5 {
                    SubscribeProperties {
                        subscription_identifier: Some(9),
                        user_properties: vec![],
                    }
                } else {
                    Default::default()
                },
                filters: vec![
                    (
                        "dev/+/temp".into(),
                        SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            no_local: v5,
                            retain_as_published: v5,
                            retain_handling: if v5 {
                                RetainHandling::DoNotSend
                            } else {
                                RetainHandling::SendAtSubscribe
                            },
                        },
                    ),
                    ("$share/g/dev/#".into(), SubscriptionOptions::default()),
                ],
            })
        };
        let suback = |codes: Vec<u8>| {
            Packet::SubAck(SubAck {
                packet_id: 7,
                properties: AckProperties::default(),
                reason_codes: codes,
            })
        };
        let unsubscribe = Packet::Unsubscribe(Unsubscribe {
            packet_id: 8,
            user_properties: vec![],
            filters: vec!["dev/+/temp".into(), "#".into()],
        });
        let connack_v5 = Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            reason_code: 0,
            properties: ConnAckProperties {
                receive_maximum: Some(20),
                maximum_qos: Some(1),
                assigned_client_identifier: Some("auto-1".into()),
                topic_alias_maximum: Some(16),
                shared_subscription_available: Some(1),
                server_keep_alive: Some(30),
                ..Default::default()
            },
        }));
        let connack_311 = Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            reason_code: 0,
            properties: Default::default(),
        }));
        let disconnect_v5 = Packet::Disconnect(Box::new(Disconnect {
            reason_code: reason::SERVER_SHUTTING_DOWN,
            properties: DisconnectProperties {
                reason_string: Some("bye".into()),
                server_reference: Some("other:1883".into()),
                ..Default::default()
            },
        }));
        let auth = Packet::Auth(Box::new(Auth {
            reason_code: reason::CONTINUE_AUTHENTICATION,
            properties: AuthProperties {
                authentication_method: Some("SCRAM-SHA-1".into()),
                authentication_data: Some(Bytes::from_static(b"nonce")),
                ..Default::default()
            },
        }));
        let puback_v5 = Packet::PubAck(PubResponse {
            packet_id: 42,
            reason_code: reason::NO_MATCHING_SUBSCRIBERS,
            properties: AckProperties {
                reason_string: Some("none".into()),
                user_properties: vec![],
            },
        });

        let mut v = vec![
            (
                "v311-connect",
                enc(&connect(V311, Some(will.clone())), V311),
            ),
            ("v311-connect-min", enc(&connect(V311, None), V311)),
            ("v5-connect", enc(&connect_v5, V5)),
            ("v311-connack", enc(&connack_311, V311)),
            ("v5-connack", enc(&connack_v5, V5)),
            (
                "v311-publish-qos0",
                enc(&publish(QoS::AtMostOnce, Default::default()), V311),
            ),
            (
                "v311-publish-qos1",
                enc(&publish(QoS::AtLeastOnce, Default::default()), V311),
            ),
            ("v5-publish-props", enc(&publish_v5, V5)),
            (
                "v311-puback",
                enc(&Packet::PubAck(PubResponse::new(42, 0)), V311),
            ),
            (
                "v311-pubrec",
                enc(&Packet::PubRec(PubResponse::new(42, 0)), V311),
            ),
            (
                "v311-pubrel",
                enc(&Packet::PubRel(PubResponse::new(42, 0)), V311),
            ),
            (
                "v311-pubcomp",
                enc(&Packet::PubComp(PubResponse::new(42, 0)), V311),
            ),
            ("v5-puback-props", enc(&puback_v5, V5)),
            (
                "v5-pubrel-reason",
                enc(&Packet::PubRel(PubResponse::new(42, 0x92)), V5),
            ),
            ("v311-subscribe", enc(&subscribe(V311), V311)),
            ("v5-subscribe", enc(&subscribe(V5), V5)),
            ("v311-suback", enc(&suback(vec![0, 1, 0x80]), V311)),
            ("v5-suback", enc(&suback(vec![1, 0x87, 0xA2]), V5)),
            ("v311-unsubscribe", enc(&unsubscribe, V311)),
            (
                "v311-unsuback",
                enc(
                    &Packet::UnsubAck(UnsubAck {
                        packet_id: 8,
                        properties: Default::default(),
                        reason_codes: vec![],
                    }),
                    V311,
                ),
            ),
            (
                "v5-unsuback",
                enc(
                    &Packet::UnsubAck(UnsubAck {
                        packet_id: 8,
                        properties: Default::default(),
                        reason_codes: vec![0, 0x11],
                    }),
                    V5,
                ),
            ),
            ("pingreq", enc(&Packet::PingReq, V311)),
            ("pingresp", enc(&Packet::PingResp, V311)),
            (
                "v311-disconnect",
                enc(&Packet::Disconnect(Box::default()), V311),
            ),
            ("v5-disconnect-props", enc(&disconnect_v5, V5)),
            ("v5-auth", enc(&auth, V5)),
            // Long-form encodings the codec normalises.
            (
                "v5-puback-long-form",
                vec![0x40, 0x04, 0x00, 0x01, 0x00, 0x00],
            ),
            ("v5-disconnect-long-form", vec![0xE0, 0x02, 0x00, 0x00]),
            (
                "v31-connect-mqisdp",
                vec![
                    0x10, 0x12, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00,
                    0x3C, 0x00, 0x04, b'c', b'l', b'i', b'd',
                ],
            ),
        ];
        // A stream of several packets, as after a CONNECT.
        let mut stream = enc(&connect(V5, None), V5);
        stream.extend(enc(&publish_v5, V5));
        stream.extend(enc(&Packet::PingReq, V5));
        stream.extend(enc(&disconnect_v5, V5));
        v.push(("v5-stream", stream));
        // Broken ones.
        let full = enc(&publish_v5, V5);
        v.push(("v5-publish-truncated", full[..full.len() / 2].to_vec()));
        let mut garbled = enc(&connect_v5, V5);
        garbled[12] ^= 0xff;
        v.push(("v5-connect-garbled", garbled));
        v.push((
            "bad-remaining-length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ));
        v.push((
            "bad-flags-subscribe",
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ));
        v.push((
            "publish-qos3",
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
        ));
        v.push(("publish-bad-utf8", vec![0x30, 0x04, 0x00, 0x02, 0xC3, 0x28]));
        v.push((
            "v5-dup-property",
            vec![
                0x30, 0x0A, 0x00, 0x01, b'a', 0x06, 0x23, 0x00, 0x01, 0x23, 0x00, 0x02,
            ],
        ));
        v.push((
            "http-request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ));
        v
    }

    /// Regenerate the corpus: `cargo test -p mqtt-codec -- --ignored write_corpus`.
    #[test]
    #[ignore]
    fn write_corpus() {
        let dir = corpus_dir();
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        for (name, data) in corpus_entries() {
            std::fs::write(dir.join(name), data).expect("write corpus file");
        }
    }

    #[test]
    fn corpus_is_up_to_date() {
        for (name, data) in corpus_entries() {
            let on_disk = std::fs::read(corpus_dir().join(name)).expect("corpus file exists");
            assert_eq!(on_disk, data, "{name} is stale; rerun write_corpus");
        }
    }
}
