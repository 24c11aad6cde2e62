//! ChirpStack v4's MQTT integration: the events a LoRaWAN network server
//! publishes for each device, and the downlinks it accepts.
//!
//! ChirpStack publishes on `application/{application_id}/device/{dev_eui}/event/{kind}`
//! (its default `event_topic`), with `kind` one of `up`, `join`, `status`,
//! `ack`, `txack`, `log`, `location`, `integration`. With the integration's
//! `json = true` the body is the event message of its `integration.proto` in
//! the protobuf JSON mapping: camelCase names (`deviceInfo`, `devEui`,
//! `fCnt`), fields at their default value (0, `false`, `""`) left out,
//! `bytes` in base64, enums as their names, timestamps in RFC 3339, and
//! `object` (what the device profile's codec decoded) as plain JSON. The
//! protobuf marshaler (`json = false`) is not read here.
//!
//! [`decode_event`] is stateless: one event in, one [`DecodedEvent`] out.
//! An uplink with an `object` becomes readings (nested keys joined with
//! `.`, as the platform's JSON decoder does, plus the link metrics `rssi`
//! and `snr` of the best gateway and the frame counter `fcnt`); an uplink
//! without one hands back the raw bytes and port for the platform's own
//! payload decoder. Downlinks are built by [`Downlink::encode`] for
//! `application/{application_id}/device/{dev_eui}/command/down`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use m2mhub_telemetry::{Limits, Point, Value};
use serde::{Deserialize, Deserializer, Serialize};

/// Why a ChirpStack message could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChirpstackError {
    #[error("not a ChirpStack event topic (application/{{id}}/device/{{dev_eui}}/event/{{kind}})")]
    Topic,
    #[error("unknown event kind {0:?}")]
    UnknownEvent(String),
    #[error("{0:?} is not a DevEUI (16 hex digits)")]
    InvalidDevEui(String),
    #[error("{0:?} is not an application id (non-empty, no '/', '+' or '#')")]
    InvalidApplicationId(String),
    #[error("not a JSON event (is the integration's json option off?)")]
    NotJson,
    #[error("invalid {kind} event: {message}")]
    Json { kind: &'static str, message: String },
    #[error("invalid base64 in data")]
    Base64,
    #[error("the event is for DevEUI {payload}, its topic for {topic}")]
    DevEuiMismatch { topic: DevEui, payload: String },
    #[error("the event is for application {payload}, its topic for {topic}")]
    ApplicationMismatch { topic: String, payload: String },
    #[error("object nested too deeply")]
    TooDeep,
    #[error("object has more than {0} readings")]
    TooManyReadings(usize),
    #[error("reading name longer than {0} bytes")]
    NameTooLong(usize),
    #[error("empty reading name in object")]
    EmptyName,
    #[error("fPort {0} is not an application port (1..=223)")]
    InvalidFPort(u8),
}

/// A LoRaWAN device EUI: 16 hex digits, kept in lowercase (ChirpStack
/// writes lowercase; people type either).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevEui(String);

