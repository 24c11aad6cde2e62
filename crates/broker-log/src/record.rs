//! Hand-rolled binary encoding of log records.
//!
//! File layout: the 8-byte magic [`MAGIC`], then records
//! `[u32 LE body len][u32 LE crc32(body)][body]`. A body is a batch:
//! `u32 LE entry count` followed by entries, each a tag byte and its fields.
//! Integers are little-endian; strings and byte strings are `u32` length
//! prefixed; an `Option` is a presence byte (0/1) followed by the value.

use std::sync::Arc;

use bytes::Bytes;

use crate::{Op, StoredMessage, StoredSession, StoredSubscription};

/// Magic at the start of the log file.
pub(crate) const MAGIC: &[u8; 8] = b"M2MHLOG1";
/// `[len][crc]` in front of every record body.
pub(crate) const RECORD_HEADER_LEN: usize = 8;

const TAG_RETAIN_PUT: u8 = 1;
const TAG_RETAIN_DELETE: u8 = 2;
const TAG_SESSION_PUT: u8 = 3;
const TAG_SESSION_DELETE: u8 = 4;
const TAG_ENQUEUE: u8 = 5;
const TAG_ACK: u8 = 6;
/// Internal: the store has seen seqs below this value (written by compaction
/// so `next_seq` survives even when every queued message was acknowledged).
const TAG_SEQ_FLOOR: u8 = 0x40;

/// One decoded entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Op(Op),
    SeqFloor(u64),
}

/// A batch exceeded the u32 body length limit.
#[derive(Debug)]
pub(crate) struct TooLarge(pub usize);

/// Appends one record to a buffer, entry by entry.
pub(crate) struct RecordBuilder<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
    count: u32,
}

impl<'a> RecordBuilder<'a> {
    pub(crate) fn begin(buf: &'a mut Vec<u8>) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN + 4]);
        RecordBuilder {
            buf,
            start,
            count: 0,
        }
    }

    /// Bytes of body written so far.
    pub(crate) fn body_len(&self) -> usize {
        self.buf.len() - self.start - RECORD_HEADER_LEN
    }

    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    pub(crate) fn op(&mut self, op: &Op) {
        match op {
            Op::RetainPut(msg) => self.retain_put(msg),
            Op::RetainDelete { topic } => {
                self.buf.push(TAG_RETAIN_DELETE);
                put_str(self.buf, topic);
                self.count += 1;
            }
            Op::SessionPut(session) => self.session_put(session),
            Op::SessionDelete { client_id } => {
                self.buf.push(TAG_SESSION_DELETE);
                put_str(self.buf, client_id);
                self.count += 1;
            }
            Op::Enqueue {
                client_id,
                seq,
                msg,
            } => self.enqueue(client_id, *seq, msg),
            Op::Ack { client_id, seq } => {
                self.buf.push(TAG_ACK);
                put_str(self.buf, client_id);
                self.buf.extend_from_slice(&seq.to_le_bytes());
                self.count += 1;
            }
        }
    }

    pub(crate) fn retain_put(&mut self, msg: &StoredMessage) {
        self.buf.push(TAG_RETAIN_PUT);
        put_message(self.buf, msg);
        self.count += 1;
    }

    pub(crate) fn session_put(&mut self, session: &StoredSession) {
        self.buf.push(TAG_SESSION_PUT);
        put_session(self.buf, session);
        self.count += 1;
    }

    pub(crate) fn enqueue(&mut self, client_id: &str, seq: u64, msg: &StoredMessage) {
        self.buf.push(TAG_ENQUEUE);
        put_str(self.buf, client_id);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        put_message(self.buf, msg);
        self.count += 1;
    }

    pub(crate) fn seq_floor(&mut self, next_seq: u64) {
        self.buf.push(TAG_SEQ_FLOOR);
        self.buf.extend_from_slice(&next_seq.to_le_bytes());
        self.count += 1;
    }

    /// Fill in the header. On error the buffer is restored to its state before `begin`.
    pub(crate) fn finish(self) -> Result<(), TooLarge> {
        let body_len = self.body_len();
        let Ok(len32) = u32::try_from(body_len) else {
            self.buf.truncate(self.start);
            return Err(TooLarge(body_len));
        };
        let body_start = self.start + RECORD_HEADER_LEN;
        self.buf[body_start..body_start + 4].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[body_start..]);
        self.buf[self.start..self.start + 4].copy_from_slice(&len32.to_le_bytes());
        self.buf[self.start + 4..body_start].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }
}

