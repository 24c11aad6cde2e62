//! Per-connection identities (credentials file, TLS / mutual TLS) and the
//! connection-rate scenario ([`Scenario::Connect`](crate::Scenario::Connect)).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqtt_codec::Protocol;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::task::JoinSet;

use crate::bench::{BenchError, BenchOptions, BenchReport, Scenario};
use crate::client::{ClientConfig, Conn, TlsClient};
use crate::histogram::Histogram;
use crate::memory;

/// Time limit of one connection attempt (TCP + TLS + CONNECT/CONNACK).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One line of a credentials file: `client_id username password`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub client_id: String,
    /// `None` for `-`.
    pub username: Option<String>,
    /// `None` for `-`.
    pub password: Option<String>,
}

/// Parse a credentials file: one connection per line, `client_id username
/// password` separated by whitespace, `-` for no username / no password.
/// Blank lines and lines starting with `#` are skipped. Errors name the
/// 1-based line.
pub fn parse_credentials(text: &str) -> Result<Vec<Credential>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 3 {
            return Err(format!(
                "line {}: expected 3 fields `client_id username password` (`-` for none), found {}",
                n + 1,
                fields.len()
            ));
        }
        if fields[0] == "-" {
            return Err(format!("line {}: the client id must not be `-`", n + 1));
        }
        let opt = |s: &str| (s != "-").then(|| s.to_string());
        out.push(Credential {
            client_id: fields[0].to_string(),
            username: opt(fields[1]),
            password: opt(fields[2]),
        });
    }
    Ok(out)
}

/// Read and parse a credentials file.
pub fn load_credentials(path: &Path) -> Result<Vec<Credential>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        BenchError::InvalidOptions(format!("cannot read credentials {}: {e}", path.display()))
    })?;
    parse_credentials(&text)
        .map_err(|e| BenchError::InvalidOptions(format!("credentials {}: {e}", path.display())))
}

fn invalid(msg: String) -> BenchError {
    BenchError::InvalidOptions(msg)
}

/// Everything needed to build connection `i`'s [`ClientConfig`].
pub(crate) struct Plan {
    host: String,
    protocol: Protocol,
    keep_alive: u16,
    credentials: Option<Vec<Credential>>,
    username: Option<String>,
    password: Option<String>,
    /// Client id of connection `i` without a credentials file.
    default_id: Box<dyn Fn(usize) -> String + Send + Sync>,
    roots: Option<Arc<rustls::RootCertStore>>,
    server_name: Option<ServerName<'static>>,
    /// Shared connector when no client certificates are used.
    shared_tls: Option<TlsClient>,
    client_certs: Option<std::path::PathBuf>,
    /// Loopback source addresses to spread connections over.
    source_ips: usize,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(
    roots: Arc<rustls::RootCertStore>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, BenchError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid(format!("client certificate: {e}")))?,
    };
    Ok(Arc::new(config))
}

impl Plan {
    /// `scenario_tag` names default client ids (`bench-<tag>-<i>-<suffix>`);
    /// with client certificates and no credentials file they are
    /// `bench-idle-<i>`, so that certificate files have stable names.
    pub(crate) fn new(
        opts: &BenchOptions,
        scenario_tag: &str,
        suffix: &str,
        keep_alive: u16,
    ) -> Result<Plan, BenchError> {
        let credentials = opts
            .credentials
            .as_deref()
            .map(load_credentials)
            .transpose()?;
        let default_id: Box<dyn Fn(usize) -> String + Send + Sync> =
            if opts.tls_client_certs.is_some() {
                Box::new(|i| format!("bench-idle-{i}"))
            } else {
                let (tag, suffix) = (scenario_tag.to_string(), suffix.to_string());
                Box::new(move |i| format!("bench-{tag}-{i}-{suffix}"))
            };
        if opts.tls_ca.is_none()
            && (opts.tls_client_certs.is_some() || opts.tls_server_name.is_some())
        {
            return Err(invalid(
                "--tls-client-certs / --tls-server-name need --tls-ca (which enables TLS)".into(),
            ));
        }
        let (mut roots, mut server_name) = (None, None);
        if let Some(ca) = &opts.tls_ca {
            let mut store = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| invalid(format!("cannot read CA {}: {e}", ca.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| invalid(format!("bad CA PEM {}: {e}", ca.display())))?;
                store
                    .add(cert)
                    .map_err(|e| invalid(format!("bad CA certificate {}: {e}", ca.display())))?;
            }
            if store.is_empty() {
                return Err(invalid(format!("no certificate in {}", ca.display())));
            }
            roots = Some(Arc::new(store));
            let name = opts.tls_server_name.as_deref().unwrap_or("localhost");
            server_name = Some(
                ServerName::try_from(name.to_string())
                    .map_err(|e| invalid(format!("TLS server name {name:?}: {e}")))?,
            );
        }
        let shared_tls = match (&roots, &server_name, &opts.tls_client_certs) {
            (Some(r), Some(n), None) => {
                Some(TlsClient::new(tls_config(r.clone(), None)?, n.clone()))
            }
            _ => None,
        };
        Ok(Plan {
            host: opts.host.clone(),
            protocol: if opts.protocol_v5 {
                Protocol::V5
            } else {
                Protocol::V311
            },
            keep_alive,
            credentials,
            username: opts.username.clone(),
            password: opts.password.clone(),
            default_id,
            roots,
            server_name,
            shared_tls,
            client_certs: opts.tls_client_certs.clone(),
            source_ips: opts.source_ips,
        })
    }

