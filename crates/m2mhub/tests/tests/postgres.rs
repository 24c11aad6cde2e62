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
