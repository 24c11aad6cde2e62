//! Figures for BENCHMARKS.md: the time of one device insert and of a
//! `load()` of 10,000 devices, SQLite beside PostgreSQL. Ignored (it needs
//! a server and takes a while); run with
//! `cargo test -p m2mhub-pgstore --test conformance -- --ignored --nocapture metadata_store_figures`.

use crate::backends::{Backend, Postgres, Sqlite};
use crate::registry::device;
use std::time::{Duration, Instant};

const DEVICES: usize = 10_000;

fn figures(name: &str, b: &dyn Backend) {
    let s = b.registry();
    let mut each: Vec<Duration> = Vec::with_capacity(DEVICES);
    let start = Instant::now();
    for i in 0..DEVICES {
        let d = device(&format!("bench-{i:05}"));
        let t = Instant::now();
        s.insert_device(&d).expect("insert");
        each.push(t.elapsed());
    }
    let total = start.elapsed();
    each.sort_unstable();
    let pct = |p: usize| each[(each.len() * p / 100).min(each.len() - 1)];
    drop(s);
    let s = b.registry();
    let mut loads = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let snap = s.load().expect("load");
        loads.push(t.elapsed());
        assert_eq!(snap.devices.len(), DEVICES);
    }
    loads.sort_unstable();
    println!(
        "{name}: device insert mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms ({DEVICES} in {:.2} s); \
         load() of {DEVICES} devices median {:.1} ms (best {:.1} ms)",
        total.as_secs_f64() * 1e3 / DEVICES as f64,
        pct(50).as_secs_f64() * 1e3,
        pct(99).as_secs_f64() * 1e3,
        total.as_secs_f64(),
        loads[2].as_secs_f64() * 1e3,
        loads[0].as_secs_f64() * 1e3,
    );
}

#[test]
#[ignore = "a benchmark; needs PostgreSQL: scripts/postgres.sh"]
fn metadata_store_figures() {
    figures("SQLite", &Sqlite::new());
    figures("PostgreSQL", &Postgres::new());
}
