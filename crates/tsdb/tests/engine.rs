//! The store end to end on a real directory: append, query, restart,
//! flush, compact, retention, torn files, full disk.

use m2mhub_tsdb::*;
use std::sync::Arc;
use std::time::Duration;

const T0: i64 = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000; // a day boundary

fn opts() -> Options {
    Options {
        // No background flushes during a test unless asked for.
        flush_interval: Duration::from_secs(3600),
        min_free_bytes: 0,
        ..Options::default()
    }
}

fn put(db: &Tsdb, dev: &str, metric: &str, pts: &[(i64, f64)]) {
    let points: Vec<InPoint<'_>> = pts
        .iter()
        .map(|(t, v)| InPoint {
            metric,
            ts_ms: *t,
            value: Value::F64(*v),
        })
        .collect();
    for chunk in points.chunks(1000) {
        let a = db.append("acme", dev, chunk).expect("append");
        assert!(a.rejected.is_empty(), "{:?}", a.rejected);
        a.ticket.wait_blocking().expect("durable");
    }
}

fn raw_all(
    db: &Tsdb,
    dev: &str,
    metric: &str,
    from: i64,
    to: i64,
    page: usize,
) -> Vec<(i64, Value)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let p = db
            .raw(&RawQuery {
                tenant: "acme",
                device: dev,
                metric,
                from_ms: from,
                to_ms: to,
                limit: page,
                after,
            })
            .expect("raw");
        out.extend(p.points.into_iter().map(|p| (p.ts_ms, p.value)));
        match p.next {
            Some(c) => after = Some(c),
            None => return out,
        }
    }
}

fn agg(
    db: &Tsdb,
    devs: &[String],
    from: i64,
    to: i64,
    bucket: i64,
) -> (Vec<SeriesBuckets>, AggSources) {
    db.aggregate(&AggQuery {
        tenant: "acme",
        metric: "temp",
        devices: devs,
        from_ms: from,
        to_ms: to,
        bucket_ms: bucket,
    })
    .expect("aggregate")
}

/// The aggregate computed the slow way.
fn brute(pts: &[(i64, f64)], from: i64, to: i64, bucket: i64) -> Vec<(i64, Agg)> {
    let mut sorted: Vec<_> = pts
        .iter()
        .copied()
        .filter(|p| p.0 >= from && p.0 < to)
        .collect();
    sorted.sort_by_key(|p| p.0);
    let mut out: Vec<(i64, Agg)> = Vec::new();
    for (t, v) in sorted {
        let b = t.div_euclid(bucket) * bucket;
        match out.last_mut() {
            Some((lb, a)) if *lb == b => a.add(t, v),
            _ => out.push((b, Agg::of(t, v))),
        }
    }
    out
}

fn same(a: &[(i64, Agg)], b: &[(i64, Agg)]) {
    assert_eq!(a.len(), b.len(), "bucket counts differ");
    for ((b1, x), (b2, y)) in a.iter().zip(b) {
        assert_eq!(b1, b2);
        assert_eq!(x.count, y.count, "count at {b1}");
        assert_eq!(x.min, y.min, "min at {b1}");
        assert_eq!(x.max, y.max, "max at {b1}");
        assert_eq!(
            (x.first_ts, x.first),
            (y.first_ts, y.first),
            "first at {b1}"
        );
        assert_eq!((x.last_ts, x.last), (y.last_ts, y.last), "last at {b1}");
        assert!(
            (x.sum - y.sum).abs() < 1e-6 * x.sum.abs().max(1.0),
            "sum at {b1}"
        );
    }
}

fn sensor(n: usize, step: i64, start: i64) -> Vec<(i64, f64)> {
    (0..n)
        .map(|i| {
            (
                start + i as i64 * step,
                20.0 + ((i as f64) / 300.0).sin() * 5.0 + (i % 7) as f64 * 0.1,
            )
        })
        .collect()
}

