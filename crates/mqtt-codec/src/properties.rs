//! Property encoding and decoding (MQTT 5 section 2.2.2).
//!
//! Decoding goes through one table ([`read_prop`]) that knows every property's
//! wire type and the value constraints the spec attaches to it, so the
//! per-packet decoders only have to say which properties they accept. A
//! property in the wrong packet or repeated when it may appear once is a
//! Protocol Error; a property id the spec does not define is Malformed.

use crate::decode::Reader;
use crate::encode::{put_bin, put_str, put_varint, varint_len};
use crate::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DecodeError,
    DisconnectProperties, EncodeError, PublishProperties, SubscribeProperties, UserProperty,
    WillProperties, MAX_REMAINING_LENGTH,
};
use bytes::{BufMut, Bytes, BytesMut};

pub(crate) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub(crate) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub(crate) const CONTENT_TYPE: u8 = 0x03;
pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
pub(crate) const CORRELATION_DATA: u8 = 0x09;
pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub(crate) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub(crate) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub(crate) const SERVER_KEEP_ALIVE: u8 = 0x13;
pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
pub(crate) const AUTHENTICATION_DATA: u8 = 0x16;
pub(crate) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub(crate) const WILL_DELAY_INTERVAL: u8 = 0x18;
pub(crate) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub(crate) const RESPONSE_INFORMATION: u8 = 0x1A;
pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
pub(crate) const REASON_STRING: u8 = 0x1F;
pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub(crate) const TOPIC_ALIAS: u8 = 0x23;
pub(crate) const MAXIMUM_QOS: u8 = 0x24;
pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
pub(crate) const USER_PROPERTY: u8 = 0x26;
pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub(crate) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub(crate) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub(crate) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// One decoded property, already checked against its value constraints.
pub(crate) enum Prop {
    PayloadFormatIndicator(u8),
    MessageExpiryInterval(u32),
    ContentType(String),
    ResponseTopic(String),
    CorrelationData(Bytes),
    SubscriptionIdentifier(u32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(String),
    ServerKeepAlive(u16),
    AuthenticationMethod(String),
    AuthenticationData(Bytes),
    RequestProblemInformation(u8),
    WillDelayInterval(u32),
    RequestResponseInformation(u8),
    ResponseInformation(String),
    ServerReference(String),
    ReasonString(String),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQos(u8),
    RetainAvailable(u8),
    UserProperty(String, String),
    MaximumPacketSize(u32),
    WildcardSubscriptionAvailable(u8),
    SubscriptionIdentifierAvailable(u8),
    SharedSubscriptionAvailable(u8),
}

const NOT_ALLOWED: DecodeError = DecodeError::Protocol("property not allowed in this packet");

/// Byte properties that the spec restricts to 0 or 1.
fn flag(r: &mut Reader, what: &'static str) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v > 1 {
        return Err(DecodeError::Protocol(what));
    }
    Ok(v)
}

fn nonzero_u16(r: &mut Reader, what: &'static str) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Protocol(what)),
        v => Ok(v),
    }
}