impl DevEui {
    pub fn parse(s: &str) -> Result<Self, ChirpstackError> {
        if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(ChirpstackError::InvalidDevEui(
                s.chars().take(32).collect::<String>(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DevEui {
    type Err = ChirpstackError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for DevEui {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The event kinds of the MQTT integration (the last topic level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Up,
    Join,
    Status,
    Ack,
    TxAck,
    Log,
    Location,
    Integration,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        Self::Up,
        Self::Join,
        Self::Status,
        Self::Ack,
        Self::TxAck,
        Self::Log,
        Self::Location,
        Self::Integration,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Join => "join",
            Self::Status => "status",
            Self::Ack => "ack",
            Self::TxAck => "txack",
            Self::Log => "log",
            Self::Location => "location",
            Self::Integration => "integration",
        }
    }

    fn from_token(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A parsed event topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventTopic {
    pub application_id: String,
    pub dev_eui: DevEui,
    pub event: EventKind,
}

/// Parse `application/{application_id}/device/{dev_eui}/event/{kind}`.
pub fn parse_event_topic(topic: &str) -> Result<EventTopic, ChirpstackError> {
    let levels: Vec<&str> = topic.splitn(7, '/').collect();
    let ["application", app, "device", dev_eui, "event", kind] = levels.as_slice() else {
        return Err(ChirpstackError::Topic);
    };
    Ok(EventTopic {
        application_id: checked_application_id(app)?,
        dev_eui: DevEui::parse(dev_eui)?,
        event: EventKind::from_token(kind)
            .ok_or_else(|| ChirpstackError::UnknownEvent(kind.chars().take(32).collect()))?,
    })
}

fn checked_application_id(id: &str) -> Result<String, ChirpstackError> {
    if id.is_empty() || id.contains(['/', '+', '#']) {
        return Err(ChirpstackError::InvalidApplicationId(
            id.chars().take(64).collect(),
        ));
    }
    Ok(id.to_owned())
}

// ---------------------------------------------------------------------------
// Event documents: `integration.proto` in the protobuf JSON mapping. Every
// field is defaulted, since the mapping leaves out default values, and
// unknown fields are ignored, since ChirpStack adds fields across versions.
// ---------------------------------------------------------------------------

/// Who the event is about (`DeviceInfo`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceInfo {
    pub tenant_id: String,
    pub tenant_name: String,
    pub application_id: String,
    pub application_name: String,
    pub device_profile_id: String,
    pub device_profile_name: String,
    pub device_name: String,
    pub dev_eui: String,
    #[serde(deserialize_with = "enum_name")]
    pub device_class_enabled: String,
    pub tags: BTreeMap<String, String>,
}

/// One receiving gateway (`gw.UplinkRxInfo`), the fields the platform uses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UplinkRxInfo {
    pub gateway_id: String,
    pub uplink_id: u32,
    pub rssi: i32,
    pub snr: f32,
    pub channel: u32,
    pub rf_chain: u32,
    pub location: Option<Location>,
    #[serde(deserialize_with = "enum_name")]
    pub crc_status: String,
}

/// Transmission parameters of an uplink (`gw.UplinkTxInfo`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UplinkTxInfo {
    /// Hz.
    pub frequency: u32,
    pub modulation: Option<Modulation>,
}

/// `gw.Modulation`: one of LoRa, FSK, LR-FHSS parameters.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Modulation {
    pub lora: Option<LoraModulationInfo>,
    pub fsk: Option<serde_json::Value>,
    pub lr_fhss: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoraModulationInfo {
    /// Hz.
    pub bandwidth: u32,
    pub spreading_factor: u32,
    #[serde(deserialize_with = "enum_name")]
    pub code_rate: String,
    pub polarization_inversion: bool,
}

/// `common.Location`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Location {
    pub latitude: f64,
    pub longitude: f64,
    pub altitude: f64,
    #[serde(deserialize_with = "enum_name")]
    pub source: String,
    pub accuracy: f32,
}

/// `UplinkEvent` (`…/event/up`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UplinkEvent {
    pub deduplication_id: String,
    pub time: Option<String>,
    pub device_info: Option<DeviceInfo>,
    pub dev_addr: String,
    pub adr: bool,
    pub dr: u32,
    pub f_cnt: u32,
    pub f_port: u32,
    pub confirmed: bool,
    /// FRMPayload, base64.
    pub data: String,
    /// Set when the device profile has a codec.
    pub object: Option<serde_json::Map<String, serde_json::Value>>,
    pub rx_info: Vec<UplinkRxInfo>,
    pub tx_info: Option<UplinkTxInfo>,
    pub region_config_id: String,
}

/// `JoinEvent` (`…/event/join`), sent at the first uplink after OTAA.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct JoinEvent {
    pub deduplication_id: String,
    pub time: Option<String>,
    pub device_info: Option<DeviceInfo>,
    pub dev_addr: String,
    pub region_config_id: String,
}

/// `StatusEvent` (`…/event/status`): the answer to a DevStatusReq.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusEvent {
    pub deduplication_id: String,
    pub time: Option<String>,
    pub device_info: Option<DeviceInfo>,
    /// Demodulation SNR margin of the last DevStatusReq, dB.
    pub margin: i32,
    pub external_power_source: bool,
    pub battery_level_unavailable: bool,
    /// Percent.
    pub battery_level: f32,
}

/// `AckEvent` (`…/event/ack`): a confirmed downlink was (not) acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AckEvent {
    pub deduplication_id: String,
    pub time: Option<String>,
    pub device_info: Option<DeviceInfo>,
    pub queue_item_id: String,
    pub acknowledged: bool,
    pub f_cnt_down: u32,
}

/// `TxAckEvent` (`…/event/txack`): a gateway accepted a downlink.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TxAckEvent {
    pub downlink_id: u32,
    pub time: Option<String>,
    pub device_info: Option<DeviceInfo>,
    pub queue_item_id: String,
    pub f_cnt_down: u32,
    pub gateway_id: String,
}

/// `LogEvent` (`…/event/log`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogEvent {
    pub time: Option<String>,
    pub device_info: Option<DeviceInfo>,
    #[serde(deserialize_with = "enum_name")]
    pub level: String,
    #[serde(deserialize_with = "enum_name")]
    pub code: String,
    pub description: String,
    pub context: BTreeMap<String, String>,
}

