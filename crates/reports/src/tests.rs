//! Reports computed from stored data and checked through their CSV, and
//! delivered to a real SMTP server (STARTTLS with a test CA) and a real
//! HTTP listener, both started here on loopback ports.

use crate::smtp::{SmtpConfig, SmtpSecurity};
use crate::{Reports, ReportsConfig, RunRequest};
use base64::Engine;
use m2mhub_fleet::sqlite::SqliteFleetStore;
use m2mhub_fleet::store::{FleetBatch, FleetStore};
use m2mhub_fleet::{
    Alarm, AlarmStatus, Delivery, DeviceEvent, EnergyMode, Fleet, Frequency, Report, ReportKind,
    ReportWebhook, RunRetention, RunTrigger, Schedule, Severity,
};
use m2mhub_identity::{NewDevice, Registry};
use m2mhub_tsdb::{InPoint, Options, Tsdb, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const H: i64 = 3_600_000;

fn ms(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>()
        .expect("timestamp")
        .as_millisecond()
}

struct World {
    _dir: tempfile::TempDir,
    fleet: Fleet,
    tsdb: Arc<Tsdb>,
    reports: Arc<Reports>,
}

/// Devices m1..m3 in the default tenant, with these alarms and device
/// events already stored.
fn world(alarms: &[Alarm], events: &[DeviceEvent], smtp: Option<SmtpConfig>) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::open(dir.path()).expect("registry");
    for id in ["m1", "m2", "m3"] {
        reg.create_device(NewDevice {
            id: Some(id.into()),
            name: None,
            tenant: "default".into(),
            group: None,
            profile: None,
            labels: BTreeMap::new(),
            enabled: true,
        })
        .expect("device");
    }
    let store = SqliteFleetStore::open(&dir.path().join("registry.db")).expect("store");
    store
        .append(&FleetBatch {
            device_events: events,
            device_events_kept: 1000,
            alarms,
            alarms_kept: 1000,
            commands: &[],
            commands_kept: 1000,
        })
        .expect("append");
    let fleet = Fleet::with_store(Box::new(store), reg).expect("fleet");
    let tsdb = Arc::new(Tsdb::open(&dir.path().join("tsdb"), Options::default()).expect("tsdb"));
    let reports = Reports::new(
        fleet.clone(),
        tsdb.clone(),
        ReportsConfig {
            dir: dir.path().join("reports"),
            smtp,
            public_url: "http://hub.test:8080".into(),
            webhook_timeout: Duration::from_secs(5),
            retry_delays: vec![Duration::from_millis(200), Duration::from_millis(200)],
        },
    );
    World {
        _dir: dir,
        fleet,
        tsdb,
        reports,
    }
}

fn definition(kind: ReportKind, tz: &str) -> Report {
    Report {
        id: String::new(),
        tenant: "default".into(),
        name: "Test report".into(),
        kind,
        devices: vec![],
        schedule: Schedule {
            every: Frequency::Daily,
            at: "06:00".into(),
            weekday: None,
            day: None,
            time_zone: tz.into(),
        },
        delivery: Delivery::default(),
        retention: RunRetention::default(),
        enabled: true,
        next_run_ms: None,
        created_by: "test".into(),
        created_ms: 0,
        updated_ms: 0,
    }
}

fn create(w: &World, mut r: Report) -> Report {
    w.reports
        .prepare(&mut r, ms("2026-03-10T00:00:00Z"))
        .expect("valid");
    w.fleet.create_report(r).expect("create")
}

async fn append(w: &World, device: &str, metric: &str, points: &[(i64, f64)]) {
    let pts: Vec<InPoint<'_>> = points
        .iter()
        .map(|(ts, v)| InPoint {
            metric,
            ts_ms: *ts,
            value: Value::F64(*v),
        })
        .collect();
    let a = w.tsdb.append("default", device, &pts).expect("append");
    assert!(a.rejected.is_empty(), "{:?}", a.rejected);
    a.ticket.wait().await.expect("durable");
}

/// The rows of a CSV without quoted fields (ours have none here).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    text.split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

