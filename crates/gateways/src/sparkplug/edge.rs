//! The host side of Sparkplug B sessions: what the platform knows about each
//! edge node and its devices, kept from births, used to read data messages.
//!
//! [`SparkplugHost`] is sans-IO: [`SparkplugHost::handle`] takes a topic, a
//! payload and the arrival time, and answers a list of [`Event`]s; it never
//! reads a clock, never publishes. The caller stores the points, marks
//! devices online/offline and publishes the rebirth requests it is handed.
//!
//! Per edge node (keyed by group and node id) it keeps:
//!
//! * the metric table of the NBIRTH and of each device's DBIRTH: alias →
//!   name and name → datatype, because data messages carry only aliases and
//!   no datatypes;
//! * the last sequence number (0..=255, wrapping): NBIRTH, DBIRTH, NDATA,
//!   DDATA and DDEATH each carry the previous one plus one. A gap is
//!   answered with a rebirth request at once (a "Reorder Timeout" of zero,
//!   right for a broker that keeps one client's messages in order); the
//!   data itself is still stored, as the specification allows for a
//!   historian;
//! * the `bdSeq` of the NBIRTH: an NDEATH takes the node and all its devices
//!   offline only when its `bdSeq` matches, because the broker may deliver
//!   an old session's will after the new session's NBIRTH;
//! * when it last asked for a rebirth: data the host cannot read (unknown
//!   node, device or alias, a sequence gap) asks the node to republish its
//!   births with an NCMD `Node Control/Rebirth = true`, at most once per
//!   [`HostConfig::rebirth_interval_ms`] per node, so a node that keeps
//!   sending unreadable data is not flooded with commands.
//!
//! Memory is bounded by [`HostConfig`]: nodes tracked, devices per node,
//! metrics per birth. Offline nodes are forgotten first when room is needed.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use m2mhub_telemetry::Point;

use super::payload::{
    declared_datatype, decode_payload, encode_payload, metric_value, DataType, Metric, MetricValue,
    Payload, PayloadError, ValueError,
};
use super::topic::{ncmd_topic, parse_topic, EdgeTopic, MessageType, Topic, TopicError};

/// The name of the metric that carries the birth/death sequence number.
pub const BD_SEQ: &str = "bdSeq";
/// The node-control metric a host sets to `true` to ask for a rebirth.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";
/// Node-control metrics (`Node Control/…`) are commands, not telemetry.
const NODE_CONTROL_PREFIX: &str = "Node Control/";

/// The platform-facing identity of an edge node or one of its devices. The
/// platform maps it to one of its own device ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    pub group: String,
    pub node: String,
    /// `None` for the edge node itself.
    pub device: Option<String>,
}

impl EdgeKey {
    pub fn node(group: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            node: node.into(),
            device: None,
        }
    }

    pub fn device(
        group: impl Into<String>,
        node: impl Into<String>,
        device: impl Into<String>,
    ) -> Self {
        Self {
            group: group.into(),
            node: node.into(),
            device: Some(device.into()),
        }
    }

    fn with_device(&self, device: &str) -> Self {
        Self {
            group: self.group.clone(),
            node: self.node.clone(),
            device: Some(device.to_owned()),
        }
    }
}

/// `group/node` or `group/node/device`: unambiguous, since Sparkplug ids
/// cannot contain `/`.
impl fmt::Display for EdgeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.group, self.node)?;
        if let Some(device) = &self.device {
            write!(f, "/{device}")?;
        }
        Ok(())
    }
}

/// What the host must do after a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A birth: the node or device is online (again).
    Online { device: EdgeKey },
    /// A death (or a new NBIRTH ending the node's earlier session).
    Offline { device: EdgeKey },
    /// Readings, named by the birth's metric names.
    Points { device: EdgeKey, points: Vec<Point> },
    /// Publish `payload` on `topic` (QoS 0, not retained): a rebirth request.
    Rebirth { topic: String, payload: Vec<u8> },
    /// Something was wrong with the message; `device` when known. For a
    /// device log, never fatal.
    Rejected {
        device: Option<EdgeKey>,
        reason: Rejection,
    },
}

