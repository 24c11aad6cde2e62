//! The Sparkplug B payload: a protobuf (proto2) message whose definition is
//! `sparkplug_b.proto` of the Eclipse Sparkplug specification.
//!
//! The structs below mirror that file field for field (same numbers, same
//! wire types) and derive [`prost::Message`], so there is no build script
//! and no `protoc`. proto2 `optional` scalars are `Option`s, so "absent" and
//! "zero" stay apart: a Sparkplug `seq` of 0 is meaningful, an absent one
//! (NDEATH) is not the same thing. Extension ranges are not modelled: prost
//! skips unknown fields, which is what a host that does not know a vendor's
//! extension should do.
//!
//! [`metric_value`] turns one metric into the platform's [`Value`], following
//! the datatype table of the specification (section "Datatype Details").

use m2mhub_telemetry::Value;
use prost::Message;

/// Why a payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not a protobuf encoding of `Payload` (truncated, wrong wire type,
    /// invalid UTF-8 in a string, nested deeper than prost's limit of 100).
    #[error("invalid Sparkplug B payload: {0}")]
    Invalid(String),
}

/// Decode a Sparkplug B payload from the bytes of an MQTT PUBLISH.
///
/// Memory is bounded by the input: every field prost allocates is backed by
/// bytes actually present, and nesting (templates in templates, property
/// sets in property sets) is capped by prost's recursion limit.
pub fn decode_payload(bytes: &[u8]) -> Result<Payload, PayloadError> {
    Payload::decode(bytes).map_err(|e| PayloadError::Invalid(e.to_string()))
}

/// Encode a payload (for NCMD/DCMD messages, tests and fuzz seeds).
pub fn encode_payload(payload: &Payload) -> Vec<u8> {
    payload.encode_to_vec()
}

/// The top-level Sparkplug B message.
#[derive(Clone, PartialEq, Message)]
pub struct Payload {
    /// Milliseconds since the epoch (UTC) at which the message was sent.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0..=255 in every edge-node message except NDEATH.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// One metric ("tag"): a name in births, an alias in data messages once
/// the birth has bound one.
#[derive(Clone, PartialEq, Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// Milliseconds since the epoch at which the value was captured.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// A [`DataType`] code; required in births, usually absent in data.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "8")]
    pub metadata: Option<MetaData>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19")]
    pub value: Option<MetricValue>,
}

/// The `value` oneof of a metric. Which arm a datatype uses is fixed by the
/// specification: 8-, 16- and 32-bit integers travel in `IntValue`, 64-bit
/// integers and DateTime in `LongValue`, arrays packed little-endian in
/// `BytesValue`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
    #[prost(message, tag = "17")]
    DatasetValue(DataSet),
    #[prost(message, tag = "18")]
    TemplateValue(Template),
    #[prost(message, tag = "19")]
    ExtensionValue(Extension),
}

/// Placeholder for the proto's `…Extension` messages (extension ranges
/// only): their contents are skipped.
#[derive(Clone, PartialEq, Message)]
pub struct Extension {}

/// Metadata of a metric (multi-part bytes, files).
#[derive(Clone, PartialEq, Message)]
pub struct MetaData {
    #[prost(bool, optional, tag = "1")]
    pub is_multi_part: Option<bool>,
    #[prost(string, optional, tag = "2")]
    pub content_type: Option<String>,
    #[prost(uint64, optional, tag = "3")]
    pub size: Option<u64>,
    #[prost(uint64, optional, tag = "4")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "5")]
    pub file_name: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub file_type: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub md5: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub description: Option<String>,
}