async fn run_csv(w: &World, r: &Report, from: i64, to: i64) -> Vec<Vec<String>> {
    let run = w
        .reports
        .run(
            &r.id,
            RunTrigger::Manual,
            RunRequest {
                from_ms: Some(from),
                to_ms: Some(to),
            },
        )
        .await
        .expect("run");
    assert!(run.ok, "{run:?}");
    let csv = std::fs::read_to_string(w.reports.file(&run, "csv")).expect("csv file");
    let html = std::fs::read_to_string(w.reports.file(&run, "html")).expect("html file");
    assert!(html.contains("<svg") && html.starts_with("<!DOCTYPE html>"));
    let rows = parse_csv(&csv);
    assert_eq!(run.rows as usize + 1, rows.len());
    rows
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Counter meters over two Berlin days: increases between consecutive
/// readings booked on the later reading's local day, a reset counted from
/// zero, readings outside the period ignored; a summed metric per day.
#[tokio::test]
async fn energy_per_meter_and_local_day() {
    let w = world(&[], &[], None);
    // 2026-03-01 00:00 CET.
    let p0 = ms("2026-02-28T23:00:00Z");
    let mut m1 = vec![(p0 - H, 1.0), (p0 + 48 * H, 999.0)];
    m1.extend((0..48).map(|k| (p0 + k * H, 100.0 + 2.0 * k as f64)));
    append(&w, "m1", "kwh", &m1).await;
    append(
        &w,
        "m2",
        "kwh",
        &[
            (p0, 10.0),
            (p0 + H, 20.0),
            (p0 + 2 * H, 30.0),
            (p0 + 24 * H, 5.0),
            (p0 + 25 * H, 15.0),
        ],
    )
    .await;
    append(
        &w,
        "m3",
        "kwh_interval",
        &[
            (p0, 1.5),
            (p0 + H, 1.5),
            (p0 + 2 * H, 1.5),
            (p0 + 30 * H, 2.25),
            (p0 + 31 * H, 2.25),
        ],
    )
    .await;
    let counter = create(
        &w,
        definition(
            ReportKind::Energy {
                metric: "kwh".into(),
                mode: EnergyMode::Counter,
            },
            "Europe/Berlin",
        ),
    );
    let rows = run_csv(&w, &counter, p0, p0 + 48 * H).await;
    assert_eq!(
        rows,
        vec![
            row(&["device", "date", "energy", "readings"]),
            row(&["m1", "2026-03-01", "46.000", "24"]),
            row(&["m1", "2026-03-02", "48.000", "24"]),
            row(&["m2", "2026-03-01", "20.000", "3"]),
            row(&["m2", "2026-03-02", "15.000", "2"]),
        ]
    );
    let sum = create(
        &w,
        definition(
            ReportKind::Energy {
                metric: "kwh_interval".into(),
                mode: EnergyMode::Sum,
            },
            "Europe/Berlin",
        ),
    );
    let rows = run_csv(&w, &sum, p0, p0 + 48 * H).await;
    assert_eq!(
        rows[1..],
        [
            row(&["m3", "2026-03-01", "4.500", "3"]),
            row(&["m3", "2026-03-02", "4.500", "2"]),
        ]
    );
}

fn connection(id: u64, device: &str, ts_ms: i64, online: bool) -> DeviceEvent {
    DeviceEvent {
        id,
        tenant: "default".into(),
        device_id: device.into(),
        ts_ms,
        kind: "connection".into(),
        detail: if online {
            "connected from 127.0.0.1 as client \"x\"".into()
        } else {
            "disconnected: keep alive timeout".into()
        },
    }
}

/// Time connected from the connection history, with the state at the
/// period's start taken from the last event before it.
#[tokio::test]
async fn availability_from_connection_history() {
    let p0 = ms("2026-03-01T00:00:00Z");
    let events = [
        connection(1, "m1", p0 - H, true),
        connection(2, "m3", p0 - 2 * H, false),
        connection(3, "m1", p0 + 2 * H, false),
        connection(4, "m1", p0 + 5 * H, true),
        connection(5, "m3", p0 + 9 * H, true),
        connection(6, "m3", p0 + 11 * H, false),
    ];
    let w = world(&[], &events, None);
    let r = create(&w, definition(ReportKind::Availability, "UTC"));
    let rows = run_csv(&w, &r, p0, p0 + 10 * H).await;
    assert_eq!(
        rows,
        vec![
            row(&[
                "device",
                "availability_pct",
                "connected_s",
                "connects",
                "disconnects"
            ]),
            row(&["m1", "70.00", "25200", "1", "1"]),
            row(&["m2", "0.00", "0", "0", "0"]),
            row(&["m3", "10.00", "3600", "1", "0"]),
        ]
    );
}

fn alarm(
    id: u64,
    device: &str,
    ty: &str,
    sev: Severity,
    created: i64,
    cleared: Option<i64>,
) -> Alarm {
    Alarm {
        id,
        tenant: "default".into(),
        device_id: device.into(),
        alarm_type: ty.into(),
        severity: sev,
        status: if cleared.is_some() {
            AlarmStatus::Cleared
        } else {
            AlarmStatus::Active
        },
        acked: false,
        acked_by: None,
        acked_ms: None,
        details: serde_json::json!({}),
        rule_id: None,
        created_ms: created,
        updated_ms: created,
        cleared_ms: cleared,
        cleared_by: cleared.map(|_| "rule".into()),
        count: 1,
    }
}

/// Alarms open at some time in the period, grouped by severity and type:
/// raised, cleared, still open, and the longest open up to the period's
/// end; alarms wholly before or after the period are left out.
#[tokio::test]
async fn alarm_summary_by_severity_and_type() {
    let p0 = ms("2026-03-01T00:00:00Z");
    let alarms = [
        alarm(
            1,
            "m1",
            "overheat",
            Severity::Critical,
            p0 - 5 * H,
            Some(p0 + H),
        ),
        alarm(2, "m2", "overheat", Severity::Critical, p0 + 2 * H, None),
        alarm(
            3,
            "m1",
            "battery",
            Severity::Warning,
            p0 + 3 * H,
            Some(p0 + 4 * H),
        ),
        alarm(
            4,
            "m1",
            "battery",
            Severity::Warning,
            p0 - 48 * H,
            Some(p0 - 47 * H),
        ),
        alarm(5, "m3", "battery", Severity::Warning, p0 + 30 * H, None),
    ];
    let w = world(&alarms, &[], None);
    let r = create(&w, definition(ReportKind::Alarms, "UTC"));
    let rows = run_csv(&w, &r, p0, p0 + 24 * H).await;
    assert_eq!(
        rows,
        vec![
            row(&[
                "severity",
                "type",
                "raised",
                "cleared",
                "open_at_end",
                "longest_open_s",
                "longest_open_device"
            ]),
            row(&["critical", "overheat", "1", "1", "1", "79200", "m2"]),
            row(&["warning", "battery", "1", "1", "0", "3600", "m1"]),
        ]
    );
}

/// Only the newest `keep_runs` runs and their files stay.
#[tokio::test]
async fn retention_keeps_the_newest_runs() {
    let w = world(&[], &[], None);
    let mut d = definition(ReportKind::Availability, "UTC");
    d.retention.keep_runs = 2;
    let r = create(&w, d);
    let mut runs = Vec::new();
    for _ in 0..3 {
        let run = w
            .reports
            .run(&r.id, RunTrigger::Manual, RunRequest::default())
            .await
            .expect("run");
        runs.push(run);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let kept: Vec<String> = w
        .fleet
        .list_report_runs(&r.id, 10)
        .expect("runs")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(kept, vec![runs[2].id.clone(), runs[1].id.clone()]);
    assert!(!w.reports.file(&runs[0], "csv").exists());
    assert!(w.reports.file(&runs[1], "csv").exists());
}

/// A node that did not make a run (in a cluster, the files are on the node
/// that did) renders its files again from the stored data for a download.
#[tokio::test]
async fn a_missing_run_file_is_rendered_again() {
    let w = world(&[], &[], None);
    let r = create(
        &w,
        definition(
            ReportKind::Energy {
                metric: "kwh".into(),
                mode: EnergyMode::Counter,
            },
            "UTC",
        ),
    );
    let day = ms("2026-03-09T00:00:00Z");
    append(&w, "m1", "kwh", &[(day + H, 10.0), (day + 5 * H, 14.5)]).await;
    let run = w
        .reports
        .run(
            &r.id,
            RunTrigger::Manual,
            RunRequest {
                from_ms: Some(day),
                to_ms: Some(day + 24 * H),
            },
        )
        .await
        .expect("run");
    let mut made = Vec::new();
    for ext in ["csv", "html"] {
        let path = w.reports.file(&run, ext);
        made.push(std::fs::read(&path).expect("file"));
        std::fs::remove_file(&path).expect("remove");
    }
    for (ext, original) in ["csv", "html"].into_iter().zip(made) {
        let path = w.reports.ensure_file(&run, ext).await.expect("rendered");
        assert_eq!(std::fs::read(&path).expect("file"), original, "{ext}");
    }
    let left: Vec<_> = std::fs::read_dir(w.reports.file(&run, "csv").parent().expect("dir"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 2, "no temporary files left: {left:?}");
}

/// Lines up to CRLF from a stream, keeping what follows.
struct Lines<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Lines<S> {
    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l: Vec<u8> = self.buf.drain(..i + 2).collect();
                return String::from_utf8_lossy(&l[..i]).into_owned();
            }
            let mut b = [0u8; 4096];
            let n = self.io.read(&mut b).await.expect("read");
            assert!(n > 0, "client closed early");
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    async fn say(&mut self, s: &str) {
        self.io.write_all(s.as_bytes()).await.expect("write");
    }
}

/// What the test relay received.
#[derive(Debug, Default)]
struct Received {
    auth: String,
    from: String,
    to: Vec<String>,
    data: String,
}

/// The part of a session after the TLS upgrade.
async fn smtp_secure<S: AsyncRead + AsyncWrite + Unpin>(mut c: Lines<S>) -> Received {
    let mut got = Received::default();
    loop {
        let l = c.line().await;
        let upper = l.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            c.say("250-relay.test\r\n250 AUTH PLAIN\r\n").await;
        } else if let Some(t) = l.strip_prefix("AUTH PLAIN ") {
            got.auth = t.to_string();
            c.say("235 2.7.0 ok\r\n").await;
        } else if let Some(f) = l.strip_prefix("MAIL FROM:") {
            got.from = f.to_string();
            c.say("250 ok\r\n").await;
        } else if let Some(t) = l.strip_prefix("RCPT TO:") {
            got.to.push(t.to_string());
            c.say("250 ok\r\n").await;
        } else if upper == "DATA" {
            c.say("354 go on\r\n").await;
            loop {
                let d = c.line().await;
                if d == "." {
                    break;
                }
                got.data.push_str(d.strip_prefix('.').unwrap_or(&d));
                got.data.push_str("\r\n");
            }
            c.say("250 queued\r\n").await;
        } else if upper == "QUIT" {
            c.say("221 bye\r\n").await;
            return got;
        } else {
            c.say("500 what\r\n").await;
        }
    }
}

/// A test CA and a certificate for `localhost` it signed.
fn test_pki() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("leaf");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    (ca_cert.pem(), config)
}