/// Why (part of) a message was not used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("bad topic: {0}")]
    Topic(#[from] TopicError),
    #[error("{0}")]
    Payload(#[from] PayloadError),
    #[error("{0} from an edge node that has not sent its NBIRTH")]
    UnknownNode(MessageType),
    #[error("{0} for a device that has not sent its DBIRTH")]
    UnknownDevice(MessageType),
    #[error("{count} metric(s) not defined by the birth, first {first}")]
    UnknownMetrics { count: usize, first: String },
    #[error("sequence number {got:?} where {expected} was due")]
    SequenceGap { expected: u8, got: Option<u64> },
    #[error("birth with {count} metrics (at most {limit})")]
    TooManyMetrics { count: usize, limit: usize },
    #[error("alias {0} bound to two metrics in one birth")]
    DuplicateAlias(u64),
    #[error("birth metric without a name")]
    UnnamedBirthMetric,
    #[error("{count} metric(s) skipped, first {metric:?}: {error}")]
    MetricsSkipped {
        count: usize,
        metric: String,
        error: ValueError,
    },
    #[error("already tracking {0} edge nodes, all online")]
    TooManyNodes(usize),
    #[error("the edge node already has {0} devices")]
    TooManyDevices(usize),
}

/// Limits and timing of a [`SparkplugHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Edge nodes tracked at once (online, or offline and remembered for
    /// their `bdSeq` and rebirth timer). Default 10 000.
    pub max_nodes: usize,
    /// Devices online under one edge node. Default 1 000.
    pub max_devices_per_node: usize,
    /// Metrics in one NBIRTH or DBIRTH. Default 10 000.
    pub max_metrics_per_birth: usize,
    /// At most one rebirth request per node in this many milliseconds.
    /// Default 10 000: long enough for a node to publish its births.
    pub rebirth_interval_ms: i64,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            max_nodes: 10_000,
            max_devices_per_node: 1_000,
            max_metrics_per_birth: 10_000,
            rebirth_interval_ms: 10_000,
        }
    }
}

/// Build a rebirth request for an edge node: an NCMD whose only metric is
/// `Node Control/Rebirth = true` (Boolean), stamped with `now_ms`.
pub fn rebirth_request(group_id: &str, edge_node_id: &str, now_ms: i64) -> (String, Vec<u8>) {
    let ts = u64::try_from(now_ms).unwrap_or(0);
    let payload = Payload {
        timestamp: Some(ts),
        metrics: vec![Metric::birth(
            REBIRTH_METRIC,
            None,
            DataType::Boolean,
            MetricValue::BooleanValue(true),
        )
        .at(ts)],
        ..Payload::default()
    };
    (ncmd_topic(group_id, edge_node_id), encode_payload(&payload))
}

/// The state of all edge nodes seen by one host application.
#[derive(Debug, Default)]
pub struct SparkplugHost {
    config: HostConfig,
    nodes: HashMap<NodeId, EdgeNode>,
}

type NodeId = (String, String);

#[derive(Debug, Default)]
struct EdgeNode {
    online: bool,
    bd_seq: Option<u64>,
    /// The last sequence number seen; `None` when unknown (no session, or
    /// the last message had none).
    seq: Option<u8>,
    metrics: MetricTable,
    devices: HashMap<String, MetricTable>,
    last_rebirth_ms: Option<i64>,
    last_seen_ms: i64,
}

/// What a birth defined.
#[derive(Debug, Default)]
struct MetricTable {
    by_alias: HashMap<u64, Arc<str>>,
    by_name: HashMap<Arc<str>, Result<DataType, ValueError>>,
}

impl MetricTable {
    /// Read a birth's metric definitions, refusing the whole birth when it
    /// could not be used to read data (too big, ambiguous aliases).
    fn from_birth(payload: &Payload, limit: usize) -> Result<Self, Rejection> {
        if payload.metrics.len() > limit {
            return Err(Rejection::TooManyMetrics {
                count: payload.metrics.len(),
                limit,
            });
        }
        let mut table = Self::default();
        for metric in &payload.metrics {
            let Some(name) = metric.name.as_deref() else {
                return Err(Rejection::UnnamedBirthMetric);
            };
            let name: Arc<str> = Arc::from(name);
            let datatype = match declared_datatype(metric) {
                Ok(Some(dt)) => Ok(dt),
                Ok(None) => Err(ValueError::NoDataType),
                Err(e) => Err(e),
            };
            if let Some(alias) = metric.alias {
                if table.by_alias.insert(alias, name.clone()).is_some() {
                    return Err(Rejection::DuplicateAlias(alias));
                }
            }
            table.by_name.insert(name, datatype);
        }
        Ok(table)
    }

    /// The name and datatype of a data message's metric: by alias when it
    /// has one, else by name.
    fn resolve(&self, metric: &Metric) -> Option<(Arc<str>, Result<DataType, ValueError>)> {
        let name = match (metric.alias, metric.name.as_deref()) {
            (Some(alias), _) => self.by_alias.get(&alias)?.clone(),
            (None, Some(name)) => self.by_name.get_key_value(name)?.0.clone(),
            (None, None) => return None,
        };
        let datatype = match declared_datatype(metric) {
            Ok(Some(dt)) => Ok(dt),
            Ok(None) => self.by_name.get(&name)?.clone(),
            Err(e) => Err(e),
        };
        Some((name, datatype))
    }
}

