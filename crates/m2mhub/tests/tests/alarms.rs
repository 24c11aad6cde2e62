//! Alarms, device commands and rule definitions over HTTP, against the real
//! server: listing with filters and paging, acknowledge and clear, roles,
//! tenant isolation, audit, persistence, the OpenAPI document, and the seam
//! to the rules engine (`RuleService`) with a stand-in service.

use crate::common::*;
use m2mhub_api::{AppState, RuleProblem, RuleService};
use m2mhub_fleet::{CommandStatus, CommandUpdate, Fleet, NewCommand, Severity};
use m2mhub_identity::{NewDevice, Role};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

fn items(v: &Value) -> &Vec<Value> {
    v["items"].as_array().expect("items")
}

/// Tenants `acme` (device `d1`) and `beta` (device `b1`).
async fn two_tenants(srv: &TestServer, admin: &Api) {
    for t in ["acme", "beta"] {
        admin
            .expect("POST", "/tenants", Some(json!({"id": t})), 201)
            .await;
    }
    for (id, tenant) in [("d1", "acme"), ("b1", "beta")] {
        srv.get()
            .registry
            .create_device(NewDevice {
                id: Some(id.into()),
                tenant: tenant.into(),
                ..Default::default()
            })
            .expect("device");
    }
}

/// How many audit records of `action` there are, and their targets.
async fn audited(admin: &Api, action: &str) -> Vec<String> {
    let a = admin
        .expect(
            "GET",
            &format!("/audit?action={action}&limit=1000"),
            None,
            200,
        )
        .await;
    items(&a)
        .iter()
        .map(|r| r["target"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_are_listed_acknowledged_and_cleared_within_the_tenant() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    two_tenants(&srv, &admin).await;
    let viewer = Api::user(&srv, "acme-viewer", Role::Viewer, "acme");
    let op = Api::user(&srv, "acme-op", Role::Operator, "acme");
    let fleet = &srv.get().fleet;
    let raise = |tenant: &str, device: &str, t: &str, sev: Severity| {
        fleet
            .raise_alarm(
                tenant,
                device,
                t,
                sev,
                json!({"temperature": 91.5}),
                Some("hot"),
            )
            .expect("raise")
            .0
    };
    let hot = raise("acme", "d1", "overheating", Severity::Major);
    let hot2 = raise("acme", "d1", "overheating", Severity::Critical);
    assert_eq!((hot2.id, hot2.count), (hot.id, 2), "de-duplicated");
    let vib = raise("acme", "d1", "vibration", Severity::Minor);
    let door = raise("beta", "b1", "door", Severity::Warning);

    // Listing: the tenant's own, newest first, filtered, paged.
    let all = viewer.expect("GET", "/alarms", None, 200).await;
    let ids: Vec<u64> = items(&all)
        .iter()
        .filter_map(|a| a["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![vib.id, hot.id]);
    let first = &items(&all)[1];
    assert_eq!(first["type"], "overheating");
    assert_eq!(first["severity"], "critical");
    assert_eq!(first["status"], "active");
    assert_eq!(first["count"], 2);
    assert_eq!(first["rule_id"], "hot");
    assert_eq!(first["details"]["temperature"], 91.5);
    for (query, n) in [
        ("?severity=critical", 1),
        ("?type=vibration", 1),
        ("?status=active", 2),
        ("?status=cleared", 0),
        ("?device=d1", 2),
        ("?device=b1", 0),
    ] {
        let v = viewer
            .expect("GET", &format!("/alarms{query}"), None, 200)
            .await;
        assert_eq!(items(&v).len(), n, "{query}: {v}");
    }
    let p1 = viewer.expect("GET", "/alarms?limit=1", None, 200).await;
    assert_eq!(p1["next"], vib.id);
    let p2 = viewer
        .expect(
            "GET",
            &format!("/alarms?limit=1&before={}", vib.id),
            None,
            200,
        )
        .await;
    assert_eq!(items(&p2)[0]["id"], hot.id);
    assert_eq!(
        admin.expect("GET", "/alarms?tenant=beta", None, 200).await["items"][0]["id"],
        door.id
    );
    assert_problem(
        &viewer.call("GET", "/alarms?tenant=beta", None).await,
        404,
        "beta",
    );
    assert_problem(
        &viewer.call("GET", "/alarms?severity=urgent", None).await,
        400,
        "severity",
    );
    assert_problem(
        &viewer.call("GET", "/alarms?limit=0", None).await,
        400,
        "limit",
    );
    assert_eq!(
        viewer.call("GET", "/alarms?colour=red", None).await.status,
        400
    );

    // The overview.
    let s = viewer.expect("GET", "/alarms/summary", None, 200).await;
    assert_eq!(
        (
            s["tenant"].as_str(),
            s["critical"].as_u64(),
            s["minor"].as_u64(),
            s["total"].as_u64()
        ),
        (Some("acme"), Some(1), Some(1), Some(2))
    );
    assert_eq!(
        admin.expect("GET", "/alarms/summary", None, 200).await["total"],
        3
    );
    assert_eq!(
        admin
            .expect("GET", "/alarms/summary?tenant=beta", None, 200)
            .await["warning"],
        1
    );
    assert_eq!(
        admin
            .call("GET", "/alarms/summary?tenant=nope", None)
            .await
            .status,
        404
    );

    // One alarm; another tenant's is not there.
    let one = viewer
        .expect("GET", &format!("/alarms/{}", hot.id), None, 200)
        .await;
    assert_eq!(one["device_id"], "d1");
    assert_problem(
        &viewer
            .call("GET", &format!("/alarms/{}", door.id), None)
            .await,
        404,
        "alarm",
    );
    assert_problem(&viewer.call("GET", "/alarms/abc", None).await, 404, "alarm");

    // Acknowledge: operators only, within their tenant; the alarm stays active.
    assert_problem(
        &viewer
            .call("POST", &format!("/alarms/{}/ack", hot.id), None)
            .await,
        403,
        "operator",
    );
    assert_eq!(
        op.call("POST", &format!("/alarms/{}/ack", door.id), None)
            .await
            .status,
        404
    );
    let acked = op
        .expect("POST", &format!("/alarms/{}/ack", hot.id), None, 200)
        .await;
    assert_eq!(
        (acked["acked"].as_bool(), acked["acked_by"].as_str()),
        (Some(true), Some("acme-op"))
    );
    assert_eq!(acked["status"], "active");
    assert_eq!(
        viewer.expect("GET", "/alarms/summary", None, 200).await["unacked"],
        1
    );

    // Clear: history; a new raise is a new alarm.
    assert_eq!(
        viewer
            .call("POST", &format!("/alarms/{}/clear", hot.id), None)
            .await
            .status,
        403
    );
    assert_eq!(
        op.call("POST", &format!("/alarms/{}/clear", door.id), None)
            .await
            .status,
        404
    );
    let cleared = op
        .expect("POST", &format!("/alarms/{}/clear", hot.id), None, 200)
        .await;
    assert_eq!(cleared["status"], "cleared");
    assert_eq!(cleared["cleared_by"], "operator:acme-op");
    assert_problem(
        &op.call("POST", &format!("/alarms/{}/clear", hot.id), None)
            .await,
        409,
        "already cleared",
    );
    assert!(fleet.active_alarm("acme", "d1", "overheating").is_none());
    let again = raise("acme", "d1", "overheating", Severity::Major);
    assert!(again.id > door.id && again.count == 1);
    let history = viewer
        .expect("GET", "/alarms?status=cleared", None, 200)
        .await;
    assert_eq!(items(&history).len(), 1);
    assert_eq!(items(&history)[0]["acked_by"], "acme-op");

    // Every operator action is audited.
    assert_eq!(audited(&admin, "alarm.ack").await, vec![hot.id.to_string()]);
    assert_eq!(
        audited(&admin, "alarm.clear").await,
        vec![hot.id.to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_crud_enable_disable_audit_and_restart() {
    let mut srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    two_tenants(&srv, &admin).await;
    let viewer = Api::user(&srv, "acme-viewer", Role::Viewer, "acme");
    let op = Api::user(&srv, "acme-op", Role::Operator, "acme");
    let beta = Api::user(&srv, "beta-op", Role::Operator, "beta");
    let sql = "SELECT avg(temperature) FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s) HAVING avg(temperature) > 85";
    let actions = json!([{"type": "alarm", "alarm_type": "overheating", "severity": "critical"}]);

    let hot = op
        .expect(
            "POST",
            "/rules",
            Some(json!({"id": "hot", "name": "Hot machines", "sql": sql, "actions": actions, "description": "seeds"})),
            201,
        )
        .await;
    assert_eq!(
        (
            hot["tenant"].as_str(),
            hot["enabled"].as_bool(),
            hot["name"].as_str()
        ),
        (Some("acme"), Some(true), Some("Hot machines"))
    );
    assert_eq!(
        hot["counters"]["received"], 0,
        "the rule service runs it: {hot}"
    );
    let gen = op
        .expect(
            "POST",
            "/rules",
            Some(json!({"sql": "SELECT * FROM 'x'"})),
            201,
        )
        .await;
    let gen_id = gen["id"].as_str().expect("generated id").to_string();
    assert!(gen_id.starts_with("rule-"));
    assert_eq!(gen["actions"], json!([]));
    assert_eq!(gen["name"], gen_id.as_str());

    assert_eq!(
        op.call("POST", "/rules", Some(json!({"id": "hot", "sql": sql})))
            .await
            .status,
        409
    );
    assert_problem(
        &op.call(
            "POST",
            "/rules",
            Some(json!({"sql": sql, "actions": {"alarm": {}}})),
        )
        .await,
        422,
        "array",
    );
    // The rule service refuses bad SQL with its position, and bad actions.
    let r = op
        .call(
            "POST",
            "/rules",
            Some(json!({"sql": "SELECT frobnicate(x) FROM 'devices/+/telemetry'"})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (v["line"].as_u64(), v["column"].as_u64()),
        (Some(1), Some(8)),
        "{v}"
    );
    assert!(
        v["detail"].as_str().unwrap_or("").contains("frobnicate"),
        "{v}"
    );
    let r = op
        .call(
            "POST",
            "/rules",
            Some(json!({"sql": sql, "actions": [{"type": "page"}]})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("action 0"), "{}", r.body);
    assert_eq!(
        op.call("POST", "/rules", Some(json!({"sql": sql, "when": 1})))
            .await
            .status,
        400
    );
    assert_eq!(
        viewer
            .call("POST", "/rules", Some(json!({"sql": sql})))
            .await
            .status,
        403
    );
    assert_eq!(
        op.call(
            "POST",
            "/rules",
            Some(json!({"sql": sql, "tenant": "beta"}))
        )
        .await
        .status,
        404
    );

    // Reading, within the tenant.
    assert_eq!(
        items(&viewer.expect("GET", "/rules", None, 200).await).len(),
        2
    );
    assert_eq!(
        items(&admin.expect("GET", "/rules?tenant=beta", None, 200).await).len(),
        0
    );
    assert_eq!(
        items(&admin.expect("GET", "/rules", None, 200).await).len(),
        2
    );
    assert_eq!(
        viewer.expect("GET", "/rules/hot", None, 200).await["sql"],
        sql
    );
    assert_problem(&beta.call("GET", "/rules/hot", None).await, 404, "hot");
    for (m, p) in [
        ("PUT", "/rules/hot"),
        ("DELETE", "/rules/hot"),
        ("POST", "/rules/hot/disable"),
    ] {
        let body = (m == "PUT").then(|| json!({"name": "x"}));
        assert_eq!(beta.call(m, p, body).await.status, 404, "{m} {p}");
    }

    // Changing: absent fields stay.
    let u = op
        .expect(
            "PUT",
            "/rules/hot",
            Some(json!({"sql": "SELECT * FROM 'y'"})),
            200,
        )
        .await;
    assert_eq!(
        (u["sql"].as_str(), u["name"].as_str()),
        (Some("SELECT * FROM 'y'"), Some("Hot machines"))
    );
    assert_eq!(u["actions"], actions);
    assert_eq!(
        op.call("PUT", "/rules/hot", Some(json!({"sql": ""})))
            .await
            .status,
        422
    );
    let off = op.expect("POST", "/rules/hot/disable", None, 200).await;
    assert_eq!(off["enabled"], false);
    assert_eq!(
        viewer.call("POST", "/rules/hot/enable", None).await.status,
        403
    );
    let on = op.expect("POST", "/rules/hot/enable", None, 200).await;
    assert_eq!(on["enabled"], true);
    op.expect("POST", "/rules/hot/disable", None, 200).await;
    op.expect("DELETE", &format!("/rules/{gen_id}"), None, 204)
        .await;
    assert_eq!(
        op.call("GET", &format!("/rules/{gen_id}"), None)
            .await
            .status,
        404
    );

    for (action, targets) in [
        ("rule.create", vec![gen_id.clone(), "hot".to_string()]),
        ("rule.update", vec!["hot".to_string()]),
        ("rule.enable", vec!["hot".to_string()]),
        ("rule.disable", vec!["hot".to_string(), "hot".to_string()]),
        ("rule.delete", vec![gen_id.clone()]),
    ] {
        let mut got = audited(&admin, action).await;
        got.sort();
        let mut want = targets;
        want.sort();
        assert_eq!(got, want, "{action}");
    }

    // A rule survives a restart, as it was.
    srv.restart().await;
    let viewer = Api {
        addr: srv.http(),
        token: viewer.token,
    };
    let r = viewer.expect("GET", "/rules/hot", None, 200).await;
    assert_eq!(
        (r["enabled"].as_bool(), r["sql"].as_str()),
        (Some(false), Some("SELECT * FROM 'y'"))
    );
    assert_eq!(
        items(&viewer.expect("GET", "/rules", None, 200).await).len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_recorded_sent_and_listed() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    two_tenants(&srv, &admin).await;
    let viewer = Api::user(&srv, "acme-viewer", Role::Viewer, "acme");
    let op = Api::user(&srv, "acme-op", Role::Operator, "acme");
    let beta = Api::user(&srv, "beta-op", Role::Operator, "beta");

    let c = op
        .expect(
            "POST",
            "/devices/d1/commands",
            Some(json!({"name": "shutdown", "params": {"delay_s": 5}, "timeout_secs": 10})),
            202,
        )
        .await;
    let id = c["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("cmd-"), "{id}");
    // Published by the rule service right after it is recorded; nobody
    // listens on d1's command topic, so it stays `sent` (until it times out).
    assert!(
        matches!(c["status"].as_str(), Some("pending" | "sent")),
        "{c}"
    );
    assert_eq!(
        (
            c["origin"].as_str(),
            c["timeout_ms"].as_u64(),
            c["tenant"].as_str()
        ),
        (Some("operator:acme-op"), Some(10_000), Some("acme"))
    );
    assert_eq!(c["params"]["delay_s"], 5);
    // Newest first is by creation time (then id): two commands created in
    // the same millisecond have no order an operator could tell apart.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let c2 = op
        .expect(
            "POST",
            "/devices/d1/commands",
            Some(json!({"name": "reboot"})),
            202,
        )
        .await;
    assert_eq!(c2["timeout_ms"], 30_000, "the default timeout");
    assert!(c2["params"].is_null());

    assert_problem(
        &op.call(
            "POST",
            "/devices/d1/commands",
            Some(json!({"name": "shut down"})),
        )
        .await,
        422,
        "command name",
    );
    assert_problem(
        &op.call(
            "POST",
            "/devices/d1/commands",
            Some(json!({"name": "x", "timeout_secs": 0})),
        )
        .await,
        422,
        "timeout",
    );
    assert_eq!(
        op.call("POST", "/devices/d1/commands", Some(json!({})))
            .await
            .status,
        400
    );
    assert_eq!(
        viewer
            .call("POST", "/devices/d1/commands", Some(json!({"name": "x"})))
            .await
            .status,
        403
    );
    assert_eq!(
        beta.call("POST", "/devices/d1/commands", Some(json!({"name": "x"})))
            .await
            .status,
        404
    );
    assert_eq!(
        op.call("POST", "/devices/nope/commands", Some(json!({"name": "x"})))
            .await
            .status,
        404
    );

    // Listing: newest first, paged; another tenant sees nothing.
    let list = viewer
        .expect("GET", "/devices/d1/commands", None, 200)
        .await;
    let ids: Vec<&str> = items(&list)
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, vec![c2["id"].as_str().expect("id"), id.as_str()]);
    let p1 = viewer
        .expect("GET", "/devices/d1/commands?limit=1", None, 200)
        .await;
    assert_eq!(p1["next"], c2["id"]);
    let p2 = viewer
        .expect(
            "GET",
            &format!(
                "/devices/d1/commands?limit=1&before={}",
                c2["id"].as_str().unwrap_or_default()
            ),
            None,
            200,
        )
        .await;
    assert_eq!(items(&p2)[0]["id"], id.as_str());
    assert_eq!(
        beta.call("GET", "/devices/d1/commands", None).await.status,
        404
    );

    // One command; its status follows the registry.
    assert_eq!(
        viewer
            .expect("GET", &format!("/commands/{id}"), None, 200)
            .await["name"],
        "shutdown"
    );
    assert_problem(
        &beta.call("GET", &format!("/commands/{id}"), None).await,
        404,
        &id,
    );
    assert_eq!(
        viewer.call("GET", "/commands/cmd-nope", None).await.status,
        404
    );
    srv.get()
        .fleet
        .update_command(
            &id,
            CommandUpdate {
                status: CommandStatus::Answered,
                response: Some(json!({"ok": true})),
                error: None,
            },
        )
        .expect("update")
        .expect("applied");
    let answered = viewer
        .expect("GET", &format!("/commands/{id}"), None, 200)
        .await;
    assert_eq!(
        (
            answered["status"].as_str(),
            answered["response"]["ok"].as_bool()
        ),
        (Some("answered"), Some(true))
    );

    let mut targets = audited(&admin, "command.send").await;
    targets.dedup();
    assert_eq!(targets, vec!["d1".to_string()]);
    assert_eq!(audited(&admin, "command.send").await.len(), 2);

    // The new routes are in the OpenAPI document.
    let doc = admin.expect("GET", "/openapi.json", None, 200).await;
    for (path, methods) in [
        ("/alarms", &["get"][..]),
        ("/alarms/summary", &["get"]),
        ("/alarms/{id}", &["get"]),
        ("/alarms/{id}/ack", &["post"]),
        ("/alarms/{id}/clear", &["post"]),
        ("/devices/{id}/commands", &["get", "post"]),
        ("/commands/{id}", &["get"]),
        ("/rules", &["get", "post"]),
        ("/rules/{id}", &["get", "put", "delete"]),
        ("/rules/{id}/enable", &["post"]),
        ("/rules/{id}/disable", &["post"]),
    ] {
        for m in methods {
            assert!(doc["paths"][path][m].is_object(), "{m} {path} documented");
        }
    }
}

/// A stand-in for the rules engine: refuses SQL containing `BROKEN`,
/// records reloads, reports fixed counters, and "sends" commands by
/// recording them and marking them sent.
struct FakeRules {
    fleet: Fleet,
    reloads: Mutex<Vec<String>>,
}

impl RuleService for FakeRules {
    fn validate(&self, _tenant: &str, sql: &str, actions: &Value) -> Result<(), RuleProblem> {
        if let Some(at) = sql.find("BROKEN") {
            return Err(RuleProblem {
                message: "unexpected identifier BROKEN".into(),
                line: Some(1),
                column: Some(at as u64 + 1),
            });
        }
        if actions
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "nope"))
        {
            return Err(RuleProblem {
                message: "unknown action".into(),
                line: None,
                column: None,
            });
        }
        Ok(())
    }

    fn reload(&self, rule_id: &str) {
        self.reloads.lock().expect("lock").push(rule_id.to_string());
    }

    fn counters(&self, _rule_id: &str) -> Option<Value> {
        Some(json!({"matched": 3, "fired": 1, "failed": 0}))
    }

    fn send_command(
        &self,
        tenant: &str,
        device: &str,
        name: &str,
        params: Value,
        timeout_ms: u64,
        origin: &str,
    ) -> Result<String, String> {
        if name == "refuse" {
            return Err("device d1 is offline".into());
        }
        let c = self
            .fleet
            .create_command(NewCommand {
                tenant: tenant.into(),
                device_id: device.into(),
                name: name.into(),
                params,
                origin: origin.into(),
                timeout_ms,
            })
            .map_err(|e| e.to_string())?;
        self.fleet
            .update_command(&c.id, CommandUpdate::status(CommandStatus::Sent))
            .map_err(|e| e.to_string())?;
        Ok(c.id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rule_service_validates_reloads_reports_counters_and_sends() {
    let srv = TestServer::start().await;
    let admin = Api::admin(&srv);
    two_tenants(&srv, &admin).await;
    let op_token = Api::user(&srv, "acme-op", Role::Operator, "acme").token;

    // A second HTTP front on the same server, with the stand-in service.
    let s = srv.get();
    let rules = Arc::new(FakeRules {
        fleet: s.fleet.clone(),
        reloads: Mutex::new(Vec::new()),
    });
    let key = m2mhub_pki::MasterKey::generate().expect("master key");
    let (ca, _) =
        m2mhub_pki::DeviceCa::load_or_create(&srv.dir.path().join("ca2"), &key).expect("device CA");
    let state = AppState {
        cluster: None,
        broker: s.broker.clone(),
        registry: s.registry.clone(),
        fleet: s.fleet.clone(),
        ca: Arc::new(ca),
        psk_keys: m2mhub_pki::PskKeys::new(key),
        cert_days: 1,
        auth_stats: None,
        tsdb: s.tsdb.clone(),
        ingest: None,
        rules: Some(rules.clone()),
        live: Default::default(),
        ota: None,
        pipeline: None,
        command_waiters: None,
        http: Default::default(),
        login: Default::default(),
        console: Default::default(),
        broker_history: Default::default(),
        reports: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(m2mhub_api::serve(listener, state, async {
        let _ = stopped.await;
    }));
    let op = Api {
        addr,
        token: op_token,
    };
    let reloads = || rules.reloads.lock().expect("lock").clone();

    // Refused with the position of the fault; nothing stored or reloaded.
    let r = op
        .call(
            "POST",
            "/rules",
            Some(json!({"id": "hot", "sql": "SELECT BROKEN FROM 'x'"})),
        )
        .await;
    assert_problem(&r, 422, "BROKEN");
    let p = r.json();
    assert_eq!(
        (p["type"].as_str(), p["line"].as_u64(), p["column"].as_u64()),
        (Some("/problems/invalid-rule"), Some(1), Some(8))
    );
    let r = op
        .call(
            "POST",
            "/rules",
            Some(json!({"sql": "SELECT 1 FROM 'x'", "actions": ["nope"]})),
        )
        .await;
    assert_problem(&r, 422, "unknown action");
    assert!(r.json().get("line").is_none(), "no position when unknown");
    assert_eq!(op.call("GET", "/rules/hot", None).await.status, 404);
    assert!(reloads().is_empty());

    // Accepted: stored, reloaded, with the engine's counters.
    let hot = op
        .expect(
            "POST",
            "/rules",
            Some(json!({"id": "hot", "sql": "SELECT 1 FROM 'x'"})),
            201,
        )
        .await;
    assert_eq!(hot["counters"]["matched"], 3);
    assert_eq!(
        op.expect("GET", "/rules/hot", None, 200).await["counters"]["fired"],
        1
    );
    assert_eq!(
        op.expect("GET", "/rules", None, 200).await["items"][0]["counters"]["failed"],
        0
    );
    assert_eq!(reloads(), vec!["hot"]);

    // An update is validated as a whole; a refused one changes nothing.
    assert_eq!(
        op.call("PUT", "/rules/hot", Some(json!({"sql": "BROKEN"})))
            .await
            .status,
        422
    );
    assert_eq!(
        op.expect("GET", "/rules/hot", None, 200).await["sql"],
        "SELECT 1 FROM 'x'"
    );
    op.expect("PUT", "/rules/hot", Some(json!({"name": "Hot"})), 200)
        .await;
    op.expect("POST", "/rules/hot/disable", None, 200).await;
    op.expect("POST", "/rules/hot/enable", None, 200).await;
    op.expect("DELETE", "/rules/hot", None, 204).await;
    assert_eq!(reloads(), vec!["hot"; 5]);

    // Commands go through the service.
    let c = op
        .expect(
            "POST",
            "/devices/d1/commands",
            Some(json!({"name": "shutdown"})),
            202,
        )
        .await;
    assert_eq!(
        (c["status"].as_str(), c["origin"].as_str()),
        (Some("sent"), Some("operator:acme-op"))
    );
    assert_problem(
        &op.call(
            "POST",
            "/devices/d1/commands",
            Some(json!({"name": "refuse"})),
        )
        .await,
        422,
        "offline",
    );
    assert_eq!(audited(&admin, "command.send").await.len(), 1);

    let _ = stop.send(());
    let _ = within("second HTTP front stops", http).await;
}