/// A mail relay on a loopback port that offers STARTTLS and refuses
/// everything but EHLO, STARTTLS and QUIT before it; answers one session.
async fn start_relay(config: rustls::ServerConfig) -> (u16, tokio::task::JoinHandle<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut c = Lines {
            io: tcp,
            buf: Vec::new(),
        };
        c.say("220 relay.test ESMTP\r\n").await;
        loop {
            let l = c.line().await.to_ascii_uppercase();
            if l.starts_with("EHLO") {
                c.say("250-relay.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
                    .await;
            } else if l == "STARTTLS" {
                c.say("220 go ahead\r\n").await;
                break;
            } else {
                c.say("530 5.7.0 must issue STARTTLS first\r\n").await;
            }
        }
        let tls = acceptor.accept(c.io).await.expect("TLS handshake");
        smtp_secure(Lines {
            io: tls,
            buf: Vec::new(),
        })
        .await
    });
    (port, task)
}

/// The value of a MIME part's base64 body that follows `marker`.
fn part_after(data: &str, marker: &str) -> Vec<u8> {
    let start = data.find(marker).expect("part") + marker.len();
    let body = &data[start..];
    let body = &body[body.find("\r\n\r\n").expect("part body") + 4..];
    let end = body.find("--m2mhub-").expect("boundary");
    let b64: String = body[..end].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64")
}

