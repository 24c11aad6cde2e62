//! Three m2mhub nodes in a cluster over a real NATS server with JetStream
//! (started by `scripts/nats.sh`, which `.ci/run` runs; the URL comes in
//! `M2MHUB_TEST_NATS_URL`). Ignored by a plain `cargo test`: the
//! single-node suite needs no external service.
//!
//! No test waits for the cluster to settle: a SUBACK in a cluster comes
//! once the subscription is in effect on every node, so a message published
//! anywhere after it is routed here.
//!
//! Each test names its own cluster, so tests running at once on one NATS
//! server never see each other's subjects, buckets or nodes.

#[path = "cluster/ota.rs"]
mod ota;

use crate::common::*;
use mqtt_codec::{reason, Packet, PubResponse, QoS};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long a drain waits for the next message before it decides there
/// are no more: generous, for a loaded 2-core CI machine running three
/// nodes and NATS.
const GAP: Duration = Duration::from_secs(1);

const NEEDS_NATS: &str = "needs NATS: run with scripts/nats.sh (see .ci/run)";

fn nats_url() -> String {
    std::env::var("M2MHUB_TEST_NATS_URL").unwrap_or_else(|_| {
        panic!("M2MHUB_TEST_NATS_URL is not set: {NEEDS_NATS}");
    })
}

/// A fresh cluster name per test.
fn cluster_name(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        test
    )
}

async fn nodes(test: &str, n: usize) -> Vec<TestServer> {
    let name = cluster_name(test);
    let url = nats_url();
    let mut out = Vec::new();
    for i in 0..n {
        let (name, url) = (name.clone(), url.clone());
        out.push(
            TestServer::with(move |s| {
                s.cluster.enabled = true;
                s.cluster.nats_url = url;
                s.cluster.name = name;
                s.cluster.node_id = format!("node-{i}");
            })
            .await,
        );
    }
    out
}

/// `count` secure nodes of one cluster sharing a fresh PostgreSQL
/// database (dropped with the returned handle), named `{prefix}-{i}`.
async fn pg_nodes(
    test: &str,
    count: usize,
    prefix: &str,
) -> (m2mhub_pgstore::testing::TestDatabase, Vec<TestServer>) {
    let db = m2mhub_pgstore::testing::TestDatabase::create().unwrap_or_else(|e| panic!("{e}"));
    let pg = db.url().expose().to_string();
    let name = cluster_name(test);
    let url = nats_url();
    let mut n = Vec::new();
    for i in 0..count {
        let (pg, name, url) = (pg.clone(), name.clone(), url.clone());
        let node_id = format!("{prefix}-{i}");
        n.push(
            TestServer::with(move |s| {
                secure(s);
                s.storage.postgres_url = pg;
                s.cluster.enabled = true;
                s.cluster.nats_url = url;
                s.cluster.name = name;
                s.cluster.node_id = node_id;
            })
            .await,
        );
    }
    (db, n)
}

fn cluster_counter(node: &TestServer, name: &str) -> u64 {
    let c = node.get().cluster.as_ref().expect("clustered");
    c.stats()
        .counters()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, v)| v)
        .unwrap_or_else(|| panic!("no cluster counter {name}"))
}

