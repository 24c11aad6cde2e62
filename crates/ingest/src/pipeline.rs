//! The pipeline every protocol feeds: a device's payload is decoded into
//! points (`m2mhub-telemetry`), queued in the time-series store, and — in
//! durable mode — acknowledged only once the store's group commit has made
//! them durable. A payload that does not decode is accepted (the transport
//! took it), counted, and kept as a device event with the reason; it never
//! blocks or disconnects the device.
//!
//! [`Ingest::ingest`] knows nothing of MQTT: it is what CoAP, HTTP and the
//! gateways call. The MQTT publish hook for `devices/{id}/telemetry` is a
//! thin adapter over it ([`PublishHook`] below), run on the publishing
//! connection's task; its gate holds the device's PUBACK/PUBREC.

use crate::counters::IngestCounters;
use crate::live::{LiveEvent, LiveHub};
use m2mhub_broker::auth::ClientIdentity;
use m2mhub_broker::message::Message;
use m2mhub_broker::{AckGate, PublishHook};
use m2mhub_fleet::Fleet;
use m2mhub_identity::{now_ms, Registry};
use m2mhub_telemetry::{ContentType, Limits};
use m2mhub_tsdb::{InPoint, TimeSeriesStore, TsdbError, Value};
use mqtt_codec::QoS;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// MQTT 5 reason codes for a refused telemetry message.
const QUOTA_EXCEEDED: u8 = 0x97;
const UNSPECIFIED_ERROR: u8 = 0x80;

pub struct Ingest {
    pub store: Arc<dyn TimeSeriesStore>,
    /// Device → tenant and profile content type (in memory).
    pub registry: Registry,
    /// Where decode failures and refused points are kept as device events.
    pub fleet: Fleet,
    pub durable: bool,
    pub limits: Limits,
    pub counters: Arc<IngestCounters>,
    /// Live views (the console): told of stored points while one is open.
    pub live: Arc<LiveHub>,
    /// Sparkplug B edge nodes and ChirpStack bridges (`None`: their topics
    /// are routed like any other, not read).
    pub gateways: Option<Arc<crate::gateways::Gateways>>,
}

/// Why the store could not take a message: the transport tells the device
/// to retry (MQTT reason code, HTTP status, CoAP response code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Free disk space is under the configured minimum.
    #[error("the store is out of disk space")]
    DiskFull,
    /// Any other storage failure.
    #[error("the store could not write")]
    Storage,
}

impl Refusal {
    fn of(e: &TsdbError) -> Refusal {
        match e {
            TsdbError::DiskFull { .. } => Refusal::DiskFull,
            _ => Refusal::Storage,
        }
    }

    /// The MQTT 5 reason code for PUBACK/PUBREC.
    pub fn mqtt_reason(self) -> u8 {
        match self {
            Refusal::DiskFull => QUOTA_EXCEEDED,
            Refusal::Storage => UNSPECIFIED_ERROR,
        }
    }
}

/// Resolves when the message is durable (or could not be made so).
pub type Durable = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send>>;

/// What became of one message.
pub enum Outcome {
    /// Nothing to wait for: stored (fast mode, or nothing to store), or not
    /// stored for a reason already counted and kept as a device event.
    Done,
    /// The store refused it: nothing of it is kept; the device should retry.
    Refused(Refusal),
    /// Stored; the future resolves at the group commit (durable mode).
    Pending(Durable),
    /// Bad input, counted and kept as a device event: the content type is
    /// not one the decoders know ([`Invalid::UnsupportedType`]) or the
    /// payload does not decode as it ([`Invalid::Undecodable`]). MQTT
    /// acknowledges it anyway (the device cannot fix it by resending); a
    /// request protocol answers with an error naming the fix.
    Invalid(Invalid),
}

/// Why a payload was not taken; the text is the device event's detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    UnsupportedType(String),
    Undecodable(String),
}

