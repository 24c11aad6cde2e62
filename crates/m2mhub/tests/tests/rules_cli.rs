//! `m2mhub rule …`, `alarm …` and `command …` against the real server (its
//! rule service running): a rule added through the binary raises an alarm
//! from an MQTT reading, the alarm is acknowledged and cleared, a refused
//! rule is shown with a caret under the fault, and a command is sent to a
//! device that answers while `command send --wait` waits.

use crate::common::*;
use mqtt_codec::{Packet, Publish, QoS};
use serde_json::Value;
use std::time::Duration;

const HOT_SQL: &str =
    "SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > 85";
const HOT_ACTIONS: &str = r#"[{"type":"alarm","alarm_type":"hot","severity":"major"}]"#;

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

    /// Run in a task of its own (the test goes on meanwhile).
    fn spawn(&self, args: &[&str]) -> tokio::task::JoinHandle<(i32, String, String)> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env = self.env.clone();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            run_bin(&args, &env).await
        })
    }

    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        self.spawn(args).await.expect("CLI task")
    }

    /// stdout of a command that must succeed.
    async fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args).await;
        assert_eq!(code, 0, "m2mhub {args:?}: {err}{out}");
        out
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.ok(&args).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// stderr of a command that must fail with `code`.
    async fn fails(&self, args: &[&str], code: i32) -> String {
        let (got, out, err) = self.run(args).await;
        assert_eq!(got, code, "m2mhub {args:?} should exit {code}: {err}{out}");
        err
    }
}

fn items(v: &Value) -> &Vec<Value> {
    v["items"].as_array().expect("items")
}

/// The value of `key` in `key  value` output.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .filter(|rest| rest.starts_with("  "))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {key:?} in:\n{out}"))
}

