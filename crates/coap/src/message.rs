//! The CoAP message: its wire form (RFC 7252 §3) and typed access to the
//! options the rest of the crate uses.
//!
//! Decoding is strict about the format (§3: version, token length, option
//! delta/length nibbles, the payload marker) and lenient about option
//! *meaning*: every option is kept, recognised or not, so that the layer
//! that knows the context (request or response, CON or NON) decides what
//! an unrecognised critical option means ([`Message::first_bad_critical_option`]).
//! A [`DecodeError`] keeps whatever header fields were readable, because the
//! RFC's answer to a malformed message depends on its type and message id
//! ([`DecodeError::rejection`]).

use std::fmt;

use bytes::Bytes;
use thiserror::Error;

/// The payload marker that separates options from the payload.
const PAYLOAD_MARKER: u8 = 0xFF;

/// Option numbers (RFC 7252 §12.2, RFC 7641, RFC 7959).
pub mod option {
    /// If-Match (critical, repeatable).
    pub const IF_MATCH: u16 = 1;
    /// Uri-Host (critical).
    pub const URI_HOST: u16 = 3;
    /// ETag (elective, repeatable in requests).
    pub const ETAG: u16 = 4;
    /// If-None-Match (critical, empty).
    pub const IF_NONE_MATCH: u16 = 5;
    /// Observe (elective, RFC 7641).
    pub const OBSERVE: u16 = 6;
    /// Uri-Port (critical).
    pub const URI_PORT: u16 = 7;
    /// Location-Path (elective, repeatable).
    pub const LOCATION_PATH: u16 = 8;
    /// Uri-Path (critical, repeatable): one option per path segment.
    pub const URI_PATH: u16 = 11;
    /// Content-Format (elective).
    pub const CONTENT_FORMAT: u16 = 12;
    /// Max-Age (elective), seconds.
    pub const MAX_AGE: u16 = 14;
    /// Uri-Query (critical, repeatable): one option per `key=value`.
    pub const URI_QUERY: u16 = 15;
    /// Accept (critical).
    pub const ACCEPT: u16 = 17;
    /// Location-Query (elective, repeatable).
    pub const LOCATION_QUERY: u16 = 20;
    /// Block2 (critical, RFC 7959): the block of a response body.
    pub const BLOCK2: u16 = 23;
    /// Block1 (critical, RFC 7959): the block of a request body.
    pub const BLOCK1: u16 = 27;
    /// Size2 (elective, RFC 7959): total size of a response body.
    pub const SIZE2: u16 = 28;
    /// Proxy-Uri (critical).
    pub const PROXY_URI: u16 = 35;
    /// Proxy-Scheme (critical).
    pub const PROXY_SCHEME: u16 = 39;
    /// Size1 (elective): total size of a request body.
    pub const SIZE1: u16 = 60;
    /// Echo (elective, RFC 9175): a value the client repeats to prove that
    /// it receives what is sent to its address.
    pub const ECHO: u16 = 252;
    /// Request-Tag (elective, RFC 9175): tells concurrent block-wise
    /// bodies apart (not used: bodies are keyed by client and URI).
    pub const REQUEST_TAG: u16 = 292;
    /// No-Response (elective, RFC 7967).
    pub const NO_RESPONSE: u16 = 258;

    /// Critical options have odd numbers (RFC 7252 §5.4.6): a recipient
    /// that does not understand one must not ignore it.
    pub fn is_critical(number: u16) -> bool {
        number & 1 == 1
    }

    /// The options this crate understands, with their value length range
    /// and whether they may repeat (RFC 7252 §5.10 table 4 and the
    /// Observe / block-wise RFCs). Proxying options are not supported, so
    /// they count as unrecognised: a request carrying them is answered
    /// 4.02 Bad Option (RFC 7252 §5.7.2 allows 5.05 too).
    pub(crate) fn format(number: u16) -> Option<(usize, usize, bool)> {
        Some(match number {
            IF_MATCH => (0, 8, true),
            URI_HOST => (1, 255, false),
            ETAG => (1, 8, true),
            IF_NONE_MATCH => (0, 0, false),
            OBSERVE => (0, 3, false),
            URI_PORT => (0, 2, false),
            LOCATION_PATH => (0, 255, true),
            URI_PATH => (0, 255, true),
            CONTENT_FORMAT => (0, 2, false),
            MAX_AGE => (0, 4, false),
            URI_QUERY => (0, 255, true),
            ACCEPT => (0, 2, false),
            LOCATION_QUERY => (0, 255, true),
            BLOCK2 | BLOCK1 => (0, 3, false),
            SIZE2 | SIZE1 => (0, 4, false),
            NO_RESPONSE => (0, 1, false),
            ECHO => (1, 40, false),
            REQUEST_TAG => (0, 8, true),
            _ => return None,
        })
    }
}

