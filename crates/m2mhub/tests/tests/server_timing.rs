//! `Server-Timing: app;dur=<ms>` on every HTTP response (api/src/timing.rs).

use crate::common::*;

/// The `dur` of the `app` metric, in milliseconds, if the header is well formed.
fn app_duration(r: &HttpResponse) -> Option<f64> {
    let v = r.header("server-timing")?;
    v.split(',').find_map(|metric| {
        let mut parts = metric.trim().split(';');
        (parts.next()? == "app").then_some(())?;
        parts.find_map(|p| p.trim().strip_prefix("dur=")?.parse::<f64>().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_responses_carry_server_timing() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    let created = http_request(
        srv.http(),
        "POST",
        "/api/v1/devices",
        Some(&token),
        Some(&serde_json::json!({"id": "timed-1"})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    for path in ["/api/v1/devices?limit=50", "/api/v1/devices/timed-1"] {
        let r = http_get_as(srv.http(), path, &token).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let raw = r
            .header("server-timing")
            .unwrap_or_else(|| panic!("{path}: no Server-Timing"));
        let dur = app_duration(&r).unwrap_or_else(|| panic!("{path}: unparseable {raw:?}"));
        assert!((0.0..5_000.0).contains(&dur), "{path}: {raw}");
        // Milliseconds with three decimals.
        let digits = raw.rsplit_once('.').map(|(_, d)| d.len());
        assert_eq!(digits, Some(3), "{path}: {raw}");
    }
    // Errors and routes outside the API carry it too.
    for (path, status) in [
        ("/api/v1/devices/nope", 404),
        ("/api/v1/broker", 401),
        ("/healthz", 200),
    ] {
        let r = if status == 401 {
            http_get(srv.http(), path).await
        } else {
            http_get_as(srv.http(), path, &token).await
        };
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(app_duration(&r).is_some(), "{path}: {:?}", r.headers);
    }
}
