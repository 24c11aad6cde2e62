//! Dashboards end to end: an operator saves one with a widget of every
//! kind, its data is resolved from the store, the registry and the alarms;
//! a profile's default dashboard fills in the device it is opened for; a
//! share link opens it read-only without login and nothing else (writes
//! with the share token are refused), until revoked.

use crate::common::*;
use mqtt_codec::QoS;
use serde_json::{json, Value};

fn add_device(srv: &TestServer, id: &str, group: Option<&str>, profile: Option<&str>) {
    let registry = &srv.get().registry;
    if let Some(g) = group {
        let _ = registry.create_group(m2mhub_identity::DEFAULT_TENANT, g, g);
    }
    registry
        .create_device(m2mhub_identity::NewDevice {
            id: Some(id.into()),
            tenant: m2mhub_identity::DEFAULT_TENANT.into(),
            group: group.map(str::to_string),
            profile: profile.map(str::to_string),
            ..Default::default()
        })
        .expect("device");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_saves_a_dashboard_and_shares_it_read_only() {
    let srv = TestServer::start().await;
    add_device(&srv, "van-1", Some("vans"), None);
    add_device(&srv, "van-2", Some("vans"), None);
    let token = srv.admin_token();
    for (i, dev) in ["van-1", "van-2"].iter().enumerate() {
        let (mut m, _) = Raw::connect_ok(srv.mqtt(), v5(dev)).await;
        for k in 0..5u16 {
            let body =
                json!({"temp": 20 + i * 10 + usize::from(k), "lat": 48.1 + i as f64, "lon": 11.5});
            let code = m
                .publish(publish(
                    &format!("devices/{dev}/telemetry"),
                    QoS::AtLeastOnce,
                    k + 1,
                    body.to_string(),
                ))
                .await;
            assert!(code < 0x80);
        }
        m.disconnect().await;
    }
    srv.get()
        .fleet
        .raise_alarm(
            m2mhub_identity::DEFAULT_TENANT,
            "van-2",
            "door-open",
            m2mhub_fleet::Severity::Major,
            json!({}),
            None,
        )
        .expect("alarm");

    let layout = json!({"widgets": [
        {"type": "value", "title": "Van 1", "device": "van-1", "metric": "temp"},
        {"type": "gauge", "device": "van-2", "metric": "temp", "min": 0, "max": 50},
        {"type": "chart", "device": "van-1", "metric": "temp", "range": "1h", "width": 2},
        {"type": "map", "group": "vans"},
        {"type": "alarms"},
        {"type": "devices", "group": "vans", "metrics": ["temp"]},
        {"type": "group", "group": "vans", "metric": "temp", "fn": "max", "range": "1h"},
        {"type": "value", "device": "elsewhere", "metric": "temp"},
    ]});
    let d = api(
        &srv,
        &token,
        "POST",
        "/dashboards",
        Some(json!({"id": "vans", "name": "Vans", "layout": layout})),
    )
    .await;
    assert_eq!(d["updated_by"], "admin");
    let data = api(&srv, &token, "GET", "/dashboards/vans/data", None).await;
    let w = data["data"].as_array().expect("widget data");
    assert_eq!(w.len(), 8);
    assert_eq!(w[0]["value"], 24.0);
    assert_eq!(w[1]["value"], 34.0);
    assert!(
        !w[2]["points"].as_array().expect("points").is_empty(),
        "{}",
        w[2]
    );
    assert_eq!(w[3]["items"].as_array().map(Vec::len), Some(2), "{}", w[3]);
    assert_eq!(w[4]["items"][0]["type"], "door-open");
    assert_eq!(w[5]["items"][1]["values"]["temp"], 34.0);
    assert_eq!(
        (w[6]["value"].as_f64(), w[6]["devices"].as_u64()),
        (Some(34.0), Some(2))
    );
    assert_eq!(w[7]["error"], "no device \"elsewhere\"");

    // Bad layouts are refused with the reason.
    let r = http_request(
        srv.http(),
        "PUT",
        "/api/v1/dashboards/vans",
        Some(&token),
        Some(&json!({"layout": {"widgets": [{"type": "pie"}]}})),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("unknown type"), "{}", r.body);

    // A profile's default: opened for a device, it shows that device.
    add_device(&srv, "van-3", None, None);
    api(
        &srv,
        &token,
        "POST",
        "/dashboards",
        Some(json!({"id": "per-van", "name": "One van", "profile": "van",
            "layout": {"widgets": [{"type": "value", "metric": "temp"}]}})),
    )
    .await;
    let found = api(&srv, &token, "GET", "/dashboards?profile=van", None).await;
    assert_eq!(found["items"][0]["id"], "per-van");
    let one = api(
        &srv,
        &token,
        "GET",
        "/dashboards/per-van/data?device=van-1",
        None,
    )
    .await;
    assert_eq!(one["data"][0]["device"], "van-1");
    assert_eq!(one["data"][0]["value"], 24.0);
    let r = http_request(
        srv.http(),
        "POST",
        "/api/v1/dashboards",
        Some(&token),
        Some(&json!({"name": "Second", "profile": "van"})),
    )
    .await;
    assert_eq!(r.status, 409, "one default per profile: {}", r.body);

    // A share link: read-only, without login, this dashboard only.
    let share = api(
        &srv,
        &token,
        "POST",
        "/dashboards/vans/shares",
        Some(json!({"expires_in": "1h"})),
    )
    .await;
    let st = share["token"].as_str().expect("token").to_string();
    assert_eq!(share["console_path"], format!("/#/shared/{st}"));
    let r = http_request(
        srv.http(),
        "GET",
        &format!("/api/v1/shared/{st}"),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = r.json();
    assert_eq!(v["read_only"], true);
    assert_eq!(v["dashboard"]["name"], "Vans");
    assert_eq!(v["data"][0]["value"], 24.0);
    assert!(v["dashboard"].get("updated_by").is_none(), "{v}");
    // The share token is no API credential: reads and writes refused.
    for (method, path, body) in [
        (
            "PUT",
            "/api/v1/dashboards/vans",
            Some(json!({"name": "hacked"})),
        ),
        ("DELETE", "/api/v1/dashboards/vans", None),
        ("GET", "/api/v1/dashboards/vans", None),
        ("GET", "/api/v1/devices", None),
    ] {
        let r = http_request(srv.http(), method, path, Some(&st), body.as_ref()).await;
        assert_eq!(
            r.status, 401,
            "{method} {path} with a share token: {}",
            r.body
        );
    }
    let listed = api(&srv, &token, "GET", "/dashboards/vans/shares", None).await;
    assert!(!listed.to_string().contains(&st), "tokens are never listed");
    assert_eq!(listed["items"][0]["live"], true);
    let sid = listed["items"][0]["id"].as_str().expect("id").to_string();
    let r = http_request(
        srv.http(),
        "DELETE",
        &format!("/api/v1/dashboards/vans/shares/{sid}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    let r = http_request(
        srv.http(),
        "GET",
        &format!("/api/v1/shared/{st}"),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 404, "revoked: {}", r.body);
}