/// Points and problems gathered from one message's metrics.
#[derive(Default)]
struct Readings {
    points: Vec<Point>,
    skipped: Option<(usize, String, ValueError)>,
    unknown: Option<(usize, String)>,
}

impl Readings {
    fn skip(&mut self, name: &str, error: ValueError) {
        match &mut self.skipped {
            Some((count, _, _)) => *count += 1,
            None => self.skipped = Some((1, name.to_owned(), error)),
        }
    }

    fn unknown(&mut self, metric: &Metric) {
        match &mut self.unknown {
            Some((count, _)) => *count += 1,
            None => {
                let first = match (metric.alias, &metric.name) {
                    (Some(alias), _) => format!("alias {alias}"),
                    (None, Some(name)) => format!("{name:?}"),
                    (None, None) => "a metric with neither name nor alias".to_owned(),
                };
                self.unknown = Some((1, first));
            }
        }
    }

    fn add(
        &mut self,
        metric: &Metric,
        name: &str,
        datatype: Result<DataType, ValueError>,
        ts: i64,
    ) {
        if name == BD_SEQ || name.starts_with(NODE_CONTROL_PREFIX) {
            return;
        }
        let value = datatype.and_then(|dt| metric_value(metric, dt));
        match value {
            Ok(Some(value)) => {
                let ts_ms = metric
                    .timestamp
                    .and_then(|t| i64::try_from(t).ok())
                    .unwrap_or(ts);
                self.points.push(Point {
                    metric: name.to_owned(),
                    ts_ms,
                    value,
                });
            }
            Ok(None) => {}
            Err(e) => self.skip(name, e),
        }
    }

    /// Emit the points and a rejection for skipped metrics; answer whether
    /// metrics were unknown (which calls for a rebirth).
    fn emit(self, device: &EdgeKey, out: &mut Vec<Event>) -> bool {
        if let Some((count, metric, error)) = self.skipped {
            out.push(Event::Rejected {
                device: Some(device.clone()),
                reason: Rejection::MetricsSkipped {
                    count,
                    metric,
                    error,
                },
            });
        }
        if !self.points.is_empty() {
            out.push(Event::Points {
                device: device.clone(),
                points: self.points,
            });
        }
        if let Some((count, first)) = self.unknown {
            out.push(Event::Rejected {
                device: Some(device.clone()),
                reason: Rejection::UnknownMetrics { count, first },
            });
            return true;
        }
        false
    }
}

/// The payload's own timestamp, else the arrival time.
fn message_time(payload: &Payload, now_ms: i64) -> i64 {
    payload
        .timestamp
        .and_then(|t| i64::try_from(t).ok())
        .unwrap_or(now_ms)
}

/// The `bdSeq` metric's value, if the payload has one that is an integer.
fn bd_seq(payload: &Payload) -> Option<u64> {
    payload
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some(BD_SEQ))
        .and_then(|m| match m.value {
            Some(MetricValue::LongValue(v)) => Some(v),
            Some(MetricValue::IntValue(v)) => Some(u64::from(v)),
            _ => None,
        })
}

