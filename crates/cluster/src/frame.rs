//! One MQTT application message as it crosses the fabric between nodes
//! (and as a retained message's value in the key-value bucket).
//!
//! ```text
//! u8  version (1)
//! u8  flags: bits 0-1 QoS, bit 2 retain
//! u64 origin node, u64 sequence   (the message's id across the cluster)
//! u32 message expiry interval left, 0 = none
//! u16 topic length, topic
//! properties: u8 tag, then per tag (0 ends the list)
//!     1 payload format indicator: u8
//!     3 content type, 8 response topic, 9 correlation data: u16 length, bytes
//!     38 user property: u16 length, name, u16 length, value
//! payload: the rest
//! ```
//!
//! Decoding is strict: a frame from a node of another version, or
//! truncated, is an error and dropped with a count, never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use m2mhub_broker::message::Message;
use mqtt_codec::{PublishProperties, QoS};
use std::time::Duration;
use tokio::time::Instant;

const VERSION: u8 = 1;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame version {0} is not supported (this node speaks version 1)")]
    Version(u8),
    #[error("frame truncated")]
    Truncated,
    #[error("frame has an invalid QoS")]
    QoS,
    #[error("frame has a string that is not UTF-8")]
    Utf8,
    #[error("frame has an unknown property tag {0}")]
    Tag(u8),
}

/// A message and its cluster-wide id.
#[derive(Debug)]
pub struct Frame {
    pub origin: u64,
    pub seq: u64,
    pub message: Message,
}

/// Encode `msg` with its id. Strings longer than 65,535 bytes cannot occur
/// in MQTT (its own limit), so `u16` lengths hold.
pub fn encode(origin: u64, seq: u64, msg: &Message, now: Instant) -> Bytes {
    let p = &msg.properties;
    let mut b = BytesMut::with_capacity(32 + msg.topic.len() + msg.payload.len());
    b.put_u8(VERSION);
    b.put_u8(msg.qos as u8 | (u8::from(msg.retain) << 2));
    b.put_u64(origin);
    b.put_u64(seq);
    b.put_u32(msg.remaining_expiry(now).unwrap_or(0));
    put_str(&mut b, msg.topic.as_bytes());
    if let Some(f) = p.payload_format_indicator {
        b.put_u8(1);
        b.put_u8(f);
    }
    if let Some(ct) = &p.content_type {
        b.put_u8(3);
        put_str(&mut b, ct.as_bytes());
    }
    if let Some(rt) = &p.response_topic {
        b.put_u8(8);
        put_str(&mut b, rt.as_bytes());
    }
    if let Some(cd) = &p.correlation_data {
        b.put_u8(9);
        put_str(&mut b, cd);
    }
    for up in &p.user_properties {
        b.put_u8(38);
        put_str(&mut b, up.0.as_bytes());
        put_str(&mut b, up.1.as_bytes());
    }
    b.put_u8(0);
    b.put_slice(&msg.payload);
    b.freeze()
}

fn put_str(b: &mut BytesMut, s: &[u8]) {
    let n = s.len().min(usize::from(u16::MAX));
    b.put_u16(n as u16);
    b.put_slice(&s[..n]);
}

/// A cursor over a frame being decoded.
struct Reader {
    buf: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, FrameError> {
        let end = self.at.checked_add(n).ok_or(FrameError::Truncated)?;
        if end > self.buf.len() {
            return Err(FrameError::Truncated);
        }
        let out = self.buf.slice(self.at..end);
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<Bytes, FrameError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| FrameError::Utf8)
    }
}

