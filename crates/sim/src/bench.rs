//! The load generator: scenarios, the pipelined publisher and subscriber
//! loops, and the report.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mqtt_codec::{Packet, Protocol, PubResponse, Publish, QoS};
use serde::Serialize;
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{ClientConfig, Conn};
use crate::histogram::Histogram;
use crate::memory;

/// Publishes encoded per write (at most).
const BATCH: usize = 64;
/// Stop producing while this much is still unwritten.
const WBUF_HIGH: usize = 256 * 1024;
/// Read chunk size.
const READ_CHUNK: usize = 256 * 1024;
/// Pacing granularity.
const TICK_NS: u64 = 1_000_000;
/// A paced publisher that fell behind catches up at most this much.
const MAX_BACKLOG_NS: f64 = 100_000_000.0;
/// After the publishers stop: how long to wait for acks and stragglers.
const GRACE: Duration = Duration::from_secs(2);
/// Concurrent connection attempts.
const CONNECT_BATCH: usize = 500;
/// Keep alive announced by benchmark clients, and the PINGREQ interval.
const KEEP_ALIVE: u16 = 60;
const PING_EVERY: Duration = Duration::from_secs(30);

/// What traffic pattern to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `publishers` publishers, each on `bench/<i>/data`, one subscriber on
    /// `bench/+/data`.
    FanIn,
    /// One publisher on `bench/0/data`, `subscribers` subscribers on it.
    FanOut,
    /// `publishers` pairs: subscriber `i` on `bench/<i>/data`, publisher `i`
    /// publishing there.
    Pairs,
    /// `connections` idle connections, to measure the broker's memory per
    /// connection.
    Idle,
    /// Connection rate: open `connections` connections with at most
    /// `concurrency` CONNECTs in flight and report connects/s, connect
    /// latency and failures by CONNACK reason; optionally followed by a
    /// reconnect storm (`reconnect_storm`).
    Connect,
    /// Telemetry ingest: `publishers` devices (client ids
    /// `<device_prefix><i>`) publish JSON readings of 10 metrics on
    /// `devices/<id>/telemetry`; no subscribers. With `metrics_url`, the
    /// server's stored-points counter is read at the window's start and end.
    Telemetry,
    /// Rule → command latency: like Telemetry, but every device also
    /// subscribes to `devices/<id>/commands` and alternates cold and hot
    /// readings (`{"temperature": 20.0}` / `90.0`); with a rule that sends
    /// a command when a device turns hot, the latency from the hot
    /// PUBLISH to the command's arrival at that device is measured.
    Command,
    /// Device shadow updates over MQTT: `publishers` registered devices
    /// publish reported state on `devices/<id>/shadow/update` and time each
    /// until its `…/update/accepted` (see [`crate::shadow`]).
    Shadow,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::FanIn => "fan-in",
            Scenario::FanOut => "fan-out",
            Scenario::Pairs => "pairs",
            Scenario::Idle => "idle",
            Scenario::Connect => "connect",
            Scenario::Telemetry => "telemetry",
            Scenario::Command => "command-latency",
            Scenario::Shadow => "shadow",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "fan-in" | "fanin" => Ok(Scenario::FanIn),
            "fan-out" | "fanout" => Ok(Scenario::FanOut),
            "pairs" | "pair" => Ok(Scenario::Pairs),
            "idle" => Ok(Scenario::Idle),
            "connect" | "connect-rate" => Ok(Scenario::Connect),
            "telemetry" => Ok(Scenario::Telemetry),
            "command-latency" | "command" => Ok(Scenario::Command),
            "shadow" => Ok(Scenario::Shadow),
            other => Err(format!(
                "unknown scenario {other:?} (fan-in, fan-out, pairs, idle, connect, telemetry, command-latency, shadow)"
            )),
        }
    }
}

/// Benchmark parameters; see [`Default`] for the defaults.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Broker address, `host:port`.
    pub host: String,
    /// Where subscribers connect (fan-in, fan-out, pairs), when not `host`:
    /// another node of a cluster, to measure what crossing it costs.
    pub sub_host: Option<String>,
    pub scenario: Scenario,
    /// Publishers (FanIn, Pairs); FanOut always uses one.
    pub publishers: usize,
    /// Subscribers (FanOut); FanIn uses one, Pairs one per publisher.
    pub subscribers: usize,
    /// Connections to open for [`Scenario::Idle`] and [`Scenario::Connect`].
    pub connections: usize,
    /// Connection attempts in flight at most (Idle, Connect).
    pub concurrency: usize,
    /// Idle / Connect: spread connections over this many loopback source
    /// addresses (127.0.0.1 …), for more than one address's ~28,000
    /// ephemeral ports; 0 or 1: the kernel's choice.
    pub source_ips: usize,
    /// Connect: after opening all connections, drop them all at once and
    /// reconnect all at once; report the time until all are back.
    pub reconnect_storm: bool,
    /// Idle / Connect: a file with one line per connection, `client_id
    /// username password` (`-` for none); connection `i` uses line `i`.
    /// Overrides `username` / `password`.
    pub credentials: Option<PathBuf>,
    /// Idle / Connect: PEM CA certificate(s) to verify the broker; enables
    /// TLS.
    pub tls_ca: Option<PathBuf>,
    /// Name to verify in the broker's certificate (default `localhost`).
    pub tls_server_name: Option<String>,
    /// Mutual TLS: a directory with `<client_id>.pem` (certificate chain)
    /// and `<client_id>.key` for each connection. Without a credentials
    /// file client ids are then `bench-idle-<i>`.
    pub tls_client_certs: Option<PathBuf>,
    /// QoS of publishes and subscriptions (0..=2).
    pub qos: u8,
    /// Payload bytes, at least 16: bytes 0..8 are the send time in
    /// nanoseconds since the run's start, bytes 8..16 a sequence number.
    pub payload_size: usize,
    /// Measurement window.
    pub duration: Duration,
    /// Traffic before the measurement window that is not counted.
    pub warmup: Duration,
    /// Target total publish rate (messages/s) over all publishers; 0 = as
    /// fast as possible (with QoS>0 limited by an in-flight window).
    pub rate: u64,
    /// Per publisher QoS 1/2 window (capped by the broker's receive maximum).
    pub inflight: usize,
    pub protocol_v5: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PID of the broker process: if set, read /proc/<pid>/status VmRSS
    /// before and after opening connections to report memory per connection.
    pub broker_pid: Option<u32>,
    /// Telemetry: client id (= device id) prefix; device `i` is
    /// `<device_prefix><i>`.
    pub device_prefix: String,
    /// Telemetry: the server's Prometheus endpoint
    /// (`http://127.0.0.1:8080/metrics`), read for stored points.
    pub metrics_url: Option<String>,
    /// Command latency: every `hot_every`-th reading of a device is hot
    /// (2: cold and hot in turn); each hot one follows a cold one, so each
    /// is a new rule firing.
    pub hot_every: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            host: "127.0.0.1:1883".into(),
            sub_host: None,
            scenario: Scenario::FanIn,
            publishers: 10,
            subscribers: 10,
            connections: 1000,
            concurrency: CONNECT_BATCH,
            source_ips: 1,
            reconnect_storm: false,
            credentials: None,
            tls_ca: None,
            tls_server_name: None,
            tls_client_certs: None,
            qos: 0,
            payload_size: 64,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            rate: 0,
            inflight: 64,
            protocol_v5: false,
            username: None,
            password: None,
            broker_pid: None,
            device_prefix: "bench-dev-".into(),
            metrics_url: None,
            hot_every: 2,
        }
    }
}

