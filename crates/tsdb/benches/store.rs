//! The store end to end on a real directory (ext4 here), durable mode:
//!
//! * **ingest**: 2 producer threads append messages of 10 points (one
//!   device's reading) for 10,000 devices, keeping up to 4,096 appends in
//!   flight each, for `TSDB_BENCH_SECS` seconds (default 5); every ticket is
//!   waited for, i.e. every point counted is fsynced in the WAL;
//! * **size**: 100 series of a regular 1 s slowly varying sensor for one
//!   day, flushed and compacted; bytes of partition files per point;
//! * **query**: hourly averages over one day of 1 s data of one series
//!   (from heads, then sealed), and over 30 days from rollups.
//!
//! * **peer**: the same three measures on SQLite (see [`sqlite_peer`]).
//!
//! Run with `cargo bench -p m2mhub-tsdb --bench store` (or name one part:
//! `-- ingest`, `size`, `query`, `sqlite`). The data lives
//! under `target/` (set `TSDB_BENCH_DIR` to choose), not in a RAM disk.

use m2mhub_tsdb::*;
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DAY: i64 = 86_400_000;
const T0: i64 = 1_700_000_000_000 - 1_700_000_000_000 % DAY;

fn bench_dir(name: &str) -> tempfile::TempDir {
    let base = std::env::var("TSDB_BENCH_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tsdb-bench").to_string()
    });
    std::fs::create_dir_all(&base).expect("bench dir");
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(base)
        .expect("tempdir")
}

fn opts() -> Options {
    Options {
        flush_interval: Duration::from_secs(3600),
        ..Options::default()
    }
}

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

