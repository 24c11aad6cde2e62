//! Gateways that speak for many devices, wired into the pipeline:
//! **Sparkplug B** edge nodes (PLC gateways) and **ChirpStack** (a LoRaWAN
//! network server's MQTT integration). The decoding and the edge-node state
//! machine are sans-IO in `m2mhub-gateways`; this module maps what they
//! produce onto platform devices, stores the points through
//! [`Ingest::store_points`] (same durability, counters and device events
//! as `devices/{id}/telemetry`), republishes them as JSON on the device's
//! telemetry topic so rules and subscribers see them, and publishes what
//! must go back (rebirth requests, downlinks) from a task of its own.
//!
//! Identity, so that a gateway can never speak for another tenant:
//!
//! * **Sparkplug**: an edge node connects as a registered device and its
//!   Sparkplug node id *is* its device id (the ACL lets a device publish
//!   `spBv1.0/{group}/…/{its id}[/…]` only). The node's own metrics belong
//!   to that device; a device `x` behind it is the platform device
//!   `{node}.{x}`, registered on its first DBIRTH in the node's tenant and
//!   group when `auto_register` is on (labels `sparkplug`, `gateway`).
//! * **ChirpStack**: the network server connects with a bridge device's
//!   credential and publishes its integration events inside the bridge's
//!   own namespace: `devices/{bridge}/chirpstack/application/{app}/device/
//!   {dev_eui}/event/{kind}` (ChirpStack's `event_topic` setting). A
//!   LoRaWAN device is the platform device whose id is its DevEUI (16
//!   lowercase hex digits), in the bridge's tenant; registered on its first
//!   uplink when `auto_register` is on. Commands sent to such a device
//!   become downlinks on `devices/{bridge}/chirpstack/application/{app}/
//!   device/{dev_eui}/command/down`.

use crate::pipeline::{Ingest, Outcome};
use bytes::Bytes;
use m2mhub_broker::auth::ClientIdentity;
use m2mhub_broker::message::Message;
use m2mhub_broker::{AckGate, Broker};
use m2mhub_gateways::chirpstack::{self, DevEui, Downlink, DownlinkBody, Output};
use m2mhub_gateways::sparkplug::{EdgeKey, Event, HostConfig, HostState, SparkplugHost};
use m2mhub_gateways::{Point, Value};
use m2mhub_identity::{now_ms, validate_id, NewDevice};
use mqtt_codec::{PublishProperties, QoS};
use parking_lot::Mutex;
use serde_json::{json, Map};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Messages waiting for the publishing task; beyond this they are dropped
/// and counted (a rebirth request is repeated; a republish is only a copy).
const OUTBOX: usize = 8192;
/// LoRaWAN devices whose downlink route is remembered.
const MAX_ROUTES: usize = 1_000_000;
/// The application port of a downlink whose command names none.
const DEFAULT_F_PORT: u8 = 10;

/// What the gateways do, from `[gateways]` in the configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Register devices a gateway names for the first time (in the
    /// gateway's tenant); otherwise their data is refused as a device event.
    pub auto_register: bool,
    /// The Sparkplug host id: the retained `spBv1.0/STATE/{host_id}` says
    /// this host is online (edge nodes configured with a primary host wait
    /// for it). `None`: not announced.
    pub sparkplug_host_id: Option<String>,
    pub sparkplug: HostConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            auto_register: true,
            sparkplug_host_id: None,
            sparkplug: HostConfig::default(),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct GatewayCounters {
    pub sparkplug_messages: AtomicU64,
    pub sparkplug_rebirths: AtomicU64,
    pub chirpstack_events: AtomicU64,
    pub downlinks: AtomicU64,
    pub devices_registered: AtomicU64,
    pub refused: AtomicU64,
    pub outbox_dropped: AtomicU64,
}

impl GatewayCounters {
    /// `(name, help, value)` for each counter, for `/metrics`.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 7] {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "sparkplug_messages",
                "Sparkplug B messages read",
                l(&self.sparkplug_messages),
            ),
            (
                "sparkplug_rebirths",
                "Sparkplug rebirth requests sent",
                l(&self.sparkplug_rebirths),
            ),
            (
                "chirpstack_events",
                "ChirpStack integration events read",
                l(&self.chirpstack_events),
            ),
            (
                "downlinks",
                "commands sent to LoRaWAN devices as downlinks",
                l(&self.downlinks),
            ),
            (
                "devices_registered",
                "devices registered on a gateway's first mention",
                l(&self.devices_registered),
            ),
            (
                "refused",
                "gateway messages or devices refused (kept as device events)",
                l(&self.refused),
            ),
            (
                "outbox_dropped",
                "rebirths, downlinks or republished points dropped by a full outbox",
                l(&self.outbox_dropped),
            ),
        ]
    }
}