/// Content-Format numbers the platform meets most (RFC 7252 §12.3, RFC 8428).
pub mod content_format {
    /// `text/plain; charset=utf-8`
    pub const TEXT_PLAIN: u16 = 0;
    /// `application/link-format`
    pub const LINK_FORMAT: u16 = 40;
    /// `application/octet-stream`
    pub const OCTET_STREAM: u16 = 42;
    /// `application/json`
    pub const JSON: u16 = 50;
    /// `application/cbor`
    pub const CBOR: u16 = 60;
    /// `application/senml+json`
    pub const SENML_JSON: u16 = 110;
    /// `application/senml+cbor`
    pub const SENML_CBOR: u16 = 112;
}

/// The four message types (RFC 7252 §3 `T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Confirmable: retransmitted until acknowledged.
    Confirmable,
    /// Non-confirmable: sent once.
    NonConfirmable,
    /// Acknowledgement of a Confirmable message (may carry a response).
    Acknowledgement,
    /// Reset: "I cannot process this message" (or a ping answer).
    Reset,
}

impl MessageType {
    fn from_bits(bits: u8) -> MessageType {
        match bits & 0b11 {
            0 => MessageType::Confirmable,
            1 => MessageType::NonConfirmable,
            2 => MessageType::Acknowledgement,
            _ => MessageType::Reset,
        }
    }

    fn bits(self) -> u8 {
        match self {
            MessageType::Confirmable => 0,
            MessageType::NonConfirmable => 1,
            MessageType::Acknowledgement => 2,
            MessageType::Reset => 3,
        }
    }
}

/// A message code `c.dd`: 0.00 empty, 0.xx a request method, 2.xx–5.xx a
/// response (RFC 7252 §5.9, §12.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u8);

impl Code {
    /// 0.00: an empty message (ACK, RST, or a CON ping).
    pub const EMPTY: Code = Code::new(0, 0);
    /// 0.01 GET
    pub const GET: Code = Code::new(0, 1);
    /// 0.02 POST
    pub const POST: Code = Code::new(0, 2);
    /// 0.03 PUT
    pub const PUT: Code = Code::new(0, 3);
    /// 0.04 DELETE
    pub const DELETE: Code = Code::new(0, 4);
    /// 2.01 Created
    pub const CREATED: Code = Code::new(2, 1);
    /// 2.02 Deleted
    pub const DELETED: Code = Code::new(2, 2);
    /// 2.03 Valid
    pub const VALID: Code = Code::new(2, 3);
    /// 2.04 Changed
    pub const CHANGED: Code = Code::new(2, 4);
    /// 2.05 Content
    pub const CONTENT: Code = Code::new(2, 5);
    /// 2.31 Continue (RFC 7959): send the next Block1 block.
    pub const CONTINUE: Code = Code::new(2, 31);
    /// 4.00 Bad Request
    pub const BAD_REQUEST: Code = Code::new(4, 0);
    /// 4.01 Unauthorized
    pub const UNAUTHORIZED: Code = Code::new(4, 1);
    /// 4.02 Bad Option
    pub const BAD_OPTION: Code = Code::new(4, 2);
    /// 4.03 Forbidden
    pub const FORBIDDEN: Code = Code::new(4, 3);
    /// 4.04 Not Found
    pub const NOT_FOUND: Code = Code::new(4, 4);
    /// 4.05 Method Not Allowed
    pub const METHOD_NOT_ALLOWED: Code = Code::new(4, 5);
    /// 4.06 Not Acceptable
    pub const NOT_ACCEPTABLE: Code = Code::new(4, 6);
    /// 4.08 Request Entity Incomplete (RFC 7959): a Block1 block is missing.
    pub const REQUEST_ENTITY_INCOMPLETE: Code = Code::new(4, 8);
    /// 4.12 Precondition Failed
    pub const PRECONDITION_FAILED: Code = Code::new(4, 12);
    /// 4.13 Request Entity Too Large
    pub const REQUEST_ENTITY_TOO_LARGE: Code = Code::new(4, 13);
    /// 4.15 Unsupported Content-Format
    pub const UNSUPPORTED_CONTENT_FORMAT: Code = Code::new(4, 15);
    /// 5.00 Internal Server Error
    pub const INTERNAL_SERVER_ERROR: Code = Code::new(5, 0);
    /// 5.01 Not Implemented
    pub const NOT_IMPLEMENTED: Code = Code::new(5, 1);
    /// 5.03 Service Unavailable (with Max-Age: retry after that many seconds)
    pub const SERVICE_UNAVAILABLE: Code = Code::new(5, 3);
    /// 5.04 Gateway Timeout
    pub const GATEWAY_TIMEOUT: Code = Code::new(5, 4);