/// `LocationEvent` (`…/event/location`): a geolocation resolve.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LocationEvent {
    pub deduplication_id: String,
    pub time: Option<String>,
    pub device_info: Option<DeviceInfo>,
    pub location: Option<Location>,
}

/// Just the fields every event has, for the kinds not read in full.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct CommonEvent {
    time: Option<String>,
    device_info: Option<DeviceInfo>,
}

/// Enums are written by name in the JSON mapping, but readers must accept
/// their numbers too; both become text here.
fn enum_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NameOrNumber {
        Name(String),
        Number(i64),
    }
    Ok(match Option::<NameOrNumber>::deserialize(d)? {
        Some(NameOrNumber::Name(s)) => s,
        Some(NameOrNumber::Number(n)) => n.to_string(),
        None => String::new(),
    })
}

// ---------------------------------------------------------------------------
// What the platform gets.
// ---------------------------------------------------------------------------

/// One decoded event.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    pub application_id: String,
    pub dev_eui: DevEui,
    pub kind: EventKind,
    /// The event's `time`, else the arrival time (epoch ms).
    pub ts_ms: i64,
    /// Name, profile and tags as ChirpStack knows them (for provisioning
    /// and for mapping the device to a platform device).
    pub device_info: Option<DeviceInfo>,
    pub output: Output,
}

/// What an event means for the platform.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Readings to store: an uplink decoded by ChirpStack's codec (plus link
    /// metrics), a status event, a location.
    Readings(Vec<Point>),
    /// An uplink without `object`: decode `data` with the platform's own
    /// payload decoder; `link` holds `rssi`, `snr` and `fcnt`.
    Undecoded {
        f_port: u32,
        f_cnt: u32,
        data: Vec<u8>,
        link: Vec<Point>,
    },
    /// The device (re)joined the network (OTAA): it is online.
    Joined { dev_addr: String },
    /// A confirmed downlink was acknowledged (or timed out: `false`).
    Ack {
        queue_item_id: String,
        acknowledged: bool,
        f_cnt_down: u32,
    },
    /// A gateway accepted a downlink for transmission.
    TxAck {
        queue_item_id: String,
        f_cnt_down: u32,
        gateway_id: String,
    },
    /// A log line ChirpStack wrote about the device (codec errors, …).
    Log {
        level: String,
        code: String,
        description: String,
    },
    /// `integration` events and location events without a location.
    Ignored,
}

/// Decode one message of the MQTT integration.
///
/// `limits` bound the readings one `object` can produce (count, nesting,
/// name length), as for the platform's own JSON payloads.
pub fn decode_event(
    topic: &str,
    payload: &[u8],
    now_ms: i64,
    limits: &Limits,
) -> Result<DecodedEvent, ChirpstackError> {
    let topic = parse_event_topic(topic)?;
    decode_event_payload(&topic, payload, now_ms, limits)
}

/// Decode the body of an event whose topic is already parsed.
pub fn decode_event_payload(
    topic: &EventTopic,
    payload: &[u8],
    now_ms: i64,
    limits: &Limits,
) -> Result<DecodedEvent, ChirpstackError> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ChirpstackError::NotJson);
    }
    let kind = topic.event.as_str();
    let parse_err = |e: serde_json::Error| ChirpstackError::Json {
        kind,
        message: e.to_string(),
    };
    let (time, device_info, output) = match topic.event {
        EventKind::Up => {
            let up: UplinkEvent = serde_json::from_slice(payload).map_err(parse_err)?;
            let ts = event_time(up.time.as_deref(), now_ms);
            let output = uplink_output(&up, ts, limits)?;
            (up.time, up.device_info, output)
        }
        EventKind::Join => {
            let join: JoinEvent = serde_json::from_slice(payload).map_err(parse_err)?;
            let output = Output::Joined {
                dev_addr: join.dev_addr,
            };
            (join.time, join.device_info, output)
        }
        EventKind::Status => {
            let status: StatusEvent = serde_json::from_slice(payload).map_err(parse_err)?;
            let ts = event_time(status.time.as_deref(), now_ms);
            let output = Output::Readings(status_readings(&status, ts));
            (status.time, status.device_info, output)
        }
        EventKind::Ack => {
            let ack: AckEvent = serde_json::from_slice(payload).map_err(parse_err)?;
            let output = Output::Ack {
                queue_item_id: ack.queue_item_id,
                acknowledged: ack.acknowledged,
                f_cnt_down: ack.f_cnt_down,
            };
            (ack.time, ack.device_info, output)
        }
        EventKind::TxAck => {
            let tx: TxAckEvent = serde_json::from_slice(payload).map_err(parse_err)?;
            let output = Output::TxAck {
                queue_item_id: tx.queue_item_id,
                f_cnt_down: tx.f_cnt_down,
                gateway_id: tx.gateway_id,
            };
            (tx.time, tx.device_info, output)
        }
        EventKind::Log => {
            let log: LogEvent = serde_json::from_slice(payload).map_err(parse_err)?;
            let output = Output::Log {
                level: log.level,
                code: log.code,
                description: log.description,
            };
            (log.time, log.device_info, output)
        }
        EventKind::Location => {
            let loc: LocationEvent = serde_json::from_slice(payload).map_err(parse_err)?;
            let ts = event_time(loc.time.as_deref(), now_ms);
            let output = match &loc.location {
                Some(l) => Output::Readings(location_readings(l, ts)),
                None => Output::Ignored,
            };
            (loc.time, loc.device_info, output)
        }
        EventKind::Integration => {
            let common: CommonEvent = serde_json::from_slice(payload).map_err(parse_err)?;
            (common.time, common.device_info, Output::Ignored)
        }
    };
    if let Some(info) = &device_info {
        check_identity(topic, info)?;
    }
    Ok(DecodedEvent {
        application_id: topic.application_id.clone(),
        dev_eui: topic.dev_eui.clone(),
        kind: topic.event,
        ts_ms: event_time(time.as_deref(), now_ms),
        device_info,
        output,
    })
}