fn read_prop(r: &mut Reader) -> Result<Prop, DecodeError> {
    let id = r.varint()?;
    let id = u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property identifier"))?;
    Ok(match id {
        PAYLOAD_FORMAT_INDICATOR => {
            Prop::PayloadFormatIndicator(flag(r, "payload format indicator must be 0 or 1")?)
        }
        MESSAGE_EXPIRY_INTERVAL => Prop::MessageExpiryInterval(r.u32()?),
        CONTENT_TYPE => Prop::ContentType(r.string()?),
        RESPONSE_TOPIC => {
            let t = r.string()?;
            if crate::topic::validate_topic_name(&t).is_err() {
                return Err(DecodeError::Protocol(
                    "response topic is not a valid topic name",
                ));
            }
            Prop::ResponseTopic(t)
        }
        CORRELATION_DATA => Prop::CorrelationData(r.binary()?),
        SUBSCRIPTION_IDENTIFIER => match r.varint()? {
            0 => return Err(DecodeError::Protocol("subscription identifier 0")),
            v => Prop::SubscriptionIdentifier(v),
        },
        SESSION_EXPIRY_INTERVAL => Prop::SessionExpiryInterval(r.u32()?),
        ASSIGNED_CLIENT_IDENTIFIER => Prop::AssignedClientIdentifier(r.string()?),
        SERVER_KEEP_ALIVE => Prop::ServerKeepAlive(r.u16()?),
        AUTHENTICATION_METHOD => Prop::AuthenticationMethod(r.string()?),
        AUTHENTICATION_DATA => Prop::AuthenticationData(r.binary()?),
        REQUEST_PROBLEM_INFORMATION => {
            Prop::RequestProblemInformation(flag(r, "request problem information must be 0 or 1")?)
        }
        WILL_DELAY_INTERVAL => Prop::WillDelayInterval(r.u32()?),
        REQUEST_RESPONSE_INFORMATION => Prop::RequestResponseInformation(flag(
            r,
            "request response information must be 0 or 1",
        )?),
        RESPONSE_INFORMATION => Prop::ResponseInformation(r.string()?),
        SERVER_REFERENCE => Prop::ServerReference(r.string()?),
        REASON_STRING => Prop::ReasonString(r.string()?),
        RECEIVE_MAXIMUM => Prop::ReceiveMaximum(nonzero_u16(r, "receive maximum 0")?),
        TOPIC_ALIAS_MAXIMUM => Prop::TopicAliasMaximum(r.u16()?),
        TOPIC_ALIAS => Prop::TopicAlias(nonzero_u16(r, "topic alias 0")?),
        MAXIMUM_QOS => Prop::MaximumQos(flag(r, "maximum QoS must be 0 or 1")?),
        RETAIN_AVAILABLE => Prop::RetainAvailable(flag(r, "retain available must be 0 or 1")?),
        USER_PROPERTY => {
            let k = r.string()?;
            let v = r.string()?;
            Prop::UserProperty(k, v)
        }
        MAXIMUM_PACKET_SIZE => match r.u32()? {
            0 => return Err(DecodeError::Protocol("maximum packet size 0")),
            v => Prop::MaximumPacketSize(v),
        },
        WILDCARD_SUBSCRIPTION_AVAILABLE => Prop::WildcardSubscriptionAvailable(flag(
            r,
            "wildcard subscription available must be 0 or 1",
        )?),
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => Prop::SubscriptionIdentifierAvailable(flag(
            r,
            "subscription identifiers available must be 0 or 1",
        )?),
        SHARED_SUBSCRIPTION_AVAILABLE => Prop::SharedSubscriptionAvailable(flag(
            r,
            "shared subscription available must be 0 or 1",
        )?),
        _ => return Err(DecodeError::Malformed("unknown property identifier")),
    })
}

/// Read the property length and feed every property to `f`.
fn for_each_prop(
    r: &mut Reader,
    mut f: impl FnMut(Prop) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len = r.varint()? as usize;
    if len > r.remaining() {
        return Err(DecodeError::Malformed("property length exceeds packet"));
    }
    let mut pr = r.sub(len)?;
    while !pr.is_empty() {
        f(read_prop(&mut pr)?)?;
    }
    Ok(())
}

fn once<T>(slot: &mut Option<T>, v: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property appears more than once"));
    }
    *slot = Some(v);
    Ok(())
}

// ---------------------------------------------------------------------------
// Encoding helpers. Lengths count the whole property (identifier included) but
// not the property-length prefix.

fn len_u8(v: Option<u8>) -> usize {
    v.map_or(0, |_| 2)
}
fn len_u16(v: Option<u16>) -> usize {
    v.map_or(0, |_| 3)
}
fn len_u32(v: Option<u32>) -> usize {
    v.map_or(0, |_| 5)
}
fn len_str(v: &Option<String>) -> usize {
    v.as_ref().map_or(0, |s| 3 + s.len())
}
fn len_bin(v: &Option<Bytes>) -> usize {
    v.as_ref().map_or(0, |s| 3 + s.len())
}
pub(crate) fn len_user(v: &[UserProperty]) -> usize {
    v.iter().map(|(k, v)| 5 + k.len() + v.len()).sum()
}
fn len_subid(v: u32) -> usize {
    1 + varint_len(v as usize)
}

