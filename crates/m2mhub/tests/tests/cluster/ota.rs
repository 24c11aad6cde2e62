//! OTA campaigns in a cluster (NATS + PostgreSQL): a campaign made through
//! one node reaches a device connected to another, which downloads the
//! image through its own node (copied from the cluster's object store and
//! checked), and its reports move the campaign on wherever it is driven;
//! a campaign's driving node killed with `kill -9` hands it to a survivor.

use super::{cluster_name, nats_url, pg_nodes};
use crate::common::*;
use crate::ota::{creds, fetch, image, next_on, send, sha256_hex, upload};
use mqtt_codec::{reason, Packet, QoS};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Connect a device, retrying while the node has not yet read it (it was
/// registered through another node) from the shared store.
async fn connect_device(addr: SocketAddr, id: &str, secret: &str) -> Raw {
    for _ in 0..100 {
        let (raw, ack) = Raw::connect(addr, creds(v5(id), id, secret)).await;
        if ack.reason_code == reason::SUCCESS {
            return raw;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} cannot connect to {addr}");
}

async fn listen(d: &mut Raw, id: &str) {
    for (pid, f) in [
        (1, format!("devices/{id}/ota/job")),
        (2, format!("devices/{id}/ota/status/+")),
        (3, format!("devices/{id}/ota/chunk/+")),
    ] {
        d.subscribe(pid, &f, QoS::AtLeastOnce).await;
    }
}

/// Ask for the device's job (`ota/job/get`) until an answer (or a job the
/// platform sends by itself) names campaign `cid`, with a download URL on
/// `via` when given (a job told by another node carries that node's URL).
async fn job_of(d: &mut Raw, id: &str, cid: &str, via: Option<SocketAddr>, pid: &mut u16) -> Value {
    let topic = format!("devices/{id}/ota/job");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(40) {
        *pid += 1;
        send(d, *pid, &format!("devices/{id}/ota/job/get"), json!({})).await;
        let until = Instant::now() + Duration::from_secs(1);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match d.next(left).await {
                Next::Packet(Packet::Publish(p)) => {
                    if let Some(id) = p.packet_id {
                        d.puback(id).await;
                    }
                    if p.topic != topic {
                        continue;
                    }
                    let v: Value = serde_json::from_slice(&p.payload).expect("job JSON");
                    let url_ok = via.is_none_or(|a| {
                        v["url"]
                            .as_str()
                            .is_some_and(|u| u.contains(&format!("//{a}/")))
                    });
                    if v["jobId"] == cid && v["state"] != "cancelled" && url_ok {
                        return v;
                    }
                }
                Next::Packet(_) => {}
                Next::Timeout => break,
                Next::Closed => panic!("{id}'s connection closed"),
            }
        }
    }
    panic!("{id} got no job of campaign {cid}");
}

/// Report a state and insist it is accepted.
async fn report(d: &mut Raw, id: &str, pid: &mut u16, body: Value) {
    *pid += 1;
    send(d, *pid, &format!("devices/{id}/ota/status"), body.clone()).await;
    let p = next_on(d, &format!("devices/{id}/ota/status/accepted")).await;
    let acc: Value = serde_json::from_slice(&p.payload).expect("JSON");
    assert_eq!(acc["state"], body["state"], "{acc}");
}

async fn succeed(d: &mut Raw, id: &str, cid: &str, version: &str, pid: &mut u16) {
    for body in [
        json!({"jobId": cid, "state": "downloading", "progress": 100}),
        json!({"jobId": cid, "state": "installing"}),
        json!({"jobId": cid, "state": "succeeded", "version": version}),
    ] {
        report(d, id, pid, body).await;
    }
}

/// The campaign as `api`'s node shows it, once `done` holds (within 40 s).
async fn wait_campaign(api: &Api, cid: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let r = api
            .call("GET", &format!("/ota/campaigns/{cid}"), None)
            .await;
        if r.status == 200 {
            let v = r.json();
            if done(&v) {
                return v;
            }
            if t0.elapsed() > Duration::from_secs(40) {
                panic!("{what}: the campaign stayed {v}");
            }
        } else if t0.elapsed() > Duration::from_secs(40) {
            panic!("{what}: GET campaign {cid}: {} {}", r.status, r.body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS and PostgreSQL: scripts/nats.sh, scripts/postgres.sh"]
async fn a_campaign_made_on_one_node_updates_a_device_connected_to_another() {
    let (_db, n) = pg_nodes("ota", 2, "ota-node").await;
    let admin = Api::admin(&n[0]);
    let on_1 = Api {
        addr: n[1].http(),
        token: admin.token.clone(),
    };
    let ids = ["valve-a", "valve-b"];
    let mut secrets = Vec::new();
    for id in ids {
        secrets.push(registered_device(&admin, id, None).await);
    }
    // The image is uploaded to node 0 only.
    let img = image(150_000, 3);
    let r = upload(
        n[0].http(),
        &admin.token,
        "name=valve-fw&version=3.0.0",
        &img,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let art_id = r.json()["id"].as_str().expect("id").to_string();
    let cached_on_1 = n[1]
        .settings
        .data_dir
        .join("ota")
        .join("artifacts")
        .join(&art_id);
    assert!(!cached_on_1.exists(), "node 1 has no copy yet");

    // Both devices are connected to node 1.
    let mut devs = Vec::new();
    for (id, secret) in ids.iter().zip(&secrets) {
        let mut d = connect_device(n[1].mqtt(), id, secret).await;
        listen(&mut d, id).await;
        devs.push(d);
    }
    let c = admin
        .expect(
            "POST",
            "/ota/campaigns",
            Some(
                json!({"artifact": art_id, "devices": ids, "waves": [{"count": 1}, {"count": 1}]}),
            ),
            201,
        )
        .await;
    let cid = c["id"].as_str().expect("campaign id").to_string();
    let mut pid = 100u16;

    // valve-a gets its job through node 1, with node 1's download URL, and
    // downloads the image through node 1 (copied from the cluster's store).
    let job = job_of(&mut devs[0], ids[0], &cid, Some(n[1].http()), &mut pid).await;
    assert_eq!(job["state"], "notified");
    assert_eq!(job["artifact"]["sha256"], sha256_hex(&img));
    let url = job["url"].as_str().expect("url").to_string();
    let whole = fetch(&url, None).await;
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.body)
    );
    assert_eq!(sha256_hex(&whole.body), sha256_hex(&img));
    let tail = fetch(&url, Some("bytes=100000-")).await;
    assert_eq!(tail.status, 206);
    assert_eq!(
        tail.header("content-range"),
        Some("bytes 100000-149999/150000")
    );
    assert_eq!(&tail.body[..], &img[100_000..]);
    assert!(cached_on_1.exists(), "node 1 keeps its copy");
    // Signed with the cluster's one URL key: the same URL works through
    // node 0 (devices may reach HTTP through a balancer).
    let via_0 = url.replace(&n[1].http().to_string(), &n[0].http().to_string());
    let head = fetch(&via_0, Some("bytes=0-99")).await;
    assert_eq!(head.status, 206, "{}", String::from_utf8_lossy(&head.body));
    assert_eq!(&head.body[..], &img[..100]);
    // A chunk over MQTT through node 1 too.
    pid += 1;
    send(
        &mut devs[0],
        pid,
        &format!("devices/{}/ota/chunk/get", ids[0]),
        json!({"jobId": cid, "chunk": 2, "size": 4096}),
    )
    .await;
    let chunk = next_on(&mut devs[0], &format!("devices/{}/ota/chunk/2", ids[0])).await;
    assert_eq!(&chunk.payload[..], &img[2 * 4096..3 * 4096]);
    succeed(&mut devs[0], ids[0], &cid, "3.0.0", &mut pid).await;

    // Node 0's API sees the job succeeded and the second wave started,
    // whichever node drives the campaign.
    let v = wait_campaign(&admin, &cid, "valve-a succeeded, wave 2 started", |c| {
        c["jobs"]["succeeded"] == 1 && c["waves"][1]["started_ms"].is_number()
    })
    .await;
    assert_eq!(v["status"], "running", "{v}");
    let drivers = [
        v["driven_here"].as_bool(),
        on_1.expect("GET", &format!("/ota/campaigns/{cid}"), None, 200)
            .await["driven_here"]
            .as_bool(),
    ];
    assert_eq!(
        drivers.iter().filter(|d| **d == Some(true)).count(),
        1,
        "one node drives the campaign: {drivers:?}"
    );

    let job = job_of(&mut devs[1], ids[1], &cid, Some(n[1].http()), &mut pid).await;
    let got = fetch(job["url"].as_str().expect("url"), None).await;
    assert_eq!(sha256_hex(&got.body), sha256_hex(&img));
    succeed(&mut devs[1], ids[1], &cid, "3.0.0", &mut pid).await;
    let v = wait_campaign(&admin, &cid, "completed", |c| c["status"] == "completed").await;
    assert_eq!(v["jobs"]["succeeded"], 2, "{v}");
    let shadow = on_1
        .expect("GET", &format!("/devices/{}/shadow", ids[1]), None, 200)
        .await;
    assert_eq!(
        shadow["state"]["reported"]["firmware"]["version"], "3.0.0",
        "{shadow}"
    );

    // Deleting the artifact deletes the shared image and node 1's copy.
    admin
        .expect("DELETE", &format!("/ota/artifacts/{art_id}"), None, 204)
        .await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let still = n[0]
        .get()
        .cluster
        .as_ref()
        .expect("clustered")
        .fetch_image(&art_id, &tmp.path().join("img"))
        .await
        .expect("the object store answers");
    assert!(!still, "the image is gone from the cluster's store");
    let t0 = Instant::now();
    while cached_on_1.exists()
        || on_1
            .call("GET", &format!("/ota/artifacts/{art_id}"), None)
            .await
            .status
            != 404
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "node 1 forgets the artifact"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node driving a campaign is killed mid-way (its second wave under
/// way): its lease expires, a survivor drives the campaign from the
/// stored state, starts the third wave and completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS and PostgreSQL: scripts/nats.sh, scripts/postgres.sh"]
async fn a_campaign_goes_on_after_its_driving_node_is_killed() {
    let db = m2mhub_pgstore::testing::TestDatabase::create().unwrap_or_else(|e| panic!("{e}"));
    let pg = db.url().expose().to_string();
    let name = cluster_name("otakill");
    let url = nats_url();
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
    let on_victim = Api {
        addr: victim.http,
        token: admin.token.clone(),
    };
    let ids = ["pump-1", "pump-2", "pump-3"];
    // The devices stay connected to the survivor throughout.
    let mut devs = Vec::new();
    for id in ids {
        let secret = registered_device(&admin, id, None).await;
        let mut d = connect_device(survivor.mqtt(), id, &secret).await;
        listen(&mut d, id).await;
        devs.push(d);
    }
    let r = upload(
        survivor.http(),
        &admin.token,
        "name=pump-fw&version=4.0.0",
        &image(20_000, 9),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let art_id = r.json()["id"].as_str().expect("id").to_string();

    // A campaign the victim drives: campaign ids are random and spread by
    // rendezvous hashing, so cancel those the survivor takes and make
    // another (cancelled campaigns free their devices).
    let mut cid = None;
    for _ in 0..12 {
        let c = admin
            .expect(
                "POST",
                "/ota/campaigns",
                Some(json!({"artifact": art_id, "devices": ids,
                            "waves": [{"count": 1}, {"count": 1}, {"count": 1}]})),
                201,
            )
            .await;
        let id = c["id"].as_str().expect("id").to_string();
        let t0 = Instant::now();
        let mut driver = None;
        while driver.is_none() && t0.elapsed() < Duration::from_secs(15) {
            let path = format!("/ota/campaigns/{id}");
            let v = on_victim.call("GET", &path, None).await;
            if v.status == 200 && v.json()["driven_here"] == true {
                driver = Some("victim");
            } else if admin.expect("GET", &path, None, 200).await["driven_here"] == true {
                driver = Some("survivor");
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        match driver {
            Some("victim") => {
                cid = Some(id);
                break;
            }
            _ => {
                admin
                    .expect("POST", &format!("/ota/campaigns/{id}/cancel"), None, 200)
                    .await;
            }
        }
    }
    let cid = cid.expect("a campaign driven by the victim");
    let mut pid = 100u16;
    // Each device's job may have been cancelled by an earlier attempt:
    // job_of looks for this campaign's.
    job_of(&mut devs[0], ids[0], &cid, None, &mut pid).await;
    succeed(&mut devs[0], ids[0], &cid, "4.0.0", &mut pid).await;
    // The victim starts the second wave; pump-2 is told (through the
    // survivor, where it is connected).
    job_of(&mut devs[1], ids[1], &cid, None, &mut pid).await;
    let before = wait_campaign(&admin, &cid, "wave 2 started", |c| {
        c["waves"][1]["started_ms"].is_number()
    })
    .await;
    assert!(before["waves"][2]["started_ms"].is_null(), "{before}");

    victim.kill9().await;
    let killed = Instant::now();
    // pump-2 finishes through the survivor (its report needs no driver).
    succeed(&mut devs[1], ids[1], &cid, "4.0.0", &mut pid).await;
    // The survivor takes the lease over and starts the third wave.
    let job = job_of(&mut devs[2], ids[2], &cid, None, &mut pid).await;
    assert_eq!(job["state"], "notified");
    let took = killed.elapsed();
    succeed(&mut devs[2], ids[2], &cid, "4.0.0", &mut pid).await;
    let v = wait_campaign(&admin, &cid, "completed by the survivor", |c| {
        c["status"] == "completed"
    })
    .await;
    assert_eq!(v["jobs"]["succeeded"], 3, "{v}");
    assert_eq!(v["driven_here"], true, "{v}");
    assert!(took < Duration::from_secs(30), "taken over after {took:?}");
    eprintln!("campaign taken over {took:?} after kill -9");
}

/// An image only on one node's disk (uploaded before the cluster kept
/// images) is put in the cluster's store when that node starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS and PostgreSQL: scripts/nats.sh, scripts/postgres.sh"]
async fn images_only_on_a_nodes_disk_are_shared_when_it_starts() {
    let (_db, mut n) = pg_nodes("otaimg", 2, "img-node").await;
    let admin = Api::admin(&n[0]);
    let img = image(70_000, 5);
    let r = upload(n[0].http(), &admin.token, "name=old-fw&version=1.0.0", &img).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let art_id = r.json()["id"].as_str().expect("id").to_string();
    let cluster = |s: &TestServer| s.get().cluster.clone().expect("clustered");
    cluster(&n[1])
        .delete_image(&art_id)
        .await
        .expect("delete the shared copy");
    assert!(!cluster(&n[1]).has_image(&art_id).await.expect("ask"));

    n[0].restart().await;
    let t0 = Instant::now();
    while !cluster(&n[1]).has_image(&art_id).await.expect("ask") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the image is shared again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dest = tmp.path().join("img");
    assert!(cluster(&n[1])
        .fetch_image(&art_id, &dest)
        .await
        .expect("fetch"));
    assert_eq!(
        sha256_hex(&std::fs::read(&dest).expect("read")),
        sha256_hex(&img)
    );
}