    /// Whether connection `i` can be planned without errors from missing
    /// per-connection material (a credentials line).
    pub(crate) fn has_line(&self, i: usize) -> bool {
        self.credentials.as_ref().is_none_or(|c| i < c.len())
    }

    /// Whether connections use anything per connection (file or certs).
    pub(crate) fn per_connection(&self) -> bool {
        self.credentials.is_some() || self.client_certs.is_some()
    }

    /// Fail early when the credentials file is too short for `n`.
    pub(crate) fn check_count(&self, n: usize, path: Option<&Path>) -> Result<(), BenchError> {
        match &self.credentials {
            Some(c) if c.len() < n => Err(invalid(format!(
                "credentials file {} has {} entries, but {n} connections were requested",
                path.map(|p| p.display().to_string()).unwrap_or_default(),
                c.len()
            ))),
            _ => Ok(()),
        }
    }

    pub(crate) fn tls_mode(&self) -> Option<String> {
        match (&self.roots, &self.client_certs) {
            (None, _) => None,
            (Some(_), None) => Some("server-auth".into()),
            (Some(_), Some(_)) => Some("mutual".into()),
        }
    }

    /// The configuration of connection `i` (loads its client certificate).
    pub(crate) fn config(&self, i: usize) -> Result<ClientConfig, BenchError> {
        let (client_id, username, password) = match &self.credentials {
            Some(c) => {
                let cred = c.get(i).ok_or_else(|| {
                    invalid(format!(
                        "credentials file has {} entries, connection {i} has none",
                        c.len()
                    ))
                })?;
                (
                    cred.client_id.clone(),
                    cred.username.clone(),
                    cred.password.clone(),
                )
            }
            None => (
                (self.default_id)(i),
                self.username.clone(),
                self.password.clone(),
            ),
        };
        let tls = match (&self.shared_tls, &self.client_certs, &self.roots) {
            (Some(shared), _, _) => Some(shared.clone()),
            (None, Some(dir), Some(roots)) => {
                let cert = dir.join(format!("{client_id}.pem"));
                let key = dir.join(format!("{client_id}.key"));
                let chain = CertificateDer::pem_file_iter(&cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| invalid(format!("client certificate {}: {e}", cert.display())))?;
                if chain.is_empty() {
                    return Err(invalid(format!("no certificate in {}", cert.display())));
                }
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| invalid(format!("client key {}: {e}", key.display())))?;
                let name = self.server_name.clone().expect("set with roots");
                Some(TlsClient::new(
                    tls_config(roots.clone(), Some((chain, key)))?,
                    name,
                ))
            }
            _ => None,
        };
        Ok(ClientConfig {
            host: self.host.clone(),
            client_id,
            protocol: self.protocol,
            keep_alive: self.keep_alive,
            clean_start: true,
            username,
            password,
            tls,
            local_ip: self.source_ip(i),
        })
    }

    /// Connection `i`'s source address: with `source_ips` n > 1 on a
    /// loopback broker, 127.0.0.1 … 127.0.0.n in turn.
    fn source_ip(&self, i: usize) -> Option<std::net::IpAddr> {
        if self.source_ips <= 1 {
            return None;
        }
        let k = (i % self.source_ips) as u8;
        Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            0,
            0,
            1 + k,
        )))
    }

    /// Configurations of connections `0..n`.
    pub(crate) fn configs(&self, n: usize) -> Result<Vec<ClientConfig>, BenchError> {
        (0..n).map(|i| self.config(i)).collect()
    }
}

