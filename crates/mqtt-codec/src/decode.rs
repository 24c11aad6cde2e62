use crate::topic::{self, TopicError};
use crate::{
    reason, AckProperties, Auth, AuthProperties, BoxedProperties, ConnAck, ConnAckProperties,
    Connect, ConnectProperties, DecodeError, Disconnect, DisconnectProperties, LastWill, Packet,
    Protocol, PubResponse, Publish, PublishProperties, QoS, SubAck, Subscribe, SubscribeProperties,
    SubscriptionOptions, UnsubAck, Unsubscribe, WillProperties,
};
use bytes::{Buf, Bytes, BytesMut};

const TRUNCATED: DecodeError = DecodeError::Malformed("packet shorter than its fields");
const TRAILING: DecodeError = DecodeError::Malformed("unexpected bytes after the packet's fields");

/// A cursor over one packet body. Holding `Bytes` (not `&[u8]`) lets binary
/// fields and the PUBLISH payload be handed out as zero-copy slices.
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    fn slice(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(TRUNCATED);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.slice(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.slice(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.slice(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match read_varint(&self.buf[self.pos..])? {
            Some((v, n)) => {
                self.pos += n;
                Ok(v as u32)
            }
            None => Err(TRUNCATED),
        }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.remaining() < n {
            return Err(TRUNCATED);
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader, DecodeError> {
        Ok(Reader::new(self.bytes(n)?))
    }

    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        let s = self.slice(n)?;
        let s = std::str::from_utf8(s).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
        // A byte scan: U+0000 is the only character with a zero byte in
        // UTF-8 (and cheaper to find than through `str::contains`).
        if s.as_bytes().contains(&0) {
            return Err(DecodeError::Malformed("string contains U+0000"));
        }
        Ok(s.to_owned())
    }

    /// Everything left, by moving the buffer out rather than slicing it:
    /// a slice of shared `Bytes` costs an atomic increment now and a
    /// decrement when the reader drops, on every PUBLISH.
    fn rest(&mut self) -> Bytes {
        let mut b = std::mem::take(&mut self.buf);
        b.advance(self.pos);
        self.pos = 0;
        b
    }

    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::Protocol("packet identifier 0")),
            id => Ok(id),
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(TRAILING)
        }
    }
}

/// Read a variable byte integer; `Ok(None)` if `buf` ends inside it.
///
/// Non-minimal encodings are refused (section 1.5.5 requires the minimum
/// number of bytes) so that every accepted packet re-encodes to itself.
fn read_varint(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(DecodeError::Malformed(
                    "variable byte integer not minimally encoded",
                ));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

/// Check the packet type and its reserved flag bits (section 2.1.3).
fn check_first_byte(first: u8, protocol: Protocol) -> Result<(), DecodeError> {
    let flags = first & 0x0f;
    let expected = match first >> 4 {
        0 => return Err(DecodeError::Malformed("reserved packet type 0")),
        3 => return Ok(()),
        6 | 8 | 10 => 0b0010,
        15 if !protocol.is_v5() => {
            return Err(DecodeError::Malformed("AUTH is not an MQTT 3.1.1 packet"))
        }
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::Malformed("invalid fixed header flags"));
    }
    Ok(())
}

/// Decode one packet from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet (nothing is
/// consumed), `Ok(Some(packet))` after consuming exactly that packet's bytes.
/// `protocol` is the version negotiated by CONNECT (ignored when decoding a
/// CONNECT, whose version is read from the packet itself). A packet whose
/// total size exceeds `max_packet_size` is refused with
/// [`DecodeError::PacketTooLarge`] as soon as its fixed header is readable.
///
/// After an error the stream cannot be resynchronised, so the failing
/// packet's bytes may or may not have been consumed.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // Checked before the length so that garbage (e.g. an HTTP request) is
    // refused immediately instead of waiting for a bogus body.
    check_first_byte(first, protocol)?;
    let Some((remaining, len_len)) = read_varint(&buf[1..])? else {
        return Ok(None);
    };
    let total = 1 + len_len + remaining;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let mut body = buf.split_to(total).freeze();
    // Past the fixed header in place (`split_off` would cost a reference
    // count increment and decrement).
    body.advance(1 + len_len);
    decode_body(first, Reader::new(body), protocol).map(Some)
}

