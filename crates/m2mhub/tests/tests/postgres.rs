//! The server with its metadata in PostgreSQL (`storage.postgres_url`):
//! what the API and MQTT see is the same as with SQLite, and survives a
//! restart. Ignored unless a server is given (`M2MHUB_TEST_POSTGRES_URL`,
//! see `scripts/postgres.sh`); each test has a database of its own.

use crate::common::{registered_device, secure, Api, TestServer, V3};
use m2mhub_pgstore::testing::TestDatabase;
use serde_json::Value;

/// Connect as `device` with its token secret (fails the test if refused).
async fn device_connects(srv: &TestServer, device: &str, secret: &str) {
    let mut o = V3::options(srv.mqtt(), device);
    o.set_credentials(device, secret);
    V3::connect(o).await.0.disconnect().await;
}

fn audited(log: &Value, action: &str, target: &str) -> bool {
    log["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|r| r["action"] == action && r["target"] == target && r["outcome"] == "ok")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: scripts/postgres.sh"]
async fn devices_tokens_and_the_audit_log_survive_a_restart() {
    let db = TestDatabase::create().unwrap_or_else(|e| panic!("{e}"));
    let url = db.url().expose().to_string();
    let mut srv = TestServer::with(|s| {
        secure(s);
        s.storage.postgres_url = url;
    })
    .await;
    // An operator API token (made in the registry) and a device with a
    // token, made through the API.
    let admin = Api::admin(&srv);
    let secret = registered_device(&admin, "pg-dev-1", None).await;
    device_connects(&srv, "pg-dev-1", &secret).await;
    let log = admin.expect("GET", "/audit?limit=1000", None, 200).await;
    assert!(audited(&log, "device.create", "pg-dev-1"), "{log}");
    assert!(
        !srv.dir.path().join("data/registry/registry.db").exists(),
        "the metadata went to PostgreSQL, not SQLite"
    );

    srv.restart().await;
    // The same API token and device token work on the restarted server.
    let admin = Api {
        addr: srv.http(),
        token: admin.token,
    };
    let d = admin.expect("GET", "/devices/pg-dev-1", None, 200).await;
    assert_eq!(d["id"], "pg-dev-1", "{d}");
    device_connects(&srv, "pg-dev-1", &secret).await;
    let log = admin.expect("GET", "/audit?limit=1000", None, 200).await;
    assert!(audited(&log, "device.create", "pg-dev-1"), "{log}");
    assert!(audited(&log, "credential.token.issue", "pg-dev-1"), "{log}");
    let report = admin.expect("GET", "/audit/verify", None, 200).await;
    assert_eq!(report["ok"], true, "{report}");
    srv.stop().await;
}

/// `storage.telemetry = "postgres"`: a device's readings over MQTT are
/// acknowledged once committed, the API reads them back (raw pages, latest,
/// hourly aggregates), they survive a restart, and a second node on the
/// same database reads them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: scripts/postgres.sh"]
async fn telemetry_in_postgres_is_read_by_every_node_and_survives_a_restart() {
    use crate::common::{http_get_as, V5Packet, V5};
    use serde_json::json;
    let db = TestDatabase::create().unwrap_or_else(|e| panic!("{e}"));
    let url = db.url().expose().to_string();
    let settings = |s: &mut m2mhub::settings::Settings| {
        s.storage.postgres_url = url.clone();
        s.storage.telemetry = "postgres".into();
    };
    let mut srv = TestServer::with(settings).await;
    srv.get()
        .registry
        .create_device(m2mhub_identity::NewDevice {
            id: Some("pg-t1".into()),
            tenant: m2mhub_identity::DEFAULT_TENANT.into(),
            ..Default::default()
        })
        .expect("device");
    // Two whole hours of one-minute readings, ending an hour ago.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let t0 = now - now % 3_600_000 - 3 * 3_600_000;
    let (mut c, _) = V5::connect(V5::options(srv.mqtt(), "pg-t1")).await;
    let batch: Vec<Value> = (0..120)
        .map(|i| json!({"ts": t0 + i * 60_000, "temp": 20.0 + i as f64 / 10.0, "ok": i % 2 == 0}))
        .collect();
    c.client
        .publish(
            "devices/pg-t1/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&batch).expect("json"),
        )
        .await
        .expect("publish");
    c.wait("PUBACK", |p| matches!(p, V5Packet::PubAck(_)).then_some(()))
        .await;
    assert!(
        !srv.dir.path().join("data/tsdb").exists(),
        "the points went to PostgreSQL, not the embedded store"
    );
    let check = |http: std::net::SocketAddr, token: String| async move {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!(
                "/api/v1/devices/pg-t1/telemetry/temp?from={t0}&to={}&limit=50",
                t0 + 86_400_000
            );
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let r = http_get_as(http, &path, &token).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let v = r.json();
            all.extend(v["points"].as_array().expect("points").iter().cloned());
            match v["next"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(all.len(), 120);
        assert_eq!(all[0], json!([t0, 20.0]));
        let r = http_get_as(
            http,
            &format!("/api/v1/telemetry/aggregate?metric=temp&device=pg-t1&from={t0}&to={}&bucket=1h&fn=min,max,count", t0 + 2 * 3_600_000),
            &token,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let b = &v["series"][0]["buckets"];
        assert_eq!(b[0]["count"], json!(60.0), "{v}");
        assert_eq!(b[0]["min"], json!(20.0));
        assert_eq!(b[0]["max"], json!(25.9));
        assert_eq!(b[1]["count"], json!(60.0));
        let r = http_get_as(http, "/api/v1/devices/pg-t1/telemetry", &token).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let latest = r.json();
        let items = latest["items"].as_array().expect("items");
        let temp = items.iter().find(|i| i["metric"] == "temp").expect("temp");
        assert_eq!(temp["value"], json!(31.9), "{latest}");
        let ok = items.iter().find(|i| i["metric"] == "ok").expect("ok");
        assert_eq!(ok["value"], json!(false), "{latest}");
    };
    check(srv.http(), srv.admin_token()).await;
    c.disconnect().await;
    srv.restart().await;
    check(srv.http(), srv.admin_token()).await;
    // Another node on the same database (its own data directory).
    let mut other = TestServer::with(settings).await;
    check(other.http(), other.admin_token()).await;
    other.stop().await;
    srv.stop().await;
}

/// `storage.postgres_ca`: every connection to the server is TLS, verified
/// against that CA (the server's own view says so); a CA that did not sign
/// the server's certificate stops the start with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: scripts/postgres.sh (started with TLS)"]
async fn connections_to_postgres_use_tls_verified_against_the_configured_ca() {
    let Ok(ca) = std::env::var("M2MHUB_TEST_POSTGRES_CA") else {
        panic!("M2MHUB_TEST_POSTGRES_CA is not set: scripts/postgres.sh writes DIR/ca.pem (see .ci/run)");
    };
    let db = TestDatabase::create().unwrap_or_else(|e| panic!("{e}"));
    let url = db.url().expose().to_string();
    let (u, c) = (url.clone(), ca.clone());
    let srv = TestServer::with(move |s| {
        s.storage.postgres_url = format!("{u}?sslmode=require");
        s.storage.postgres_ca = c;
        s.storage.telemetry = "postgres".into();
    })
    .await;
    srv.get()
        .registry
        .create_device(m2mhub_identity::NewDevice {
            id: Some("tls-dev".into()),
            tenant: m2mhub_identity::DEFAULT_TENANT.into(),
            ..Default::default()
        })
        .expect("a device stored over TLS");
    let (tls, plain) = db.tls_sessions().expect("pg_stat_ssl");
    assert!(
        tls >= 2,
        "the stores' sessions use TLS: {tls} TLS, {plain} plain"
    );
    assert_eq!(plain, 0, "no plain session to the database");

    // Another CA: refused at start, saying why.
    let dir = tempfile::tempdir().expect("tempdir");
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).expect("write");
    let mut s = crate::common::test_settings(dir.path());
    s.storage.postgres_url = url.clone();
    s.storage.postgres_ca = other_ca.to_string_lossy().into_owned();
    let v = s.validate().expect("valid settings");
    let e = match m2mhub::server::Server::start(&v).await {
        Ok(_) => panic!("started although the server's certificate is not from that CA"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "the refusal names the certificate: {e}"
    );
    // Without a CA, `sslmode=require` is refused before anything connects.
    let mut s = crate::common::test_settings(dir.path());
    s.storage.postgres_url = format!("{url}?sslmode=require");
    let e = s.validate().expect_err("require without a CA").to_string();
    assert!(e.contains("storage.postgres_ca"), "{e}");
}
