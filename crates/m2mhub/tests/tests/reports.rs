//! Scheduled reports against the real server: a device posts meter
//! readings over HTTP, an operator defines an energy report, runs it now
//! over a chosen period, lists its runs and downloads the CSV and the HTML;
//! a viewer reads but cannot create, change, run or delete; bad definitions
//! are refused with the field to fix; every write is audited; the
//! scheduler runs a report that is due.

use crate::common::*;
use m2mhub_identity::Role;
use serde_json::{json, Value};

const H: i64 = 3_600_000;

fn energy_report(id: &str) -> Value {
    json!({
        "id": id,
        "name": "Meters",
        "kind": {"type": "energy", "metric": "kwh", "mode": "counter"},
        "schedule": {"every": "daily", "at": "06:00", "time_zone": "+02:00"},
        "retention": {"keep_runs": 5},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_define_and_run_reports_viewers_read_them() {
    let srv = TestServer::with(|s| s.reports.check_interval_secs = 1).await;
    let admin = Api::admin(&srv);
    let operator = Api::user(&srv, "olga", Role::Operator, "default");
    let viewer = Api::user(&srv, "vic", Role::Viewer, "default");
    let secret = registered_device(&admin, "meter1", None).await;

    // Readings every hour over two local days (UTC+2) of a counter
    // rising by 1.5 per hour.
    let p0 = 1_767_218_400_000i64; // 2026-01-01T00:00:00+02:00
    let points: Vec<Value> = (0..48)
        .map(|k| json!({"ts": p0 + k * H, "kwh": 1000.0 + 1.5 * k as f64}))
        .collect();
    let r = http_request(
        srv.http(),
        "POST",
        "/api/v1/devices/meter1/telemetry",
        Some(&secret),
        Some(&Value::Array(points)),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);

    // A viewer may not create; an operator may; bad definitions are 422.
    let refused = viewer
        .call("POST", "/reports", Some(energy_report("daily-energy")))
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let mut bad = energy_report("bad");
    bad["schedule"]["time_zone"] = json!("Mars/Olympus");
    let r = operator.call("POST", "/reports", Some(bad)).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("time_zone"), "{}", r.body);
    let mut bad = energy_report("bad");
    bad["delivery"] = json!({"email": ["ops@example.com"]});
    let r = operator.call("POST", "/reports", Some(bad)).await;
    assert_eq!(r.status, 422, "no relay configured: {}", r.body);
    let created = operator
        .expect("POST", "/reports", Some(energy_report("daily-energy")), 201)
        .await;
    assert!(created["next_run_ms"].as_i64().is_some(), "{created}");

    // Viewers read definitions but run nothing.
    let list = viewer.expect("GET", "/reports", None, 200).await;
    assert_eq!(list["items"][0]["id"], "daily-energy");
    let r = viewer.call("POST", "/reports/daily-energy/run", None).await;
    assert_eq!(r.status, 403, "{}", r.body);

    let run = operator
        .expect(
            "POST",
            "/reports/daily-energy/run",
            Some(json!({"from_ms": p0, "to_ms": p0 + 48 * H})),
            201,
        )
        .await;
    assert_eq!(run["ok"], true, "{run}");
    assert_eq!(run["trigger"], "manual");
    let run_id = run["id"].as_str().expect("run id");
    let runs = viewer
        .expect("GET", "/reports/daily-energy/runs", None, 200)
        .await;
    assert_eq!(runs["items"][0]["id"], run_id);

    let csv = viewer
        .call(
            "GET",
            &format!("/reports/daily-energy/runs/{run_id}/csv"),
            None,
        )
        .await;
    assert_eq!(csv.status, 200);
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    let rows: Vec<Vec<&str>> = csv
        .body
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').collect())
        .collect();
    // 23 increases on the first day, 24 (the one across midnight too) on
    // the second.
    assert_eq!(
        rows,
        vec![
            vec!["device", "date", "energy", "readings"],
            vec!["meter1", "2026-01-01", "34.500", "24"],
            vec!["meter1", "2026-01-02", "36.000", "24"],
        ]
    );
    let html = viewer
        .call(
            "GET",
            &format!("/reports/daily-energy/runs/{run_id}/html"),
            None,
        )
        .await;
    assert_eq!(html.status, 200);
    assert!(html.body.contains("<svg") && html.body.contains("meter1"));

    // Changing keeps id and creator; a viewer cannot change or delete.
    let mut changed = energy_report("daily-energy");
    changed["name"] = json!("Meters, weekly");
    changed["schedule"] =
        json!({"every": "weekly", "weekday": 1, "at": "07:30", "time_zone": "Europe/Berlin"});
    let r = viewer
        .call("PUT", "/reports/daily-energy", Some(changed.clone()))
        .await;
    assert_eq!(r.status, 403);
    let u = operator
        .expect("PUT", "/reports/daily-energy", Some(changed), 200)
        .await;
    assert_eq!(u["name"], "Meters, weekly");
    assert_eq!(u["created_by"], "olga");
    let r = viewer.call("DELETE", "/reports/daily-energy", None).await;
    assert_eq!(r.status, 403);

    // The scheduler runs what is due, over the period of its scheduled
    // instant.
    let mut due = srv.get().fleet.get_report("daily-energy").expect("report");
    due.next_run_ms = Some(m2mhub_identity::now_ms() - 1000);
    srv.get().fleet.update_report(&due).expect("make due");
    within_for(
        std::time::Duration::from_secs(20),
        "the scheduled run",
        async {
            loop {
                let runs = viewer
                    .expect("GET", "/reports/daily-energy/runs", None, 200)
                    .await;
                if runs["items"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|r| r["trigger"] == "schedule"))
                {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    let after = viewer
        .expect("GET", "/reports/daily-energy", None, 200)
        .await;
    assert!(after["next_run_ms"].as_i64() > Some(m2mhub_identity::now_ms()));

    operator
        .expect("DELETE", "/reports/daily-energy", None, 204)
        .await;
    let r = viewer
        .call(
            "GET",
            &format!("/reports/daily-energy/runs/{run_id}/csv"),
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert!(!srv.settings.data_dir.join("reports/daily-energy").exists());

    let audit = admin.expect("GET", "/audit?limit=1000", None, 200).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|r| r["action"].as_str())
        .filter(|a| a.starts_with("report."))
        .collect();
    for want in [
        "report.create",
        "report.run",
        "report.update",
        "report.delete",
    ] {
        assert!(actions.contains(&want), "{want} not audited: {actions:?}");
    }
}
