//! DTLS pre-shared keys through `/api/v1/devices/{id}/psks` and
//! `m2mhub device psk …`: the key is shown once (issue, rotate) and is
//! what the registry's handshake lookup gives back once opened with the
//! server's master key; lists, the audit log and the database never hold
//! it in clear; tenants reach only their own devices' PSKs.

use crate::common::*;
use m2mhub_identity::{now_ms, PskCheck, Role};
use serde_json::{json, Value};

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "{s}");
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// What the DTLS server will do: look the identity up, open the key; a
/// refusal by its kind.
fn handshake_key(srv: &TestServer, identity: &str) -> Result<(String, Vec<u8>), &'static str> {
    let s = srv.get();
    match s.registry.psk_lookup(identity, now_ms()) {
        PskCheck::Valid {
            device,
            psk_id,
            sealed_key,
        } => {
            let key = s
                .psk_keys
                .open(&device.id, sealed_key.as_bytes())
                .expect("the sealed key opens");
            Ok((psk_id, key))
        }
        PskCheck::Unknown => Err("unknown"),
        PskCheck::Revoked => Err("revoked"),
        PskCheck::Expired => Err("expired"),
        PskCheck::Disabled => Err("disabled"),
    }
}

async fn add_device(api: &Api, id: &str, tenant: Option<&str>) {
    api.expect(
        "POST",
        "/devices",
        Some(json!({"id": id, "tenant": tenant})),
        201,
    )
    .await;
}

