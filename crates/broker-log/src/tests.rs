//! Store-level tests: persistence, recovery from torn tails, compaction and
//! concurrency.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::*;

fn msg(topic: &str, payload: &str) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: 1,
        retain: true,
        payload_format_indicator: Some(1),
        expires_at_ms: Some(1_700_000_000_000),
        content_type: Some("text/plain".into()),
        response_topic: None,
        correlation_data: Some(Bytes::from_static(b"corr")),
        user_properties: vec![("k".into(), "v".into())],
    })
}

fn session(id: &str, filters: &[&str]) -> StoredSession {
    StoredSession {
        client_id: id.into(),
        protocol_v5: true,
        expiry_interval: 3600,
        disconnected_at_ms: Some(12345),
        subscriptions: filters
            .iter()
            .map(|f| StoredSubscription {
                filter: (*f).into(),
                options: 1,
                subscription_id: Some(7),
            })
            .collect(),
    }
}

fn opts() -> StoreOptions {
    StoreOptions::default()
}

fn open(dir: &Path) -> (Store, Recovered) {
    Store::open(dir, opts()).expect("open")
}

fn reopen(dir: &Path) -> Recovered {
    open(dir).1
}

fn log_file(dir: &Path) -> std::path::PathBuf {
    dir.join("broker.log")
}

fn file_len(dir: &Path) -> u64 {
    std::fs::metadata(log_file(dir)).expect("stat").len()
}

#[test]
fn empty_store_creates_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("a/b");
    let (store, rec) = open(&sub);
    assert_eq!(rec, Recovered::default());
    drop(store);
    assert_eq!(std::fs::read(log_file(&sub)).expect("read"), b"M2MHLOG1");
    assert_eq!(reopen(&sub), Recovered::default());
}

#[test]
fn bad_magic_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(log_file(dir.path()), b"NOTALOG1xxxx").expect("write");
    let err = Store::open(dir.path(), opts()).expect_err("must fail");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

#[test]
fn torn_magic_reinitialised() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(log_file(dir.path()), b"M2MH").expect("write");
    let (store, rec) = open(dir.path());
    assert_eq!(rec, Recovered::default());
    store
        .commit_blocking(vec![Op::RetainPut(msg("a", "1"))])
        .expect("commit");
    drop(store);
    assert_eq!(reopen(dir.path()).retained.len(), 1);
}

#[test]
fn reopen_recovers_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    store
        .commit_blocking(vec![
            Op::RetainPut(msg("a/b", "1")),
            Op::RetainPut(msg("a/c", "2")),
            Op::SessionPut(session("c1", &["a/#", "b/+"])),
            Op::Enqueue {
                client_id: "c1".into(),
                seq: 5,
                msg: msg("a/b", "q5"),
            },
        ])
        .expect("commit");
    store
        .commit_blocking(vec![
            Op::Enqueue {
                client_id: "c1".into(),
                seq: 3,
                msg: msg("a/b", "q3"),
            },
            Op::SessionPut(session("c2", &[])),
            Op::RetainPut(msg("a/b", "1-new")),
        ])
        .expect("commit");
    drop(store);

    let rec = reopen(dir.path());
    assert_eq!(rec.next_seq, 6);
    assert_eq!(rec.retained, vec![msg("a/b", "1-new"), msg("a/c", "2")]);
    assert_eq!(rec.sessions.len(), 2);
    assert_eq!(rec.sessions[0].session, session("c1", &["a/#", "b/+"]));
    assert_eq!(
        rec.sessions[0].queue,
        vec![(3, msg("a/b", "q3")), (5, msg("a/b", "q5"))]
    );
    assert_eq!(rec.sessions[1].session, session("c2", &[]));
    assert!(rec.sessions[1].queue.is_empty());
    // Reopening again is stable.
    assert_eq!(reopen(dir.path()), rec);
}

