//! Decoding of device telemetry payloads into typed [`Point`]s.
//!
//! # Model
//!
//! A device publishes one payload; [`decode`] turns it into a flat list of
//! points, each a metric name, a timestamp in epoch milliseconds and a
//! [`Value`] (number, boolean or string). The crate is sans-IO: bytes in,
//! points out, no clocks (the caller passes the arrival time) and no async.
//!
//! Every format is first parsed into one small internal tree (maps with
//! text or integer keys, arrays, scalars), with the nesting depth bounded
//! by [`Limits::max_depth`]; format rules then run on that tree:
//!
//! * **JSON / CBOR objects** flatten: nested maps and arrays become dotted
//!   names (`{"engine":{"temp":90}}` → `engine.temp`, `{"a":[1,2]}` →
//!   `a.0`, `a.1`), nulls (and CBOR byte strings) are skipped, a top-level
//!   `ts` (epoch ms, an RFC 3339 string, or CBOR tag 1 epoch seconds) is
//!   the timestamp of all the object's points, else the arrival time. An
//!   array of objects is a batch. JSON object members come out in key
//!   order; CBOR map entries in payload order.
//! * **SenML** (RFC 8428) packs in JSON or CBOR: names are `bn + n`,
//!   times `bt + t` seconds, relative to arrival when below 2^28, values
//!   `v + bv`, `vs` or `vb`; records without a value are skipped.
//! * **Plain numbers** (`21.5`) become the metric `value`.
//!
//! [`sniff`] guesses the format when the content type is unknown. Limits
//! cap points per payload, nesting depth and metric-name length, and the
//! CBOR decoder never allocates ahead of the bytes actually present, so a
//! hostile payload costs work linear in its size.

#![forbid(unsafe_code)]

mod cbor;
pub mod fuzz;
mod rfc3339;

/// Parse an RFC 3339 timestamp into epoch milliseconds (the parser the
/// JSON decoder uses for `ts`, shared with the query API).
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    rfc3339::parse(s)
}
mod senml;

/// Nesting beyond this is refused whatever [`Limits::max_depth`] says, to
/// bound recursion (serde_json's own parser stops at 128 too).
const HARD_MAX_DEPTH: usize = 128;

/// A telemetry value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    F64(f64),
    Bool(bool),
    Str(String),
}

/// One decoded measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub metric: String,
    pub ts_ms: i64,
    pub value: Value,
}

/// Payload formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    Json,
    SenmlJson,
    SenmlCbor,
    Cbor,
    PlainNumber,
}

impl ContentType {
    /// Map a MIME type (parameters such as `; charset=utf-8` and case are
    /// ignored) to a content type.
    pub fn from_mime(s: &str) -> Option<Self> {
        let essence = s.split(';').next().unwrap_or("").trim();
        let is = |m: &str| essence.eq_ignore_ascii_case(m);
        if is("application/json") {
            Some(Self::Json)
        } else if is("application/senml+json") {
            Some(Self::SenmlJson)
        } else if is("application/senml+cbor") {
            Some(Self::SenmlCbor)
        } else if is("application/cbor") {
            Some(Self::Cbor)
        } else if is("text/plain") {
            Some(Self::PlainNumber)
        } else {
            None
        }
    }
}

/// Why a payload was rejected; the messages are meant for a device log.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("payload format not recognised (not JSON, CBOR or a plain number)")]
    UnknownFormat,
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("invalid CBOR: {0}")]
    InvalidCbor(String),
    #[error("not a plain number: {0}")]
    InvalidNumber(String),
    #[error("expected an object: {0}")]
    NotAnObject(&'static str),
    #[error("invalid SenML: {0}")]
    InvalidSenml(String),
    #[error("bad timestamp: {0}")]
    BadTimestamp(String),
    #[error("payload nested too deeply")]
    TooDeep,
    #[error("payload has more than {0} points")]
    TooManyPoints(usize),
    #[error("metric name longer than {0} bytes")]
    MetricTooLong(usize),
    #[error("empty metric name")]
    EmptyMetricName,
}

/// Per-payload resource limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most points one payload may produce (default 10 000).
    pub max_points: usize,
    /// Deepest nesting of arrays/maps (CBOR tags count as a level too);
    /// default 16, never more than 128.
    pub max_depth: usize,
    /// Longest metric name in bytes (default 256).
    pub max_metric_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_points: 10_000,
            max_depth: 16,
            max_metric_len: 256,
        }
    }
}

