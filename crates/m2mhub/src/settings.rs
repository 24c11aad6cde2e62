//! Configuration: the TOML file, then `M2MHUB_*` environment variables, then
//! command-line flags, parsed in two phases — raw [`Settings`] (what the
//! user wrote) and [`Validated`] (what the server runs with) — so the
//! runtime never sees an invalid value, and every error names its key.

use anyhow::{anyhow, bail, Context, Result};
use m2mhub_broker::BrokerConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The commented default configuration printed by `m2mhub config default`.
/// A unit test checks that it parses to `Settings::default()`.
pub const DEFAULT_CONFIG: &str = r#"# m2mhub configuration.
# Every key can also be set by an environment variable: M2MHUB_<SECTION>_<KEY>
# in upper case, e.g. M2MHUB_MQTT_LISTEN=0.0.0.0:1883 or M2MHUB_DATA_DIR=/var/lib/m2mhub.
# Command-line flags of `m2mhub serve` override both.

# All state (retained messages, persistent sessions, later the device
# registry and time series) lives under this one folder.
data_dir = "./m2mhub-data"

[mqtt]
# Plain MQTT (3.1.1 and 5.0) listener.
listen = "0.0.0.0:1883"
# MQTT over TLS. Devices may present a client certificate from the built-in
# device CA (or tls_client_ca) instead of a token: mutual TLS.
tls_listen = "0.0.0.0:8883"
# PEM files of the TLS server certificate chain and key; when empty, a
# certificate signed by the built-in CA (<data_dir>/pki/ca.pem) is used.
tls_cert = ""
tls_key = ""
# PEM file of an extra CA whose client certificates are accepted too.
tls_client_ca = ""
# PEM file of certificate revocation lists (CRLs) for tls_client_ca: a
# client certificate listed there is refused at the handshake. Kill -HUP
# the server to read the certificate, key, CA and CRL files again (a
# renewed certificate or a new CRL, without a restart; connections open
# keep their session).
tls_client_crl = ""
# Accept clients without credentials. Off by default: devices connect with
# their id and a token, or a certificate (see `m2mhub device`). Enable it
# explicitly (flag --allow-anonymous) for a closed network or a quick try.
allow_anonymous = false
# Extra MQTT users with full access (bridges, tools): lines written by
# `m2mhub passwd USER`. Devices use the registry instead.
password_file = ""
# Largest packet accepted from a client, in bytes.
max_packet_size = 1048576
# QoS 1/2 messages a client may have in flight toward the broker.
receive_maximum = 128
# Messages queued per session (offline or slow clients); beyond this they are dropped and counted.
max_queued_messages = 10000
# Topic aliases an MQTT 5 client may use toward the broker.
topic_alias_maximum = 64
# Upper bound of client keep-alive in seconds (0 = accept any).
max_keep_alive = 0
# Upper bound of session expiry in seconds.
max_session_expiry_secs = 4294967295
# Drop connections that send no CONNECT within this many seconds.
connect_timeout_secs = 10
# Drop clients whose socket accepts no data for this many seconds.
write_timeout_secs = 30
# Interval of $SYS/broker statistics in seconds (0 = off).
sys_interval_secs = 10
# Support retained messages.
retain_available = true
# Maximum simultaneous connections (0 = unlimited).
max_connections = 0
# Topic filters no client may subscribe to, e.g. ["test/nosubscribe", "retired/#"]:
# a SUBSCRIBE they cover is answered 0x80 (MQTT 3.1.1 and 5). Not access
# control: `#` still receives those topics (device policies decide access).
# Environment: a comma-separated list.
refused_subscriptions = []
# Open connections per source IP (IPv6: per /64); 0 = unlimited.
max_connections_per_ip = 100
# Connection attempts per second, all clients together (0 = unlimited)...
max_connect_rate = 0
# ...and per source IP, with a burst allowance.
max_connect_rate_per_ip = 20
connect_burst_per_ip = 40
# PUBLISH packets per second per client (0 = unlimited); beyond it QoS 1/2
# are refused with a reason code and QoS 0 dropped.
max_publish_rate = 0
# Subscriptions one session may hold (0 = unlimited).
max_subscriptions_per_session = 1000
# Failed authentications from one IP within auth_failure_window_secs that
# ban the IP (0 = never); bans start at ban_base_secs and double per repeat.
auth_failures_before_ban = 10
auth_failure_window_secs = 60
# Connections of one client id within flapping_window_secs that ban it (0 = never).
# Connections the client ends with DISCONNECT do not count.
max_connects_per_client_id = 20
flapping_window_secs = 60
ban_base_secs = 60
ban_max_secs = 86400
ban_forget_secs = 86400
# Accept client certificates signed by tls_client_ca that were never
# registered with a device (the device id is the certificate's common name).
accept_unregistered_certs = false
# fsync every group commit of the broker store (survives power loss).
# When false, acknowledged messages survive a crash of the process (kill -9)
# but not of the machine.
fsync = false

[telemetry]
# Messages published on devices/{id}/telemetry are decoded into points and
# stored in the embedded time-series store under <data_dir>/tsdb.
# durable: a QoS 1/2 telemetry message is acknowledged only once its points
# are fsynced in the write-ahead log (kill -9 or power loss lose nothing
# acknowledged). fast: acknowledged at once, the log is fsynced every second
# (a crash of the machine may lose the last second).
mode = "durable"
# Points older than this many days are dropped (0 = keep forever).
# Shorter retention per tenant or metric: /api/v1/telemetry/retention.
retention_days = 0
# Refuse new points while the disk has less than this free (MiB).
min_free_mb = 64
# Flush in-memory head chunks to partition files at least this often.
flush_interval_secs = 600
# Most points one payload may carry.
max_points_per_message = 10000

[diagnostics]
# Diagnostic bundles devices upload on request (POST
# /api/v1/devices/{id}/diagnostics), kept under <data_dir>/diagnostics.
# Largest bundle accepted, in bytes (16 MiB); a larger upload is refused (413).
max_bundle_bytes = 16777216
# Bundles, and requests that expired or failed, are deleted after this many hours.
retention_hours = 168
# Seconds a device has to upload once asked (the one-time URL's lifetime).
upload_url_ttl_s = 900

[reports]
# Scheduled reports (/api/v1/reports): runs' CSV and HTML are kept under
# <data_dir>/reports; each report says how many. Seconds between checks for
# reports that are due.
check_interval_secs = 30
# The mail relay reports are sent through. Empty host: no mail (reports
# with mail recipients are refused).
smtp_host = ""
# 587 with starttls, 465 with tls; none only for a relay on this machine
# (no password is sent without TLS).
smtp_port = 587
smtp_security = "starttls"
smtp_username = ""
# Better in the environment: M2MHUB_REPORTS_SMTP_PASSWORD. Never logged.
smtp_password = ""
# The sender address.
smtp_from = "m2mhub@localhost"
# PEM file of a private CA the relay's certificate is checked against
# besides the system's.
smtp_ca_file = ""
smtp_timeout_secs = 30

[http]
# HTTP server: /healthz, /metrics, MQTT over WebSocket at /mqtt, API at /api/v1.
listen = "0.0.0.0:8080"
# HTTPS: the same API, console and device routes over TLS, with the MQTT TLS
# listener's certificate (mqtt.tls_cert/tls_key, else the built-in CA's). A
# device may authenticate its own requests with its client certificate here.
# Empty: no HTTPS listener.
tls_listen = "0.0.0.0:8443"
# The base URL devices reach this server's HTTP at (firmware download links
# carry it), e.g. "https://hub.example.com". Empty: http://<listen address>
# (with 127.0.0.1 for an unspecified address), which only suits devices on
# this machine.
public_url = ""
# Largest request body of the JSON API routes, in bytes (1 MiB); a larger
# one is refused with 413. Uploads have their own caps
# (ota.max_artifact_mb, diagnostics.max_bundle_bytes; device telemetry 1 MiB).
max_body_bytes = 1048576
# A client must send a request's whole header within this many seconds of
# connecting or of its previous response: closes stalled (slowloris) and
# idle keep-alive connections.
header_read_timeout_secs = 10
# Once a request's header is in, its body may pause at most this many
# seconds between two pieces; a stalled body is answered 408.
body_read_timeout_secs = 30
# Open HTTP(S) connections per source address (IPv6: per /64); 0 = unlimited.
max_connections_per_ip = 256
# API requests in flight per bearer token; more are refused with 429
# (0 = unlimited).
max_requests_per_token = 32
# Origins (scheme://host[:port]) whose web pages may call the API from a
# browser (CORS), or ["*"] for any. Empty: none; the console needs none.
# Environment: a comma-separated list.
cors_origins = []

