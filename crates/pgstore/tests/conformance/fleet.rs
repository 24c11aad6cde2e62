//! `FleetStore`: every method, its errors, the batch trimming, and
//! `load()` after reopening.

use crate::backends::Backend;
use m2mhub_fleet::diagnostic::BundleStatus;
use m2mhub_fleet::ota::{Artifact, Campaign, Job};
use m2mhub_fleet::store::FleetBatch;
use m2mhub_fleet::{
    Alarm, AlarmFilter, AlarmStatus, Command, CommandStatus, DeviceEvent, DiagnosticBundle,
    FleetSetting, RegistryError, Rule, Severity, Shadow,
};
use serde_json::json;

crate::conformance!(
    rules,
    device_events_in_batches,
    alarms,
    commands,
    shadows,
    fleet_settings,
    ota_artifacts_campaigns_and_jobs,
    diagnostics,
    deleting_a_device_deletes_what_the_fleet_kept,
    dashboards_and_their_shares,
    reports_and_their_runs,
    nodes_sharing_the_store_number_alarms_and_events_apart,
    nodes_sharing_the_store_never_overwrite_each_others_shadow_changes,
    a_command_answered_through_another_node_is_answered_not_timed_out,
    ota_writes_are_conditional_on_what_each_node_read,
);

fn not_found(r: Result<(), RegistryError>) {
    assert!(
        matches!(r, Err(RegistryError::NotFound(_))),
        "expected NotFound, got {r:?}"
    );
}

fn already_exists(r: Result<(), RegistryError>) {
    assert!(
        matches!(r, Err(RegistryError::AlreadyExists(_))),
        "expected AlreadyExists, got {r:?}"
    );
}

fn batch<'a>(
    events: &'a [DeviceEvent],
    alarms: &'a [Alarm],
    commands: &'a [Command],
) -> FleetBatch<'a> {
    FleetBatch {
        device_events: events,
        device_events_kept: 3,
        alarms,
        alarms_kept: 2,
        commands,
        commands_kept: 2,
    }
}

fn rule(id: &str) -> Rule {
    Rule {
        id: id.into(),
        tenant: "t1".into(),
        name: format!("rule {id}"),
        description: "too hot".into(),
        sql: "SELECT * FROM 'devices/+/telemetry' WHERE t > 30".into(),
        actions: json!([{"type": "alarm", "alarm_type": "hot"}]),
        enabled: true,
        created_ms: 1,
        updated_ms: 1,
    }
}

fn event(id: u64, device: &str, kind: &str) -> DeviceEvent {
    DeviceEvent {
        id,
        tenant: "t1".into(),
        device_id: device.into(),
        ts_ms: 100 + i64::try_from(id).expect("small"),
        kind: kind.into(),
        detail: format!("event {id}"),
    }
}

fn alarm(id: u64, device: &str, status: AlarmStatus) -> Alarm {
    Alarm {
        id,
        tenant: "t1".into(),
        device_id: device.into(),
        alarm_type: format!("type{id}"),
        severity: Severity::Major,
        status,
        acked: false,
        acked_by: None,
        acked_ms: None,
        details: json!({"t": 31}),
        rule_id: Some("r1".into()),
        created_ms: 10,
        updated_ms: 10,
        cleared_ms: (status == AlarmStatus::Cleared).then_some(20),
        cleared_by: (status == AlarmStatus::Cleared).then(|| "rule".to_string()),
        count: 1,
    }
}

fn command(id: &str, device: &str, created_ms: i64, status: CommandStatus) -> Command {
    Command {
        id: id.into(),
        tenant: "t1".into(),
        device_id: device.into(),
        name: "reboot".into(),
        params: json!({"delay": 5}),
        status,
        created_ms,
        updated_ms: created_ms,
        response: status.is_finished().then(|| json!({"ok": true})),
        error: None,
        origin: "operator:ops".into(),
        timeout_ms: 30_000,
    }
}

fn shadow(device: &str, name: &str, version: u64) -> Shadow {
    let map = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("an object literal"),
    };
    Shadow {
        tenant: "t1".into(),
        device_id: device.into(),
        name: name.into(),
        desired: map(json!({"interval": version})),
        reported: map(json!({"fw": "1.0"})),
        metadata: map(json!({"desired": {"interval": {"timestamp_ms": 5}}})),
        version,
        updated_ms: 5,
    }
}

fn rules(b: &dyn Backend) {
    let s = b.fleet();
    s.insert_rule(&rule("r1")).expect("insert");
    already_exists(s.insert_rule(&rule("r1")));
    s.insert_rule(&rule("r2")).expect("second");
    let mut r = rule("r1");
    r.name = "renamed".into();
    r.enabled = false;
    r.actions = json!([]);
    r.updated_ms = 9;
    s.update_rule(&r).expect("update");
    not_found(s.update_rule(&rule("nope")));
    s.delete_rule("r2").expect("delete");
    not_found(s.delete_rule("r2"));
    drop(s);
    assert_eq!(b.fleet().load().expect("load").rules, vec![r]);
}