/// A relay at `localhost:port` (or 127.0.0.1 without TLS).
fn relay_config(
    port: u16,
    security: SmtpSecurity,
    ca_pem: Option<String>,
    login: Option<(&str, &str)>,
) -> SmtpConfig {
    SmtpConfig {
        host: if security == SmtpSecurity::None {
            "127.0.0.1"
        } else {
            "localhost"
        }
        .into(),
        port,
        security,
        username: login.map(|l| l.0.to_string()),
        password: login.map(|l| l.1.to_string()),
        from: "hub@example.com".into(),
        extra_roots_pem: ca_pem,
        timeout: Duration::from_secs(10),
    }
}

fn short_mail(id: &str, subject: &str) -> crate::smtp::Mail {
    crate::smtp::Mail {
        to: vec!["ops@example.com".into()],
        subject: subject.into(),
        html: "<p>report</p>".into(),
        attachments: vec![],
        id: id.into(),
    }
}

/// A run is mailed through a relay that requires STARTTLS and a password:
/// the relay's certificate is checked against the configured CA, the
/// password goes only over TLS, and the CSV arrives attached.
#[tokio::test]
async fn mail_over_starttls_with_the_csv_attached() {
    let (ca_pem, server) = test_pki();
    let (port, relay) = start_relay(server).await;
    let smtp = relay_config(
        port,
        SmtpSecurity::StartTls,
        Some(ca_pem),
        Some(("reports", "s3cret-pw")),
    );
    let p0 = ms("2026-03-01T00:00:00Z");
    let w = world(&[], &[connection(1, "m1", p0 - H, true)], Some(smtp));
    let mut d = definition(ReportKind::Availability, "UTC");
    d.delivery.email = vec!["ops@example.com".into(), "boss@example.com".into()];
    let r = create(&w, d);
    let run = w
        .reports
        .run(
            &r.id,
            RunTrigger::Manual,
            RunRequest {
                from_ms: Some(p0),
                to_ms: Some(p0 + 24 * H),
            },
        )
        .await
        .expect("run");
    assert_eq!(run.deliveries.len(), 1);
    assert!(run.deliveries[0].ok, "{:?}", run.deliveries);
    let got = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("relay finished")
        .expect("relay task");
    let auth = base64::engine::general_purpose::STANDARD
        .decode(&got.auth)
        .expect("auth base64");
    assert_eq!(auth, b"\0reports\0s3cret-pw");
    assert_eq!(got.from, "<hub@example.com>");
    assert_eq!(got.to, vec!["<ops@example.com>", "<boss@example.com>"]);
    assert!(
        got.data
            .contains("Subject: Test report: 2026-03-01 to 2026-03-01 (UTC)"),
        "{}",
        got.data
    );
    let csv_name = format!("filename=\"{}-{}.csv\"", r.id, run.id);
    let csv = part_after(&got.data, &csv_name);
    let stored = std::fs::read(w.reports.file(&run, "csv")).expect("stored csv");
    assert_eq!(csv, stored);
    let rows = parse_csv(&String::from_utf8(csv).expect("utf-8"));
    assert_eq!(rows[1], row(&["m1", "100.00", "86400", "0", "0"]));
    let html = part_after(&got.data, "Content-Type: text/html");
    assert!(String::from_utf8_lossy(&html).contains("<svg"));
}