[login]
# Operator password logins (POST /api/v1/auth/login). Failed logins of one
# user name within failure_window_secs that lock the name out (0 = never)...
max_failures_per_user = 5
# ...and from one source address, whatever the user names (0 = never).
max_failures_per_address = 20
failure_window_secs = 300
# A lockout lasts lockout_secs, doubling with each repeat up to
# max_lockout_secs; a locked login is answered 429 with Retry-After.
# A successful login clears the user name's count.
lockout_secs = 60
max_lockout_secs = 3600
# Password checks (Argon2id: tens of milliseconds and 19 MiB each) running
# at once, and waiting; beyond that a login is answered 503 with Retry-After.
max_concurrent_hashes = 2
max_queued_hashes = 16
# User names and addresses counted at once (bounds the memory).
max_tracked = 10000

[security]
# Security events (GET /api/v1/security/events) whose kinds raise an alarm:
# type security_<kind>, on the device the event is about, else on
# ip-<address> (or client-<client id>) in the default tenant. A repeat
# while the alarm is active counts up on it. Rules see every event on
# $events/security/<kind> whatever this lists. Kinds: auth_failure_burst,
# ban, acl_violation, new_address, rate_anomaly, flapping, login_lockout.
# Empty: no security alarms. Environment: a comma-separated list.
alarms = ["auth_failure_burst", "ban", "acl_violation", "new_address", "rate_anomaly", "flapping", "login_lockout"]

[ota]
# Firmware images: stored under <data_dir>/ota, signed with the platform's
# Ed25519 key (public key at /api/v1/ota/public-key).
# Largest image accepted (MiB).
max_artifact_mb = 256
# Largest chunk of an MQTT chunked download (bytes; a device may ask for
# less, to fit its Maximum Packet Size).
chunk_bytes = 16384
# How long a download URL handed to a device works (seconds).
url_ttl_secs = 3600

[coap]
# CoAPS: CoAP over DTLS 1.2 with a per-device pre-shared key (issue one with
# `m2mhub device psk issue ID`; the device presents its PSK identity and
# uses the resources directly: coaps://host/telemetry). Empty: no CoAPS.
dtls_listen = "0.0.0.0:5684"
# DTLS sessions at most, and the idle time after which one is forgotten.
dtls_max_sessions = 10000
dtls_idle_secs = 600
# Plain CoAP (RFC 7252, UDP) for constrained devices that name their device
# id and token secret in the path: coap://host/{device_id}/{secret}/telemetry
# (resources: telemetry, commands (Observe), commands/{id}, shadow[/{name}]).
# Plain CoAP is not encrypted, so it is off unless an address is set here,
# e.g. "0.0.0.0:5683".
listen = ""
# Requests per second allowed per client address (and the burst).
rate_per_second = 20
rate_burst = 40
# Largest request body a block-wise (Block1) upload may reach, in KiB.
max_body_kb = 1024

[gateways]
# Sparkplug B edge nodes (node id = their device id, on spBv1.0/...) and
# ChirpStack bridges (a bridge device publishing its integration events on
# devices/{bridge}/chirpstack/application/{app}/device/{dev_eui}/event/{kind}).
# Register devices a gateway names for the first time (Sparkplug devices as
# {node}.{device}, LoRaWAN devices by DevEUI) in the gateway's tenant and
# group; false: their data is refused and kept as a device event.
auto_register = true
# This platform's Sparkplug host id: when set, the retained message
# spBv1.0/STATE/{id} announces it online (edge nodes configured with a primary
# host wait for it). Empty: no STATE message (it would show in every `#`
# subscription).
sparkplug_host_id = ""
# At most one Sparkplug rebirth request per edge node this often (seconds).
rebirth_interval_secs = 10

[cluster]
# Run as one node of a cluster: nodes share MQTT routing (interest-based),
# shared subscriptions, retained messages and session takeover through NATS
# with JetStream (`nats-server -js`). Off: a single node with no external
# service. Also --cluster.
enabled = false
# NATS server URL(s), comma-separated (--nats-url).
nats_url = "nats://127.0.0.1:4222"
# This node's name in the cluster; empty: one generated on first start and
# kept in the data folder (file node-id). Letters, digits, - and _ only.
node_id = ""
# The cluster's name: every node of one cluster uses the same; it prefixes
# the NATS subjects and JetStream buckets, so clusters can share a NATS.
name = "m2mhub"
# How long the cluster keeps QoS 1/2 messages (a JetStream stream) so that a
# persistent session resumes on another node with what it missed, hours.
queue_retention_hours = 24
# QoS 0 messages for other nodes waiting for NATS; beyond it they are
# dropped (counted in m2mhub_cluster_forward_dropped). QoS 1/2 messages are
# never dropped for a slow fabric: their PUBACK waits until JetStream has
# them, which slows their publishers down (Receive Maximum, then TCP).
forward_queue = 65536
# TLS to NATS (TLS 1.2+, rustls): required when nats_tls is true, when a
# nats_ca is given, or with tls:// URLs. nats_ca: PEM file of the CA that
# signed the NATS servers' certificates (empty: the system's roots);
# nats_cert/nats_key: this node's client certificate and key (PEM), for
# servers that verify clients.
nats_tls = false
nats_ca = ""
nats_cert = ""
nats_key = ""

[console]
# The operator console's map (at /). Tiles come from this server, in
# Leaflet's URL form ({s} for a subdomain, {z}/{x}/{y} the tile); the
# console's Content-Security-Policy lets images come from its origin and no
# other. Under the tiles, and wherever they cannot be loaded (no internet),
# the map draws its embedded basemap (Natural Earth coastlines and borders).
# Empty: no tiles, the embedded basemap alone.
tile_url = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
# Shown in the map's corner; the tile provider's licence usually requires it.
tile_attribution = "© OpenStreetMap contributors"

[storage]
# Devices, credentials, tenants, operators, API tokens, policies, alarms,
# commands, rules, shadows, OTA campaigns and the audit log live in
# <data_dir>/registry/registry.db (SQLite) unless this names a PostgreSQL
# server, e.g. "postgres://m2mhub:PASSWORD@db.example.com:5432/m2mhub",
# which several m2mhub nodes can share (tables in the schemas `identity` and
# `fleet`, created and migrated at start). Telemetry, retained messages and
# sessions stay under data_dir. The password is never logged.
postgres_url = ""
# PEM file of the CA that signed the PostgreSQL server's certificate: set,
# every connection is TLS (1.2+, rustls), the certificate is verified
# against it and the URL's host, and nothing falls back to plain text
# (sslmode=require in the URL needs it). Empty: plain TCP (a private
# network or a local tunnel).
postgres_ca = ""
# Where telemetry points live: "embedded" (the time-series store under
# <data_dir>/tsdb, this node's points only) or "postgres" (the server of
# postgres_url, schema `telemetry`: tables partitioned by day, 1 min and 1 h
# rollups kept on ingest, shared by every node, so each node's API sees all
# points). telemetry.mode, retention_days and max_points_per_message apply to
# both; min_free_mb and flush_interval_secs only to the embedded store.
telemetry = "embedded"

[log]
# trace, debug, info, warn or error (RUST_LOG overrides it).
level = "info"
# text or json
format = "text"
"#;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub mqtt: MqttSettings,
    pub telemetry: TelemetrySettings,
    pub diagnostics: DiagnosticsSettings,
    pub reports: ReportSettings,
    pub http: HttpSettings,
    pub login: LoginSettings,
    pub security: SecuritySettings,
    pub ota: OtaSettings,
    pub gateways: GatewaySettings,
    pub coap: CoapSettings,
    pub cluster: ClusterSettings,
    pub console: ConsoleSettings,
    pub storage: StorageSettings,
    pub log: LogSettings,
}

