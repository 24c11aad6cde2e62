//! `m2mhub query …` against the real server: readings published over MQTT,
//! then every query command run through the binary, checked on its table
//! and its `--json` output.

use crate::common::*;
use mqtt_codec::QoS;
use serde_json::{json, Value};

/// An hour boundary (2025-11-21T04:00:00Z): buckets line up with readings.
const T0: i64 = 1_763_700_000_000 - 1_763_700_000_000 % HOUR;
const HOUR: i64 = 3_600_000;

/// The binary, pointed at one server with an admin token (and a profile
/// file of its own, so nothing from the machine's profile leaks in).
struct Cli {
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Cli {
    fn new(srv: &TestServer) -> Cli {
        let dir = tempfile::tempdir().expect("tempdir");
        let profile = dir.path().join("cli.toml").display().to_string();
        Cli {
            env: vec![
                ("M2MHUB_PROFILE".into(), profile),
                ("M2MHUB_SERVER".into(), format!("http://{}", srv.http())),
                ("M2MHUB_TOKEN".into(), srv.admin_token()),
            ],
            _dir: dir,
        }
    }

    async fn run(&self, args: &[impl AsRef<str>]) -> (i32, String, String) {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        run_bin(&args, &env).await
    }

    /// stdout of a command that must succeed.
    async fn ok(&self, args: &[impl AsRef<str>]) -> String {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let (code, out, err) = self.run(&args).await;
        assert_eq!(code, 0, "m2mhub {args:?}: {err}{out}");
        out
    }

    async fn json(&self, args: &[impl AsRef<str>]) -> Value {
        let mut args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        args.push("--json");
        let out = self.ok(&args).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
}

/// Publish a JSON batch at QoS 1; the PUBACK comes once it is stored.
async fn publish_batch(srv: &TestServer, device: &str, batch: &[Value]) {
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5(device)).await;
    let code = c
        .publish(publish(
            &format!("devices/{device}/telemetry"),
            QoS::AtLeastOnce,
            1,
            serde_json::to_vec(batch).expect("json"),
        ))
        .await;
    assert!(code < 0x80, "PUBACK reason 0x{code:02x}");
    c.disconnect().await;
}

/// m1: two hours of one reading a minute, temp 20.0, 20.1 … 31.9 (hourly
/// averages 22.95 and 28.95), engine.rpm 1000 … 1119 from a nested object,
/// and a metric whose name needs percent-encoding. m2: the first hour only,
/// temp 10.
async fn two_devices() -> TestServer {
    let srv = TestServer::start().await;
    add_default_device(&srv, "m1");
    add_default_device(&srv, "m2");
    let m1: Vec<Value> = (0..120)
        .map(|i| {
            json!({
                "ts": T0 + i * 60_000,
                "temp": 20.0 + i as f64 / 10.0,
                "engine": {"rpm": 1000 + i},
                "room 1/ä": {"hum%": 40},
            })
        })
        .collect();
    publish_batch(&srv, "m1", &m1).await;
    let m2: Vec<Value> = (0..60)
        .map(|i| json!({"ts": T0 + i * 60_000, "temp": 10.0}))
        .collect();
    publish_batch(&srv, "m2", &m2).await;
    srv
}

/// Data rows of a table (the header and any hint line left out).
fn rows(out: &str) -> Vec<&str> {
    out.lines()
        .skip(1)
        .filter(|l| !l.starts_with('('))
        .collect()
}

fn points(v: &Value) -> &Vec<Value> {
    v["points"].as_array().expect("points")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_series_and_raw_points_with_paging() {
    let srv = two_devices().await;
    let cli = Cli::new(&srv);
    let (from, to) = (T0.to_string(), (T0 + 2 * HOUR).to_string());
    let last = "2025-11-21T05:59:00.000Z";

    let out = cli.ok(&["query", "latest", "m1"]).await;
    assert!(out.starts_with("METRIC"), "{out}");
    let temp = out
        .lines()
        .find(|l| l.starts_with("temp "))
        .unwrap_or_else(|| panic!("no temp row: {out}"));
    assert!(temp.contains("31.9") && temp.contains(last), "{temp}");
    assert!(out.contains("engine.rpm"), "{out}");
    let v = cli.json(&["query", "latest", "m1"]).await;
    assert_eq!(v["items"].as_array().expect("items").len(), 3, "{v}");

    let out = cli.ok(&["query", "series", "m1"]).await;
    for metric in ["temp", "engine.rpm", "room 1/ä.hum%"] {
        assert!(out.contains(metric), "{metric} missing: {out}");
    }
    assert!(out.contains("float"), "{out}");

    // One page holds everything with the default limit.
    let v = cli
        .json(&["query", "raw", "m1", "temp", "--from", &from, "--to", &to])
        .await;
    assert_eq!(points(&v).len(), 120);
    assert_eq!(points(&v)[0], json!([T0, 20.0]));
    assert_eq!(v["next"], Value::Null);

    // Small pages: the table ends with the --cursor of the next page…
    let page = ["query", "raw", "m1", "temp", "--from", &from, "--to", &to];
    let mut args = page.to_vec();
    args.extend(["--limit", "50"]);
    let out = cli.ok(&args).await;
    assert!(out.starts_with("TS_MS"), "{out}");
    assert_eq!(rows(&out).len(), 50, "{out}");
    assert!(
        rows(&out)[0].starts_with(&format!("{T0}  2025-11-21T04:00:00.000Z  20")),
        "{out}"
    );
    let hint = out.lines().last().expect("hint");
    assert!(hint.starts_with("(more: --cursor "), "{hint}");
    let cursor = hint["(more: --cursor ".len()..]
        .split_whitespace()
        .next()
        .expect("cursor");
    // …which continues where the page stopped.
    let mut next = args.clone();
    next.extend(["--cursor", cursor]);
    let out = cli.ok(&next).await;
    assert_eq!(rows(&out).len(), 50, "{out}");
    assert!(
        rows(&out)[0].starts_with(&(T0 + 50 * 60_000).to_string()),
        "{out}"
    );
    // --all follows every cursor, in the table and in JSON.
    let mut all = args.clone();
    all.push("--all");
    let out = cli.ok(&all).await;
    assert_eq!(rows(&out).len(), 120, "{out}");
    assert!(!out.contains("(more"), "{out}");
    let v = cli.json(&all).await;
    assert_eq!(points(&v).len(), 120);
    assert_eq!(points(&v)[119], json!([T0 + 119 * 60_000, 31.9]));
    assert_eq!(v["next"], Value::Null);

    // Dotted and percent-encoded metric names.
    let v = cli
        .json(&[
            "query",
            "raw",
            "m1",
            "engine.rpm",
            "--from",
            &from,
            "--to",
            &to,
        ])
        .await;
    assert_eq!(v["metric"], "engine.rpm");
    assert_eq!(points(&v).len(), 120);
    assert_eq!(points(&v)[0], json!([T0, 1000.0]));
    let v = cli
        .json(&[
            "query",
            "raw",
            "m1",
            "room 1/ä.hum%",
            "--from",
            &from,
            "--to",
            &to,
        ])
        .await;
    assert_eq!(points(&v).len(), 120, "{v}");
    // Relative times reach the server as typed: these readings are older
    // than a day, so the default range is empty.
    let v = cli
        .json(&["query", "raw", "m1", "temp", "--from", "-1h"])
        .await;
    assert_eq!(points(&v).len(), 0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_export_retention_and_stats() {
    let srv = two_devices().await;
    let cli = Cli::new(&srv);
    let (from, to) = (T0.to_string(), (T0 + 2 * HOUR).to_string());
    let range = ["--from", from.as_str(), "--to", to.as_str()];
    let with_range = |args: &[&str]| -> Vec<String> {
        args.iter().chain(&range).map(|a| a.to_string()).collect()
    };

    // One device, hourly.
    let args = with_range(&[
        "query",
        "agg",
        "temp",
        "--device",
        "m1",
        "--fn",
        "avg,count",
    ]);
    let out = cli.ok(&args).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let cols: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(cols, ["DEVICE", "BUCKET", "AVG", "COUNT"], "{out}");
    let first: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(first, ["m1", "2025-11-21T04:00:00.000Z", "22.95", "60"]);
    let second: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(second, ["m1", "2025-11-21T05:00:00.000Z", "28.95", "60"]);
    let v = cli.json(&args).await;
    let b = &v["series"][0]["buckets"];
    assert_eq!(v["series"][0]["device"], "m1");
    assert_eq!(b[0]["ts_ms"], json!(T0));
    assert_eq!(b[0]["count"], json!(60.0));
    assert!(
        (b[0]["avg"].as_f64().expect("avg") - 22.95).abs() < 1e-9,
        "{v}"
    );
    assert_eq!(b[1]["count"], json!(60.0));
    assert!(b[0].get("max").is_none(), "only the asked functions: {v}");

    // Two devices, repeated --device; then a comma list merged with --combine.
    let v = cli
        .json(&with_range(&[
            "query", "agg", "temp", "--device", "m1", "--device", "m2", "--fn", "count",
        ]))
        .await;
    let series = v["series"].as_array().expect("series");
    assert_eq!(series.len(), 2, "{v}");
    let v = cli
        .json(&with_range(&[
            "query",
            "agg",
            "temp",
            "--device",
            "m1,m2",
            "--combine",
            "--fn",
            "avg,count,min",
        ]))
        .await;
    let s = &v["series"][0];
    assert_eq!(s["device"], "*", "{v}");
    assert_eq!(s["buckets"][0]["count"], json!(120.0));
    assert_eq!(s["buckets"][0]["min"], json!(10.0));
    assert!((s["buckets"][0]["avg"].as_f64().expect("avg") - 16.475).abs() < 1e-9);
    assert_eq!(s["buckets"][1]["count"], json!(60.0));
    // All devices of the tenant, all functions, over a dotted metric.
    let out = cli
        .ok(&with_range(&[
            "query",
            "agg",
            "engine.rpm",
            "--bucket",
            "2h",
        ]))
        .await;
    let lines: Vec<&str> = out.lines().collect();
    let cols: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        cols,
        ["DEVICE", "BUCKET", "AVG", "MIN", "MAX", "SUM", "COUNT", "FIRST", "LAST"]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row,
        [
            "m1",
            "2025-11-21T04:00:00.000Z",
            "1059.5",
            "1000",
            "1119",
            "127140",
            "120",
            "1000",
            "1119"
        ],
        "{out}"
    );

    // Export: the whole range (more than one server page), to a file…
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("temp.csv");
    let file_s = file.to_str().expect("utf-8");
    let out = cli
        .ok(&with_range(&[
            "query", "export", "m1", "temp", "--out", file_s,
        ]))
        .await;
    assert!(out.contains("wrote 120 points"), "{out}");
    let csv = std::fs::read_to_string(&file).expect("CSV written");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 121, "{csv}");
    assert_eq!(lines[0], "ts_ms,time,value");
    assert_eq!(lines[1], format!("{T0},2025-11-21T04:00:00.000Z,20"));
    assert_eq!(
        lines[120],
        format!("{},2025-11-21T05:59:00.000Z,31.9", T0 + 119 * 60_000)
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("temp.csv")]);
    // …or to stdout, for a dotted metric.
    let out = cli
        .ok(&with_range(&["query", "export", "m1", "engine.rpm"]))
        .await;
    assert_eq!(out.lines().count(), 121, "{out}");
    assert!(out.starts_with("ts_ms,time,value\n"), "{out}");

    // Retention: set, then show (table and JSON), then clear. Rules long
    // enough that the readings above are kept.
    let out = cli
        .ok(&[
            "query",
            "retention",
            "set",
            "--rule",
            "tenant=default,metric=temp,days=3650",
            "--rule",
            "metric=engine.rpm,days=forever",
        ])
        .await;
    assert!(out.contains("3650 days"), "{out}");
    let out = cli.ok(&["query", "retention"]).await;
    assert!(out.starts_with("default: forever"), "{out}");
    let rule: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("default "))
        .expect("tenant rule")
        .split_whitespace()
        .collect();
    assert_eq!(rule, ["default", "temp", "3650", "days"], "{out}");
    let rule: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("* "))
        .expect("any-tenant rule")
        .split_whitespace()
        .collect();
    assert_eq!(rule, ["*", "engine.rpm", "forever"], "{out}");
    let v = cli.json(&["query", "retention", "show"]).await;
    assert_eq!(
        v["rules"],
        json!([
            {"tenant": "default", "metric": "temp", "days": 3650},
            {"tenant": null, "metric": "engine.rpm", "days": null},
        ])
    );
    let out = cli.ok(&["query", "retention", "set", "--clear"]).await;
    assert!(out.contains("no per-tenant or per-metric rules"), "{out}");
    assert_eq!(cli.json(&["query", "retention"]).await["rules"], json!([]));

    let out = cli.ok(&["query", "stats"]).await;
    let series = out
        .lines()
        .find(|l| l.starts_with("series "))
        .expect("series line");
    assert!(series.ends_with(" 4"), "{out}");
    assert!(out.contains("ingest.points"), "{out}");
    let v = cli.json(&["query", "stats"]).await;
    assert_eq!(v["ingest"]["points"], json!(120 * 3 + 60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_refused_before_any_request() {
    let srv = two_devices().await;
    let cli = Cli::new(&srv);
    let usage = |args: &'static [&'static str], needle: &'static str| {
        let cli = &cli;
        async move {
            let (code, out, err) = cli.run(args).await;
            assert_eq!(code, 2, "{args:?}: usage error expected: {err}{out}");
            assert!(
                err.contains(needle),
                "{args:?}: {err:?} should name {needle:?}"
            );
        }
    };
    usage(
        &["query", "raw", "m1", "temp", "--from", "yesterday"],
        "--from",
    )
    .await;
    usage(&["query", "export", "m1", "temp", "--to", "later"], "--to").await;
    usage(
        &["query", "raw", "m1", "temp", "--from", "-1h", "--to", "-2h"],
        "--from",
    )
    .await;
    usage(
        &["query", "agg", "temp", "--device", "m1", "--group", "g"],
        "give --device a,b for those devices, or --group G",
    )
    .await;
    usage(
        &[
            "query", "agg", "temp", "--device", "m1", "--tenant", "default",
        ],
        "drop --tenant",
    )
    .await;
    usage(&["query", "agg", "temp", "--bucket", "hourly"], "--bucket").await;
    usage(&["query", "agg", "temp", "--fn", "median"], "median").await;
    usage(&["query", "raw", "m1", "temp", "--limit", "0"], "--limit").await;
    usage(&["query", "retention", "set"], "--clear").await;
    usage(
        &["query", "retention", "set", "--rule", "metric=temp,days=0"],
        "days",
    )
    .await;
    // Refusals of the server come back with their detail.
    let (code, _, err) = cli.run(&["query", "latest", "ghost"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ghost") && err.contains("(404)"), "{err}");
    let (code, _, err) = cli
        .run(&["query", "raw", "m1", "temp", "--cursor", "nonsense"])
        .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cursor") && err.contains("(400)"), "{err}");
}