impl SparkplugHost {
    pub fn new(config: HostConfig) -> Self {
        Self {
            config,
            nodes: HashMap::new(),
        }
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Edge nodes currently tracked (online or remembered).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Whether an edge node (device `None`) or a device is online.
    pub fn is_online(&self, key: &EdgeKey) -> bool {
        let Some(node) = self.nodes.get(&(key.group.clone(), key.node.clone())) else {
            return false;
        };
        match &key.device {
            None => node.online,
            Some(device) => node.online && node.devices.contains_key(device),
        }
    }

    /// Handle one message received on a `spBv1.0/…` topic at `now_ms`
    /// (epoch milliseconds).
    pub fn handle(&mut self, topic: &str, payload: &[u8], now_ms: i64) -> Vec<Event> {
        match parse_topic(topic) {
            Ok(Topic::Edge(edge)) => self.handle_edge(&edge, payload, now_ms),
            // Host applications' births and deaths, not an edge node's.
            Ok(Topic::HostState { .. }) => Vec::new(),
            Err(e) => vec![Event::Rejected {
                device: None,
                reason: e.into(),
            }],
        }
    }

    /// Handle one message whose topic is already parsed.
    pub fn handle_edge(&mut self, topic: &EdgeTopic, payload: &[u8], now_ms: i64) -> Vec<Event> {
        let mut out = Vec::new();
        let node_key = EdgeKey::node(&topic.group_id, &topic.edge_node_id);
        let key = match &topic.device_id {
            Some(device) => node_key.with_device(device),
            None => node_key.clone(),
        };
        // Commands go from hosts to edge nodes: ours, or another host's.
        if matches!(topic.message_type, MessageType::NCmd | MessageType::DCmd) {
            return out;
        }
        let payload = match decode_payload(payload) {
            Ok(p) => p,
            Err(e) => {
                out.push(Event::Rejected {
                    device: Some(key),
                    reason: e.into(),
                });
                return out;
            }
        };
        match topic.message_type {
            MessageType::NBirth => self.on_nbirth(&node_key, &payload, now_ms, &mut out),
            MessageType::NDeath => self.on_ndeath(&node_key, &payload, &mut out),
            MessageType::DBirth | MessageType::DData | MessageType::DDeath | MessageType::NData => {
                self.on_session_message(topic.message_type, &key, &payload, now_ms, &mut out)
            }
            MessageType::NCmd | MessageType::DCmd | MessageType::State => {}
        }
        out
    }

    fn on_nbirth(&mut self, key: &EdgeKey, payload: &Payload, now_ms: i64, out: &mut Vec<Event>) {
        let table = match MetricTable::from_birth(payload, self.config.max_metrics_per_birth) {
            Ok(t) => t,
            Err(reason) => {
                out.push(Event::Rejected {
                    device: Some(key.clone()),
                    reason,
                });
                return;
            }
        };
        let Some(node) = self.node_entry(key, now_ms, out) else {
            return;
        };
        // A new session ends the devices of the old one: they rebirth next.
        take_devices_offline(node, key, out);
        node.online = true;
        node.bd_seq = bd_seq(payload);
        node.seq = payload.seq.and_then(|s| u8::try_from(s).ok());
        node.metrics = table;
        node.last_seen_ms = now_ms;
        out.push(Event::Online {
            device: key.clone(),
        });
        let mut readings = Readings::default();
        let ts = message_time(payload, now_ms);
        for metric in &payload.metrics {
            if let Some((name, datatype)) = node.metrics.resolve(metric) {
                readings.add(metric, &name, datatype, ts);
            }
        }
        readings.emit(key, out);
    }

    fn on_ndeath(&mut self, key: &EdgeKey, payload: &Payload, out: &mut Vec<Event>) {
        let Some(node) = self.nodes.get_mut(&(key.group.clone(), key.node.clone())) else {
            return;
        };
        if !node.online {
            // The will of a session that already ended (explicit NDEATH
            // first, the broker's copy later).
            return;
        }
        if let (Some(born), Some(died)) = (node.bd_seq, bd_seq(payload)) {
            if born != died {
                // An earlier session's will, delivered after this NBIRTH.
                return;
            }
        }
        take_devices_offline(node, key, out);
        node.online = false;
        node.seq = None;
        node.metrics = MetricTable::default();
        out.push(Event::Offline {
            device: key.clone(),
        });
    }

    /// DBIRTH, DDATA, DDEATH and NDATA: messages inside a node's session.
    fn on_session_message(
        &mut self,
        kind: MessageType,
        key: &EdgeKey,
        payload: &Payload,
        now_ms: i64,
        out: &mut Vec<Event>,
    ) {
        let node_key = EdgeKey::node(&key.group, &key.node);
        let interval = self.config.rebirth_interval_ms;
        let max_devices = self.config.max_devices_per_node;
        let max_metrics = self.config.max_metrics_per_birth;
        let Some(node) = self.node_entry(&node_key, now_ms, out) else {
            return;
        };
        node.last_seen_ms = now_ms;
        if !node.online {
            // Data without a session (the host started after the NBIRTH, or
            // missed it): only a rebirth makes it readable.
            if kind != MessageType::DDeath {
                out.push(Event::Rejected {
                    device: Some(key.clone()),
                    reason: Rejection::UnknownNode(kind),
                });
                push_rebirth(node, &node_key, now_ms, interval, out);
            }
            return;
        }
        let mut rebirth = check_seq(node, key, payload.seq, out);
        let ts = message_time(payload, now_ms);
        match (kind, key.device.as_deref()) {
            (MessageType::DBirth, Some(device)) => {
                if !node.devices.contains_key(device) && node.devices.len() >= max_devices {
                    out.push(Event::Rejected {
                        device: Some(key.clone()),
                        reason: Rejection::TooManyDevices(max_devices),
                    });
                } else {
                    match MetricTable::from_birth(payload, max_metrics) {
                        Ok(table) => {
                            out.push(Event::Online {
                                device: key.clone(),
                            });
                            let mut readings = Readings::default();
                            for metric in &payload.metrics {
                                if let Some((name, datatype)) = table.resolve(metric) {
                                    readings.add(metric, &name, datatype, ts);
                                }
                            }
                            readings.emit(key, out);
                            node.devices.insert(device.to_owned(), table);
                        }
                        Err(reason) => out.push(Event::Rejected {
                            device: Some(key.clone()),
                            reason,
                        }),
                    }
                }
            }
            (MessageType::DDeath, Some(device)) if node.devices.remove(device).is_some() => {
                out.push(Event::Offline {
                    device: key.clone(),
                });
            }
            (MessageType::DData, Some(device)) => match node.devices.get(device) {
                Some(table) => rebirth |= read_data(table, key, payload, ts, out),
                None => {
                    out.push(Event::Rejected {
                        device: Some(key.clone()),
                        reason: Rejection::UnknownDevice(kind),
                    });
                    rebirth = true;
                }
            },
            (MessageType::NData, None) => {
                rebirth |= read_data(&node.metrics, key, payload, ts, out);
            }
            // parse_topic guarantees device ids exactly on device types.
            _ => {}
        }
        if rebirth {
            push_rebirth(node, &node_key, now_ms, interval, out);
        }
    }

    /// The node's entry, created (offline) if new; `None` when the node
    /// limit is reached and no offline node can be forgotten.
    fn node_entry(
        &mut self,
        key: &EdgeKey,
        now_ms: i64,
        out: &mut Vec<Event>,
    ) -> Option<&mut EdgeNode> {
        let id = (key.group.clone(), key.node.clone());
        if !self.nodes.contains_key(&id) && self.nodes.len() >= self.config.max_nodes {
            let oldest_offline = self
                .nodes
                .iter()
                .filter(|(_, n)| !n.online)
                .min_by_key(|(_, n)| n.last_seen_ms)
                .map(|(id, _)| id.clone());
            match oldest_offline {
                Some(old) => {
                    self.nodes.remove(&old);
                }
                None => {
                    out.push(Event::Rejected {
                        device: Some(key.clone()),
                        reason: Rejection::TooManyNodes(self.config.max_nodes),
                    });
                    return None;
                }
            }
        }
        Some(self.nodes.entry(id).or_insert_with(|| EdgeNode {
            last_seen_ms: now_ms,
            ..EdgeNode::default()
        }))
    }
}

/// Check the message's sequence number against the node's last one and
/// remember it; answer whether a gap calls for a rebirth.
fn check_seq(node: &mut EdgeNode, key: &EdgeKey, seq: Option<u64>, out: &mut Vec<Event>) -> bool {
    let got = seq.and_then(|s| u8::try_from(s).ok());
    let mut gap = false;
    if let Some(last) = node.seq {
        let expected = last.wrapping_add(1);
        if got != Some(expected) {
            out.push(Event::Rejected {
                device: Some(key.clone()),
                reason: Rejection::SequenceGap { expected, got: seq },
            });
            gap = true;
        }
    }
    // Resynchronise on what arrived, so one lost message costs one request.
    node.seq = got;
    gap
}

fn read_data(
    table: &MetricTable,
    key: &EdgeKey,
    payload: &Payload,
    ts: i64,
    out: &mut Vec<Event>,
) -> bool {
    let mut readings = Readings::default();
    for metric in &payload.metrics {
        match table.resolve(metric) {
            Some((name, datatype)) => readings.add(metric, &name, datatype, ts),
            None => readings.unknown(metric),
        }
    }
    readings.emit(key, out)
}

fn take_devices_offline(node: &mut EdgeNode, key: &EdgeKey, out: &mut Vec<Event>) {
    let mut devices: Vec<String> = node.devices.drain().map(|(id, _)| id).collect();
    devices.sort();
    for device in devices {
        out.push(Event::Offline {
            device: key.with_device(&device),
        });
    }
}

fn push_rebirth(
    node: &mut EdgeNode,
    key: &EdgeKey,
    now_ms: i64,
    interval_ms: i64,
    out: &mut Vec<Event>,
) {
    if let Some(last) = node.last_rebirth_ms {
        // A clock that went backwards does not block requests forever.
        let elapsed = now_ms.saturating_sub(last);
        if (0..interval_ms).contains(&elapsed) {
            return;
        }
    }
    node.last_rebirth_ms = Some(now_ms);
    let (topic, payload) = rebirth_request(&key.group, &key.node, now_ms);
    out.push(Event::Rebirth { topic, payload });
}
