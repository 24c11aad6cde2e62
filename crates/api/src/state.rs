//! What every handler can reach: the broker, the identity services, the
//! time-series store and the rules engine.

use m2mhub_broker::Broker;
use m2mhub_pki::DeviceCa;
use m2mhub_registry::Registry;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub broker: Broker,
    pub registry: Registry,
    pub ca: Arc<DeviceCa>,
    /// Validity of certificates the API issues, in days.
    pub cert_days: u32,
    /// Counters of the registry's authenticator, for `/metrics`.
    pub auth_stats: Option<Arc<m2mhub_registry::AuthStats>>,
    /// The time-series store queries read from.
    pub tsdb: Arc<dyn m2mhub_tsdb::TimeSeriesStore>,
    /// Counters of the MQTT telemetry ingest, for `/metrics`.
    pub ingest: Option<Arc<crate::telemetry::IngestCounters>>,
    /// The rules engine: validates rules, reloads them after a change,
    /// reports their counters and sends commands. `None` without one
    /// (rules are then stored unvalidated, commands only recorded).
    pub rules: Option<Arc<dyn crate::rules::RuleService>>,
    /// Live events for `/api/v1/live` streams (the console's live views).
    pub live: Arc<crate::live::LiveHub>,
}