fn device_events_in_batches(b: &dyn Backend) {
    let s = b.fleet();
    let first: Vec<DeviceEvent> = (1..=4)
        .map(|i| {
            event(
                i,
                "d1",
                if i % 2 == 0 {
                    "decode_error"
                } else {
                    "connection"
                },
            )
        })
        .chain([event(5, "d2", "connection")])
        .collect();
    s.append(&batch(&first, &[], &[])).expect("batch 1");
    // Only the newest 3 of d1 are kept.
    let ids = |v: Vec<DeviceEvent>| v.iter().map(|e| e.id).collect::<Vec<u64>>();
    assert_eq!(
        ids(s
            .list_device_events(None, "d1", None, None, 10)
            .expect("list")),
        vec![4, 3, 2]
    );
    s.append(&batch(&[event(6, "d1", "decode_error")], &[], &[]))
        .expect("batch 2");
    assert_eq!(
        ids(s
            .list_device_events(None, "d1", None, None, 10)
            .expect("list")),
        vec![6, 4, 3]
    );
    assert_eq!(
        ids(s
            .list_device_events(None, "d1", Some("decode_error"), None, 10)
            .expect("by kind")),
        vec![6, 4]
    );
    assert_eq!(
        ids(s
            .list_device_events(None, "d1", None, Some(4), 1)
            .expect("page")),
        vec![3]
    );
    assert_eq!(
        ids(s
            .list_device_events(Some("t2"), "d1", None, None, 10)
            .expect("other tenant")),
        Vec::<u64>::new()
    );
    assert_eq!(
        s.list_device_events(Some("t1"), "d2", None, None, 10)
            .expect("d2"),
        vec![event(5, "d2", "connection")]
    );
    // A reused id fails the whole batch.
    already_exists(s.append(&batch(
        &[event(7, "d2", "x"), event(6, "d2", "x")],
        &[],
        &[],
    )));
    assert_eq!(
        ids(s
            .list_device_events(None, "d2", None, None, 10)
            .expect("d2")),
        vec![5]
    );
    drop(s);
    assert_eq!(b.fleet().load().expect("load").device_event_seq, 6);
}

fn alarms(b: &dyn Backend) {
    let s = b.fleet();
    let a1 = alarm(1, "d1", AlarmStatus::Active);
    s.put_alarm(&a1).expect("put");
    assert_eq!(s.get_alarm(1).expect("get"), Some(a1.clone()));
    assert_eq!(s.get_alarm(99).expect("get missing"), None);
    // Upsert by id: the same id again replaces the mutable fields.
    let mut a1b = a1.clone();
    a1b.count = 3;
    a1b.acked = true;
    a1b.acked_by = Some("ops".into());
    a1b.acked_ms = Some(15);
    a1b.severity = Severity::Critical;
    s.put_alarm(&a1b).expect("put again");
    assert_eq!(s.get_alarm(1).expect("get"), Some(a1b.clone()));
    // Cleared alarms beyond `alarms_kept` (2) per device are trimmed.
    let cleared: Vec<Alarm> = (2..=5)
        .map(|i| alarm(i, "d1", AlarmStatus::Cleared))
        .collect();
    let a6 = alarm(6, "d2", AlarmStatus::Active);
    let mut all = cleared.clone();
    all.push(a6.clone());
    s.append(&batch(&[], &all, &[])).expect("batch");
    let ids = |v: Vec<Alarm>| v.iter().map(|a| a.id).collect::<Vec<u64>>();
    assert_eq!(
        ids(s.list_alarms(&AlarmFilter::default(), 10).expect("all")),
        vec![6, 5, 4, 1]
    );
    let f = |f: AlarmFilter| ids(s.list_alarms(&f, 10).expect("list"));
    assert_eq!(
        f(AlarmFilter {
            device_id: Some("d1".into()),
            status: Some(AlarmStatus::Active),
            ..Default::default()
        }),
        vec![1]
    );
    assert_eq!(
        f(AlarmFilter {
            severity: Some(Severity::Critical),
            ..Default::default()
        }),
        vec![1]
    );
    assert_eq!(
        f(AlarmFilter {
            alarm_type: Some("type5".into()),
            tenant: Some("t1".into()),
            ..Default::default()
        }),
        vec![5]
    );
    assert_eq!(
        f(AlarmFilter {
            tenant: Some("t2".into()),
            ..Default::default()
        }),
        Vec::<u64>::new()
    );
    assert_eq!(
        f(AlarmFilter {
            before: Some(5),
            ..Default::default()
        }),
        vec![4, 1]
    );
    assert_eq!(
        ids(s.list_alarms(&AlarmFilter::default(), 2).expect("limit")),
        vec![6, 5]
    );
    drop(s);
    let snap = b.fleet().load().expect("load");
    assert_eq!(snap.active_alarms, vec![a1b, a6]);
    assert_eq!(snap.alarm_seq, 6);
}