#[test]
fn points_survive_restart_from_wal_and_from_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pts = sensor(5_000, 1000, T0);
    {
        let db = Tsdb::open(dir.path(), opts()).expect("open");
        put(&db, "m1", "temp", &pts);
        assert_eq!(
            raw_all(&db, "m1", "temp", i64::MIN, i64::MAX, 777).len(),
            5_000
        );
        // Dropped without a flush: everything is in the WAL only.
    }
    {
        let db = Tsdb::open(dir.path(), opts()).expect("reopen");
        let back = raw_all(&db, "m1", "temp", i64::MIN, i64::MAX, 1000);
        assert_eq!(back.len(), 5_000);
        for ((t, v), (t2, v2)) in pts.iter().zip(&back) {
            assert_eq!(*t, *t2);
            assert_eq!(Value::F64(*v), *v2);
        }
        db.flush().expect("flush");
        assert_eq!(db.stats().head_points, 0);
        assert_eq!(
            raw_all(&db, "m1", "temp", i64::MIN, i64::MAX, 1000).len(),
            5_000
        );
    }
    let db = Tsdb::open(dir.path(), opts()).expect("reopen after flush");
    assert_eq!(db.stats().head_points, 0, "nothing left to replay");
    assert_eq!(
        raw_all(&db, "m1", "temp", i64::MIN, i64::MAX, 4096).len(),
        5_000
    );
    // Latest comes back from the partition files.
    let latest = db.latest("acme", "m1").expect("latest");
    assert_eq!(latest.len(), 1);
    assert_eq!(latest[0].ts_ms, pts[4_999].0);
    assert_eq!(latest[0].value, Value::F64(pts[4_999].1));
}

#[test]
fn aggregates_match_brute_force_in_every_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    // Two days of 10 s data, written in two halves with a flush between,
    // plus late out-of-order points and a duplicate timestamp.
    let mut pts = sensor(17_280, 10_000, T0);
    put(&db, "m1", "temp", &pts[..9_000]);
    db.flush().expect("flush");
    put(&db, "m1", "temp", &pts[9_000..]);
    let late = [(T0 + 123_456, 99.0), (T0 + 10_000, -5.0)];
    put(&db, "m1", "temp", &late);
    pts.extend_from_slice(&late);
    let devs = vec!["m1".to_string()];
    let ranges = [
        (T0, T0 + 2 * 86_400_000),
        (T0 + 1_234_567, T0 + 150_000_000),
        (T0 - 5_000_000, T0 + 7_777_777),
    ];
    let check = |db: &Tsdb, expect_rollups: bool| {
        for &(from, to) in &ranges {
            for bucket in [3_600_000, 7_200_000, 60_000, 300_000, 45_000, 86_400_000] {
                let (got, src) = agg(db, &devs, from, to, bucket);
                let want = brute(&pts, from, to, bucket);
                if want.is_empty() {
                    assert!(got.is_empty());
                    continue;
                }
                assert_eq!(got.len(), 1);
                same(&got[0].buckets, &want);
                if expect_rollups && bucket % 60_000 == 0 && to - from > 2 * bucket {
                    assert!(src.rollup_rows > 0, "bucket {bucket} should use rollups");
                }
            }
        }
    };
    check(&db, false);
    db.flush().expect("flush");
    check(&db, true);
    db.compact().expect("compact");
    check(&db, true);
    drop(db);
    let db = Tsdb::open(dir.path(), opts()).expect("reopen");
    check(&db, true);
    // A month-long hourly query over rollups reads rows, not points.
    let (_, src) = agg(&db, &devs, T0, T0 + 2 * 86_400_000, 3_600_000);
    assert!(src.raw_points == 0, "{src:?}");
}

#[test]
fn group_aggregates_cover_every_device_or_the_chosen_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    for d in ["a", "b", "c"] {
        put(&db, d, "temp", &sensor(100, 60_000, T0));
    }
    put(&db, "d", "other", &sensor(10, 60_000, T0));
    let (all, _) = agg(&db, &[], T0, T0 + 86_400_000, 3_600_000);
    assert_eq!(
        all.iter().map(|s| &*s.device).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    let (some, _) = agg(
        &db,
        &["b".into(), "zz".into()],
        T0,
        T0 + 86_400_000,
        3_600_000,
    );
    assert_eq!(some.len(), 1);
    assert_eq!(&*some[0].device, "b");
    assert_eq!(some[0].buckets.iter().map(|b| b.1.count).sum::<u64>(), 100);
}