/// The failure-map key of an error: the CONNACK reason code in hex, in
/// MQTT 5 terms (`0x86`, `0x87`, ...), for refusals, else a category.
pub fn failure_key(e: &BenchError) -> String {
    match e {
        BenchError::Refused { reason_code } => format!("{reason_code:#04x}"),
        BenchError::Timeout(_) => "timeout".into(),
        BenchError::Connect { .. } => "tcp".into(),
        BenchError::Tls { .. } => "tls".into(),
        BenchError::ConnectionLost { .. } => "closed".into(),
        BenchError::Protocol(_) => "protocol".into(),
        // TLS 1.3: a rejected client certificate surfaces as an alert on
        // the first read or write after the handshake.
        BenchError::Io(e)
            if e.get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
        {
            "tls".into()
        }
        BenchError::Io(_) => "io".into(),
        _ => "other".into(),
    }
}

/// The outcome of opening a set of connections.
struct Phase {
    conns: Vec<Conn>,
    /// Start → last successful CONNACK (or last attempt, if none succeeded).
    secs: f64,
    hist: Histogram,
    failures: u64,
    reasons: BTreeMap<String, u64>,
}

/// Open one connection per config with at most `concurrency` attempts in
/// flight (a sliding window). Failures are counted; running out of file
/// descriptors aborts.
async fn open_all(
    configs: &Arc<Vec<ClientConfig>>,
    concurrency: usize,
) -> Result<Phase, BenchError> {
    let n = configs.len();
    let mut phase = Phase {
        conns: Vec::with_capacity(n),
        secs: 0.0,
        hist: Histogram::new(),
        failures: 0,
        reasons: BTreeMap::new(),
    };
    let started = Instant::now();
    let (mut last_ok, mut last_any) = (None, started);
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut first_error: Option<String> = None;
    loop {
        while next < n && set.len() < concurrency {
            let configs = configs.clone();
            let i = next;
            set.spawn(async move {
                let t = Instant::now();
                let r = Conn::connect_within(&configs[i], CONNECT_TIMEOUT).await;
                let done = Instant::now();
                (r, done.duration_since(t), done)
            });
            next += 1;
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (res, latency, done) =
            joined.map_err(|e| BenchError::Protocol(format!("connect task failed: {e}")))?;
        last_any = last_any.max(done);
        match res {
            Ok(mut c) => {
                c.rbuf = BytesMut::new();
                c.wbuf = BytesMut::new();
                phase.hist.record(latency.as_nanos() as u64);
                last_ok = Some(last_ok.map_or(done, |t: Instant| t.max(done)));
                phase.conns.push(c);
            }
            Err(BenchError::TooManyOpenFiles { .. }) => {
                set.abort_all();
                return Err(BenchError::TooManyOpenFiles {
                    opened: phase.conns.len(),
                });
            }
            Err(e) => {
                phase.failures += 1;
                *phase.reasons.entry(failure_key(&e)).or_insert(0) += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if let Some(e) = first_error {
        tracing::warn!(
            failures = phase.failures,
            "connection attempts failed; first: {e}"
        );
    }
    phase.secs = last_ok
        .unwrap_or(last_any)
        .duration_since(started)
        .as_secs_f64();
    Ok(phase)
}

/// Send DISCONNECT on every connection (concurrently, best effort).
async fn close_all(conns: Vec<Conn>) {
    let mut set = JoinSet::new();
    for mut c in conns {
        set.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.disconnect()).await;
        });
    }
    while set.join_next().await.is_some() {}
}

fn ms(h: &Histogram, p: f64) -> Option<f64> {
    (h.count() > 0).then(|| h.percentile(p) as f64 / 1e6)
}

/// The connection-rate scenario.
pub(crate) async fn run_connect(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let n = opts.connections;
    if n == 0 {
        return Err(invalid("connections must be > 0".into()));
    }
    if opts.concurrency == 0 {
        return Err(invalid("concurrency must be > 0".into()));
    }
    let plan = Plan::new(opts, "connect", &crate::bench::random_suffix(), 0)?;
    plan.check_count(n, opts.credentials.as_deref())?;
    // Load everything (certificates, keys) before the clock starts.
    let configs = Arc::new(plan.configs(n)?);
    let rss_before = opts.broker_pid.and_then(memory::rss_kb);

    let first = open_all(&configs, opts.concurrency.min(n)).await?;
    let mut report = BenchReport {
        scenario: Scenario::Connect.name().to_string(),
        qos: opts.qos,
        duration_secs: first.secs,
        connections: n,
        concurrency: Some(opts.concurrency.min(n)),
        tls: plan.tls_mode(),
        connect_secs: Some(first.secs),
        connects_per_sec: Some(if first.secs > 0.0 {
            first.conns.len() as f64 / first.secs
        } else {
            0.0
        }),
        connect_p50_ms: ms(&first.hist, 50.0),
        connect_p99_ms: ms(&first.hist, 99.0),
        connect_max_ms: (first.hist.count() > 0).then(|| first.hist.max() as f64 / 1e6),
        failures: Some(first.failures),
        failure_reasons: Some(first.reasons),
        ..Default::default()
    };
    let mut conns = first.conns;
    if opts.reconnect_storm {
        // Drop every connection at once (no DISCONNECT, like a network
        // outage), then all of them reconnect at once.
        drop(conns);
        let storm = open_all(&configs, n).await?;
        report.reconnect_secs = Some(storm.secs);
        report.reconnect_p50_ms = ms(&storm.hist, 50.0);
        report.reconnect_p99_ms = ms(&storm.hist, 99.0);
        report.reconnect_failures = Some(storm.failures);
        report.reconnect_failure_reasons = Some(storm.reasons);
        conns = storm.conns;
    }
    let rss_after = opts.broker_pid.and_then(memory::rss_kb);
    report.broker_rss_before_kb = rss_before;
    report.broker_rss_after_kb = rss_after;
    report.bytes_per_connection = crate::bench::per_connection(rss_before, rss_after, conns.len());
    close_all(conns).await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse() {
        let good = "# id user pass\n\
                    dev-1 alice s3cret\n\
                    \n\
                    dev-2\t-   -\n\
                    dev-3 bob -\n";
        let c = parse_credentials(good).expect("good file");
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0],
            Credential {
                client_id: "dev-1".into(),
                username: Some("alice".into()),
                password: Some("s3cret".into()),
            }
        );
        assert_eq!(c[1].username, None);
        assert_eq!(c[1].password, None);
        assert_eq!(c[2].username.as_deref(), Some("bob"));
        assert_eq!(c[2].password, None);

        let short = "dev-1 alice s3cret\ndev-2 bob\n";
        let e = parse_credentials(short).expect_err("two fields");
        assert!(e.contains("line 2") && e.contains("found 2"), "{e}");

        let long = "dev-1 a b c\n";
        let e = parse_credentials(long).expect_err("four fields");
        assert!(e.contains("line 1") && e.contains("found 4"), "{e}");

        let dash = "- a b\n";
        let e = parse_credentials(dash).expect_err("dash id");
        assert!(e.contains("line 1") && e.contains("client id"), "{e}");
    }

    #[test]
    fn credentials_fewer_than_connections() {
        let dir = std::env::temp_dir().join(format!("m2mhub-sim-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("creds.txt");
        std::fs::write(&file, "a - -\nb - -\n").expect("write");
        let opts = BenchOptions {
            scenario: Scenario::Connect,
            connections: 3,
            credentials: Some(file.clone()),
            ..Default::default()
        };
        let plan = Plan::new(&opts, "connect", "x", 0).expect("plan");
        let e = plan.check_count(3, Some(&file)).expect_err("too short");
        assert!(e.to_string().contains("2 entries"), "{e}");
        assert!(plan.check_count(2, Some(&file)).is_ok());
        let cfg = plan.config(1).expect("config");
        assert_eq!(cfg.client_id, "b");
        assert_eq!(cfg.username, None);
        assert!(cfg.tls.is_none());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let e = rt
            .block_on(crate::run(opts))
            .expect_err("too short for the run");
        assert!(matches!(e, BenchError::InvalidOptions(_)), "{e}");
        let missing = BenchOptions {
            credentials: Some(dir.join("nope.txt")),
            ..opts_connect()
        };
        let e = Plan::new(&missing, "connect", "x", 0)
            .err()
            .expect("missing file");
        assert!(e.to_string().contains("cannot read credentials"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn opts_connect() -> BenchOptions {
        BenchOptions {
            scenario: Scenario::Connect,
            ..Default::default()
        }
    }

    #[test]
    fn failure_keys() {
        assert_eq!(
            failure_key(&BenchError::Refused { reason_code: 0x87 }),
            "0x87"
        );
        assert_eq!(failure_key(&BenchError::Timeout("x".into())), "timeout");
    }
}