fn commands(b: &dyn Backend) {
    let s = b.fleet();
    let open = command("cmd-1", "d1", 10, CommandStatus::Pending);
    s.append(&batch(&[], &[], std::slice::from_ref(&open)))
        .expect("batch");
    assert_eq!(s.get_command("cmd-1").expect("get"), Some(open.clone()));
    assert_eq!(s.get_command("cmd-x").expect("missing"), None);
    // Upsert: a later status replaces status, response and error.
    let mut sent = open.clone();
    sent.status = CommandStatus::Sent;
    sent.updated_ms = 11;
    s.append(&batch(&[], &[], std::slice::from_ref(&sent)))
        .expect("update");
    assert_eq!(s.get_command("cmd-1").expect("get"), Some(sent.clone()));
    // Finished commands beyond `commands_kept` (2) per device go, by
    // (created_ms, id); open ones stay.
    let done: Vec<Command> = [("cmd-2", 20), ("cmd-3", 30), ("cmd-4", 30), ("cmd-5", 40)]
        .iter()
        .map(|(id, at)| command(id, "d1", *at, CommandStatus::Answered))
        .collect();
    s.append(&batch(&[], &[], &done)).expect("finished");
    let ids = |v: Vec<Command>| v.iter().map(|c| c.id.clone()).collect::<Vec<String>>();
    assert_eq!(
        ids(s.list_commands(None, "d1", None, 10).expect("list")),
        vec!["cmd-5", "cmd-4", "cmd-1"]
    );
    assert_eq!(
        ids(s
            .list_commands(Some("t1"), "d1", Some("cmd-4"), 10)
            .expect("page")),
        vec!["cmd-1"]
    );
    assert_eq!(
        ids(s
            .list_commands(None, "d1", Some("cmd-unknown"), 10)
            .expect("bad cursor")),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(s
            .list_commands(Some("t2"), "d1", None, 10)
            .expect("other tenant")),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(s.list_commands(None, "d1", None, 1).expect("limit")),
        vec!["cmd-5"]
    );
    assert_eq!(
        s.get_command("cmd-5").expect("get").expect("kept").response,
        Some(json!({"ok": true}))
    );
    drop(s);
    assert_eq!(b.fleet().load().expect("load").open_commands, vec![sent]);
}

fn shadows(b: &dyn Backend) {
    let s = b.fleet();
    s.put_shadow(&shadow("d1", "", 1)).expect("put");
    s.put_shadow(&shadow("d1", "", 2)).expect("replace");
    s.put_shadows(&[&shadow("d1", "net", 1), &shadow("d2", "", 7)])
        .expect("many");
    s.put_shadow(&shadow("d3", "", 1)).expect("d3");
    s.delete_shadow("d3", "").expect("delete");
    not_found(s.delete_shadow("d3", ""));
    drop(s);
    let mut got = b.fleet().load().expect("load").shadows;
    got.sort_by(|a, b| (&a.device_id, &a.name).cmp(&(&b.device_id, &b.name)));
    assert_eq!(
        got,
        vec![
            shadow("d1", "", 2),
            shadow("d1", "net", 1),
            shadow("d2", "", 7)
        ]
    );
}

fn setting(id: &str, tenant: &str, created_ms: i64) -> FleetSetting {
    serde_json::from_value(json!({
        "id": id, "tenant": tenant,
        "selector": {"group": "g1", "label": null, "profile": null},
        "shadow": "", "state": {"interval": 60},
        "targets": ["d1", "d2"], "failed": [["d3", "too large"]],
        "created_ms": created_ms, "created_by": "ops"
    }))
    .expect("a fleet setting")
}

fn fleet_settings(b: &dyn Backend) {
    let s = b.fleet();
    for (i, t) in [(1, "t1"), (2, "t2"), (3, "t1"), (4, "t1")] {
        s.put_setting(&setting(&format!("fs-{i}"), t, i), 3)
            .expect("put");
    }
    already_exists(s.put_setting(&setting("fs-4", "t1", 5), 3));
    // Only the newest 3 are kept, all tenants together.
    assert_eq!(s.get_setting("fs-1").expect("get"), None);
    assert_eq!(
        s.get_setting("fs-3").expect("get"),
        Some(setting("fs-3", "t1", 3))
    );
    let ids = |v: Vec<FleetSetting>| v.iter().map(|f| f.id.clone()).collect::<Vec<String>>();
    assert_eq!(
        ids(s.list_settings(None, 10).expect("all")),
        vec!["fs-4", "fs-3", "fs-2"]
    );
    assert_eq!(
        ids(s.list_settings(Some("t1"), 1).expect("t1")),
        vec!["fs-4"]
    );
}

fn artifact(id: &str) -> Artifact {
    serde_json::from_value(json!({
        "id": id, "tenant": "t1", "name": "fw", "version": "1.2.3",
        "hardware": "rev-b", "profile": null, "size": 1024,
        "sha256": "ab".repeat(32), "signature": "c2ln", "signed_by": "platform",
        "created_ms": 3, "created_by": "ops"
    }))
    .expect("an artifact")
}

