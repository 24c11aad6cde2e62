//! Device profiles and device events over HTTP and the CLI, against the
//! real server: CRUD, roles, tenant isolation, audit, the ingest lookup
//! following every change, and event listing with paging.

use crate::common::*;
use m2mhub_identity::Role;
use serde_json::{json, Value};

fn names(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["tenant"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn content_type(srv: &TestServer, device: &str) -> Option<&'static str> {
    srv.get()
        .registry
        .ingest_info(device)
        .expect("known device")
        .content_type
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_crud_roles_isolation_and_ingest_lookup() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    for t in ["acme", "beta"] {
        admin
            .expect("POST", "/tenants", Some(json!({"id": t})), 201)
            .await;
    }
    let acme_op = Api::user(&srv, "acme-op", Role::Operator, "acme");
    let acme_viewer = Api::user(&srv, "acme-viewer", Role::Viewer, "acme");
    let beta_op = Api::user(&srv, "beta-op", Role::Operator, "beta");

    let p = admin
        .expect(
            "POST",
            "/profiles",
            Some(json!({"name": "meter", "tenant": "acme", "content_type": "application/senml+json", "description": "SenML meters"})),
            201,
        )
        .await;
    assert_eq!(p["tenant"], "acme");
    assert_eq!(p["content_type"], "application/senml+json");
    let r = admin
        .call(
            "POST",
            "/profiles",
            Some(json!({"name": "x", "tenant": "acme", "content_type": "application/xml"})),
        )
        .await;
    assert_problem(&r, 422, "application/senml+cbor");
    let r = admin
        .call(
            "POST",
            "/profiles",
            Some(json!({"name": "meter", "tenant": "acme"})),
        )
        .await;
    assert_problem(&r, 409, "meter");
    // A tenant operator creates in its own tenant, whatever it asks for.
    let g = acme_op
        .expect(
            "POST",
            "/profiles",
            Some(json!({"name": "gauge", "content_type": "application/json"})),
            201,
        )
        .await;
    assert_eq!(g["tenant"], "acme");
    let r = acme_op
        .call(
            "POST",
            "/profiles",
            Some(json!({"name": "y", "tenant": "beta"})),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);

    // Viewers read, never write.
    let v = acme_viewer.expect("GET", "/profiles", None, 200).await;
    assert_eq!(names(&v), ["acme/default", "acme/gauge", "acme/meter"]);
    let m = acme_viewer
        .expect("GET", "/profiles/meter", None, 200)
        .await;
    assert_eq!(m["description"], "SenML meters");
    for (method, path, body) in [
        ("POST", "/profiles", Some(json!({"name": "z"}))),
        ("PUT", "/profiles/meter", Some(json!({"description": "no"}))),
        ("DELETE", "/profiles/gauge", None),
    ] {
        let r = acme_viewer.call(method, path, body).await;
        assert_problem(&r, 403, "operator");
    }

    // Another tenant sees none of it.
    let v = beta_op.expect("GET", "/profiles", None, 200).await;
    assert_eq!(names(&v), ["beta/default"]);
    for (method, path, body) in [
        ("GET", "/profiles/meter", None),
        ("GET", "/profiles/meter?tenant=acme", None),
        (
            "PUT",
            "/profiles/meter?tenant=acme",
            Some(json!({"description": "mine"})),
        ),
        ("DELETE", "/profiles/meter?tenant=acme", None),
        ("GET", "/profiles?tenant=acme", None),
    ] {
        let r = beta_op.call(method, path, body).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }
    let all = admin.expect("GET", "/profiles", None, 200).await;
    assert_eq!(names(&all).len(), 5, "{all}");

    // Devices name profiles of their own tenant; the ingest lookup follows.
    acme_op
        .expect(
            "POST",
            "/devices",
            Some(json!({"id": "m1", "profile": "meter"})),
            201,
        )
        .await;
    let r = beta_op
        .call(
            "POST",
            "/devices",
            Some(json!({"id": "b1", "profile": "meter"})),
        )
        .await;
    assert_problem(&r, 422, "does not exist in tenant beta");
    assert_eq!(content_type(&srv, "m1"), Some("application/senml+json"));
    let u = acme_op
        .expect(
            "PUT",
            "/profiles/meter",
            Some(json!({"content_type": "application/cbor"})),
            200,
        )
        .await;
    assert_eq!(u["description"], "SenML meters", "absent fields stay");
    assert_eq!(content_type(&srv, "m1"), Some("application/cbor"));
    let r = acme_op
        .call("PATCH", "/devices/m1", Some(json!({"profile": "ghost"})))
        .await;
    assert_problem(&r, 422, "ghost");
    acme_op
        .expect(
            "PATCH",
            "/devices/m1",
            Some(json!({"profile": "gauge"})),
            200,
        )
        .await;
    assert_eq!(content_type(&srv, "m1"), Some("application/json"));
    let r = acme_op.call("DELETE", "/profiles/gauge", None).await;
    assert_problem(&r, 409, "1 device");
    let u = acme_op
        .expect(
            "PUT",
            "/profiles/gauge",
            Some(json!({"content_type": null})),
            200,
        )
        .await;
    assert_eq!(u["content_type"], Value::Null);
    assert_eq!(content_type(&srv, "m1"), None);
    // The tenant's default can carry a content type too.
    acme_op
        .expect(
            "PATCH",
            "/devices/m1",
            Some(json!({"profile": "default"})),
            200,
        )
        .await;
    acme_op
        .expect(
            "PUT",
            "/profiles/default",
            Some(json!({"content_type": "text/plain"})),
            200,
        )
        .await;
    assert_eq!(content_type(&srv, "m1"), Some("text/plain"));
    acme_op.expect("DELETE", "/profiles/gauge", None, 204).await;
    acme_op.expect("GET", "/profiles/gauge", None, 404).await;
    let r = acme_op
        .call("PUT", "/profiles/meter", Some(json!({"content_type": 5})))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // Every change is in the audit log.
    for (action, n) in [
        ("profile.create", 2),
        ("profile.update", 3),
        ("profile.delete", 1),
    ] {
        let a = admin
            .expect("GET", &format!("/audit?action={action}"), None, 200)
            .await;
        let items = a["items"].as_array().expect("items");
        assert_eq!(items.len(), n, "{action}: {a}");
        assert!(items
            .iter()
            .all(|r| r["target"].as_str().is_some_and(|t| t.starts_with("acme/"))));
    }
    let doc = admin.expect("GET", "/openapi.json", None, 200).await;
    for path in ["/profiles", "/profiles/{name}", "/devices/{id}/events"] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_events_are_listed_newest_first_paged_and_scoped() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    for t in ["acme", "beta"] {
        admin
            .expect("POST", "/tenants", Some(json!({"id": t})), 201)
            .await;
    }
    let acme_viewer = Api::user(&srv, "acme-viewer", Role::Viewer, "acme");
    let beta_op = Api::user(&srv, "beta-op", Role::Operator, "beta");
    admin
        .expect(
            "POST",
            "/devices",
            Some(json!({"id": "e1", "tenant": "acme"})),
            201,
        )
        .await;
    let fleet = &srv.get().fleet;
    for i in 0..12 {
        fleet.record_device_event(
            "acme",
            "e1",
            "decode_error",
            format!("payload {i} is not JSON"),
        );
    }
    let page = acme_viewer
        .expect("GET", "/devices/e1/events?limit=4", None, 200)
        .await;
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 4);
    assert_eq!(
        items[0]["detail"], "payload 9 is not JSON",
        "newest stored first"
    );
    assert_eq!(items[0]["kind"], "decode_error");
    assert_eq!(items[0]["device_id"], "e1");
    assert_eq!(page["counts"]["recorded"], 12);
    assert_eq!(
        page["counts"]["suppressed"], 2,
        "rate limited to 10 a minute"
    );
    let next = page["next"].as_u64().expect("next cursor");
    let mut seen = 4;
    let mut cursor = Some(next);
    while let Some(c) = cursor {
        let p = acme_viewer
            .expect(
                "GET",
                &format!("/devices/e1/events?limit=4&before={c}"),
                None,
                200,
            )
            .await;
        seen += p["items"].as_array().expect("items").len();
        cursor = p["next"].as_u64();
    }
    assert_eq!(seen, 10);
    let none = acme_viewer
        .expect("GET", "/devices/e1/events?kind=too_large", None, 200)
        .await;
    assert!(none["items"].as_array().expect("items").is_empty());
    assert_eq!(none["next"], Value::Null);
    let r = acme_viewer
        .call("GET", "/devices/e1/events?limit=0", None)
        .await;
    assert_problem(&r, 400, "limit");
    let r = acme_viewer
        .call("GET", "/devices/e1/events?bogus=1", None)
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = beta_op.call("GET", "/devices/e1/events", None).await;
    assert_problem(&r, 404, "e1");
    let r = admin.call("GET", "/devices/ghost/events", None).await;
    assert_problem(&r, 404, "ghost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_profile_and_device_event_commands() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    let server = format!("http://{}", srv.http());
    let dir = tempfile::tempdir().expect("tempdir");
    let cli_profile = dir.path().join("cli.toml");
    let cli_profile = cli_profile.to_str().expect("utf-8").to_string();
    let env = [
        ("M2MHUB_PROFILE", cli_profile.as_str()),
        ("M2MHUB_SERVER", server.as_str()),
        ("M2MHUB_TOKEN", token.as_str()),
    ];
    let run = |args: &'static [&'static str]| run_bin(args, &env);
    let json_of = |out: &str| -> Value { serde_json::from_str(out).expect("JSON output") };

    let (code, out, err) = run(&[
        "profile",
        "add",
        "meter",
        "--content-type",
        "application/json",
        "--description",
        "JSON meters",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_of(&out)["content_type"], "application/json");
    let (code, out, err) = run(&["profile", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("TENANT"), "a table: {out}");
    assert!(
        out.lines()
            .any(|l| l.contains("meter") && l.contains("application/json")),
        "{out}"
    );
    let (code, out, err) = run(&[
        "profile",
        "set",
        "meter",
        "--content-type",
        "text/plain",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_of(&out)["content_type"], "text/plain");
    assert_eq!(json_of(&out)["description"], "JSON meters");
    let (code, _, err) = run(&["profile", "set", "meter"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("nothing to change"), "{err}");
    let (code, _, err) = run(&["profile", "add", "bad", "--content-type", "image/png"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("application/senml+json"),
        "names the choices: {err}"
    );
    let (code, out, err) = run(&["profile", "show", "default", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["content_type"], Value::Null);

    let (code, out, err) = run(&["device", "add", "cli-m1", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(&["device", "set-profile", "cli-m1", "meter", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_of(&out)["profile"], "meter");
    assert_eq!(
        srv.get()
            .registry
            .ingest_info("cli-m1")
            .and_then(|i| i.content_type),
        Some("text/plain")
    );
    let (code, _, err) = run(&["device", "set-profile", "cli-m1", "ghost"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("ghost"), "{err}");

    srv.get().fleet.record_device_event(
        "default",
        "cli-m1",
        "decode_error",
        "expected a number at byte 3".into(),
    );
    let (code, out, err) = run(&["device", "events", "cli-m1", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["items"][0]["kind"], "decode_error");
    let (code, out, err) = run(&["device", "events", "cli-m1", "--kind", "decode_error"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("expected a number at byte 3"), "{out}");
    assert!(out.contains("1 recorded"), "{out}");

    let (code, _, err) = run(&["profile", "delete", "meter"]).await;
    assert_eq!(code, 1, "in use");
    assert!(err.contains("device"), "{err}");
    let (code, _, err) = run(&["device", "set-profile", "cli-m1", "default"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&["profile", "delete", "meter"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted profile meter"), "{out}");
}