#[test]
fn paging_handles_duplicate_timestamps_across_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    let mut pts = Vec::new();
    for i in 0..50 {
        for k in 0..3 {
            pts.push((T0 + i * 1000, (i * 10 + k) as f64));
        }
    }
    put(&db, "m1", "temp", &pts[..70]);
    db.flush().expect("flush");
    put(&db, "m1", "temp", &pts[70..]);
    for page in [1, 2, 4, 7, 1000] {
        let got = raw_all(&db, "m1", "temp", T0, T0 + 10_000_000, page);
        let want: Vec<(i64, Value)> = pts.iter().map(|(t, v)| (*t, Value::F64(*v))).collect();
        assert_eq!(got, want, "page size {page}");
    }
}

#[test]
fn kinds_are_fixed_by_the_first_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    let a = db
        .append(
            "acme",
            "m1",
            &[
                InPoint {
                    metric: "fw",
                    ts_ms: T0,
                    value: Value::Str(Arc::from("1.2.3")),
                },
                InPoint {
                    metric: "door",
                    ts_ms: T0,
                    value: Value::Bool(true),
                },
                InPoint {
                    metric: "temp",
                    ts_ms: T0,
                    value: Value::F64(1.5),
                },
            ],
        )
        .expect("append");
    a.ticket.wait_blocking().expect("ok");
    let b = db
        .append(
            "acme",
            "m1",
            &[
                InPoint {
                    metric: "fw",
                    ts_ms: T0 + 1,
                    value: Value::F64(2.0),
                },
                InPoint {
                    metric: "temp",
                    ts_ms: T0 + 1,
                    value: Value::Str(Arc::from("hot")),
                },
                InPoint {
                    metric: "door",
                    ts_ms: T0 + 1,
                    value: Value::Bool(false),
                },
                InPoint {
                    metric: "temp",
                    ts_ms: T0 + 2,
                    value: Value::Bool(true),
                },
            ],
        )
        .expect("append");
    assert_eq!(b.accepted, 2);
    assert_eq!(b.rejected.len(), 2);
    assert!(b.rejected[0].1.contains("text"), "{:?}", b.rejected);
    b.ticket.wait_blocking().expect("ok");
    db.flush().expect("flush");
    let fw = raw_all(&db, "m1", "fw", 0, i64::MAX, 10);
    assert_eq!(fw, vec![(T0, Value::Str(Arc::from("1.2.3")))]);
    let door = raw_all(&db, "m1", "door", 0, i64::MAX, 10);
    assert_eq!(
        door,
        vec![(T0, Value::Bool(true)), (T0 + 1, Value::Bool(false))]
    );
    let temp = raw_all(&db, "m1", "temp", 0, i64::MAX, 10);
    assert_eq!(temp, vec![(T0, Value::F64(1.5)), (T0 + 2, Value::F64(1.0))]);
    let latest = db.latest("acme", "m1").expect("latest");
    let names: Vec<_> = latest
        .iter()
        .map(|l| (&*l.metric, l.value.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("door", Value::Bool(false)),
            ("fw", Value::Str(Arc::from("1.2.3"))),
            ("temp", Value::F64(1.0))
        ]
    );
    let err = db
        .aggregate(&AggQuery {
            tenant: "acme",
            metric: "fw",
            devices: &[],
            from_ms: T0,
            to_ms: T0 + 86_400_000,
            bucket_ms: 3_600_000,
        })
        .expect_err("text does not aggregate");
    assert!(matches!(err, TsdbError::NotNumeric(_)));
    db.compact().expect("compact");
    drop(db);
    let db = Tsdb::open(dir.path(), opts()).expect("reopen");
    assert_eq!(raw_all(&db, "m1", "fw", 0, i64::MAX, 10).len(), 1);
    assert_eq!(db.series("acme", Some("m1"), None).len(), 3);
}