fn campaign(status: &str) -> Campaign {
    serde_json::from_value(json!({
        "id": "camp-1", "tenant": "t1", "name": "rollout", "artifact_id": "art-1",
        "selector": {"group": null, "label": "site=north", "profile": null},
        "devices": null, "waves": [{"size": 2, "started_ms": 4}],
        "wave_wait_s": 60, "max_starts_per_minute": 10, "failure_threshold": 0.2,
        "deadline_ms": null, "job_timeout_s": 600, "status": status, "reason": null,
        "skipped": [], "created_ms": 4, "created_by": "ops", "updated_ms": 4
    }))
    .expect("a campaign")
}

fn job(device: &str, state: &str) -> Job {
    serde_json::from_value(json!({
        "campaign_id": "camp-1", "device_id": device, "tenant": "t1", "wave": 0,
        "state": state, "progress": 0, "reason": null, "notified_ms": null, "updated_ms": 4
    }))
    .expect("a job")
}

fn ota_artifacts_campaigns_and_jobs(b: &dyn Backend) {
    let s = b.fleet();
    s.put_artifact(&artifact("art-1")).expect("artifact");
    already_exists(s.put_artifact(&artifact("art-1")));
    s.put_artifact(&artifact("art-2")).expect("second");
    s.delete_artifact("art-2").expect("delete");
    not_found(s.delete_artifact("art-2"));
    s.put_campaign(
        &campaign("running"),
        &[job("d1", "pending"), job("d2", "queued")],
    )
    .expect("campaign");
    // Again: the campaign and the named jobs are replaced, others kept.
    s.put_campaign(&campaign("paused"), &[job("d1", "succeeded")])
        .expect("update");
    drop(s);
    let snap = b.fleet().load().expect("load");
    assert_eq!(snap.artifacts, vec![artifact("art-1")]);
    assert_eq!(snap.campaigns, vec![campaign("paused")]);
    let mut jobs = snap.jobs;
    jobs.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    assert_eq!(jobs, vec![job("d1", "succeeded"), job("d2", "queued")]);
}

/// Two nodes share the store: the node ticking a campaign times a job out
/// while the device's node records its report. Whichever writes second
/// finds the job not as it read it, writes nothing (not even the rest of
/// its change) and reads again.
fn ota_writes_are_conditional_on_what_each_node_read(b: &dyn Backend) {
    let (ticker, device_node) = (b.fleet(), b.fleet());
    ticker.put_artifact(&artifact("art-1")).expect("artifact");
    let notified = job("d1", "notified");
    ticker
        .put_campaign(
            &campaign("running"),
            &[notified.clone(), job("d2", "pending")],
        )
        .expect("campaign");

    // Every backend reads back what is stored.
    let (c, mut jobs) = device_node
        .stored_campaign("camp-1")
        .expect("read")
        .expect("stored");
    assert_eq!(c, campaign("running"));
    jobs.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    assert_eq!(jobs, vec![notified.clone(), job("d2", "pending")]);
    assert_eq!(device_node.stored_campaign("camp-9").expect("read"), None);
    assert_eq!(
        device_node.stored_job("camp-1", "d1").expect("read"),
        Some(notified.clone())
    );
    assert_eq!(device_node.stored_job("camp-1", "d9").expect("read"), None);
    let (arts, camps, all) = device_node.load_ota().expect("load");
    assert_eq!((arts.len(), camps.len(), all.len()), (1, 1, 2));

    // The device's node records the report first.
    let mut downloading = notified.clone();
    downloading.state = m2mhub_fleet::JobState::Downloading;
    downloading.progress = 40;
    downloading.updated_ms = 9;
    assert!(device_node
        .put_campaign_if(None, &[(&downloading, &notified)])
        .expect("report"));
    // The ticker decided from the job as it was: its timeout (and the
    // campaign change riding with it) is not written.
    let mut timed_out = notified.clone();
    timed_out.state = m2mhub_fleet::JobState::Failed;
    timed_out.reason = Some("no report".into());
    let mut aborted = campaign("aborted");
    aborted.updated_ms = 10;
    assert!(!ticker
        .put_campaign_if(Some((&aborted, 4)), &[(&timed_out, &notified)])
        .expect("tick"));
    assert_eq!(
        ticker.stored_job("camp-1", "d1").expect("read"),
        Some(downloading.clone()),
        "the device's report stands"
    );
    assert_eq!(
        ticker
            .stored_campaign("camp-1")
            .expect("read")
            .expect("stored")
            .0,
        campaign("running"),
        "all or nothing: the campaign is unchanged"
    );
    // Read again, decided again: now it is written.
    let mut pending2 = job("d2", "notified");
    pending2.updated_ms = 11;
    assert!(ticker
        .put_campaign_if(Some((&aborted, 4)), &[(&pending2, &job("d2", "pending"))])
        .expect("tick"));
    // A campaign change from a stale copy (updated_ms 4) loses.
    assert!(!device_node
        .put_campaign_if(Some((&campaign("paused"), 4)), &[])
        .expect("pause"));
    let (c, _) = ticker
        .stored_campaign("camp-1")
        .expect("read")
        .expect("stored");
    assert_eq!(c, aborted);
    assert_eq!(
        ticker.stored_job("camp-1", "d2").expect("read"),
        Some(pending2)
    );
}

