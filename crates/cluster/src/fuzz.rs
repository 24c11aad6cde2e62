//! The body of the fuzz target (`fuzz/`), kept in the library so that plain
//! `cargo test` replays the checked-in corpus (`fuzz/corpus/frame`) on
//! stable Rust. What comes off the fabric is another node's bytes: decoding
//! must refuse what is not a frame, never panic, and what decodes must
//! encode back to the same frame.

use crate::{frame, subject};
use bytes::Bytes;
use tokio::time::Instant;

/// Decode `data` as a frame (and, as text, as an encoded topic key).
/// Invariants: a decoded frame re-encodes to bytes that decode to the
/// same message; a decoded key encodes back to itself.
pub fn frame(data: &[u8]) {
    let now = Instant::now();
    if let Ok(f) = frame::decode(Bytes::copy_from_slice(data), now) {
        let again = frame::encode(f.origin, f.seq, &f.message, now);
        let g = frame::decode(again.clone(), now).expect("our own encoding decodes");
        assert_eq!((g.origin, g.seq), (f.origin, f.seq));
        assert_eq!(g.message.topic, f.message.topic);
        assert_eq!(g.message.payload, f.message.payload);
        assert_eq!(g.message.properties, f.message.properties);
        assert_eq!(frame::encode(g.origin, g.seq, &g.message, now), again);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(topic) = subject::decode_topic(text) {
            assert_eq!(
                subject::encode_topic(&topic),
                text,
                "decoding is not injective"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use m2mhub_broker::message::Message;
    use mqtt_codec::{PublishProperties, QoS};
    use std::path::PathBuf;

    fn corpus() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame")
    }

    #[test]
    fn the_corpus_replays() {
        let mut n = 0;
        for entry in std::fs::read_dir(corpus()).expect("corpus directory exists") {
            let path = entry.expect("corpus entry").path();
            frame(&std::fs::read(&path).expect("readable corpus file"));
            n += 1;
        }
        assert!(n >= 6, "the frame corpus has only {n} files");
    }

    /// Writes the seed corpus (run once with `--ignored` after changing
    /// the frame format).
    #[test]
    #[ignore = "writes fuzz/corpus/frame"]
    fn write_corpus() {
        let now = Instant::now();
        let msg = |topic: &str, payload: &[u8], qos, retain, properties| Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain,
            properties,
            expires_at: None,
            publisher: 0,
        };
        let full = PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("r/1".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into())],
            message_expiry_interval: Some(60),
            ..Default::default()
        };
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            (
                "qos0",
                frame::encode(
                    1,
                    1,
                    &msg("a/b", b"x", QoS::AtMostOnce, false, Default::default()),
                    now,
                )
                .to_vec(),
            ),
            (
                "qos1-retained",
                frame::encode(
                    2,
                    9,
                    &msg(
                        "devices/m-1/telemetry",
                        b"{\"t\":21}",
                        QoS::AtLeastOnce,
                        true,
                        Default::default(),
                    ),
                    now,
                )
                .to_vec(),
            ),
            (
                "qos2-properties",
                frame::encode(
                    3,
                    7,
                    &msg("cmd/x", b"", QoS::ExactlyOnce, false, full.into()),
                    now,
                )
                .to_vec(),
            ),
            (
                "truncated",
                frame::encode(
                    4,
                    1,
                    &msg("a", b"p", QoS::AtMostOnce, false, Default::default()),
                    now,
                )[..12]
                    .to_vec(),
            ),
            (
                "key",
                subject::encode_topic("site 1/x.y/$SYS/_").into_bytes(),
            ),
            ("bad-key", b"_zz.a".to_vec()),
        ];
        std::fs::create_dir_all(corpus()).expect("corpus directory");
        for (name, bytes) in seeds {
            std::fs::write(corpus().join(name), bytes).expect("write seed");
        }
    }
}