/// Encode `ops` as one record appended to `buf`.
pub(crate) fn encode_batch(buf: &mut Vec<u8>, ops: &[Op]) -> Result<(), TooLarge> {
    let mut builder = RecordBuilder::begin(buf);
    for op in ops {
        builder.op(op);
    }
    builder.finish()
}

/// Parse a record header: (body len, crc).
pub(crate) fn parse_header(header: &[u8; RECORD_HEADER_LEN]) -> (u32, u32) {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    (len, crc)
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_bytes(buf, s.as_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    // Lengths beyond u32 are caught by the record size check in `finish`
    // (the record would exceed u32::MAX too), so saturating is never observed.
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(b);
}

fn put_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            buf.push(1);
            put_str(buf, s);
        }
        None => buf.push(0),
    }
}

fn put_message(buf: &mut Vec<u8>, msg: &StoredMessage) {
    put_str(buf, &msg.topic);
    put_bytes(buf, &msg.payload);
    buf.push(msg.qos);
    buf.push(u8::from(msg.retain));
    match msg.payload_format_indicator {
        Some(v) => buf.extend_from_slice(&[1, v]),
        None => buf.push(0),
    }
    match msg.expires_at_ms {
        Some(v) => {
            buf.push(1);
            buf.extend_from_slice(&v.to_le_bytes());
        }
        None => buf.push(0),
    }
    put_opt_str(buf, msg.content_type.as_deref());
    put_opt_str(buf, msg.response_topic.as_deref());
    match &msg.correlation_data {
        Some(v) => {
            buf.push(1);
            put_bytes(buf, v);
        }
        None => buf.push(0),
    }
    let n = u32::try_from(msg.user_properties.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&n.to_le_bytes());
    for (k, v) in &msg.user_properties {
        put_str(buf, k);
        put_str(buf, v);
    }
}

fn put_session(buf: &mut Vec<u8>, s: &StoredSession) {
    put_str(buf, &s.client_id);
    buf.push(u8::from(s.protocol_v5));
    buf.extend_from_slice(&s.expiry_interval.to_le_bytes());
    match s.disconnected_at_ms {
        Some(v) => {
            buf.push(1);
            buf.extend_from_slice(&v.to_le_bytes());
        }
        None => buf.push(0),
    }
    let n = u32::try_from(s.subscriptions.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&n.to_le_bytes());
    for sub in &s.subscriptions {
        put_str(buf, &sub.filter);
        buf.push(sub.options);
        match sub.subscription_id {
            Some(id) => {
                buf.push(1);
                buf.extend_from_slice(&id.to_le_bytes());
            }
            None => buf.push(0),
        }
    }
}

/// Encoded size of a message (used to estimate the live size).
pub(crate) fn message_len(msg: &StoredMessage) -> u64 {
    let opt_str = |s: &Option<String>| s.as_ref().map_or(1, |s| 5 + s.len());
    let props: usize = msg
        .user_properties
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    let len = 4
        + msg.topic.len()
        + 4
        + msg.payload.len()
        + 2
        + msg.payload_format_indicator.map_or(1, |_| 2)
        + msg.expires_at_ms.map_or(1, |_| 9)
        + opt_str(&msg.content_type)
        + opt_str(&msg.response_topic)
        + msg.correlation_data.as_ref().map_or(1, |c| 5 + c.len())
        + 4
        + props;
    len as u64
}

/// Encoded size of a session's metadata.
pub(crate) fn session_len(s: &StoredSession) -> u64 {
    let subs: usize = s
        .subscriptions
        .iter()
        .map(|x| 4 + x.filter.len() + 1 + x.subscription_id.map_or(1, |_| 5))
        .sum();
    let disc = s.disconnected_at_ms.map_or(1, |_| 9);
    (4 + s.client_id.len() + 1 + 4 + disc + 4 + subs) as u64
}