fn bundle(id: &str, device: &str, requested_ms: i64, token: &str) -> DiagnosticBundle {
    DiagnosticBundle {
        id: id.into(),
        tenant: "t1".into(),
        device_id: device.into(),
        status: BundleStatus::Requested,
        requested_by: "ops".into(),
        requested_ms,
        uploaded_ms: None,
        size: None,
        sha256: None,
        reason: Some("flaky wifi".into()),
        error: None,
        token_hash: token.into(),
        expires_ms: requested_ms + 100,
    }
}

fn diagnostics(b: &dyn Backend) {
    let s = b.fleet();
    let b1 = bundle("db-1", "d1", 1_000, "h1");
    s.insert_diagnostic(&b1).expect("insert");
    already_exists(s.insert_diagnostic(&b1));
    already_exists(s.insert_diagnostic(&bundle("db-9", "d1", 1, "h1")));
    s.insert_diagnostic(&bundle("db-2", "d1", 2_000, "h2"))
        .expect("second");
    s.insert_diagnostic(&bundle("db-3", "d2", 3_000, "h3"))
        .expect("third");
    let mut up = bundle("db-2", "d1", 2_000, "h2");
    up.status = BundleStatus::Uploaded;
    up.uploaded_ms = Some(2_050);
    up.size = Some(4096);
    up.sha256 = Some("cd".repeat(32));
    s.update_diagnostic(&up).expect("update");
    not_found(s.update_diagnostic(&bundle("db-x", "d1", 1, "hx")));
    assert_eq!(s.get_diagnostic("db-2").expect("get"), Some(up.clone()));
    assert_eq!(s.get_diagnostic("db-x").expect("get"), None);
    assert_eq!(
        s.find_diagnostic_by_token("h1").expect("by token"),
        Some(b1.clone())
    );
    assert_eq!(s.find_diagnostic_by_token("nope").expect("none"), None);
    let ids = |v: Vec<DiagnosticBundle>| v.iter().map(|b| b.id.clone()).collect::<Vec<String>>();
    assert_eq!(
        ids(s.list_diagnostics(None, "d1", 10).expect("list")),
        vec!["db-2", "db-1"]
    );
    assert_eq!(
        ids(s.list_diagnostics(Some("t1"), "d1", 1).expect("limit")),
        vec!["db-2"]
    );
    assert_eq!(
        ids(s.list_diagnostics(Some("t2"), "d1", 10).expect("tenant")),
        Vec::<String>::new()
    );
    // Expired requests (db-1 expires at 1100) and anything uploaded or
    // expired before the retention point (db-2 uploaded at 2050).
    let mut due = ids(s.diagnostics_due(1_100, 2_050).expect("due"));
    due.sort();
    assert_eq!(due, vec!["db-1", "db-2"]);
    assert_eq!(
        ids(s.diagnostics_due(1_099, 1_099).expect("none due")),
        Vec::<String>::new()
    );
    s.delete_diagnostic("db-1").expect("delete");
    not_found(s.delete_diagnostic("db-1"));
}

fn deleting_a_device_deletes_what_the_fleet_kept(b: &dyn Backend) {
    let s = b.fleet();
    for d in ["d1", "d2"] {
        let n = if d == "d1" { 1 } else { 2 };
        s.append(&batch(
            &[event(n, d, "connection")],
            &[alarm(n, d, AlarmStatus::Active)],
            &[command(&format!("cmd-{d}"), d, 1, CommandStatus::Pending)],
        ))
        .expect("batch");
        s.put_shadow(&shadow(d, "", 1)).expect("shadow");
        s.insert_diagnostic(&bundle(&format!("db-{d}"), d, 1, &format!("h-{d}")))
            .expect("bundle");
    }
    s.put_campaign(
        &campaign("running"),
        &[job("d1", "pending"), job("d2", "pending")],
    )
    .expect("campaign");
    s.delete_device("d1").expect("delete");
    // Nothing kept is fine too.
    s.delete_device("never-existed").expect("delete nothing");
    assert!(s
        .list_device_events(None, "d1", None, None, 10)
        .expect("events")
        .is_empty());
    assert!(s
        .list_diagnostics(None, "d1", 10)
        .expect("bundles")
        .is_empty());
    drop(s);
    let snap = b.fleet().load().expect("load");
    let devices = |v: Vec<String>| v;
    assert_eq!(
        devices(
            snap.active_alarms
                .iter()
                .map(|a| a.device_id.clone())
                .collect()
        ),
        vec!["d2"]
    );
    assert_eq!(
        devices(
            snap.open_commands
                .iter()
                .map(|c| c.device_id.clone())
                .collect()
        ),
        vec!["d2"]
    );
    assert_eq!(
        devices(snap.shadows.iter().map(|s| s.device_id.clone()).collect()),
        vec!["d2"]
    );
    assert_eq!(
        devices(snap.jobs.iter().map(|j| j.device_id.clone()).collect()),
        vec!["d2"]
    );
}