#[test]
fn deletes_and_acks_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    store
        .commit_blocking(vec![
            Op::RetainPut(msg("x", "1")),
            Op::RetainPut(msg("y", "2")),
            Op::SessionPut(session("keep", &["#"])),
            Op::SessionPut(session("gone", &["#"])),
            Op::Enqueue {
                client_id: "keep".into(),
                seq: 1,
                msg: msg("x", "a"),
            },
            Op::Enqueue {
                client_id: "keep".into(),
                seq: 2,
                msg: msg("x", "b"),
            },
            Op::Enqueue {
                client_id: "gone".into(),
                seq: 3,
                msg: msg("x", "c"),
            },
        ])
        .expect("commit");
    store.submit(vec![Op::Ack {
        client_id: "keep".into(),
        seq: 1,
    }]);
    store.submit(vec![Op::Ack {
        client_id: "keep".into(),
        seq: 99, // unknown: ignored, but counts towards next_seq
    }]);
    store
        .commit_blocking(vec![
            Op::RetainDelete { topic: "x".into() },
            Op::SessionDelete {
                client_id: "gone".into(),
            },
        ])
        .expect("commit");
    // Session metadata update keeps the queue.
    store.submit(vec![Op::SessionPut(session("keep", &["only/this"]))]);
    store.flush_blocking().expect("flush");
    drop(store);

    let rec = reopen(dir.path());
    assert_eq!(rec.retained, vec![msg("y", "2")]);
    assert_eq!(rec.sessions.len(), 1);
    assert_eq!(rec.sessions[0].session, session("keep", &["only/this"]));
    assert_eq!(rec.sessions[0].queue, vec![(2, msg("x", "b"))]);
    assert_eq!(rec.next_seq, 100);
}

#[test]
fn enqueue_before_session_put_is_kept_orphans_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    store
        .commit_blocking(vec![
            Op::Enqueue {
                client_id: "late".into(),
                seq: 1,
                msg: msg("t", "1"),
            },
            Op::Enqueue {
                client_id: "orphan".into(),
                seq: 2,
                msg: msg("t", "2"),
            },
        ])
        .expect("commit");
    store
        .commit_blocking(vec![Op::SessionPut(session("late", &[]))])
        .expect("commit");
    drop(store);
    let rec = reopen(dir.path());
    assert_eq!(rec.sessions.len(), 1);
    assert_eq!(rec.sessions[0].session.client_id, "late");
    assert_eq!(rec.sessions[0].queue, vec![(1, msg("t", "1"))]);
    assert_eq!(rec.next_seq, 3);
}

/// Writes batches and returns the file length after each one.
fn write_batches(dir: &Path, n: usize) -> Vec<u64> {
    let (store, _) = open(dir);
    let mut lens = vec![file_len(dir)];
    store
        .commit_blocking(vec![Op::SessionPut(session("s", &["#"]))])
        .expect("commit");
    lens.push(file_len(dir));
    for i in 0..n {
        store
            .commit_blocking(vec![
                Op::RetainPut(msg(&format!("t/{i}"), "v")),
                Op::Enqueue {
                    client_id: "s".into(),
                    seq: i as u64,
                    msg: msg("q", "p"),
                },
            ])
            .expect("commit");
        lens.push(file_len(dir));
    }
    lens
}

#[test]
fn torn_tail_at_every_offset() {
    let src = tempfile::tempdir().expect("tempdir");
    let lens = write_batches(src.path(), 3);
    let full = std::fs::read(log_file(src.path())).expect("read");
    let before_last = lens[lens.len() - 2];
    let expected_prev = {
        let copy = tempfile::tempdir().expect("tempdir");
        std::fs::write(log_file(copy.path()), &full[..before_last as usize]).expect("write");
        reopen(copy.path())
    };
    assert_eq!(expected_prev.retained.len(), 2);
    assert_eq!(expected_prev.next_seq, 2);
    for cut in before_last..full.len() as u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(log_file(dir.path()), &full[..cut as usize]).expect("write");
        let (store, rec) = Store::open(dir.path(), opts()).expect("torn tail must not fail open");
        assert_eq!(rec, expected_prev, "cut at {cut}");
        assert_eq!(file_len(dir.path()), before_last, "truncated at {cut}");
        store
            .commit_blocking(vec![Op::RetainPut(msg("after", "x"))])
            .expect("commit after repair");
        drop(store);
        let rec = reopen(dir.path());
        assert_eq!(rec.retained.len(), 3, "cut at {cut}");
        assert!(rec.retained.iter().any(|m| m.topic == "after"));
    }
}