#[test]
fn a_torn_wal_tail_loses_only_the_torn_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = Tsdb::open(dir.path(), opts()).expect("open");
        put(&db, "m1", "temp", &sensor(100, 1000, T0));
    }
    // Simulate a crash in the middle of the next group commit.
    let wal = std::fs::read_dir(dir.path().join("wal"))
        .expect("wal dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        .max()
        .expect("a segment");
    let mut bytes = std::fs::read(&wal).expect("read");
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
    std::fs::write(&wal, &bytes).expect("write");
    let db = Tsdb::open(dir.path(), opts()).expect("reopen");
    assert_eq!(raw_all(&db, "m1", "temp", 0, i64::MAX, 1000).len(), 100);
    put(&db, "m1", "temp", &sensor(10, 1000, T0 + 100_000));
    drop(db);
    let db = Tsdb::open(dir.path(), opts()).expect("reopen again");
    assert_eq!(raw_all(&db, "m1", "temp", 0, i64::MAX, 1000).len(), 110);
}

#[test]
fn a_full_disk_refuses_points_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    put(&db, "m1", "temp", &sensor(10, 1000, T0));
    drop(db);
    let full = Options {
        min_free_bytes: u64::MAX,
        ..opts()
    };
    let db = Tsdb::open(dir.path(), full).expect("open on a full disk");
    let first = db
        .append(
            "acme",
            "m1",
            &[InPoint {
                metric: "temp",
                ts_ms: T0 + 50_000,
                value: Value::F64(1.0),
            }],
        )
        .expect("queued");
    let err = first.ticket.wait_blocking().expect_err("refused");
    assert!(matches!(err, TsdbError::DiskFull { .. }), "{err}");
    assert!(db.stats().disk_full);
    // Later appends are refused at once, and what was stored is intact.
    assert!(matches!(
        db.append(
            "acme",
            "m1",
            &[InPoint {
                metric: "temp",
                ts_ms: T0,
                value: Value::F64(1.0)
            }]
        ),
        Err(TsdbError::DiskFull { .. })
    ));
    assert_eq!(raw_all(&db, "m1", "temp", 0, i64::MAX, 100).len(), 10);
    // Space comes back (here: less is asked to stay free) while nothing is
    // being written: the store opens again by itself, without a restart.
    db.set_min_free_bytes(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while db.stats().disk_full {
        assert!(
            std::time::Instant::now() < deadline,
            "still refusing after space came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    put(&db, "m1", "temp", &sensor(1, 1000, T0 + 60_000));
    assert_eq!(raw_all(&db, "m1", "temp", 0, i64::MAX, 100).len(), 11);
    drop(db);
    let db = Tsdb::open(dir.path(), opts()).expect("reopen with space");
    assert_eq!(raw_all(&db, "m1", "temp", 0, i64::MAX, 100).len(), 11);
}

#[test]
fn retention_hides_then_drops_old_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let old = now - 10 * 86_400_000;
    put(&db, "m1", "temp", &sensor(10, 1000, old));
    put(&db, "m1", "temp", &sensor(10, 1000, now - 1000 * 20));
    put(&db, "m1", "hum", &sensor(10, 1000, old));
    db.flush().expect("flush");
    assert_eq!(db.stats().partitions, 2);
    db.set_retention(Retention {
        default: Some(Duration::from_secs(30 * 86_400)),
        rules: vec![RetentionRule {
            tenant: None,
            metric: Some("temp".into()),
            keep: Some(Duration::from_secs(86_400)),
        }],
    })
    .expect("set retention");
    // Hidden at once...
    assert_eq!(raw_all(&db, "m1", "temp", 0, i64::MAX, 100).len(), 10);
    assert_eq!(raw_all(&db, "m1", "hum", 0, i64::MAX, 100).len(), 10);
    // ...and removed from the files by compaction.
    db.compact().expect("compact");
    drop(db);
    let db = Tsdb::open(
        dir.path(),
        Options {
            retention: Retention::default(),
            ..opts()
        },
    )
    .expect("reopen");
    // The rules were saved with the store.
    assert_eq!(db.retention().rules.len(), 1);
    assert_eq!(raw_all(&db, "m1", "temp", 0, i64::MAX, 100).len(), 10);
    assert_eq!(raw_all(&db, "m1", "hum", 0, i64::MAX, 100).len(), 10);
    // Whole partitions past the longest retention are dropped.
    db.set_retention(Retention {
        default: Some(Duration::from_secs(86_400)),
        rules: vec![],
    })
    .expect("set retention");
    db.compact().expect("compact");
    assert_eq!(db.stats().partitions, 1);
}

/// A partition still being written is compacted once it holds eight
/// segments per series (one per flush), so a server running all day does
/// not keep a growing index; every point stays readable, in order.
#[test]
fn an_open_partition_is_compacted_after_enough_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Tsdb::open(
        dir.path(),
        Options {
            // Never "closed" during the test: only the fragment rule applies.
            compact_after: Duration::from_secs(1000 * 86_400 * 365),
            ..opts()
        },
    )
    .expect("open");
    let before = db.stats().compactions;
    for f in 0..7 {
        put(&db, "m1", "temp", &sensor(10, 1000, T0 + f * 10_000));
        put(&db, "m2", "temp", &sensor(10, 1000, T0 + f * 10_000));
        db.flush().expect("flush");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        db.stats().compactions,
        before,
        "7 segments per series: not yet"
    );
    put(&db, "m1", "temp", &sensor(10, 1000, T0 + 70_000));
    put(&db, "m2", "temp", &sensor(10, 1000, T0 + 70_000));
    db.flush().expect("flush");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while db.stats().compactions == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the crowded partition was not compacted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for dev in ["m1", "m2"] {
        let pts = raw_all(&db, dev, "temp", 0, i64::MAX, 1000);
        assert_eq!(pts.len(), 80, "{dev}");
        assert!(pts.windows(2).all(|w| w[0].0 < w[1].0), "{dev}: in order");
    }
    drop(db);
    let db = Tsdb::open(dir.path(), opts()).expect("reopen");
    assert_eq!(raw_all(&db, "m1", "temp", 0, i64::MAX, 1000).len(), 80);
}