struct Outgoing {
    topic: String,
    payload: Bytes,
    retain: bool,
    content_type: Option<&'static str>,
}

/// Where a LoRaWAN device's downlinks go.
#[derive(Debug, Clone)]
struct Route {
    bridge: Arc<str>,
    application_id: String,
}

pub struct Gateways {
    config: GatewayConfig,
    sparkplug: Mutex<SparkplugHost>,
    routes: Mutex<HashMap<String, Route>>,
    outbox: tokio::sync::mpsc::Sender<Outgoing>,
    pub counters: GatewayCounters,
}

/// `devices/{bridge}/chirpstack/{rest}` → `(bridge, rest)`.
pub fn chirpstack_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("devices/")?;
    let (bridge, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("chirpstack/")?;
    (!bridge.is_empty()).then_some((bridge, rest))
}

/// Points as the JSON a device would publish: one object per timestamp.
fn points_json(points: &[Point]) -> Vec<u8> {
    let mut by_ts: BTreeMap<i64, Map<String, serde_json::Value>> = BTreeMap::new();
    for p in points {
        let v = match &p.value {
            Value::F64(x) => json!(x),
            Value::Bool(b) => json!(b),
            Value::Str(s) => json!(s),
        };
        by_ts
            .entry(p.ts_ms)
            .or_default()
            .insert(p.metric.clone(), v);
    }
    let rows: Vec<serde_json::Value> = by_ts
        .into_iter()
        .map(|(ts, mut m)| {
            m.insert("ts".into(), json!(ts));
            serde_json::Value::Object(m)
        })
        .collect();
    let doc = match rows.len() {
        1 => rows.into_iter().next().unwrap_or_default(),
        _ => serde_json::Value::Array(rows),
    };
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// A platform device id for device `x` behind edge node `node`: `node.x`,
/// with characters ids cannot hold replaced by `_`, cut to 64.
fn child_id(node: &str, device: &str) -> String {
    let mut id: String = format!("{node}.{device}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    id.truncate(64);
    id
}

/// Wait for every durable write a message caused.
fn gate(pending: Vec<crate::pipeline::Durable>, refused: Option<u8>) -> Option<AckGate> {
    if pending.is_empty() && refused.is_none() {
        return None;
    }
    Some(Box::pin(async move {
        if let Some(code) = refused {
            return Err(code);
        }
        for d in pending {
            d.await.map_err(|r| r.mqtt_reason())?;
        }
        Ok(())
    }))
}

impl Gateways {
    /// Start the publishing task (rebirths, downlinks, republished points)
    /// and the command observer (commands for LoRaWAN devices become
    /// downlinks); announce the Sparkplug host as online.
    pub fn start(broker: &Broker, config: GatewayConfig) -> Arc<Gateways> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Outgoing>(OUTBOX);
        let g = Arc::new(Gateways {
            sparkplug: Mutex::new(SparkplugHost::new(config.sparkplug.clone())),
            config,
            routes: Mutex::new(HashMap::new()),
            outbox: tx,
            counters: GatewayCounters::default(),
        });
        let b = broker.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let props = PublishProperties {
                    content_type: m.content_type.map(str::to_string),
                    ..Default::default()
                };
                let qos = if m.retain {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                b.publish_with(&m.topic, m.payload, qos, m.retain, props)
                    .await;
            }
        });
        let state = HostState {
            online: true,
            timestamp: u64::try_from(now_ms()).unwrap_or(0),
        };
        if let Some(host) = &g.config.sparkplug_host_id {
            match state.encode(host) {
                Ok((topic, payload)) => g.send(topic, payload, true, Some("application/json")),
                Err(e) => tracing::warn!(error = %e, "no Sparkplug host state published"),
            }
        }

        let (id, mut commands) = broker.observer(OBSERVER_QUEUE);
        broker.set_observed(id, &["devices/+/commands".to_string()]);
        let weak = Arc::downgrade(&g);
        tokio::spawn(async move {
            while let Some(msg) = commands.recv().await {
                let Some(g) = weak.upgrade() else { return };
                g.on_command(&msg);
            }
        });
        g
    }

    fn send(&self, topic: String, payload: Vec<u8>, retain: bool, ct: Option<&'static str>) {
        let out = Outgoing {
            topic,
            payload: Bytes::from(payload),
            retain,
            content_type: ct,
        };
        if self.outbox.try_send(out).is_err() {
            self.counters.outbox_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Store points for `device` and republish them on its telemetry topic.
    fn deliver(
        &self,
        ingest: &Ingest,
        tenant: &Arc<str>,
        device: &str,
        points: &[Point],
        wait: bool,
        pending: &mut Vec<crate::pipeline::Durable>,
    ) -> Option<u8> {
        match ingest.store_points(tenant, device, points, wait) {
            Outcome::Refused(r) => return Some(r.mqtt_reason()),
            Outcome::Pending(d) => pending.push(d),
            Outcome::Done | Outcome::Invalid(_) => {}
        }
        if !points.is_empty() {
            self.send(
                format!("devices/{device}/telemetry"),
                points_json(points),
                false,
                Some("application/json"),
            );
        }
        None
    }

    /// The platform device for `id`, in `tenant`: registered now when
    /// allowed. `Err` says why not (kept as a device event of the gateway).
    fn resolve(
        &self,
        ingest: &Ingest,
        tenant: &Arc<str>,
        group: Option<&str>,
        id: &str,
        name: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Result<(), String> {
        if let Some(info) = ingest.registry.ingest_info(id) {
            return if info.tenant == *tenant {
                Ok(())
            } else {
                Err(format!("device {id} belongs to another tenant"))
            };
        }
        if !self.config.auto_register {
            return Err(format!(
                "device {id} is not registered (register it, or set gateways.auto_register = true)"
            ));
        }
        validate_id("device", id).map_err(|e| e.to_string())?;
        match ingest.registry.create_device(NewDevice {
            id: Some(id.to_string()),
            name,
            tenant: tenant.to_string(),
            group: group.map(str::to_string),
            labels,
            ..Default::default()
        }) {
            Ok(_) => {
                self.counters
                    .devices_registered
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(device = id, tenant = %tenant, "gateway device registered");
                Ok(())
            }
            // Registered by a concurrent message: fine if it is ours.
            Err(e) => match ingest.registry.ingest_info(id) {
                Some(info) if info.tenant == *tenant => Ok(()),
                _ => Err(format!("cannot register device {id}: {e}")),
            },
        }
    }

    /// A Sparkplug B message from an authenticated edge node.
    pub fn on_sparkplug(
        &self,
        ingest: &Ingest,
        identity: &ClientIdentity,
        message: &Message,
    ) -> Option<AckGate> {
        let (Some(node_device), Some(tenant)) = (&identity.device_id, &identity.tenant) else {
            tracing::debug!(topic = %message.topic, "Sparkplug message from a client that is no device; ignored");
            return None;
        };
        self.counters
            .sparkplug_messages
            .fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let events = self
            .sparkplug
            .lock()
            .handle(&message.topic, &message.payload, now);
        let wait = message.qos != QoS::AtMostOnce;
        let mut pending = Vec::new();
        let mut refused = None;
        for ev in events {
            match ev {
                Event::Points { device, points } => {
                    let Some(id) = self.edge_device(ingest, tenant, identity, node_device, &device)
                    else {
                        continue;
                    };
                    if let Some(code) =
                        self.deliver(ingest, tenant, &id, &points, wait, &mut pending)
                    {
                        refused = Some(code);
                    }
                }
                Event::Online { device } => {
                    if let Some(id) =
                        self.edge_device(ingest, tenant, identity, node_device, &device)
                    {
                        ingest.fleet.record_device_event(
                            tenant,
                            &id,
                            "sparkplug_online",
                            format!("birth of {device}"),
                        );
                    }
                }
                Event::Offline { device } => {
                    let id = match &device.device {
                        None => node_device.to_string(),
                        Some(d) => child_id(&device.node, d),
                    };
                    ingest.fleet.record_device_event(
                        tenant,
                        &id,
                        "sparkplug_offline",
                        format!("death of {device}"),
                    );
                }
                Event::Rebirth { topic, payload } => {
                    self.counters
                        .sparkplug_rebirths
                        .fetch_add(1, Ordering::Relaxed);
                    self.send(topic, payload, false, None);
                }
                Event::Rejected { device, reason } => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    let id = match device.as_ref().and_then(|d| d.device.as_deref()) {
                        Some(d) => child_id(node_device, d),
                        None => node_device.to_string(),
                    };
                    let id = if ingest.registry.ingest_info(&id).is_some() {
                        id
                    } else {
                        node_device.to_string()
                    };
                    ingest.fleet.record_device_event(
                        tenant,
                        &id,
                        "sparkplug_rejected",
                        format!("{}: {reason}", message.topic),
                    );
                }
            }
        }
        gate(pending, refused)
    }

    /// The platform device a Sparkplug key names, registered if needed;
    /// `None` (recorded as a device event of the node) when it cannot be.
    fn edge_device(
        &self,
        ingest: &Ingest,
        tenant: &Arc<str>,
        identity: &ClientIdentity,
        node_device: &str,
        key: &EdgeKey,
    ) -> Option<String> {
        // The ACL only lets a device publish as the node named by its id.
        if key.node != node_device {
            return None;
        }
        let Some(d) = &key.device else {
            return Some(node_device.to_string());
        };
        let id = child_id(node_device, d);
        let labels = BTreeMap::from([
            ("sparkplug".to_string(), key.to_string()),
            ("gateway".to_string(), node_device.to_string()),
        ]);
        match self.resolve(
            ingest,
            tenant,
            identity.group.as_deref(),
            &id,
            Some(d.clone()),
            labels,
        ) {
            Ok(()) => Some(id),
            Err(why) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                ingest.fleet.record_device_event(
                    tenant,
                    node_device,
                    "gateway_device_refused",
                    why,
                );
                None
            }
        }
    }

    /// A ChirpStack integration event published by bridge device `bridge`
    /// (`rest` is the topic after `devices/{bridge}/chirpstack/`).
    pub fn on_chirpstack(
        &self,
        ingest: &Ingest,
        identity: &ClientIdentity,
        bridge: &str,
        rest: &str,
        message: &Message,
    ) -> Option<AckGate> {
        let tenant = match (&identity.device_id, &identity.tenant) {
            (Some(d), Some(t)) if &**d == bridge => t,
            _ => return None,
        };
        // Our own downlinks come back through here when the bridge's
        // namespace is observed; only events are read.
        if !rest.starts_with("application/") || !rest.contains("/event/") {
            return None;
        }
        self.counters
            .chirpstack_events
            .fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let ev = match chirpstack::decode_event(rest, &message.payload, now, &ingest.limits) {
            Ok(ev) => ev,
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                ingest.fleet.record_device_event(
                    tenant,
                    bridge,
                    "chirpstack_rejected",
                    format!("{rest}: {e}"),
                );
                return None;
            }
        };
        let id = ev.dev_eui.as_str().to_string();
        let name = ev
            .device_info
            .as_ref()
            .map(|i| i.device_name.clone())
            .filter(|n| !n.is_empty());
        let labels = BTreeMap::from([
            ("lorawan".to_string(), "true".to_string()),
            ("gateway".to_string(), bridge.to_string()),
            ("application".to_string(), ev.application_id.clone()),
        ]);
        if let Err(why) = self.resolve(ingest, tenant, identity.group.as_deref(), &id, name, labels)
        {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            ingest
                .fleet
                .record_device_event(tenant, bridge, "gateway_device_refused", why);
            return None;
        }
        {
            let mut routes = self.routes.lock();
            if routes.len() >= MAX_ROUTES && !routes.contains_key(&id) {
                routes.clear();
            }
            routes.insert(
                id.clone(),
                Route {
                    bridge: Arc::from(bridge),
                    application_id: ev.application_id.clone(),
                },
            );
        }
        let wait = message.qos != QoS::AtMostOnce;
        let mut pending = Vec::new();
        let mut refused = None;
        match ev.output {
            Output::Readings(points) => {
                refused = self.deliver(ingest, tenant, &id, &points, wait, &mut pending);
            }
            Output::Undecoded { data, link, .. } => {
                // The device profile's content type (else sniffing) decodes
                // the frame, as for a device publishing it itself.
                match ingest.ingest(Some(tenant), &id, None, &data, wait) {
                    Outcome::Refused(r) => refused = Some(r.mqtt_reason()),
                    Outcome::Pending(d) => pending.push(d),
                    Outcome::Done | Outcome::Invalid(_) => {}
                }
                if refused.is_none() {
                    refused = self.deliver(ingest, tenant, &id, &link, wait, &mut pending);
                }
            }
            Output::Joined { dev_addr } => {
                ingest.fleet.record_device_event(
                    tenant,
                    &id,
                    "lorawan_join",
                    format!("joined with DevAddr {dev_addr}"),
                );
            }
            Output::Log {
                level,
                code,
                description,
            } => {
                ingest.fleet.record_device_event(
                    tenant,
                    &id,
                    "lorawan_log",
                    format!("{level} {code}: {description}"),
                );
            }
            Output::Ack { .. } | Output::TxAck { .. } | Output::Ignored => {}
        }
        gate(pending, refused)
    }

    /// A command published for some device: when it is a LoRaWAN device
    /// seen through a bridge, hand it to ChirpStack as a downlink. The
    /// command's `params` may carry `f_port` (1–223, default 10),
    /// `confirmed`, and `data` (base64 bytes to send as they are); without
    /// `data` the command goes as an object for the profile's codec.
    fn on_command(&self, msg: &Message) {
        let Some(device) = msg
            .topic
            .strip_prefix("devices/")
            .and_then(|t| t.strip_suffix("/commands"))
        else {
            return;
        };
        let Some(route) = self.routes.lock().get(device).cloned() else {
            return;
        };
        let Ok(dev_eui) = DevEui::parse(device) else {
            return;
        };
        let Ok(cmd) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else {
            return;
        };
        let params = &cmd["params"];
        let f_port = params["f_port"]
            .as_u64()
            .and_then(|p| u8::try_from(p).ok())
            .unwrap_or(DEFAULT_F_PORT);
        let body = match params["data"].as_str().map(|d| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(d)
        }) {
            Some(Ok(bytes)) => DownlinkBody::Data(bytes),
            Some(Err(_)) => {
                tracing::warn!(device, "command data is not base64; no downlink");
                return;
            }
            None => {
                let mut m = Map::new();
                m.insert("command".into(), cmd["name"].clone());
                m.insert("id".into(), cmd["id"].clone());
                m.insert("params".into(), params.clone());
                DownlinkBody::Object(m)
            }
        };
        let down = Downlink {
            application_id: route.application_id.clone(),
            dev_eui,
            confirmed: params["confirmed"].as_bool().unwrap_or(false),
            f_port,
            body,
        };
        match down.encode() {
            Ok((topic, payload)) => {
                self.counters.downlinks.fetch_add(1, Ordering::Relaxed);
                self.send(
                    format!("devices/{}/chirpstack/{topic}", route.bridge),
                    payload,
                    false,
                    Some("application/json"),
                );
            }
            Err(e) => tracing::warn!(device, error = %e, "no downlink for the command"),
        }
    }
}

