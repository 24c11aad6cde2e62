use crate::properties::{len_user, put_user};
use crate::{
    reason, Auth, ConnAck, Connect, Disconnect, EncodeError, Packet, Protocol, PubResponse,
    Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe, MAX_REMAINING_LENGTH,
};
use bytes::{BufMut, BytesMut};

pub(crate) fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Callers guarantee `v <= MAX_REMAINING_LENGTH`.
pub(crate) fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            return;
        }
    }
}

pub(crate) fn put_bin(out: &mut BytesMut, b: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(b.len()).map_err(|_| EncodeError::StringTooLong)?;
    out.put_u16(len);
    out.put_slice(b);
    Ok(())
}

pub(crate) fn put_str(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    put_bin(out, s.as_bytes())
}

/// A property block with its length prefix.
fn props_block(props_len: usize) -> usize {
    varint_len(props_len) + props_len
}

/// Append the wire form of `packet` for `protocol` to `out`.
///
/// MQTT 5 only fields are dropped for 3.1.1; an MQTT 5 only packet (AUTH) for
/// 3.1.1 is an error. A CONNECT is always encoded in its own
/// [`Connect::protocol`], since that is what it announces. On error nothing
/// is left appended to `out`.
pub fn encode(packet: &Packet, protocol: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = out.len();
    let r = encode_inner(packet, protocol, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// The total size in bytes (fixed header included) `packet` would take.
pub fn encoded_len(packet: &Packet, protocol: Protocol) -> usize {
    let remaining = sizes(packet, protocol.is_v5()).0;
    1 + varint_len(remaining) + remaining
}

/// `(remaining length, length of the packet's main property block)`.
fn sizes(packet: &Packet, v5: bool) -> (usize, usize) {
    match packet {
        Packet::Connect(c) => connect_sizes(c),
        Packet::ConnAck(c) => {
            if v5 {
                let p = c.properties.encoded_len();
                (2 + props_block(p), p)
            } else {
                (2, 0)
            }
        }
        Packet::Publish(p) => publish_sizes(p, v5),
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
            pub_response_sizes(p, v5)
        }
        Packet::Subscribe(s) => {
            let p = if v5 { s.properties.encoded_len() } else { 0 };
            let filters: usize = s.filters.iter().map(|(f, _)| 3 + f.len()).sum();
            (2 + if v5 { props_block(p) } else { 0 } + filters, p)
        }
        Packet::SubAck(s) => {
            let p = if v5 { s.properties.encoded_len() } else { 0 };
            (
                2 + if v5 { props_block(p) } else { 0 } + s.reason_codes.len(),
                p,
            )
        }
        Packet::Unsubscribe(u) => {
            let p = if v5 { len_user(&u.user_properties) } else { 0 };
            let filters: usize = u.filters.iter().map(|f| 2 + f.len()).sum();
            (2 + if v5 { props_block(p) } else { 0 } + filters, p)
        }
        Packet::UnsubAck(u) => {
            if v5 {
                let p = u.properties.encoded_len();
                (2 + props_block(p) + u.reason_codes.len(), p)
            } else {
                (2, 0)
            }
        }
        Packet::PingReq | Packet::PingResp => (0, 0),
        Packet::Disconnect(d) => {
            if v5 {
                short_form_sizes(d.reason_code, d.properties.encoded_len())
            } else {
                (0, 0)
            }
        }
        Packet::Auth(a) => short_form_sizes(a.reason_code, a.properties.encoded_len()),
    }
}

/// DISCONNECT and AUTH omit the reason code when it is 0 and there are no
/// properties, and the property length when there are no properties.
fn short_form_sizes(reason_code: u8, props: usize) -> (usize, usize) {
    match (reason_code, props) {
        (0, 0) => (0, 0),
        (_, 0) => (1, 0),
        _ => (1 + props_block(props), props),
    }
}

fn pub_response_sizes(p: &PubResponse, v5: bool) -> (usize, usize) {
    if !v5 {
        return (2, 0);
    }
    let props = p.properties.encoded_len();
    match (p.reason_code, props) {
        (0, 0) => (2, 0),
        (_, 0) => (3, 0),
        _ => (3 + props_block(props), props),
    }
}

fn publish_sizes(p: &Publish, v5: bool) -> (usize, usize) {
    let props = if v5 { p.properties.encoded_len() } else { 0 };
    let mut rem = 2 + p.topic.len() + p.payload.len();
    if p.qos != QoS::AtMostOnce {
        rem += 2;
    }
    if v5 {
        rem += props_block(props);
    }
    (rem, props)
}

fn connect_sizes(c: &Connect) -> (usize, usize) {
    let v5 = c.protocol.is_v5();
    // name "MQTT" (6) + level (1) + flags (1) + keep alive (2)
    let mut rem = 10 + 2 + c.client_id.len();
    let props = if v5 { c.properties.encoded_len() } else { 0 };
    if v5 {
        rem += props_block(props);
    }
    if let Some(w) = &c.will {
        if v5 {
            rem += props_block(w.properties.encoded_len());
        }
        rem += 4 + w.topic.len() + w.payload.len();
    }
    if let Some(u) = &c.username {
        rem += 2 + u.len();
    }
    if let Some(p) = &c.password {
        rem += 2 + p.len();
    }
    (rem, props)
}

fn encode_inner(
    packet: &Packet,
    protocol: Protocol,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = protocol.is_v5();
    if !v5 && matches!(packet, Packet::Auth(_)) {
        return Err(EncodeError::NotInProtocol("AUTH"));
    }
    let (remaining, props) = sizes(packet, v5);
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge(remaining));
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    let first = match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => 0x30 | ((p.dup as u8) << 3) | ((p.qos as u8) << 1) | (p.retain as u8),
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xA2,
        Packet::UnsubAck(_) => 0xB0,
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(_) => 0xE0,
        Packet::Auth(_) => 0xF0,
    };
    out.put_u8(first);
    put_varint(out, remaining);
    match packet {
        Packet::Connect(c) => write_connect(c, props, out),
        Packet::ConnAck(c) => write_connack(c, v5, props, out),
        Packet::Publish(p) => write_publish(p, v5, props, out),
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
            write_pub_response(p, remaining, props, out)
        }
        Packet::Subscribe(s) => write_subscribe(s, v5, props, out),
        Packet::SubAck(s) => write_suback(s, v5, props, out),
        Packet::Unsubscribe(u) => write_unsubscribe(u, v5, props, out),
        Packet::UnsubAck(u) => write_unsuback(u, v5, props, out),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => write_disconnect(d, remaining, props, out),
        Packet::Auth(a) => write_auth(a, remaining, props, out),
    }
}