fn decode_body(first: u8, mut r: Reader, protocol: Protocol) -> Result<Packet, DecodeError> {
    let v5 = protocol.is_v5();
    let packet = match first >> 4 {
        1 => Packet::Connect(Box::new(decode_connect(&mut r)?)),
        2 => Packet::ConnAck(Box::new(decode_connack(&mut r, v5)?)),
        3 => Packet::Publish(decode_publish(first & 0x0f, &mut r, v5)?),
        4 => Packet::PubAck(decode_pub_response(&mut r, v5, PUBACK_CODES)?),
        5 => Packet::PubRec(decode_pub_response(&mut r, v5, PUBACK_CODES)?),
        6 => Packet::PubRel(decode_pub_response(&mut r, v5, PUBREL_CODES)?),
        7 => Packet::PubComp(decode_pub_response(&mut r, v5, PUBREL_CODES)?),
        8 => Packet::Subscribe(decode_subscribe(&mut r, v5)?),
        9 => Packet::SubAck(decode_suback(&mut r, v5)?),
        10 => Packet::Unsubscribe(decode_unsubscribe(&mut r, v5)?),
        11 => Packet::UnsubAck(decode_unsuback(&mut r, v5)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect(Box::new(decode_disconnect(&mut r, v5)?)),
        _ => Packet::Auth(Box::new(decode_auth(&mut r)?)),
    };
    r.finish()?;
    Ok(packet)
}

pub(crate) const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
pub(crate) const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
pub(crate) const PUBREL_CODES: &[u8] = &[0x00, 0x92];
pub(crate) const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
pub(crate) const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
pub(crate) const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
pub(crate) const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

fn reason_code(r: &mut Reader, allowed: &[u8]) -> Result<u8, DecodeError> {
    let code = r.u8()?;
    if !allowed.contains(&code) {
        return Err(DecodeError::Malformed(
            "reason code not valid for this packet",
        ));
    }
    Ok(code)
}

fn topic_err(e: TopicError) -> &'static str {
    match e {
        TopicError::Empty => "topic is empty",
        TopicError::TooLong => "topic is too long",
        TopicError::Nul => "topic contains NUL",
        TopicError::WildcardInName => "topic name contains a wildcard",
        TopicError::MisplacedMultiLevel => "misplaced '#'",
        TopicError::MisplacedSingleLevel => "misplaced '+'",
        TopicError::BadShare => "malformed shared subscription",
    }
}

fn check_utf8_payload(payload: &[u8], indicator: Option<u8>) -> Result<(), DecodeError> {
    if indicator == Some(1) && std::str::from_utf8(payload).is_err() {
        return Err(DecodeError::PayloadFormatInvalid);
    }
    Ok(())
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.string()?;
    let level = r.u8()?;
    let protocol = match (name.as_str(), level) {
        ("MQTT", 4) | ("MQIsdp", 3) => Protocol::V311,
        ("MQTT", 5) => Protocol::V5,
        _ => return Err(DecodeError::UnsupportedProtocolVersion(level)),
    };
    let v5 = protocol.is_v5();
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS/retain set without will flag",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::Malformed(
            "password flag without user name flag",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = if v5 {
        ConnectProperties::decode(r)?
    } else {
        ConnectProperties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let wprops = if v5 {
            WillProperties::decode(r)?
        } else {
            WillProperties::default()
        };
        let topic = r.string()?;
        topic::validate_topic_name(&topic)
            .map_err(|e| DecodeError::TopicNameInvalid(topic_err(e)))?;
        let payload = r.binary()?;
        check_utf8_payload(&payload, wprops.payload_format_indicator)?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties: wprops,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(r: &mut Reader, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xfe != 0 {
        return Err(DecodeError::Malformed("reserved CONNACK flags set"));
    }
    let (reason_code, properties) = if v5 {
        let code = reason_code(r, CONNACK_CODES)?;
        (code, ConnAckProperties::decode(r)?)
    } else {
        let code = r.u8()?;
        if code > 5 {
            return Err(DecodeError::Malformed("CONNACK return code above 5"));
        }
        (
            reason::v5_from_v311_connack(code),
            ConnAckProperties::default(),
        )
    };
    Ok(ConnAck {
        session_present: flags & 0x01 != 0,
        reason_code,
        properties,
    })
}

fn decode_publish(flags: u8, r: &mut Reader, v5: bool) -> Result<Publish, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
    let dup = flags & 0x08 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.packet_id()?)
    };
    let properties: BoxedProperties = if v5 {
        PublishProperties::decode(r)?.into()
    } else {
        BoxedProperties::default()
    };
    if topic.is_empty() {
        if properties.topic_alias.is_none() {
            return Err(DecodeError::TopicNameInvalid(
                "empty topic name without a topic alias",
            ));
        }
    } else {
        topic::validate_topic_name(&topic)
            .map_err(|e| DecodeError::TopicNameInvalid(topic_err(e)))?;
    }
    let payload = r.rest();
    check_utf8_payload(&payload, properties.payload_format_indicator)?;
    Ok(Publish {
        dup,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        properties,
        payload,
    })
}