fn ingest() {
    let secs: u64 = std::env::var("TSDB_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = bench_dir("ingest");
    let db = Arc::new(Tsdb::open(dir.path(), opts()).expect("open"));
    let devices: Vec<String> = (0..10_000).map(|i| format!("dev-{i:05}")).collect();
    let devices = Arc::new(devices);
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
                let mut ts = T0;
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
    // Warm-up (series creation) is included: it is part of real ingest.
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.join().expect("producer");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = acked.load(Ordering::Relaxed);
    let st = db.stats();
    println!(
        "ingest (durable, group commit): {} points in {:.2} s = {:.0} points/s; {} WAL commits ({:.0} points/commit), {:.1} B/point in the WAL",
        n,
        elapsed,
        n as f64 / elapsed,
        st.wal_commits,
        st.points_appended as f64 / st.wal_commits.max(1) as f64,
        st.wal_bytes as f64 / st.points_appended.max(1) as f64
    );
    let t = Instant::now();
    db.flush().expect("flush");
    println!(
        "  flush of {} head points to partitions: {:.2} s",
        st.points_appended,
        t.elapsed().as_secs_f64()
    );
}

fn sensor_day(series: usize, days: i64) -> impl Iterator<Item = (i64, f64)> + Clone {
    let n = days * 86_400;
    let _ = series;
    (0..n).map(|i| {
        let raw = 21.0 + 4.0 * ((i as f64) / 7200.0).sin() + 0.3 * ((i as f64) / 97.0).sin();
        (T0 + i * 1000, (raw * 100.0).round() / 100.0)
    })
}

fn load(db: &Tsdb, device: &str, metric: &str, pts: impl Iterator<Item = (i64, f64)>) -> u64 {
    let mut tickets = Vec::new();
    let mut n = 0;
    let mut buf = Vec::with_capacity(10_000);
    for (t, v) in pts {
        buf.push(InPoint {
            metric,
            ts_ms: t,
            value: Value::F64(v),
        });
        if buf.len() == 10_000 {
            tickets.push(db.append("bench", device, &buf).expect("append").ticket);
            n += buf.len() as u64;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        n += buf.len() as u64;
        tickets.push(db.append("bench", device, &buf).expect("append").ticket);
    }
    for t in tickets {
        t.wait_blocking().expect("durable");
    }
    n
}

fn size() {
    let dir = bench_dir("size");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    let mut n = 0;
    for s in 0..100 {
        n += load(
            &db,
            &format!("meter-{s:03}"),
            "temperature",
            sensor_day(s, 1),
        );
    }
    db.compact().expect("compact");
    let bytes = db.sealed_bytes();
    println!(
        "size: {} points of 1 s sensor data in {} bytes of partition files = {:.3} B/point (chunks + 1 min and 1 h rollups + index)",
        n,
        bytes,
        bytes as f64 / n as f64
    );
}

fn time_query(label: &str, runs: usize, mut f: impl FnMut() -> usize) {
    let mut times = Vec::with_capacity(runs);
    let mut rows = 0;
    for _ in 0..runs {
        let t = Instant::now();
        rows = black_box(f());
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "{label}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({rows} buckets)",
        times[runs / 2].as_secs_f64() * 1e3,
        times[runs * 99 / 100].as_secs_f64() * 1e3,
        times[runs - 1].as_secs_f64() * 1e3
    );
}

fn hourly(db: &Tsdb, from: i64, to: i64) -> usize {
    let devs = ["m".to_string()];
    let (r, _) = db
        .aggregate(&AggQuery {
            tenant: "bench",
            metric: "temperature",
            devices: &devs,
            from_ms: from,
            to_ms: to,
            bucket_ms: 3_600_000,
        })
        .expect("query");
    r.first().map(|s| s.buckets.len()).unwrap_or(0)
}

fn query() {
    let dir = bench_dir("query");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    load(&db, "m", "temperature", sensor_day(0, 1));
    time_query("hourly avg, 1 day of 1 s data, in the head", 200, || {
        hourly(&db, T0, T0 + DAY)
    });
    db.flush().expect("flush");
    time_query(
        "hourly avg, 1 day of 1 s data, sealed (rollups)",
        200,
        || hourly(&db, T0, T0 + DAY),
    );
    time_query(
        "hourly avg, 1 day of 1 s data, sealed, unaligned range (rollups + raw edges)",
        200,
        || hourly(&db, T0 + 1_234, T0 + DAY - 5_678),
    );
    drop(db);
    let dir = bench_dir("month");
    let db = Tsdb::open(dir.path(), opts()).expect("open");
    load(&db, "m", "temperature", sensor_day(0, 30));
    db.compact().expect("compact");
    time_query(
        "hourly avg, 30 days of 1 s data (2.59 M points), from rollups",
        200,
        || hourly(&db, T0, T0 + 30 * DAY),
    );
    let devs = ["m".to_string()];
    let (_, src) = db
        .aggregate(&AggQuery {
            tenant: "bench",
            metric: "temperature",
            devices: &devs,
            from_ms: T0,
            to_ms: T0 + 30 * DAY,
            bucket_ms: 3_600_000,
        })
        .expect("query");
    println!("  sources of the month query: {src:?}");
}

/// The peer: SQLite (bundled, as the registry uses it) in WAL mode with
/// `synchronous=FULL`, one row per point in a `WITHOUT ROWID` table keyed by
/// (series, ts), 10-point messages grouped into transactions of 4,096 —
/// the same group-commit shape as the store above, on the same disk.
fn sqlite_peer() {
    use rusqlite::{params, Connection};
    let secs: u64 = std::env::var("TSDB_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = bench_dir("sqlite");
    let path = dir.path().join("points.db");
    let db = Connection::open(&path).expect("sqlite");
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE points(series INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL,
                             PRIMARY KEY(series, ts)) WITHOUT ROWID;",
    )
    .expect("schema");
    let start = Instant::now();
    let mut n = 0u64;
    let mut i = 0u64;
    let mut ts = T0;
    while start.elapsed() < Duration::from_secs(secs) {
        let tx = db.unchecked_transaction().expect("tx");
        {
            let mut st = tx
                .prepare_cached("INSERT INTO points VALUES (?1, ?2, ?3)")
                .expect("prepare");
            for _ in 0..4096 {
                let dev = i % 10_000;
                if dev == 0 {
                    ts += 1000;
                }
                for k in 0..10u64 {
                    st.execute(params![
                        (dev * 10 + k) as i64,
                        ts,
                        (i % 1000) as f64 * 0.1 + k as f64
                    ])
                    .expect("insert");
                }
                n += 10;
                i += 1;
            }
        }
        tx.commit().expect("commit");
    }
    let el = start.elapsed().as_secs_f64();
    println!("peer sqlite ingest (WAL, synchronous=FULL, 4,096 messages per transaction): {n} points in {el:.2} s = {:.0} points/s", n as f64 / el);
    drop(db);

    let path = dir.path().join("size.db");
    let db = Connection::open(&path).expect("sqlite");
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE points(series INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL NOT NULL,
                             PRIMARY KEY(series, ts)) WITHOUT ROWID;",
    )
    .expect("schema");
    let tx = db.unchecked_transaction().expect("tx");
    let mut n = 0u64;
    {
        let mut st = tx
            .prepare_cached("INSERT INTO points VALUES (?1, ?2, ?3)")
            .expect("prepare");
        for s in 0..10i64 {
            for (t, v) in sensor_day(0, 1) {
                st.execute(params![s, t, v]).expect("insert");
                n += 1;
            }
        }
    }
    tx.commit().expect("commit");
    db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")
        .expect("vacuum");
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "peer sqlite size: {n} points of the same 1 s sensor data in {bytes} bytes = {:.2} B/point",
        bytes as f64 / n as f64
    );
    let mut times = Vec::new();
    let mut rows = 0;
    for _ in 0..50 {
        let t = Instant::now();
        let mut st = db
            .prepare_cached("SELECT ts / 3600000, avg(value) FROM points WHERE series = 3 AND ts >= ?1 AND ts < ?2 GROUP BY ts / 3600000")
            .expect("prepare");
        rows = st
            .query_map(params![T0, T0 + DAY], |r| r.get::<_, f64>(1))
            .expect("query")
            .count();
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "peer sqlite hourly avg, 1 day of 1 s data: p50 {:.3} ms, p99 {:.3} ms ({rows} buckets)",
        times[25].as_secs_f64() * 1e3,
        times[49].as_secs_f64() * 1e3
    );
}

fn main() {
    let which = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |name: &str| which.as_deref().is_none_or(|w| name.contains(w));
    if run("ingest") {
        ingest();
    }
    if run("size") {
        size();
    }
    if run("query") {
        query();
    }
    if run("sqlite") {
        sqlite_peer();
    }
}