/// Values that do not compress (random mantissas), so a partition's size
/// is a known multiple of its point count: ~9 bytes a point.
fn noisy(seed: u64, n: usize, step: i64, start: i64) -> Vec<(i64, f64)> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (start + i as i64 * step, (x >> 11) as f64 / 1e6)
        })
        .collect()
}

/// Compaction rewrites a partition one series at a time, so what it holds
/// in memory is bounded by the largest series, not by the partition (a
/// soak run's RSS jumped by the size of the day so far at every compaction
/// of the open day). The partition here is many times the bound; a
/// compactor that gathers the partition before writing it fails.
#[test]
fn compaction_holds_one_series_not_the_partition() {
    const SERIES: usize = 200;
    const SMALL: usize = 400; // points per series and flush
    const BIG: usize = 4 * SMALL; // one series four times the others
    const FLUSHES: usize = 3;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Tsdb::open(
        dir.path(),
        Options {
            durable: false,
            compact_after: Duration::from_secs(1000 * 86_400 * 365),
            ..opts()
        },
    )
    .expect("open");
    for f in 0..FLUSHES {
        let start = T0 + (f * BIG) as i64 * 1000;
        for s in 0..SERIES {
            let n = if s == 0 { BIG } else { SMALL };
            let pts = noisy((s * FLUSHES + f) as u64 + 1, n, 1000, start);
            put(&db, &format!("d{s}"), "temp", &pts);
        }
        db.flush().expect("flush");
    }
    let partition = db.sealed_bytes();
    db.compact().expect("compact");
    let stats = db.stats();
    assert!(stats.compactions >= 1);
    let peak = stats.compaction_peak_bytes;
    // The largest series' working set: its chunks read (≤ 18 B a point for
    // incompressible values), its decoded points (16 B), its rollup rows
    // and re-encoded chunks, and the one write of its blobs.
    let largest_points = (BIG * FLUSHES) as u64;
    let bound = 80 * largest_points;
    println!(
        "compaction peak {peak} B; bound {bound} B; partition {partition} B ({SERIES} series)"
    );
    assert!(
        partition > 4 * bound,
        "the test needs a partition much larger than one series ({partition} vs {bound})"
    );
    assert!(peak > 0, "the compactor's buffers were not counted");
    assert!(
        peak <= bound,
        "compaction held {peak} bytes at once: more than one series' worth ({bound}); the partition has {partition}"
    );
    // And it still holds every point.
    for s in [0usize, 1, SERIES - 1] {
        let n = if s == 0 { BIG } else { SMALL } * FLUSHES;
        assert_eq!(
            raw_all(&db, &format!("d{s}"), "temp", 0, i64::MAX, 4096).len(),
            n
        );
    }
}