fn dashboards_and_their_shares(b: &dyn Backend) {
    use m2mhub_fleet::dashboard::{Dashboard, DashboardShare};
    let s = b.fleet();
    let dash = |id: &str, tenant: &str| Dashboard {
        id: id.into(),
        tenant: tenant.into(),
        name: format!("{id} name"),
        description: String::new(),
        profile: Some("meter".into()),
        layout: json!({"widgets": [{"type": "value", "metric": "kwh"}]}),
        created_ms: 1,
        updated_ms: 2,
        updated_by: "ops".into(),
    };
    s.put_dashboard(&dash("d1", "t1")).expect("put");
    s.put_dashboard(&dash("d2", "t2")).expect("put");
    let mut changed = dash("d1", "t1");
    changed.name = "renamed".into();
    s.put_dashboard(&changed).expect("a put replaces");
    assert_eq!(s.get_dashboard("d1").expect("get"), Some(changed.clone()));
    assert_eq!(s.get_dashboard("nope").expect("get"), None);
    let mut all: Vec<String> = s
        .list_dashboards(None)
        .expect("list")
        .into_iter()
        .map(|d| d.id)
        .collect();
    all.sort();
    assert_eq!(all, vec!["d1", "d2"]);
    assert_eq!(s.list_dashboards(Some("t2")).expect("list").len(), 1);

    let share = |id: &str, hash: &str| DashboardShare {
        id: id.into(),
        dashboard_id: "d1".into(),
        tenant: "t1".into(),
        token_hash: hash.into(),
        created_by: "ops".into(),
        created_ms: 3,
        expires_ms: 4,
        revoked_ms: None,
    };
    s.put_dashboard_share(&share("s1", "aa")).expect("share");
    s.put_dashboard_share(&share("s2", "bb")).expect("share");
    let mut revoked = share("s1", "aa");
    revoked.revoked_ms = Some(5);
    s.put_dashboard_share(&revoked).expect("a put replaces");
    assert_eq!(s.find_dashboard_share("aa").expect("find"), Some(revoked));
    assert_eq!(s.find_dashboard_share("cc").expect("find"), None);
    let mut shares = s.list_dashboard_shares("d1").expect("list");
    shares.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(shares.len(), 2);
    assert_eq!(shares[1].token_hash, "bb", "the hash comes back");
    // Deleting a dashboard deletes its shares.
    s.delete_dashboard("d1").expect("delete");
    assert_eq!(s.get_dashboard("d1").expect("get"), None);
    assert!(s.list_dashboard_shares("d1").expect("list").is_empty());
    assert_eq!(s.find_dashboard_share("bb").expect("find"), None);
    drop(s);
    assert!(b
        .fleet()
        .get_dashboard("d2")
        .expect("after reopen")
        .is_some());
}

fn reports_and_their_runs(b: &dyn Backend) {
    use m2mhub_fleet::report::{
        Delivery, EnergyMode, Frequency, Report, ReportKind, ReportRun, RunRetention, RunTrigger,
        Schedule,
    };
    let s = b.fleet();
    let report = |id: &str| Report {
        id: id.into(),
        tenant: "default".into(),
        name: "energy".into(),
        kind: ReportKind::Energy {
            metric: "kwh".into(),
            mode: EnergyMode::Counter,
        },
        devices: vec![],
        schedule: Schedule {
            every: Frequency::Monthly,
            at: "06:00".into(),
            weekday: None,
            day: Some(31),
            time_zone: "Europe/Berlin".into(),
        },
        delivery: Delivery::default(),
        retention: RunRetention::default(),
        enabled: true,
        next_run_ms: Some(1),
        created_by: "admin".into(),
        created_ms: 1,
        updated_ms: 1,
    };
    let run = |id: &str, started_ms: i64| ReportRun {
        id: id.into(),
        report_id: "r1".into(),
        tenant: "default".into(),
        trigger: RunTrigger::Manual,
        started_ms,
        finished_ms: started_ms,
        from_ms: 0,
        to_ms: 1,
        ok: true,
        error: None,
        rows: 1,
        csv_bytes: 1,
        html_bytes: 1,
        deliveries: vec![],
    };
    s.put_report(&report("r1")).expect("put");
    let mut changed = report("r1");
    changed.enabled = false;
    s.put_report(&changed).expect("a put replaces");
    s.put_report(&report("r2")).expect("put");
    let mut all = s.list_reports().expect("list");
    all.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(all, vec![changed, report("r2")]);
    // Four schedulers (separate store handles, as separate nodes) claim the
    // same due run at once: exactly one gets it, and the next run moved.
    let handles: Vec<_> = (0..4).map(|_| b.fleet()).collect();
    let won = std::thread::scope(|sc| {
        let claims: Vec<_> = handles
            .iter()
            .map(|h| sc.spawn(move || h.claim_report_run("r2", 1, Some(500)).expect("claim")))
            .collect();
        claims
            .into_iter()
            .map(|c| c.join().expect("claim thread"))
            .filter(|won| *won)
            .count()
    });
    assert_eq!(won, 1, "one node makes a scheduled run");
    drop(handles);
    let r2 = s.list_reports().expect("list");
    let r2 = r2.iter().find(|r| r.id == "r2").expect("r2");
    assert_eq!((r2.next_run_ms, r2.name.as_str()), (Some(500), "energy"));
    assert!(!s
        .claim_report_run("r2", 1, Some(600))
        .expect("a stale claim"));
    assert!(!s.claim_report_run("none", 1, None).expect("no such report"));
    s.put_report(&report("r2")).expect("put back");
    for (id, t) in [("a", 10), ("b", 30), ("c", 20)] {
        s.put_report_run(&run(id, t)).expect("run");
    }
    let ids = |runs: Vec<ReportRun>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_report_runs("r1", 10).expect("runs")),
        vec!["b", "c", "a"]
    );
    assert_eq!(ids(s.list_report_runs("r1", 1).expect("runs")), vec!["b"]);
    s.delete_report_runs(&["b".into(), "gone".into()])
        .expect("delete runs");
    assert_eq!(
        ids(s.list_report_runs("r1", 10).expect("runs")),
        vec!["c", "a"]
    );
    s.delete_report("r1").expect("delete");
    assert!(s.list_report_runs("r1", 10).expect("runs").is_empty());
    not_found(s.delete_report("r1"));
    drop(s);
    assert_eq!(b.fleet().list_reports().expect("after reopen").len(), 1);
}