/// Implicit TLS (port 465 style): TLS from the first byte, then the same
/// session; the message reaches the relay.
#[tokio::test]
async fn mail_over_implicit_tls() {
    let (ca_pem, server) = test_pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let relay = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = acceptor.accept(tcp).await.expect("TLS handshake");
        let mut c = Lines {
            io: tls,
            buf: Vec::new(),
        };
        c.say("220 relay.test ESMTP\r\n").await;
        smtp_secure(c).await
    });
    let cfg = relay_config(port, SmtpSecurity::Tls, Some(ca_pem), None);
    crate::smtp::send(&cfg, &short_mail("m1", "Énergie"))
        .await
        .expect("sent");
    let got = relay.await.expect("relay");
    assert_eq!(got.auth, "", "no credentials configured");
    assert!(got.data.contains("Subject: =?utf-8?B?"), "{}", got.data);
}

/// Without TLS the password is never sent: the session stops before AUTH.
#[tokio::test]
async fn no_password_without_tls() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let relay = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut c = Lines {
            io: tcp,
            buf: Vec::new(),
        };
        c.say("220 relay.test ESMTP\r\n").await;
        let mut seen = Vec::new();
        loop {
            let mut b = [0u8; 1024];
            match c.io.read(&mut b).await {
                Ok(0) | Err(_) => return seen,
                Ok(n) => c.buf.extend_from_slice(&b[..n]),
            }
            while let Some(i) = c.buf.windows(2).position(|w| w == b"\r\n") {
                let l: Vec<u8> = c.buf.drain(..i + 2).collect();
                seen.push(String::from_utf8_lossy(&l).into_owned());
                c.say("250-relay.test\r\n250 AUTH PLAIN\r\n").await;
            }
        }
    });
    let cfg = relay_config(
        port,
        SmtpSecurity::None,
        None,
        Some(("u", "never-in-clear")),
    );
    let err = crate::smtp::send(&cfg, &short_mail("m2", "s"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("without TLS"), "{err}");
    assert!(!err.to_string().contains("never-in-clear"));
    let seen = relay.await.expect("relay");
    assert!(seen.iter().all(|l| !l.starts_with("AUTH")), "{seen:?}");
}