fn put_u8p(out: &mut BytesMut, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        out.put_u8(id);
        out.put_u8(v);
    }
}
fn put_u16p(out: &mut BytesMut, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        out.put_u8(id);
        out.put_u16(v);
    }
}
fn put_u32p(out: &mut BytesMut, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        out.put_u8(id);
        out.put_u32(v);
    }
}
fn put_strp(out: &mut BytesMut, id: u8, v: &Option<String>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        out.put_u8(id);
        put_str(out, v)?;
    }
    Ok(())
}
fn put_binp(out: &mut BytesMut, id: u8, v: &Option<Bytes>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        out.put_u8(id);
        put_bin(out, v)?;
    }
    Ok(())
}
pub(crate) fn put_user(out: &mut BytesMut, v: &[UserProperty]) -> Result<(), EncodeError> {
    for (k, v) in v {
        out.put_u8(USER_PROPERTY);
        put_str(out, k)?;
        put_str(out, v)?;
    }
    Ok(())
}
fn put_subid(out: &mut BytesMut, v: u32) -> Result<(), EncodeError> {
    if v == 0 || v as usize > MAX_REMAINING_LENGTH {
        return Err(EncodeError::Invalid(
            "subscription identifier out of range 1..=268435455",
        ));
    }
    out.put_u8(SUBSCRIPTION_IDENTIFIER);
    put_varint(out, v as usize);
    Ok(())
}

/// Decode a user-properties-only property block (UNSUBSCRIBE).
pub(crate) fn decode_user_only(r: &mut Reader) -> Result<Vec<UserProperty>, DecodeError> {
    let mut v = Vec::new();
    for_each_prop(r, |prop| match prop {
        Prop::UserProperty(k, val) => {
            v.push((k, val));
            Ok(())
        }
        _ => Err(NOT_ALLOWED),
    })?;
    Ok(v)
}