/// Key/value properties of a metric (engineering units, quality, …):
/// `keys[i]` names `values[i]`.
#[derive(Clone, PartialEq, Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PropertySetList {
    #[prost(message, repeated, tag = "1")]
    pub propertyset: Vec<PropertySet>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PropertyValue {
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyValueKind", tags = "3, 4, 5, 6, 7, 8, 9, 10, 11")]
    pub value: Option<PropertyValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyValueKind {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
    #[prost(message, tag = "9")]
    PropertysetValue(PropertySet),
    #[prost(message, tag = "10")]
    PropertysetsValue(PropertySetList),
    #[prost(message, tag = "11")]
    ExtensionValue(Extension),
}

/// A table value: typed columns and rows of cells.
#[derive(Clone, PartialEq, Message)]
pub struct DataSet {
    #[prost(uint64, optional, tag = "1")]
    pub num_of_columns: Option<u64>,
    #[prost(string, repeated, tag = "2")]
    pub columns: Vec<String>,
    #[prost(uint32, repeated, packed = "false", tag = "3")]
    pub types: Vec<u32>,
    #[prost(message, repeated, tag = "4")]
    pub rows: Vec<DataSetRow>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DataSetRow {
    #[prost(message, repeated, tag = "1")]
    pub elements: Vec<DataSetValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DataSetValue {
    #[prost(oneof = "DataSetValueKind", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub value: Option<DataSetValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum DataSetValueKind {
    #[prost(uint32, tag = "1")]
    IntValue(u32),
    #[prost(uint64, tag = "2")]
    LongValue(u64),
    #[prost(float, tag = "3")]
    FloatValue(f32),
    #[prost(double, tag = "4")]
    DoubleValue(f64),
    #[prost(bool, tag = "5")]
    BooleanValue(bool),
    #[prost(string, tag = "6")]
    StringValue(String),
    #[prost(message, tag = "7")]
    ExtensionValue(Extension),
}

/// A user-defined type (definition) or an instance of one.
#[derive(Clone, PartialEq, Message)]
pub struct Template {
    #[prost(string, optional, tag = "1")]
    pub version: Option<String>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(message, repeated, tag = "3")]
    pub parameters: Vec<TemplateParameter>,
    #[prost(string, optional, tag = "4")]
    pub template_ref: Option<String>,
    #[prost(bool, optional, tag = "5")]
    pub is_definition: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TemplateParameter {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint32, optional, tag = "2")]
    pub r#type: Option<u32>,
    #[prost(oneof = "ParameterValue", tags = "3, 4, 5, 6, 7, 8, 9")]
    pub value: Option<ParameterValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ParameterValue {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
    #[prost(message, tag = "9")]
    ExtensionValue(Extension),
}

/// Sparkplug datatype codes (the `DataType` enum of the proto). The field
/// that carries them is a plain `uint32`, so unknown codes are possible on
/// the wire: [`DataType::from_code`] answers `None` for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Unknown = 0,
    Int8 = 1,
    Int16 = 2,
    Int32 = 3,
    Int64 = 4,
    UInt8 = 5,
    UInt16 = 6,
    UInt32 = 7,
    UInt64 = 8,
    Float = 9,
    Double = 10,
    Boolean = 11,
    String = 12,
    DateTime = 13,
    Text = 14,
    Uuid = 15,
    DataSet = 16,
    Bytes = 17,
    File = 18,
    Template = 19,
    PropertySet = 20,
    PropertySetList = 21,
    Int8Array = 22,
    Int16Array = 23,
    Int32Array = 24,
    Int64Array = 25,
    UInt8Array = 26,
    UInt16Array = 27,
    UInt32Array = 28,
    UInt64Array = 29,
    FloatArray = 30,
    DoubleArray = 31,
    BooleanArray = 32,
    StringArray = 33,
    DateTimeArray = 34,
}

impl DataType {
    const ALL: [DataType; 35] = [
        Self::Unknown,
        Self::Int8,
        Self::Int16,
        Self::Int32,
        Self::Int64,
        Self::UInt8,
        Self::UInt16,
        Self::UInt32,
        Self::UInt64,
        Self::Float,
        Self::Double,
        Self::Boolean,
        Self::String,
        Self::DateTime,
        Self::Text,
        Self::Uuid,
        Self::DataSet,
        Self::Bytes,
        Self::File,
        Self::Template,
        Self::PropertySet,
        Self::PropertySetList,
        Self::Int8Array,
        Self::Int16Array,
        Self::Int32Array,
        Self::Int64Array,
        Self::UInt8Array,
        Self::UInt16Array,
        Self::UInt32Array,
        Self::UInt64Array,
        Self::FloatArray,
        Self::DoubleArray,
        Self::BooleanArray,
        Self::StringArray,
        Self::DateTimeArray,
    ];

    /// The datatype for a wire code, `None` for codes the specification
    /// does not define.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(code).ok()?).copied()
    }

    /// The wire code.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Why a metric yields no point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("datatype code {0} is not a Sparkplug datatype")]
    UnknownDataType(u32),
    #[error("the metric has no datatype (neither in this message nor in its birth)")]
    NoDataType,
    /// DataSet, Template, Bytes, File, property sets and arrays have no
    /// single number/bool/string to store.
    #[error("{0:?} metrics are not turned into points")]
    Unsupported(DataType),
    #[error("a {datatype:?} metric carries a {found} value")]
    Mismatch {
        datatype: DataType,
        found: &'static str,
    },
    #[error("the metric has no value and is not flagged null")]
    Missing,
    #[error("the metric's value is not a finite number")]
    NotFinite,
}