/// A run is posted to a webhook: JSON with the download links, signed
/// with the report's secret like the rule actions' webhooks.
#[tokio::test]
async fn webhook_with_links_and_signature() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut c = Lines {
            io: tcp,
            buf: Vec::new(),
        };
        let request = c.line().await;
        let mut headers = BTreeMap::new();
        loop {
            let l = c.line().await;
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers["content-length"].parse().expect("length");
        while c.buf.len() < len {
            let mut b = [0u8; 4096];
            let n = c.io.read(&mut b).await.expect("read");
            assert!(n > 0);
            c.buf.extend_from_slice(&b[..n]);
        }
        c.say("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        (request, headers, c.buf)
    });
    let w = world(&[], &[], None);
    let mut d = definition(ReportKind::Alarms, "UTC");
    d.delivery.webhook = Some(ReportWebhook {
        url: format!("http://127.0.0.1:{port}/hooks/reports"),
        secret: Some("hook-key".into()),
    });
    let r = create(&w, d);
    let run = w
        .reports
        .run(&r.id, RunTrigger::Manual, RunRequest::default())
        .await
        .expect("run");
    assert!(run.deliveries[0].ok, "{:?}", run.deliveries);
    let (request, headers, body) = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server finished")
        .expect("server task");
    assert_eq!(request, "POST /hooks/reports HTTP/1.1");
    assert_eq!(
        headers["x-m2mhub-signature"],
        m2mhub_automation::webhook::sign("hook-key", &body)
    );
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["event"], "report.run");
    assert_eq!(v["run"]["id"], run.id.as_str());
    assert_eq!(
        v["links"]["csv"],
        format!(
            "http://hub.test:8080/api/v1/reports/{}/runs/{}/csv",
            r.id, run.id
        )
    );
}

/// A receiver that is down when the run is made gets it on a retry: the
/// run records the failed first attempt and when the next is due, then the
/// attempt that succeeded. Two retries in all; a receiver down for good
/// leaves the run failed with three attempts and nothing more due.
#[tokio::test]
async fn a_failed_webhook_is_retried() {
    /// Answers each POST with the next status in `answers`, then counts
    /// the requests it saw.
    async fn receiver(listener: TcpListener, answers: Vec<u16>) -> usize {
        let mut seen = 0;
        for status in answers {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut c = Lines {
                io: tcp,
                buf: Vec::new(),
            };
            let _request = c.line().await;
            let mut len = 0usize;
            loop {
                let l = c.line().await;
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().expect("length");
                    }
                }
            }
            while c.buf.len() < len {
                let mut b = [0u8; 4096];
                let n = c.io.read(&mut b).await.expect("read");
                assert!(n > 0);
                c.buf.extend_from_slice(&b[..n]);
            }
            c.say(&format!(
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ))
            .await;
            seen += 1;
        }
        seen
    }
    async fn settled(w: &World, report: &str, attempts: u32) -> m2mhub_fleet::ReportRun {
        for _ in 0..100 {
            let runs = w.fleet.list_report_runs(report, 10).expect("runs");
            if runs[0].deliveries[0].attempts == attempts {
                return runs[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no attempt {attempts} recorded");
    }

    let w = world(&[], &[], None);
    for (answers, ok) in [(vec![503, 204], true), (vec![500, 502, 503], false)] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let n = answers.len();
        let server = tokio::spawn(receiver(listener, answers));
        let mut d = definition(ReportKind::Alarms, "UTC");
        d.delivery.webhook = Some(ReportWebhook {
            url: format!("http://127.0.0.1:{port}/hooks/reports"),
            secret: None,
        });
        let r = create(&w, d);
        let run = w
            .reports
            .run(&r.id, RunTrigger::Manual, RunRequest::default())
            .await
            .expect("run");
        let first = &run.deliveries[0];
        assert!(!first.ok && first.attempts == 1, "{first:?}");
        assert!(first.next_retry_ms.is_some(), "a retry is due: {first:?}");
        let stored = w.fleet.list_report_runs(&r.id, 10).expect("runs");
        assert_eq!(stored[0].deliveries[0].next_retry_ms, first.next_retry_ms);

        let last = settled(&w, &r.id, n as u32).await;
        let d = &last.deliveries[0];
        assert_eq!(d.ok, ok, "{d:?}");
        assert_eq!(d.next_retry_ms, None, "nothing more due: {d:?}");
        assert_eq!(d.error.is_some(), !ok, "{d:?}");
        let seen = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("receiver done")
            .expect("receiver task");
        assert_eq!(seen, n);
    }
}