impl ConnectProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        for_each_prop(r, |prop| match prop {
            Prop::SessionExpiryInterval(v) => once(&mut p.session_expiry_interval, v),
            Prop::ReceiveMaximum(v) => once(&mut p.receive_maximum, v),
            Prop::MaximumPacketSize(v) => once(&mut p.maximum_packet_size, v),
            Prop::TopicAliasMaximum(v) => once(&mut p.topic_alias_maximum, v),
            Prop::RequestResponseInformation(v) => once(&mut p.request_response_information, v),
            Prop::RequestProblemInformation(v) => once(&mut p.request_problem_information, v),
            Prop::UserProperty(k, v) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            Prop::AuthenticationMethod(v) => once(&mut p.authentication_method, v),
            Prop::AuthenticationData(v) => once(&mut p.authentication_data, v),
            _ => Err(NOT_ALLOWED),
        })?;
        if p.authentication_data.is_some() && p.authentication_method.is_none() {
            return Err(DecodeError::Protocol(
                "authentication data without authentication method",
            ));
        }
        Ok(p)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        len_u32(self.session_expiry_interval)
            + len_u16(self.receive_maximum)
            + len_u32(self.maximum_packet_size)
            + len_u16(self.topic_alias_maximum)
            + len_u8(self.request_response_information)
            + len_u8(self.request_problem_information)
            + len_user(&self.user_properties)
            + len_str(&self.authentication_method)
            + len_bin(&self.authentication_data)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_u32p(out, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        put_u16p(out, RECEIVE_MAXIMUM, self.receive_maximum);
        put_u32p(out, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        put_u16p(out, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        put_u8p(
            out,
            REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        put_u8p(
            out,
            REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        put_user(out, &self.user_properties)?;
        put_strp(out, AUTHENTICATION_METHOD, &self.authentication_method)?;
        put_binp(out, AUTHENTICATION_DATA, &self.authentication_data)
    }
}

impl WillProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        for_each_prop(r, |prop| match prop {
            Prop::WillDelayInterval(v) => once(&mut p.will_delay_interval, v),
            Prop::PayloadFormatIndicator(v) => once(&mut p.payload_format_indicator, v),
            Prop::MessageExpiryInterval(v) => once(&mut p.message_expiry_interval, v),
            Prop::ContentType(v) => once(&mut p.content_type, v),
            Prop::ResponseTopic(v) => once(&mut p.response_topic, v),
            Prop::CorrelationData(v) => once(&mut p.correlation_data, v),
            Prop::UserProperty(k, v) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            _ => Err(NOT_ALLOWED),
        })?;
        Ok(p)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        len_u32(self.will_delay_interval)
            + len_u8(self.payload_format_indicator)
            + len_u32(self.message_expiry_interval)
            + len_str(&self.content_type)
            + len_str(&self.response_topic)
            + len_bin(&self.correlation_data)
            + len_user(&self.user_properties)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_u32p(out, WILL_DELAY_INTERVAL, self.will_delay_interval);
        put_u8p(out, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        put_u32p(out, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        put_strp(out, CONTENT_TYPE, &self.content_type)?;
        put_strp(out, RESPONSE_TOPIC, &self.response_topic)?;
        put_binp(out, CORRELATION_DATA, &self.correlation_data)?;
        put_user(out, &self.user_properties)
    }
}

impl ConnAckProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        for_each_prop(r, |prop| match prop {
            Prop::SessionExpiryInterval(v) => once(&mut p.session_expiry_interval, v),
            Prop::ReceiveMaximum(v) => once(&mut p.receive_maximum, v),
            Prop::MaximumQos(v) => once(&mut p.maximum_qos, v),
            Prop::RetainAvailable(v) => once(&mut p.retain_available, v),
            Prop::MaximumPacketSize(v) => once(&mut p.maximum_packet_size, v),
            Prop::AssignedClientIdentifier(v) => once(&mut p.assigned_client_identifier, v),
            Prop::TopicAliasMaximum(v) => once(&mut p.topic_alias_maximum, v),
            Prop::ReasonString(v) => once(&mut p.reason_string, v),
            Prop::UserProperty(k, v) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            Prop::WildcardSubscriptionAvailable(v) => {
                once(&mut p.wildcard_subscription_available, v)
            }
            Prop::SubscriptionIdentifierAvailable(v) => {
                once(&mut p.subscription_identifiers_available, v)
            }
            Prop::SharedSubscriptionAvailable(v) => once(&mut p.shared_subscription_available, v),
            Prop::ServerKeepAlive(v) => once(&mut p.server_keep_alive, v),
            Prop::ResponseInformation(v) => once(&mut p.response_information, v),
            Prop::ServerReference(v) => once(&mut p.server_reference, v),
            Prop::AuthenticationMethod(v) => once(&mut p.authentication_method, v),
            Prop::AuthenticationData(v) => once(&mut p.authentication_data, v),
            _ => Err(NOT_ALLOWED),
        })?;
        Ok(p)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        len_u32(self.session_expiry_interval)
            + len_u16(self.receive_maximum)
            + len_u8(self.maximum_qos)
            + len_u8(self.retain_available)
            + len_u32(self.maximum_packet_size)
            + len_str(&self.assigned_client_identifier)
            + len_u16(self.topic_alias_maximum)
            + len_str(&self.reason_string)
            + len_user(&self.user_properties)
            + len_u8(self.wildcard_subscription_available)
            + len_u8(self.subscription_identifiers_available)
            + len_u8(self.shared_subscription_available)
            + len_u16(self.server_keep_alive)
            + len_str(&self.response_information)
            + len_str(&self.server_reference)
            + len_str(&self.authentication_method)
            + len_bin(&self.authentication_data)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_u32p(out, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        put_u16p(out, RECEIVE_MAXIMUM, self.receive_maximum);
        put_u8p(out, MAXIMUM_QOS, self.maximum_qos);
        put_u8p(out, RETAIN_AVAILABLE, self.retain_available);
        put_u32p(out, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        put_strp(
            out,
            ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        )?;
        put_u16p(out, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        put_strp(out, REASON_STRING, &self.reason_string)?;
        put_user(out, &self.user_properties)?;
        put_u8p(
            out,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        put_u8p(
            out,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
        );
        put_u8p(
            out,
            SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        put_u16p(out, SERVER_KEEP_ALIVE, self.server_keep_alive);
        put_strp(out, RESPONSE_INFORMATION, &self.response_information)?;
        put_strp(out, SERVER_REFERENCE, &self.server_reference)?;
        put_strp(out, AUTHENTICATION_METHOD, &self.authentication_method)?;
        put_binp(out, AUTHENTICATION_DATA, &self.authentication_data)
    }
}

impl PublishProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        for_each_prop(r, |prop| match prop {
            Prop::PayloadFormatIndicator(v) => once(&mut p.payload_format_indicator, v),
            Prop::MessageExpiryInterval(v) => once(&mut p.message_expiry_interval, v),
            Prop::TopicAlias(v) => once(&mut p.topic_alias, v),
            Prop::ResponseTopic(v) => once(&mut p.response_topic, v),
            Prop::CorrelationData(v) => once(&mut p.correlation_data, v),
            Prop::UserProperty(k, v) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            Prop::SubscriptionIdentifier(v) => {
                p.subscription_identifiers.push(v);
                Ok(())
            }
            Prop::ContentType(v) => once(&mut p.content_type, v),
            _ => Err(NOT_ALLOWED),
        })?;
        Ok(p)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        len_u8(self.payload_format_indicator)
            + len_u32(self.message_expiry_interval)
            + len_u16(self.topic_alias)
            + len_str(&self.response_topic)
            + len_bin(&self.correlation_data)
            + len_user(&self.user_properties)
            + self
                .subscription_identifiers
                .iter()
                .map(|&v| len_subid(v))
                .sum::<usize>()
            + len_str(&self.content_type)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_u8p(out, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        put_u32p(out, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        put_u16p(out, TOPIC_ALIAS, self.topic_alias);
        put_strp(out, RESPONSE_TOPIC, &self.response_topic)?;
        put_binp(out, CORRELATION_DATA, &self.correlation_data)?;
        put_user(out, &self.user_properties)?;
        for &id in &self.subscription_identifiers {
            put_subid(out, id)?;
        }
        put_strp(out, CONTENT_TYPE, &self.content_type)
    }
}

impl AckProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        for_each_prop(r, |prop| match prop {
            Prop::ReasonString(v) => once(&mut p.reason_string, v),
            Prop::UserProperty(k, v) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            _ => Err(NOT_ALLOWED),
        })?;
        Ok(p)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        len_str(&self.reason_string) + len_user(&self.user_properties)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_strp(out, REASON_STRING, &self.reason_string)?;
        put_user(out, &self.user_properties)
    }
}

impl SubscribeProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        for_each_prop(r, |prop| match prop {
            Prop::SubscriptionIdentifier(v) => once(&mut p.subscription_identifier, v),
            Prop::UserProperty(k, v) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            _ => Err(NOT_ALLOWED),
        })?;
        Ok(p)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        self.subscription_identifier.map_or(0, len_subid) + len_user(&self.user_properties)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        if let Some(id) = self.subscription_identifier {
            put_subid(out, id)?;
        }
        put_user(out, &self.user_properties)
    }
}

impl DisconnectProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        for_each_prop(r, |prop| match prop {
            Prop::SessionExpiryInterval(v) => once(&mut p.session_expiry_interval, v),
            Prop::ReasonString(v) => once(&mut p.reason_string, v),
            Prop::UserProperty(k, v) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            Prop::ServerReference(v) => once(&mut p.server_reference, v),
            _ => Err(NOT_ALLOWED),
        })?;
        Ok(p)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        len_u32(self.session_expiry_interval)
            + len_str(&self.reason_string)
            + len_user(&self.user_properties)
            + len_str(&self.server_reference)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_u32p(out, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        put_strp(out, REASON_STRING, &self.reason_string)?;
        put_user(out, &self.user_properties)?;
        put_strp(out, SERVER_REFERENCE, &self.server_reference)
    }
}

impl AuthProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        for_each_prop(r, |prop| match prop {
            Prop::AuthenticationMethod(v) => once(&mut p.authentication_method, v),
            Prop::AuthenticationData(v) => once(&mut p.authentication_data, v),
            Prop::ReasonString(v) => once(&mut p.reason_string, v),
            Prop::UserProperty(k, v) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            _ => Err(NOT_ALLOWED),
        })?;
        Ok(p)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        len_str(&self.authentication_method)
            + len_bin(&self.authentication_data)
            + len_str(&self.reason_string)
            + len_user(&self.user_properties)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_strp(out, AUTHENTICATION_METHOD, &self.authentication_method)?;
        put_binp(out, AUTHENTICATION_DATA, &self.authentication_data)?;
        put_strp(out, REASON_STRING, &self.reason_string)?;
        put_user(out, &self.user_properties)
    }
}