fn write_connect(c: &Connect, props: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    if !v5 && c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::Invalid(
            "MQTT 3.1.1 does not allow a password without a user name",
        ));
    }
    put_str(out, "MQTT")?;
    out.put_u8(if v5 { 5 } else { 4 });
    let mut flags = (c.clean_start as u8) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3) | ((w.retain as u8) << 5);
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if v5 {
        put_varint(out, props);
        c.properties.write(out)?;
    }
    put_str(out, &c.client_id)?;
    if let Some(w) = &c.will {
        if v5 {
            put_varint(out, w.properties.encoded_len());
            w.properties.write(out)?;
        }
        put_str(out, &w.topic)?;
        put_bin(out, &w.payload)?;
    }
    if let Some(u) = &c.username {
        put_str(out, u)?;
    }
    if let Some(p) = &c.password {
        put_bin(out, p)?;
    }
    Ok(())
}

fn write_connack(
    c: &ConnAck,
    v5: bool,
    props: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    out.put_u8(c.session_present as u8);
    if v5 {
        out.put_u8(c.reason_code);
        put_varint(out, props);
        c.properties.write(out)
    } else {
        out.put_u8(reason::v311_connack_code(c.reason_code));
        Ok(())
    }
}

fn write_publish(
    p: &Publish,
    v5: bool,
    props: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if p.topic.is_empty() && (!v5 || p.properties.topic_alias.is_none()) {
        return Err(EncodeError::Invalid(
            "empty topic name is only allowed with a topic alias",
        ));
    }
    put_str(out, &p.topic)?;
    if p.qos != QoS::AtMostOnce {
        match p.packet_id {
            Some(id) if id != 0 => out.put_u16(id),
            _ => {
                return Err(EncodeError::Invalid(
                    "QoS > 0 PUBLISH needs a non-zero packet identifier",
                ))
            }
        }
    }
    if v5 {
        put_varint(out, props);
        p.properties.write(out)?;
    }
    out.put_slice(&p.payload);
    Ok(())
}

fn write_pub_response(
    p: &PubResponse,
    remaining: usize,
    props: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    out.put_u16(p.packet_id);
    if remaining > 2 {
        out.put_u8(p.reason_code);
    }
    if remaining > 3 {
        put_varint(out, props);
        p.properties.write(out)?;
    }
    Ok(())
}

fn write_subscribe(
    s: &Subscribe,
    v5: bool,
    props: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    out.put_u16(s.packet_id);
    if v5 {
        put_varint(out, props);
        s.properties.write(out)?;
    }
    for (filter, opts) in &s.filters {
        put_str(out, filter)?;
        out.put_u8(if v5 { opts.to_byte() } else { opts.qos as u8 });
    }
    Ok(())
}

fn write_suback(s: &SubAck, v5: bool, props: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    out.put_u16(s.packet_id);
    if v5 {
        put_varint(out, props);
        s.properties.write(out)?;
        out.put_slice(&s.reason_codes);
    } else {
        for &c in &s.reason_codes {
            out.put_u8(if c <= 2 { c } else { 0x80 });
        }
    }
    Ok(())
}

fn write_unsubscribe(
    u: &Unsubscribe,
    v5: bool,
    props: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    out.put_u16(u.packet_id);
    if v5 {
        put_varint(out, props);
        put_user(out, &u.user_properties)?;
    }
    for f in &u.filters {
        put_str(out, f)?;
    }
    Ok(())
}

fn write_unsuback(
    u: &UnsubAck,
    v5: bool,
    props: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    out.put_u16(u.packet_id);
    if v5 {
        put_varint(out, props);
        u.properties.write(out)?;
        out.put_slice(&u.reason_codes);
    }
    Ok(())
}

fn write_auth(
    a: &Auth,
    remaining: usize,
    props: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if remaining > 0 {
        out.put_u8(a.reason_code);
    }
    if remaining > 1 {
        put_varint(out, props);
        a.properties.write(out)?;
    }
    Ok(())
}

fn write_disconnect(
    d: &Disconnect,
    remaining: usize,
    props: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if remaining > 0 {
        out.put_u8(d.reason_code);
    }
    if remaining > 1 {
        put_varint(out, props);
        d.properties.write(out)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