#[test]
fn bad_crc_in_last_record_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lens = write_batches(dir.path(), 3);
    let mut data = std::fs::read(log_file(dir.path())).expect("read");
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(log_file(dir.path()), &data).expect("write");
    let rec = reopen(dir.path());
    assert_eq!(rec.retained.len(), 2);
    assert_eq!(rec.sessions[0].queue.len(), 2);
    assert_eq!(file_len(dir.path()), lens[lens.len() - 2]);
}

#[test]
fn corrupt_middle_record_cuts_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lens = write_batches(dir.path(), 4);
    let mut data = std::fs::read(log_file(dir.path())).expect("read");
    // Corrupt a body byte of the third retained batch (index 4 in lens is its end).
    let pos = lens[3] as usize + 10;
    data[pos] ^= 0x55;
    std::fs::write(log_file(dir.path()), &data).expect("write");
    let rec = reopen(dir.path());
    assert_eq!(rec.retained.len(), 2);
    assert_eq!(file_len(dir.path()), lens[3]);
}

#[test]
fn compaction_shrinks_and_preserves_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        durability: Durability::Write,
        compact_threshold_bytes: 8 * 1024,
    };
    let (store, _) = Store::open(dir.path(), options.clone()).expect("open");
    let mut retained: BTreeMap<String, Arc<StoredMessage>> = BTreeMap::new();
    let mut queue: BTreeMap<u64, Arc<StoredMessage>> = BTreeMap::new();
    store
        .commit_blocking(vec![Op::SessionPut(session("s", &["#"]))])
        .expect("commit");
    let mut seq = 0u64;
    let mut max_len = 0;
    for i in 0..3000u64 {
        let topic = format!("t/{}", i % 10);
        let m = msg(&topic, &"x".repeat(100));
        let mut ops = vec![Op::RetainPut(m.clone())];
        retained.insert(topic.clone(), m.clone());
        if i % 3 == 0 {
            ops.push(Op::RetainDelete {
                topic: topic.clone(),
            });
            retained.remove(&topic);
        }
        ops.push(Op::Enqueue {
            client_id: "s".into(),
            seq,
            msg: m.clone(),
        });
        queue.insert(seq, m);
        if seq >= 10 {
            ops.push(Op::Ack {
                client_id: "s".into(),
                seq: seq - 10,
            });
            queue.remove(&(seq - 10));
        }
        // A few orphan queue entries, dropped by compaction.
        if i < 5 {
            ops.push(Op::Enqueue {
                client_id: "nobody".into(),
                seq: seq + 1,
                msg: msg("o", "o"),
            });
        }
        seq += 2;
        store.commit_blocking(ops).expect("commit");
        max_len = max_len.max(file_len(dir.path()));
    }
    // Ack everything: next_seq must survive compaction without any queued message.
    let acks: Vec<Op> = queue
        .keys()
        .map(|s| Op::Ack {
            client_id: "s".into(),
            seq: *s,
        })
        .collect();
    queue.clear();
    store.commit_blocking(acks).expect("commit");
    let stats = store.stats();
    assert!(stats.compactions > 0, "{stats:?}");
    assert!(stats.log_bytes < 64 * 1024, "{stats:?}");
    assert_eq!(stats.log_bytes, file_len(dir.path()));
    assert!(max_len < 64 * 1024, "max log size {max_len}");
    assert!(!dir.path().join("broker.log.tmp").exists());
    drop(store);

    let (store, rec) = Store::open(dir.path(), options).expect("reopen");
    drop(store);
    let want_retained: Vec<_> = retained.values().cloned().collect();
    assert_eq!(rec.retained, want_retained);
    assert_eq!(rec.sessions.len(), 1);
    assert!(rec.sessions[0].queue.is_empty());
    assert_eq!(rec.next_seq, seq - 1);
}