/// Turn a metric into a point value, given its datatype (from the metric
/// itself or, in a data message, from its birth).
///
/// `Ok(None)` is an explicit null (`is_null`). Integers follow the
/// specification: Int8/16/32 travel as two's complement in a `uint32`,
/// Int64 in a `uint64`. Encoders disagree on the upper bits (Java's sign-
/// extends to 32 bits, Python's masks to the type's width), so only the
/// type's own low bits are read, which gives the same number for both.
/// UInt64 and DateTime values above 2^53 lose precision as `f64`, which is
/// how every point is stored.
pub fn metric_value(metric: &Metric, datatype: DataType) -> Result<Option<Value>, ValueError> {
    if metric.is_null == Some(true) {
        return Ok(None);
    }
    let value = metric.value.as_ref().ok_or(ValueError::Missing)?;
    let mismatch = |found| ValueError::Mismatch { datatype, found };
    // Integers arrive in either integer arm from lenient encoders; the low
    // bits of the raw value are what counts.
    let raw_int = match value {
        MetricValue::IntValue(v) => Some(u64::from(*v)),
        MetricValue::LongValue(v) => Some(*v),
        _ => None,
    };
    let number = |n: f64| {
        if n.is_finite() {
            Ok(Some(Value::F64(n)))
        } else {
            Err(ValueError::NotFinite)
        }
    };
    match datatype {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let raw = raw_int.ok_or_else(|| mismatch(arm_name(value)))?;
            let n = match (datatype, value) {
                (DataType::Int8, _) => f64::from(raw as u8 as i8),
                (DataType::Int16, _) => f64::from(raw as u16 as i16),
                (DataType::Int32, _) => f64::from(raw as u32 as i32),
                // An Int64 squeezed into the 32-bit arm is a sign-extended int.
                (_, MetricValue::IntValue(v)) => f64::from(*v as i32),
                _ => raw as i64 as f64,
            };
            number(n)
        }
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => {
            let raw = raw_int.ok_or_else(|| mismatch(arm_name(value)))?;
            let n = match datatype {
                DataType::UInt8 => f64::from(raw as u8),
                DataType::UInt16 => f64::from(raw as u16),
                _ => f64::from(raw as u32),
            };
            number(n)
        }
        DataType::UInt64 | DataType::DateTime => {
            let raw = raw_int.ok_or_else(|| mismatch(arm_name(value)))?;
            number(raw as f64)
        }
        DataType::Float | DataType::Double => match value {
            MetricValue::FloatValue(f) => number(f64::from(*f)),
            MetricValue::DoubleValue(d) => number(*d),
            other => Err(mismatch(arm_name(other))),
        },
        DataType::Boolean => match value {
            MetricValue::BooleanValue(b) => Ok(Some(Value::Bool(*b))),
            other => Err(mismatch(arm_name(other))),
        },
        DataType::String | DataType::Text | DataType::Uuid => match value {
            MetricValue::StringValue(s) => Ok(Some(Value::Str(s.clone()))),
            other => Err(mismatch(arm_name(other))),
        },
        other => Err(ValueError::Unsupported(other)),
    }
}

/// The datatype a metric declares itself, if any.
pub fn declared_datatype(metric: &Metric) -> Result<Option<DataType>, ValueError> {
    match metric.datatype {
        None => Ok(None),
        Some(code) => DataType::from_code(code)
            .map(Some)
            .ok_or(ValueError::UnknownDataType(code)),
    }
}

fn arm_name(value: &MetricValue) -> &'static str {
    match value {
        MetricValue::IntValue(_) => "int_value",
        MetricValue::LongValue(_) => "long_value",
        MetricValue::FloatValue(_) => "float_value",
        MetricValue::DoubleValue(_) => "double_value",
        MetricValue::BooleanValue(_) => "boolean_value",
        MetricValue::StringValue(_) => "string_value",
        MetricValue::BytesValue(_) => "bytes_value",
        MetricValue::DatasetValue(_) => "dataset_value",
        MetricValue::TemplateValue(_) => "template_value",
        MetricValue::ExtensionValue(_) => "extension_value",
    }
}