    /// The code `class.detail` (class 0..=7, detail 0..=31).
    pub const fn new(class: u8, detail: u8) -> Code {
        Code(((class & 0x7) << 5) | (detail & 0x1F))
    }

    /// The class: 0 request/empty, 2 success, 4 client error, 5 server error.
    pub fn class(self) -> u8 {
        self.0 >> 5
    }

    /// The detail (0..=31).
    pub fn detail(self) -> u8 {
        self.0 & 0x1F
    }

    /// 0.00.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// A request method (0.01..=0.31).
    pub fn is_request(self) -> bool {
        self.class() == 0 && self.0 != 0
    }

    /// A response (classes 2, 4 and 5; 1, 6 and 7 are reserved).
    pub fn is_response(self) -> bool {
        matches!(self.class(), 2 | 4 | 5)
    }

    /// 2.xx.
    pub fn is_success(self) -> bool {
        self.class() == 2
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.class(), self.detail())
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A token: 0 to 8 opaque bytes that match a response to its request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Token {
    len: u8,
    bytes: [u8; 8],
}

impl Token {
    /// The token of these bytes, or `None` when longer than 8.
    pub fn new(bytes: &[u8]) -> Option<Token> {
        if bytes.len() > 8 {
            return None;
        }
        let mut t = Token {
            len: bytes.len() as u8,
            bytes: [0; 8],
        };
        t.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(t)
    }

    /// An 8-byte token from a `u64`.
    pub fn from_u64(v: u64) -> Token {
        Token {
            len: 8,
            bytes: v.to_be_bytes(),
        }
    }

    /// The token bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Its length (0..=8).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// The zero-length token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// One option instance: its number and raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoapOption {
    /// The option number.
    pub number: u16,
    /// The raw value (uint options are big-endian without leading zeros).
    pub value: Bytes,
}

/// The value of a Block1 or Block2 option (RFC 7959 §2.2): block number,
/// more flag and size exponent; the block holds `2^(szx+4)` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockValue {
    /// The block number (20 bits).
    pub num: u32,
    /// More blocks follow.
    pub more: bool,
    /// Size exponent 0..=6 (16..=1024 bytes); 7 is BERT and refused.
    pub szx: u8,
}

/// The largest block number the 3-byte option can carry.
pub const MAX_BLOCK_NUM: u32 = (1 << 20) - 1;

impl BlockValue {
    /// A block value; `None` when `num` needs more than 20 bits or `szx > 6`.
    pub fn new(num: u32, more: bool, szx: u8) -> Option<BlockValue> {
        (num <= MAX_BLOCK_NUM && szx <= 6).then_some(BlockValue { num, more, szx })
    }

    /// The block size in bytes.
    pub fn size(self) -> usize {
        1 << (self.szx as usize + 4)
    }

    /// The byte offset of this block in the body.
    pub fn offset(self) -> usize {
        self.num as usize * self.size()
    }

    /// The option value as an unsigned integer.
    pub fn to_uint(self) -> u32 {
        (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx)
    }

    /// Parse an option value. SZX 7 (BERT, only over reliable transports)
    /// is refused, as is a value longer than three bytes.
    pub fn from_uint(v: u32) -> Result<BlockValue, OptionError> {
        if v > 0xFF_FFFF {
            return Err(OptionError::TooLong);
        }
        let szx = (v & 0x7) as u8;
        if szx == 7 {
            return Err(OptionError::Bert);
        }
        Ok(BlockValue {
            num: v >> 4,
            more: v & 0x8 != 0,
            szx,
        })
    }

    /// The SZX of a block size (a power of two in 16..=1024).
    pub fn szx_for_size(size: usize) -> Option<u8> {
        (16..=1024)
            .contains(&size)
            .then_some(())
            .filter(|()| size.is_power_of_two())
            .map(|()| (size.trailing_zeros() - 4) as u8)
    }
}

/// Why an option value is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OptionError {
    /// A uint option longer than its format allows.
    #[error("option value too long")]
    TooLong,
    /// Block option with SZX 7 (BERT), which UDP does not allow.
    #[error("block size exponent 7 (BERT) is not allowed over UDP")]
    Bert,
    /// A string option that is not UTF-8.
    #[error("option value is not UTF-8")]
    NotUtf8,
}

