//! Telemetry ingest: the broker's publish hook for `devices/{id}/telemetry`.
//!
//! On the publishing connection's task, the payload is decoded into points
//! (`m2mhub-telemetry`) and queued in the time-series store; in durable
//! mode the returned gate holds the device's PUBACK/PUBREC until the
//! store's group commit has fsynced them. A payload that does not decode
//! is acknowledged (the broker took it), counted, and kept as a device
//! event with the reason; it never blocks or disconnects the device.

use m2mhub_api::live::{LiveEvent, LiveHub};
pub use m2mhub_api::telemetry::IngestCounters;
use m2mhub_broker::auth::ClientIdentity;
use m2mhub_broker::message::Message;
use m2mhub_broker::{AckGate, ConnectionEvents, PublishHook};
use m2mhub_registry::Registry;
use m2mhub_telemetry::{ContentType, Limits};
use m2mhub_tsdb::{InPoint, TimeSeriesStore, TsdbError, Value};
use mqtt_codec::QoS;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// MQTT 5 reason codes for a refused telemetry message.
const QUOTA_EXCEEDED: u8 = 0x97;
const UNSPECIFIED_ERROR: u8 = 0x80;

pub struct Ingest {
    pub store: Arc<dyn TimeSeriesStore>,
    pub registry: Registry,
    pub durable: bool,
    pub limits: Limits,
    pub counters: Arc<IngestCounters>,
    /// Live views (the console): told of stored points while one is open.
    pub live: Arc<LiveHub>,
}

/// The connection history: a device's connects and disconnects become
/// device events of kind `connection` (rate-limited and capped like every
/// device event) and live events for open consoles.
pub struct ConnectionHistory {
    pub registry: Registry,
    pub live: Arc<LiveHub>,
}

impl ConnectionHistory {
    fn record(&self, identity: &ClientIdentity, online: bool, detail: String) {
        // Only registered devices have a history; operator tools and
        // claim-token clients do not.
        let (Some(device), Some(tenant), None) =
            (&identity.device_id, &identity.tenant, &identity.claim)
        else {
            return;
        };
        self.live.send(LiveEvent::Connection {
            tenant: tenant.clone(),
            device: device.clone(),
            online,
            ts_ms: now_ms(),
            detail: detail.clone(),
        });
        self.registry
            .record_device_event(tenant, device, "connection", detail);
    }
}

impl ConnectionEvents for ConnectionHistory {
    fn connected(&self, client_id: &str, identity: &ClientIdentity, peer: SocketAddr) {
        self.record(
            identity,
            true,
            format!("connected from {} as client {client_id:?}", peer.ip()),
        );
    }

    fn disconnected(&self, _client_id: &str, identity: &ClientIdentity, reason: &str) {
        self.record(identity, false, format!("disconnected: {reason}"));
    }

    fn auth_failed(&self, _: &str, _: Option<&str>, _: SocketAddr, _: u8) {
        // Refused CONNECTs are security events, recorded elsewhere.
    }
}

/// `devices/{id}/telemetry` → `id`.
pub fn telemetry_device(topic: &str) -> Option<&str> {
    let id = topic.strip_prefix("devices/")?.strip_suffix("/telemetry")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Ingest {
    fn event(&self, tenant: &str, device: &str, kind: &str, detail: String) {
        self.registry
            .record_device_event(tenant, device, kind, detail);
    }
}

impl PublishHook for Ingest {
    fn on_publish(
        &self,
        _client_id: &str,
        identity: &ClientIdentity,
        message: &Message,
    ) -> Option<AckGate> {
        let device = telemetry_device(&message.topic)?;
        let c = &self.counters;
        c.messages.fetch_add(1, Ordering::Relaxed);
        // The tenant is the registry's: a device publishes only on its own
        // topics (policy), while an operator tool may publish for a device.
        let info = self.registry.ingest_info(device);
        let tenant: Arc<str> = match (&identity.device_id, &identity.tenant, &info) {
            (Some(d), Some(t), _) if &**d == device => t.clone(),
            (_, _, Some(i)) => i.tenant.clone(),
            _ => {
                c.unknown_devices.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    device,
                    "telemetry for a device the registry does not know; not stored"
                );
                return None;
            }
        };
        let declared = message.properties.content_type.as_deref();
        let profile_ct = info.as_ref().and_then(|i| i.content_type);
        let content_type = match declared.or(profile_ct) {
            Some(mime) => match ContentType::from_mime(mime) {
                Some(ct) => Some(ct),
                None => {
                    c.decode_errors.fetch_add(1, Ordering::Relaxed);
                    self.event(
                        &tenant,
                        device,
                        "decode_error",
                        format!("unsupported content type {mime:?} ({} bytes); use application/json, application/senml+json, application/senml+cbor, application/cbor or text/plain", message.payload.len()),
                    );
                    return None;
                }
            },
            None => None,
        };
        let points = match m2mhub_telemetry::decode(
            &message.payload,
            content_type,
            now_ms(),
            &self.limits,
        ) {
            Ok(p) => p,
            Err(e) => {
                c.decode_errors.fetch_add(1, Ordering::Relaxed);
                let how = match content_type {
                    Some(ct) => format!("as {ct:?}"),
                    None => "sniffed".into(),
                };
                self.event(
                    &tenant,
                    device,
                    "decode_error",
                    format!("{e} ({} bytes, {how})", message.payload.len()),
                );
                return None;
            }
        };
        if points.is_empty() {
            return None;
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
        let appended = match self.store.append(&tenant, device, &ins) {
            Ok(a) => a,
            Err(e) => {
                c.refused_messages.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device, error = %e, "telemetry refused");
                let code = refusal_code(&e);
                // Refused even in fast mode: acknowledging a message that
                // cannot be stored would lose it silently.
                return (message.qos != QoS::AtMostOnce)
                    .then(|| Box::pin(std::future::ready(Err(code))) as AckGate);
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
            self.event(&tenant, device, "rejected_points", detail);
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
        if !self.durable || message.qos == QoS::AtMostOnce {
            return None;
        }
        let counters = self.counters.clone();
        Some(Box::pin(async move {
            appended.ticket.wait().await.map_err(|e| {
                counters.refused_messages.fetch_add(1, Ordering::Relaxed);
                refusal_code(&e)
            })
        }))
    }
}

fn refusal_code(e: &TsdbError) -> u8 {
    match e {
        TsdbError::DiskFull { .. } => QUOTA_EXCEEDED,
        _ => UNSPECIFIED_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