async fn send_reading(c: &mut Raw, pid: u16, temperature: f64) {
    let body = format!(r#"{{"temperature": {temperature}}}"#);
    let code = c
        .publish(publish("devices/m1/telemetry", QoS::AtLeastOnce, pid, body))
        .await;
    assert!(code < 0x80, "PUBACK reason 0x{code:02x}");
}

/// `stderr` shows `sql_line` with a caret under the column it names.
fn assert_caret(stderr: &str, line: u64, sql_line: &str) {
    let at = format!("line {line}, column ");
    let column: usize = stderr
        .split(&at)
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {at:?} in:\n{stderr}"));
    let lines: Vec<&str> = stderr.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(&format!("{line} | ")) && l.ends_with(sql_line))
        .unwrap_or_else(|| panic!("no SQL line {sql_line:?} in:\n{stderr}"));
    let caret = lines
        .get(i + 1)
        .unwrap_or_else(|| panic!("no caret in:\n{stderr}"));
    let start = lines[i].len() - sql_line.len();
    assert_eq!(
        caret.find('^'),
        Some(start + column - 1),
        "caret under column {column}:\n{stderr}"
    );
    assert_eq!(
        caret.split_whitespace().collect::<Vec<_>>(),
        ["|", "^"],
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_added_with_the_cli_raises_an_alarm_that_is_acked_and_cleared() {
    let srv = TestServer::start().await;
    add_default_device(&srv, "m1");
    let cli = Cli::new(&srv);

    let out = cli
        .ok(&[
            "rule",
            "add",
            "--id",
            "hot",
            "--name",
            "too hot",
            "--sql",
            HOT_SQL,
            "--actions",
            HOT_ACTIONS,
        ])
        .await;
    assert_eq!(field(&out, "id"), "hot", "{out}");
    assert_eq!(field(&out, "enabled"), "true", "{out}");
    assert_eq!(field(&out, "sql"), HOT_SQL, "{out}");
    assert!(
        field(&out, "actions").contains(r#""alarm_type":"hot""#),
        "{out}"
    );

    let out = cli.ok(&["rule", "list"]).await;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["ID", "NAME", "TENANT", "ENABLED", "FIRED", "FAILED", "SQL"],
        "{out}"
    );
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("hot  ") && row.contains("too hot"), "{out}");
    let v = cli.json(&["rule", "list"]).await;
    assert_eq!(items(&v).len(), 1, "{v}");
    assert_eq!(items(&v)[0]["actions"][0]["severity"], "major");

    // Cool readings until the rule service sees the topic (its subscription
    // follows rule changes asynchronously), then one hot reading.
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("m1")).await;
    let mut pid = 1;
    within("the rule to receive readings", async {
        loop {
            send_reading(&mut c, pid, 20.0).await;
            pid += 1;
            let v = cli.json(&["rule", "show", "hot"]).await;
            if v["counters"]["received"].as_u64().unwrap_or(0) > 0 {
                assert_eq!(v["counters"]["fired"], 0, "{v}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    send_reading(&mut c, pid, 90.0).await;
    let alarm = within("the alarm", async {
        loop {
            let v = cli
                .json(&["alarm", "list", "--status", "active", "--device", "m1"])
                .await;
            if let Some(a) = items(&v).first() {
                return a.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(alarm["type"], "hot");
    assert_eq!(alarm["severity"], "major");
    assert_eq!(alarm["rule_id"], "hot");
    assert_eq!(alarm["acked"], false);
    let id = alarm["id"].as_u64().expect("alarm id").to_string();

    let out = cli.ok(&["alarm", "list"]).await;
    let cols: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        cols[..7],
        [id.as_str(), "m1", "hot", "major", "active", "false", "1"],
        "{out}"
    );
    let out = cli.ok(&["alarm", "show", &id]).await;
    assert_eq!(field(&out, "status"), "active", "{out}");
    assert_eq!(field(&out, "acknowledged"), "no", "{out}");
    assert!(field(&out, "details").contains("90"), "{out}");
    let v = cli.json(&["rule", "show", "hot"]).await;
    assert!(v["counters"]["fired"].as_u64() >= Some(1), "{v}");
    let out = cli.ok(&["rule", "show", "hot"]).await;
    assert!(out.contains("counters"), "{out}");
    assert_eq!(field(&out, "  fired"), "1", "{out}");

    let out = cli.ok(&["alarm", "summary"]).await;
    assert_eq!(field(&out, "major"), "1", "{out}");
    assert_eq!(field(&out, "unacknowledged"), "1", "{out}");

    let out = cli.ok(&["alarm", "ack", &id]).await;
    assert!(
        out.starts_with(&format!("acknowledged alarm {id} (hot on m1)")),
        "{out}"
    );
    let v = cli.json(&["alarm", "show", &id]).await;
    assert_eq!(
        (&v["acked"], &v["status"]),
        (&Value::Bool(true), &"active".into()),
        "{v}"
    );
    let v = cli.json(&["alarm", "summary"]).await;
    assert_eq!((&v["total"], &v["unacked"]), (&1.into(), &0.into()), "{v}");

    let v = cli.json(&["alarm", "clear", &id]).await;
    assert_eq!(v["status"], "cleared");
    assert_eq!(v["cleared_by"], "operator:admin");
    let v = cli.json(&["alarm", "list", "--status", "active"]).await;
    assert!(items(&v).is_empty(), "{v}");
    let v = cli
        .json(&["alarm", "list", "--status", "cleared", "--type", "hot"])
        .await;
    assert_eq!(items(&v).len(), 1, "{v}");
    let v = cli.json(&["alarm", "summary"]).await;
    assert_eq!(v["total"], 0, "{v}");
    // Clearing twice is the server's refusal, with its detail.
    let err = cli.fails(&["alarm", "clear", &id], 1).await;
    assert!(
        err.starts_with("m2mhub: ") && err.contains("(409)"),
        "{err}"
    );

    // Disable, enable, change, delete.
    assert_eq!(
        cli.ok(&["rule", "disable", "hot"]).await.trim(),
        "disabled rule hot"
    );
    assert_eq!(cli.json(&["rule", "show", "hot"]).await["enabled"], false);
    assert_eq!(
        cli.ok(&["rule", "enable", "hot"]).await.trim(),
        "enabled rule hot"
    );
    let v = cli
        .json(&[
            "rule",
            "set",
            "hot",
            "--description",
            "kiln over 85 °C",
            "--actions",
            "[]",
        ])
        .await;
    assert_eq!(
        (&v["enabled"], &v["description"]),
        (&Value::Bool(true), &"kiln over 85 °C".into())
    );
    assert_eq!(v["actions"], serde_json::json!([]));
    assert_eq!(v["sql"], HOT_SQL, "the SQL stays");
    assert_eq!(
        cli.ok(&["rule", "delete", "hot"]).await.trim(),
        "deleted rule hot"
    );
    let err = cli.fails(&["rule", "show", "hot"], 1).await;
    assert!(err.contains("no rule \"hot\" (404)"), "{err}");
    assert!(items(&cli.json(&["rule", "list"]).await).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rule_shows_where_and_bad_flags_are_usage_errors() {
    let srv = TestServer::start().await;
    let cli = Cli::new(&srv);

    let sql = "SELECT frobnicate(x) FROM 'a'";
    let err = cli
        .fails(&["rule", "add", "--name", "bad", "--sql", sql], 1)
        .await;
    assert!(
        err.starts_with("m2mhub: the server refused the rule: "),
        "{err}"
    );
    assert!(err.contains("(422)"), "{err}");
    assert_caret(&err, 1, sql);

    // From a file: the line of the fault, not the first.
    let file = srv.dir.path().join("rule.sql");
    std::fs::write(
        &file,
        "SELECT device,\n       temperature\nFROM 'devices/+/telemetry'\nWHERE frobnicate(temperature) > 85\n",
    )
    .expect("write rule");
    let file = file.display().to_string();
    let err = cli
        .fails(&["rule", "add", "--name", "bad", "--sql-file", &file], 1)
        .await;
    assert_caret(&err, 4, "WHERE frobnicate(temperature) > 85");
    // Bad actions have no position: the detail alone.
    let err = cli
        .fails(
            &[
                "rule",
                "add",
                "--name",
                "bad",
                "--sql",
                HOT_SQL,
                "--actions",
                r#"[{"type":"teleport"}]"#,
            ],
            1,
        )
        .await;
    assert!(
        err.contains("action 0") && err.contains("(422)") && !err.contains('^'),
        "{err}"
    );
    // `rule set` shows the SQL it sent.
    cli.ok(&[
        "rule",
        "add",
        "--id",
        "ok",
        "--name",
        "ok",
        "--sql",
        HOT_SQL,
        "--disabled",
    ])
    .await;
    let err = cli.fails(&["rule", "set", "ok", "--sql", sql], 1).await;
    assert_caret(&err, 1, sql);
    let v = cli.json(&["rule", "show", "ok"]).await;
    assert_eq!(
        (&v["sql"], &v["enabled"]),
        (&HOT_SQL.into(), &Value::Bool(false)),
        "unchanged"
    );

    // Refused before any request, naming the flag (exit code 2).
    for (args, flag) in [
        (vec!["rule", "add", "--name", "x"], "--sql"),
        (
            vec![
                "rule",
                "add",
                "--name",
                "x",
                "--sql",
                HOT_SQL,
                "--actions",
                "{nope",
            ],
            "--actions",
        ),
        (
            vec![
                "rule",
                "add",
                "--name",
                "x",
                "--sql",
                HOT_SQL,
                "--actions",
                r#"{"type":"log"}"#,
            ],
            "--actions",
        ),
        (
            vec![
                "rule",
                "add",
                "--name",
                "x",
                "--sql",
                HOT_SQL,
                "--sql-file",
                "f",
            ],
            "--sql-file",
        ),
        (
            vec![
                "rule",
                "add",
                "--name",
                "x",
                "--sql-file",
                "/nonexistent/rule.sql",
            ],
            "--sql-file",
        ),
        (vec!["rule", "set", "ok"], "--sql"),
        (vec!["alarm", "list", "--status", "open"], "--status"),
        (vec!["alarm", "list", "--severity", "bad"], "--severity"),
        (vec!["alarm", "list", "--limit", "0"], "--limit"),
        (vec!["alarm", "ack", "first"], "ID"),
        (
            vec!["command", "send", "m1", "reboot", "--params", "{delay"],
            "--params",
        ),
        (
            vec!["command", "send", "m1", "reboot", "--timeout-secs", "0"],
            "--timeout-secs",
        ),
    ] {
        let err = cli.fails(&args, 2).await;
        assert!(err.contains(flag), "{args:?}: {flag} not named in {err}");
    }
}

/// The next command the device receives (acknowledged), and its JSON body.
async fn receive_command(c: &mut Raw) -> (Publish, Value) {
    let p = c
        .recv_where("a command", |p| match p {
            Packet::Publish(p) if p.topic == "devices/m1/commands" => Some(p.clone()),
            _ => None,
        })
        .await;
    if let Some(pid) = p.packet_id {
        c.puback(pid).await;
    }
    let body: Value = serde_json::from_slice(&p.payload).expect("JSON command");
    (p, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_sent_listed_and_awaited() {
    let srv = TestServer::start().await;
    add_default_device(&srv, "m1");
    let cli = Cli::new(&srv);

    // Nobody listening: recorded and sent, not answered.
    let v = cli
        .json(&[
            "command",
            "send",
            "m1",
            "reboot",
            "--params",
            r#"{"delay":1}"#,
        ])
        .await;
    let reboot = v["id"].as_str().expect("command id").to_string();
    assert_eq!(
        (&v["name"], &v["params"]["delay"]),
        (&"reboot".into(), &1.into()),
        "{v}"
    );
    let out = cli.ok(&["command", "list", "m1"]).await;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["ID", "NAME", "STATUS", "SENT", "ORIGIN"], "{out}");
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row[..2], [reboot.as_str(), "reboot"], "{out}");
    assert_eq!(row[4], "operator:admin", "{out}");
    let out = cli.ok(&["command", "show", &reboot]).await;
    assert_eq!(field(&out, "params"), r#"{"delay":1}"#, "{out}");
    assert_eq!(field(&out, "timeout"), "30 s", "{out}");

    // A device that answers with MQTT 5 correlation data.
    let (mut c, _) = Raw::connect_ok(srv.mqtt(), v5("m1")).await;
    c.subscribe(1, "devices/m1/commands", QoS::AtLeastOnce)
        .await;
    let waiting = cli.spawn(&[
        "command",
        "send",
        "m1",
        "ping",
        "--params",
        r#"{"n":7}"#,
        "--timeout-secs",
        "5",
        "--wait",
        "--json",
    ]);
    let (cmd, body) = within("the ping command", receive_command(&mut c)).await;
    assert_eq!(
        (&body["name"], &body["params"]["n"]),
        (&"ping".into(), &7.into()),
        "{body}"
    );
    let mut answer = publish(
        "devices/m1/commands/response",
        QoS::AtLeastOnce,
        2,
        r#"{"pong":7}"#,
    );
    answer.properties.correlation_data = cmd.properties.correlation_data.clone();
    assert!(c.publish(answer).await < 0x80);
    let (code, out, err) = within("command send --wait", waiting)
        .await
        .expect("CLI task");
    assert_eq!(code, 0, "{err}{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["status"], "answered", "{v}");
    assert_eq!(v["response"]["pong"], 7, "{v}");

    // An MQTT 3.1.1-style answer: the id in the body; the table shows it.
    let waiting = cli.spawn(&[
        "command",
        "send",
        "m1",
        "status",
        "--timeout-secs",
        "5",
        "--wait",
    ]);
    let (_, body) = within("the status command", receive_command(&mut c)).await;
    let id = body["id"].as_str().expect("id in the body").to_string();
    let answer = format!(r#"{{"id": "{id}", "uptime": 42}}"#);
    assert!(
        c.publish(publish(
            "devices/m1/commands/response",
            QoS::AtLeastOnce,
            3,
            answer
        ))
        .await
            < 0x80
    );
    let (code, out, err) = within("command send --wait", waiting)
        .await
        .expect("CLI task");
    assert_eq!(code, 0, "{err}{out}");
    assert_eq!(field(&out, "id"), id, "{out}");
    assert_eq!(field(&out, "status"), "answered", "{out}");
    assert!(field(&out, "response").contains(r#""uptime":42"#), "{out}");

    // A device that reports failure: printed, and exit code 1.
    let waiting = cli.spawn(&["command", "send", "m1", "explode", "--wait"]);
    let (_, body) = within("the explode command", receive_command(&mut c)).await;
    let answer = format!(
        r#"{{"id": "{}", "status": "failed"}}"#,
        body["id"].as_str().unwrap_or_default()
    );
    c.publish(publish(
        "devices/m1/commands/response",
        QoS::AtLeastOnce,
        4,
        answer,
    ))
    .await;
    let (code, out, _) = within("command send --wait", waiting)
        .await
        .expect("CLI task");
    assert_eq!(code, 1, "{out}");
    assert_eq!(field(&out, "status"), "failed", "{out}");

    // Silence: the command times out, and so does the wait.
    let (code, out, _) = cli
        .run(&[
            "command",
            "send",
            "m1",
            "hello",
            "--timeout-secs",
            "1",
            "--wait",
        ])
        .await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(field(&out, "status"), "timed_out", "{out}");

    let v = cli.json(&["command", "list", "m1"]).await;
    let names: Vec<&str> = items(&v)
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["hello", "explode", "status", "ping", "reboot"],
        "newest first"
    );
    let v = cli.json(&["command", "list", "m1", "--limit", "2"]).await;
    assert_eq!(items(&v).len(), 2);
    let next = v["next"].as_str().expect("next page").to_string();
    let out = cli.ok(&["command", "list", "m1", "--limit", "2"]).await;
    assert_eq!(
        out.lines().last(),
        Some(format!("(more: --before {next})").as_str()),
        "{out}"
    );
    let v = cli
        .json(&["command", "list", "m1", "--before", &next])
        .await;
    assert_eq!(items(&v).len(), 3, "{v}");
}