/// A malformed body (the CRC matched but the content does not parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError("field runs past end of record"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError("invalid boolean/presence byte")),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError("string is not valid UTF-8"))
    }

    fn opt_string(&mut self) -> Result<Option<String>, DecodeError> {
        Ok(if self.bool()? {
            Some(self.string()?)
        } else {
            None
        })
    }

    /// A count of items each at least `min_size` bytes, checked against the remaining bytes.
    fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.remaining() {
            return Err(DecodeError("item count exceeds record size"));
        }
        Ok(n)
    }

    fn message(&mut self) -> Result<StoredMessage, DecodeError> {
        let topic = self.string()?;
        let payload = Bytes::copy_from_slice(self.bytes()?);
        let qos = self.u8()?;
        let retain = self.bool()?;
        let payload_format_indicator = if self.bool()? { Some(self.u8()?) } else { None };
        let expires_at_ms = if self.bool()? {
            Some(self.u64()?)
        } else {
            None
        };
        let content_type = self.opt_string()?;
        let response_topic = self.opt_string()?;
        let correlation_data = if self.bool()? {
            Some(Bytes::copy_from_slice(self.bytes()?))
        } else {
            None
        };
        let n = self.count(8)?;
        let mut user_properties = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.string()?;
            let v = self.string()?;
            user_properties.push((k, v));
        }
        Ok(StoredMessage {
            topic,
            payload,
            qos,
            retain,
            payload_format_indicator,
            expires_at_ms,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
        })
    }

    fn session(&mut self) -> Result<StoredSession, DecodeError> {
        let client_id = self.string()?;
        let protocol_v5 = self.bool()?;
        let expiry_interval = self.u32()?;
        let disconnected_at_ms = if self.bool()? {
            Some(self.u64()?)
        } else {
            None
        };
        let n = self.count(6)?;
        let mut subscriptions = Vec::with_capacity(n);
        for _ in 0..n {
            let filter = self.string()?;
            let options = self.u8()?;
            let subscription_id = if self.bool()? {
                Some(self.u32()?)
            } else {
                None
            };
            subscriptions.push(StoredSubscription {
                filter,
                options,
                subscription_id,
            });
        }
        Ok(StoredSession {
            client_id,
            protocol_v5,
            expiry_interval,
            disconnected_at_ms,
            subscriptions,
        })
    }

    fn entry(&mut self) -> Result<Entry, DecodeError> {
        let op = match self.u8()? {
            TAG_RETAIN_PUT => Op::RetainPut(Arc::new(self.message()?)),
            TAG_RETAIN_DELETE => Op::RetainDelete {
                topic: self.string()?,
            },
            TAG_SESSION_PUT => Op::SessionPut(self.session()?),
            TAG_SESSION_DELETE => Op::SessionDelete {
                client_id: self.string()?,
            },
            TAG_ENQUEUE => {
                let client_id = self.string()?;
                let seq = self.u64()?;
                let msg = Arc::new(self.message()?);
                Op::Enqueue {
                    client_id,
                    seq,
                    msg,
                }
            }
            TAG_ACK => Op::Ack {
                client_id: self.string()?,
                seq: self.u64()?,
            },
            TAG_SEQ_FLOOR => return Ok(Entry::SeqFloor(self.u64()?)),
            _ => return Err(DecodeError("unknown op tag")),
        };
        Ok(Entry::Op(op))
    }
}