/// Every file of the registry database (WAL included), to look for keys.
fn registry_bytes(srv: &TestServer) -> Vec<u8> {
    let dir = srv.dir.path().join("data").join("registry");
    let mut all = Vec::new();
    for e in std::fs::read_dir(&dir).expect("registry dir") {
        let p = e.expect("entry").path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("registry.db"))
        {
            all.extend(std::fs::read(&p).expect("read"));
        }
    }
    assert!(!all.is_empty(), "no registry.db under {}", dir.display());
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psk_is_shown_once_rotated_revoked_and_audited() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    add_device(&admin, "coap-1", None).await;

    // Issue: 201, the key once, not cacheable.
    let r = admin
        .call(
            "POST",
            "/devices/coap-1/psks",
            Some(json!({"expires_in_days": 30})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let issued = r.json();
    let key_hex = issued["key_hex"].as_str().expect("key_hex").to_string();
    assert_eq!(key_hex.len(), 32, "16 bytes: {issued}");
    assert_eq!(issued["identity"], "coap-1");
    let first_id = issued["id"].as_str().expect("id").to_string();
    assert!(first_id.starts_with("psk-"), "{issued}");
    let expires = issued["expires_ms"].as_i64().expect("expires_ms");
    // The expiry is taken when the request is read, the creation time when
    // the key is stored a few milliseconds later: to the nearest day.
    let days =
        (expires - issued["created_ms"].as_i64().expect("created") + 43_200_000) / 86_400_000;
    assert_eq!(days, 30, "{issued}");

    // The handshake's lookup gives back exactly that key.
    let (psk_id, key) = handshake_key(&srv, "coap-1").expect("valid");
    assert_eq!((psk_id.as_str(), key), (first_id.as_str(), unhex(&key_hex)));

    // Listed without it.
    let list = admin.expect("GET", "/devices/coap-1/psks", None, 200).await;
    assert_eq!(list["items"][0]["id"], first_id.as_str(), "{list}");
    assert_eq!(list["items"][0]["revoked"], false, "{list}");
    assert!(list["items"][0].get("key_hex").is_none(), "{list}");
    assert!(!list.to_string().contains(&key_hex), "{list}");

    // Rotate: a new key under the same identity; the old one is gone at once.
    let r = admin
        .call(
            "POST",
            &format!("/devices/coap-1/psks/{first_id}/rotate"),
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let rotated = r.json();
    let new_id = rotated["id"].as_str().expect("id").to_string();
    let new_hex = rotated["key_hex"].as_str().expect("key_hex").to_string();
    assert_ne!(new_id, first_id);
    assert_ne!(new_hex, key_hex);
    assert_eq!(rotated["identity"], "coap-1");
    assert_eq!(rotated["replaces"], first_id.as_str());
    assert_eq!(rotated["expires_ms"], expires, "the expiry is kept");
    let (psk_id, key) = handshake_key(&srv, "coap-1").expect("valid");
    assert_eq!((psk_id.as_str(), key), (new_id.as_str(), unhex(&new_hex)));
    assert!(!srv.get().registry.psk_still_valid(&first_id, now_ms()));
    assert!(srv.get().registry.psk_still_valid(&new_id, now_ms()));
    let list = admin.expect("GET", "/devices/coap-1/psks", None, 200).await;
    assert_eq!(list["items"][0]["revoked"], true, "{list}");
    assert_eq!(list["items"][0]["replaced_by"], new_id.as_str(), "{list}");
    assert!(!list.to_string().contains(&new_hex), "{list}");

    // Neither key is in the database in clear (raw or hex).
    let db = registry_bytes(&srv);
    for k in [&key_hex, &new_hex] {
        assert!(!contains(&db, k.as_bytes()), "hex key in registry.db");
        assert!(!contains(&db, &unhex(k)), "raw key in registry.db");
    }

    // Revoke: 204, the identity answers Revoked.
    admin
        .expect(
            "DELETE",
            &format!("/devices/coap-1/psks/{new_id}"),
            None,
            204,
        )
        .await;
    assert_eq!(handshake_key(&srv, "coap-1"), Err("revoked"));
    assert!(!srv.get().registry.psk_still_valid(&new_id, now_ms()));

    // Audited, without the keys.
    let log = admin.expect("GET", "/audit?limit=1000", None, 200).await;
    let items = log["items"].as_array().expect("items");
    for (action, id) in [
        ("credential.psk.issue", &first_id),
        ("credential.psk.rotate", &new_id),
        ("credential.psk.revoke", &new_id),
    ] {
        assert!(
            items.iter().any(|r| r["action"] == action
                && r["target"] == "coap-1"
                && r["actor"] == "admin"
                && r["detail"]["psk_id"] == id.as_str()),
            "{action} missing: {log}"
        );
    }
    let text = log.to_string();
    assert!(
        !text.contains(&key_hex) && !text.contains(&new_hex),
        "{log}"
    );

    // A custom identity; deleting the device deletes its PSKs.
    let custom = admin
        .expect(
            "POST",
            "/devices/coap-1/psks",
            Some(json!({"identity": "plant-7/coap-1"})),
            201,
        )
        .await;
    assert_eq!(custom["identity"], "plant-7/coap-1");
    assert_eq!(custom["expires_ms"], Value::Null);
    assert!(handshake_key(&srv, "plant-7/coap-1").is_ok());
    admin.expect("DELETE", "/devices/coap-1", None, 204).await;
    assert_eq!(handshake_key(&srv, "plant-7/coap-1"), Err("unknown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_psk_requests_are_problem_documents() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    add_device(&admin, "p1", None).await;
    add_device(&admin, "p2", None).await;
    let path = "/devices/p1/psks";
    for (body, status, needle) in [
        (json!({"identity": "has space"}), 422, "PSK identity"),
        (json!({"identity": ""}), 422, "PSK identity"),
        (json!({"identity": "x".repeat(129)}), 422, "PSK identity"),
        (json!({"expires_in_days": 0}), 422, "expires_in_days"),
        (json!({"expires_in_days": 40_000}), 422, "expires_in_days"),
        (json!({"expires_in_days": -1}), 400, "expected u32"),
        (json!({"key": "00"}), 400, "unknown field"),
        // Another device's id is that device's default identity.
        (json!({"identity": "p2"}), 409, "already in use"),
    ] {
        let r = admin.call("POST", path, Some(body.clone())).await;
        assert_problem(&r, status, needle);
    }
    let r = http_request(
        srv.http(),
        "POST",
        "/api/v1/devices/p1/psks",
        Some(&admin.token),
        None,
    )
    .await;
    assert_eq!(
        r.status, 201,
        "an empty body takes the defaults: {}",
        r.body
    );
    let first = r.json()["id"].as_str().expect("id").to_string();
    // The same identity again: revoke first.
    assert_problem(
        &admin.call("POST", path, Some(json!({}))).await,
        409,
        "already in use",
    );
    assert_problem(
        &admin
            .call("POST", "/devices/nobody/psks", Some(json!({})))
            .await,
        404,
        "nobody",
    );
    assert_problem(
        &admin
            .call("POST", "/devices/p1/psks/psk-000000000000/rotate", None)
            .await,
        404,
        "psk-000000000000",
    );
    // Another device's PSK id is not found under this device.
    assert_problem(
        &admin
            .call("DELETE", &format!("/devices/p2/psks/{first}"), None)
            .await,
        404,
        &first,
    );
    admin
        .expect("DELETE", &format!("{path}/{first}"), None, 204)
        .await;
    admin
        .expect("DELETE", &format!("{path}/{first}"), None, 204)
        .await;
    assert_problem(
        &admin
            .call("POST", &format!("{path}/{first}/rotate"), None)
            .await,
        409,
        "revoked",
    );
    // A viewer reads but does not issue.
    let viewer = Api::user(
        &srv,
        "psk-viewer",
        Role::Viewer,
        m2mhub_identity::DEFAULT_TENANT,
    );
    viewer.expect("GET", path, None, 200).await;
    let r = viewer.call("POST", path, Some(json!({}))).await;
    assert_eq!(r.status, 403, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reaches_only_its_own_devices_psks() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    for t in ["acme", "globex"] {
        admin
            .expect("POST", "/tenants", Some(json!({"id": t})), 201)
            .await;
        add_device(&admin, &format!("{t}-dev"), Some(t)).await;
    }
    let theirs = admin
        .expect("POST", "/devices/globex-dev/psks", Some(json!({})), 201)
        .await;
    let their_id = theirs["id"].as_str().expect("id").to_string();
    let acme = Api::user(&srv, "acme-op", Role::Operator, "acme");
    let mine = acme
        .expect("POST", "/devices/acme-dev/psks", Some(json!({})), 201)
        .await;
    assert_eq!(mine["identity"], "acme-dev");
    acme.expect("GET", "/devices/acme-dev/psks", None, 200)
        .await;

    for (method, path) in [
        ("GET", "/devices/globex-dev/psks".to_string()),
        ("POST", "/devices/globex-dev/psks".to_string()),
        (
            "POST",
            format!("/devices/globex-dev/psks/{their_id}/rotate"),
        ),
        ("DELETE", format!("/devices/globex-dev/psks/{their_id}")),
    ] {
        let r = acme.call(method, &path, Some(json!({}))).await;
        assert_problem(&r, 404, "globex-dev");
        assert!(!r.body.contains(&their_id), "{method} {path}: {}", r.body);
    }
    // Nothing of globex's changed.
    let list = admin
        .expect("GET", "/devices/globex-dev/psks", None, 200)
        .await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["items"][0]["revoked"], false, "{list}");
    assert!(handshake_key(&srv, "globex-dev").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psks_survive_a_restart() {
    let mut srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    add_device(&admin, "keep-1", None).await;
    let issued = admin
        .expect(
            "POST",
            "/devices/keep-1/psks",
            Some(json!({"identity": "keep-id"})),
            201,
        )
        .await;
    let key = unhex(issued["key_hex"].as_str().expect("key"));
    srv.restart().await;
    let (psk_id, opened) = handshake_key(&srv, "keep-id").expect("valid after restart");
    assert_eq!(
        (psk_id.as_str(), opened),
        (issued["id"].as_str().expect("id"), key)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_psk_cli_issues_lists_rotates_and_revokes() {
    let srv = TestServer::with(secure).await;
    let admin = Api::admin(&srv);
    add_device(&admin, "cli-coap", None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = dir.path().join("cli.toml").display().to_string();
    let server = format!("http://{}", srv.http());
    let token = srv.admin_token();
    let env: Vec<(String, String)> = [
        ("M2MHUB_PROFILE", profile),
        ("M2MHUB_SERVER", server),
        ("M2MHUB_TOKEN", token),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let run = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env = env.clone();
        async move {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            run_bin(&a, &e).await
        }
    };

    // Human output: the key once, with what to do with it.
    let (code, out, err) = run(&[
        "device",
        "psk",
        "issue",
        "cli-coap",
        "--identity",
        "cli-id",
        "--expires-in-days",
        "7",
    ])
    .await;
    assert_eq!(code, 0, "{err}{out}");
    assert!(out.contains("identity:  cli-id"), "{out}");
    assert!(out.contains("shown once"), "{out}");
    let key_hex = out
        .lines()
        .find_map(|l| l.strip_prefix("key (hex): "))
        .expect("key line")
        .to_string();
    let (psk_id, key) = handshake_key(&srv, "cli-id").expect("valid");
    assert_eq!(key, unhex(&key_hex));

    // The list shows it, never the key.
    let (code, out, err) = run(&["device", "psk", "list", "cli-coap"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&psk_id) && out.contains("cli-id"), "{out}");
    assert!(!out.contains(&key_hex), "{out}");

    // Rotate, as JSON.
    let (code, out, err) = run(&[
        "device",
        "psk",
        "rotate",
        "cli-coap",
        psk_id.as_str(),
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["identity"], "cli-id");
    assert_eq!(v["replaces"], psk_id.as_str());
    let new_id = v["id"].as_str().expect("id").to_string();
    let (id_now, key_now) = handshake_key(&srv, "cli-id").expect("valid");
    assert_eq!(id_now, new_id);
    assert_eq!(key_now, unhex(v["key_hex"].as_str().expect("key")));

    // Revoke.
    let (code, out, err) = run(&["device", "psk", "revoke", "cli-coap", new_id.as_str()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("revoked PSK {new_id} of cli-coap")),
        "{out}"
    );
    assert_eq!(handshake_key(&srv, "cli-id"), Err("revoked"));

    // Refused before any request, with clap's usage code; a server refusal
    // names the problem.
    let (code, _, err) = run(&[
        "device",
        "psk",
        "issue",
        "cli-coap",
        "--expires-in-days",
        "0",
    ])
    .await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(&["device", "psk", "rotate", "cli-coap", new_id.as_str()]).await;
    assert_ne!(code, 0);
    assert!(err.contains("revoked"), "{err}");
}
