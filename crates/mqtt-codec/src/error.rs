use crate::reason;
use thiserror::Error;

/// Why a byte sequence is not a valid MQTT packet.
///
/// Every variant maps to the MQTT 5 reason code the server reports it with
/// in a DISCONNECT (or CONNACK, for errors in CONNECT); for 3.1.1 clients the
/// connection is simply closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },
    #[error("unsupported protocol version {0}")]
    UnsupportedProtocolVersion(u8),
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(&'static str),
    #[error("invalid topic filter: {0}")]
    TopicFilterInvalid(&'static str),
    #[error("payload is not valid UTF-8 although the payload format indicator says so")]
    PayloadFormatInvalid,
}

impl DecodeError {
    /// The MQTT 5 reason code this error is reported with.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::TopicNameInvalid(_) => reason::TOPIC_NAME_INVALID,
            DecodeError::TopicFilterInvalid(_) => reason::TOPIC_FILTER_INVALID,
            DecodeError::PayloadFormatInvalid => reason::PAYLOAD_FORMAT_INVALID,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("packet of {0} bytes exceeds the MQTT maximum remaining length")]
    TooLarge(usize),
    #[error("string field longer than 65,535 bytes")]
    StringTooLong,
    #[error("{0} cannot be sent with this protocol version")]
    NotInProtocol(&'static str),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}