/// The outcome of one run. Fields of the Connect scenario are `None` (and
/// absent from the JSON) for the others.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    pub scenario: String,
    pub qos: u8,
    pub payload_size: usize,
    pub publishers: usize,
    pub subscribers: usize,
    /// Measurement window (Idle: time taken to open all connections).
    pub duration_secs: f64,
    /// Messages published during the measurement window.
    pub sent: u64,
    /// Deliveries of those messages.
    pub received: u64,
    /// Expected deliveries = sent * subscribers matched.
    pub expected: u64,
    pub lost: u64,
    pub sent_per_sec: f64,
    pub received_per_sec: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_max_us: f64,
    pub connections: usize,
    pub broker_rss_before_kb: Option<u64>,
    pub broker_rss_after_kb: Option<u64>,
    pub bytes_per_connection: Option<f64>,
    /// Connect: attempts in flight at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// `server-auth` or `mutual` when TLS was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// Connect: first attempt → last successful CONNACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_secs: Option<f64>,
    /// Connect: successful connections / `connect_secs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects_per_sec: Option<f64>,
    /// Connect: per connection TCP connect → CONNACK (incl. TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_max_ms: Option<f64>,
    /// Connect: failed attempts (of `connections`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures: Option<u64>,
    /// Connect: failures by CONNACK reason code in MQTT 5 terms (`0x86`,
    /// `0x87`, ...; the codec maps 3.1.1 return codes to these) or category
    /// (`timeout`, `tcp`, `tls`, `closed`, `protocol`, `io`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reasons: Option<BTreeMap<String, u64>>,
    /// Reconnect storm: all dropped at once → last successful CONNACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_failures: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_failure_reasons: Option<BTreeMap<String, u64>>,
    /// Telemetry: points the server stored during the window (from its
    /// `m2mhub_tsdb_points_appended_total`), and per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points_stored: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points_per_sec: Option<f64>,
    /// Command latency: commands received during the window and their
    /// latency from the hot reading's PUBLISH (microseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commands: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_max_us: Option<f64>,
    /// Shadow: updates of the window answered on `…/rejected` (`received`
    /// counts the accepted ones), and the first rejection's body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_rejection: Option<String>,
}

fn reasons_text(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(" ({})", parts.join(", "))
}