/// The topic names the device; a document that names another one was
/// misrouted or forged, and must not be stored under the topic's device.
fn check_identity(topic: &EventTopic, info: &DeviceInfo) -> Result<(), ChirpstackError> {
    if !info.dev_eui.is_empty() && !info.dev_eui.eq_ignore_ascii_case(topic.dev_eui.as_str()) {
        return Err(ChirpstackError::DevEuiMismatch {
            topic: topic.dev_eui.clone(),
            payload: info.dev_eui.chars().take(32).collect(),
        });
    }
    if !info.application_id.is_empty() && info.application_id != topic.application_id {
        return Err(ChirpstackError::ApplicationMismatch {
            topic: topic.application_id.clone(),
            payload: info.application_id.chars().take(64).collect(),
        });
    }
    Ok(())
}

fn event_time(time: Option<&str>, now_ms: i64) -> i64 {
    time.and_then(|t| m2mhub_telemetry::parse_rfc3339(t).ok())
        .unwrap_or(now_ms)
}

fn uplink_output(up: &UplinkEvent, ts: i64, limits: &Limits) -> Result<Output, ChirpstackError> {
    let mut link = Vec::with_capacity(3);
    // The gateway that heard the device best: highest RSSI, then SNR.
    let best = up.rx_info.iter().max_by(|a, b| {
        a.rssi.cmp(&b.rssi).then(
            a.snr
                .partial_cmp(&b.snr)
                .unwrap_or(std::cmp::Ordering::Equal),
        )
    });
    if let Some(gw) = best {
        link.push(point("rssi", ts, Value::F64(f64::from(gw.rssi))));
        if gw.snr.is_finite() {
            link.push(point("snr", ts, Value::F64(f64::from(gw.snr))));
        }
    }
    link.push(point("fcnt", ts, Value::F64(f64::from(up.f_cnt))));
    match &up.object {
        Some(object) => {
            let mut readings = Vec::new();
            flatten(object, "", 1, ts, limits, &mut readings)?;
            // The codec's own fields win over link metrics of the same name.
            for p in link {
                if !readings.iter().any(|r| r.metric == p.metric) {
                    if readings.len() >= limits.max_points {
                        return Err(ChirpstackError::TooManyReadings(limits.max_points));
                    }
                    readings.push(p);
                }
            }
            Ok(Output::Readings(readings))
        }
        None => Ok(Output::Undecoded {
            f_port: up.f_port,
            f_cnt: up.f_cnt,
            data: decode_base64(&up.data)?,
            link,
        }),
    }
}

/// Flatten a codec's object into readings: `{"a":{"b":1}}` → `a.b`, arrays
/// by index (`a.0`), nulls skipped, as the platform's JSON decoder does.
fn flatten(
    object: &serde_json::Map<String, serde_json::Value>,
    prefix: &str,
    depth: usize,
    ts: i64,
    limits: &Limits,
    out: &mut Vec<Point>,
) -> Result<(), ChirpstackError> {
    for (key, value) in object {
        flatten_value(value, &join(prefix, key), depth, ts, limits, out)?;
    }
    Ok(())
}