/// One series' points: `(device, metric, points)`.
type RawSeries = (String, &'static str, Vec<(i64, Value)>);

/// Everything a reader can ask of a store of `devs` × (temp, fw, door).
#[derive(Debug, PartialEq)]
struct Snapshot {
    raw: Vec<RawSeries>,
    aggs: Vec<((i64, i64, i64), Vec<SeriesBuckets>)>,
    latest: Vec<Vec<Latest>>,
}

fn snapshot(db: &Tsdb, devs: &[String]) -> Snapshot {
    let mut raw = Vec::new();
    for d in devs {
        for m in ["temp", "fw", "door"] {
            // An odd page size, so pages end inside chunks.
            raw.push((d.clone(), m, raw_all(db, d, m, i64::MIN, i64::MAX, 333)));
        }
    }
    let mut aggs = Vec::new();
    for (from, to) in [(T0, T0 + 2 * 86_400_000), (T0 + 1_234_567, T0 + 7_777_777)] {
        for bucket in [60_000, 45_000, 3_600_000, 86_400_000] {
            aggs.push(((from, to, bucket), agg(db, devs, from, to, bucket).0));
        }
    }
    let latest = devs
        .iter()
        .map(|d| db.latest("acme", d).expect("latest"))
        .collect();
    Snapshot { raw, aggs, latest }
}

/// Raw points and latest values exactly equal; aggregates equal but for
/// the rounding of sums (a compacted rollup adds the same points in
/// another grouping).
fn same_snapshot(before: &Snapshot, after: &Snapshot, when: &str) {
    assert_eq!(before.raw, after.raw, "{when}: raw points");
    assert_eq!(before.latest, after.latest, "{when}: latest");
    assert_eq!(before.aggs.len(), after.aggs.len());
    for ((q, a), (q2, b)) in before.aggs.iter().zip(&after.aggs) {
        assert_eq!(q, q2);
        assert_eq!(a.len(), b.len(), "{when}: series of {q:?}");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.device, y.device, "{when}: {q:?}");
            same(&x.buckets, &y.buckets);
        }
    }
}