/// Read PUBLISHes until `quiet` passes without one, acknowledging QoS 1.
async fn drain(c: &mut Raw, quiet: Duration) -> Vec<(String, String, QoS)> {
    let mut got = Vec::new();
    loop {
        match c.next(quiet).await {
            Next::Packet(Packet::Publish(p)) => {
                match (p.qos, p.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => c.puback(id).await,
                    (QoS::ExactlyOnce, Some(id)) => {
                        c.send(&Packet::PubRec(PubResponse::new(id, 0))).await
                    }
                    _ => {}
                }
                got.push((p.topic.clone(), text(&p), p.qos));
            }
            Next::Packet(Packet::PubRel(r)) => {
                c.send(&Packet::PubComp(PubResponse::new(r.packet_id, 0)))
                    .await;
            }
            Next::Packet(other) => panic!("unexpected {other:?}"),
            Next::Timeout => return got,
            Next::Closed => panic!("connection closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn messages_cross_nodes_with_their_qos_and_only_to_interested_nodes() {
    let n = nodes("route", 3).await;
    let (mut sub_b, _) = Raw::connect_ok(n[1].mqtt(), v5("sub-b")).await;
    sub_b.subscribe(1, "plant/+/temp", QoS::ExactlyOnce).await;
    let (mut sub_c, _) = Raw::connect_ok(n[2].mqtt(), v5("sub-c")).await;
    sub_c.subscribe(1, "plant/#", QoS::AtLeastOnce).await;
    // Overlapping filters on one node: still one copy.
    sub_c.subscribe(2, "plant/1/temp", QoS::AtMostOnce).await;

    let (mut publisher, _) = Raw::connect_ok(n[0].mqtt(), v5("pub-a")).await;
    publisher
        .publish(publish("plant/1/temp", QoS::AtMostOnce, 0, "q0"))
        .await;
    assert_eq!(
        publisher
            .publish(publish("plant/1/temp", QoS::AtLeastOnce, 1, "q1"))
            .await,
        reason::SUCCESS
    );
    publisher
        .publish(publish("plant/1/temp", QoS::ExactlyOnce, 2, "q2"))
        .await;
    publisher
        .publish(publish("plant/1/pressure", QoS::AtLeastOnce, 3, "p"))
        .await;

    // QoS 0 and QoS 1/2 travel apart (only QoS 1/2 go through JetStream),
    // and MQTT orders messages per QoS: compare as sets.
    let mut got_b = drain(&mut sub_b, GAP).await;
    got_b.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        got_b,
        vec![
            ("plant/1/temp".into(), "q0".into(), QoS::AtMostOnce),
            ("plant/1/temp".into(), "q1".into(), QoS::AtLeastOnce),
            ("plant/1/temp".into(), "q2".into(), QoS::ExactlyOnce),
        ],
        "node B gets what its filter matches, each at min(published, subscribed) QoS"
    );
    let got_c = drain(&mut sub_c, GAP).await;
    let mut bodies: Vec<&str> = got_c.iter().map(|(_, b, _)| b.as_str()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec!["p", "q0", "q1", "q2"],
        "one copy each: {got_c:?}; node C's counters: {:?}",
        n[2].get().cluster.as_ref().map(|c| c.stats().counters())
    );
    assert!(
        got_c
            .iter()
            .any(|(_, b, q)| b == "q2" && *q == QoS::AtLeastOnce),
        "QoS 2 capped at the subscription's 1: {got_c:?}"
    );

    // Interest, not broadcast: node A subscribes to nothing, so what B and
    // C publish never reaches it.
    let (mut pub_b, _) = Raw::connect_ok(n[1].mqtt(), v5("pub-b")).await;
    pub_b
        .publish(publish("plant/2/temp", QoS::AtLeastOnce, 1, "from-b"))
        .await;
    let got_c = drain(&mut sub_c, GAP).await;
    assert_eq!(got_c.len(), 1, "{got_c:?}");
    assert_eq!(cluster_counter(&n[0], "received"), 0);
    assert!(cluster_counter(&n[2], "duplicates") >= 1, "overlap dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn shared_subscriptions_balance_across_nodes() {
    let n = nodes("share", 3).await;
    let mut members = Vec::new();
    for (i, node) in n.iter().enumerate() {
        let (mut c, _) = Raw::connect_ok(node.mqtt(), v5(&format!("worker-{i}"))).await;
        c.subscribe(1, "$share/workers/jobs/#", QoS::AtLeastOnce)
            .await;
        members.push(c);
    }
    let (mut publisher, _) = Raw::connect_ok(n[0].mqtt(), v5("jobs-pub")).await;
    let total = 60u16;
    for i in 0..total {
        publisher
            .publish(publish("jobs/x", QoS::AtLeastOnce, i + 1, i.to_string()))
            .await;
    }
    let mut all = BTreeSet::new();
    let mut counts = Vec::new();
    for m in &mut members {
        let got = drain(m, GAP).await;
        counts.push(got.len());
        for (_, body, _) in got {
            assert!(all.insert(body.clone()), "{body} delivered twice");
        }
    }
    assert_eq!(all.len(), usize::from(total), "every job once: {counts:?}");
    assert!(
        counts.iter().all(|c| *c > 0),
        "every node's member gets a share: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn retained_messages_are_the_same_on_every_node() {
    let n = nodes("retained", 3).await;
    let (mut a, _) = Raw::connect_ok(n[0].mqtt(), v5("ret-pub")).await;
    let mut p = publish("site/1/status", QoS::AtLeastOnce, 1, "online");
    p.retain = true;
    a.publish(p).await;
    // Every node's retained store follows the cluster's bucket.
    for node in &n[1..] {
        eventually("retained message mirrored", || {
            node.get().broker.retained_topics() == vec!["site/1/status".to_string()]
        })
        .await;
    }
    let (mut c, _) = Raw::connect_ok(n[2].mqtt(), v5("ret-sub")).await;
    c.subscribe(1, "site/#", QoS::AtLeastOnce).await;
    let got = c.recv_publish().await;
    assert!(got.retain, "delivered as retained");
    assert_eq!(text(&got), "online");

    // Cleared on another node: gone everywhere.
    let (mut b, _) = Raw::connect_ok(n[1].mqtt(), v5("ret-clear")).await;
    let mut clear = publish("site/1/status", QoS::AtLeastOnce, 1, "");
    clear.retain = true;
    b.publish(clear).await;
    for node in &n {
        eventually("retained message cleared", || {
            node.get().broker.retained_topics().is_empty()
        })
        .await;
    }
    // A node that joins later gets the bucket's state.
    let (mut a2, _) = Raw::connect_ok(n[0].mqtt(), v5("ret-pub2")).await;
    let mut p = publish("site/2/status", QoS::AtLeastOnce, 1, "up");
    p.retain = true;
    a2.publish(p).await;
    let name = n[0].settings.cluster.name.clone();
    let late = TestServer::with(move |s| {
        s.cluster.enabled = true;
        s.cluster.nats_url = nats_url();
        s.cluster.name = name;
        s.cluster.node_id = "late".into();
    })
    .await;
    eventually("late node mirrors the retained messages", || {
        late.get().broker.retained_topics() == vec!["site/2/status".to_string()]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn a_client_id_connecting_to_another_node_takes_the_session_over() {
    let n = nodes("takeover", 2).await;
    let (mut first, _) = Raw::connect_ok(n[0].mqtt(), v5_persistent("meter-7", false, 3600)).await;
    first.subscribe(1, "cmd/meter-7", QoS::AtLeastOnce).await;
    let (mut second, _) = Raw::connect_ok(n[1].mqtt(), v5("meter-7")).await;
    first.expect_disconnect(reason::SESSION_TAKEN_OVER).await;
    eventually("the old node let the session go", || {
        n[0].get().broker.session("meter-7").is_none()
    })
    .await;
    eventually("the release is counted", || {
        cluster_counter(&n[0], "sessions_released") == 1
    })
    .await;
    second.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn a_will_reaches_subscribers_on_other_nodes() {
    let n = nodes("will", 2).await;
    let (mut watcher, _) = Raw::connect_ok(n[1].mqtt(), v5("watcher")).await;
    watcher.subscribe(1, "status/+", QoS::AtLeastOnce).await;
    let mut c = v5("truck-3");
    c.will = Some(will("status/truck-3", "lost"));
    let (dev, _) = Raw::connect_ok(n[0].mqtt(), c).await;
    dev.drop_abruptly().await;
    let got = match watcher.next(Duration::from_secs(5)).await {
        Next::Packet(Packet::Publish(p)) => p,
        other => panic!(
            "no will on node B: {other:?}; A: {:?}; B: {:?}",
            n[0].get().cluster.as_ref().map(|c| c.stats().counters()),
            n[1].get().cluster.as_ref().map(|c| c.stats().counters())
        ),
    };
    assert_eq!(
        (got.topic.as_str(), text(&got).as_str()),
        ("status/truck-3", "lost")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn the_api_lists_the_nodes_of_the_cluster() {
    let n = nodes("api", 3).await;
    let token = n[2].admin_token();
    let mut body = Value::Null;
    for _ in 0..50 {
        let resp = http_get_as(n[2].http(), "/api/v1/cluster", &token).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        body = resp.json();
        if body["nodes"].as_array().is_some_and(|a| a.len() == 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(body["enabled"], true, "{body}");
    assert_eq!(body["node_id"], "node-2");
    let ids: Vec<&str> = body["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node_id"].as_str())
        .collect();
    assert_eq!(ids, vec!["node-0", "node-1", "node-2"], "{body}");
    assert_eq!(body["nodes"][0]["mqtt"], n[0].mqtt().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn messages_of_one_qos_keep_their_order_across_nodes_despite_overlapping_filters() {
    let n = nodes("order", 2).await;
    let (mut sub, _) = Raw::connect_ok(n[1].mqtt(), v5("ordered-sub")).await;
    sub.subscribe(1, "line/#", QoS::AtLeastOnce).await;
    sub.subscribe(2, "line/+/count", QoS::AtLeastOnce).await;
    sub.subscribe(3, "line/4/count", QoS::AtLeastOnce).await;
    let (mut publisher, _) = Raw::connect_ok(n[0].mqtt(), v5("ordered-pub")).await;
    let total = 300u16;
    for i in 0..total {
        let p = publish("line/4/count", QoS::AtLeastOnce, i + 1, i.to_string());
        publisher.send(&Packet::Publish(p)).await;
    }
    let got = drain(&mut sub, GAP).await;
    let bodies: Vec<u16> = got
        .iter()
        .map(|(_, b, _)| b.parse().expect("a number"))
        .collect();
    assert_eq!(
        bodies,
        (0..total).collect::<Vec<_>>(),
        "once each, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn a_persistent_session_resumes_on_another_node_with_the_messages_it_missed() {
    let n = nodes("resume", 2).await;
    // A device with a persistent session on node 0 subscribes and leaves.
    let (mut dev, _) = Raw::connect_ok(n[0].mqtt(), v5_persistent("meter-9", true, 3600)).await;
    dev.subscribe(1, "cmd/meter-9/#", QoS::AtLeastOnce).await;
    dev.disconnect().await;
    // Commands are published (on node 1) while it is away; each is
    // acknowledged, so the cluster owes them to the device.
    let (mut ops, _) = Raw::connect_ok(n[1].mqtt(), v5("operator")).await;
    for i in 0..5u16 {
        assert_eq!(
            ops.publish(publish(
                "cmd/meter-9/set",
                QoS::AtLeastOnce,
                i + 1,
                format!("c{i}")
            ))
            .await,
            reason::SUCCESS
        );
    }
    // The device comes back through node 1: same session, every command.
    let (mut back, ack) = Raw::connect_ok(n[1].mqtt(), v5_persistent("meter-9", false, 3600)).await;
    assert!(ack.session_present, "the session was found in the cluster");
    let got: Vec<String> = drain(&mut back, GAP)
        .await
        .into_iter()
        .map(|(_, b, _)| b)
        .collect();
    assert_eq!(got, vec!["c0", "c1", "c2", "c3", "c4"]);
    assert_eq!(cluster_counter(&n[1], "sessions_restored"), 1);
    // Node 0 let its copy go.
    eventually("the old node let the session go", || {
        n[0].get().broker.session("meter-9").is_none()
    })
    .await;
    // And the subscription came along: a new command arrives directly.
    ops.publish(publish("cmd/meter-9/set", QoS::AtLeastOnce, 9, "c5"))
        .await;
    let p = back.recv_publish().await;
    assert_eq!(text(&p), "c5");
}

/// The issue's proof: a node holding 100 persistent sessions with queued
/// QoS 1 messages is killed (-9); the devices reconnect to another node and
/// get every message whose publisher was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn kill_9_of_a_node_loses_no_acknowledged_message_of_its_sessions() {
    let n = nodes("kill9", 1).await;
    let name = n[0].settings.cluster.name.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = nats_url();
    let mut victim = BinServer::start_with(
        &dir.path().join("data"),
        &dir.path().join("victim.log"),
        &["--cluster", "--nats-url", &url, "--node-id", "victim"],
        &[
            ("M2MHUB_CLUSTER_NAME", &name),
            // 100 devices connecting from 127.0.0.1 at once.
            ("M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP", "0"),
            ("M2MHUB_MQTT_MAX_CONNECTS_PER_CLIENT_ID", "0"),
        ],
    )
    .await;
    let devices = 100usize;
    for i in 0..devices {
        let id = format!("truck-{i}");
        let (mut c, _) = Raw::connect_ok(victim.mqtt, v5_persistent(&id, true, 86_400)).await;
        c.subscribe(1, &format!("fleet/{id}/cmd"), QoS::AtLeastOnce)
            .await;
        c.disconnect().await;
    }
    // Three commands per device through the surviving node, each acked.
    let (mut ops, _) = Raw::connect_ok(n[0].mqtt(), v5("dispatcher")).await;
    let mut pid = 0u16;
    for round in 0..3 {
        for i in 0..devices {
            pid += 1;
            let code = ops
                .publish(publish(
                    &format!("fleet/truck-{i}/cmd"),
                    QoS::AtLeastOnce,
                    pid,
                    format!("{round}"),
                ))
                .await;
            assert_eq!(code, reason::SUCCESS);
        }
    }
    victim.kill9().await;
    // Every device comes back through the survivor.
    for i in 0..devices {
        let id = format!("truck-{i}");
        let (mut c, ack) = Raw::connect_ok(n[0].mqtt(), v5_persistent(&id, false, 86_400)).await;
        assert!(ack.session_present, "{id}: session found in the cluster");
        let got: Vec<String> = drain(&mut c, Duration::from_millis(100))
            .await
            .into_iter()
            .map(|(_, b, _)| b)
            .collect();
        assert_eq!(got, vec!["0", "1", "2"], "{id}");
    }
    assert_eq!(cluster_counter(&n[0], "sessions_restored"), devices as u64);
}

/// Two nodes sharing their metadata in PostgreSQL (`storage.postgres_url`)
/// and their routing in NATS: a device created through one node connects
/// through the other, and disabling it through the first ends its session
/// on the second within a second. Needs both services (`.ci/run` starts
/// them): `M2MHUB_TEST_NATS_URL` and `M2MHUB_TEST_POSTGRES_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS and PostgreSQL: scripts/nats.sh, scripts/postgres.sh"]
async fn metadata_shared_in_postgresql_takes_effect_on_every_node() {
    let (_db, n) = pg_nodes("pg", 2, "pg-node").await;
    let admin = Api::admin(&n[0]);
    let secret = registered_device(&admin, "shared-1", None).await;
    // Node 1 learns of the device (announced by node 0) and lets it in.
    let mut c = v5("shared-1");
    c.username = Some("shared-1".into());
    c.password = Some(bytes::Bytes::from(secret.clone()));
    let mut dev = None;
    for _ in 0..50 {
        let (raw, ack) = Raw::connect(n[1].mqtt(), c.clone()).await;
        if ack.reason_code == reason::SUCCESS {
            dev = Some(raw);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut dev = dev.expect("the device connects through the other node");
    // The API of either node lists the device.
    let admin1 = Api::admin(&n[1]);
    let listed = admin1.expect("GET", "/devices", None, 200).await;
    assert!(
        listed["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d["id"] == "shared-1")),
        "{listed}"
    );
    // A rule created through node 0 runs on node 1, where the device's
    // readings enter: its alarm is in the shared store, seen through node 0.
    admin
        .expect(
            "POST",
            "/rules",
            Some(serde_json::json!({
                "id": "hot",
                "sql": "SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > 80",
                "actions": [{"type": "alarm", "alarm_type": "hot", "severity": "major"}]
            })),
            201,
        )
        .await;
    let mut alarmed = false;
    for i in 0..50u16 {
        dev.publish(publish(
            "devices/shared-1/telemetry",
            QoS::AtLeastOnce,
            i + 1,
            r#"{"temperature": 95}"#,
        ))
        .await;
        let alarms = admin
            .expect("GET", "/alarms?device=shared-1", None, 200)
            .await;
        if alarms["items"].as_array().is_some_and(|a| !a.is_empty()) {
            alarmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        alarmed,
        "the rule made on node 0 raised its alarm on node 1"
    );
    // Disabled through node 0: its session on node 1 ends at once.
    let t0 = std::time::Instant::now();
    admin
        .expect(
            "PATCH",
            "/devices/shared-1",
            Some(serde_json::json!({"enabled": false})),
            200,
        )
        .await;
    dev.expect_disconnect(reason::ADMINISTRATIVE_ACTION).await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // And node 1 refuses it from now on.
    let mut refused = false;
    for _ in 0..50 {
        if Raw::connect(n[1].mqtt(), c.clone()).await.1.reason_code != reason::SUCCESS {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "node 1 refuses the disabled device");
}

/// A rule's counters on one node; null while that node has not loaded it.
async fn rule_counters(api: &Api, path: &str) -> Value {
    let r = api.call("GET", path, None).await;
    match r.status {
        200 => r.json()["counters"].clone(),
        404 => Value::Null,
        s => panic!("GET {path}: {s}"),
    }
}

/// A rule over messages runs on one node of the cluster, which the fabric
/// sends every node's matching messages; when that node is killed, the
/// rule's lease expires and a surviving node runs it from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS and PostgreSQL: scripts/nats.sh, scripts/postgres.sh"]
async fn a_rule_keeps_firing_after_its_node_is_killed() {
    let db = m2mhub_pgstore::testing::TestDatabase::create().unwrap_or_else(|e| panic!("{e}"));
    let pg = db.url().expose().to_string();
    let name = cluster_name("rulekill");
    let url = nats_url();
    // A rule id the victim is the preferred owner of.
    let members = ["survivor".to_string(), "victim".to_string()];
    let rule = (0..)
        .map(|i| format!("overpressure-{i}"))
        .find(|r| m2mhub_cluster::leases::preferred_owner(r, &members) == Some("victim"))
        .expect("some id");
    let (pg2, name2, url2) = (pg.clone(), name.clone(), url.clone());
    let survivor = TestServer::with(move |s| {
        secure(s);
        s.storage.postgres_url = pg2;
        s.cluster.enabled = true;
        s.cluster.nats_url = url2;
        s.cluster.name = name2;
        s.cluster.node_id = "survivor".into();
    })
    .await;
    let admin = Api::admin(&survivor);
    let secret = registered_device(&admin, "press-7", None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut victim = BinServer::start_with(
        &dir.path().join("data"),
        &dir.path().join("victim.log"),
        &["--cluster", "--nats-url", &url, "--node-id", "victim"],
        &[
            ("M2MHUB_CLUSTER_NAME", &name),
            ("M2MHUB_STORAGE_POSTGRES_URL", &pg),
            ("M2MHUB_MQTT_ALLOW_ANONYMOUS", "false"),
        ],
    )
    .await;
    admin
        .expect(
            "POST",
            "/rules",
            Some(serde_json::json!({
                "id": rule,
                "sql": "SELECT device, pressure FROM 'devices/+/telemetry' WHERE pressure > 8",
                "actions": [{"type": "alarm", "alarm_type": "overpressure", "severity": "critical"}]
            })),
            201,
        )
        .await;
    let on_victim = Api {
        addr: victim.http,
        token: admin.token.clone(),
    };
    let counters = |api: &Api| {
        let api = Api {
            addr: api.addr,
            token: api.token.clone(),
        };
        let path = format!("/rules/{rule}");
        // Null until the node has loaded the rule.
        async move { rule_counters(&api, &path).await }
    };
    // The victim takes the rule's lease; the survivor does not run it.
    let mut placed = false;
    for _ in 0..100 {
        let (v, s) = (counters(&on_victim).await, counters(&admin).await);
        if v["runs_here"] == true && s["runs_here"] == false {
            placed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(placed, "the rule runs on its preferred node, the victim");
    // The device is connected to the survivor; its readings reach the
    // rule on the victim through the fabric.
    let mut c = v5("press-7");
    c.username = Some("press-7".into());
    c.password = Some(bytes::Bytes::from(secret));
    let (mut dev, _) = Raw::connect_ok(survivor.mqtt(), c.clone()).await;
    let alarms = || async {
        admin
            .expect("GET", "/alarms?device=press-7&status=active", None, 200)
            .await["items"]
            .as_array()
            .map_or(0, |a| a.len())
    };
    let mut fired = false;
    for i in 0..50u16 {
        dev.publish(publish(
            "devices/press-7/telemetry",
            QoS::AtLeastOnce,
            i + 1,
            r#"{"pressure": 9}"#,
        ))
        .await;
        if alarms().await > 0 {
            fired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fired, "the rule fired on the victim node");
    assert!(counters(&on_victim).await["fired"].as_u64() > Some(0));
    assert_eq!(
        counters(&admin).await["fired"],
        0,
        "evaluated once, not on both"
    );

    // Kill the victim: its lease expires and the survivor runs the rule.
    victim.kill9().await;
    let t0 = std::time::Instant::now();
    let mut fired_again = false;
    for i in 0..300u16 {
        dev.publish(publish(
            "devices/press-7/telemetry",
            QoS::AtLeastOnce,
            100 + i,
            r#"{"pressure": 9.5}"#,
        ))
        .await;
        if counters(&admin).await["fired"].as_u64() > Some(0) {
            fired_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fired_again, "the rule keeps firing on the surviving node");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(20), "took over after {took:?}");
    eprintln!("rule taken over {took:?} after kill -9");
}

/// A rule's group window (all devices together) counts every node's
/// messages once: it runs on one node only, fed by all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS and PostgreSQL: scripts/nats.sh, scripts/postgres.sh"]
async fn a_group_window_sees_every_nodes_messages_exactly_once() {
    let (_db, n) = pg_nodes("rulewin", 3, "win-node").await;
    let apis: Vec<Api> = n.iter().map(Api::admin).collect();
    let mut devices = Vec::new();
    for i in 0..3 {
        let id = format!("meter-{i}");
        let secret = registered_device(&apis[0], &id, None).await;
        let mut c = v5(&id);
        c.username = Some(id.clone());
        c.password = Some(bytes::Bytes::from(secret));
        devices.push(c);
    }
    apis[0]
        .expect(
            "POST",
            "/rules",
            Some(serde_json::json!({
                "id": "fleet-load",
                "sql": "SELECT count(*) AS n, sum(kw) AS kw FROM 'devices/+/telemetry' GROUP BY TUMBLING(1s)",
                "actions": []
            })),
            201,
        )
        .await;
    let counters = |api: &Api| {
        let api = Api {
            addr: api.addr,
            token: api.token.clone(),
        };
        async move { rule_counters(&api, "/rules/fleet-load").await }
    };
    // Exactly one node runs it.
    let mut owner = None;
    for _ in 0..100 {
        let mut running = Vec::new();
        for (i, a) in apis.iter().enumerate() {
            if counters(a).await["runs_here"] == true {
                running.push(i);
            }
        }
        if running.len() == 1 {
            owner = Some(running[0]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let owner = owner.expect("one node runs the rule");
    // One device per node.
    let mut conns = Vec::new();
    for (i, c) in devices.iter().enumerate() {
        // Until the node has read the new device from the shared store.
        let mut d = None;
        for _ in 0..100 {
            let (raw, ack) = Raw::connect(n[i].mqtt(), c.clone()).await;
            if ack.reason_code == reason::SUCCESS {
                d = Some(raw);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        conns.push(d.expect("the device connects"));
    }
    let received = || async {
        let mut r = Vec::new();
        for a in &apis {
            r.push(counters(a).await["received"].as_u64().unwrap_or(0));
        }
        r
    };
    // The owner's interest in the other nodes' readings takes effect at
    // NATS shortly after it took the lease (readings before that are its
    // own only): wait until one reading from each other node arrives.
    let mut pid = 100u16;
    for i in (0..3).filter(|i| *i != owner) {
        let mut through = false;
        for _ in 0..100 {
            let before = received().await[owner];
            pid += 1;
            conns[i]
                .publish(publish(
                    &format!("devices/meter-{i}/telemetry"),
                    QoS::AtLeastOnce,
                    pid,
                    r#"{"kw": 0}"#,
                ))
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if received().await[owner] > before {
                through = true;
                break;
            }
        }
        assert!(through, "node {i}'s readings reach the rule's node");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = received().await;
    // Each device publishes 5 readings.
    for (i, d) in conns.iter_mut().enumerate() {
        for k in 0..5u16 {
            d.publish(publish(
                &format!("devices/meter-{i}/telemetry"),
                QoS::AtLeastOnce,
                k + 1,
                r#"{"kw": 1.5}"#,
            ))
            .await;
        }
    }
    for _ in 0..100 {
        let now = received().await;
        if now.iter().zip(&base).map(|(a, b)| a - b).sum::<u64>() >= 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then a little longer: a copy too many would show up too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = received().await;
    let received: Vec<u64> = now.iter().zip(&base).map(|(a, b)| a - b).collect();
    let mut want = vec![0, 0, 0];
    want[owner] = 15;
    assert_eq!(
        received, want,
        "every reading reached the owner once, and only it"
    );
}

/// The TLS NATS server `scripts/nats.sh start-tls` made: its URL and the
/// folder with `ca.pem`, `client.pem` and `client-key.pem`.
fn nats_tls() -> (String, std::path::PathBuf) {
    let url = std::env::var("M2MHUB_TEST_NATS_TLS_URL").unwrap_or_else(|_| {
        panic!("M2MHUB_TEST_NATS_TLS_URL is not set: run scripts/nats.sh start-tls (see .ci/run)")
    });
    let dir = std::env::var("M2MHUB_TEST_NATS_TLS_DIR")
        .unwrap_or_else(|_| panic!("M2MHUB_TEST_NATS_TLS_DIR is not set"));
    (url, dir.into())
}

/// Nodes talk to NATS over TLS (verifying the server against the given CA,
/// presenting a client certificate); a node that does not trust the
/// server, or has no client certificate, cannot join, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a TLS NATS: scripts/nats.sh start-tls"]
async fn nodes_join_over_tls_and_refuse_an_untrusted_server() {
    let (url, dir) = nats_tls();
    let name = cluster_name("tls");
    let pem = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let mut n = Vec::new();
    for i in 0..2 {
        let (url, name) = (url.clone(), name.clone());
        let (ca, cert, key) = (pem("ca.pem"), pem("client.pem"), pem("client-key.pem"));
        n.push(
            TestServer::with(move |s| {
                s.cluster.enabled = true;
                s.cluster.nats_url = url;
                s.cluster.name = name;
                s.cluster.node_id = format!("tls-node-{i}");
                s.cluster.nats_ca = ca;
                s.cluster.nats_cert = cert;
                s.cluster.nats_key = key;
            })
            .await,
        );
    }
    let (mut sub, _) = Raw::connect_ok(n[1].mqtt(), v5("tls-sub")).await;
    sub.subscribe(1, "secure/+", QoS::AtLeastOnce).await;
    let (mut publisher, _) = Raw::connect_ok(n[0].mqtt(), v5("tls-pub")).await;
    publisher
        .publish(publish("secure/1", QoS::AtLeastOnce, 1, "over tls"))
        .await;
    let got = drain(&mut sub, GAP).await;
    assert_eq!(
        got,
        vec![("secure/1".into(), "over tls".into(), QoS::AtLeastOnce)]
    );

    // Not trusting the server's CA (the system's roots), or trusting it
    // but without a client certificate: refused.
    for (ca, with_cert) in [(None, true), (Some(pem("ca.pem")), false)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = test_settings(tmp.path());
        s.cluster.enabled = true;
        s.cluster.nats_url = url.clone();
        s.cluster.name = name.clone();
        s.cluster.node_id = "tls-outsider".into();
        s.cluster.nats_tls = true;
        s.cluster.nats_ca = ca.clone().unwrap_or_default();
        if with_cert {
            s.cluster.nats_cert = pem("client.pem");
            s.cluster.nats_key = pem("client-key.pem");
        }
        let v = s.validate().expect("valid settings");
        let r = within("a refused join", m2mhub::server::Server::start(&v)).await;
        let e = match r {
            Ok(_) => panic!("joined although ca={ca:?} client cert={with_cert}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains("cannot join the cluster"), "{e}");
        eprintln!("refused as expected: {e}");
    }
}

/// An alarm raised on one node (where its rule runs) and acknowledged or
/// cleared through another node's API changes on the raising node too: it
/// neither keeps re-raising a stale copy nor writes it back over the
/// operator's change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS and PostgreSQL: scripts/nats.sh, scripts/postgres.sh"]
async fn an_alarm_acknowledged_and_cleared_through_another_node_changes_everywhere() {
    use m2mhub_fleet::{RaiseOutcome, Severity};
    let (_db, n) = pg_nodes("alarms", 2, "alarm-node").await;
    let f0 = n[0].get().fleet.clone();
    let raise = || {
        f0.raise_alarm(
            "default",
            "pump-1",
            "dry_run",
            Severity::Major,
            serde_json::json!({}),
            None,
        )
        .expect("raise")
    };
    let (a, _) = raise();
    f0.flush().expect("flush");
    let api1 = Api::admin(&n[1]);
    api1.expect("POST", &format!("/alarms/{}/ack", a.id), None, 200)
        .await;
    let mut acked = false;
    for _ in 0..50 {
        if f0
            .active_alarm("default", "pump-1", "dry_run")
            .is_some_and(|a| a.acked)
        {
            acked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(acked, "the raising node sees the acknowledgement");
    // A repeat keeps the acknowledgement (it is not written back unacked).
    let (again, outcome) = raise();
    assert_eq!(
        (again.id, outcome, again.acked),
        (a.id, RaiseOutcome::Updated, true)
    );
    f0.flush().expect("flush");

    let cleared = api1
        .expect("POST", &format!("/alarms/{}/clear", a.id), None, 200)
        .await;
    assert_eq!(cleared["status"], "cleared", "{cleared}");
    let mut gone = false;
    for _ in 0..50 {
        if f0.active_alarm("default", "pump-1", "dry_run").is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the raising node no longer holds the cleared alarm");
    // The next raise is a new alarm, not the cleared one brought back.
    let (b, outcome) = raise();
    assert_eq!(outcome, RaiseOutcome::Created);
    assert_ne!(b.id, a.id);
    f0.flush().expect("flush");
    let old = api1
        .expect("GET", &format!("/alarms/{}", a.id), None, 200)
        .await;
    assert_eq!(old["status"], "cleared", "{old}");
}

/// When the fabric falls behind, QoS 1 messages wait (their PUBACK comes
/// once JetStream has them) instead of being dropped or refused, and
/// every one arrives on the other node; QoS 0 beyond the forward queue is
/// dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: scripts/nats.sh"]
async fn a_slow_fabric_slows_qos1_publishers_down_instead_of_dropping() {
    let name = cluster_name("backpressure");
    let url = nats_url();
    let mut n = Vec::new();
    for i in 0..2 {
        let (name, url) = (name.clone(), url.clone());
        n.push(
            TestServer::with(move |s| {
                s.cluster.enabled = true;
                s.cluster.nats_url = url;
                s.cluster.name = name;
                s.cluster.node_id = format!("bp-node-{i}");
                // A tiny queue: the fabric is "behind" all the time.
                s.cluster.forward_queue = 1;
            })
            .await,
        );
    }
    let (mut sub, _) = Raw::connect_ok(n[1].mqtt(), v5("bp-sub")).await;
    sub.subscribe(1, "bp/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = Raw::connect_ok(n[0].mqtt(), v5("bp-pub")).await;
    // QoS 1 in windows of 50 unacknowledged (under Receive Maximum).
    const TOTAL: u16 = 2000;
    let mut codes = Vec::new();
    let subscriber = tokio::spawn(async move {
        let mut got = std::collections::HashSet::new();
        loop {
            match sub.next(Duration::from_secs(5)).await {
                Next::Packet(Packet::Publish(p)) => {
                    if let Some(id) = p.packet_id {
                        sub.puback(id).await;
                    }
                    if p.topic == "bp/q1" {
                        got.insert(p.payload.to_vec());
                    }
                }
                _ => return got,
            }
        }
    });
    for start in (1..=TOTAL).step_by(50) {
        let end = (start + 49).min(TOTAL);
        for pid in start..=end {
            publisher
                .send(&Packet::Publish(publish(
                    "bp/q1",
                    QoS::AtLeastOnce,
                    pid,
                    pid.to_string(),
                )))
                .await;
        }
        for _ in start..=end {
            match publisher.next(Duration::from_secs(10)).await {
                Next::Packet(Packet::PubAck(a)) => codes.push(a.reason_code),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }
    assert!(
        codes.iter().all(|c| *c == reason::SUCCESS),
        "every QoS 1 PUBACK is a success: {:?}",
        codes
            .iter()
            .filter(|c| **c != reason::SUCCESS)
            .take(5)
            .collect::<Vec<_>>()
    );
    let got = subscriber.await.expect("subscriber");
    assert_eq!(got.len(), usize::from(TOTAL), "every QoS 1 message crossed");
    // QoS 0 over the bound: dropped, and counted.
    for _ in 0..5000 {
        publisher
            .send(&Packet::Publish(publish("bp/q0", QoS::AtMostOnce, 0, "x")))
            .await;
    }
    publisher.ping().await;
    assert!(cluster_counter(&n[0], "forward_dropped") > 0);
}