fn ms_text(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

impl BenchReport {
    /// A human-readable multi-line summary.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "scenario          {}", self.scenario);
        if self.scenario == Scenario::Connect.name() {
            let failures = self.failures.unwrap_or(0);
            let _ = writeln!(
                s,
                "connections       {} (concurrency {}{})",
                self.connections,
                self.concurrency.unwrap_or(0),
                self.tls
                    .as_deref()
                    .map(|t| format!(", TLS {t}"))
                    .unwrap_or_default()
            );
            let _ = writeln!(
                s,
                "connected         {}, failures {failures}{}",
                (self.connections as u64).saturating_sub(failures),
                self.failure_reasons
                    .as_ref()
                    .map(reasons_text)
                    .unwrap_or_default()
            );
            let _ = writeln!(
                s,
                "connect time      {:.2} s ({:.0} connects/s)",
                self.connect_secs.unwrap_or(0.0),
                self.connects_per_sec.unwrap_or(0.0)
            );
            let _ = writeln!(
                s,
                "connect latency   p50 {}, p99 {}, max {}",
                ms_text(self.connect_p50_ms),
                ms_text(self.connect_p99_ms),
                ms_text(self.connect_max_ms)
            );
            if let Some(secs) = self.reconnect_secs {
                let _ = writeln!(
                    s,
                    "reconnect storm   all back in {secs:.2} s, failures {}{}",
                    self.reconnect_failures.unwrap_or(0),
                    self.reconnect_failure_reasons
                        .as_ref()
                        .map(reasons_text)
                        .unwrap_or_default()
                );
                let _ = writeln!(
                    s,
                    "reconnect latency p50 {}, p99 {}",
                    ms_text(self.reconnect_p50_ms),
                    ms_text(self.reconnect_p99_ms)
                );
            }
        } else if self.scenario == Scenario::Idle.name() {
            let _ = writeln!(s, "connections       {}", self.connections);
            if let Some(t) = &self.tls {
                let _ = writeln!(s, "tls               {t}");
            }
            let _ = writeln!(s, "connect time      {:.2} s", self.duration_secs);
        } else {
            let _ = writeln!(
                s,
                "clients           {} publishers, {} subscribers",
                self.publishers, self.subscribers
            );
            let _ = writeln!(
                s,
                "qos / payload     {} / {} bytes",
                self.qos, self.payload_size
            );
            let _ = writeln!(s, "duration          {:.2} s", self.duration_secs);
            let _ = writeln!(
                s,
                "sent              {} ({:.0} msg/s)",
                self.sent, self.sent_per_sec
            );
            let _ = writeln!(
                s,
                "received          {} ({:.0} msg/s)",
                self.received, self.received_per_sec
            );
            let pct = if self.expected > 0 {
                self.lost as f64 * 100.0 / self.expected as f64
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                "expected / lost   {} / {} ({pct:.3}%)",
                self.expected, self.lost
            );
            let _ = writeln!(
                s,
                "latency           p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                self.latency_p50_us, self.latency_p99_us, self.latency_max_us
            );
        }
        if let Some(n) = self.commands {
            let _ = writeln!(
                s,
                "commands          {n}, latency p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                self.command_p50_us.unwrap_or(0.0),
                self.command_p99_us.unwrap_or(0.0),
                self.command_max_us.unwrap_or(0.0)
            );
        }
        if let Some(r) = self.rejected {
            let _ = writeln!(
                s,
                "rejected          {r}{}",
                self.first_rejection
                    .as_deref()
                    .map(|w| format!(" (first: {w})"))
                    .unwrap_or_default()
            );
        }
        if let Some(p) = self.points_stored {
            let _ = writeln!(
                s,
                "points stored     {p} ({:.0} points/s)",
                self.points_per_sec.unwrap_or(0.0)
            );
        }
        if let (Some(b), Some(a)) = (self.broker_rss_before_kb, self.broker_rss_after_kb) {
            let _ = writeln!(s, "broker rss        {b} kB -> {a} kB");
        }
        if let Some(per) = self.bytes_per_connection {
            let _ = writeln!(s, "memory / conn     {per:.0} bytes");
        }
        s
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "too many open files after {opened} connections: raise the limit (e.g. `ulimit -n 1048576`) before running"
    )]
    TooManyOpenFiles { opened: usize },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("broker refused the connection (CONNACK reason code {reason_code:#04x})")]
    Refused { reason_code: u8 },
    #[error("broker rejected the subscription to {filter:?} (reason code {reason_code:#04x})")]
    SubscribeRejected { filter: String, reason_code: u8 },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{client}: connection lost: {context}")]
    ConnectionLost { client: String, context: String },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The clock shared by all clients of one run; times are nanoseconds since
/// `t0`, which is what publishers put into payloads.
#[derive(Debug, Clone, Copy)]
struct Timing {
    t0: Instant,
    start_ns: u64,
    window_start_ns: u64,
    window_end_ns: u64,
}

impl Timing {
    #[inline]
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn at(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.t0 + Duration::from_nanos(ns))
    }
    #[inline]
    fn in_window(&self, ts: u64) -> bool {
        ts >= self.window_start_ns && ts < self.window_end_ns
    }
}

pub(crate) fn random_suffix() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:06x}", h.finish() & 0xff_ffff)
}

fn qos_of(v: u8) -> Result<QoS, BenchError> {
    QoS::from_u8(v).ok_or_else(|| BenchError::InvalidOptions(format!("qos must be 0..=2, not {v}")))
}