/// Decode a record body (whose CRC has already been checked).
pub(crate) fn decode_batch(body: &[u8]) -> Result<Vec<Entry>, DecodeError> {
    let mut r = Reader { data: body, pos: 0 };
    let n = r.count(1)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        entries.push(r.entry()?);
    }
    if r.remaining() != 0 {
        return Err(DecodeError("trailing bytes after last op"));
    }
    Ok(entries)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z/+#é]{0,12}", any::<String>()]
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
    }

    pub(crate) fn arb_message() -> impl Strategy<Value = StoredMessage> {
        (
            (arb_string(), arb_bytes(), 0u8..3, any::<bool>()),
            (
                proptest::option::of(any::<u8>()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(arb_string()),
                proptest::option::of(arb_string()),
                proptest::option::of(arb_bytes()),
                proptest::collection::vec((arb_string(), arb_string()), 0..3),
            ),
        )
            .prop_map(
                |((topic, payload, qos, retain), (pfi, exp, ct, rt, cd, up))| StoredMessage {
                    topic,
                    payload,
                    qos,
                    retain,
                    payload_format_indicator: pfi,
                    expires_at_ms: exp,
                    content_type: ct,
                    response_topic: rt,
                    correlation_data: cd,
                    user_properties: up,
                },
            )
    }

    fn arb_session() -> impl Strategy<Value = StoredSession> {
        (
            arb_string(),
            any::<bool>(),
            any::<u32>(),
            proptest::option::of(any::<u64>()),
            proptest::collection::vec(
                (
                    arb_string(),
                    any::<u8>(),
                    proptest::option::of(any::<u32>()),
                )
                    .prop_map(|(filter, options, subscription_id)| {
                        StoredSubscription {
                            filter,
                            options,
                            subscription_id,
                        }
                    }),
                0..4,
            ),
        )
            .prop_map(
                |(client_id, protocol_v5, expiry_interval, disconnected_at_ms, subscriptions)| {
                    StoredSession {
                        client_id,
                        protocol_v5,
                        expiry_interval,
                        disconnected_at_ms,
                        subscriptions,
                    }
                },
            )
    }

    pub(crate) fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            arb_message().prop_map(|m| Op::RetainPut(Arc::new(m))),
            arb_string().prop_map(|topic| Op::RetainDelete { topic }),
            arb_session().prop_map(Op::SessionPut),
            arb_string().prop_map(|client_id| Op::SessionDelete { client_id }),
            (arb_string(), any::<u64>(), arb_message()).prop_map(|(client_id, seq, m)| {
                Op::Enqueue {
                    client_id,
                    seq,
                    msg: Arc::new(m),
                }
            }),
            (arb_string(), any::<u64>()).prop_map(|(client_id, seq)| Op::Ack { client_id, seq }),
        ]
    }

    fn decode_record(buf: &[u8]) -> Vec<Entry> {
        let mut header = [0u8; RECORD_HEADER_LEN];
        header.copy_from_slice(&buf[..RECORD_HEADER_LEN]);
        let (len, crc) = parse_header(&header);
        let body = &buf[RECORD_HEADER_LEN..];
        assert_eq!(len as usize, body.len());
        assert_eq!(crc, crc32fast::hash(body));
        decode_batch(body).expect("decodes")
    }

    proptest! {
        #[test]
        fn batch_round_trip(ops in proptest::collection::vec(arb_op(), 0..8)) {
            let mut buf = Vec::new();
            encode_batch(&mut buf, &ops).expect("fits");
            let decoded = decode_record(&buf);
            let expected: Vec<Entry> = ops.into_iter().map(Entry::Op).collect();
            prop_assert_eq!(decoded, expected);
        }

        #[test]
        fn message_len_matches_encoding(m in arb_message()) {
            let mut buf = Vec::new();
            put_message(&mut buf, &m);
            prop_assert_eq!(buf.len() as u64, message_len(&m));
        }

        #[test]
        fn truncated_body_never_panics(ops in proptest::collection::vec(arb_op(), 1..4), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode_batch(&mut buf, &ops).expect("fits");
            let body = &buf[RECORD_HEADER_LEN..];
            let cut = cut.index(body.len());
            prop_assert!(decode_batch(&body[..cut]).is_err());
        }
    }

    #[test]
    fn seq_floor_round_trip() {
        let mut buf = Vec::new();
        let mut b = RecordBuilder::begin(&mut buf);
        b.seq_floor(42);
        b.retain_put(&StoredMessage {
            topic: "a".into(),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain: true,
            payload_format_indicator: None,
            expires_at_ms: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        });
        assert_eq!(b.count(), 2);
        b.finish().expect("fits");
        let entries = decode_record(&buf);
        assert_eq!(entries[0], Entry::SeqFloor(42));
        assert!(matches!(entries[1], Entry::Op(Op::RetainPut(_))));
    }

    #[test]
    fn session_len_matches_encoding() {
        let s = StoredSession {
            client_id: "abc".into(),
            protocol_v5: true,
            expiry_interval: 5,
            disconnected_at_ms: Some(1),
            subscriptions: vec![StoredSubscription {
                filter: "a/#".into(),
                options: 1,
                subscription_id: Some(3),
            }],
        };
        let mut buf = Vec::new();
        put_session(&mut buf, &s);
        assert_eq!(buf.len() as u64, session_len(&s));
    }
}