/// `devices/{id}/telemetry` → `id`.
pub fn telemetry_device(topic: &str) -> Option<&str> {
    let id = topic.strip_prefix("devices/")?.strip_suffix("/telemetry")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

impl Ingest {
    fn event(&self, tenant: &str, device: &str, kind: &str, detail: String) {
        self.fleet.record_device_event(tenant, device, kind, detail);
    }
}

impl PublishHook for Ingest {
    fn on_publish(
        &self,
        _client_id: &str,
        identity: &ClientIdentity,
        message: &Message,
    ) -> Option<AckGate> {
        if let Some(g) = &self.gateways {
            if message.topic.starts_with("spBv1.0/") {
                return g.on_sparkplug(self, identity, message);
            }
            if let Some((bridge, rest)) = crate::gateways::chirpstack_topic(&message.topic) {
                return g.on_chirpstack(self, identity, bridge, rest, message);
            }
        }
        let device = telemetry_device(&message.topic)?;
        // The tenant of an authenticated device publishing for itself; the
        // registry's otherwise (an operator tool publishing for a device).
        let tenant = match (&identity.device_id, &identity.tenant) {
            (Some(d), Some(t)) if &**d == device => Some(t),
            _ => None,
        };
        let wait = message.qos != QoS::AtMostOnce;
        match self.ingest(
            tenant,
            device,
            message.properties.content_type.as_deref(),
            &message.payload,
            wait,
        ) {
            Outcome::Done | Outcome::Invalid(_) => None,
            // Refused even in fast mode: acknowledging a message that
            // cannot be stored would lose it silently.
            Outcome::Refused(r) => {
                wait.then(|| Box::pin(std::future::ready(Err(r.mqtt_reason()))) as AckGate)
            }
            Outcome::Pending(durable) => Some(Box::pin(async move {
                durable.await.map_err(Refusal::mqtt_reason)
            })),
        }
    }
}

impl Ingest {
    /// Take one payload from `device`, whatever protocol carried it.
    /// `tenant` is the authenticated device's own (else the registry's is
    /// used); `content_type` the one the transport declared (else the
    /// device profile's, else the payload is sniffed). With `wait` and in
    /// durable mode the outcome is [`Outcome::Pending`] until the points are
    /// durable: acknowledge the device only then.
    pub fn ingest(
        &self,
        tenant: Option<&Arc<str>>,
        device: &str,
        content_type: Option<&str>,
        payload: &[u8],
        wait: bool,
    ) -> Outcome {
        let c = &self.counters;
        c.messages.fetch_add(1, Ordering::Relaxed);
        let info = self.registry.ingest_info(device);
        let tenant: Arc<str> = match (tenant, &info) {
            (Some(t), _) => t.clone(),
            (None, Some(i)) => i.tenant.clone(),
            (None, None) => {
                c.unknown_devices.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    device,
                    "telemetry for a device the registry does not know; not stored"
                );
                return Outcome::Done;
            }
        };
        let declared = content_type;
        let profile_ct = info.as_ref().and_then(|i| i.content_type);
        let content_type = match declared.or(profile_ct) {
            Some(mime) => match ContentType::from_mime(mime) {
                Some(ct) => Some(ct),
                None => {
                    c.decode_errors.fetch_add(1, Ordering::Relaxed);
                    let detail = format!("unsupported content type {mime:?} ({} bytes); use application/json, application/senml+json, application/senml+cbor, application/cbor or text/plain", payload.len());
                    self.event(&tenant, device, "decode_error", detail.clone());
                    return Outcome::Invalid(Invalid::UnsupportedType(detail));
                }
            },
            None => None,
        };
        let points = match m2mhub_telemetry::decode(payload, content_type, now_ms(), &self.limits) {
            Ok(p) => p,
            Err(e) => {
                c.decode_errors.fetch_add(1, Ordering::Relaxed);
                let how = match content_type {
                    Some(ct) => format!("as {ct:?}"),
                    None => "sniffed".into(),
                };
                let detail = format!("{e} ({} bytes, {how})", payload.len());
                self.event(&tenant, device, "decode_error", detail.clone());
                return Outcome::Invalid(Invalid::Undecodable(detail));
            }
        };
        self.store_points(&tenant, device, &points, wait)
    }

    /// Store points already decoded (by a gateway protocol: Sparkplug B,
    /// LoRaWAN) for `device` of `tenant`, with the same durability, counters,
    /// device events and live events as [`Ingest::ingest`].
    pub fn store_points(
        &self,
        tenant: &Arc<str>,
        device: &str,
        points: &[m2mhub_telemetry::Point],
        wait: bool,
    ) -> Outcome {
        let c = &self.counters;
        if points.is_empty() {
            return Outcome::Done;
        }
        let ins: Vec<InPoint<'_>> = points
            .iter()
            .map(|p| InPoint {
                metric: &p.metric,
                ts_ms: p.ts_ms,
                value: match &p.value {
                    m2mhub_telemetry::Value::F64(x) => Value::F64(*x),
                    m2mhub_telemetry::Value::Bool(b) => Value::Bool(*b),
                    m2mhub_telemetry::Value::Str(s) => Value::Str(Arc::from(s.as_str())),
                },
            })
            .collect();
        let appended = match self.store.append(tenant, device, &ins) {
            Ok(a) => a,
            Err(e) => {
                c.refused_messages.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device, error = %e, "telemetry refused");
                return Outcome::Refused(Refusal::of(&e));
            }
        };
        c.points
            .fetch_add(appended.accepted as u64, Ordering::Relaxed);
        if !appended.rejected.is_empty() {
            c.rejected_points
                .fetch_add(appended.rejected.len() as u64, Ordering::Relaxed);
            let first = &appended.rejected[0].1;
            let more = appended.rejected.len() - 1;
            let detail = if more > 0 {
                format!("{first} (and {more} more points refused)")
            } else {
                first.clone()
            };
            self.event(tenant, device, "rejected_points", detail);
        }
        if self.live.active() {
            self.live.send(LiveEvent::Telemetry {
                tenant: tenant.clone(),
                device: Arc::from(device),
                points: points
                    .iter()
                    .map(|p| {
                        let v = match &p.value {
                            m2mhub_telemetry::Value::F64(x) => serde_json::json!(x),
                            m2mhub_telemetry::Value::Bool(b) => serde_json::json!(b),
                            m2mhub_telemetry::Value::Str(s) => serde_json::json!(s),
                        };
                        (p.metric.clone(), p.ts_ms, v)
                    })
                    .collect(),
            });
        }
        if !self.durable || !wait {
            return Outcome::Done;
        }
        let counters = self.counters.clone();
        Outcome::Pending(Box::pin(async move {
            appended.ticket.wait().await.map_err(|e| {
                counters.refused_messages.fetch_add(1, Ordering::Relaxed);
                Refusal::of(&e)
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use m2mhub_identity::NewDevice;
    use m2mhub_tsdb::Tsdb;

    struct Rig {
        _dir: tempfile::TempDir,
        ingest: Ingest,
        tsdb: Arc<Tsdb>,
    }

    /// The pipeline over a real registry, fleet and durable store, with
    /// device `m1` (tenant `default`) registered.
    fn rig() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(&dir.path().join("registry")).expect("registry");
        let fleet = Fleet::open(&dir.path().join("registry"), registry.clone()).expect("fleet");
        registry
            .create_device(NewDevice {
                id: Some("m1".into()),
                ..Default::default()
            })
            .expect("device");
        let tsdb = Arc::new(
            Tsdb::open(&dir.path().join("tsdb"), m2mhub_tsdb::Options::default()).expect("tsdb"),
        );
        let ingest = Ingest {
            store: tsdb.clone(),
            registry,
            fleet,
            durable: true,
            limits: Limits::default(),
            counters: Arc::default(),
            live: Arc::default(),
            gateways: None,
        };
        Rig {
            _dir: dir,
            ingest,
            tsdb,
        }
    }

    /// What CoAP and HTTP will call: a payload from a known device is
    /// stored and the outcome resolves once it is durable.
    #[tokio::test]
    async fn a_payload_is_stored_and_acknowledged_once_durable() {
        let r = rig();
        let out = r.ingest.ingest(
            None,
            "m1",
            Some("application/json"),
            br#"{"temp": 21.5, "on": true}"#,
            true,
        );
        let Outcome::Pending(durable) = out else {
            panic!("durable mode waits for the group commit");
        };
        durable.await.expect("stored");
        let latest = r.tsdb.latest("default", "m1").expect("latest");
        let temp = latest.iter().find(|l| &*l.metric == "temp").expect("temp");
        assert_eq!(temp.value, Value::F64(21.5));
        assert_eq!(r.ingest.counters.points.load(Ordering::Relaxed), 2);
        // Without `wait` (QoS 0) nothing is held.
        let out = r.ingest.ingest(None, "m1", None, b"22", false);
        assert!(matches!(out, Outcome::Done));
    }

    /// Bad input is accepted, counted and kept as a device event; an
    /// unknown device is counted and nothing is stored.
    #[tokio::test]
    async fn bad_payloads_become_device_events_and_unknown_devices_are_counted() {
        let r = rig();
        let out = r
            .ingest
            .ingest(None, "m1", Some("application/json"), b"{not json", true);
        assert!(matches!(out, Outcome::Invalid(Invalid::Undecodable(_))));
        let out = r
            .ingest
            .ingest(None, "m1", Some("image/png"), b"\x89PNG", true);
        assert!(
            matches!(&out, Outcome::Invalid(Invalid::UnsupportedType(d)) if d.contains("image/png"))
        );
        assert_eq!(r.ingest.counters.decode_errors.load(Ordering::Relaxed), 2);
        let events = r
            .ingest
            .fleet
            .list_device_events(None, "m1", Some("decode_error"), None, 10)
            .expect("events");
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(events
            .iter()
            .any(|e| e.detail.contains("unsupported content type")));

        let out = r.ingest.ingest(None, "ghost", None, b"1", true);
        assert!(matches!(out, Outcome::Done));
        assert_eq!(r.ingest.counters.unknown_devices.load(Ordering::Relaxed), 1);
        assert!(r
            .tsdb
            .latest("default", "ghost")
            .expect("latest")
            .is_empty());
    }

    #[test]
    fn refusals_map_to_mqtt_reason_codes() {
        assert_eq!(Refusal::DiskFull.mqtt_reason(), 0x97);
        assert_eq!(Refusal::Storage.mqtt_reason(), 0x80);
    }

    #[test]
    fn only_a_device_telemetry_topic_is_ingested() {
        assert_eq!(telemetry_device("devices/m1/telemetry"), Some("m1"));
        assert_eq!(telemetry_device("devices//telemetry"), None);
        assert_eq!(telemetry_device("devices/a/b/telemetry"), None);
        assert_eq!(telemetry_device("devices/m1/telemetry/x"), None);
        assert_eq!(telemetry_device("devices/m1/state"), None);
        assert_eq!(telemetry_device("tenants/devices/m1/telemetry"), None);
    }
}