/// Where the metadata lives. `Debug` hides the URL's password, so settings
/// can be logged whole.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub postgres_url: String,
    pub postgres_ca: String,
    /// `embedded` or `postgres`.
    pub telemetry: String,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            postgres_url: String::new(),
            postgres_ca: String::new(),
            telemetry: "embedded".into(),
        }
    }
}

impl StorageSettings {
    /// The URL as it may be shown: without its password.
    pub fn shown_url(&self) -> String {
        match self.postgres_url.trim() {
            "" => String::new(),
            url => m2mhub_pgstore::PgUrl::parse(url)
                .map_or_else(|_| "(invalid, not shown)".into(), |u| u.to_string()),
        }
    }
}

impl std::fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSettings")
            .field("postgres_url", &self.shown_url())
            .field("postgres_ca", &self.postgres_ca)
            .field("telemetry", &self.telemetry)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    pub enabled: bool,
    pub nats_url: String,
    pub node_id: String,
    pub name: String,
    pub queue_retention_hours: u32,
    pub forward_queue: usize,
    pub nats_tls: bool,
    pub nats_ca: String,
    pub nats_cert: String,
    pub nats_key: String,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            enabled: false,
            nats_url: "nats://127.0.0.1:4222".into(),
            node_id: String::new(),
            name: "m2mhub".into(),
            queue_retention_hours: 24,
            forward_queue: m2mhub_cluster::FORWARD_QUEUE,
            nats_tls: false,
            nats_ca: String::new(),
            nats_cert: String::new(),
            nats_key: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Security event kinds that raise alarms.
    pub alarms: Vec<String>,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        SecuritySettings {
            alarms: m2mhub_identity::SecurityKind::ALL
                .iter()
                .map(|k| k.as_str().to_string())
                .collect(),
        }
    }
}

impl SecuritySettings {
    fn validate(&self) -> Result<m2mhub_automation::SecurityAlarms> {
        let mut kinds = Vec::new();
        for k in &self.alarms {
            let kind: m2mhub_identity::SecurityKind = k.parse().map_err(|_| {
                let all: Vec<&str> = m2mhub_identity::SecurityKind::ALL
                    .iter()
                    .map(|k| k.as_str())
                    .collect();
                anyhow!(
                    "invalid value in `security.alarms`: {k:?}; use any of {} (or [] for none)",
                    all.join(", ")
                )
            })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        Ok(m2mhub_automation::SecurityAlarms { kinds })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    pub tile_url: String,
    pub tile_attribution: String,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            tile_url: m2mhub_api::console::DEFAULT_TILE_URL.into(),
            tile_attribution: m2mhub_api::console::DEFAULT_TILE_ATTRIBUTION.into(),
        }
    }
}