/// What the RFC says to do with a message that could not be decoded or
/// that carries an unrecognised critical option (RFC 7252 §4.2, §4.3, §5.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Drop it silently (ACK, RST, NON, or unreadable header).
    Ignore,
    /// Answer with a Reset carrying this message id (a malformed CON, or a
    /// CON response with an unrecognised critical option).
    Reset {
        /// The rejected message's id.
        message_id: u16,
    },
    /// Answer a CON request with a piggybacked 4.02 Bad Option.
    BadOption {
        /// The rejected request's id.
        message_id: u16,
        /// Its token.
        token: Token,
        /// The offending option number.
        option: u16,
    },
}

/// The header fields of a message, as far as they could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message type.
    pub mtype: MessageType,
    /// The code.
    pub code: Code,
    /// The message id.
    pub message_id: u16,
}

/// Why a datagram is not a well-formed CoAP message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{kind}")]
pub struct DecodeError {
    /// The header, when the first four bytes were a CoAP version 1 header.
    pub header: Option<Header>,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

/// The kinds of format errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeErrorKind {
    /// Fewer than the four header bytes.
    #[error("datagram shorter than the 4-byte header")]
    TooShort,
    /// Version other than 1.
    #[error("unknown CoAP version {0}")]
    Version(u8),
    /// Token length 9..=15.
    #[error("token length {0} is reserved")]
    TokenLength(u8),
    /// The datagram ends inside the token, an option or its extension.
    #[error("message truncated")]
    Truncated,
    /// An option delta or length nibble of 15 that is not the payload marker.
    #[error("reserved option delta/length nibble 15")]
    ReservedNibble,
    /// An option number above 65535.
    #[error("option number overflow")]
    OptionNumber,
    /// A payload marker followed by nothing.
    #[error("payload marker with an empty payload")]
    EmptyPayload,
    /// An empty message (0.00) with a token, options or a payload.
    #[error("empty message with content")]
    NonEmptyEmpty,
    /// A code of the reserved classes 1, 6 and 7.
    #[error("reserved code class in {0}")]
    ReservedClass(Code),
    /// More options than the limit.
    #[error("more than {0} options")]
    TooManyOptions(usize),
    /// A datagram longer than the limit.
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

impl DecodeError {
    fn new(header: Option<Header>, kind: DecodeErrorKind) -> DecodeError {
        DecodeError { header, kind }
    }

    /// What to answer (RFC 7252 §4.2, §4.3): a malformed CON is rejected
    /// with a Reset; malformed NON, ACK and RST messages, and datagrams
    /// whose header cannot be read, are silently dropped. (Rejecting a NON
    /// with RST is allowed but not required; dropping gives an attacker
    /// nothing to reflect.)
    pub fn rejection(&self) -> Rejection {
        match self.header {
            Some(Header {
                mtype: MessageType::Confirmable,
                message_id,
                ..
            }) => Rejection::Reset { message_id },
            _ => Rejection::Ignore,
        }
    }
}

/// Limits applied while decoding, so a datagram costs bounded work and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The largest datagram accepted.
    pub max_size: usize,
    /// The most options accepted in one message.
    pub max_options: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            // A UDP payload cannot be larger anyway.
            max_size: 65_507,
            max_options: 64,
        }
    }
}

/// Why a message cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// An option value longer than the 65,804 bytes the format can express.
    #[error("option {0} value too long to encode")]
    OptionTooLong(u16),
}

/// A CoAP message. Options are kept sorted by number (repeated options in
/// the order they were added), as the wire format needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The type.
    pub mtype: MessageType,
    /// The code.
    pub code: Code,
    /// The message id (deduplication and ACK/RST matching).
    pub message_id: u16,
    /// The token (request/response matching).
    pub token: Token,
    options: Vec<CoapOption>,
    /// The payload (empty when absent).
    pub payload: Bytes,
}

impl Message {
    /// A message with no options and no payload.
    pub fn new(mtype: MessageType, code: Code, message_id: u16, token: Token) -> Message {
        Message {
            mtype,
            code,
            message_id,
            token,
            options: Vec::new(),
            payload: Bytes::new(),
        }
    }

    /// An empty message (ACK or RST) answering `message_id`.
    pub fn empty(mtype: MessageType, message_id: u16) -> Message {
        Message::new(mtype, Code::EMPTY, message_id, Token::default())
    }

