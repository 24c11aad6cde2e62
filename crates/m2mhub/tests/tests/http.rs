//! The HTTP side: health, metrics, the JSON API and its problem documents.

use crate::common::*;
use mqtt_codec::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_returns_200_json() {
    let srv = TestServer::start().await;
    let r = http_get(srv.http(), "/healthz").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|v| v.starts_with("application/json")));
    assert_eq!(r.json()["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_received_messages() {
    let srv = TestServer::start().await;
    let r = http_get(srv.http(), "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/plain")));
    assert!(r
        .body
        .contains("# TYPE m2mhub_mqtt_messages_received_total counter"));
    let before = metric(&r.body, "m2mhub_mqtt_messages_received_total");
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("metrics-pub")).await;
    c.publish(publish("m/t", QoS::AtLeastOnce, 1, "x")).await;
    c.publish(publish("m/t", QoS::AtMostOnce, 0, "y")).await;
    let after = scrape(srv.http(), "m2mhub_mqtt_messages_received_total").await;
    assert_eq!(after, before + 2);
    assert_eq!(scrape(srv.http(), "m2mhub_mqtt_connections").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_broker_returns_stats_json() {
    let srv = TestServer::start().await;
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("api-client")).await;
    c.subscribe(1, "api/#", QoS::AtMostOnce).await;
    c.publish(retained("api/r", QoS::AtLeastOnce, 1, "kept"))
        .await;
    let r = http_get_as(srv.http(), "/api/v1/broker", &srv.admin_token()).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|v| v.starts_with("application/json")));
    let j = r.json();
    assert_eq!(j["connections"], 1);
    assert_eq!(j["sessions"], 1);
    assert_eq!(j["subscriptions"], 1);
    assert_eq!(j["retained_messages"], 1);
    assert_eq!(j["counters"]["messages_received"], 1);
    assert!(j["uptime_seconds"].is_u64());
    let idx = http_get(srv.http(), "/api/v1/").await;
    if idx.status == 200 {
        assert_eq!(idx.json()["name"], "m2mhub");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_api_path_is_a_problem_document_404() {
    let srv = TestServer::start().await;
    for path in ["/api/v1/x", "/api/v1/broker/nope", "/nothing-here"] {
        let r = http_get(srv.http(), path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{path}"
        );
        let j = r.json();
        assert!(j["type"].is_string(), "{path}: {j}");
        assert!(j["title"].is_string(), "{path}: {j}");
        assert_eq!(j["status"], 404, "{path}: {j}");
    }
    let j = http_get(srv.http(), "/api/v1/x").await.json();
    assert_eq!(j["instance"], "/api/v1/x", "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_api_lists_pages_and_shows_sessions() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    let (mut a, _) = Raw::connect_ok(srv.mqtt(), v5("api-a")).await;
    a.subscribe(1, "api/#", QoS::AtLeastOnce).await;
    let (_b, _) = Raw::connect_ok(srv.mqtt(), v5("api-b")).await;

    let r = http_get_as(srv.http(), "/api/v1/sessions?limit=1", &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let page = r.json();
    assert_eq!(page["items"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(page["items"][0]["client_id"], "api-a");
    assert_eq!(page["items"][0]["subscriptions"][0]["filter"], "api/#");
    assert_eq!(page["next"], "api-a");

    let page = http_get_as(srv.http(), "/api/v1/sessions?limit=1&after=api-a", &token)
        .await
        .json();
    assert_eq!(page["items"][0]["client_id"], "api-b");
    assert_eq!(page["items"][0]["online"], true);

    let r = http_get_as(srv.http(), "/api/v1/sessions/api-b", &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["queued"], 0);
    for (path, status) in [
        ("/api/v1/sessions/nobody", 404),
        ("/api/v1/sessions?limit=abc", 400),
        ("/api/v1/sessions?limit=0", 400),
    ] {
        let r = http_get_as(srv.http(), path, &token).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|v| v.starts_with("application/problem+json")),
            "{path}"
        );
        assert_eq!(r.json()["status"], status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_registry_refusals() {
    let srv = TestServer::with(|s| s.mqtt.allow_anonymous = false).await;
    let before = metric(
        &http_get(srv.http(), "/metrics").await.body,
        "m2mhub_identity_connect_denied_total",
    );
    let (_c, ack) = Raw::connect(srv.mqtt(), v5("nobody")).await;
    assert_eq!(ack.reason_code, 0x87, "anonymous is refused by default");
    let after = metric(
        &http_get(srv.http(), "/metrics").await.body,
        "m2mhub_identity_connect_denied_total",
    );
    assert_eq!(after, before + 1);
}
