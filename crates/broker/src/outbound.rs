//! Encoding of outgoing PUBLISH packets straight from the shared message.
//!
//! The generic codec encodes an owned `Publish`; building one per subscriber
//! would copy the topic and properties for every delivery. This encoder
//! writes the same bytes from borrowed parts, so fan-out to a thousand
//! subscribers costs a thousand small buffer writes and no allocations.

use bytes::{BufMut, BytesMut};
use mqtt_codec::{PublishProperties, QoS};

pub(crate) struct PublishOut<'a> {
    /// Empty when a topic alias already known to the client is used.
    pub topic: &'a str,
    pub packet_id: Option<u16>,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub properties: &'a PublishProperties,
    /// Remaining message expiry to announce (replaces the original value).
    pub expiry: Option<u32>,
    pub topic_alias: Option<u16>,
    pub sub_ids: &'a [u32],
    pub payload: &'a [u8],
}

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

impl PublishOut<'_> {
    fn properties_len(&self) -> usize {
        let p = self.properties;
        let mut n = 0;
        if p.payload_format_indicator.is_some() {
            n += 2;
        }
        if self.expiry.is_some() {
            n += 5;
        }
        if let Some(ct) = &p.content_type {
            n += 3 + ct.len();
        }
        if let Some(rt) = &p.response_topic {
            n += 3 + rt.len();
        }
        if let Some(cd) = &p.correlation_data {
            n += 3 + cd.len();
        }
        for id in self.sub_ids {
            n += 1 + varint_len(*id as usize);
        }
        if self.topic_alias.is_some() {
            n += 3;
        }
        for (k, v) in &p.user_properties {
            n += 5 + k.len() + v.len();
        }
        n
    }

    /// Size of the whole packet in bytes.
    pub fn len(&self, v5: bool) -> usize {
        let remaining = self.remaining_len(v5);
        1 + varint_len(remaining) + remaining
    }

    fn remaining_len(&self, v5: bool) -> usize {
        let mut n = 2 + self.topic.len() + self.payload.len();
        if self.packet_id.is_some() {
            n += 2;
        }
        if v5 {
            let p = self.properties_len();
            n += varint_len(p) + p;
        }
        n
    }

    pub fn encode(&self, v5: bool, out: &mut BytesMut) {
        let remaining = self.remaining_len(v5);
        out.reserve(1 + varint_len(remaining) + remaining);
        let header = 0x30 | ((self.dup as u8) << 3) | ((self.qos as u8) << 1) | (self.retain as u8);
        out.put_u8(header);
        put_varint(out, remaining);
        put_str(out, self.topic);
        if let Some(id) = self.packet_id {
            out.put_u16(id);
        }
        if v5 {
            put_varint(out, self.properties_len());
            let p = self.properties;
            if let Some(f) = p.payload_format_indicator {
                out.put_u8(0x01);
                out.put_u8(f);
            }
            if let Some(e) = self.expiry {
                out.put_u8(0x02);
                out.put_u32(e);
            }
            if let Some(ct) = &p.content_type {
                out.put_u8(0x03);
                put_str(out, ct);
            }
            if let Some(rt) = &p.response_topic {
                out.put_u8(0x08);
                put_str(out, rt);
            }
            if let Some(cd) = &p.correlation_data {
                out.put_u8(0x09);
                out.put_u16(cd.len() as u16);
                out.put_slice(cd);
            }
            for id in self.sub_ids {
                out.put_u8(0x0B);
                put_varint(out, *id as usize);
            }
            if let Some(a) = self.topic_alias {
                out.put_u8(0x23);
                out.put_u16(a);
            }
            for (k, v) in &p.user_properties {
                out.put_u8(0x26);
                put_str(out, k);
                put_str(out, v);
            }
        }
        out.put_slice(self.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mqtt_codec::{decode, Packet, Protocol};

    /// The hand-written encoder must produce exactly what the codec decodes.
    #[test]
    fn matches_the_codec() {
        let props = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(99),
            content_type: Some("application/json".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            ..Default::default()
        };
        for v5 in [false, true] {
            for (qos, pid) in [(QoS::AtMostOnce, None), (QoS::ExactlyOnce, Some(7))] {
                let out = PublishOut {
                    topic: "a/b",
                    packet_id: pid,
                    qos,
                    retain: true,
                    dup: pid.is_some(),
                    properties: &props,
                    expiry: Some(42),
                    topic_alias: Some(3),
                    sub_ids: &[1, 300_000],
                    payload: b"{\"x\":1}",
                };
                let mut buf = BytesMut::new();
                out.encode(v5, &mut buf);
                assert_eq!(buf.len(), out.len(v5));
                let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
                let Ok(Some(Packet::Publish(p))) = decode(&mut buf, protocol, usize::MAX) else {
                    panic!("does not decode (v5 = {v5})");
                };
                assert!(buf.is_empty());
                assert_eq!(p.topic, "a/b");
                assert_eq!(p.packet_id, pid);
                assert_eq!(p.qos, qos);
                assert!(p.retain);
                assert_eq!(p.payload, Bytes::from_static(b"{\"x\":1}"));
                if v5 {
                    assert_eq!(p.properties.message_expiry_interval, Some(42));
                    assert_eq!(p.properties.topic_alias, Some(3));
                    assert_eq!(p.properties.subscription_identifiers, vec![1, 300_000]);
                    assert_eq!(p.properties.user_properties, props.user_properties);
                    assert_eq!(p.properties.correlation_data, props.correlation_data);
                    assert_eq!(p.properties.content_type, props.content_type);
                    assert_eq!(p.properties.response_topic, props.response_topic);
                    assert_eq!(p.properties.payload_format_indicator, Some(1));
                } else {
                    assert!(p.properties.is_empty());
                }
            }
        }
    }
}