#[test]
fn compaction_keeps_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        durability: Durability::Fsync,
        compact_threshold_bytes: 2 * 1024,
    };
    let (store, _) = Store::open(dir.path(), options.clone()).expect("open");
    store
        .commit_blocking(vec![Op::SessionPut(session("s", &["#"]))])
        .expect("commit");
    for i in 0..200u64 {
        store
            .commit_blocking(vec![
                Op::Enqueue {
                    client_id: "s".into(),
                    seq: i,
                    msg: msg("q", &i.to_string()),
                },
                Op::RetainPut(msg("r", &format!("{i}{}", "x".repeat(500)))),
            ])
            .expect("commit");
    }
    assert!(store.stats().compactions > 0);
    drop(store);
    let rec = reopen(dir.path());
    assert_eq!(
        rec.retained,
        vec![msg("r", &format!("199{}", "x".repeat(500)))]
    );
    let q = &rec.sessions[0].queue;
    assert_eq!(q.len(), 200);
    assert!(q
        .iter()
        .enumerate()
        .all(|(i, (s, m))| *s == i as u64 && **m == *msg("q", &i.to_string())));
    assert_eq!(rec.next_seq, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_all_persist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    store
        .commit(vec![Op::SessionPut(session("s", &["#"]))])
        .await
        .expect("commit");
    let mut tasks = Vec::new();
    for t in 0..50u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20u64 {
                let seq = t * 100 + i;
                store
                    .commit(vec![Op::Enqueue {
                        client_id: "s".into(),
                        seq,
                        msg: msg("q", &seq.to_string()),
                    }])
                    .await
                    .expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let stats = store.stats();
    assert_eq!(stats.records_written, 1001);
    assert!(stats.commits <= 1001);
    assert_eq!(stats.write_errors, 0);
    drop(store);
    let rec = reopen(dir.path());
    let q = &rec.sessions[0].queue;
    assert_eq!(q.len(), 1000);
    assert!(q.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(rec.next_seq, 49 * 100 + 20);
}

#[tokio::test]
async fn commit_resolves_after_data_in_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    for i in 0..20u64 {
        let before = file_len(dir.path());
        store
            .commit(vec![Op::RetainPut(msg(&format!("t/{i}"), "v"))])
            .await
            .expect("commit");
        // The store is still open: copy the log as a kill -9 would leave it.
        assert!(file_len(dir.path()) > before);
        let copy = tempfile::tempdir().expect("tempdir");
        std::fs::copy(log_file(dir.path()), log_file(copy.path())).expect("copy");
        let rec = reopen(copy.path());
        assert_eq!(rec.retained.len() as u64, i + 1);
    }
    assert_eq!(store.stats().log_bytes, file_len(dir.path()));
}

#[test]
fn dropping_last_clone_drains_queued_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    let clone = store.clone();
    drop(store);
    clone.submit(vec![Op::RetainPut(msg("a", "1"))]);
    clone.flush_blocking().expect("flush");
    let fut = clone.commit(vec![Op::RetainPut(msg("b", "1"))]);
    drop(clone); // writer drains the queued commit before exiting
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    rt.block_on(fut).expect("queued commit completes on close");
    assert_eq!(reopen(dir.path()).retained.len(), 2);
}

#[test]
fn empty_commit_is_a_barrier() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    store.submit(vec![Op::RetainPut(msg("a", "1"))]);
    store.commit_blocking(vec![]).expect("barrier");
    let copy = tempfile::tempdir().expect("tempdir");
    std::fs::copy(log_file(dir.path()), log_file(copy.path())).expect("copy");
    assert_eq!(reopen(copy.path()).retained.len(), 1);
}

#[test]
fn write_error_fails_group_truncates_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    store
        .commit_blocking(vec![Op::RetainPut(msg("a", "1"))])
        .expect("commit");
    let good_len = file_len(dir.path());
    store.fail_next_writes(1);
    let err = store
        .commit_blocking(vec![Op::RetainPut(msg("b", &"x".repeat(1000)))])
        .expect_err("disk full");
    assert!(
        matches!(&err, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull),
        "{err}"
    );
    assert_eq!(file_len(dir.path()), good_len, "partial record cut off");
    assert_eq!(store.stats().write_errors, 1);
    store
        .commit_blocking(vec![Op::RetainPut(msg("c", "3"))])
        .expect("store usable again");
    drop(store);
    let rec = reopen(dir.path());
    let topics: Vec<_> = rec.retained.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["a", "c"]);
}