/// Run one benchmark. Needs a multi-threaded Tokio runtime; the process
/// needs enough file descriptors (`ulimit -n`) for all connections.
pub async fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    let qos = qos_of(opts.qos)?;
    match opts.scenario {
        Scenario::Idle => return run_idle(&opts).await,
        Scenario::Connect => return crate::connect::run_connect(&opts).await,
        Scenario::Shadow => return crate::shadow::run_shadow(&opts).await,
        _ => {}
    }
    if opts.credentials.is_some() || opts.tls_ca.is_some() || opts.tls_client_certs.is_some() {
        return Err(BenchError::InvalidOptions(
            "credentials files and TLS are supported by the idle and connect scenarios only".into(),
        ));
    }
    if opts.payload_size < 16 {
        return Err(BenchError::InvalidOptions(
            "payload_size must be at least 16".into(),
        ));
    }
    if opts.duration.is_zero() {
        return Err(BenchError::InvalidOptions("duration must be > 0".into()));
    }
    let (n_pub, n_sub, matched) = match opts.scenario {
        Scenario::FanIn => (opts.publishers, 1, 1u64),
        Scenario::FanOut => (1, opts.subscribers, opts.subscribers as u64),
        Scenario::Pairs => (opts.publishers, opts.publishers, 1),
        Scenario::Telemetry | Scenario::Command => (opts.publishers, 0, 0),
        Scenario::Idle | Scenario::Connect | Scenario::Shadow => {
            unreachable!("handled above")
        }
    };
    let commands = opts.scenario == Scenario::Command;
    let telemetry = opts.scenario == Scenario::Telemetry || commands;
    if n_pub == 0 || (n_sub == 0 && !telemetry) {
        return Err(BenchError::InvalidOptions(
            "need at least one publisher and one subscriber".into(),
        ));
    }
    if n_pub >= 1 << 24 {
        return Err(BenchError::InvalidOptions("too many publishers".into()));
    }
    let protocol = if opts.protocol_v5 {
        Protocol::V5
    } else {
        Protocol::V311
    };
    let suffix = random_suffix();
    let config = |role: &str, i: usize| ClientConfig {
        host: match (&opts.sub_host, role) {
            (Some(h), "sub") => h.clone(),
            _ => opts.host.clone(),
        },
        client_id: if telemetry {
            format!("{}{i}", opts.device_prefix)
        } else {
            format!("bench-{role}-{i}-{suffix}")
        },
        protocol,
        keep_alive: KEEP_ALIVE,
        clean_start: true,
        username: opts.username.clone(),
        password: opts.password.clone(),
        tls: None,
        local_ip: None,
    };

    let rss_before = opts.broker_pid.and_then(memory::rss_kb);

    // Subscribers first, each subscribed before any publisher exists.
    let scenario = opts.scenario;
    let subs = connect_many(n_sub, 0, CONNECT_BATCH, |i| {
        let cfg = config("sub", i);
        async move {
            let mut c = Conn::connect(&cfg).await?;
            let filter = match scenario {
                Scenario::FanIn => "bench/+/data".to_string(),
                Scenario::FanOut => "bench/0/data".to_string(),
                _ => format!("bench/{i}/data"),
            };
            c.subscribe(&filter, qos).await?;
            Ok(c)
        }
    })
    .await?;
    let pubs = connect_many(n_pub, n_sub, CONNECT_BATCH, |i| {
        let cfg = config("pub", i);
        async move {
            let mut c = Conn::connect(&cfg).await?;
            if commands {
                c.subscribe(
                    &format!("devices/{}/commands", cfg.client_id),
                    QoS::AtLeastOnce,
                )
                .await?;
            }
            Ok(c)
        }
    })
    .await?;
    let rss_after = opts.broker_pid.and_then(memory::rss_kb);

    let t0 = Instant::now();
    let start_ns = 20_000_000; // let every task get scheduled first
    let window_start_ns = start_ns + opts.warmup.as_nanos() as u64;
    let timing = Timing {
        t0,
        start_ns,
        window_start_ns,
        window_end_ns: window_start_ns + opts.duration.as_nanos() as u64,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let received_counter = Arc::new(AtomicU64::new(0));
    let mut sub_tasks = Vec::with_capacity(n_sub);
    for conn in subs {
        sub_tasks.push(tokio::spawn(run_subscriber(
            conn,
            timing,
            stop_rx.clone(),
            received_counter.clone(),
        )));
    }
    let per_pub_rate = opts.rate as f64 / n_pub as f64;
    let mut pub_tasks = Vec::with_capacity(n_pub);
    for (i, conn) in pubs.into_iter().enumerate() {
        let publisher = if telemetry {
            let topic = format!("devices/{}{i}/telemetry", opts.device_prefix);
            let kind = if commands {
                Payload::HotCold
            } else {
                Payload::Telemetry
            };
            let mut p = Publisher::with_template(conn, i, qos, &topic, kind, opts.inflight)?;
            p.hot_every = opts.hot_every.max(2);
            p
        } else {
            Publisher::new(conn, i, qos, opts.payload_size, opts.inflight)?
        };
        pub_tasks.push(tokio::spawn(publisher.run(timing, per_pub_rate)));
    }
    // Stored points: the server's counter at the window's edges.
    let points_probe = match (&opts.metrics_url, telemetry) {
        (Some(url), true) => {
            let url = url.clone();
            Some(tokio::spawn(async move {
                tokio::time::sleep_until(timing.at(timing.window_start_ns)).await;
                let a = crate::metrics_probe::points_appended(&url).await?;
                tokio::time::sleep_until(timing.at(timing.window_end_ns)).await;
                let b = crate::metrics_probe::points_appended(&url).await?;
                Ok::<u64, BenchError>(b.saturating_sub(a))
            }))
        }
        _ => None,
    };

    let abort_all = |subs: &[tokio::task::JoinHandle<_>], pubs: &[tokio::task::JoinHandle<_>]| {
        subs.iter()
            .for_each(|h: &tokio::task::JoinHandle<_>| h.abort());
        pubs.iter()
            .for_each(|h: &tokio::task::JoinHandle<_>| h.abort());
    };

    let mut sent = 0u64;
    let mut cmd_hist = Histogram::new();
    let mut pub_results = Vec::with_capacity(n_pub);
    for h in pub_tasks.iter_mut() {
        pub_results.push(h.await);
    }
    for r in pub_results {
        match r {
            Ok(Ok(stats)) => {
                sent += stats.sent_window;
                cmd_hist.merge(&stats.commands);
            }
            Ok(Err(e)) => {
                abort_all(&sub_tasks, &pub_tasks);
                return Err(e);
            }
            Err(e) => {
                abort_all(&sub_tasks, &pub_tasks);
                return Err(BenchError::Protocol(format!("publisher task failed: {e}")));
            }
        }
    }
    let expected = sent * matched;

    // Stragglers: until everything arrived, a subscriber failed, or GRACE.
    let grace_end = Instant::now() + GRACE;
    while received_counter.load(Ordering::Relaxed) < expected
        && Instant::now() < grace_end
        && !sub_tasks.iter().any(|h| h.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop_tx.send(true);

    let mut hist = Histogram::new();
    let mut received = 0u64;
    let mut first_err = None;
    for h in sub_tasks {
        match h.await {
            Ok(Ok(stats)) => {
                received += stats.received_window;
                hist.merge(&stats.hist);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err
                    .get_or_insert(BenchError::Protocol(format!("subscriber task failed: {e}")));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }

    let secs = opts.duration.as_secs_f64();
    let points_stored = match points_probe {
        Some(h) => Some(
            h.await
                .map_err(|e| BenchError::Protocol(format!("metrics probe failed: {e}")))??,
        ),
        None => None,
    };
    let n_cmd = cmd_hist.count();
    Ok(BenchReport {
        commands: commands.then_some(n_cmd),
        command_p50_us: commands.then(|| cmd_hist.percentile(50.0) as f64 / 1000.0),
        command_p99_us: commands.then(|| cmd_hist.percentile(99.0) as f64 / 1000.0),
        command_max_us: commands.then(|| cmd_hist.max() as f64 / 1000.0),
        points_stored,
        points_per_sec: points_stored.map(|p| p as f64 / secs),
        scenario: opts.scenario.name().to_string(),
        qos: opts.qos,
        payload_size: opts.payload_size,
        publishers: n_pub,
        subscribers: n_sub,
        duration_secs: secs,
        sent,
        received,
        expected,
        lost: expected.saturating_sub(received),
        sent_per_sec: sent as f64 / secs,
        received_per_sec: received as f64 / secs,
        latency_p50_us: hist.percentile(50.0) as f64 / 1000.0,
        latency_p99_us: hist.percentile(99.0) as f64 / 1000.0,
        latency_max_us: hist.max() as f64 / 1000.0,
        connections: n_pub + n_sub,
        broker_rss_before_kb: rss_before,
        broker_rss_after_kb: rss_after,
        bytes_per_connection: per_connection(rss_before, rss_after, n_pub + n_sub),
        ..Default::default()
    })
}

pub(crate) fn per_connection(before: Option<u64>, after: Option<u64>, n: usize) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if n > 0 => Some((a as f64 - b as f64) * 1024.0 / n as f64),
        _ => None,
    }
}

/// Establish `n` connections, at most `batch` at a time, keeping their
/// order. `already_open` only serves the error message on EMFILE.
async fn connect_many<F, Fut>(
    n: usize,
    already_open: usize,
    batch: usize,
    make: F,
) -> Result<Vec<Conn>, BenchError>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<Conn, BenchError>> + Send + 'static,
{
    let mut slots: Vec<Option<Conn>> = Vec::with_capacity(n);
    slots.resize_with(n, || None);
    let mut opened = 0usize;
    let mut begin = 0;
    while begin < n {
        let end = (begin + batch.max(1)).min(n);
        let mut set = JoinSet::new();
        for i in begin..end {
            let fut = make(i);
            set.spawn(async move { (i, fut.await) });
        }
        while let Some(joined) = set.join_next().await {
            let (i, res) =
                joined.map_err(|e| BenchError::Protocol(format!("connect task failed: {e}")))?;
            match res {
                Ok(c) => {
                    slots[i] = Some(c);
                    opened += 1;
                }
                Err(BenchError::TooManyOpenFiles { .. }) => {
                    return Err(BenchError::TooManyOpenFiles {
                        opened: already_open + opened,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        begin = end;
    }
    Ok(slots.into_iter().flatten().collect())
}

/// The Idle scenario: memory per idle connection.
async fn run_idle(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let plan = crate::connect::Plan::new(opts, "idle", &random_suffix(), 0)?;
    plan.check_count(opts.connections, opts.credentials.as_deref())?;
    // Load everything (certificates, keys) before the clock starts.
    let configs = plan.configs(opts.connections)?;
    // One baseline connection so that per-listener lazy allocations are
    // already in the "before" figure. With per-connection identities it is
    // connection `connections` (the next credentials line / certificate),
    // and skipped when there is none.
    let baseline_cfg = if plan.per_connection() {
        if plan.has_line(opts.connections) {
            plan.config(opts.connections).ok()
        } else {
            None
        }
    } else {
        Some(plan.config(opts.connections)?)
    };
    if baseline_cfg.is_none() {
        tracing::info!("no identity left for a baseline connection; measuring without one");
    }
    let baseline = match &baseline_cfg {
        Some(cfg) => Some(Conn::connect(cfg).await?),
        None => None,
    };
    if opts.broker_pid.is_some() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rss_before = opts.broker_pid.and_then(memory::rss_kb);
    let started = Instant::now();
    let mut conns = connect_many(opts.connections, 1, opts.concurrency, |i| {
        let cfg = configs[i].clone();
        async move {
            let mut c = Conn::connect(&cfg).await?;
            // Idle connections need no buffers.
            c.rbuf = BytesMut::new();
            c.wbuf = BytesMut::new();
            Ok(c)
        }
    })
    .await?;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = opts.broker_pid.and_then(memory::rss_kb);
    // Hold them for the rest of `duration`, if longer.
    if let Some(rest) = opts.duration.checked_sub(Duration::from_secs(3)) {
        tokio::time::sleep(rest).await;
    }
    // Any connection the broker closed meanwhile is readable with EOF.
    let mut baseline = baseline;
    for c in conns.iter_mut().chain(baseline.as_mut()) {
        // On TLS connections this reads raw bytes (e.g. session tickets);
        // the connections are only closed afterwards.
        let mut probe = [0u8; 64];
        match c.stream.tcp().try_read(&mut probe) {
            Ok(0) => return Err(c.lost("broker closed an idle connection".into())),
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                return Err(c.lost(format!("idle connection failed: {e}")))
            }
            _ => {}
        }
    }
    Ok(BenchReport {
        scenario: Scenario::Idle.name().to_string(),
        qos: opts.qos,
        payload_size: 0,
        publishers: 0,
        subscribers: 0,
        duration_secs: connect_secs,
        sent: 0,
        received: 0,
        expected: 0,
        lost: 0,
        sent_per_sec: 0.0,
        received_per_sec: 0.0,
        latency_p50_us: 0.0,
        latency_p99_us: 0.0,
        latency_max_us: 0.0,
        connections: conns.len(),
        broker_rss_before_kb: rss_before,
        broker_rss_after_kb: rss_after,
        bytes_per_connection: per_connection(rss_before, rss_after, conns.len()),
        tls: plan.tls_mode(),
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------
// Publisher

#[derive(Debug, Default)]
struct PubStats {
    sent_window: u64,
    /// Command latency (ns) of commands received in the window.
    commands: Histogram,
}

/// What a publisher's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// Bytes 0..8: send time (ns), 8..16: sequence number, then padding.
    Stamped,
    /// A JSON reading of 10 metrics whose values change per message
    /// (patched digits; the server stamps arrival time).
    Telemetry,
    /// `{"temperature": 20.0}` and `90.0` in turn (see Scenario::Command).
    HotCold,
}

const HOT_COLD_JSON: &str = r#"{"temperature":20.0}"#;

/// The telemetry JSON; every `#` is a digit patched per message.
const TELEMETRY_JSON: &str = r#"{"temperature":2#.##,"humidity":4#.#,"pressure":101#.#,"vibration":0.0##,"current":1#.##,"voltage":23#.#,"power":3###,"rpm":14##,"flow":#.##,"level":7#.#}"#;

/// Write the digits of a scrambled counter at `digits` (offsets into `buf`):
/// every message carries different, still valid, readings.
fn patch_digits(buf: &mut [u8], digits: &[usize], seq: u64) {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
    for &off in digits {
        if let Some(b) = buf.get_mut(off) {
            *b = b'0' + (x % 10) as u8;
        }
        x /= 10;
        if x == 0 {
            x = seq | 1;
        }
    }
}

/// One publishing connection: a pre-encoded PUBLISH that is copied into the
/// write buffer and patched (packet id, timestamp, sequence) per message.
struct Publisher {
    payload: Payload,
    /// Command latency: when this device last turned hot, and the
    /// latencies seen (recorded by `handle`).
    last_hot_ns: Option<u64>,
    hot_every: u64,
    commands: Histogram,
    timing: Option<Timing>,
    /// Telemetry: offsets (in the template) of the digits to patch.
    digits: Vec<usize>,
    conn: Conn,
    qos: QoS,
    template: Vec<u8>,
    /// Offset of the packet identifier inside `template` (QoS > 0).
    pid_off: usize,
    /// Offset of the payload inside `template`.
    payload_off: usize,
    window: usize,
    inflight: usize,
    in_use: Vec<bool>,
    next_id: u16,
    seq: u64,
}

/// Encode the PUBLISH template and locate the packet id and payload in it.
fn publish_template(
    topic: &str,
    qos: QoS,
    payload_size: usize,
    protocol: Protocol,
) -> Result<(Vec<u8>, usize, usize), BenchError> {
    publish_template_with(topic, qos, Bytes::from(vec![b'x'; payload_size]), protocol)
}

fn publish_template_with(
    topic: &str,
    qos: QoS,
    payload: Bytes,
    protocol: Protocol,
) -> Result<(Vec<u8>, usize, usize), BenchError> {
    let payload_size = payload.len();
    let publish = Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_string(),
        packet_id: (qos != QoS::AtMostOnce).then_some(1),
        properties: Default::default(),
        payload,
    };
    let mut buf = BytesMut::new();
    mqtt_codec::encode(&Packet::Publish(publish), protocol, &mut buf)
        .map_err(|e| BenchError::InvalidOptions(format!("cannot encode PUBLISH: {e}")))?;
    let mut i = 1;
    while buf.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    let pid_off = i + 1 + 2 + topic.len();
    let payload_off = buf.len() - payload_size;
    Ok((buf.to_vec(), pid_off, payload_off))
}

impl Publisher {
    fn new(
        conn: Conn,
        idx: usize,
        qos: QoS,
        payload_size: usize,
        inflight: usize,
    ) -> Result<Self, BenchError> {
        let topic = format!("bench/{idx}/data");
        let (template, pid_off, payload_off) =
            publish_template(&topic, qos, payload_size, conn.protocol)?;
        Self::build(
            conn,
            idx,
            qos,
            template,
            pid_off,
            payload_off,
            Payload::Stamped,
            inflight,
        )
    }

    fn with_template(
        conn: Conn,
        idx: usize,
        qos: QoS,
        topic: &str,
        payload: Payload,
        inflight: usize,
    ) -> Result<Self, BenchError> {
        let body = match payload {
            Payload::HotCold => Bytes::from_static(HOT_COLD_JSON.as_bytes()),
            _ => Bytes::from(TELEMETRY_JSON.replace('#', "0").into_bytes()),
        };
        let (template, pid_off, payload_off) =
            publish_template_with(topic, qos, body, conn.protocol)?;
        Self::build(
            conn,
            idx,
            qos,
            template,
            pid_off,
            payload_off,
            payload,
            inflight,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        mut conn: Conn,
        idx: usize,
        qos: QoS,
        template: Vec<u8>,
        pid_off: usize,
        payload_off: usize,
        payload: Payload,
        inflight: usize,
    ) -> Result<Self, BenchError> {
        let digits = match payload {
            Payload::Stamped => Vec::new(),
            // The temperature's first digit: 2 (cold) or 9 (hot).
            Payload::HotCold => vec![payload_off + HOT_COLD_JSON.find('2').unwrap_or(0)],
            Payload::Telemetry => TELEMETRY_JSON
                .bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'#')
                .map(|(i, _)| payload_off + i)
                .collect(),
        };
        let mut window = inflight.clamp(1, 65_535);
        if let Some(max) = conn.connack.properties.receive_maximum {
            window = window.min(max.max(1) as usize);
        }
        conn.wbuf.reserve(WBUF_HIGH + BATCH * template.len());
        Ok(Publisher {
            last_hot_ns: None,
            hot_every: 2,
            commands: Histogram::new(),
            timing: None,
            payload,
            digits,
            conn,
            qos,
            template,
            pid_off,
            payload_off,
            window,
            inflight: 0,
            in_use: if qos == QoS::AtMostOnce {
                Vec::new()
            } else {
                vec![false; 65_536]
            },
            next_id: 0,
            seq: (idx as u64) << 40,
        })
    }

    fn acquire_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            if self.next_id != 0 && !self.in_use[self.next_id as usize] {
                self.in_use[self.next_id as usize] = true;
                self.inflight += 1;
                return self.next_id;
            }
        }
    }

    fn release_id(&mut self, id: u16) {
        if let Some(slot) = self.in_use.get_mut(id as usize) {
            if *slot {
                *slot = false;
                self.inflight -= 1;
            }
        }
    }

    /// Append one PUBLISH stamped `ts` to the write buffer.
    #[inline]
    fn produce(&mut self, ts: u64) {
        let start = self.conn.wbuf.len();
        self.conn.wbuf.extend_from_slice(&self.template);
        if self.qos != QoS::AtMostOnce {
            let id = self.acquire_id();
            let at = start + self.pid_off;
            self.conn.wbuf[at..at + 2].copy_from_slice(&id.to_be_bytes());
        }
        match self.payload {
            Payload::Stamped => {
                let at = start + self.payload_off;
                self.conn.wbuf[at..at + 8].copy_from_slice(&ts.to_be_bytes());
                self.conn.wbuf[at + 8..at + 16].copy_from_slice(&self.seq.to_be_bytes());
            }
            Payload::Telemetry => {
                patch_digits(&mut self.conn.wbuf[start..], &self.digits, self.seq)
            }
            Payload::HotCold => {
                let hot = self.seq % self.hot_every == self.hot_every - 1;
                if let Some(&off) = self.digits.first() {
                    self.conn.wbuf[start + off] = if hot { b'9' } else { b'2' };
                }
                if hot {
                    self.last_hot_ns = Some(ts);
                }
            }
        }
        self.seq += 1;
    }

    fn handle(&mut self, packet: Packet) -> Result<(), BenchError> {
        match packet {
            Packet::PubAck(r) => self.release_id(r.packet_id),
            Packet::PubRec(r) => {
                if r.reason_code >= 0x80 {
                    self.release_id(r.packet_id);
                } else {
                    self.conn
                        .queue(&Packet::PubRel(PubResponse::new(r.packet_id, 0)))?;
                }
            }
            Packet::PubComp(r) => self.release_id(r.packet_id),
            Packet::Disconnect(d) => {
                return Err(self.conn.lost(format!(
                    "broker sent DISCONNECT (reason {:#04x})",
                    d.reason_code
                )))
            }
            Packet::Publish(p) => {
                // A command after a hot reading: its latency.
                if let (Some(t), Some(hot)) = (self.timing, self.last_hot_ns.take()) {
                    let now = t.now_ns();
                    if t.in_window(hot) {
                        self.commands.record(now.saturating_sub(hot));
                    }
                }
                // Acknowledge anything that arrives.
                if let Some(id) = p.packet_id {
                    let ack = if p.qos == QoS::AtLeastOnce {
                        Packet::PubAck(PubResponse::new(id, 0))
                    } else {
                        Packet::PubRec(PubResponse::new(id, 0))
                    };
                    self.conn.queue(&ack)?;
                }
            }
            Packet::PubRel(r) => self
                .conn
                .queue(&Packet::PubComp(PubResponse::new(r.packet_id, 0)))?,
            _ => {}
        }
        Ok(())
    }

    async fn run(mut self, t: Timing, rate: f64) -> Result<PubStats, BenchError> {
        let mut stats = PubStats::default();
        self.timing = Some(t);
        let paced = rate > 0.0;
        let interval_ns = if paced { 1e9 / rate } else { 0.0 };
        let mut next_due = t.start_ns as f64;
        let drain_end_ns = t.window_end_ns + GRACE.as_nanos() as u64;
        let mut last_write = Instant::now();
        tokio::time::sleep_until(t.at(t.start_ns)).await;
        loop {
            let mut progress = false;
            if self.conn.try_fill(READ_CHUNK)? > 0 {
                progress = true;
                while let Some(p) = self.conn.try_decode()? {
                    self.handle(p)?;
                }
            }
            let now_ns = t.now_ns();
            let producing = now_ns < t.window_end_ns;
            let wake_ns;
            if producing {
                let mut wake = t.window_end_ns;
                if self.conn.wbuf.len() < WBUF_HIGH {
                    let mut n = BATCH;
                    if self.qos != QoS::AtMostOnce {
                        n = n.min(self.window - self.inflight);
                    }
                    if paced {
                        let now_f = now_ns as f64;
                        if next_due < now_f - MAX_BACKLOG_NS {
                            next_due = now_f - MAX_BACKLOG_NS;
                        }
                        let due = if now_f >= next_due {
                            ((now_f - next_due) / interval_ns) as usize + 1
                        } else {
                            0
                        };
                        if due <= n {
                            // Caught up: the next burst at the next tick.
                            let next = (next_due + due as f64 * interval_ns) as u64;
                            wake = wake.min(next.max(now_ns + TICK_NS));
                        }
                        n = n.min(due);
                    }
                    for _ in 0..n {
                        self.produce(now_ns);
                        if paced {
                            next_due += interval_ns;
                        }
                    }
                    if n > 0 {
                        progress = true;
                        if t.in_window(now_ns) {
                            stats.sent_window += n as u64;
                        }
                    }
                }
                wake_ns = wake;
            } else {
                if (self.conn.wbuf.is_empty() && self.inflight == 0) || now_ns >= drain_end_ns {
                    break;
                }
                wake_ns = drain_end_ns;
            }
            if !self.conn.wbuf.is_empty() && self.conn.try_flush()? > 0 {
                progress = true;
                last_write = Instant::now();
            }
            if progress {
                tokio::task::yield_now().await;
                continue;
            }
            if last_write.elapsed() >= PING_EVERY && self.conn.wbuf.is_empty() {
                self.conn.queue(&Packet::PingReq)?;
                continue;
            }
            let interest = if self.conn.wbuf.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let ping_at = tokio::time::Instant::from_std(last_write + PING_EVERY);
            let wake_at = t.at(wake_ns).min(ping_at);
            tokio::select! {
                r = self.conn.stream.ready(interest) => { r?; }
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.disconnect()).await;
        stats.commands = std::mem::take(&mut self.commands);
        Ok(stats)
    }
}

// ---------------------------------------------------------------------------
// Subscriber

#[derive(Debug, Default)]
struct SubStats {
    received_window: u64,
    hist: Histogram,
}

async fn run_subscriber(
    mut conn: Conn,
    t: Timing,
    mut stop: watch::Receiver<bool>,
    counter: Arc<AtomicU64>,
) -> Result<SubStats, BenchError> {
    let mut stats = SubStats::default();
    conn.rbuf.reserve(READ_CHUNK);
    let mut last_write = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        let mut progress = false;
        if conn.try_fill(READ_CHUNK)? > 0 {
            progress = true;
            let now_ns = t.now_ns();
            let mut in_window = 0u64;
            while let Some(p) = conn.try_decode()? {
                match p {
                    Packet::Publish(p) => {
                        if let Some(ts) = p.payload.get(..8) {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(ts);
                            let ts = u64::from_be_bytes(b);
                            if t.in_window(ts) {
                                in_window += 1;
                                stats.hist.record(now_ns.saturating_sub(ts));
                            }
                        }
                        match (p.qos, p.packet_id) {
                            (QoS::AtLeastOnce, Some(id)) => {
                                conn.queue(&Packet::PubAck(PubResponse::new(id, 0)))?
                            }
                            (QoS::ExactlyOnce, Some(id)) => {
                                conn.queue(&Packet::PubRec(PubResponse::new(id, 0)))?
                            }
                            _ => {}
                        }
                    }
                    Packet::PubRel(r) => {
                        conn.queue(&Packet::PubComp(PubResponse::new(r.packet_id, 0)))?
                    }
                    Packet::Disconnect(d) => {
                        return Err(conn.lost(format!(
                            "broker sent DISCONNECT (reason {:#04x})",
                            d.reason_code
                        )))
                    }
                    _ => {}
                }
            }
            if in_window > 0 {
                stats.received_window += in_window;
                counter.fetch_add(in_window, Ordering::Relaxed);
            }
        }
        if !conn.wbuf.is_empty() && conn.try_flush()? > 0 {
            progress = true;
            last_write = Instant::now();
        }
        if progress {
            tokio::task::yield_now().await;
            continue;
        }
        if last_write.elapsed() >= PING_EVERY && conn.wbuf.is_empty() {
            conn.queue(&Packet::PingReq)?;
            continue;
        }
        let interest = if conn.wbuf.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        let ping_at = tokio::time::Instant::from_std(last_write + PING_EVERY);
        tokio::select! {
            r = conn.stream.ready(interest) => { r?; }
            changed = stop.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(ping_at) => {}
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_payloads_stay_valid_json() {
        let digits: Vec<usize> = TELEMETRY_JSON
            .bytes()
            .enumerate()
            .filter(|(_, b)| *b == b'#')
            .map(|(i, _)| i)
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for seq in [0u64, 1, 2, 99, 1 << 40, u64::MAX] {
            let mut buf = TELEMETRY_JSON.replace('#', "0").into_bytes();
            patch_digits(&mut buf, &digits, seq);
            let v: serde_json::Value = serde_json::from_slice(&buf).expect("valid JSON");
            assert_eq!(v.as_object().map(|o| o.len()), Some(10));
            seen.insert(buf);
        }
        assert!(seen.len() > 3, "values change from message to message");
    }

    #[test]
    fn template_offsets_decode() {
        for protocol in [Protocol::V311, Protocol::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                let (tpl, pid_off, payload_off) =
                    publish_template("bench/12345/data", qos, 200, protocol).expect("template");
                let mut buf = BytesMut::from(&tpl[..]);
                if qos != QoS::AtMostOnce {
                    buf[pid_off..pid_off + 2].copy_from_slice(&777u16.to_be_bytes());
                }
                buf[payload_off..payload_off + 8].copy_from_slice(&42u64.to_be_bytes());
                buf[payload_off + 8..payload_off + 16].copy_from_slice(&9u64.to_be_bytes());
                let Ok(Some(Packet::Publish(p))) = mqtt_codec::decode(&mut buf, protocol, 1 << 20)
                else {
                    panic!("template does not decode");
                };
                assert_eq!(p.topic, "bench/12345/data");
                assert_eq!(p.qos, qos);
                assert_eq!(p.packet_id, (qos != QoS::AtMostOnce).then_some(777));
                assert_eq!(p.payload.len(), 200);
                assert_eq!(&p.payload[..8], &42u64.to_be_bytes());
                assert_eq!(&p.payload[8..16], &9u64.to_be_bytes());
            }
        }
    }

    #[test]
    fn scenario_parse_and_table() {
        assert_eq!("fan-in".parse::<Scenario>(), Ok(Scenario::FanIn));
        assert_eq!("FanOut".parse::<Scenario>(), Ok(Scenario::FanOut));
        assert!("x".parse::<Scenario>().is_err());
        let r = BenchReport {
            scenario: "pairs".into(),
            qos: 1,
            payload_size: 64,
            publishers: 2,
            subscribers: 2,
            duration_secs: 1.0,
            sent: 100,
            received: 99,
            expected: 100,
            lost: 1,
            sent_per_sec: 100.0,
            received_per_sec: 99.0,
            latency_p50_us: 10.0,
            latency_p99_us: 20.0,
            latency_max_us: 30.0,
            connections: 4,
            broker_rss_before_kb: Some(1000),
            broker_rss_after_kb: Some(1100),
            bytes_per_connection: Some(25600.0),
            ..Default::default()
        };
        let t = r.to_table();
        assert!(t.contains("lost   100 / 1"), "{t}");
        assert!(t.contains("25600 bytes"));
        let json = serde_json::to_string(&r).expect("json");
        assert!(!json.contains("connect_secs"), "{json}");

        assert_eq!("connect".parse::<Scenario>(), Ok(Scenario::Connect));
        let mut reasons = BTreeMap::new();
        reasons.insert("0x87".to_string(), 3);
        let r = BenchReport {
            scenario: "connect".into(),
            connections: 10,
            concurrency: Some(5),
            connect_secs: Some(0.5),
            connects_per_sec: Some(14.0),
            connect_p50_ms: Some(1.5),
            connect_p99_ms: Some(3.0),
            failures: Some(3),
            failure_reasons: Some(reasons),
            reconnect_secs: Some(0.7),
            reconnect_failures: Some(0),
            ..Default::default()
        };
        let t = r.to_table();
        assert!(
            t.contains("connected         7, failures 3 (0x87: 3)"),
            "{t}"
        );
        assert!(t.contains("all back in 0.70 s"), "{t}");
        let json = serde_json::to_string(&r).expect("json");
        assert!(json.contains("\"failure_reasons\":{\"0x87\":3}"), "{json}");
        assert!(json.contains("\"reconnect_secs\":0.7"), "{json}");
    }
}