    /// Decode with the default limits.
    pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
        Message::decode_with(data, &DecodeLimits::default())
    }

    /// Decode one datagram.
    pub fn decode_with(data: &[u8], limits: &DecodeLimits) -> Result<Message, DecodeError> {
        if data.len() < 4 {
            return Err(DecodeError::new(None, DecodeErrorKind::TooShort));
        }
        let version = data[0] >> 6;
        if version != 1 {
            return Err(DecodeError::new(None, DecodeErrorKind::Version(version)));
        }
        let header = Header {
            mtype: MessageType::from_bits(data[0] >> 4),
            code: Code(data[1]),
            message_id: u16::from_be_bytes([data[2], data[3]]),
        };
        let err = |kind| Err(DecodeError::new(Some(header), kind));
        if data.len() > limits.max_size {
            return err(DecodeErrorKind::TooLarge(data.len()));
        }
        let tkl = data[0] & 0x0F;
        if tkl > 8 {
            return err(DecodeErrorKind::TokenLength(tkl));
        }
        if header.code.is_empty() && data.len() > 4 {
            return err(DecodeErrorKind::NonEmptyEmpty);
        }
        if matches!(header.code.class(), 1 | 6 | 7) {
            return err(DecodeErrorKind::ReservedClass(header.code));
        }
        let Some(token_bytes) = data.get(4..4 + tkl as usize) else {
            return err(DecodeErrorKind::Truncated);
        };
        let token = Token::new(token_bytes).unwrap_or_default();
        let mut pos = 4 + tkl as usize;
        let mut options = Vec::new();
        let mut number: u32 = 0;
        let mut payload = Bytes::new();
        while let Some(&byte) = data.get(pos) {
            pos += 1;
            if byte == PAYLOAD_MARKER {
                if pos == data.len() {
                    return err(DecodeErrorKind::EmptyPayload);
                }
                payload = Bytes::copy_from_slice(&data[pos..]);
                break;
            }
            let delta = match read_extended(byte >> 4, data, &mut pos) {
                Ok(d) => d,
                Err(kind) => return err(kind),
            };
            let len = match read_extended(byte & 0x0F, data, &mut pos) {
                Ok(l) => l as usize,
                Err(kind) => return err(kind),
            };
            number += delta;
            if number > u32::from(u16::MAX) {
                return err(DecodeErrorKind::OptionNumber);
            }
            let Some(value) = data.get(pos..pos + len) else {
                return err(DecodeErrorKind::Truncated);
            };
            pos += len;
            if options.len() == limits.max_options {
                return err(DecodeErrorKind::TooManyOptions(limits.max_options));
            }
            options.push(CoapOption {
                number: number as u16,
                value: Bytes::copy_from_slice(value),
            });
        }
        Ok(Message {
            mtype: header.mtype,
            code: header.code,
            message_id: header.message_id,
            token,
            options,
            payload,
        })
    }

    /// The wire form.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        out.push(0x40 | (self.mtype.bits() << 4) | self.token.len);
        out.push(self.code.0);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(self.token.as_bytes());
        let mut prev = 0u16;
        for opt in &self.options {
            if opt.value.len() > 269 + usize::from(u16::MAX) {
                return Err(EncodeError::OptionTooLong(opt.number));
            }
            let delta = u32::from(opt.number - prev);
            prev = opt.number;
            let (dn, dext) = nibble(delta);
            let (ln, lext) = nibble(opt.value.len() as u32);
            out.push((dn << 4) | ln);
            out.extend_from_slice(&dext);
            out.extend_from_slice(&lext);
            out.extend_from_slice(&opt.value);
        }
        if !self.payload.is_empty() {
            out.push(PAYLOAD_MARKER);
            out.extend_from_slice(&self.payload);
        }
        Ok(out)
    }

    fn encoded_len_hint(&self) -> usize {
        let opts: usize = self.options.iter().map(|o| o.value.len() + 3).sum();
        4 + self.token.len() + opts + 1 + self.payload.len()
    }

    /// All options, sorted by number.
    pub fn options(&self) -> &[CoapOption] {
        &self.options
    }

    /// Add an option instance after any others of the same number.
    pub fn add_option(&mut self, number: u16, value: impl Into<Bytes>) {
        let at = self.options.partition_point(|o| o.number <= number);
        self.options.insert(
            at,
            CoapOption {
                number,
                value: value.into(),
            },
        );
    }

    /// Replace every instance of an option with one value.
    pub fn set_option(&mut self, number: u16, value: impl Into<Bytes>) {
        self.remove_option(number);
        self.add_option(number, value);
    }

    /// Set a uint option (minimal big-endian encoding, RFC 7252 §3.2).
    pub fn set_uint_option(&mut self, number: u16, value: u32) {
        self.set_option(number, encode_uint(value));
    }

    /// Remove every instance of an option.
    pub fn remove_option(&mut self, number: u16) {
        self.options.retain(|o| o.number != number);
    }

    /// The first instance of an option.
    pub fn option(&self, number: u16) -> Option<&CoapOption> {
        self.options.iter().find(|o| o.number == number)
    }

    /// Every instance of an option.
    pub fn option_values(&self, number: u16) -> impl Iterator<Item = &Bytes> {
        self.options
            .iter()
            .filter(move |o| o.number == number)
            .map(|o| &o.value)
    }

    /// A uint option's value; `None` if absent or longer than four bytes.
    pub fn uint_option(&self, number: u16) -> Option<u32> {
        self.option(number).and_then(|o| decode_uint(&o.value))
    }

    /// The first option that makes this message unprocessable: a critical
    /// option this crate does not recognise, one that repeats although it
    /// may not, or one whose value length is out of range (RFC 7252 §5.4.1,
    /// §5.4.3, §5.4.5). An elective option with the same faults is ignored,
    /// as the RFC asks.
    pub fn first_bad_critical_option(&self) -> Option<u16> {
        let mut prev: Option<u16> = None;
        for opt in &self.options {
            if !option::is_critical(opt.number) {
                prev = Some(opt.number);
                continue;
            }
            let Some((min, max, repeatable)) = option::format(opt.number) else {
                return Some(opt.number);
            };
            if opt.value.len() < min || opt.value.len() > max {
                return Some(opt.number);
            }
            if !repeatable && prev == Some(opt.number) {
                return Some(opt.number);
            }
            prev = Some(opt.number);
        }
        if let Some(v) = self.uint_option(option::BLOCK1) {
            BlockValue::from_uint(v).err().map(|_| option::BLOCK1)
        } else {
            None
        }
        .or_else(|| {
            self.uint_option(option::BLOCK2)
                .and_then(|v| BlockValue::from_uint(v).err().map(|_| option::BLOCK2))
        })
    }

    /// What the RFC asks to answer to this message because of its options:
    /// `None` when it can be processed.
    pub fn option_rejection(&self) -> Option<Rejection> {
        let option = self.first_bad_critical_option()?;
        Some(match (self.mtype, self.code.is_request()) {
            (MessageType::Confirmable, true) => Rejection::BadOption {
                message_id: self.message_id,
                token: self.token,
                option,
            },
            (MessageType::Confirmable, false) => Rejection::Reset {
                message_id: self.message_id,
            },
            _ => Rejection::Ignore,
        })
    }

    /// The Uri-Path segments (invalid UTF-8 is an error).
    pub fn uri_path(&self) -> Result<Vec<String>, OptionError> {
        self.string_options(option::URI_PATH)
    }

    /// Append one Uri-Path option per `/`-separated segment of `path`.
    pub fn set_uri_path(&mut self, path: &str) {
        self.remove_option(option::URI_PATH);
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            self.add_option(option::URI_PATH, Bytes::copy_from_slice(seg.as_bytes()));
        }
    }

    /// The Uri-Query items.
    pub fn uri_query(&self) -> Result<Vec<String>, OptionError> {
        self.string_options(option::URI_QUERY)
    }

    /// Append a Uri-Query item.
    pub fn add_uri_query(&mut self, item: &str) {
        self.add_option(option::URI_QUERY, Bytes::copy_from_slice(item.as_bytes()));
    }

    fn string_options(&self, number: u16) -> Result<Vec<String>, OptionError> {
        self.option_values(number)
            .map(|v| {
                std::str::from_utf8(v)
                    .map(str::to_owned)
                    .map_err(|_| OptionError::NotUtf8)
            })
            .collect()
    }

    /// The Content-Format.
    pub fn content_format(&self) -> Option<u16> {
        self.uint_option(option::CONTENT_FORMAT)
            .and_then(|v| u16::try_from(v).ok())
    }

    /// Set the Content-Format.
    pub fn set_content_format(&mut self, cf: u16) {
        self.set_uint_option(option::CONTENT_FORMAT, u32::from(cf));
    }

    /// The Observe value (0 register, 1 deregister in requests; a 24-bit
    /// sequence number in notifications).
    pub fn observe(&self) -> Option<u32> {
        self.uint_option(option::OBSERVE)
            .filter(|&v| v <= 0xFF_FFFF)
    }

    /// Set the Observe value (taken modulo 2^24).
    pub fn set_observe(&mut self, v: u32) {
        self.set_uint_option(option::OBSERVE, v & 0xFF_FFFF);
    }

    /// The Block1 option, if present and valid.
    pub fn block1(&self) -> Option<Result<BlockValue, OptionError>> {
        self.block(option::BLOCK1)
    }

    /// The Block2 option, if present and valid.
    pub fn block2(&self) -> Option<Result<BlockValue, OptionError>> {
        self.block(option::BLOCK2)
    }

    fn block(&self, number: u16) -> Option<Result<BlockValue, OptionError>> {
        let opt = self.option(number)?;
        Some(
            decode_uint(&opt.value)
                .ok_or(OptionError::TooLong)
                .and_then(BlockValue::from_uint),
        )
    }

    /// Set a Block1 or Block2 option.
    pub fn set_block(&mut self, number: u16, block: BlockValue) {
        self.set_uint_option(number, block.to_uint());
    }
}