/// Command publications the downlink observer may hold.
const OBSERVER_QUEUE: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_topics_and_child_ids() {
        assert_eq!(
            chirpstack_topic("devices/lns-1/chirpstack/application/a/device/0011/event/up"),
            Some(("lns-1", "application/a/device/0011/event/up"))
        );
        assert_eq!(chirpstack_topic("devices/lns-1/telemetry"), None);
        assert_eq!(chirpstack_topic("devices//chirpstack/x"), None);
        assert_eq!(child_id("plc-1", "pump 2/a"), "plc-1.pump_2_a");
        assert!(child_id("n", &"x".repeat(100)).len() <= 64);
    }

    #[test]
    fn points_become_the_json_a_device_would_publish() {
        let p = |m: &str, ts, v| Point {
            metric: m.into(),
            ts_ms: ts,
            value: v,
        };
        let one = points_json(&[p("a", 5, Value::F64(1.5)), p("b", 5, Value::Bool(true))]);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&one).expect("json"),
            json!({"ts": 5, "a": 1.5, "b": true})
        );
        let two = points_json(&[
            p("a", 5, Value::F64(1.0)),
            p("a", 6, Value::Str("x".into())),
        ]);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&two).expect("json"),
            json!([{"ts": 5, "a": 1.0}, {"ts": 6, "a": "x"}])
        );
    }
}
