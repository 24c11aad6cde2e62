//! The data model of every MQTT 3.1.1 and 5.0 control packet.
//!
//! One set of types serves both protocol versions: fields that only exist in
//! MQTT 5 (properties, reason codes) are simply left at their defaults when a
//! 3.1.1 packet is decoded, and are ignored when a 3.1.1 packet is encoded.

use bytes::Bytes;

/// The protocol level announced in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4). Also used for 3.1 (level 3, "MQIsdp").
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Protocol {
    pub fn is_v5(self) -> bool {
        matches!(self, Protocol::V5)
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A user property (MQTT 5): an ordered, possibly repeated, name/value pair.
pub type UserProperty = (String, String);

/// CONNECT properties (MQTT 5, section 3.1.2.11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_response_information: Option<u8>,
    pub request_problem_information: Option<u8>,
    pub user_properties: Vec<UserProperty>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
}

/// Will properties (MQTT 5, section 3.1.3.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
}

/// The will message carried by CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: WillProperties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: Protocol,
    /// Clean Session (3.1.1) or Clean Start (5.0).
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<LastWill>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub properties: ConnectProperties,
}

/// CONNACK properties (MQTT 5, section 3.2.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<String>,
    pub user_properties: Vec<UserProperty>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifiers_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// MQTT 5 reason code. For 3.1.1 the encoder maps it to a return code
    /// (see [`crate::reason::v311_connack_code`]).
    pub reason_code: u8,
    pub properties: ConnAckProperties,
}

/// PUBLISH properties (MQTT 5, section 3.3.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
    /// Several may be present when a message matches several subscriptions.
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<String>,
}

impl PublishProperties {
    pub fn is_empty(&self) -> bool {
        *self == EMPTY_PUBLISH_PROPERTIES
    }
}

/// What an absent [`BoxedProperties`] reads as.
static EMPTY_PUBLISH_PROPERTIES: PublishProperties = PublishProperties {
    payload_format_indicator: None,
    message_expiry_interval: None,
    topic_alias: None,
    response_topic: None,
    correlation_data: None,
    user_properties: Vec::new(),
    subscription_identifiers: Vec::new(),
    content_type: None,
};

/// PUBLISH properties, on the heap only when there are any.
///
/// The full set is 150 bytes, and most device messages carry none (MQTT
/// 3.1.1 has none at all). Held inline, it made every decoded PUBLISH and
/// every routed message that much bigger to move and to allocate: a
/// profile of QoS 0 fan-in found copying those values at ~10 % of the
/// broker's time. Reads see an empty set through `Deref`; the first write
/// through `DerefMut` allocates.
#[derive(Clone, Default)]
pub struct BoxedProperties(Option<Box<PublishProperties>>);

impl BoxedProperties {
    /// The properties by value (empty when none were set).
    pub fn into_inner(self) -> PublishProperties {
        self.0.map(|b| *b).unwrap_or_default()
    }
}

impl From<PublishProperties> for BoxedProperties {
    fn from(p: PublishProperties) -> Self {
        if p.is_empty() {
            BoxedProperties(None)
        } else {
            BoxedProperties(Some(Box::new(p)))
        }
    }
}

impl std::ops::Deref for BoxedProperties {
    type Target = PublishProperties;
    fn deref(&self) -> &PublishProperties {
        self.0.as_deref().unwrap_or(&EMPTY_PUBLISH_PROPERTIES)
    }
}

impl std::ops::DerefMut for BoxedProperties {
    fn deref_mut(&mut self) -> &mut PublishProperties {
        self.0.get_or_insert_with(Default::default)
    }
}

/// Equal when the properties are: an allocated empty set equals none.
impl PartialEq for BoxedProperties {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for BoxedProperties {}

impl std::fmt::Debug for BoxedProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// May be empty in MQTT 5 when a topic alias is used.
    pub topic: String,
    /// Present iff `qos > 0`.
    pub packet_id: Option<u16>,
    pub properties: BoxedProperties,
    pub payload: Bytes,
}

/// Properties shared by PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK, SUBACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProperties {
    pub reason_string: Option<String>,
    pub user_properties: Vec<UserProperty>,
}