/// How this node joins a cluster (see `[cluster]`).
#[derive(Debug, Clone)]
pub struct ClusterJoin {
    pub nats_url: String,
    pub name: String,
    pub queue_retention: Duration,
    pub forward_queue: usize,
    pub tls: Option<m2mhub_cluster::NatsTls>,
    /// `None`: the one kept in the data folder (made on first start).
    pub node_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapSettings {
    pub dtls_listen: String,
    pub dtls_max_sessions: usize,
    pub dtls_idle_secs: u64,
    pub listen: String,
    pub rate_per_second: u32,
    pub rate_burst: u32,
    pub max_body_kb: usize,
}

impl Default for CoapSettings {
    fn default() -> Self {
        CoapSettings {
            dtls_listen: "0.0.0.0:5684".into(),
            dtls_max_sessions: 10_000,
            dtls_idle_secs: 600,
            listen: String::new(),
            rate_per_second: 20,
            rate_burst: 40,
            max_body_kb: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    pub auto_register: bool,
    pub sparkplug_host_id: String,
    pub rebirth_interval_secs: u32,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            auto_register: true,
            sparkplug_host_id: String::new(),
            rebirth_interval_secs: 10,
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSettings {
    pub check_interval_secs: u32,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_security: String,
    pub smtp_username: String,
    pub smtp_password: String,
    pub smtp_from: String,
    pub smtp_ca_file: String,
    pub smtp_timeout_secs: u32,
}

impl std::fmt::Debug for ReportSettings {
    /// Everything but the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportSettings")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("smtp_security", &self.smtp_security)
            .field("smtp_username", &self.smtp_username)
            .field("smtp_from", &self.smtp_from)
            .finish_non_exhaustive()
    }
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings {
            check_interval_secs: 30,
            smtp_host: String::new(),
            smtp_port: 587,
            smtp_security: "starttls".into(),
            smtp_username: String::new(),
            smtp_password: String::new(),
            smtp_from: "m2mhub@localhost".into(),
            smtp_ca_file: String::new(),
            smtp_timeout_secs: 30,
        }
    }
}

impl ReportSettings {
    fn validate(&self) -> Result<ReportConfig> {
        if self.check_interval_secs == 0 {
            bail!("invalid value for `reports.check_interval_secs`: 0; use at least 1 (seconds)");
        }
        let smtp = if self.smtp_host.trim().is_empty() {
            None
        } else {
            let security = match self.smtp_security.as_str() {
                "starttls" => m2mhub_reports::SmtpSecurity::StartTls,
                "tls" => m2mhub_reports::SmtpSecurity::Tls,
                "none" => m2mhub_reports::SmtpSecurity::None,
                other => bail!("invalid value for `reports.smtp_security`: {other:?}; use starttls, tls or none"),
            };
            if m2mhub_reports::validate_email(&self.smtp_from).is_err() {
                bail!("invalid value for `reports.smtp_from`: {:?}; use a mail address (reports@example.com)", self.smtp_from);
            }
            let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
            if opt(&self.smtp_password).is_some() && security == m2mhub_reports::SmtpSecurity::None
            {
                bail!("invalid value for `reports.smtp_security`: none, with a password set; use starttls or tls (a password is never sent in clear)");
            }
            let extra_roots_pem = match opt(&self.smtp_ca_file) {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read `reports.smtp_ca_file` {path}"))?,
                ),
                None => None,
            };
            Some(m2mhub_reports::SmtpConfig {
                host: self.smtp_host.trim().to_string(),
                port: self.smtp_port,
                security,
                username: opt(&self.smtp_username),
                password: opt(&self.smtp_password),
                from: self.smtp_from.clone(),
                extra_roots_pem,
                timeout: Duration::from_secs(u64::from(self.smtp_timeout_secs.max(1))),
            })
        };
        Ok(ReportConfig {
            check_interval: Duration::from_secs(u64::from(self.check_interval_secs)),
            smtp,
        })
    }
}

/// Report settings the server runs with.
#[derive(Debug, Clone)]
pub struct ReportConfig {
    pub check_interval: Duration,
    pub smtp: Option<m2mhub_reports::SmtpConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiagnosticsSettings {
    pub max_bundle_bytes: u64,
    pub retention_hours: u32,
    pub upload_url_ttl_s: u32,
}

impl Default for DiagnosticsSettings {
    fn default() -> Self {
        DiagnosticsSettings {
            max_bundle_bytes: m2mhub_fleet::diagnostic::DEFAULT_MAX_BUNDLE_BYTES,
            retention_hours: 168,
            upload_url_ttl_s: 900,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    pub listen: String,
    pub tls_listen: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_client_ca: String,
    pub tls_client_crl: String,
    pub allow_anonymous: bool,
    pub password_file: String,
    pub max_packet_size: u32,
    pub receive_maximum: u16,
    pub max_queued_messages: u32,
    pub topic_alias_maximum: u16,
    pub max_keep_alive: u16,
    pub max_session_expiry_secs: u32,
    pub connect_timeout_secs: u32,
    pub write_timeout_secs: u32,
    pub sys_interval_secs: u32,
    pub retain_available: bool,
    pub max_connections: u32,
    pub refused_subscriptions: Vec<String>,
    pub max_connections_per_ip: u32,
    pub max_connect_rate: u32,
    pub max_connect_rate_per_ip: u32,
    pub connect_burst_per_ip: u32,
    pub max_publish_rate: u32,
    pub max_subscriptions_per_session: u32,
    pub auth_failures_before_ban: u32,
    pub auth_failure_window_secs: u32,
    pub max_connects_per_client_id: u32,
    pub flapping_window_secs: u32,
    pub ban_base_secs: u32,
    pub ban_max_secs: u32,
    pub ban_forget_secs: u32,
    pub accept_unregistered_certs: bool,
    pub fsync: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    pub mode: String,
    pub retention_days: u32,
    pub min_free_mb: u64,
    pub flush_interval_secs: u32,
    pub max_points_per_message: u32,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            mode: "durable".into(),
            retention_days: 0,
            min_free_mb: 64,
            flush_interval_secs: 600,
            max_points_per_message: 10_000,
        }
    }
}

/// Validated telemetry settings.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Which store holds the points.
    pub store: TelemetryStore,
    pub durable: bool,
    pub retention: Option<Duration>,
    pub min_free_bytes: u64,
    pub flush_interval: Duration,
    pub max_points: usize,
}

/// The time-series backend (`storage.telemetry`).
#[derive(Debug, Clone)]
pub enum TelemetryStore {
    /// `<data_dir>/tsdb`, this node's points.
    Embedded,
    /// The metadata's PostgreSQL server, shared by every node (boxed: a
    /// parsed URL is large and this is the rare case).
    Postgres(Box<m2mhub_pgstore::PgUrl>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub listen: String,
    pub tls_listen: String,
    pub public_url: String,
    pub max_body_bytes: u64,
    pub header_read_timeout_secs: u32,
    pub body_read_timeout_secs: u32,
    pub max_connections_per_ip: u32,
    pub max_requests_per_token: u32,
    pub cors_origins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginSettings {
    pub max_failures_per_user: u32,
    pub max_failures_per_address: u32,
    pub failure_window_secs: u32,
    pub lockout_secs: u32,
    pub max_lockout_secs: u32,
    pub max_concurrent_hashes: u32,
    pub max_queued_hashes: u32,
    pub max_tracked: u32,
}

impl Default for LoginSettings {
    fn default() -> Self {
        LoginSettings {
            max_failures_per_user: 5,
            max_failures_per_address: 20,
            failure_window_secs: 300,
            lockout_secs: 60,
            max_lockout_secs: 3600,
            max_concurrent_hashes: 2,
            max_queued_hashes: 16,
            max_tracked: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtaSettings {
    pub max_artifact_mb: u64,
    pub chunk_bytes: usize,
    pub url_ttl_secs: u64,
}

impl Default for OtaSettings {
    fn default() -> Self {
        OtaSettings {
            max_artifact_mb: 256,
            chunk_bytes: 16_384,
            url_ttl_secs: 3600,
        }
    }
}

/// OTA settings the server runs with.
#[derive(Debug, Clone)]
pub struct OtaConfig {
    /// `None`: derived from the HTTP listener's address once bound.
    pub public_url: Option<String>,
    pub max_artifact_bytes: u64,
    pub chunk_bytes: usize,
    pub url_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub level: String,
    pub format: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("./m2mhub-data"),
            mqtt: MqttSettings::default(),
            telemetry: TelemetrySettings::default(),
            diagnostics: DiagnosticsSettings::default(),
            reports: ReportSettings::default(),
            http: HttpSettings::default(),
            login: LoginSettings::default(),
            security: SecuritySettings::default(),
            ota: OtaSettings::default(),
            gateways: GatewaySettings::default(),
            cluster: ClusterSettings::default(),
            coap: CoapSettings::default(),
            console: ConsoleSettings::default(),
            storage: StorageSettings::default(),
            log: LogSettings::default(),
        }
    }
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            listen: "0.0.0.0:1883".into(),
            tls_listen: "0.0.0.0:8883".into(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_client_ca: String::new(),
            tls_client_crl: String::new(),
            allow_anonymous: false,
            password_file: String::new(),
            max_packet_size: 1_048_576,
            receive_maximum: 128,
            max_queued_messages: 10_000,
            topic_alias_maximum: 64,
            max_keep_alive: 0,
            max_session_expiry_secs: u32::MAX,
            connect_timeout_secs: 10,
            write_timeout_secs: 30,
            sys_interval_secs: 10,
            retain_available: true,
            max_connections: 0,
            refused_subscriptions: Vec::new(),
            max_connections_per_ip: 100,
            max_connect_rate: 0,
            max_connect_rate_per_ip: 20,
            connect_burst_per_ip: 40,
            max_publish_rate: 0,
            max_subscriptions_per_session: 1000,
            auth_failures_before_ban: 10,
            auth_failure_window_secs: 60,
            max_connects_per_client_id: 20,
            flapping_window_secs: 60,
            ban_base_secs: 60,
            ban_max_secs: 86400,
            ban_forget_secs: 86400,
            accept_unregistered_certs: false,
            fsync: false,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "0.0.0.0:8080".into(),
            tls_listen: "0.0.0.0:8443".into(),
            public_url: String::new(),
            max_body_bytes: 1 << 20,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            max_connections_per_ip: 256,
            max_requests_per_token: 32,
            cors_origins: Vec::new(),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// The sections of the file; an environment variable `M2MHUB_MQTT_LISTEN`
/// is the key `listen` of section `mqtt`.
const SECTIONS: [&str; 14] = [
    "mqtt",
    "telemetry",
    "diagnostics",
    "reports",
    "http",
    "login",
    "security",
    "ota",
    "gateways",
    "coap",
    "cluster",
    "console",
    "storage",
    "log",
];

/// Environment variables that are not config keys.
const NOT_KEYS: [&str; 6] = [
    "M2MHUB_CONFIG",
    "M2MHUB_MASTER_KEY",
    "M2MHUB_SERVER",
    "M2MHUB_TOKEN",
    "M2MHUB_CA_FILE",
    "M2MHUB_PROFILE",
];

impl Settings {
    /// Load from an optional file and an environment (a list of variables,
    /// so tests never touch the process environment).
    pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<Settings> {
        let mut table: toml::Table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                text.parse().map_err(|e: toml::de::Error| {
                    anyhow!("config file {}: {}", path.display(), e.message())
                })?
            }
            None => toml::Table::new(),
        };
        let defaults = toml::Table::try_from(Settings::default())?;
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("M2MHUB_") else {
                continue;
            };
            if NOT_KEYS.contains(&name.as_str()) {
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            let (section, key) = match SECTIONS
                .iter()
                .find(|s| lower.starts_with(&format!("{s}_")))
            {
                Some(s) => (Some(*s), lower[s.len() + 1..].to_string()),
                None => (None, lower.clone()),
            };
            let expected = match section {
                Some(s) => defaults
                    .get(s)
                    .and_then(|t| t.as_table())
                    .and_then(|t| t.get(&key)),
                None => defaults.get(&key),
            };
            let dotted = match section {
                Some(s) => format!("{s}.{key}"),
                None => key.clone(),
            };
            let Some(expected) = expected else {
                bail!("environment variable {name} names no config key (`{dotted}`); see `m2mhub config default`");
            };
            let parsed = match expected {
                toml::Value::Integer(_) => value.trim().parse::<i64>().map(toml::Value::Integer).map_err(|_| {
                    anyhow!("environment variable {name}: `{dotted}` must be a whole number, got {value:?}")
                })?,
                toml::Value::Boolean(_) => match value.trim() {
                    "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
                    "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
                    _ => bail!("environment variable {name}: `{dotted}` must be true or false, got {value:?}"),
                },
                // A list: comma-separated, blanks around items ignored.
                toml::Value::Array(_) => toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(|v| toml::Value::String(v.to_string()))
                        .collect(),
                ),
                _ => toml::Value::String(value.clone()),
            };
            match section {
                Some(s) => {
                    let entry = table
                        .entry(s.to_string())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    let Some(t) = entry.as_table_mut() else {
                        bail!("config key `{s}` must be a section");
                    };
                    t.insert(key, parsed);
                }
                None => {
                    table.insert(key, parsed);
                }
            }
        }
        // Round-trip through text so serde's errors carry the key path.
        let text = toml::to_string(&table)?;
        toml::from_str(&text).map_err(|e| {
            anyhow!(
                "invalid configuration: {} (see `m2mhub config default` for every key and its default)",
                e.message().trim()
            )
        })
    }

    /// Check every value and produce what the server runs with.
    pub fn validate(&self) -> Result<Validated> {
        let m = &self.mqtt;
        let addr = |key: &str, v: &str| -> Result<SocketAddr> {
            v.parse().map_err(|_| {
                anyhow!("invalid value for `{key}`: {v:?} is not HOST:PORT (e.g. 0.0.0.0:1883; use port 0 for any free port)")
            })
        };
        let mqtt_listen = addr("mqtt.listen", &m.listen)?;
        let http_listen = addr("http.listen", &self.http.listen)?;
        let https_listen = match self.http.tls_listen.trim() {
            "" => None,
            a => Some(addr("http.tls_listen", a)?),
        };
        let opt_path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        let files = match (opt_path(&m.tls_cert), opt_path(&m.tls_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => bail!("invalid value for `mqtt.tls_key`: tls_cert is set, so tls_key must name the private key file too"),
            (None, Some(_)) => bail!("invalid value for `mqtt.tls_cert`: tls_key is set, so tls_cert must name the certificate file too"),
        };
        let tls = TlsFiles {
            listen: addr("mqtt.tls_listen", &m.tls_listen)?,
            files,
            client_ca: opt_path(&m.tls_client_ca),
            client_crl: opt_path(&m.tls_client_crl),
        };
        if tls.client_crl.is_some() && tls.client_ca.is_none() {
            bail!("invalid value for `mqtt.tls_client_crl`: it lists revoked certificates of tls_client_ca, so set tls_client_ca too");
        }
        if !["trace", "debug", "info", "warn", "error"].contains(&self.log.level.as_str()) {
            bail!(
                "invalid value for `log.level`: {:?}; use trace, debug, info, warn or error",
                self.log.level
            );
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            bail!(
                "invalid value for `log.format`: {:?}; use text or json",
                self.log.format
            );
        }
        let secs = |v: u32| Duration::from_secs(u64::from(v));
        let broker = BrokerConfig {
            allow_anonymous: m.allow_anonymous,
            password_file: opt_path(&m.password_file),
            max_packet_size: m.max_packet_size,
            receive_maximum: m.receive_maximum,
            max_queued_messages: m.max_queued_messages as usize,
            topic_alias_maximum: m.topic_alias_maximum,
            max_keep_alive: m.max_keep_alive,
            max_session_expiry: m.max_session_expiry_secs,
            connect_timeout: secs(m.connect_timeout_secs),
            write_timeout: secs(m.write_timeout_secs),
            sys_interval: secs(m.sys_interval_secs),
            retain_available: m.retain_available,
            max_connections: m.max_connections as usize,
            refused_subscriptions: m.refused_subscriptions.clone(),
            max_connections_per_ip: m.max_connections_per_ip as usize,
            max_connect_rate: m.max_connect_rate,
            max_connect_rate_per_ip: m.max_connect_rate_per_ip,
            connect_burst_per_ip: m.connect_burst_per_ip,
            max_publish_rate: m.max_publish_rate,
            max_subscriptions_per_session: m.max_subscriptions_per_session as usize,
            ban_base_duration: secs(m.ban_base_secs),
            ban_max_duration: secs(m.ban_max_secs),
            ban_forget_after: secs(m.ban_forget_secs),
            auth_failures_before_ban: m.auth_failures_before_ban,
            auth_failure_window: secs(m.auth_failure_window_secs),
            max_connects_per_client_id: m.max_connects_per_client_id,
            flapping_window: secs(m.flapping_window_secs),
        };
        broker.validate().map_err(|e| anyhow!("{e}"))?;
        let t = &self.telemetry;
        let durable = match t.mode.as_str() {
            "durable" => true,
            "fast" => false,
            other => bail!(
                "invalid value for `telemetry.mode`: {other:?}; use durable (acknowledge after the WAL fsync) or fast (acknowledge at once)"
            ),
        };
        if t.flush_interval_secs == 0 {
            bail!("invalid value for `telemetry.flush_interval_secs`: 0; use at least 1 (seconds)");
        }
        if t.max_points_per_message == 0 {
            bail!("invalid value for `telemetry.max_points_per_message`: 0; use at least 1");
        }
        let telemetry = TelemetryConfig {
            store: TelemetryStore::Embedded,
            durable,
            retention: (t.retention_days > 0)
                .then(|| Duration::from_secs(u64::from(t.retention_days) * 86_400)),
            min_free_bytes: t.min_free_mb.saturating_mul(1 << 20),
            flush_interval: secs(t.flush_interval_secs),
            max_points: t.max_points_per_message as usize,
        };
        let o = &self.ota;
        if o.max_artifact_mb == 0 {
            bail!("invalid value for `ota.max_artifact_mb`: 0; use at least 1 (MiB)");
        }
        if !(m2mhub_ingest::ota_topics::MIN_CHUNK..=262_144).contains(&o.chunk_bytes) {
            bail!(
                "invalid value for `ota.chunk_bytes`: {}; use {} to 262144",
                o.chunk_bytes,
                m2mhub_ingest::ota_topics::MIN_CHUNK
            );
        }
        if o.url_ttl_secs < 60 {
            bail!(
                "invalid value for `ota.url_ttl_secs`: {}; use at least 60",
                o.url_ttl_secs
            );
        }
        let public_url = self
            .http
            .public_url
            .trim()
            .trim_end_matches('/')
            .to_string();
        let scheme_ok = public_url.starts_with("http://") || public_url.starts_with("https://");
        if !public_url.is_empty() && !scheme_ok {
            bail!("invalid value for `http.public_url`: {public_url:?}; use http://host[:port] or https://host[:port]");
        }
        let ota = OtaConfig {
            public_url: (!public_url.is_empty()).then_some(public_url),
            max_artifact_bytes: o.max_artifact_mb.saturating_mul(1 << 20),
            chunk_bytes: o.chunk_bytes,
            url_ttl: Duration::from_secs(o.url_ttl_secs),
        };
        let d = &self.diagnostics;
        if d.max_bundle_bytes == 0 {
            bail!("invalid value for `diagnostics.max_bundle_bytes`: 0; use at least 1 (bytes)");
        }
        if d.retention_hours == 0 {
            bail!("invalid value for `diagnostics.retention_hours`: 0; use at least 1 (hours)");
        }
        // The command that carries the URL times out with it, and commands
        // wait at most a week.
        let max_ttl = m2mhub_fleet::command::MAX_TIMEOUT_MS / 1000;
        if d.upload_url_ttl_s == 0 || u64::from(d.upload_url_ttl_s) > max_ttl {
            bail!(
                "invalid value for `diagnostics.upload_url_ttl_s`: {}; use 1 to {max_ttl} (seconds)",
                d.upload_url_ttl_s
            );
        }
        let diagnostics = m2mhub_fleet::DiagnosticsConfig {
            dir: self.data_dir.join("diagnostics"),
            max_bundle_bytes: d.max_bundle_bytes,
            retention: Duration::from_secs(u64::from(d.retention_hours) * 3600),
            upload_ttl: secs(d.upload_url_ttl_s),
        };
        let g = &self.gateways;
        let host_id = g.sparkplug_host_id.trim();
        if host_id.contains(['/', '+', '#']) {
            bail!("invalid value for `gateways.sparkplug_host_id`: {host_id:?}; use a name without / + # (or \"\" for none)");
        }
        if g.rebirth_interval_secs == 0 {
            bail!(
                "invalid value for `gateways.rebirth_interval_secs`: 0; use at least 1 (seconds)"
            );
        }
        let gateways = m2mhub_ingest::gateways::GatewayConfig {
            auto_register: g.auto_register,
            sparkplug_host_id: (!host_id.is_empty()).then(|| host_id.to_string()),
            sparkplug: m2mhub_gateways::sparkplug::HostConfig {
                rebirth_interval_ms: i64::from(g.rebirth_interval_secs) * 1000,
                ..Default::default()
            },
        };
        let c = &self.coap;
        let coap_config = |key: &str, a: &str| -> Result<m2mhub_coap::CoapConfig> {
            let config = m2mhub_coap::CoapConfig {
                bind: addr(key, a)?,
                rate_per_second: c.rate_per_second,
                rate_burst: c.rate_burst,
                max_body: c.max_body_kb.saturating_mul(1024),
                ..Default::default()
            };
            config
                .validate()
                .map_err(|e| anyhow!("invalid `coap` settings: {e}"))?;
            Ok(config)
        };
        let coap = match c.listen.trim() {
            "" => None,
            a => Some(coap_config("coap.listen", a)?),
        };
        let coaps = match c.dtls_listen.trim() {
            "" => None,
            a => {
                if c.dtls_max_sessions == 0 {
                    bail!("invalid value for `coap.dtls_max_sessions`: 0; use at least 1");
                }
                if c.dtls_idle_secs < 10 {
                    bail!(
                        "invalid value for `coap.dtls_idle_secs`: {}; use at least 10 (seconds)",
                        c.dtls_idle_secs
                    );
                }
                Some((
                    coap_config("coap.dtls_listen", a)?,
                    m2mhub_coap::dtls::DtlsLimits {
                        max_sessions: c.dtls_max_sessions,
                        max_handshakes: c.dtls_max_sessions.min(1024),
                        idle_timeout: Duration::from_secs(c.dtls_idle_secs),
                    },
                ))
            }
        };
        let http = self.http.validate()?;
        let login = self.login.validate()?;
        let cl = &self.cluster;
        let cluster = if cl.enabled {
            if cl.nats_url.trim().is_empty() {
                bail!("`cluster.nats_url` is empty; set the NATS server URL, e.g. nats://127.0.0.1:4222 (or --nats-url)");
            }
            let node_id = cl.node_id.trim();
            if !m2mhub_cluster::is_token(node_id, 64) {
                bail!("invalid value for `cluster.node_id`: {node_id:?}; use up to 64 letters, digits, - and _ (or \"\" for one made on first start)");
            }
            let name = cl.name.trim();
            if name.is_empty() || !m2mhub_cluster::is_token(name, 32) {
                bail!("invalid value for `cluster.name`: {name:?}; use 1 to 32 letters, digits, - and _");
            }
            if cl.queue_retention_hours == 0 {
                bail!(
                    "invalid value for `cluster.queue_retention_hours`: 0; use at least 1 (hours)"
                );
            }
            let file = |key: &str, v: &str| -> Result<Option<PathBuf>> {
                let v = v.trim();
                if v.is_empty() {
                    return Ok(None);
                }
                let p = PathBuf::from(v);
                if !p.is_file() {
                    bail!("invalid value for `cluster.{key}`: {v:?} is not a readable file (a PEM file, or \"\" for none)");
                }
                Ok(Some(p))
            };
            let ca = file("nats_ca", &cl.nats_ca)?;
            let cert = file("nats_cert", &cl.nats_cert)?;
            let key = file("nats_key", &cl.nats_key)?;
            let cert_key = match (cert, key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => bail!("`cluster.nats_cert` and `cluster.nats_key` go together: set both (a client certificate and its key) or neither"),
            };
            let tls = (cl.nats_tls || ca.is_some() || cert_key.is_some())
                .then_some(m2mhub_cluster::NatsTls { ca, cert_key });
            if cl.forward_queue == 0 {
                bail!("invalid value for `cluster.forward_queue`: 0; use at least 1 (messages)");
            }
            Some(ClusterJoin {
                forward_queue: cl.forward_queue,
                tls,
                queue_retention: Duration::from_secs(u64::from(cl.queue_retention_hours) * 3600),
                name: name.to_string(),
                nats_url: cl.nats_url.trim().to_string(),
                node_id: (!node_id.is_empty()).then(|| node_id.to_string()),
            })
        } else {
            None
        };
        let console =
            m2mhub_api::ConsoleConfig::new(&self.console.tile_url, &self.console.tile_attribution)
                .map_err(|e| {
                    anyhow!(
                "invalid value for `console.tile_url`: {:?} {e} (e.g. {:?}), or \"\" for none",
                self.console.tile_url,
                m2mhub_api::console::DEFAULT_TILE_URL
            )
                })?;
        let postgres = match self.storage.postgres_url.trim() {
            "" => None,
            // The error never repeats the value: it holds a password.
            url => {
                let ca = self.storage.postgres_ca.trim();
                // `sslmode=require` is accepted once a CA is given.
                let plain = if ca.is_empty() {
                    url.to_string()
                } else {
                    url.replace("sslmode=require", "sslmode=prefer")
                };
                let parsed = m2mhub_pgstore::PgUrl::parse(&plain).map_err(|e| {
                    anyhow!("invalid value for `storage.postgres_url`: {e} (or \"\" for SQLite under data_dir)")
                })?;
                Some(if ca.is_empty() {
                    parsed
                } else {
                    parsed.with_ca(std::path::Path::new(ca)).map_err(|e| {
                        anyhow!("invalid value for `storage.postgres_ca`: {e} (a PEM file of the CA of the server's certificate, or \"\" for plain TCP)")
                    })?
                })
            }
        };
        if self.storage.postgres_url.trim().is_empty()
            && !self.storage.postgres_ca.trim().is_empty()
        {
            bail!("`storage.postgres_ca` is set but `storage.postgres_url` is empty: name the PostgreSQL server too, or clear postgres_ca");
        }
        let telemetry_store = match (self.storage.telemetry.as_str(), &postgres) {
            ("embedded", _) => TelemetryStore::Embedded,
            ("postgres", Some(url)) => TelemetryStore::Postgres(Box::new(url.clone())),
            ("postgres", None) => bail!(
                "`storage.telemetry = \"postgres\"` needs `storage.postgres_url`: name the PostgreSQL server, or use \"embedded\""
            ),
            (other, _) => bail!(
                "invalid value for `storage.telemetry`: {other:?}; use embedded (under data_dir) or postgres (the server of storage.postgres_url)"
            ),
        };
        let telemetry = TelemetryConfig {
            store: telemetry_store,
            ..telemetry
        };
        Ok(Validated {
            security_alarms: self.security.validate()?,
            reports: self.reports.validate()?,
            cluster,
            postgres,
            http,
            login,
            console,
            coap,
            coaps,
            gateways,
            ota,
            telemetry,
            diagnostics,
            data_dir: self.data_dir.clone(),
            mqtt_listen,
            http_listen,
            https_listen,
            tls,
            accept_unregistered_certs: m.accept_unregistered_certs,
            fsync: m.fsync,
            broker,
            log_level: self.log.level.clone(),
            log_json: self.log.format == "json",
        })
    }
}

impl HttpSettings {
    /// The HTTP server's limits; the listeners and public URL are checked
    /// with the other addresses.
    fn validate(&self) -> Result<m2mhub_api::HttpConfig> {
        if self.max_body_bytes < 1024 {
            bail!(
                "invalid value for `http.max_body_bytes`: {}; use at least 1024 (bytes)",
                self.max_body_bytes
            );
        }
        if !(1..=3600).contains(&self.header_read_timeout_secs) {
            bail!(
                "invalid value for `http.header_read_timeout_secs`: {}; use 1 to 3600 (seconds)",
                self.header_read_timeout_secs
            );
        }
        if !(1..=3600).contains(&self.body_read_timeout_secs) {
            bail!(
                "invalid value for `http.body_read_timeout_secs`: {}; use 1 to 3600 (seconds)",
                self.body_read_timeout_secs
            );
        }
        for o in &self.cors_origins {
            if !valid_origin(o) {
                bail!("invalid value in `http.cors_origins`: {o:?}; use scheme://host[:port] with no path (e.g. https://app.example.com), or \"*\" for any origin");
            }
        }
        Ok(m2mhub_api::HttpConfig {
            max_body_bytes: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            header_read_timeout: Duration::from_secs(u64::from(self.header_read_timeout_secs)),
            body_read_timeout: Duration::from_secs(u64::from(self.body_read_timeout_secs)),
            max_connections_per_ip: self.max_connections_per_ip as usize,
            max_requests_per_token: self.max_requests_per_token as usize,
            cors_origins: self.cors_origins.clone(),
        })
    }
}

/// An origin as browsers send it: `scheme://host[:port]`, nothing after.
fn valid_origin(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    let host =
        rest.rsplit_once(':').map_or(
            rest,
            |(h, port)| {
                if port.parse::<u16>().is_ok() {
                    h
                } else {
                    rest
                }
            },
        );
    matches!(scheme, "http" | "https")
        && !host.is_empty()
        && !rest.contains(['/', '?', '#', ' ', '@'])
}

impl LoginSettings {
    fn validate(&self) -> Result<m2mhub_api::LoginConfig> {
        let positive = |key: &str, v: u32, unit: &str| -> Result<()> {
            if v == 0 {
                bail!("invalid value for `login.{key}`: 0; use at least 1 ({unit})");
            }
            Ok(())
        };
        positive("failure_window_secs", self.failure_window_secs, "seconds")?;
        positive("lockout_secs", self.lockout_secs, "seconds")?;
        if self.max_lockout_secs < self.lockout_secs {
            bail!(
                "invalid value for `login.max_lockout_secs`: {}; use at least lockout_secs ({})",
                self.max_lockout_secs,
                self.lockout_secs
            );
        }
        if !(1..=64).contains(&self.max_concurrent_hashes) {
            bail!(
                "invalid value for `login.max_concurrent_hashes`: {}; use 1 to 64 (each check takes 19 MiB of memory)",
                self.max_concurrent_hashes
            );
        }
        if self.max_tracked < 100 {
            bail!(
                "invalid value for `login.max_tracked`: {}; use at least 100",
                self.max_tracked
            );
        }
        let secs = |v: u32| Duration::from_secs(u64::from(v));
        Ok(m2mhub_api::LoginConfig {
            max_failures_per_user: self.max_failures_per_user,
            max_failures_per_address: self.max_failures_per_address,
            window: secs(self.failure_window_secs),
            lockout: secs(self.lockout_secs),
            max_lockout: secs(self.max_lockout_secs),
            max_concurrent_hashes: self.max_concurrent_hashes as usize,
            max_queued_hashes: self.max_queued_hashes as usize,
            max_tracked: self.max_tracked as usize,
        })
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub listen: SocketAddr,
    /// Server certificate and key files; `None`: issued by the built-in CA.
    pub files: Option<(PathBuf, PathBuf)>,
    /// An extra CA for client certificates.
    pub client_ca: Option<PathBuf>,
    /// Revocation lists for `client_ca`'s certificates.
    pub client_crl: Option<PathBuf>,
}

/// Settings the server can run with.
#[derive(Debug, Clone)]
pub struct Validated {
    pub data_dir: PathBuf,
    /// `Some`: this node is one of a cluster.
    pub cluster: Option<ClusterJoin>,
    /// The metadata stores' PostgreSQL server; `None`: SQLite under
    /// `data_dir`.
    pub postgres: Option<m2mhub_pgstore::PgUrl>,
    /// Limits of the HTTP(S) server and its CORS origins.
    pub http: m2mhub_api::HttpConfig,
    /// Login throttling.
    pub login: m2mhub_api::LoginConfig,
    /// The console's tile server (and so its Content-Security-Policy).
    pub console: m2mhub_api::ConsoleConfig,
    /// Which security events raise alarms.
    pub security_alarms: m2mhub_automation::SecurityAlarms,
    pub ota: OtaConfig,
    /// Sparkplug B and ChirpStack.
    pub gateways: m2mhub_ingest::gateways::GatewayConfig,
    /// Plain CoAP, when configured.
    pub coap: Option<m2mhub_coap::CoapConfig>,
    /// CoAPS (DTLS with pre-shared keys), when configured.
    pub coaps: Option<(m2mhub_coap::CoapConfig, m2mhub_coap::dtls::DtlsLimits)>,
    pub telemetry: TelemetryConfig,
    /// Diagnostic bundles: where, how large, how long.
    pub diagnostics: m2mhub_fleet::DiagnosticsConfig,
    /// Scheduled reports: how often due ones are looked for, the mail relay.
    pub reports: ReportConfig,
    pub mqtt_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// `None`: no HTTPS listener.
    pub https_listen: Option<SocketAddr>,
    pub tls: TlsFiles,
    pub accept_unregistered_certs: bool,
    pub fsync: bool,
    pub broker: BrokerConfig,
    pub log_level: String,
    pub log_json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_config_text_matches_defaults() {
        let parsed: Settings = toml::from_str(DEFAULT_CONFIG).expect("default config parses");
        assert_eq!(parsed, Settings::default());
    }

    #[test]
    fn the_tile_url_is_checked_and_may_be_empty() {
        let ok = Settings::load(None, &env(&[("M2MHUB_CONSOLE_TILE_URL", "")]))
            .expect("load")
            .validate()
            .expect("no tiles is valid");
        assert_eq!(ok.console.tile_url(), "");
        let mut s = Settings::default();
        s.console.tile_url = "https://t.example/{z}/{x}/{y}.png; script-src *".into();
        let e = s.validate().expect_err("refused").to_string();
        assert!(e.contains("console.tile_url"), "{e}");
    }

    #[test]
    fn the_postgres_url_comes_from_the_environment_and_its_password_never_shows() {
        let s = Settings::load(
            None,
            &env(&[(
                "M2MHUB_STORAGE_POSTGRES_URL",
                "postgres://hub:pw-s3cret@10.0.0.5:5432/meta",
            )]),
        )
        .expect("load");
        let v = s.validate().expect("valid");
        let url = v.postgres.as_ref().expect("a PostgreSQL store");
        assert_eq!(url.expose(), "postgres://hub:pw-s3cret@10.0.0.5:5432/meta");
        for shown in [format!("{s:?}"), format!("{v:?}"), s.storage.shown_url()] {
            assert!(!shown.contains("pw-s3cret"), "{shown}");
            assert!(shown.contains("hub@10.0.0.5:5432/meta"), "{shown}");
        }
        assert!(Settings::default()
            .validate()
            .expect("valid")
            .postgres
            .is_none());
        let bad = Settings {
            storage: StorageSettings {
                postgres_url: "postgres://hub:pw-s3cret@[::1".into(),
                ..StorageSettings::default()
            },
            ..Settings::default()
        };
        let e = bad.validate().expect_err("invalid").to_string();
        assert!(e.contains("storage.postgres_url"), "{e}");
        assert!(!e.contains("pw-s3cret"), "{e}");
    }

    #[test]
    fn telemetry_in_postgres_needs_the_postgres_url() {
        let v = Settings::default().validate().expect("valid");
        assert!(matches!(v.telemetry.store, TelemetryStore::Embedded));
        let e = Settings::load(None, &env(&[("M2MHUB_STORAGE_TELEMETRY", "postgres")]))
            .expect("load")
            .validate()
            .expect_err("no server named")
            .to_string();
        assert!(e.contains("storage.postgres_url"), "{e}");
        let v = Settings::load(
            None,
            &env(&[
                ("M2MHUB_STORAGE_TELEMETRY", "postgres"),
                (
                    "M2MHUB_STORAGE_POSTGRES_URL",
                    "postgres://hub:pw@10.0.0.5/meta",
                ),
            ]),
        )
        .expect("load")
        .validate()
        .expect("valid");
        assert!(matches!(v.telemetry.store, TelemetryStore::Postgres(_)));
        let e = Settings::load(None, &env(&[("M2MHUB_STORAGE_TELEMETRY", "influx")]))
            .expect("load")
            .validate()
            .expect_err("unknown store")
            .to_string();
        assert!(
            e.contains("storage.telemetry") && e.contains("embedded"),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("m2mhub.toml");
        std::fs::write(
            &file,
            "[mqtt]\nlisten = \"127.0.0.1:1\"\nmax_packet_size = 5000\n",
        )
        .expect("write");
        let s = Settings::load(
            Some(&file),
            &env(&[
                ("M2MHUB_MQTT_LISTEN", "127.0.0.1:2"),
                ("M2MHUB_MQTT_ALLOW_ANONYMOUS", "true"),
                ("M2MHUB_DATA_DIR", "/tmp/x"),
                ("PATH", "/bin"),
            ]),
        )
        .expect("load");
        assert_eq!(s.mqtt.listen, "127.0.0.1:2");
        assert_eq!(s.mqtt.max_packet_size, 5000);
        assert!(s.mqtt.allow_anonymous);
        assert_eq!(s.data_dir, PathBuf::from("/tmp/x"));
        let s = Settings::load(
            None,
            &env(&[(
                "M2MHUB_MQTT_REFUSED_SUBSCRIPTIONS",
                "test/nosubscribe, retired/#",
            )]),
        )
        .expect("load a list");
        assert_eq!(
            s.mqtt.refused_subscriptions,
            ["test/nosubscribe", "retired/#"]
        );
        let v = s.validate().expect("valid");
        assert_eq!(v.broker.refused_subscriptions, s.mqtt.refused_subscriptions);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Settings::load(None, &env(&[("M2MHUB_MQTT_MAX_PACKET_SIZE", "big")]))
            .expect_err("bad number");
        assert!(e.to_string().contains("mqtt.max_packet_size"), "{e}");
        let e = Settings::load(None, &env(&[("M2MHUB_MQTT_NOPE", "1")])).expect_err("unknown");
        assert!(e.to_string().contains("M2MHUB_MQTT_NOPE"), "{e}");
        let mut s = Settings::default();
        s.mqtt.listen = "localhost".into();
        let e = s.validate().expect_err("bad addr");
        assert!(e.to_string().contains("mqtt.listen"), "{e}");
        let mut s = Settings::default();
        s.mqtt.receive_maximum = 0;
        assert!(s
            .validate()
            .expect_err("zero")
            .to_string()
            .contains("receive_maximum"));
        let mut s = Settings::default();
        s.mqtt.refused_subscriptions = vec!["a/#/b".into()];
        assert!(s
            .validate()
            .expect_err("bad filter")
            .to_string()
            .contains("mqtt.refused_subscriptions"));
        let mut s = Settings::default();
        s.mqtt.tls_cert = "c.pem".into();
        assert!(s
            .validate()
            .expect_err("half tls")
            .to_string()
            .contains("mqtt.tls_key"));
    }

    #[test]
    fn diagnostics_settings() {
        let s = Settings::load(
            None,
            &env(&[
                ("M2MHUB_DIAGNOSTICS_MAX_BUNDLE_BYTES", "1000"),
                ("M2MHUB_DIAGNOSTICS_UPLOAD_URL_TTL_S", "2"),
            ]),
        )
        .expect("load");
        let v = s.validate().expect("valid");
        assert_eq!(v.diagnostics.max_bundle_bytes, 1000);
        assert_eq!(v.diagnostics.upload_ttl, Duration::from_secs(2));
        assert_eq!(v.diagnostics.retention, Duration::from_secs(168 * 3600));
        assert_eq!(v.diagnostics.dir, s.data_dir.join("diagnostics"));
        let mut s = Settings::default();
        s.diagnostics.upload_url_ttl_s = 0;
        let e = s.validate().expect_err("zero ttl");
        assert!(
            e.to_string().contains("diagnostics.upload_url_ttl_s"),
            "{e}"
        );
    }

    #[test]
    fn nats_tls_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write");
        let mut s = Settings::default();
        s.cluster.enabled = true;
        let v = s.clone().validate().expect("valid");
        assert_eq!(v.cluster.expect("cluster").tls, None, "plain by default");
        s.cluster.nats_ca = ca.to_string_lossy().into_owned();
        let tls = s
            .clone()
            .validate()
            .expect("valid")
            .cluster
            .expect("cluster")
            .tls;
        assert_eq!(
            tls.and_then(|t| t.ca),
            Some(ca.clone()),
            "a CA turns TLS on"
        );
        s.cluster.nats_cert = ca.to_string_lossy().into_owned();
        let e = s
            .clone()
            .validate()
            .expect_err("cert without key")
            .to_string();
        assert!(e.contains("cluster.nats_key"), "{e}");
        s.cluster.nats_cert = String::new();
        s.cluster.nats_ca = "/nowhere/ca.pem".into();
        let e = s.validate().expect_err("missing file").to_string();
        assert!(e.contains("cluster.nats_ca"), "{e}");
    }

    #[test]
    fn security_alarm_kinds() {
        let v = Settings::default().validate().expect("valid");
        assert_eq!(v.security_alarms.kinds, m2mhub_identity::SecurityKind::ALL);
        let s = Settings::load(
            None,
            &env(&[("M2MHUB_SECURITY_ALARMS", "acl_violation, login_lockout")]),
        )
        .expect("load");
        let v = s.validate().expect("valid");
        assert_eq!(
            v.security_alarms.kinds,
            [
                m2mhub_identity::SecurityKind::AclViolation,
                m2mhub_identity::SecurityKind::LoginLockout
            ]
        );
        let s = Settings::load(None, &env(&[("M2MHUB_SECURITY_ALARMS", "")])).expect("load");
        assert!(s
            .validate()
            .expect("valid")
            .security_alarms
            .kinds
            .is_empty());
        let mut s = Settings::default();
        s.security.alarms = vec!["acl_violations".into()];
        let e = s.validate().expect_err("typo").to_string();
        assert!(
            e.contains("security.alarms") && e.contains("acl_violation,"),
            "{e}"
        );
    }

    #[test]
    fn http_and_login_settings() {
        let s = Settings::load(
            None,
            &env(&[
                (
                    "M2MHUB_HTTP_CORS_ORIGINS",
                    "https://app.example.com, http://localhost:3000",
                ),
                ("M2MHUB_HTTP_MAX_BODY_BYTES", "4096"),
                ("M2MHUB_LOGIN_LOCKOUT_SECS", "2"),
                ("M2MHUB_LOGIN_MAX_LOCKOUT_SECS", "8"),
            ]),
        )
        .expect("load");
        let v = s.validate().expect("valid");
        assert_eq!(
            v.http.cors_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        assert_eq!(v.http.max_body_bytes, 4096);
        assert_eq!(v.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(v.login.lockout, Duration::from_secs(2));
        assert_eq!(v.login.max_lockout, Duration::from_secs(8));
        assert_eq!(v.login.max_failures_per_user, 5);
        for bad in [
            "app.example.com",
            "https://a.example.com/",
            "ftp://x",
            "https://",
        ] {
            let mut s = Settings::default();
            s.http.cors_origins = vec![bad.into()];
            let e = s.validate().expect_err(bad);
            assert!(e.to_string().contains("http.cors_origins"), "{e}");
        }
        let mut s = Settings::default();
        s.http.cors_origins = vec!["*".into(), "https://[::1]:8443".into()];
        s.validate().expect("wildcard and IPv6 origins");
        let mut s = Settings::default();
        s.login.max_lockout_secs = 10;
        let e = s.validate().expect_err("ceiling under the base");
        assert!(e.to_string().contains("login.max_lockout_secs"), "{e}");
        let mut s = Settings::default();
        s.login.max_concurrent_hashes = 0;
        let e = s.validate().expect_err("no hashing");
        assert!(e.to_string().contains("login.max_concurrent_hashes"), "{e}");
        let mut s = Settings::default();
        s.http.header_read_timeout_secs = 0;
        let e = s.validate().expect_err("no timeout");
        assert!(
            e.to_string().contains("http.header_read_timeout_secs"),
            "{e}"
        );
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("m2mhub.toml");
        std::fs::write(&file, "[mqtt]\nlisten_port = 1883\n").expect("write");
        let e = Settings::load(Some(&file), &[]).expect_err("unknown key");
        assert!(e.to_string().contains("listen_port"), "{e}");
    }
}