/// Two fleets on one shared store (two nodes) raise alarms and record
/// device events at once: every id is unique and nothing overwrote
/// anything. A store with one writer (SQLite) hands out no blocks and is
/// checked for that.
fn nodes_sharing_the_store_number_alarms_and_events_apart(b: &dyn Backend) {
    use m2mhub_fleet::ids::{IdKind, ID_BLOCK};
    use m2mhub_fleet::Fleet;
    if !b.shared() {
        assert_eq!(
            b.fleet().reserve_ids(IdKind::Alarm, 10).expect("reserve"),
            None
        );
        return;
    }
    // Reservations from four handles at once are disjoint.
    let handles: Vec<_> = (0..4).map(|_| b.fleet()).collect();
    let mut starts: Vec<u64> = std::thread::scope(|sc| {
        let ts: Vec<_> = handles
            .iter()
            .map(|h| {
                sc.spawn(move || {
                    (0..20)
                        .map(|_| {
                            h.reserve_ids(IdKind::DeviceEvent, ID_BLOCK)
                                .expect("reserve")
                                .expect("a shared store hands out blocks")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        ts.into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect()
    });
    starts.sort();
    assert!(
        starts.windows(2).all(|w| w[1] - w[0] >= ID_BLOCK),
        "overlapping blocks: {starts:?}"
    );
    drop(handles);

    let reg = m2mhub_identity::Registry::with_store(b.registry()).expect("registry");
    let nodes: Vec<Fleet> = (0..2)
        .map(|_| Fleet::with_store(b.fleet(), reg.clone()).expect("fleet"))
        .collect();
    let per_node = ID_BLOCK as usize + 200;
    std::thread::scope(|sc| {
        for (n, f) in nodes.iter().enumerate() {
            sc.spawn(move || {
                for i in 0..per_node {
                    f.raise_alarm(
                        "default",
                        &format!("n{n}-d{i}"),
                        "hot",
                        Severity::Major,
                        json!({}),
                        None,
                    )
                    .expect("raise");
                }
            });
        }
    });
    for f in &nodes {
        f.flush().expect("flush");
    }
    // Every page of the listing (newest first, `before` the last id seen).
    let mut all = Vec::new();
    let mut before = None;
    loop {
        let page = nodes[0]
            .list_alarms(&AlarmFilter {
                limit: Some(1000),
                before,
                ..Default::default()
            })
            .expect("list");
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        all.extend(page);
    }
    let mut ids: Vec<u64> = all.iter().map(|a| a.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (all.len(), ids.len()),
        (2 * per_node, 2 * per_node),
        "every alarm of both nodes is stored under its own id"
    );
}

/// Two fleets on one shared store (two nodes), each holding the shadows in
/// memory, update the same shadow in turn from stale copies: no change is
/// lost, versions go up by one each, and a client's expected version is
/// still checked against the latest.
fn nodes_sharing_the_store_never_overwrite_each_others_shadow_changes(b: &dyn Backend) {
    use m2mhub_fleet::shadow::ShadowWriter;
    use m2mhub_fleet::{Fleet, ShadowUpdate};
    if !b.shared() {
        assert!(b
            .fleet()
            .put_shadow_if(&shadow("s-0", "", 1), 7)
            .expect("write"));
        return;
    }
    let reg = m2mhub_identity::Registry::with_store(b.registry()).expect("registry");
    reg.create_device(m2mhub_identity::NewDevice {
        id: Some("sh-1".into()),
        ..Default::default()
    })
    .expect("device");
    // Both nodes start before the shadow exists.
    let a = Fleet::with_store(b.fleet(), reg.clone()).expect("node a");
    let bn = Fleet::with_store(b.fleet(), reg.clone()).expect("node b");
    let upd = |v: serde_json::Value| -> ShadowUpdate { serde_json::from_value(v).expect("update") };
    let v1 = a
        .update_shadow(
            "default",
            "sh-1",
            "",
            &upd(json!({"state": {"desired": {"valve": "open"}}})),
            ShadowWriter::Platform,
        )
        .expect("a writes");
    assert_eq!(v1.current.version, 1);
    let v2 = bn
        .update_shadow(
            "default",
            "sh-1",
            "",
            &upd(json!({"state": {"reported": {"valve": "closed"}}})),
            ShadowWriter::Device,
        )
        .expect("b writes over its stale (empty) copy");
    assert_eq!(v2.current.version, 2);
    assert_eq!(
        json!(v2.current.desired),
        json!({"valve": "open"}),
        "a's change kept"
    );
    let v3 = a
        .update_shadow(
            "default",
            "sh-1",
            "",
            &upd(json!({"state": {"desired": {"fan": 2}}})),
            ShadowWriter::Platform,
        )
        .expect("a writes over its stale v1");
    assert_eq!(v3.current.version, 3);
    assert_eq!(
        json!(v3.current.desired),
        json!({"valve": "open", "fan": 2})
    );
    assert_eq!(
        json!(v3.current.reported),
        json!({"valve": "closed"}),
        "b's change kept"
    );
    // A client that read version 2 is refused by the node whose memory
    // still says 2 once it has seen the store's 3.
    let e = bn
        .update_shadow(
            "default",
            "sh-1",
            "",
            &upd(json!({"state": {"reported": {"fan": 2}}, "version": 2})),
            ShadowWriter::Device,
        )
        .expect_err("stale client version");
    assert!(matches!(e, RegistryError::Conflict(_)), "{e:?}");
    let stored = b
        .fleet()
        .stored_shadow("sh-1", "")
        .expect("read")
        .expect("stored");
    assert_eq!(
        (stored.version, json!(stored.desired)),
        (3, json!({"valve": "open", "fan": 2}))
    );

    // A fleet-wide setting from the stale node b (its copy is at 2, the
    // store at 3): written over the stored shadow, not over b's copy.
    let (setting, changes) = bn
        .apply_setting(
            "default",
            m2mhub_fleet::Selector {
                profile: Some("default".into()),
                ..Default::default()
            },
            "",
            json!({"mode": "eco"}).as_object().cloned().expect("object"),
            "test",
        )
        .expect("setting");
    assert!(setting.failed.is_empty(), "{:?}", setting.failed);
    assert_eq!(changes.len(), 1);
    let stored = b
        .fleet()
        .stored_shadow("sh-1", "")
        .expect("read")
        .expect("stored");
    assert_eq!(stored.version, 4);
    assert_eq!(
        json!(stored.desired),
        json!({"valve": "open", "fan": 2, "mode": "eco"}),
        "every node's change kept"
    );
}

/// A command created on one node and answered through another (the device
/// is connected there): the answer is stored, and the creating node does
/// not time it out over the answer.
fn a_command_answered_through_another_node_is_answered_not_timed_out(b: &dyn Backend) {
    use m2mhub_fleet::{CommandUpdate, Fleet, NewCommand};
    if !b.shared() {
        return;
    }
    let reg = m2mhub_identity::Registry::with_store(b.registry()).expect("registry");
    reg.create_device(m2mhub_identity::NewDevice {
        id: Some("cmd-dev".into()),
        ..Default::default()
    })
    .expect("device");
    let a = Fleet::with_store(b.fleet(), reg.clone()).expect("node a");
    let bn = Fleet::with_store(b.fleet(), reg.clone()).expect("node b");
    let c = a
        .create_command(NewCommand {
            tenant: "default".into(),
            device_id: "cmd-dev".into(),
            name: "reboot".into(),
            params: json!({}),
            origin: "test".into(),
            timeout_ms: 1000,
        })
        .expect("create");
    a.flush().expect("flush");
    let answered = bn
        .update_command(&c.id, CommandUpdate::answer(json!({"ok": true})))
        .expect("update")
        .expect("a step forward on the stored command");
    assert_eq!(answered.status, CommandStatus::Answered);
    // Past its deadline on the creating node: answered, not timed out.
    let expired = a.expire_commands(c.created_ms + 10_000);
    assert!(expired.is_empty(), "{expired:?}");
    a.flush().expect("flush");
    let stored = b.fleet().get_command(&c.id).expect("read").expect("stored");
    assert_eq!(stored.status, CommandStatus::Answered);
    assert_eq!(stored.response, Some(json!({"ok": true})));
    assert_eq!(
        a.get_command(&c.id).expect("get").status,
        CommandStatus::Answered
    );
}