/// Compaction changes how a partition is stored, never what it answers:
/// many series of three kinds, late and duplicate points, several flushes
/// per generation, three generations of the open day plus a second day,
/// and a restart onto the last generation.
#[test]
fn compaction_keeps_every_query_result_across_generations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = || Options {
        durable: false,
        compact_after: Duration::from_secs(1000 * 86_400 * 365),
        ..opts()
    };
    let db = Tsdb::open(dir.path(), o()).expect("open");
    let devs: Vec<String> = (0..40).map(|i| format!("dev{i:02}")).collect();
    let mut last = None;
    for round in 0..3i64 {
        for flush in 0..3i64 {
            let start = T0 + (round * 3 + flush) * 600_000;
            for (i, d) in devs.iter().enumerate() {
                let n = 100 + 37 * i;
                put(
                    &db,
                    d,
                    "temp",
                    &noisy((round * 100 + flush) as u64 + i as u64, n, 1000, start),
                );
                // Late points into the first flush's range, one of them on
                // a timestamp that is already there with another value.
                put(
                    &db,
                    d,
                    "temp",
                    &[(T0 + 5_000 + round, -1.0 - i as f64), (T0 + 7_000, 42.0)],
                );
                if i % 10 == 0 {
                    // Some series reach into the next day's partition.
                    put(
                        &db,
                        d,
                        "temp",
                        &sensor(50, 1000, T0 + 86_400_000 + start - T0),
                    );
                }
                let mut typed = Vec::new();
                for k in 0..20i64 {
                    let ts = start + k * 5_000;
                    if i % 4 == 0 {
                        typed.push(InPoint {
                            metric: "fw",
                            ts_ms: ts,
                            value: Value::Str(Arc::from(format!("v{round}.{flush}.{k}"))),
                        });
                    }
                    if i % 4 == 1 {
                        typed.push(InPoint {
                            metric: "door",
                            ts_ms: ts,
                            value: Value::Bool((k + i as i64) % 3 == 0),
                        });
                    }
                }
                if !typed.is_empty() {
                    let a = db.append("acme", d, &typed).expect("append");
                    assert!(a.rejected.is_empty(), "{:?}", a.rejected);
                    a.ticket.wait_blocking().expect("durable");
                }
            }
            db.flush().expect("flush");
        }
        let before = snapshot(&db, &devs);
        let compactions = db.stats().compactions;
        db.compact().expect("compact");
        assert!(
            db.stats().compactions > compactions,
            "round {round}: a new generation was written"
        );
        let after = snapshot(&db, &devs);
        same_snapshot(&before, &after, &format!("round {round}"));
        last = Some(after);
    }
    drop(db);
    let db = Tsdb::open(dir.path(), o()).expect("reopen");
    let reopened = snapshot(&db, &devs);
    same_snapshot(
        last.as_ref().expect("three rounds"),
        &reopened,
        "after a restart",
    );
}

/// Queries read the old generation while the new one is written and the
/// new one after the swap: a reader running through repeated compactions
/// of the open day always sees every point, in order.
#[test]
fn queries_see_every_point_while_a_partition_is_compacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(
        Tsdb::open(
            dir.path(),
            Options {
                durable: false,
                compact_after: Duration::from_secs(1000 * 86_400 * 365),
                ..opts()
            },
        )
        .expect("open"),
    );
    let devs: Vec<String> = (0..30).map(|i| format!("d{i}")).collect();
    const PER: usize = 300;
    for (i, d) in devs.iter().enumerate() {
        put(&db, d, "temp", &noisy(i as u64 + 1, PER, 1000, T0));
    }
    db.flush().expect("flush");
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(PER));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (db, devs, written, stop) = (db.clone(), devs.clone(), written.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for d in devs.iter().step_by(7) {
                    // Points only grow: at least what was there before the read.
                    let floor = written.load(std::sync::atomic::Ordering::SeqCst);
                    let pts = raw_all(&db, d, "temp", 0, i64::MAX, 1000);
                    assert!(
                        pts.len() >= floor,
                        "{d}: {} points, expected {floor}",
                        pts.len()
                    );
                    assert!(pts.windows(2).all(|w| w[0].0 < w[1].0), "{d}: in order");
                    reads += 1;
                }
            }
            reads
        })
    };
    for round in 1..5usize {
        for (i, d) in devs.iter().enumerate() {
            put(
                &db,
                d,
                "temp",
                &noisy(
                    (round * 100 + i) as u64,
                    PER,
                    1000,
                    T0 + (round * PER) as i64 * 1000,
                ),
            );
        }
        written.store((round + 1) * PER, std::sync::atomic::Ordering::SeqCst);
        db.compact().expect("compact");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.join().expect("the reader saw every point");
    assert!(reads > 0);
    for d in &devs {
        assert_eq!(raw_all(&db, d, "temp", 0, i64::MAX, 1000).len(), 5 * PER);
    }
}
