//! `m2mhub demo`: the real binary starts the platform with simulated
//! devices of every profile in their groups and the example rules, prints
//! the console URL and the login that work, reuses its own directory and
//! refuses anyone else's.

use crate::common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const PROFILES: [&str; 5] = ["factory", "meter", "truck", "wearable", "soil"];

/// Start `m2mhub demo` on loopback port 0; its stdout lines arrive on the
/// channel.
fn spawn_demo(data: &Path, log: &Path, duration: &str) -> (Child, mpsc::UnboundedReceiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_m2mhub"))
        .arg("demo")
        .arg("--data-dir")
        .arg(data)
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtts-listen",
            "127.0.0.1:0",
            "--https-listen",
            "127.0.0.1:0",
            "--coaps-listen",
            "127.0.0.1:0",
            "--count",
            "2",
            "--interval",
            "200ms",
            "--duration",
            duration,
        ])
        .env_remove("M2MHUB_CONFIG")
        .env_remove("M2MHUB_MASTER_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn m2mhub demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The stdout lines up to and including `m2mhub ready …`.
async fn banner(rx: &mut mpsc::UnboundedReceiver<String>, log: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    let read = async {
        while let Some(line) = rx.recv().await {
            let ready = line.starts_with("m2mhub ready");
            lines.push(line);
            if ready {
                return true;
            }
        }
        false
    };
    let ok = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .unwrap_or(false);
    assert!(
        ok,
        "no `m2mhub ready` line; stdout so far {lines:?}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    lines
}

fn value_after<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:?}"))
}

fn http_addr(ready: &str) -> SocketAddr {
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no http= in {ready:?}"))
}

async fn get(http: SocketAddr, token: &str, path: &str) -> Value {
    let r = http_get_as(http, &format!("/api/v1{path}"), token).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.json()
}

/// Wait for the child to exit by itself, for at most `secs`.
async fn exit_status(child: Child, secs: u64) -> std::process::ExitStatus {
    let pid = child.id();
    let mut child = child;
    let wait = tokio::task::spawn_blocking(move || child.wait());
    match tokio::time::timeout(Duration::from_secs(secs), wait).await {
        Ok(Ok(Ok(s))) => s,
        _ => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("m2mhub demo did not stop within {secs} s");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_fleets_of_every_profile_with_the_example_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("demo");
    let log = dir.path().join("demo.log");
    let (child, mut rx) = spawn_demo(&data, &log, "12s");
    let lines = banner(&mut rx, &log).await;
    let http = http_addr(lines.last().expect("ready line"));
    assert_eq!(value_after(&lines, "console:"), format!("http://{http}/"));
    let user = value_after(&lines, "user:").to_string();
    let password = value_after(&lines, "password:").to_string();
    assert!(
        lines.iter().any(|l| l.contains("m2mhub query latest")),
        "{lines:?}"
    );

    // The printed login works.
    let r = http_request(
        http,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&json!({"username": user, "password": password})),
    )
    .await;
    assert_eq!(r.status, 200, "login: {}", r.body);
    let token = r.json()["token"].as_str().expect("token").to_string();

    // Two devices per profile, each in its profile's group, all reporting.
    let devices = get(http, &token, "/devices?limit=1000").await;
    let devices = devices["items"].as_array().expect("items").clone();
    assert_eq!(devices.len(), 10, "{devices:?}");
    for p in PROFILES {
        let n = devices.iter().filter(|d| d["group"] == p).count();
        assert_eq!(n, 2, "devices of group {p}: {devices:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    for d in &devices {
        let id = d["id"].as_str().expect("id");
        loop {
            let t = get(http, &token, &format!("/devices/{id}/telemetry")).await;
            if t["items"].as_array().is_some_and(|i| !i.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no telemetry from {id} ({})",
                d["group"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let rules = get(http, &token, "/rules").await;
    let mut ids: Vec<&str> = rules["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        [
            "demo-meter-silent",
            "demo-overheating",
            "demo-truck-geofence"
        ]
    );

    let status = exit_status(child, 30).await;
    assert!(
        status.success(),
        "{status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // A rerun reuses the directory: same login, no new devices.
    let (child, mut rx) = spawn_demo(&data, &log, "1s");
    let again = banner(&mut rx, &log).await;
    assert!(again[0].contains("reusing"), "{again:?}");
    assert_eq!(value_after(&again, "password:"), password);
    let status = exit_status(child, 30).await;
    assert!(status.success(), "{status}");
    let count = std::fs::read_to_string(data.join("demo-fleet").join("truck.json")).map(|t| {
        serde_json::from_str::<Vec<Value>>(&t)
            .expect("fleet state")
            .len()
    });
    assert_eq!(count.ok(), Some(2));
}

#[tokio::test]
async fn demo_refuses_a_directory_that_is_not_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("precious.db"), "data").expect("write");
    let path = dir.path().to_str().expect("utf-8 path");
    let (code, _, stderr) = run_bin(
        &[
            "demo",
            "--data-dir",
            path,
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtts-listen",
            "127.0.0.1:0",
            "--https-listen",
            "127.0.0.1:0",
            "--coaps-listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is not a demo directory"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        1,
        "the demo wrote into a foreign directory"
    );
}