/// Internal parse tree shared by the JSON and CBOR front ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Num(f64),
    Str(String),
    /// A CBOR byte string (contents dropped: no point representation).
    Bytes,
    /// CBOR tag 1: seconds since the epoch.
    Time(f64),
    Array(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

impl Node {
    fn as_f64(&self) -> Option<f64> {
        match self {
            Node::Int(i) => Some(*i as f64),
            Node::Num(f) | Node::Time(f) => Some(*f),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Key {
    Text(String),
    Int(i128),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Text(s) => f.write_str(s),
            Key::Int(i) => write!(f, "{i}"),
        }
    }
}

/// Output accumulator enforcing the point and name limits.
pub(crate) struct Out(Vec<Point>);

impl Out {
    fn push(
        &mut self,
        metric: String,
        ts_ms: i64,
        value: Value,
        limits: &Limits,
    ) -> Result<(), DecodeError> {
        if metric.is_empty() {
            return Err(DecodeError::EmptyMetricName);
        }
        if metric.len() > limits.max_metric_len {
            return Err(DecodeError::MetricTooLong(limits.max_metric_len));
        }
        if self.0.len() >= limits.max_points {
            return Err(DecodeError::TooManyPoints(limits.max_points));
        }
        self.0.push(Point {
            metric,
            ts_ms,
            value,
        });
        Ok(())
    }
}

/// Seconds (possibly fractional) to whole milliseconds, rounding.
pub(crate) fn secs_to_ms(secs: f64) -> Result<i64, DecodeError> {
    ms_to_i64(secs * 1000.0)
}

fn ms_to_i64(ms: f64) -> Result<i64, DecodeError> {
    let ms = ms.round();
    // i64::MAX as f64 rounds up to 2^63, which is itself out of range.
    if ms.is_finite() && ms >= i64::MIN as f64 && ms < i64::MAX as f64 {
        Ok(ms as i64)
    } else {
        Err(DecodeError::BadTimestamp(format!(
            "{ms} ms is out of range"
        )))
    }
}

fn max_depth(limits: &Limits) -> usize {
    limits.max_depth.min(HARD_MAX_DEPTH)
}

fn parse_json(payload: &[u8], limits: &Limits) -> Result<Node, DecodeError> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    from_json(v, 1, max_depth(limits))
}

fn from_json(v: serde_json::Value, level: usize, max: usize) -> Result<Node, DecodeError> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => Node::Null,
        J::Bool(b) => Node::Bool(b),
        J::Number(n) => Node::Num(
            n.as_f64()
                .ok_or_else(|| DecodeError::InvalidJson(format!("number {n} out of range")))?,
        ),
        J::String(s) => Node::Str(s),
        J::Array(items) => {
            if level > max {
                return Err(DecodeError::TooDeep);
            }
            Node::Array(
                items
                    .into_iter()
                    .map(|x| from_json(x, level + 1, max))
                    .collect::<Result<_, _>>()?,
            )
        }
        J::Object(map) => {
            if level > max {
                return Err(DecodeError::TooDeep);
            }
            Node::Map(
                map.into_iter()
                    .map(|(k, x)| Ok((Key::Text(k), from_json(x, level + 1, max)?)))
                    .collect::<Result<_, DecodeError>>()?,
            )
        }
    })
}

fn parse_cbor(payload: &[u8], limits: &Limits) -> Result<Node, DecodeError> {
    cbor::parse(payload, max_depth(limits))
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// CBOR arrays (0x80–0x9f), maps (0xa0–0xbf) and tags (0xc0–0xdb, e.g. the
/// self-describe tag 55799) are never the first byte of ASCII text.
fn looks_cbor(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(0x80..=0xdb))
}

/// The grammar of a JSON number, with an optional leading `+`.
fn plain_number(payload: &[u8]) -> Result<f64, DecodeError> {
    let text = trim_ascii(payload);
    let bad = || {
        DecodeError::InvalidNumber(
            String::from_utf8_lossy(&text[..text.len().min(32)]).into_owned(),
        )
    };
    let s = std::str::from_utf8(text).map_err(|_| bad())?;
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit());
    let ok = digits(int)
        && !matches!(frac, Some(f) if !digits(f))
        && !matches!(exponent, Some(e) if !digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    if !ok {
        return Err(bad());
    }
    let v: f64 = s.parse().map_err(|_| bad())?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(bad())
    }
}

/// Guess the content type of a payload, or `None` if it is none of them.
///
/// JSON objects are [`ContentType::Json`]; JSON arrays are SenML when every
/// element is an object using only SenML labels and at least one has a
/// name or value (`n`, `bn`, `v`, `vs`, `vb`), else a JSON batch. A first
/// byte of CBOR major type 4, 5 or 6 (array, map, tag) means CBOR, SenML
/// CBOR by the same test on integer labels. ASCII numbers are
/// [`ContentType::PlainNumber`].
pub fn sniff(payload: &[u8]) -> Option<ContentType> {
    sniff_with(payload, &Limits::default()).map(|(ct, _)| ct)
}

/// Sniff, handing back the parse tree when sniffing needed one.
fn sniff_with(
    payload: &[u8],
    limits: &Limits,
) -> Option<(ContentType, Option<Result<Node, DecodeError>>)> {
    if looks_cbor(payload) {
        let node = parse_cbor(payload, limits);
        let ct = match &node {
            Ok(n) if senml::looks_like_pack(n) => ContentType::SenmlCbor,
            _ => ContentType::Cbor,
        };
        return Some((ct, Some(node)));
    }
    let text = trim_ascii(payload);
    match text.first()? {
        b'{' => Some((ContentType::Json, None)),
        b'[' => {
            let node = parse_json(payload, limits);
            let ct = match &node {
                Ok(n) if senml::looks_like_pack(n) => ContentType::SenmlJson,
                _ => ContentType::Json,
            };
            Some((ct, Some(node)))
        }
        _ if plain_number(text).is_ok() => Some((ContentType::PlainNumber, None)),
        _ => None,
    }
}

