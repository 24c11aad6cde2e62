//! What every handler can reach: the broker, identity, fleet operations,
//! the time-series store and the rules engine.

use m2mhub_broker::Broker;
use m2mhub_identity::Registry;
use m2mhub_pki::DeviceCa;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub broker: Broker,
    pub registry: Registry,
    /// Alarms, commands, device events and rule definitions.
    pub fleet: m2mhub_fleet::Fleet,
    pub ca: Arc<DeviceCa>,
    /// Seals the DTLS pre-shared keys the API issues (master key).
    pub psk_keys: m2mhub_pki::PskKeys,
    /// Validity of certificates the API issues, in days.
    pub cert_days: u32,
    /// Counters of the registry's authenticator, for `/metrics`.
    pub auth_stats: Option<Arc<m2mhub_identity::AuthStats>>,
    /// The time-series store queries read from.
    pub tsdb: Arc<dyn m2mhub_tsdb::TimeSeriesStore>,
    /// Counters of the MQTT telemetry ingest, for `/metrics`.
    pub ingest: Option<Arc<m2mhub_ingest::IngestCounters>>,
    /// The rules engine: validates rules, reloads them after a change,
    /// reports their counters and sends commands. `None` without one
    /// (rules are then stored unvalidated, commands only recorded).
    pub rules: Option<Arc<dyn m2mhub_automation::RuleService>>,
    /// Live events for `/api/v1/live` streams (the console's live views).
    pub live: Arc<m2mhub_ingest::LiveHub>,
    /// OTA firmware: artifact files, download URLs, the signing key.
    /// `None`: the OTA routes answer 404.
    pub ota: Option<Arc<crate::ota::OtaApi>>,
    /// The telemetry pipeline HTTP devices post into (the one MQTT's
    /// publish hook feeds). `None`: device telemetry answers 503.
    pub pipeline: Option<Arc<m2mhub_ingest::Ingest>>,
    /// Command polls of HTTP devices waiting for a command.
    pub command_waiters: Option<Arc<crate::device_http::CommandWaiters>>,
    /// Limits of the HTTP server: body size, header timeout, connections
    /// per address, requests per token, CORS origins.
    pub http: Arc<crate::limits::HttpLimits>,
    /// Failed-login counting and lockouts; the bound on password checks.
    pub login: Arc<crate::lockout::LoginGuard>,
    /// This node's membership in a cluster; `None` on a single node.
    pub cluster: Option<Arc<m2mhub_cluster::Cluster>>,
    /// The console's tile server and the Content-Security-Policy it needs.
    pub console: Arc<crate::console::ConsoleConfig>,
    /// One-minute samples of the broker's counters over the last hour
    /// (filled by `broker_history::sample_every_minute`).
    pub broker_history: Arc<crate::broker_history::BrokerHistory>,
    /// Scheduled reports: checks definitions, runs them, finds their files.
    /// `None`: the report routes that need it answer 503.
    pub reports: Option<Arc<m2mhub_reports::Reports>>,
}
