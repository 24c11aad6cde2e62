//! Rule backtests against the live engine: a day of simulated readings
//! from two machines is published through MQTT while the rule runs live
//! (its outputs republished to `alerts/{device}` and collected by a broker
//! observer); the same rule is then backtested over the stored readings,
//! and the two must agree on every fire, repeat and clear — same device,
//! same reading, same time. The readings carry their own `ts` (a day in
//! the past, one a minute), so the live outputs name the reading that
//! produced them in their row, and the stored points keep that time.
//!
//! The rule is a hysteresis filter: its outputs depend on the readings
//! alone, so the comparison is exact. Timers (windows, `FOR`, silence) run
//! on arrival time live and on the data's time in a backtest: a window rule
//! is compared on readings published in real time (stored at their
//! arrival, so both clocks agree), and `FOR` and silence are tested with
//! explicit time in `automation/src/backtest.rs`.
//!
//! Also: the CLI (`m2mhub rule backtest`) over the same data, and the
//! refusals (bad SQL with its position, a range too long, an event source).

use crate::common::*;
use mqtt_codec::{Packet, Publish, QoS};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SQL: &str =
    "SELECT * FROM 'devices/+/telemetry' WHERE temperature > 80 CLEAR WHEN temperature < 70";
const MINUTE: i64 = 60_000;
const READINGS: i64 = 24 * 60;

/// A machine's temperature at minute `i`: a slow wave crossing both
/// thresholds eight times a day, with deterministic jitter, two decimals.
fn temperature(machine: i64, i: i64) -> f64 {
    let phase = (i + machine * 37) as f64 * std::f64::consts::TAU / 180.0;
    let jitter = ((i * 7919 + machine * 104_729) % 13) as f64 / 10.0 - 0.6;
    ((75.0 + 10.0 * phase.sin() + jitter) * 100.0).round() / 100.0
}

/// `(device, event, time, temperature)`, sorted: what both sides report.
type Outputs = Vec<(String, String, i64, String)>;

fn sorted(mut v: Outputs) -> Outputs {
    v.sort();
    v
}