/// Decode a frame; the payload is a zero-copy slice of `buf`.
pub fn decode(buf: Bytes, now: Instant) -> Result<Frame, FrameError> {
    let mut r = Reader { buf, at: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let flags = r.u8()?;
    let qos = match flags & 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err(FrameError::QoS),
    };
    let retain = flags & 4 != 0;
    let origin = r.u64()?;
    let seq = r.u64()?;
    let expiry = r.u32()?;
    let topic = r.string()?;
    let mut properties = PublishProperties::default();
    loop {
        match r.u8()? {
            0 => break,
            1 => properties.payload_format_indicator = Some(r.u8()?),
            3 => properties.content_type = Some(r.string()?),
            8 => properties.response_topic = Some(r.string()?),
            9 => properties.correlation_data = Some(r.bytes()?),
            38 => {
                let name = r.string()?;
                let value = r.string()?;
                properties.user_properties.push((name, value));
            }
            t => return Err(FrameError::Tag(t)),
        }
    }
    if expiry > 0 {
        properties.message_expiry_interval = Some(expiry);
    }
    let payload = r.buf.slice(r.at..);
    Ok(Frame {
        origin,
        seq,
        message: Message {
            topic,
            payload,
            qos,
            retain,
            properties: properties.into(),
            expires_at: (expiry > 0).then(|| now + Duration::from_secs(u64::from(expiry))),
            publisher: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // One argument per generated field of the property test.
    #[allow(clippy::too_many_arguments)]
    fn message(
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        ct: Option<String>,
        cd: Option<Vec<u8>>,
        ups: Vec<(String, String)>,
        expiry: Option<u32>,
        now: Instant,
    ) -> Message {
        Message {
            topic,
            payload: payload.into(),
            qos: match qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            },
            retain,
            properties: PublishProperties {
                payload_format_indicator: Some(1),
                content_type: ct,
                response_topic: Some("r/t".into()),
                correlation_data: cd.map(Bytes::from),
                user_properties: ups,
                message_expiry_interval: expiry,
                ..Default::default()
            }
            .into(),
            expires_at: expiry.map(|s| now + Duration::from_secs(u64::from(s))),
            publisher: 7,
        }
    }

    proptest! {
        #[test]
        fn round_trips(
            topic in "\\PC{1,30}",
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            qos in 0u8..3,
            retain in any::<bool>(),
            ct in proptest::option::of("\\PC{0,10}"),
            cd in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            ups in proptest::collection::vec(("\\PC{0,8}", "\\PC{0,8}"), 0..3),
            expiry in proptest::option::of(1u32..100_000),
            origin in any::<u64>(),
            seq in any::<u64>(),
        ) {
            let now = Instant::now();
            let m = message(topic, payload, qos, retain, ct, cd, ups, expiry, now);
            let f = decode(encode(origin, seq, &m, now), now).expect("decodes");
            prop_assert_eq!((f.origin, f.seq), (origin, seq));
            let d = f.message;
            prop_assert_eq!(&d.topic, &m.topic);
            prop_assert_eq!(&d.payload, &m.payload);
            prop_assert_eq!(d.qos, m.qos);
            prop_assert_eq!(d.retain, m.retain);
            prop_assert_eq!(&d.properties, &m.properties);
            prop_assert_eq!(d.expires_at, m.expires_at);
            prop_assert_eq!(d.publisher, 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = decode(Bytes::from(b), Instant::now());
        }

        #[test]
        fn every_truncation_is_an_error(cut in 0usize..40) {
            let now = Instant::now();
            let m = message("a/b".into(), vec![], 1, false, Some("x".into()), None, vec![("k".into(), "v".into())], None, now);
            let full = encode(1, 2, &m, now);
            // The payload is empty, so any cut before the end is inside the header.
            let cut = cut.min(full.len() - 1);
            prop_assert!(decode(full.slice(..cut), now).is_err());
        }
    }

    #[test]
    fn other_versions_are_refused() {
        let now = Instant::now();
        let m = message("t".into(), vec![1], 0, false, None, None, vec![], None, now);
        let mut b = encode(1, 1, &m, now).to_vec();
        b[0] = 2;
        assert_eq!(
            decode(Bytes::from(b), now).unwrap_err(),
            FrameError::Version(2)
        );
    }
}