impl AckProperties {
    pub fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubResponse {
    pub packet_id: u16,
    /// 0x00 (success) when absent on the wire.
    pub reason_code: u8,
    pub properties: AckProperties,
}

impl PubResponse {
    pub fn new(packet_id: u16, reason_code: u8) -> Self {
        PubResponse {
            packet_id,
            reason_code,
            properties: AckProperties::default(),
        }
    }
}

/// How retained messages are sent when a subscription is made (MQTT 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// Send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// Send them only if the subscription does not already exist.
    SendIfNew = 1,
    /// Never send retained messages for this subscription.
    DoNotSend = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// The options byte as encoded in MQTT 5 SUBSCRIBE.
    pub fn to_byte(self) -> u8 {
        (self.qos as u8)
            | ((self.no_local as u8) << 2)
            | ((self.retain_as_published as u8) << 3)
            | ((self.retain_handling as u8) << 4)
    }

    /// Parse an MQTT 5 options byte; `None` if reserved bits are set or a
    /// field holds a reserved value.
    pub fn from_byte(b: u8) -> Option<Self> {
        if b & 0b1100_0000 != 0 {
            return None;
        }
        let qos = QoS::from_u8(b & 0b11)?;
        let retain_handling = match (b >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return None,
        };
        Some(SubscriptionOptions {
            qos,
            no_local: b & 0b100 != 0,
            retain_as_published: b & 0b1000 != 0,
            retain_handling,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeProperties {
    pub subscription_identifier: Option<u32>,
    pub user_properties: Vec<UserProperty>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub properties: SubscribeProperties,
    pub filters: Vec<(String, SubscriptionOptions)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub properties: AckProperties,
    /// One per filter: granted QoS (0..=2) or a failure reason code (>= 0x80).
    /// For 3.1.1 every failure is encoded as 0x80.
    pub reason_codes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub user_properties: Vec<UserProperty>,
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub properties: AckProperties,
    /// MQTT 5 only: one reason code per filter. Empty for 3.1.1.
    pub reason_codes: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<String>,
    pub user_properties: Vec<UserProperty>,
    pub server_reference: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// 0x00 (normal disconnection) when absent on the wire.
    pub reason_code: u8,
    pub properties: DisconnectProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthProperties {
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<String>,
    pub user_properties: Vec<UserProperty>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    pub reason_code: u8,
    pub properties: AuthProperties,
}

/// Any MQTT control packet.
///
/// The packets with large property sets and no place on the message path
/// (CONNECT, CONNACK, DISCONNECT, AUTH) are boxed: a `Packet` is moved
/// out of the decoder for every PUBLISH, and the enum is as big as its
/// biggest variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(Box<ConnAck>),
    Publish(Publish),
    PubAck(PubResponse),
    PubRec(PubResponse),
    PubRel(PubResponse),
    PubComp(PubResponse),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Box<Disconnect>),
    /// MQTT 5 only.
    Auth(Box<Auth>),
}

impl Packet {
    /// The packet type name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_properties_allocate_only_when_set() {
        let none = BoxedProperties::default();
        assert!(none.0.is_none());
        assert!(none.is_empty());
        assert_eq!(none.message_expiry_interval, None);
        // An empty set converts to none at all.
        assert!(BoxedProperties::from(PublishProperties::default())
            .0
            .is_none());
        let mut set = none.clone();
        // Written through `DerefMut`: this allocates.
        set.content_type = Some("text/plain".into());
        assert!(set.0.is_some());
        assert_eq!(set.content_type.as_deref(), Some("text/plain"));
        assert_ne!(set, none);
        // Equality is by content: an allocated empty set equals none.
        set.content_type = None;
        assert_eq!(set, none);
        assert_eq!(set.into_inner(), PublishProperties::default());
    }

    #[test]
    fn a_publish_stays_small_to_move() {
        // Decoded, routed and queued per message: the properties were 150
        // bytes of it before they were boxed.
        assert!(
            std::mem::size_of::<Publish>() <= 80,
            "{}",
            std::mem::size_of::<Publish>()
        );
        assert!(
            std::mem::size_of::<Packet>() <= 96,
            "{}",
            std::mem::size_of::<Packet>()
        );
    }
}