impl Metric {
    /// A metric as a birth carries it: name, alias, datatype and value.
    pub fn birth(
        name: impl Into<String>,
        alias: Option<u64>,
        datatype: DataType,
        value: MetricValue,
    ) -> Self {
        Self {
            name: Some(name.into()),
            alias,
            datatype: Some(datatype.code()),
            value: Some(value),
            ..Self::default()
        }
    }

    /// A metric as a data message carries it: the alias bound in the birth
    /// and the value.
    pub fn aliased(alias: u64, value: MetricValue) -> Self {
        Self {
            alias: Some(alias),
            value: Some(value),
            ..Self::default()
        }
    }

    /// The same metric with a capture timestamp (ms since the epoch).
    pub fn at(mut self, timestamp_ms: u64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(datatype: DataType, v: MetricValue) -> Result<Option<Value>, ValueError> {
        metric_value(&Metric::birth("m", None, datatype, v.clone()), datatype)
    }

    #[test]
    fn signed_integers_read_only_their_own_width() {
        // Java (sign-extended to 32 bits) and Python (masked to the width)
        // encodings of -1 both read as -1.
        for raw in [0xFFFF_FFFF_u32, 0xFF] {
            assert_eq!(
                int(DataType::Int8, MetricValue::IntValue(raw)),
                Ok(Some(Value::F64(-1.0)))
            );
        }
        assert_eq!(
            int(DataType::Int16, MetricValue::IntValue(0x8000)),
            Ok(Some(Value::F64(-32768.0)))
        );
        assert_eq!(
            int(DataType::Int32, MetricValue::IntValue(0xFFFF_FFFE)),
            Ok(Some(Value::F64(-2.0)))
        );
        assert_eq!(
            int(DataType::Int64, MetricValue::LongValue(u64::MAX)),
            Ok(Some(Value::F64(-1.0)))
        );
        assert_eq!(
            int(DataType::UInt32, MetricValue::IntValue(0xFFFF_FFFF)),
            Ok(Some(Value::F64(4_294_967_295.0)))
        );
        assert_eq!(
            int(DataType::UInt8, MetricValue::IntValue(200)),
            Ok(Some(Value::F64(200.0)))
        );
        assert_eq!(
            int(
                DataType::DateTime,
                MetricValue::LongValue(1_700_000_000_000)
            ),
            Ok(Some(Value::F64(1_700_000_000_000.0)))
        );
    }

    #[test]
    fn floats_bools_and_strings() {
        assert_eq!(
            int(DataType::Float, MetricValue::FloatValue(1.5)),
            Ok(Some(Value::F64(1.5)))
        );
        assert_eq!(
            int(DataType::Double, MetricValue::DoubleValue(f64::NAN)),
            Err(ValueError::NotFinite)
        );
        assert_eq!(
            int(DataType::Boolean, MetricValue::BooleanValue(true)),
            Ok(Some(Value::Bool(true)))
        );
        assert_eq!(
            int(DataType::Text, MetricValue::StringValue("hi".into())),
            Ok(Some(Value::Str("hi".into())))
        );
    }

    #[test]
    fn unsupported_and_mismatched_values_are_reported() {
        assert_eq!(
            int(DataType::Bytes, MetricValue::BytesValue(vec![1])),
            Err(ValueError::Unsupported(DataType::Bytes))
        );
        assert_eq!(
            int(DataType::Int32, MetricValue::StringValue("x".into())),
            Err(ValueError::Mismatch {
                datatype: DataType::Int32,
                found: "string_value"
            })
        );
        let mut null = Metric::birth("m", None, DataType::Int32, MetricValue::IntValue(0));
        null.is_null = Some(true);
        null.value = None;
        assert_eq!(metric_value(&null, DataType::Int32), Ok(None));
        null.is_null = None;
        assert_eq!(
            metric_value(&null, DataType::Int32),
            Err(ValueError::Missing)
        );
    }

    #[test]
    fn datatype_codes_round_trip() {
        for code in 0..=34 {
            let dt = DataType::from_code(code).expect("defined code");
            assert_eq!(dt.code(), code);
        }
        assert_eq!(DataType::from_code(35), None);
        assert_eq!(DataType::from_code(u32::MAX), None);
    }

    #[test]
    fn optional_fields_keep_absent_apart_from_zero() {
        let p = Payload {
            seq: Some(0),
            ..Payload::default()
        };
        let back = decode_payload(&encode_payload(&p)).expect("decodes");
        assert_eq!(back.seq, Some(0));
        assert_eq!(back.timestamp, None);
        assert!(decode_payload(&[0x0a, 0x05, 0x01]).is_err());
    }
}