/// Decode with an explicit content type, or sniff it when `None` (see
/// [`sniff`]). `arrival_ms` (epoch ms) stamps points that carry no time
/// and anchors SenML relative times.
pub fn decode(
    payload: &[u8],
    content_type: Option<ContentType>,
    arrival_ms: i64,
    limits: &Limits,
) -> Result<Vec<Point>, DecodeError> {
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    let (ct, parsed) = match content_type {
        Some(ct) => (ct, None),
        None => {
            if trim_ascii(payload).is_empty() {
                return Err(DecodeError::Empty);
            }
            sniff_with(payload, limits).ok_or(DecodeError::UnknownFormat)?
        }
    };
    let mut out = Out(Vec::new());
    match ct {
        ContentType::PlainNumber => {
            if trim_ascii(payload).is_empty() {
                return Err(DecodeError::Empty);
            }
            let v = plain_number(payload)?;
            out.push("value".into(), arrival_ms, Value::F64(v), limits)?;
        }
        ContentType::Json | ContentType::Cbor => {
            let node = match parsed {
                Some(node) => node?,
                None if ct == ContentType::Json => parse_json(payload, limits)?,
                None => parse_cbor(payload, limits)?,
            };
            flatten_top(node, arrival_ms, limits, &mut out)?;
        }
        ContentType::SenmlJson | ContentType::SenmlCbor => {
            let node = match parsed {
                Some(node) => node?,
                None if ct == ContentType::SenmlJson => parse_json(payload, limits)?,
                None => parse_cbor(payload, limits)?,
            };
            senml::resolve(node, arrival_ms, limits, &mut out)?;
        }
    }
    Ok(out.0)
}

fn flatten_top(
    node: Node,
    arrival_ms: i64,
    limits: &Limits,
    out: &mut Out,
) -> Result<(), DecodeError> {
    match node {
        Node::Map(entries) => flatten_object(entries, arrival_ms, limits, out),
        Node::Array(items) => {
            for item in items {
                match item {
                    Node::Map(entries) => flatten_object(entries, arrival_ms, limits, out)?,
                    _ => return Err(DecodeError::NotAnObject("batch element is not an object")),
                }
            }
            Ok(())
        }
        _ => Err(DecodeError::NotAnObject(
            "payload must be an object or an array of objects",
        )),
    }
}

fn is_ts(key: &Key) -> bool {
    matches!(key, Key::Text(s) if s == "ts")
}

fn flatten_object(
    entries: Vec<(Key, Node)>,
    arrival_ms: i64,
    limits: &Limits,
    out: &mut Out,
) -> Result<(), DecodeError> {
    let mut ts = arrival_ms;
    for (key, node) in &entries {
        if is_ts(key) {
            ts = timestamp(node)?;
        }
    }
    for (key, node) in entries {
        if !is_ts(&key) {
            flatten_value(key.to_string(), node, ts, limits, out)?;
        }
    }
    Ok(())
}

/// A top-level `ts`: epoch milliseconds, an RFC 3339 string, or a CBOR
/// tag 1 (epoch seconds).
fn timestamp(node: &Node) -> Result<i64, DecodeError> {
    match node {
        Node::Int(_) | Node::Num(_) => ms_to_i64(node.as_f64().unwrap_or(f64::NAN)),
        Node::Time(secs) => secs_to_ms(*secs),
        Node::Str(s) => rfc3339::parse(s).map_err(DecodeError::BadTimestamp),
        _ => Err(DecodeError::BadTimestamp(
            "ts must be epoch milliseconds or an RFC 3339 string".into(),
        )),
    }
}

fn flatten_value(
    name: String,
    node: Node,
    ts: i64,
    limits: &Limits,
    out: &mut Out,
) -> Result<(), DecodeError> {
    let value = match node {
        Node::Null | Node::Bytes => return Ok(()),
        Node::Bool(b) => Value::Bool(b),
        Node::Int(i) => Value::F64(i as f64),
        Node::Num(f) | Node::Time(f) => Value::F64(f),
        Node::Str(s) => Value::Str(s),
        Node::Array(items) => {
            for (i, item) in items.into_iter().enumerate() {
                flatten_value(format!("{name}.{i}"), item, ts, limits, out)?;
            }
            return Ok(());
        }
        Node::Map(entries) => {
            for (key, item) in entries {
                flatten_value(format!("{name}.{key}"), item, ts, limits, out)?;
            }
            return Ok(());
        }
    };
    out.push(name, ts, value, limits)
}

#[cfg(test)]
mod tests;