/// The nibble and extension bytes for an option delta or length.
fn nibble(v: u32) -> (u8, Vec<u8>) {
    match v {
        0..=12 => (v as u8, Vec::new()),
        13..=268 => (13, vec![(v - 13) as u8]),
        _ => (14, ((v - 269) as u16).to_be_bytes().to_vec()),
    }
}

fn read_extended(nibble: u8, data: &[u8], pos: &mut usize) -> Result<u32, DecodeErrorKind> {
    match nibble {
        0..=12 => Ok(u32::from(nibble)),
        13 => {
            let b = *data.get(*pos).ok_or(DecodeErrorKind::Truncated)?;
            *pos += 1;
            Ok(u32::from(b) + 13)
        }
        14 => {
            let b = data.get(*pos..*pos + 2).ok_or(DecodeErrorKind::Truncated)?;
            *pos += 2;
            Ok(u32::from(u16::from_be_bytes([b[0], b[1]])) + 269)
        }
        _ => Err(DecodeErrorKind::ReservedNibble),
    }
}

/// Minimal big-endian encoding of a uint option value (0 is zero bytes).
pub fn encode_uint(v: u32) -> Bytes {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    Bytes::copy_from_slice(&bytes[skip..])
}

/// Decode a uint option value; `None` when longer than four bytes.
pub fn decode_uint(v: &[u8]) -> Option<u32> {
    if v.len() > 4 {
        return None;
    }
    Some(v.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_a_get_with_path_and_query() {
        // CON GET mid 0x1234 token 0xAB, /sensors/temp?unit=c
        let mut m = Message::new(
            MessageType::Confirmable,
            Code::GET,
            0x1234,
            Token::new(&[0xAB]).unwrap(),
        );
        m.set_uri_path("sensors/temp");
        m.add_uri_query("unit=c");
        let bytes = m.encode().unwrap();
        assert_eq!(&bytes[..5], &[0x41, 0x01, 0x12, 0x34, 0xAB]);
        let d = Message::decode(&bytes).unwrap();
        assert_eq!(d.uri_path().unwrap(), vec!["sensors", "temp"]);
        assert_eq!(d.uri_query().unwrap(), vec!["unit=c"]);
        assert_eq!(d, m);
    }

    #[test]
    fn extended_delta_and_length_forms() {
        let mut m = Message::new(MessageType::NonConfirmable, Code::POST, 1, Token::default());
        m.add_option(option::URI_PATH, vec![b'a'; 20]); // length 13-form
        m.add_option(option::SIZE1, encode_uint(70_000)); // delta 49: 13-form
        m.add_option(3000, vec![b'x'; 300]); // delta and length 14-form
        m.payload = Bytes::from_static(b"hi");
        let bytes = m.encode().unwrap();
        assert_eq!(Message::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn reserved_nibble_is_a_format_error_answered_with_reset_for_con() {
        // CON, code GET, mid 7, option byte 0xF1 (delta 15 not the marker)
        let e = Message::decode(&[0x40, 0x01, 0x00, 0x07, 0xF1, 0x00]).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::ReservedNibble);
        assert_eq!(e.rejection(), Rejection::Reset { message_id: 7 });
        // The same as NON is dropped.
        let e = Message::decode(&[0x50, 0x01, 0x00, 0x07, 0x1F]).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::ReservedNibble);
        assert_eq!(e.rejection(), Rejection::Ignore);
    }

    #[test]
    fn payload_marker_without_payload_is_an_error() {
        let e = Message::decode(&[0x40, 0x02, 0x00, 0x01, 0xFF]).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::EmptyPayload);
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            Message::decode(&[0x40, 0x01]).unwrap_err().kind,
            DecodeErrorKind::TooShort
        );
        let e = Message::decode(&[0x80, 0x01, 0, 1]).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Version(2));
        assert_eq!(e.rejection(), Rejection::Ignore);
        let e = Message::decode(&[0x49, 0x01, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::TokenLength(9));
        assert_eq!(
            Message::decode(&[0x44, 0x01, 0, 1, 1]).unwrap_err().kind,
            DecodeErrorKind::Truncated
        );
        // An empty message must be exactly four bytes.
        assert_eq!(
            Message::decode(&[0x41, 0x00, 0, 1, 9]).unwrap_err().kind,
            DecodeErrorKind::NonEmptyEmpty
        );
        assert_eq!(
            Message::decode(&[0x40, 0x20, 0, 1]).unwrap_err().kind,
            DecodeErrorKind::ReservedClass(Code::new(1, 0))
        );
    }

    #[test]
    fn limits_bound_options_and_size() {
        let mut m = Message::new(MessageType::Confirmable, Code::GET, 1, Token::default());
        for _ in 0..5 {
            m.add_option(option::URI_PATH, Bytes::from_static(b"a"));
        }
        let bytes = m.encode().unwrap();
        let limits = DecodeLimits {
            max_size: 100,
            max_options: 4,
        };
        assert_eq!(
            Message::decode_with(&bytes, &limits).unwrap_err().kind,
            DecodeErrorKind::TooManyOptions(4)
        );
        let limits = DecodeLimits {
            max_size: 8,
            max_options: 64,
        };
        assert_eq!(
            Message::decode_with(&bytes, &limits).unwrap_err().kind,
            DecodeErrorKind::TooLarge(bytes.len())
        );
    }

    #[test]
    fn unrecognised_critical_option_in_con_request_is_bad_option() {
        let mut m = Message::new(
            MessageType::Confirmable,
            Code::GET,
            9,
            Token::new(&[1]).unwrap(),
        );
        m.add_option(option::PROXY_URI, Bytes::from_static(b"coap://x"));
        assert_eq!(
            m.option_rejection(),
            Some(Rejection::BadOption {
                message_id: 9,
                token: Token::new(&[1]).unwrap(),
                option: option::PROXY_URI
            })
        );
        // Unknown elective options are ignored.
        let mut m = Message::new(MessageType::Confirmable, Code::GET, 9, Token::default());
        m.add_option(1000, Bytes::from_static(b"x"));
        assert_eq!(m.option_rejection(), None);
        // A repeated non-repeatable critical option is bad, as is BERT.
        let mut m = Message::new(MessageType::Confirmable, Code::GET, 9, Token::default());
        m.add_option(option::ACCEPT, encode_uint(50));
        m.add_option(option::ACCEPT, encode_uint(60));
        assert_eq!(m.first_bad_critical_option(), Some(option::ACCEPT));
        let mut m = Message::new(MessageType::NonConfirmable, Code::PUT, 9, Token::default());
        m.set_uint_option(option::BLOCK1, 0x0F);
        assert_eq!(m.first_bad_critical_option(), Some(option::BLOCK1));
        assert_eq!(m.option_rejection(), Some(Rejection::Ignore));
    }

    #[test]
    fn block_values() {
        let b = BlockValue::new(5, true, 6).unwrap();
        assert_eq!(b.size(), 1024);
        assert_eq!(b.offset(), 5120);
        assert_eq!(BlockValue::from_uint(b.to_uint()).unwrap(), b);
        assert_eq!(BlockValue::from_uint(0x17), Err(OptionError::Bert));
        assert_eq!(BlockValue::new(MAX_BLOCK_NUM + 1, false, 0), None);
        assert_eq!(BlockValue::szx_for_size(512), Some(5));
        assert_eq!(BlockValue::szx_for_size(500), None);
        assert_eq!(BlockValue::szx_for_size(2048), None);
    }

    #[test]
    fn uint_encoding_is_minimal() {
        assert!(encode_uint(0).is_empty());
        assert_eq!(&encode_uint(0x0102)[..], &[1, 2]);
        assert_eq!(decode_uint(&[1, 2]), Some(0x0102));
        assert_eq!(decode_uint(&[1, 2, 3, 4, 5]), None);
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            0u8..4,
            prop_oneof![Just(0u8), 1u8..32, 0x40u8..0xC0],
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..=8),
            proptest::collection::vec(
                (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..300)),
                0..8,
            ),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(t, code, mid, token, opts, payload)| {
                let mtype = MessageType::from_bits(t);
                let code = Code(code);
                if code.is_empty() {
                    return Message::empty(mtype, mid);
                }
                let mut m = Message::new(mtype, code, mid, Token::new(&token).unwrap());
                for (n, v) in opts {
                    m.add_option(n, v);
                }
                m.payload = Bytes::from(payload);
                m
            })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(m in arb_message()) {
            let bytes = m.encode().unwrap();
            prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = Message::decode(&data) {
                // What decodes re-encodes to the same message.
                let again = Message::decode(&m.encode().unwrap()).unwrap();
                prop_assert_eq!(again, m.clone());
                let _ = m.option_rejection();
            }
        }

        #[test]
        fn block_option_round_trip(num in 0..=MAX_BLOCK_NUM, more: bool, szx in 0u8..=6) {
            let b = BlockValue::new(num, more, szx).unwrap();
            let mut m = Message::new(MessageType::Confirmable, Code::GET, 1, Token::default());
            m.set_block(option::BLOCK2, b);
            let d = Message::decode(&m.encode().unwrap()).unwrap();
            prop_assert_eq!(d.block2(), Some(Ok(b)));
        }
    }
}