/// Publish a machine's day at QoS 1, 50 in flight at a time (under the
/// server's receive maximum).
async fn publish_day(srv: &TestServer, machine: i64, device: &str, start: i64) {
    let (mut m, _) = Raw::connect_ok(srv.mqtt(), v5(device)).await;
    let topic = format!("devices/{device}/telemetry");
    let mut i = 0;
    while i < READINGS {
        let batch: Vec<i64> = (i..(i + 50).min(READINGS)).collect();
        for (k, n) in batch.iter().enumerate() {
            let body = json!({"ts": start + n * MINUTE, "temperature": temperature(machine, *n)});
            let p: Publish = publish(&topic, QoS::AtLeastOnce, k as u16 + 1, body.to_string());
            m.send(&Packet::Publish(p)).await;
        }
        let mut acked = 0;
        while acked < batch.len() {
            match m.recv().await {
                Packet::PubAck(a) => {
                    assert!(a.reason_code < 0x80, "refused: {a:?}");
                    acked += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        i += 50;
    }
    m.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backtest_fires_when_the_live_engine_fired() {
    let srv = TestServer::start().await;
    add_default_device(&srv, "kiln-1");
    add_default_device(&srv, "kiln-2");
    let token = srv.admin_token();
    let broker = srv.get().broker.clone();
    let (observer, mut alerts) = broker.observer(65_536);
    broker.set_observed(observer, &["alerts/#".to_string()]);
    api(
        &srv,
        &token,
        "POST",
        "/rules",
        Some(json!({
            "id": "kiln-hot",
            "sql": SQL,
            "actions": [
                {"type": "republish", "topic": "alerts/{device}", "qos": 1},
                {"type": "alarm", "alarm_type": "hot", "severity": "major"}
            ]
        })),
    )
    .await;

    // Yesterday, on the minute.
    let start = (m2mhub_identity::now_ms() - 2 * 86_400_000) / MINUTE * MINUTE;
    let end = start + READINGS * MINUTE;
    publish_day(&srv, 1, "kiln-1", start).await;
    publish_day(&srv, 2, "kiln-2", start).await;

    // The backtest of the stored rule over the stored day.
    let bt = api(
        &srv,
        &token,
        "POST",
        "/rules/backtest",
        Some(json!({"rule_id": "kiln-hot", "from": start, "to": end})),
    )
    .await;
    assert_eq!(bt["messages"], 2 * READINGS, "{}", bt["last_error"]);
    assert_eq!(bt["devices"], 2);
    assert_eq!(bt["failed"], 0);
    assert_eq!(bt["truncated"], false);
    let listed = bt["firings"].as_array().expect("firings").clone();
    let fired = bt["fired"].as_u64().expect("fired");
    assert!(
        fired >= 8,
        "the wave crosses 80 several times a day: {fired}"
    );
    assert_eq!(
        listed.len() as u64,
        fired + bt["repeated"].as_u64().unwrap_or(0) + bt["cleared"].as_u64().unwrap_or(0)
    );
    let backtested: Outputs = sorted(
        listed
            .iter()
            .map(|f| {
                (
                    f["device"].as_str().unwrap_or_default().to_string(),
                    f["event"].as_str().unwrap_or_default().to_string(),
                    f["ts_ms"].as_i64().unwrap_or_default(),
                    f["row"]["temperature"].to_string(),
                )
            })
            .collect(),
    );
    // What it would have done: the alarm raised on a fire, cleared on a clear.
    let first_fire = listed
        .iter()
        .find(|f| f["event"] == "fire")
        .expect("a fire");
    let summaries: Vec<&str> = first_fire["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["summary"].as_str())
        .collect();
    assert_eq!(
        summaries,
        [
            format!(
                "publish to alerts/{}",
                first_fire["device"].as_str().unwrap_or_default()
            ),
            format!(
                "raise major alarm hot on {}",
                first_fire["device"].as_str().unwrap_or_default()
            ),
        ]
    );

    // The live engine's outputs, as republished: the row is the payload,
    // whose `ts` is the reading's time.
    let mut live: Outputs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while live.len() < listed.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(m)) = tokio::time::timeout(left, alerts.recv()).await else {
            panic!("live outputs: {} of {}", live.len(), listed.len());
        };
        let o: Value = serde_json::from_slice(&m.payload).expect("JSON output");
        live.push((
            o["device"].as_str().unwrap_or_default().to_string(),
            o["event"].as_str().unwrap_or_default().to_string(),
            o["row"]["ts"].as_i64().expect("the reading's ts"),
            o["row"]["temperature"].to_string(),
        ));
    }
    // Nothing more comes.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), alerts.recv())
            .await
            .is_err(),
        "the live engine fired more than the backtest"
    );
    let live = sorted(live);
    assert_eq!(live.len(), backtested.len());
    for (l, b) in live.iter().zip(&backtested) {
        assert_eq!(l, b, "live vs backtest");
    }

    // A change tried on the stored rule: a lower threshold fires earlier
    // or as early on every cycle, and more often.
    let lower = api(
        &srv,
        &token,
        "POST",
        "/rules/backtest",
        Some(json!({
            "rule_id": "kiln-hot", "from": start, "to": end, "devices": ["kiln-1"],
            "sql": SQL.replace("> 80", "> 78"),
        })),
    )
    .await;
    assert_eq!(lower["devices"], 1);
    assert_eq!(lower["messages"], READINGS);
    let per_device: BTreeMap<&str, usize> = backtested.iter().fold(BTreeMap::new(), |mut m, o| {
        *m.entry(o.0.as_str()).or_default() += 1;
        m
    });
    assert!(
        lower["firings"].as_array().map_or(0, Vec::len) >= per_device["kiln-1"],
        "{lower}"
    );

    // The CLI over the same data.
    let profile = tempfile::tempdir().expect("tempdir");
    let env = [
        ("M2MHUB_SERVER", format!("http://{}", srv.http())),
        ("M2MHUB_TOKEN", token.clone()),
        (
            "M2MHUB_PROFILE",
            profile.path().join("cli.toml").display().to_string(),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (from, to) = (start.to_string(), end.to_string());
    let (code, out, err) = run_bin(
        &["rule", "backtest", "kiln-hot", "--from", &from, "--to", &to],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{err}{out}");
    assert!(
        out.starts_with(&format!("{} messages from 2 devices", 2 * READINGS)),
        "{out}"
    );
    assert!(out.contains("raise major alarm hot on kiln-"), "{out}");
    let (code, _, err) = run_bin(
        &[
            "rule",
            "backtest",
            "--sql",
            "SELECT frobnicate(x) FROM 'devices/+/telemetry'",
            "--from",
            &from,
        ],
        &env,
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("1 | SELECT frobnicate(x)"), "{err}");

    // Refusals.
    let r = http_request(
        srv.http(),
        "POST",
        "/api/v1/rules/backtest",
        Some(&token),
        Some(&json!({"sql": SQL, "from": "-40d", "to": "now"})),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("range-too-long"), "{}", r.body);
    let r = http_request(
        srv.http(),
        "POST",
        "/api/v1/rules/backtest",
        Some(&token),
        Some(&json!({"sql": "SELECT * FROM '$events/device_connected'", "from": "-1h"})),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("not-replayable"), "{}", r.body);
    let r = http_request(
        srv.http(),
        "POST",
        "/api/v1/rules/backtest",
        Some(&token),
        Some(&json!({"sql": "SELECT * FROM 'devices/+/telemetry' WHERE", "from": "-1h"})),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("\"line\""), "{}", r.body);
}

/// A window rule, whose windows close on a timer: live they close on the
/// clock of arrival, in a backtest on the stored readings' times. Readings
/// published now, without their own `ts`, are stored at their arrival
/// time, so the two clocks agree: each two-second window the live engine
/// closed over these readings (average, count) is one the backtest closes
/// too, with the same start. The readings are sent in the middle of each
/// window (0.4–1.6 s in), away from its edges, so the few milliseconds
/// between the rule engine's and the store's clocks cannot move one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_rule_backtests_as_it_ran_live() {
    const WINDOW: i64 = 2_000;
    const WINDOWS: i64 = 4;
    let srv = TestServer::start().await;
    add_default_device(&srv, "press-1");
    let token = srv.admin_token();
    let broker = srv.get().broker.clone();
    let (observer, mut alerts) = broker.observer(1024);
    broker.set_observed(observer, &["alerts/#".to_string()]);
    api(
        &srv,
        &token,
        "POST",
        "/rules",
        Some(json!({
            "id": "press-avg",
            "sql": "SELECT device, avg(t) AS t, count(*) AS n FROM 'devices/+/telemetry' \
                    GROUP BY device, TUMBLING(2s)",
            "actions": [{"type": "republish", "topic": "alerts/{device}", "qos": 1}]
        })),
    )
    .await;

    let (mut m, _) = Raw::connect_ok(srv.mqtt(), v5("press-1")).await;
    let first = (m2mhub_identity::now_ms() / WINDOW + 1) * WINDOW;
    let mut pid = 0u16;
    for w in 0..WINDOWS {
        for k in 0..3i64 {
            let at = first + w * WINDOW + 400 + k * 600;
            let wait = at - m2mhub_identity::now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            pid += 1;
            let t = 20.0 + (w * 3 + k) as f64 * 1.5;
            let p: Publish = publish(
                "devices/press-1/telemetry",
                QoS::AtLeastOnce,
                pid,
                json!({ "t": t }).to_string(),
            );
            m.send(&Packet::Publish(p)).await;
            match m.recv().await {
                Packet::PubAck(a) => assert!(a.reason_code < 0x80, "refused: {a:?}"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    m.disconnect().await;

    // The live engine closes each window after its end.
    type Window = (String, i64, String, i64);
    let mut live: Vec<Window> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while live.len() < WINDOWS as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(msg)) = tokio::time::timeout(left, alerts.recv()).await else {
            panic!("live windows: {live:?}");
        };
        let o: Value = serde_json::from_slice(&msg.payload).expect("JSON output");
        live.push((
            o["event"].as_str().unwrap_or_default().to_string(),
            o["window"]["start_ms"].as_i64().expect("a window"),
            o["row"]["t"].to_string(),
            o["row"]["n"].as_i64().expect("a count"),
        ));
    }
    live.sort();
    let starts: Vec<i64> = live.iter().map(|w| w.1).collect();
    assert_eq!(
        starts,
        (0..WINDOWS).map(|w| first + w * WINDOW).collect::<Vec<_>>(),
        "one live window per two seconds of readings: {live:?}"
    );
    assert!(live.iter().all(|w| w.3 == 3), "{live:?}");

    let bt = api(
        &srv,
        &token,
        "POST",
        "/rules/backtest",
        Some(json!({"rule_id": "press-avg", "from": first, "to": first + WINDOWS * WINDOW})),
    )
    .await;
    assert_eq!(bt["messages"], 3 * WINDOWS, "{bt}");
    let mut backtested: Vec<Window> = bt["firings"]
        .as_array()
        .expect("firings")
        .iter()
        .map(|f| {
            (
                f["event"].as_str().unwrap_or_default().to_string(),
                f["window"]["start_ms"].as_i64().unwrap_or_default(),
                f["row"]["t"].to_string(),
                f["row"]["n"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    backtested.sort();
    assert_eq!(backtested, live, "backtest vs live");
}
