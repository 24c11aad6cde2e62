//! `m2mhub sim`: a simulated fleet provisions itself with a claim token,
//! reports telemetry over MQTT, obeys a `shutdown` command sent through the
//! API, and a rerun reuses the same devices.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn device_ids(srv: &TestServer) -> Vec<String> {
    srv.get()
        .registry
        .list_devices(&m2mhub_identity::DeviceFilter::default())
        .expect("devices")
        .into_iter()
        .map(|d| d.id)
        .collect()
}

/// Poll `f` every 50 ms until it gives a value, for at most 5 s.
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn latest(srv: &TestServer, token: &str, id: &str) -> Value {
    let v = api(srv, token, "GET", &format!("/devices/{id}/telemetry"), None).await;
    let mut out = serde_json::Map::new();
    for item in v["items"].as_array().expect("items") {
        out.insert(
            item["metric"].as_str().expect("metric").to_string(),
            item["value"].clone(),
        );
    }
    Value::Object(out)
}

#[tokio::test]
async fn factory_fleet_provisions_reports_and_obeys_shutdown() {
    let srv = TestServer::start().await;
    let token = srv.admin_token();
    let claim = api(
        &srv,
        &token,
        "POST",
        "/claim-tokens",
        Some(json!({"name": "sim test", "max_uses": 3})),
    )
    .await;
    let secret = claim["secret"].as_str().expect("secret").to_string();
    let state_dir = srv.dir.path().join("sim-state");
    let mqtt = srv.mqtt().to_string();
    let http = format!("http://{}", srv.http());
    let no_profile = srv.dir.path().join("no-cli-profile.toml");
    let args = |duration: &str, claim: Option<&str>| {
        let mut a: Vec<String> = [
            "sim",
            "--profile",
            "factory",
            "--count",
            "3",
            "--interval",
            "200ms",
            "--duration",
            duration,
            "--progress-secs",
            "1",
            "--mqtt",
            &mqtt,
            "--server",
            &http,
            "--state-dir",
            state_dir.to_str().expect("utf-8 path"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(c) = claim {
            a.extend(["--claim-token".to_string(), c.to_string()]);
        }
        a
    };
    let env = vec![(
        "M2MHUB_PROFILE".to_string(),
        no_profile.display().to_string(),
    )];
    let spawn = |a: Vec<String>| {
        let env = env.clone();
        tokio::spawn(async move {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            run_bin(&a, &e).await
        })
    };

    let run = spawn(args("6s", Some(&secret)));
    let ids = wait_for("3 provisioned devices", || async {
        let ids = device_ids(&srv);
        (ids.len() == 3).then_some(ids)
    })
    .await;
    let id = ids[0].clone();
    let reading = wait_for("factory telemetry", || async {
        let l = latest(&srv, &token, &id).await;
        (l.get("rpm").is_some()).then_some(l)
    })
    .await;
    for m in ["temperature", "vibration", "rpm", "load"] {
        assert!(reading[m].is_number(), "{m} in {reading}");
    }
    assert!(reading["rpm"].as_f64().unwrap() > 100.0, "{reading}");

    let sent = api(
        &srv,
        &token,
        "POST",
        &format!("/devices/{id}/commands"),
        Some(json!({"name": "shutdown", "params": {"reason": "test"}})),
    )
    .await;
    let cmd = sent["command"]
        .as_str()
        .or_else(|| sent["id"].as_str())
        .unwrap_or_else(|| panic!("command id in {sent}"))
        .to_string();
    let answered = wait_for("the shutdown answered", || async {
        let c = api(&srv, &token, "GET", &format!("/commands/{cmd}"), None).await;
        (c["status"] == "answered").then_some(c)
    })
    .await;
    assert_eq!(answered["response"]["status"], "ok", "{answered}");
    // The machine stopped: it reports zero rpm; the others keep running.
    wait_for("the machine stopped", || async {
        let l = latest(&srv, &token, &id).await;
        (l["rpm"] == json!(0.0) || l["rpm"] == json!(0)).then_some(())
    })
    .await;
    let other = latest(&srv, &token, &ids[1]).await;
    assert!(other["rpm"].as_f64().unwrap() > 100.0, "{other}");

    let (code, _out, err) = run.await.expect("sim task");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("3/3 connected"), "{err}");
    assert!(err.contains("1 commands answered"), "{err}");

    // A rerun drives the same devices: no claim token needed, none added.
    let (code, _out, err) = spawn(args("1s", None)).await.expect("rerun");
    assert_eq!(code, 0, "{err}");
    assert_eq!(device_ids(&srv), ids);
}