fn flatten_value(
    value: &serde_json::Value,
    name: &str,
    depth: usize,
    ts: i64,
    limits: &Limits,
    out: &mut Vec<Point>,
) -> Result<(), ChirpstackError> {
    use serde_json::Value as J;
    if depth > limits.max_depth {
        return Err(ChirpstackError::TooDeep);
    }
    let scalar = match value {
        J::Null => return Ok(()),
        J::Bool(b) => Value::Bool(*b),
        // serde_json numbers are finite; u64/i64 beyond 2^53 round.
        J::Number(n) => Value::F64(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Value::Str(s.clone()),
        J::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten_value(
                    item,
                    &join(name, &i.to_string()),
                    depth + 1,
                    ts,
                    limits,
                    out,
                )?;
            }
            return Ok(());
        }
        J::Object(map) => return flatten(map, name, depth + 1, ts, limits, out),
    };
    if name.is_empty() {
        return Err(ChirpstackError::EmptyName);
    }
    if name.len() > limits.max_metric_len {
        return Err(ChirpstackError::NameTooLong(limits.max_metric_len));
    }
    if out.len() >= limits.max_points {
        return Err(ChirpstackError::TooManyReadings(limits.max_points));
    }
    out.push(point(name, ts, scalar));
    Ok(())
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn point(name: &str, ts_ms: i64, value: Value) -> Point {
    Point {
        metric: name.to_owned(),
        ts_ms,
        value,
    }
}

fn status_readings(status: &StatusEvent, ts: i64) -> Vec<Point> {
    let mut out = vec![
        point("margin", ts, Value::F64(f64::from(status.margin))),
        point(
            "external_power_source",
            ts,
            Value::Bool(status.external_power_source),
        ),
    ];
    // Mains-powered devices and those that cannot measure report 0: no level.
    if !status.battery_level_unavailable
        && !status.external_power_source
        && status.battery_level.is_finite()
    {
        out.push(point(
            "battery_level",
            ts,
            Value::F64(f64::from(status.battery_level)),
        ));
    }
    out
}

fn location_readings(location: &Location, ts: i64) -> Vec<Point> {
    [
        ("latitude", location.latitude),
        ("longitude", location.longitude),
        ("altitude", location.altitude),
    ]
    .into_iter()
    .filter(|(_, v)| v.is_finite())
    .map(|(name, v)| point(name, ts, Value::F64(v)))
    .collect()
}

/// The JSON mapping writes standard base64 with padding; readers accept
/// the URL-safe alphabet and missing padding too.
fn decode_base64(s: &str) -> Result<Vec<u8>, ChirpstackError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(s).ok())
        .ok_or(ChirpstackError::Base64)
}

// ---------------------------------------------------------------------------
// Downlinks.
// ---------------------------------------------------------------------------

/// What a downlink carries: bytes, or an object for the device profile's
/// codec to encode.
#[derive(Debug, Clone, PartialEq)]
pub enum DownlinkBody {
    Data(Vec<u8>),
    Object(serde_json::Map<String, serde_json::Value>),
}

/// A downlink to enqueue through the MQTT integration (`DownlinkCommand`).
#[derive(Debug, Clone, PartialEq)]
pub struct Downlink {
    pub application_id: String,
    pub dev_eui: DevEui,
    pub confirmed: bool,
    /// LoRaWAN application port, 1..=223.
    pub f_port: u8,
    pub body: DownlinkBody,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DownlinkCommand<'a> {
    dev_eui: &'a str,
    confirmed: bool,
    f_port: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

impl Downlink {
    /// The topic and JSON body to publish. ChirpStack compares the body's
    /// `devEui` with the topic's, so both come from the same value.
    pub fn encode(&self) -> Result<(String, Vec<u8>), ChirpstackError> {
        let application_id = checked_application_id(&self.application_id)?;
        if !(1..=223).contains(&self.f_port) {
            return Err(ChirpstackError::InvalidFPort(self.f_port));
        }
        let (data, object) = match &self.body {
            DownlinkBody::Data(bytes) => (
                Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                None,
            ),
            DownlinkBody::Object(map) => (None, Some(map)),
        };
        let command = DownlinkCommand {
            dev_eui: self.dev_eui.as_str(),
            confirmed: self.confirmed,
            f_port: self.f_port,
            data,
            object,
        };
        let body = serde_json::to_vec(&command).map_err(|e| ChirpstackError::Json {
            kind: "down",
            message: e.to_string(),
        })?;
        let topic = format!(
            "application/{application_id}/device/{}/command/down",
            self.dev_eui
        );
        Ok((topic, body))
    }
}

#[cfg(test)]
mod tests;
