//! `TimeSeriesStore` conformance: the same tests on the embedded store
//! (`telemetry::embedded::…`, always) and on PostgreSQL
//! (`telemetry::postgres::…`, ignored without a server), so the platform
//! cannot tell them apart. Timestamps are recent (whole hours of the last
//! days), inside the PostgreSQL store's partition window.

use m2mhub_pgstore::testing::TestDatabase;
use m2mhub_pgstore::{PgTelemetryOptions, PgTelemetryStore};
use m2mhub_tsdb::{
    Agg, AggQuery, Cursor, InPoint, Kind, RawQuery, Retention, RetentionRule, TimeSeriesStore,
    Tsdb, TsdbError, Value,
};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const HOUR: i64 = 3_600_000;

/// A whole hour two days ago: the tests' time zero.
pub fn t0() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    // Aligned to 6 hours (the widest bucket the tests ask for), so that a
    // bucket starting at t0 holds whole hours whatever the time of day.
    now - now % (6 * HOUR) - 48 * HOUR
}

pub trait Backend {
    /// Open (again: close the previous one first) this test's store.
    fn open(&self) -> Arc<dyn TimeSeriesStore>;
}

pub struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    pub fn new() -> Embedded {
        Embedded {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl Backend for Embedded {
    fn open(&self) -> Arc<dyn TimeSeriesStore> {
        Arc::new(Tsdb::open(self.dir.path(), Default::default()).expect("open the embedded store"))
    }
}

pub struct Postgres {
    pub db: TestDatabase,
}

impl Postgres {
    pub fn new() -> Postgres {
        Postgres {
            db: TestDatabase::create().unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn open_with(&self, opts: PgTelemetryOptions) -> PgTelemetryStore {
        PgTelemetryStore::open(self.db.url(), opts).expect("open the PostgreSQL telemetry store")
    }
}

impl Backend for Postgres {
    fn open(&self) -> Arc<dyn TimeSeriesStore> {
        Arc::new(self.open_with(PgTelemetryOptions::default()))
    }
}

macro_rules! telemetry_conformance {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[test]
                fn $test() {
                    super::$test(&super::Embedded::new());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
                fn $test() {
                    super::$test(&super::Postgres::new());
                }
            )*
        }
    };
}

telemetry_conformance!(
    points_read_back_in_time_order_with_their_kinds,
    raw_pages_resume_at_the_cursor_even_among_equal_timestamps,
    a_series_kind_is_fixed_by_its_first_point,
    bad_names_are_refused,
    aggregates_match_for_every_bucket_width_and_device,
    aggregates_of_text_are_refused_and_bad_buckets_invalid,
    latest_values_are_the_newest_by_timestamp,
    series_are_listed_sorted_and_filtered,
    retention_hides_expired_points_at_once_and_is_kept,
    everything_survives_a_reopen,
);

fn pt(metric: &str, ts_ms: i64, v: f64) -> InPoint<'_> {
    InPoint {
        metric,
        ts_ms,
        value: Value::F64(v),
    }
}

/// Append and wait until durable (the append must be accepted whole).
pub fn put(s: &dyn TimeSeriesStore, tenant: &str, device: &str, points: &[InPoint<'_>]) {
    let a = s.append(tenant, device, points).expect("append");
    assert!(a.rejected.is_empty(), "{:?}", a.rejected);
    a.ticket.wait_blocking().expect("durable");
}

fn raw_all(s: &dyn TimeSeriesStore, device: &str, metric: &str) -> Vec<(i64, Value)> {
    let page = s
        .raw(&RawQuery {
            tenant: "t1",
            device,
            metric,
            from_ms: i64::MIN,
            to_ms: i64::MAX,
            limit: 100_000,
            after: None,
        })
        .expect("raw");
    assert_eq!(page.next, None);
    page.points
        .into_iter()
        .map(|p| (p.ts_ms, p.value))
        .collect()
}

fn points_read_back_in_time_order_with_their_kinds(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    // Out of order, across two days.
    put(
        &*s,
        "t1",
        "d1",
        &[
            pt("temp", t + 2000, 21.5),
            pt("temp", t, 20.0),
            pt("temp", t + 30 * HOUR, -0.25),
            InPoint {
                metric: "door",
                ts_ms: t,
                value: Value::Bool(true),
            },
            InPoint {
                metric: "state",
                ts_ms: t,
                value: Value::Str("ok".into()),
            },
        ],
    );
    put(&*s, "t1", "d1", &[pt("temp", t + 1000, f64::INFINITY)]);
    assert_eq!(
        raw_all(&*s, "d1", "temp"),
        vec![
            (t, Value::F64(20.0)),
            (t + 1000, Value::F64(f64::INFINITY)),
            (t + 2000, Value::F64(21.5)),
            (t + 30 * HOUR, Value::F64(-0.25)),
        ]
    );
    assert_eq!(raw_all(&*s, "d1", "door"), vec![(t, Value::Bool(true))]);
    assert_eq!(
        raw_all(&*s, "d1", "state"),
        vec![(t, Value::Str("ok".into()))]
    );
    let q = |from_ms, to_ms| RawQuery {
        tenant: "t1",
        device: "d1",
        metric: "temp",
        from_ms,
        to_ms,
        limit: 10,
        after: None,
    };
    // [from, to): the end is excluded.
    let p = s.raw(&q(t + 1000, t + 2000)).expect("raw");
    assert_eq!(p.kind, Kind::Float);
    assert_eq!(p.points.len(), 1);
    assert_eq!(p.points[0].ts_ms, t + 1000);
    assert_eq!(s.raw(&q(t, t + 3000)).expect("raw").points.len(), 3);
    // An unknown series is an empty float page; so is another tenant's.
    let none = s
        .raw(&RawQuery {
            tenant: "t2",
            ..q(i64::MIN, i64::MAX)
        })
        .expect("raw");
    assert_eq!(
        (none.kind, none.points.len(), none.next),
        (Kind::Float, 0, None)
    );
    assert_eq!(
        s.raw(&q(t + 5000, t)).expect("raw").points.len(),
        0,
        "an empty range"
    );
    let st = s.stats();
    assert!(st.points_appended >= 6, "{st:?}");
    s.close();
}

fn raw_pages_resume_at_the_cursor_even_among_equal_timestamps(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    // 5 points at t, then one each at t+1..t+4, then 3 at t+10.
    let mut pts = Vec::new();
    for i in 0..5 {
        pts.push(pt("v", t, i as f64));
    }
    for i in 1..5 {
        pts.push(pt("v", t + i, 10.0 + i as f64));
    }
    for i in 0..3 {
        pts.push(pt("v", t + 10, 20.0 + i as f64));
    }
    put(&*s, "t1", "d1", &pts);
    let want: Vec<f64> = pts
        .iter()
        .map(|p| match p.value {
            Value::F64(x) => x,
            _ => unreachable!(),
        })
        .collect();
    for limit in [1, 2, 3, 4, 7, 12, 13] {
        let mut got = Vec::new();
        let mut after: Option<Cursor> = None;
        let mut pages = 0;
        loop {
            let page = s
                .raw(&RawQuery {
                    tenant: "t1",
                    device: "d1",
                    metric: "v",
                    from_ms: t,
                    to_ms: t + HOUR,
                    limit,
                    after,
                })
                .expect("raw");
            pages += 1;
            assert!(page.points.len() <= limit);
            got.extend(page.points.iter().map(|p| match p.value {
                Value::F64(x) => x,
                _ => f64::NAN,
            }));
            // A cursor round-trips through its text form.
            match page.next {
                Some(c) => after = Some(Cursor::decode(&c.encode()).expect("cursor")),
                None => break,
            }
            assert!(pages < 100, "paging does not end");
        }
        assert_eq!(got, want, "limit {limit}");
    }
    s.close();
}

fn a_series_kind_is_fixed_by_its_first_point(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    put(&*s, "t1", "d1", &[pt("temp", t, 1.0)]);
    let a = s
        .append(
            "t1",
            "d1",
            &[
                InPoint {
                    metric: "temp",
                    ts_ms: t + 1,
                    value: Value::Str("hot".into()),
                },
                // A boolean fits a number series (stored as 0/1).
                InPoint {
                    metric: "temp",
                    ts_ms: t + 2,
                    value: Value::Bool(true),
                },
            ],
        )
        .expect("append");
    assert_eq!(a.accepted, 1);
    assert_eq!(a.rejected.len(), 1);
    assert_eq!(a.rejected[0].0, "temp");
    assert!(
        a.rejected[0].1.contains("holds float values"),
        "{:?}",
        a.rejected
    );
    a.ticket.wait_blocking().expect("durable");
    assert_eq!(
        raw_all(&*s, "d1", "temp"),
        vec![(t, Value::F64(1.0)), (t + 2, Value::F64(1.0))]
    );
    // Within one append the first point fixes a new series' kind too.
    let a = s
        .append(
            "t1",
            "d1",
            &[
                InPoint {
                    metric: "mode",
                    ts_ms: t,
                    value: Value::Str("auto".into()),
                },
                pt("mode", t + 1, 3.0),
            ],
        )
        .expect("append");
    assert_eq!((a.accepted, a.rejected.len()), (1, 1));
    a.ticket.wait_blocking().expect("durable");
    let kinds: Vec<(String, Kind)> = s
        .series("t1", Some("d1"), None)
        .into_iter()
        .map(|i| (i.key.metric.to_string(), i.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![("mode".into(), Kind::Text), ("temp".into(), Kind::Float)]
    );
    s.close();
}

fn bad_names_are_refused(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    let long = "x".repeat(257);
    for (tenant, device) in [("", "d1"), ("t1", ""), ("t1", long.as_str())] {
        assert!(
            matches!(
                s.append(tenant, device, &[pt("v", t, 1.0)]),
                Err(TsdbError::Invalid(_))
            ),
            "{tenant:?}/{device:?}"
        );
    }
    let a = s
        .append(
            "t1",
            "d1",
            &[pt("", t, 1.0), pt(&long, t, 1.0), pt("ok", t, 1.0)],
        )
        .expect("append");
    assert_eq!(a.accepted, 1);
    assert_eq!(a.rejected.len(), 2);
    a.ticket.wait_blocking().expect("durable");
    assert_eq!(raw_all(&*s, "d1", "ok").len(), 1);
    s.close();
}

/// Points of `devices` over six hours: one a minute, values that sum
/// exactly, with a duplicate timestamp now and then.
fn six_hours(s: &dyn TimeSeriesStore, devices: &[&str]) -> Vec<(String, Vec<(i64, f64)>)> {
    let t = t0();
    let mut all = Vec::new();
    for (k, d) in devices.iter().enumerate() {
        let mut pts = Vec::new();
        for i in 0..360i64 {
            let ts = t + i * 60_000 + 7_000 * (k as i64 + 1);
            pts.push((ts, ((i * 7 + k as i64) % 50) as f64 * 0.5));
            if i % 97 == 0 {
                pts.push((ts, -1.0));
            }
        }
        for chunk in pts.chunks(100) {
            let ins: Vec<InPoint<'_>> = chunk.iter().map(|(ts, v)| pt("temp", *ts, *v)).collect();
            put(s, "t1", d, &ins);
        }
        all.push((d.to_string(), pts));
    }
    all
}

fn expected(points: &[(i64, f64)], from: i64, to: i64, width: i64) -> Vec<(i64, Agg)> {
    let mut map: std::collections::BTreeMap<i64, Agg> = Default::default();
    for (ts, v) in points {
        if *ts >= from && *ts < to {
            let b = ts.div_euclid(width) * width;
            map.entry(b)
                .and_modify(|a| a.add(*ts, *v))
                .or_insert_with(|| Agg::of(*ts, *v));
        }
    }
    map.into_iter().collect()
}

fn aggregates_match_for_every_bucket_width_and_device(b: &dyn Backend) {
    let s = b.open();
    let data = six_hours(&*s, &["d2", "d1", "d3"]);
    // The embedded store answers from rollups only once sealed.
    s.flush().expect("flush");
    let t = t0();
    let ranges = [
        (t, t + 6 * HOUR),
        (t - HOUR, t + 7 * HOUR),
        (t + 90_000, t + 5 * HOUR + 1234),
        (t + 13 * 60_000 + 5, t + 14 * 60_000),
    ];
    for width in [HOUR, 2 * HOUR, 60_000, 15 * 60_000, 30_000, 7_000] {
        for (from, to) in ranges {
            let devices = ["d1".to_string(), "d3".to_string()];
            let (got, sources) = s
                .aggregate(&AggQuery {
                    tenant: "t1",
                    metric: "temp",
                    devices: &devices,
                    from_ms: from,
                    to_ms: to,
                    bucket_ms: width,
                })
                .expect("aggregate");
            let mut want = Vec::new();
            for (d, pts) in &data {
                if devices.contains(d) {
                    let e = expected(pts, from, to, width);
                    if !e.is_empty() {
                        want.push((d.clone(), e));
                    }
                }
            }
            want.sort_by(|a, b| a.0.cmp(&b.0));
            let got: Vec<(String, Vec<(i64, Agg)>)> = got
                .into_iter()
                .map(|sb| (sb.device.to_string(), sb.buckets))
                .collect();
            assert_eq!(got, want, "width {width}, range {from}..{to}");
            if width % 60_000 == 0 && to - from >= 2 * HOUR {
                assert!(sources.rollup_rows > 0, "rollups used: {sources:?}");
                assert!(
                    sources.raw_points < 130,
                    "few raw points for the edges: {sources:?}"
                );
            }
        }
    }
    // No devices named: all of them, sorted.
    let (all, _) = s
        .aggregate(&AggQuery {
            tenant: "t1",
            metric: "temp",
            devices: &[],
            from_ms: t,
            to_ms: t + 6 * HOUR,
            bucket_ms: 6 * HOUR,
        })
        .expect("aggregate");
    let names: Vec<&str> = all.iter().map(|s| &*s.device).collect();
    assert_eq!(names, ["d1", "d2", "d3"]);
    assert!(all
        .iter()
        .all(|s| s.buckets.len() == 1 && s.buckets[0].1.count == 364));
    s.close();
}

fn aggregates_of_text_are_refused_and_bad_buckets_invalid(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    put(
        &*s,
        "t1",
        "d1",
        &[
            InPoint {
                metric: "state",
                ts_ms: t,
                value: Value::Str("ok".into()),
            },
            pt("temp", t, 1.0),
        ],
    );
    let q = |metric, bucket_ms| AggQuery {
        tenant: "t1",
        metric,
        devices: &[],
        from_ms: t,
        to_ms: t + HOUR,
        bucket_ms,
    };
    assert!(matches!(
        s.aggregate(&q("state", HOUR)),
        Err(TsdbError::NotNumeric(_))
    ));
    assert!(matches!(
        s.aggregate(&q("temp", 0)),
        Err(TsdbError::Invalid(_))
    ));
    assert!(matches!(
        s.aggregate(&q("temp", 1)),
        Err(TsdbError::Invalid(_))
    ));
    let (none, _) = s.aggregate(&q("nothing", HOUR)).expect("aggregate");
    assert!(none.is_empty());
    s.close();
}

fn latest_values_are_the_newest_by_timestamp(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    put(
        &*s,
        "t1",
        "d1",
        &[
            pt("temp", t + 5000, 25.0),
            InPoint {
                metric: "door",
                ts_ms: t,
                value: Value::Bool(false),
            },
        ],
    );
    // An older point arriving later does not replace the latest.
    put(&*s, "t1", "d1", &[pt("temp", t + 1000, 11.0)]);
    put(
        &*s,
        "t1",
        "d1",
        &[InPoint {
            metric: "door",
            ts_ms: t + 10,
            value: Value::Bool(true),
        }],
    );
    put(&*s, "t1", "d2", &[pt("temp", t + 9000, 99.0)]);
    let l = s.latest("t1", "d1").expect("latest");
    let got: Vec<(&str, Kind, i64, Value)> = l
        .iter()
        .map(|l| (&*l.metric, l.kind, l.ts_ms, l.value.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("door", Kind::Bool, t + 10, Value::Bool(true)),
            ("temp", Kind::Float, t + 5000, Value::F64(25.0)),
        ]
    );
    assert!(s.latest("t1", "nobody").expect("latest").is_empty());
    assert!(s.latest("t2", "d1").expect("latest").is_empty());
    s.close();
}

fn series_are_listed_sorted_and_filtered(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    for (tenant, device, metric) in [
        ("t1", "b", "z"),
        ("t1", "a", "y"),
        ("t1", "b", "a"),
        ("t1", "B", "a"),
        ("t2", "a", "y"),
    ] {
        put(&*s, tenant, device, &[pt(metric, t, 1.0)]);
    }
    let keys = |v: Vec<m2mhub_tsdb::SeriesInfo>| -> Vec<String> {
        v.into_iter()
            .map(|i| format!("{}/{}/{}", i.key.tenant, i.key.device, i.key.metric))
            .collect()
    };
    assert_eq!(
        keys(s.series("t1", None, None)),
        ["t1/B/a", "t1/a/y", "t1/b/a", "t1/b/z"]
    );
    assert_eq!(keys(s.series("t1", Some("b"), None)), ["t1/b/a", "t1/b/z"]);
    assert_eq!(keys(s.series("t1", None, Some("a"))), ["t1/B/a", "t1/b/a"]);
    assert_eq!(keys(s.series("t1", Some("a"), Some("y"))), ["t1/a/y"]);
    assert!(s.series("t3", None, None).is_empty());
    s.close();
}

fn retention_hides_expired_points_at_once_and_is_kept(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    put(
        &*s,
        "t1",
        "d1",
        &[
            pt("temp", t, 1.0),
            pt("hum", t, 2.0),
            pt("temp", t + 47 * HOUR, 3.0),
        ],
    );
    let r = Retention {
        default: None,
        rules: vec![RetentionRule {
            tenant: Some("t1".into()),
            metric: Some("temp".into()),
            keep: Some(Duration::from_secs(24 * 3600)),
        }],
    };
    s.set_retention(r.clone()).expect("set retention");
    assert_eq!(s.retention(), r);
    assert_eq!(
        raw_all(&*s, "d1", "temp"),
        vec![(t + 47 * HOUR, Value::F64(3.0))]
    );
    assert_eq!(raw_all(&*s, "d1", "hum").len(), 1, "other metrics are kept");
    let (agg, _) = s
        .aggregate(&AggQuery {
            tenant: "t1",
            metric: "temp",
            devices: &[],
            from_ms: t,
            to_ms: t + 48 * HOUR,
            bucket_ms: 48 * HOUR,
        })
        .expect("aggregate");
    assert_eq!(agg[0].buckets[0].1.count, 1);
    let bad = Retention {
        default: None,
        rules: vec![RetentionRule {
            tenant: Some("a\tb".into()),
            metric: None,
            keep: None,
        }],
    };
    assert!(matches!(s.set_retention(bad), Err(TsdbError::Invalid(_))));
    // The passes that drop data must not bring expired points back.
    s.flush().expect("flush");
    assert_eq!(raw_all(&*s, "d1", "temp").len(), 1);
    s.close();
    drop(s);
    let s = b.open();
    assert_eq!(s.retention().rules, r.rules, "rules survive a restart");
    assert_eq!(raw_all(&*s, "d1", "temp").len(), 1);
    s.close();
}

fn everything_survives_a_reopen(b: &dyn Backend) {
    let s = b.open();
    let t = t0();
    put(
        &*s,
        "t1",
        "d1",
        &[
            pt("temp", t, 1.5),
            pt("temp", t + 60_000, 2.5),
            InPoint {
                metric: "state",
                ts_ms: t,
                value: Value::Str("ok".into()),
            },
        ],
    );
    s.close();
    drop(s);
    let s = b.open();
    assert_eq!(
        raw_all(&*s, "d1", "temp"),
        vec![(t, Value::F64(1.5)), (t + 60_000, Value::F64(2.5))]
    );
    let l = s.latest("t1", "d1").expect("latest");
    assert_eq!(l.len(), 2);
    assert_eq!(l[1].value, Value::F64(2.5));
    // A known series keeps its kind after the reopen.
    let a = s
        .append(
            "t1",
            "d1",
            &[InPoint {
                metric: "temp",
                ts_ms: t + 1,
                value: Value::Str("x".into()),
            }],
        )
        .expect("append");
    assert_eq!(a.rejected.len(), 1);
    a.ticket.wait_blocking().expect("durable");
    put(&*s, "t1", "d1", &[pt("temp", t + 120_000, 3.5)]);
    let (agg, _) = s
        .aggregate(&AggQuery {
            tenant: "t1",
            metric: "temp",
            devices: &[],
            from_ms: t,
            to_ms: t + HOUR,
            bucket_ms: HOUR,
        })
        .expect("aggregate");
    assert_eq!(agg[0].buckets[0].1.count, 3);
    assert_eq!(agg[0].buckets[0].1.sum, 7.5);
    s.close();
}

/// What only the shared store has: several nodes on one database, day
/// partitions dropped whole.
mod cluster {
    mod postgres {
        use super::super::{pt, put, raw_all, t0, Postgres, HOUR};
        use m2mhub_pgstore::PgTelemetryOptions;
        use m2mhub_tsdb::{Retention, TimeSeriesStore, Value};
        use std::time::Duration;

        fn admin(b: &Postgres) -> postgres::Client {
            postgres::Client::connect(b.db.url().expose(), postgres::NoTls)
                .expect("admin connection")
        }

        #[test]
        #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
        fn every_node_reads_every_nodes_points() {
            let b = Postgres::new();
            let n1 = b.open_with(PgTelemetryOptions::default());
            let n2 = b.open_with(PgTelemetryOptions::default());
            let t = t0();
            put(&n1, "t1", "d1", &[pt("temp", t, 1.0)]);
            put(&n2, "t1", "d2", &[pt("temp", t + 1, 2.0)]);
            put(&n2, "t1", "d1", &[pt("temp", t + 2, 3.0)]);
            for n in [&n1 as &dyn TimeSeriesStore, &n2] {
                assert_eq!(raw_all(n, "d1", "temp").len(), 2);
                assert_eq!(n.series("t1", None, None).len(), 2);
                assert_eq!(n.latest("t1", "d1").expect("latest")[0].ts_ms, t + 2);
            }
            // Node 1 made `state` text; node 2, which has not seen it, takes a
            // number for it: the database's kind wins and the number is
            // dropped (counted), not stored under the wrong kind.
            put(
                &n1,
                "t1",
                "d1",
                &[m2mhub_tsdb::InPoint {
                    metric: "state",
                    ts_ms: t,
                    value: Value::Str("ok".into()),
                }],
            );
            let a = n2
                .append("t1", "d1", &[pt("state", t + 5, 9.0)])
                .expect("append");
            a.ticket.wait_blocking().expect("committed");
            assert_eq!(
                raw_all(&n1, "d1", "state"),
                vec![(t, Value::Str("ok".into()))]
            );
            assert_eq!(n2.stats().points_rejected, 1);
            // Now node 2 knows, and refuses at once.
            let a = n2
                .append("t1", "d1", &[pt("state", t + 6, 9.0)])
                .expect("append");
            assert_eq!(a.rejected.len(), 1);
        }

        #[test]
        #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
        fn a_lost_connection_fails_the_group_it_hit_and_the_next_reconnects() {
            let b = Postgres::new();
            let s = b.open_with(PgTelemetryOptions::default());
            let t = t0();
            put(&s, "t1", "d1", &[pt("temp", t, 1.0)]);
            // The server ends every connection of the store (a restart, a
            // failover).
            admin(&b)
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .expect("terminate");
            // The next group is not acknowledged: it was not committed.
            let a = s
                .append("t1", "d1", &[pt("temp", t + 1, 2.0)])
                .expect("append");
            let e = a.ticket.wait_blocking().expect_err("the write failed");
            assert!(matches!(e, m2mhub_tsdb::TsdbError::Io(_)), "{e}");
            assert!(e.to_string().contains("PostgreSQL"), "{e}");
            // The one after is, on a new connection; the readers reconnect
            // after one failed query each.
            put(&s, "t1", "d1", &[pt("temp", t + 2, 3.0)]);
            let mut ok = 0;
            for _ in 0..4 {
                ok += usize::from(s.latest("t1", "d1").is_ok());
            }
            assert!(ok >= 2, "{ok}");
            assert_eq!(
                raw_all(&s, "d1", "temp"),
                vec![(t, Value::F64(1.0)), (t + 2, Value::F64(3.0))]
            );
            assert_eq!(s.stats().write_errors, 1);
        }

        #[test]
        #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
        fn retention_drops_whole_day_partitions() {
            let b = Postgres::new();
            let s = b.open_with(PgTelemetryOptions {
                retention: Retention {
                    default: Some(Duration::from_secs(3 * 86_400)),
                    rules: Vec::new(),
                },
                ..Default::default()
            });
            let t = t0();
            // 4 days ago: a partition of its own (the window reaches back
            // to the retention plus a day), dropped by the next pass; 30 days
            // ago: the default partition, deleted from it.
            put(&s, "t1", "d1", &[pt("temp", t - 2 * 86_400_000, 1.0)]);
            put(&s, "t1", "d1", &[pt("temp", t - 28 * 86_400_000, 2.0)]);
            let recent = t + 47 * HOUR;
            put(&s, "t1", "d1", &[pt("temp", recent, 3.0)]);
            let mut c = admin(&b);
            let count = |c: &mut postgres::Client, sql: &str| -> i64 {
                c.query_one(sql, &[]).expect("query").get(0)
            };
            assert_eq!(
                count(&mut c, "SELECT count(*) FROM telemetry.points_outside"),
                1
            );
            let old = t - 2 * 86_400_000;
            let day = old - old.rem_euclid(86_400_000);
            let in_old_day = format!(
                "SELECT count(*) FROM telemetry.points WHERE ts >= {day} AND ts < {}",
                day + 86_400_000
            );
            assert_eq!(count(&mut c, &in_old_day), 1);
            let parts_before = count(
                &mut c,
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry.points'::regclass",
            );
            // The day 4 days ago is not yet past 3 days of retention as a
            // whole; move the clock instead by shortening the retention.
            s.set_retention(Retention {
                default: Some(Duration::from_secs(86_400)),
                rules: Vec::new(),
            })
            .expect("retention");
            s.flush().expect("maintenance pass");
            assert_eq!(
                count(&mut c, "SELECT count(*) FROM telemetry.points_outside"),
                0
            );
            assert_eq!(count(&mut c, &in_old_day), 0);
            let parts_after = count(
                &mut c,
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry.points'::regclass",
            );
            assert!(parts_after < parts_before, "{parts_before} → {parts_after}");
            assert_eq!(raw_all(&s, "d1", "temp"), vec![(recent, Value::F64(3.0))]);
            let st = s.stats();
            assert_eq!(st.partitions as i64, parts_after);
            assert!(st.disk_bytes > 0);
            // Rollup rows past the retention went too.
            assert_eq!(
                count(
                    &mut c,
                    &format!(
                        "SELECT count(*) FROM telemetry.rollup_1h WHERE bucket < {}",
                        t - HOUR
                    )
                ),
                0
            );
        }

        #[test]
        #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
        fn a_day_entering_the_window_takes_its_rows_from_the_default_partition() {
            let b = Postgres::new();
            let s = b.open_with(PgTelemetryOptions::default());
            let t = t0();
            put(&s, "t1", "d1", &[pt("temp", t, 1.0)]);
            let mut c = admin(&b);
            c.batch_execute("SET search_path TO telemetry")
                .expect("schema");
            // A day ahead whose table is not there yet (as a day is before
            // it enters the window) holds a point in the default partition.
            // t0 is two days back; the pass makes partitions 7 days ahead.
            let day = t.div_euclid(86_400_000) + 2 + 7;
            let name: String = c
                .query_one(
                    "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = 'points'::regclass AND c.relname::text <> 'points_outside'
                     ORDER BY c.relname DESC LIMIT 1",
                    &[],
                )
                .expect("newest partition")
                .get(0);
            c.batch_execute(&format!("DROP TABLE {name}"))
                .expect("drop");
            c.execute(
                "INSERT INTO points (series_id, ts, seq, value)
                 SELECT id, $1, 0, 7.0 FROM series WHERE metric = 'temp'",
                &[&(day * 86_400_000 + 5)],
            )
            .expect("insert");
            let outside = |c: &mut postgres::Client| -> i64 {
                c.query_one("SELECT count(*) FROM points_outside", &[])
                    .expect("count")
                    .get(0)
            };
            assert_eq!(outside(&mut c), 1, "{name}");
            // The maintenance pass creates the day again and moves the row.
            s.flush().expect("maintenance pass");
            assert_eq!(outside(&mut c), 0);
            let exists: bool = c
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .expect("exists")
                .get(0);
            assert!(exists, "{name}");
            assert_eq!(
                raw_all(&s, "d1", "temp"),
                vec![
                    (t, Value::F64(1.0)),
                    (day * 86_400_000 + 5, Value::F64(7.0))
                ]
            );
        }
    }
}

/// Figures for BENCHMARKS.md: durable ingest into each backend with the
/// shape of the embedded store's own benchmark (`tsdb/benches/store.rs`):
/// 2 producer threads append one device's reading of 10 metrics at a time
/// for 10,000 devices, each keeping up to 4,096 appends in flight, for
/// `TSDB_BENCH_SECS` seconds (default 10); every ticket is waited for. Run
/// with `cargo test -p m2mhub-pgstore --test conformance -- --ignored
/// --nocapture telemetry_store_figures`.
mod figures {
    use super::{t0, Postgres};
    use m2mhub_pgstore::PgTelemetryOptions;
    use m2mhub_tsdb::{AggQuery, InPoint, Ticket, TimeSeriesStore, Tsdb, Value};
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const METRICS: [&str; 10] = [
        "temperature",
        "humidity",
        "pressure",
        "vibration",
        "current",
        "voltage",
        "power",
        "rpm",
        "flow",
        "level",
    ];

    fn ingest(name: &str, db: Arc<dyn TimeSeriesStore>) {
        let secs: u64 = std::env::var("TSDB_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let devices: Arc<Vec<String>> =
            Arc::new((0..10_000).map(|i| format!("dev-{i:05}")).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let (db, devices, stop, acked) =
                    (db.clone(), devices.clone(), stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let mut inflight: VecDeque<Ticket> = VecDeque::new();
                    let mut i = p;
                    let mut ts = t0();
                    while !stop.load(Ordering::Relaxed) {
                        let dev = &devices[i % devices.len()];
                        if i % devices.len() < 2 {
                            ts += 1000;
                        }
                        let v = (i % 1000) as f64 * 0.1;
                        let pts: Vec<InPoint<'_>> = METRICS
                            .iter()
                            .enumerate()
                            .map(|(k, m)| InPoint {
                                metric: m,
                                ts_ms: ts,
                                value: Value::F64(v + k as f64),
                            })
                            .collect();
                        let a = db.append("bench", dev, &pts).expect("append");
                        inflight.push_back(a.ticket);
                        if inflight.len() >= 4096 {
                            if let Some(t) = inflight.pop_front() {
                                t.wait_blocking().expect("durable");
                                acked.fetch_add(10, Ordering::Relaxed);
                            }
                        }
                        i += 2;
                    }
                    for t in inflight {
                        t.wait_blocking().expect("durable");
                        acked.fetch_add(10, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
        for p in producers {
            p.join().expect("producer");
        }
        let elapsed = start.elapsed().as_secs_f64();
        let n = acked.load(Ordering::Relaxed);
        let st = db.stats();
        println!(
            "{name}: {n} durable points in {elapsed:.2} s = {:.0} points/s; {} commits ({:.0} points/commit)",
            n as f64 / elapsed,
            st.wal_commits,
            st.points_appended as f64 / st.wal_commits.max(1) as f64,
        );
        // An hourly aggregate of one device over the ingested span.
        let devices = ["dev-00000".to_string()];
        let t = Instant::now();
        let (s, src) = db
            .aggregate(&AggQuery {
                tenant: "bench",
                metric: "temperature",
                devices: &devices,
                from_ms: t0() - 3_600_000,
                to_ms: t0() + 86_400_000,
                bucket_ms: 3_600_000,
            })
            .expect("aggregate");
        println!(
            "  hourly aggregate of one series: {:.2} ms ({} buckets, {src:?})",
            t.elapsed().as_secs_f64() * 1e3,
            s.first().map_or(0, |s| s.buckets.len())
        );
        db.close();
    }

    #[test]
    #[ignore = "a benchmark; needs PostgreSQL: scripts/postgres.sh"]
    fn telemetry_store_figures() {
        let base = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tsdb-bench");
        std::fs::create_dir_all(base).expect("bench dir");
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        ingest(
            "embedded (WAL fdatasync)",
            Arc::new(Tsdb::open(dir.path(), Default::default()).expect("open")),
        );
        let pg = Postgres::new();
        ingest(
            "PostgreSQL (synchronous_commit on)",
            Arc::new(pg.open_with(PgTelemetryOptions::default())),
        );
        let pg = Postgres::new();
        ingest(
            "PostgreSQL (synchronous_commit off: telemetry.mode = fast)",
            Arc::new(pg.open_with(PgTelemetryOptions {
                durable: false,
                ..Default::default()
            })),
        );
    }
}
