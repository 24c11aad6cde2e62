//! Rule evaluation throughput on one core (plain `Instant`, no harness).
//!
//! * **filter**: `SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85`
//!   over 10,000 devices, 5 % of them hot (their messages match and produce
//!   a Repeat output carrying the payload), and the worst case where every
//!   message matches;
//! * **window**: average and maximum per device over 10 s tumbling windows
//!   with a HAVING, 10,000 devices publishing once a second each, a clock
//!   tick every simulated second;
//! * for reference: the seeds' overheating rule (window + FOR), a sliding
//!   window, and a rule whose topic does not match.
//!
//! Payloads are decoded JSON (the engine's input), built before timing.
//! Run with `cargo bench -p m2mhub-rules`; `RULES_BENCH_MESSAGES` sets the
//! message count per case (default 5,000,000).

use std::hint::black_box;
use std::time::Instant;

use m2mhub_rules::CompiledRule;
use serde_json::{json, Value};

const DEVICES: usize = 10_000;
const T0: i64 = 1_700_000_000_000;

struct Stream {
    topics: Vec<String>,
    cool: Vec<Value>,
    hot: Vec<Value>,
}

fn stream() -> Stream {
    let topics = (0..DEVICES)
        .map(|d| format!("devices/machine-{d:05}/telemetry"))
        .collect();
    let reading = |i: usize, base: f64| {
        let x = i as f64;
        json!({
            "temperature": base + (x * 0.37).sin() * 10.0,
            "humidity": 40.0 + (x * 0.11).cos() * 5.0,
            "vibration": 2.0 + (x * 0.7).sin(),
            "rpm": 1450 + (i % 100) as i64,
        })
    };
    Stream {
        topics,
        cool: (0..1024).map(|i| reading(i, 50.0)).collect(),
        hot: (0..1024).map(|i| reading(i, 100.0)).collect(),
    }
}

/// Feed `n` messages round-robin over the devices, one per device per
/// simulated second, ticking once per simulated second. Returns
/// (messages per second, outputs).
fn run(
    rule: &mut CompiledRule,
    s: &Stream,
    n: usize,
    hot_every: usize,
    topic_override: Option<&str>,
) -> (f64, usize) {
    let mut outputs = 0usize;
    let mut out = Vec::new();
    let start = Instant::now();
    for i in 0..n {
        let d = i % DEVICES;
        let ts = T0 + (i / DEVICES) as i64 * 1_000;
        let payload = if hot_every > 0 && d.is_multiple_of(hot_every) {
            &s.hot[i & 1023]
        } else {
            &s.cool[i & 1023]
        };
        let topic = topic_override.unwrap_or(&s.topics[d]);
        rule.on_message_into(black_box(topic), black_box(payload), ts, &mut out);
        if d == DEVICES - 1 {
            rule.on_tick_into(ts + 999, &mut out);
        }
        outputs += out.len();
        out.clear();
    }
    let secs = start.elapsed().as_secs_f64();
    (n as f64 / secs, outputs)
}

fn case(
    name: &str,
    sql: &str,
    s: &Stream,
    n: usize,
    hot_every: usize,
    topic: Option<&str>,
    bar: Option<f64>,
) {
    let mut rule = CompiledRule::compile(sql).expect("rule compiles");
    // Warm up (allocates the per-key state the steady state reuses).
    run(&mut rule, s, DEVICES * 2, hot_every, topic);
    let mut rule = CompiledRule::compile(sql).expect("rule compiles");
    let (rate, outputs) = run(&mut rule, s, n, hot_every, topic);
    let c = rule.counters();
    let verdict = match bar {
        Some(b) if rate >= b => format!("  (bar {:.0}/s: met)", b),
        Some(b) => format!("  (bar {:.0}/s: NOT MET)", b),
        None => String::new(),
    };
    println!(
        "{name:<34} {:>12.0} evaluations/s  {:>6.1} ns/msg  outputs {outputs:>8}  matched {:>8}  failed {}{verdict}",
        rate,
        1e9 / rate,
        c.matched,
        c.failed,
    );
}

fn main() {
    let n: usize = std::env::var("RULES_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let s = stream();
    println!("rules: {n} messages per case, {DEVICES} devices, one core");

    let filter = "SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85";
    case(
        "filter, 5% of devices hot",
        filter,
        &s,
        n,
        20,
        None,
        Some(1_000_000.0),
    );
    case(
        "filter, every message matches",
        filter,
        &s,
        n,
        1,
        None,
        None,
    );
    case(
        "filter, topic does not match",
        filter,
        &s,
        n,
        20,
        Some("sites/a/status"),
        None,
    );

    let window =
        "SELECT device, avg(temperature) AS t, max(vibration) AS v FROM 'devices/+/telemetry' \
                  GROUP BY device, TUMBLING(10s) HAVING avg(temperature) > 85";
    case(
        "tumbling 10s, 10k devices",
        window,
        &s,
        n,
        20,
        None,
        Some(300_000.0),
    );

    let seeds = "SELECT device, avg(temperature) AS t FROM 'devices/+/telemetry' \
                 GROUP BY device, TUMBLING(10s) HAVING avg(temperature) > 85 FOR 30s OR max(vibration) > 7 \
                 CLEAR WHEN avg(temperature) < 75";
    case(
        "overheating (window+FOR+CLEAR)",
        seeds,
        &s,
        n,
        20,
        None,
        None,
    );

    let sliding = "SELECT device, avg(temperature) AS t FROM 'devices/+/telemetry' \
                   GROUP BY device, SLIDING(30s) HAVING avg(temperature) > 85";
    case("sliding 30s, 10k devices", sliding, &s, n, 20, None, None);

    let for_rule =
        "SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > 85 FOR 30s";
    case("filter with FOR 30s", for_rule, &s, n, 20, None, None);
}