fn decode_pub_response(r: &mut Reader, v5: bool, codes: &[u8]) -> Result<PubResponse, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut p = PubResponse::new(packet_id, 0);
    if v5 && !r.is_empty() {
        p.reason_code = reason_code(r, codes)?;
        if !r.is_empty() {
            p.properties = AckProperties::decode(r)?;
        }
    }
    Ok(p)
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        SubscribeProperties::decode(r)?
    } else {
        SubscribeProperties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        topic::validate_topic_filter(&filter)
            .map_err(|e| DecodeError::TopicFilterInvalid(topic_err(e)))?;
        let b = r.u8()?;
        let options = if v5 {
            let o = SubscriptionOptions::from_byte(b)
                .ok_or(DecodeError::Malformed("invalid subscription options"))?;
            if o.no_local && filter.starts_with("$share/") {
                return Err(DecodeError::Protocol("no local on a shared subscription"));
            }
            o
        } else {
            if b & 0xfc != 0 {
                return Err(DecodeError::Malformed(
                    "reserved subscription option bits set",
                ));
            }
            SubscriptionOptions {
                qos: QoS::from_u8(b).ok_or(DecodeError::Malformed("requested QoS 3"))?,
                ..SubscriptionOptions::default()
            }
        };
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

fn decode_suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        AckProperties::decode(r)?
    } else {
        AckProperties::default()
    };
    let codes: &[u8] = if v5 { SUBACK_CODES } else { &[0, 1, 2, 0x80] };
    let mut reason_codes = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reason_codes.push(reason_code(r, codes)?);
    }
    if reason_codes.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without reason codes"));
    }
    Ok(SubAck {
        packet_id,
        properties,
        reason_codes,
    })
}

fn decode_unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let user_properties = if v5 {
        crate::properties::decode_user_only(r)?
    } else {
        Vec::new()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        topic::validate_topic_filter(&filter)
            .map_err(|e| DecodeError::TopicFilterInvalid(topic_err(e)))?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        user_properties,
        filters,
    })
}

fn decode_unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    if !v5 {
        return Ok(UnsubAck {
            packet_id,
            properties: AckProperties::default(),
            reason_codes: Vec::new(),
        });
    }
    let properties = AckProperties::decode(r)?;
    let mut reason_codes = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reason_codes.push(reason_code(r, UNSUBACK_CODES)?);
    }
    if reason_codes.is_empty() {
        return Err(DecodeError::Protocol("UNSUBACK without reason codes"));
    }
    Ok(UnsubAck {
        packet_id,
        properties,
        reason_codes,
    })
}

fn decode_disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::default();
    if v5 && !r.is_empty() {
        d.reason_code = reason_code(r, DISCONNECT_CODES)?;
        if !r.is_empty() {
            d.properties = DisconnectProperties::decode(r)?;
        }
    }
    Ok(d)
}

fn decode_auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut a = Auth::default();
    if !r.is_empty() {
        a.reason_code = reason_code(r, AUTH_CODES)?;
        if !r.is_empty() {
            a.properties = AuthProperties::decode(r)?;
        }
    }
    Ok(a)
}

/// Peek at a buffer that starts with a CONNECT packet and report its protocol
/// version, so that a server can reply to a malformed CONNECT in the client's
/// own version. `None` if the buffer is too short or not a CONNECT.
///
/// Any level other than 5 is reported as 3.1.1: a client speaking an unknown
/// version is answered with a 3.1.1 CONNACK (return code 1), as 3.1.1
/// section 3.1.2.2 prescribes.
pub fn decode_connect_protocol(buf: &[u8]) -> Option<Protocol> {
    if *buf.first()? != 0x10 {
        return None;
    }
    let (_, len_len) = read_varint(buf.get(1..)?).ok()??;
    let rest = buf.get(1 + len_len..)?;
    let name_len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let level = *rest.get(2 + name_len)?;
    Some(if level == 5 {
        Protocol::V5
    } else {
        Protocol::V311
    })
}

#[cfg(test)]
mod tests;
