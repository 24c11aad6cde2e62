//! Rule-level tests: compile errors with positions, each window kind and
//! aggregate through the public API, FOR timers, silence, geofences,
//! zscore, the seeds' overheating scenario, and property tests that no
//! input panics the parser or the evaluator. Time is explicit everywhere:
//! nothing sleeps.

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::{CompileErrorKind as K, CompiledRule, Engine, EvalError, Limits, Output, OutputKind};

/// A time aligned to 10 s windows.
const T0: i64 = 1_700_000_000_000;
const S: i64 = 1_000;

fn rule(sql: &str) -> CompiledRule {
    CompiledRule::compile(sql).unwrap_or_else(|e| panic!("{sql}\n{e}"))
}

fn refused(sql: &str) -> crate::CompileError {
    match CompiledRule::compile(sql) {
        Ok(_) => panic!("accepted: {sql}"),
        Err(e) => e,
    }
}

fn send(r: &mut CompiledRule, device: &str, payload: Value, ts: i64) -> Vec<Output> {
    r.on_message(&format!("devices/{device}/telemetry"), &payload, ts)
}

fn kinds(outs: &[Output]) -> Vec<OutputKind> {
    outs.iter().map(|o| o.kind).collect()
}

fn col<'a>(o: &'a Output, name: &str) -> &'a Value {
    o.row
        .get(name)
        .unwrap_or_else(|| panic!("no column {name} in {:?}", o.row))
}

fn approx(v: &Value, want: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!((got - want).abs() < 1e-9, "got {got}, want {want}");
}

// ---------------------------------------------------------------- errors

#[test]
fn syntax_error_position_on_second_line() {
    let sql = "SELECT device\nFROM 'devices/+/telemetry' WHERE temperature > = 3";
    let e = refused(sql);
    assert_eq!((e.position.line, e.position.column), (2, 48));
    assert!(matches!(e.kind, K::Syntax(_)), "{e}");
    assert_eq!(&sql[e.position.offset..e.position.offset + 1], "=");
}

#[test]
fn unknown_function_points_at_the_call() {
    let sql = "SELECT * FROM 'devices/+/telemetry' WHERE frobnicate(temperature) > 1";
    let e = refused(sql);
    assert_eq!(e.kind, K::UnknownFunction("frobnicate".into()));
    assert_eq!(e.position.column, 43);
    assert_eq!(
        &sql[e.position.offset..e.position.offset + 10],
        "frobnicate"
    );
    assert_eq!(
        e.to_string(),
        "line 1, column 43: unknown function `frobnicate`"
    );
}

#[test]
fn wrong_arity() {
    let e = refused("SELECT abs(1, 2) FROM 'a'");
    assert!(
        matches!(&e.kind, K::WrongArity { function, found: 2, .. } if function == "abs"),
        "{e}"
    );
    assert_eq!(e.position.column, 8);
    let e = refused("SELECT * FROM 'a' WHERE distance(1, 2, 3) > 0");
    assert!(matches!(&e.kind, K::WrongArity { found: 3, .. }), "{e}");
    let e = refused("SELECT device FROM 'a' GROUP BY device, HOPPING(10s) HAVING count(*) > 1");
    assert!(matches!(&e.kind, K::WrongArity { found: 1, .. }), "{e}");
}

#[test]
fn aggregate_in_where() {
    let sql = "SELECT device FROM 'a' WHERE avg(temperature) > 1 GROUP BY device, TUMBLING(10s)";
    let e = refused(sql);
    assert_eq!(e.kind, K::AggregateInWhere("avg".into()));
    assert_eq!(&sql[e.position.offset..e.position.offset + 3], "avg");
    // Without GROUP BY too.
    let e = refused("SELECT * FROM 'a' WHERE max(x) > 1");
    assert_eq!(e.kind, K::AggregateInWhere("max".into()));
    // And in SELECT of a rule without GROUP BY.
    let e = refused("SELECT avg(x) FROM 'a'");
    assert!(matches!(e.kind, K::MisplacedAggregate { .. }), "{e}");
    let e = refused("SELECT device, avg(max(x)) FROM 'a' GROUP BY device, TUMBLING(10s)");
    assert!(matches!(e.kind, K::MisplacedAggregate { .. }), "{e}");
}

#[test]
fn having_without_group_by() {
    let sql = "SELECT * FROM 'a' HAVING count(*) > 1";
    let e = refused(sql);
    assert_eq!(e.kind, K::HavingWithoutGroupBy);
    assert_eq!(&sql[e.position.offset..e.position.offset + 5], "count");
}

#[test]
fn unsupported_constructs() {
    for sql in [
        "SELECT * FROM 'a' JOIN 'b' ON 1 = 1",
        "SELECT * FROM 'a' ORDER BY x",
        "SELECT * FROM 'a' LIMIT 3",
        "SELECT * FROM 'a' WHERE x IN (SELECT 1)",
        "SELECT * FROM 'a' WHERE x LIKE 'a%'",
        "SELECT DISTINCT x FROM 'a'",
        "SELECT * FROM 'a' UNION SELECT * FROM 'b'",
        "WITH q AS (SELECT 1) SELECT * FROM q",
        "SELECT * FROM 'a' WHERE x = $1",
        "SELECT CAST(x AS INT) FROM 'a'",
        "SELECT * FROM 'a' WHERE x & 1 = 1",
    ] {
        let e = refused(sql);
        assert!(matches!(e.kind, K::Unsupported(_)), "{sql}: {e}");
    }
}

#[test]
fn bad_durations() {
    let sql = "SELECT device FROM 'a' GROUP BY device, TUMBLING(10y)";
    let e = refused(sql);
    assert!(matches!(e.kind, K::BadDuration { .. }), "{e}");
    let sql = "SELECT device FROM 'a' GROUP BY device, TUMBLING(0s)";
    let e = refused(sql);
    assert!(matches!(e.kind, K::BadDuration { .. }), "{e}");
    assert_eq!(&sql[e.position.offset..e.position.offset + 2], "0s");
    let e = refused("SELECT * FROM 'a' WHERE x > 1 FOR 30");
    assert!(matches!(e.kind, K::BadDuration { .. }), "{e}");
    let e = refused("SELECT * FROM 'a' WHERE x > 1 FOR 40d");
    assert!(matches!(e.kind, K::BadDuration { .. }), "{e}");
    let e = refused("SELECT device FROM 'a' GROUP BY device, HOPPING(5s, 10s)");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    let e = refused("SELECT device FROM 'a' GROUP BY device, HOPPING(1h, 7ms)");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
}

#[test]
fn bad_polygons() {
    let sql = "SELECT * FROM 'a' WHERE inside(lat, lon, 'POLYGON((0 0, 1 1))')";
    let e = refused(sql);
    assert!(matches!(e.kind, K::BadPolygon(_)), "{e}");
    assert_eq!(&sql[e.position.offset..e.position.offset + 9], "'POLYGON(");
    let e = refused("SELECT * FROM 'a' WHERE inside(lat, lon, shape)");
    assert!(matches!(e.kind, K::BadPolygon(_)), "{e}");
    let e = refused("SELECT * FROM 'a' WHERE inside(lat, lon, 'POLYGON((0 0, 1 95, 1 0))')");
    assert!(matches!(e.kind, K::BadPolygon(_)), "{e}");
}

#[test]
fn grouping_errors() {
    let e = refused("SELECT temperature FROM 'a' GROUP BY device, TUMBLING(10s)");
    assert_eq!(e.kind, K::NotGrouped("temperature".into()));
    let e = refused("SELECT device, avg(x) FROM 'a' GROUP BY device");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    let e = refused("SELECT * FROM 'a' GROUP BY device, TUMBLING(10s)");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    let e = refused("SELECT device FROM 'a' GROUP BY device, TUMBLING(1s), SLIDING(1s)");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    let e = refused("SELECT TUMBLING(10s) FROM 'a'");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    let e = refused("SELECT device FROM 'a' GROUP BY device, TUMBLING(10s) HAVING silent(1m)");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    let e = refused("SELECT device FROM 'a' GROUP BY device HAVING silent(1m) AND true");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
}

#[test]
fn for_outside_a_firing_condition() {
    let e = refused("SELECT x > 1 FOR 10s FROM 'a'");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    let sql = "SELECT device FROM 'a' WHERE x > 1 FOR 10s GROUP BY device, TUMBLING(10s)";
    let e = refused(sql);
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    assert_eq!(&sql[e.position.offset..e.position.offset + 3], "10s");
    let e = refused("SELECT * FROM 'a' WHERE (x > 1 FOR 10s) FOR 20s");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
}

#[test]
fn from_errors() {
    let e = refused("SELECT * FROM 'a/#/b'");
    assert!(matches!(e.kind, K::BadTopicFilter { .. }), "{e}");
    assert_eq!(e.position.column, 15);
    let e = refused("SELECT * FROM devices");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
    let e = refused("SELECT 1");
    assert!(matches!(e.kind, K::Misplaced(_)), "{e}");
}

#[test]
fn type_errors() {
    let e = refused("SELECT * FROM 'a' WHERE 'x' + 1 > 2");
    assert!(matches!(e.kind, K::Type(_)), "{e}");
    let e = refused("SELECT * FROM 'a' WHERE 5");
    assert!(matches!(e.kind, K::Type(_)), "{e}");
    let e = refused("SELECT * FROM 'a' WHERE device = 5");
    assert!(matches!(e.kind, K::Type(_)), "{e}");
    let e = refused("SELECT * FROM 'a' WHERE true > false");
    assert!(matches!(e.kind, K::Type(_)), "{e}");
    let e = refused("SELECT * FROM 'a' WHERE topic(x) = 'a'");
    assert!(matches!(e.kind, K::Type(_)), "{e}");
    let e = refused("SELECT upper(3) FROM 'a'");
    assert!(matches!(e.kind, K::Type(_)), "{e}");
}

#[test]
fn positions_count_characters_not_bytes() {
    let sql = "SELECT 'é', frob(x) FROM 'a'";
    let e = refused(sql);
    assert_eq!(e.position.column, 13);
    assert_eq!(&sql[e.position.offset..e.position.offset + 4], "frob");
}

// ---------------------------------------------------------------- filters

#[test]
fn filter_rule_fires_repeats_and_clears() {
    let mut r = rule(
        "SELECT *, device, topic(3) AS kind FROM 'devices/+/telemetry' WHERE temperature > 85",
    );
    assert!(send(&mut r, "m1", json!({"temperature": 80}), T0).is_empty());
    assert_eq!(r.tracked_keys(), 0, "a key that never fired keeps no state");
    let out = send(&mut r, "m1", json!({"temperature": 90, "rpm": 3}), T0 + S);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
    let o = &out[0];
    assert_eq!(o.device.as_deref(), Some("m1"));
    assert_eq!(o.ts_ms, T0 + S);
    assert_eq!(col(o, "temperature"), &json!(90));
    assert_eq!(col(o, "rpm"), &json!(3));
    assert_eq!(col(o, "device"), &json!("m1"));
    assert_eq!(col(o, "kind"), &json!("telemetry"));
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 91}), T0 + 2 * S)),
        vec![OutputKind::Repeat]
    );
    // Another device is independent.
    assert_eq!(
        kinds(&send(&mut r, "m2", json!({"temperature": 99}), T0 + 2 * S)),
        vec![OutputKind::Fire]
    );
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 70}), T0 + 3 * S)),
        vec![OutputKind::Clear]
    );
    assert!(send(&mut r, "m1", json!({"temperature": 70}), T0 + 4 * S).is_empty());
    // Other topics are not seen.
    assert!(r
        .on_message("devices/m1/status", &json!({"temperature": 99}), T0)
        .is_empty());
    let c = r.counters();
    assert_eq!(
        (c.received, c.matched, c.fired, c.cleared, c.failed),
        (6, 3, 3, 1, 0)
    );
}

#[test]
fn payload_paths_and_expressions() {
    let mut r = rule(
        "SELECT payload.engine.temp * 9 / 5 + 32 AS f, round(engine.temp / 3, 2) AS r, \
         CASE WHEN engine.temp > 100 THEN 'boil' ELSE 'ok' END AS state, \
         coalesce(missing, 'none') AS m, concat(device, '/', ts) AS id \
         FROM 'devices/#' \
         WHERE engine.temp BETWEEN 0 AND 200 AND mode IN ('run', 'test') AND NOT (ok IS NULL)",
    );
    let out = send(
        &mut r,
        "m1",
        json!({"engine": {"temp": 20}, "mode": "run", "ok": true}),
        5,
    );
    assert_eq!(out.len(), 1, "{:?}", r.counters());
    let o = &out[0];
    approx(col(o, "f"), 68.0);
    approx(col(o, "r"), 6.67);
    assert_eq!(col(o, "state"), &json!("ok"));
    assert_eq!(col(o, "m"), &json!("none"));
    assert_eq!(col(o, "id"), &json!("m1/5"));
    assert!(send(
        &mut r,
        "m2",
        json!({"engine": {"temp": 20}, "mode": "idle", "ok": 1}),
        5
    )
    .is_empty());
}

#[test]
fn runtime_failures_are_counted_and_the_rule_goes_on() {
    let mut r = rule("SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85");
    assert!(send(&mut r, "m1", json!({"humidity": 3}), T0).is_empty());
    assert!(send(&mut r, "m1", json!({"temperature": "hot"}), T0 + 1).is_empty());
    assert_eq!(
        send(&mut r, "m1", json!({"temperature": 90}), T0 + 2).len(),
        1
    );
    let c = r.counters();
    assert_eq!((c.received, c.failed, c.fired), (3, 2, 1));
    let last = c.last_error.as_ref().expect("last error");
    assert_eq!(last.ts_ms, T0 + 1);
    assert!(
        matches!(last.error, EvalError::Incomparable { .. }),
        "{:?}",
        last.error
    );
    assert_eq!(
        r.on_message("devices/m1/telemetry", &json!({}), T0 + 3),
        vec![]
    );
    assert_eq!(
        r.counters()
            .last_error
            .as_ref()
            .map(|l| l.error.to_string()),
        Some("missing field `temperature`".into())
    );
    // Division by zero and null handling.
    let mut r = rule("SELECT a / b AS q FROM 'x' WHERE a / b > 1 OR a IS NULL");
    assert!(r.on_message("x", &json!({"a": 1, "b": 0}), 0).is_empty());
    assert_eq!(
        r.counters().last_error.as_ref().map(|l| &l.error),
        Some(&EvalError::DivisionByZero)
    );
    assert_eq!(r.on_message("x", &json!({"a": null, "b": 0}), 0).len(), 1);
}

#[test]
fn event_sources_take_the_device_from_the_payload() {
    let mut r =
        rule("SELECT device, reason FROM '$events/device_disconnected' WHERE reason <> 'normal'");
    let out = r.on_message(
        "$events/device_disconnected",
        &json!({"device": "d7", "reason": "keepalive"}),
        9,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].device.as_deref(), Some("d7"));
    assert_eq!(col(&out[0], "device"), &json!("d7"));
    // `#` does not see `$` topics.
    let mut all = rule("SELECT * FROM '#'");
    assert!(all
        .on_message("$events/device_disconnected", &json!({}), 0)
        .is_empty());
    assert_eq!(all.on_message("a/b", &json!({}), 0).len(), 1);
}

// ---------------------------------------------------------------- FOR

#[test]
fn for_fires_after_the_condition_held_long_enough() {
    let mut r = rule(
        "SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > 85 FOR 30s",
    );
    for i in 0..6 {
        let out = send(&mut r, "m1", json!({"temperature": 90}), T0 + i * 5 * S);
        assert!(out.is_empty(), "fired early at {i}");
    }
    let out = send(&mut r, "m1", json!({"temperature": 90}), T0 + 30 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
    assert_eq!(col(&out[0], "temperature"), &json!(90));
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 90}), T0 + 35 * S)),
        vec![OutputKind::Repeat]
    );
    // One cool reading clears and resets the timer.
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 80}), T0 + 40 * S)),
        vec![OutputKind::Clear]
    );
    assert!(send(&mut r, "m1", json!({"temperature": 90}), T0 + 45 * S).is_empty());
    assert!(send(&mut r, "m1", json!({"temperature": 90}), T0 + 70 * S).is_empty());
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 90}), T0 + 75 * S)),
        vec![OutputKind::Fire]
    );
}

#[test]
fn for_resets_when_the_condition_breaks() {
    let mut r = rule("SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85 FOR 30s");
    send(&mut r, "m1", json!({"temperature": 90}), T0);
    send(&mut r, "m1", json!({"temperature": 90}), T0 + 20 * S);
    assert!(send(&mut r, "m1", json!({"temperature": 84}), T0 + 25 * S).is_empty());
    assert!(send(&mut r, "m1", json!({"temperature": 90}), T0 + 30 * S).is_empty());
    assert!(r.on_tick(T0 + 59 * S).is_empty());
    assert_eq!(kinds(&r.on_tick(T0 + 60 * S)), vec![OutputKind::Fire]);
}

#[test]
fn for_expires_on_a_tick_without_new_messages() {
    let mut r = rule(
        "SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > 85 FOR 30s",
    );
    assert!(send(&mut r, "m1", json!({"temperature": 90}), T0).is_empty());
    assert_eq!(r.next_deadline(), Some(T0 + 30 * S));
    assert!(r.on_tick(T0 + 30 * S - 1).is_empty());
    let out = r.on_tick(T0 + 30 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
    assert_eq!(out[0].ts_ms, T0 + 30 * S);
    assert_eq!(
        col(&out[0], "temperature"),
        &json!(90),
        "the tick reuses the last reading"
    );
    assert_eq!(r.next_deadline(), None);
    assert!(r.on_tick(T0 + 60 * S).is_empty(), "fires once");
}

#[test]
fn for_binds_tighter_than_and_or() {
    // `a AND b FOR 10s` is `a AND (b FOR 10s)`: b's timer runs on its own.
    let mut r = rule("SELECT * FROM 'x/+' WHERE a > 0 AND b > 0 FOR 10s");
    let m = |r: &mut CompiledRule, a: i64, b: i64, ts: i64| {
        kinds(&r.on_message("x/d", &json!({"a": a, "b": b}), ts))
    };
    assert!(m(&mut r, 0, 1, 0).is_empty());
    assert!(m(&mut r, 0, 1, 10_000).is_empty(), "a is false");
    assert_eq!(
        m(&mut r, 1, 1, 11_000),
        vec![OutputKind::Fire],
        "b has held for 11 s"
    );
    assert_eq!(m(&mut r, 0, 1, 12_000), vec![OutputKind::Clear]);
    assert_eq!(m(&mut r, 1, 1, 13_000), vec![OutputKind::Fire]);
    // Parentheses put the duration on the whole conjunction.
    let mut r = rule("SELECT * FROM 'x/+' WHERE (a > 0 AND b > 0) FOR 10s");
    assert!(m(&mut r, 0, 1, 0).is_empty());
    assert!(m(&mut r, 1, 1, 5_000).is_empty());
    assert!(m(&mut r, 1, 1, 14_999).is_empty());
    assert_eq!(m(&mut r, 1, 1, 15_000), vec![OutputKind::Fire]);
}

#[test]
fn quiet_devices_keep_no_state() {
    let mut r = rule("SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85 FOR 30s");
    for d in 0..100 {
        assert!(send(&mut r, &format!("d{d}"), json!({"temperature": 20}), T0).is_empty());
    }
    assert_eq!(r.tracked_keys(), 0);
    send(&mut r, "hot", json!({"temperature": 90}), T0);
    assert_eq!(r.tracked_keys(), 1, "a started timer is state");
    send(&mut r, "hot", json!({"temperature": 20}), T0 + S);
    assert_eq!(r.tracked_keys(), 0, "and goes when the timer resets");
    assert_eq!(
        r.next_deadline(),
        Some(T0 + 30 * S),
        "a stale deadline only costs one idle tick"
    );
    assert!(r.on_tick(T0 + 30 * S).is_empty());
    assert_eq!(r.next_deadline(), None);
}

#[test]
fn clear_when_gives_hysteresis() {
    let mut r = rule("SELECT temperature FROM 'devices/+/telemetry' WHERE temperature > 85 CLEAR WHEN temperature < 75");
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 90}), 1)),
        vec![OutputKind::Fire]
    );
    assert!(
        send(&mut r, "m1", json!({"temperature": 80}), 2).is_empty(),
        "in the band: still active"
    );
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 86}), 3)),
        vec![OutputKind::Repeat]
    );
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 74}), 4)),
        vec![OutputKind::Clear]
    );
    assert!(send(&mut r, "m1", json!({"temperature": 80}), 5).is_empty());
    assert_eq!(
        kinds(&send(&mut r, "m1", json!({"temperature": 86}), 6)),
        vec![OutputKind::Fire]
    );
}

#[test]
fn clear_when_with_its_own_duration() {
    let mut r = rule("SELECT * FROM 'x/+' WHERE t > 85 CLEAR WHEN t < 75 FOR 10s");
    assert_eq!(
        kinds(&r.on_message("x/a", &json!({"t": 90}), 0)),
        vec![OutputKind::Fire]
    );
    assert!(r.on_message("x/a", &json!({"t": 70}), 1_000).is_empty());
    assert!(r.on_message("x/a", &json!({"t": 70}), 10_999).is_empty());
    assert_eq!(
        kinds(&r.on_message("x/a", &json!({"t": 70}), 11_000)),
        vec![OutputKind::Clear]
    );
}

// ---------------------------------------------------------------- windows and aggregates

#[test]
fn tumbling_window_with_every_aggregate() {
    let mut r = rule(
        "SELECT device, avg(v) AS avg, min(v) AS min, max(v) AS max, sum(v) AS sum, count(*) AS n, \
         count(note) AS notes, stddev(v) AS sd, first(v) AS first, last(v) AS last, rate(v) AS rate, \
         delta(v) AS delta, window_start, window_end \
         FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s)",
    );
    for (i, v) in [2.0, 4.0, 4.0, 5.0, 10.0].iter().enumerate() {
        // A missing field is a failure; an explicit null is skipped.
        let payload = if i == 0 {
            json!({"v": v, "note": "x"})
        } else {
            json!({"v": v, "note": null})
        };
        assert!(send(&mut r, "m1", payload, T0 + i as i64 * 2 * S).is_empty());
    }
    assert_eq!(r.next_deadline(), Some(T0 + 10 * S));
    assert!(r.on_tick(T0 + 10 * S - 1).is_empty());
    let out = r.on_tick(T0 + 10 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
    let o = &out[0];
    assert_eq!(
        o.window.map(|w| (w.start_ms, w.end_ms)),
        Some((T0, T0 + 10 * S))
    );
    approx(col(o, "avg"), 5.0);
    approx(col(o, "min"), 2.0);
    approx(col(o, "max"), 10.0);
    approx(col(o, "sum"), 25.0);
    assert_eq!(col(o, "n"), &json!(5));
    assert_eq!(col(o, "notes"), &json!(1));
    approx(col(o, "sd"), 3.0);
    approx(col(o, "first"), 2.0);
    approx(col(o, "last"), 10.0);
    approx(col(o, "rate"), 1.0);
    approx(col(o, "delta"), 8.0);
    assert_eq!(col(o, "window_start"), &json!(T0));
    assert_eq!(col(o, "window_end"), &json!(T0 + 10 * S));
    assert_eq!(col(o, "device"), &json!("m1"));
}

#[test]
fn tumbling_window_closes_on_the_next_message_and_refuses_late_ones() {
    let mut r = rule("SELECT device, sum(v) AS s FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s) HAVING sum(v) > 1");
    send(&mut r, "m1", json!({"v": 1}), T0 + S);
    send(&mut r, "m1", json!({"v": 2}), T0 + 9 * S);
    let out = send(&mut r, "m1", json!({"v": 1}), T0 + 12 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
    approx(col(&out[0], "s"), 3.0);
    assert!(send(&mut r, "m1", json!({"v": 5}), T0 + 5 * S).is_empty());
    assert_eq!(r.counters().late, 1);
    // [10 s, 20 s) holds only 1: the condition no longer holds → clear.
    let out = r.on_tick(T0 + 20 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Clear]);
}

#[test]
fn hopping_windows_overlap() {
    let mut r = rule("SELECT device, count(*) AS n, sum(v) AS s FROM 'devices/+/telemetry' GROUP BY device, HOPPING(10s, 5s)");
    let mut out = Vec::new();
    for (t, v) in [(1, 1), (6, 10), (11, 100)] {
        out.extend(send(&mut r, "m1", json!({"v": v}), T0 + t * S));
    }
    out.extend(r.on_tick(T0 + 25 * S));
    let got: Vec<(i64, i64, Value)> = out
        .iter()
        .map(|o| {
            let w = o.window.expect("window");
            (
                (w.start_ms - T0) / S,
                (w.end_ms - T0) / S,
                col(o, "s").clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (-5, 5, json!(1)),
            (0, 10, json!(11)),
            (5, 15, json!(110)),
            (10, 20, json!(100)),
        ]
    );
    assert_eq!(kinds(&out)[0], OutputKind::Fire);
    assert!(kinds(&out)[1..].iter().all(|k| *k == OutputKind::Repeat));
}

#[test]
fn sliding_window_evaluates_per_message_and_expires_on_ticks() {
    let mut r = rule(
        "SELECT device, avg(v) AS a, count(*) AS n FROM 'devices/+/telemetry' \
         GROUP BY device, SLIDING(30s) HAVING avg(v) > 50",
    );
    assert!(send(&mut r, "m1", json!({"v": 40}), T0).is_empty());
    let out = send(&mut r, "m1", json!({"v": 80}), T0 + 10 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
    approx(col(&out[0], "a"), 60.0);
    let out = send(&mut r, "m1", json!({"v": 40}), T0 + 20 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Repeat]);
    approx(col(&out[0], "a"), 160.0 / 3.0);
    // At T0+30s the first value (40) leaves: (80+40)/2 = 60.
    let out = r.on_tick(T0 + 30 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Repeat]);
    approx(col(&out[0], "a"), 60.0);
    assert_eq!(col(&out[0], "n"), &json!(2));
    // At T0+40s the 80 leaves: 40 → clear.
    let out = r.on_tick(T0 + 40 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Clear]);
    // At T0+50s the window empties and the key goes.
    assert!(r.on_tick(T0 + 50 * S).is_empty());
    assert_eq!(r.tracked_keys(), 0);
}

#[test]
fn group_by_topic_levels_and_global_windows() {
    let mut r = rule(
        "SELECT topic(2) AS site, count(*) AS n FROM 'sites/+/#' GROUP BY topic(2), TUMBLING(1m)",
    );
    r.on_message("sites/a/x", &json!({}), T0);
    r.on_message("sites/a/y", &json!({}), T0 + 1);
    r.on_message("sites/b/x", &json!({}), T0 + 2);
    let mut out = r.on_tick(T0 + 60 * S);
    out.sort_by(|a, b| a.key.cmp(&b.key));
    let got: Vec<_> = out
        .iter()
        .map(|o| (o.key.to_string(), col(o, "n").clone()))
        .collect();
    assert_eq!(got, vec![("a".into(), json!(2)), ("b".into(), json!(1))]);
    assert_eq!(out[0].device, None);

    let mut r = rule(
        "SELECT count(*) AS n, max(t) AS hottest FROM 'devices/+/telemetry' GROUP BY TUMBLING(10s)",
    );
    send(&mut r, "a", json!({"t": 1}), T0);
    send(&mut r, "b", json!({"t": 7}), T0 + 1);
    let out = r.on_tick(T0 + 10 * S);
    assert_eq!(out.len(), 1);
    assert_eq!(col(&out[0], "n"), &json!(2));
    assert_eq!(col(&out[0], "hottest"), &json!(7));
}

#[test]
fn grouped_where_filters_before_aggregation() {
    let mut r = rule(
        "SELECT device, count(*) AS n FROM 'devices/+/telemetry' WHERE kind = 'reading' \
         GROUP BY device, TUMBLING(10s)",
    );
    send(&mut r, "m1", json!({"kind": "reading"}), T0);
    send(&mut r, "m1", json!({"kind": "boot"}), T0 + 1);
    let out = r.on_tick(T0 + 10 * S);
    assert_eq!(col(&out[0], "n"), &json!(1));
    assert_eq!(r.counters().matched, 1);
}

#[test]
fn numeric_aggregate_of_a_string_fails_the_message_only() {
    let mut r = rule("SELECT device, avg(v) AS a, count(*) AS n FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s)");
    send(&mut r, "m1", json!({"v": 1}), T0);
    send(&mut r, "m1", json!({"v": "x"}), T0 + 1);
    send(&mut r, "m1", json!({"v": 3}), T0 + 2);
    let out = r.on_tick(T0 + 10 * S);
    approx(col(&out[0], "a"), 2.0);
    assert_eq!(
        col(&out[0], "n"),
        &json!(2),
        "the failed message is not counted at all"
    );
    assert_eq!(r.counters().failed, 1);
}

// ---------------------------------------------------------------- silence

#[test]
fn silence_detected_on_ticks_and_cleared_by_the_next_message() {
    let mut r = rule("SELECT device, last_seen() AS seen FROM 'devices/+/telemetry' GROUP BY device HAVING silent(10m)");
    send(&mut r, "m1", json!({}), T0);
    send(&mut r, "m2", json!({}), T0 + 5 * 60 * S);
    assert_eq!(r.next_deadline(), Some(T0 + 10 * 60 * S));
    assert!(r.on_tick(T0 + 10 * 60 * S - 1).is_empty());
    let out = r.on_tick(T0 + 10 * 60 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
    assert_eq!(out[0].device.as_deref(), Some("m1"));
    assert_eq!(col(&out[0], "seen"), &json!(T0));
    assert!(
        r.on_tick(T0 + 11 * 60 * S).is_empty(),
        "fires once per silence"
    );
    let out = r.on_tick(T0 + 15 * 60 * S);
    assert_eq!(
        out.iter().map(|o| o.device.as_deref()).collect::<Vec<_>>(),
        vec![Some("m2")]
    );
    let out = send(&mut r, "m1", json!({}), T0 + 16 * 60 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Clear]);
    assert_eq!(out[0].device.as_deref(), Some("m1"));
    assert_eq!(r.next_deadline(), Some(T0 + 26 * 60 * S));
}

// ---------------------------------------------------------------- geo and anomalies

const DEPOT: &str = "POLYGON((2.30 48.80, 2.40 48.80, 2.40 48.90, 2.30 48.90, 2.30 48.80))";

#[test]
fn geofence_exit_fires_and_reentry_clears() {
    let mut r = rule(&format!(
        "SELECT device, lat, lon FROM 'devices/+/location' WHERE NOT inside(lat, lon, '{DEPOT}')"
    ));
    let at = |r: &mut CompiledRule, lat: f64, lon: f64, ts: i64| {
        r.on_message(
            "devices/truck1/location",
            &json!({"lat": lat, "lon": lon}),
            ts,
        )
    };
    assert!(at(&mut r, 48.85, 2.35, 1).is_empty(), "inside");
    let out = at(&mut r, 48.95, 2.35, 2);
    assert_eq!(kinds(&out), vec![OutputKind::Fire], "outside");
    assert_eq!(col(&out[0], "lat"), &json!(48.95));
    assert_eq!(kinds(&at(&mut r, 48.85, 2.39, 3)), vec![OutputKind::Clear]);
}

#[test]
fn distance_from_a_point() {
    let mut r = rule(
        "SELECT round(distance(lat, lon, 48.8530, 2.3499)) AS m FROM 'devices/+/location' \
         WHERE distance(lat, lon, 48.8530, 2.3499) > 1000",
    );
    assert!(r
        .on_message(
            "devices/t/location",
            &json!({"lat": 48.8530, "lon": 2.3600}),
            1
        )
        .is_empty());
    let out = r.on_message(
        "devices/t/location",
        &json!({"lat": 51.5007, "lon": -0.1246}),
        2,
    );
    assert_eq!(out.len(), 1);
    let m = col(&out[0], "m").as_f64().expect("metres");
    assert!((m - 343_000.0).abs() < 1_000.0, "{m}");
}

#[test]
fn zscore_against_each_devices_own_baseline() {
    let mut r = rule(
        "SELECT device, temperature, zscore(temperature) AS z FROM 'devices/+/telemetry' \
         WHERE zscore(temperature) > 3",
    );
    // m1 hovers around 20, m2 around 60: each is normal for itself.
    for i in 0..50 {
        let wiggle = if i % 2 == 0 { -1.0 } else { 1.0 };
        assert!(send(&mut r, "m1", json!({"temperature": 20.0 + wiggle}), i).is_empty());
        assert!(send(&mut r, "m2", json!({"temperature": 60.0 + wiggle}), i).is_empty());
    }
    assert!(send(&mut r, "m2", json!({"temperature": 61.5}), 60).is_empty());
    let out = send(&mut r, "m1", json!({"temperature": 30.0}), 61);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
    let z = col(&out[0], "z").as_f64().expect("z");
    assert!(z > 5.0, "{z}");
    // A fresh device is not an anomaly during warm-up.
    assert!(send(&mut r, "m3", json!({"temperature": 1000.0}), 62).is_empty());
}

#[test]
fn zscore_over_window_results() {
    let mut r = rule(
        "SELECT device, avg(v) AS a FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(1s) \
         HAVING zscore(avg(v), 20) > 3",
    );
    for w in 0..30 {
        let v = if w % 2 == 0 { 9.0 } else { 11.0 };
        send(&mut r, "m1", json!({"v": v}), T0 + w * S);
    }
    assert!(r.on_tick(T0 + 30 * S).is_empty());
    send(&mut r, "m1", json!({"v": 50.0}), T0 + 30 * S);
    let out = r.on_tick(T0 + 31 * S);
    assert_eq!(kinds(&out), vec![OutputKind::Fire]);
}

// ---------------------------------------------------------------- the seeds' scenario

const OVERHEAT: &str = "SELECT device, avg(temperature) AS t FROM 'devices/+/telemetry' \
    GROUP BY device, TUMBLING(10s) HAVING avg(temperature) > 85 FOR 30s OR max(vibration) > 7";

#[test]
fn overheating_fires_after_30_s_of_hot_readings_and_not_before() {
    let mut r = rule(OVERHEAT);
    let mut fired_at = None;
    for t in 0..=60 {
        let ts = T0 + t * S;
        let mut out = send(
            &mut r,
            "press1",
            json!({"temperature": 90.0, "vibration": 1.0}),
            ts,
        );
        out.extend(r.on_tick(ts));
        for o in &out {
            if o.kind == OutputKind::Fire && fired_at.is_none() {
                fired_at = Some(ts - T0);
                approx(col(o, "t"), 90.0);
                assert_eq!(o.device.as_deref(), Some("press1"));
            }
        }
        if t < 30 {
            assert!(fired_at.is_none(), "fired at {t} s");
        }
    }
    assert_eq!(fired_at, Some(30 * S));
}

#[test]
fn overheating_vibration_fires_at_once_and_a_cool_window_resets_the_duration() {
    let mut r = rule(OVERHEAT);
    // Hot for 20 s, then one cool window, then hot again.
    for t in 0..20 {
        send(
            &mut r,
            "m",
            json!({"temperature": 90.0, "vibration": 1.0}),
            T0 + t * S,
        );
    }
    for t in 20..30 {
        send(
            &mut r,
            "m",
            json!({"temperature": 70.0, "vibration": 1.0}),
            T0 + t * S,
        );
    }
    let mut outs = Vec::new();
    for t in 30..60 {
        outs.extend(send(
            &mut r,
            "m",
            json!({"temperature": 90.0, "vibration": 1.0}),
            T0 + t * S,
        ));
    }
    outs.extend(r.on_tick(T0 + 60 * S - 1));
    assert!(outs.is_empty(), "{outs:?}");
    assert_eq!(kinds(&r.on_tick(T0 + 60 * S)), vec![OutputKind::Fire]);

    // Vibration above the limit fires at the close of its window, no duration.
    let mut r = rule(OVERHEAT);
    send(
        &mut r,
        "m",
        json!({"temperature": 20.0, "vibration": 9.0}),
        T0 + S,
    );
    assert_eq!(kinds(&r.on_tick(T0 + 10 * S)), vec![OutputKind::Fire]);
    send(
        &mut r,
        "m",
        json!({"temperature": 20.0, "vibration": 1.0}),
        T0 + 11 * S,
    );
    assert_eq!(kinds(&r.on_tick(T0 + 20 * S)), vec![OutputKind::Clear]);
}

#[test]
fn overheating_clears_with_hysteresis() {
    let mut r = rule(&format!("{OVERHEAT} CLEAR WHEN avg(temperature) < 75"));
    let mut all = Vec::new();
    for t in 0..100 {
        let temp = match t {
            0..40 => 90.0,
            40..60 => 80.0, // between 75 and 85: stays active
            _ => 70.0,
        };
        all.extend(send(
            &mut r,
            "m",
            json!({"temperature": temp, "vibration": 0.5}),
            T0 + t * S,
        ));
    }
    all.extend(r.on_tick(T0 + 100 * S));
    let seq: Vec<(OutputKind, i64)> = all.iter().map(|o| (o.kind, (o.ts_ms - T0) / S)).collect();
    assert_eq!(
        seq,
        vec![
            (OutputKind::Fire, 30),
            (OutputKind::Repeat, 40),
            (OutputKind::Clear, 70),
        ]
    );
}

// ---------------------------------------------------------------- engine and limits

#[test]
fn engine_routes_by_topic_and_tags_outputs() {
    let mut e = Engine::new();
    e.insert(
        "hot",
        rule("SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85"),
    );
    e.insert(
        "loc",
        rule("SELECT * FROM 'devices/+/location' WHERE speed > 90"),
    );
    let out = e.on_message("devices/a/telemetry", &json!({"temperature": 90}), 1);
    assert_eq!(
        out.iter().map(|o| &*o.rule).collect::<Vec<_>>(),
        vec!["hot"]
    );
    assert!(e.set_enabled("hot", false));
    assert!(e
        .on_message("devices/a/telemetry", &json!({"temperature": 90}), 2)
        .is_empty());
    assert!(e.set_enabled("hot", true));
    let out = e.on_message("devices/a/telemetry", &json!({"temperature": 90}), 3);
    assert_eq!(
        out[0].output.kind,
        OutputKind::Fire,
        "state was reset when disabled"
    );
    assert!(e.insert("hot", rule("SELECT * FROM 'x'")).is_some());
    assert_eq!(e.ids().collect::<Vec<_>>(), vec!["hot", "loc"]);
    assert!(e.remove("loc").is_some());
    assert!(e.get("loc").is_none());
    assert_eq!(e.next_deadline(), None);
}

#[test]
fn key_limit_counts_failures() {
    let mut r =
        rule("SELECT device, count(*) FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s)")
            .with_limits(Limits {
                max_keys: 2,
                ..Limits::default()
            });
    for d in ["a", "b", "c"] {
        send(&mut r, d, json!({}), T0);
    }
    assert_eq!(r.tracked_keys(), 2);
    assert_eq!(r.counters().failed, 1);
    assert_eq!(
        r.counters().last_error.as_ref().map(|l| &l.error),
        Some(&EvalError::TooManyKeys(2))
    );
}

#[test]
fn introspection() {
    let r = rule("SELECT device, avg(t) FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s)");
    assert_eq!(r.columns(), vec!["device", "avg(t)"]);
    assert_eq!(r.kind(), crate::RuleKind::Windowed);
    assert_eq!(r.source().as_str(), "devices/+/telemetry");
    assert!(r.sql().starts_with("SELECT"));
}

// ---------------------------------------------------------------- properties

const RULES: &[&str] = &[
    "SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85",
    "SELECT device, t FROM 'devices/+/telemetry' WHERE t > 1 FOR 5s CLEAR WHEN t < 0",
    OVERHEAT,
    "SELECT device, avg(t), stddev(t), rate(t), first(s), last(s) FROM 'devices/#' GROUP BY device, SLIDING(7s) HAVING count(*) > 2",
    "SELECT device, sum(t) FROM 'devices/#' GROUP BY device, HOPPING(6s, 4s) HAVING sum(t) > 0 FOR 8s",
    "SELECT device FROM 'devices/#' GROUP BY device HAVING silent(3s)",
    "SELECT zscore(t, 5) AS z, a.b.c FROM '#' WHERE zscore(t, 5) > 1 OR inside(t, s, 'POLYGON((0 0, 10 0, 10 10))')",
    "SELECT topic(2), concat(s, t), t / s, t % s, lower(s) FROM '+/+/+' WHERE s IN (1, 'x', true) OR t BETWEEN s AND 3",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z]{0,4}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,2}|t|s|a|temperature|vibration", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const WORDS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "HAVING",
    "CLEAR",
    "WHEN",
    "FOR",
    "AND",
    "OR",
    "NOT",
    "CASE",
    "THEN",
    "ELSE",
    "END",
    "IS",
    "NULL",
    "IN",
    "BETWEEN",
    "*",
    ",",
    "(",
    ")",
    "'devices/+/t'",
    "'a/#'",
    "device",
    "ts",
    "topic",
    "payload",
    "t",
    "payload.t",
    "avg",
    "count",
    "max",
    "zscore",
    "silent",
    "inside",
    "distance",
    "TUMBLING",
    "HOPPING",
    "SLIDING",
    "10s",
    "5m",
    "0s",
    "1",
    "2.5",
    "-",
    "+",
    "/",
    "%",
    ">",
    "<",
    "=",
    "<>",
    "'POLYGON((0 0, 1 0, 1 1))'",
    "'x'",
    ";",
    "$1",
    "\n",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics_the_compiler(sql in "\\PC{0,120}") {
        let _ = CompiledRule::compile(&sql);
    }

    #[test]
    fn sql_like_token_soup_never_panics_the_compiler(words in prop::collection::vec(prop::sample::select(WORDS), 0..40)) {
        let sql = words.join(" ");
        if let Err(e) = CompiledRule::compile(&sql) {
            // The position is always inside (or just past) the text.
            prop_assert!(e.position.offset <= sql.len());
            prop_assert!(sql.is_char_boundary(e.position.offset));
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed(depth in 1usize..400) {
        let sql = format!("SELECT * FROM 'a' WHERE {}1 > 0{}", "(".repeat(depth), ")".repeat(depth));
        let _ = CompiledRule::compile(&sql);
    }

    #[test]
    fn extreme_timestamps_never_panic(ts in prop::collection::vec(any::<i64>(), 1..8)) {
        let mut rules: Vec<CompiledRule> = RULES.iter().map(|s| rule(s)).collect();
        for r in rules.iter_mut() {
            for &t in &ts {
                let _ = r.on_message("devices/a/telemetry", &json!({"t": 1, "s": 2, "temperature": 90}), t);
                let _ = r.on_tick(t);
            }
        }
    }

    #[test]
    fn arbitrary_messages_never_panic_the_evaluator(
        msgs in prop::collection::vec(
            (prop::sample::select(&["devices/a/telemetry", "devices/b/t", "x/y/z", "$events/e", "devices//x", "a"][..]),
             json_value(),
             -50_000i64..50_000,
             any::<bool>()),
            0..40),
    ) {
        let mut rules: Vec<CompiledRule> = RULES.iter().map(|s| rule(s)).collect();
        for (topic, payload, dt, tick) in &msgs {
            for r in rules.iter_mut() {
                let ts = T0 + dt;
                let _ = r.on_message(topic, payload, ts);
                if *tick {
                    let _ = r.on_tick(ts);
                }
                let c = r.counters();
                prop_assert!(c.matched <= c.received);
            }
        }
    }
}

#[test]
fn long_operator_chains_are_refused_not_overflowed() {
    // Left-associative chains are not bounded by the parser's depth limit.
    let deepest = crate::compile::MAX_TREE_DEPTH - 2;
    let sql = format!("SELECT * FROM 'a' WHERE x = 1{}", " + 1".repeat(deepest));
    let mut r = rule(&sql);
    assert_eq!(r.on_message("a", &json!({"x": deepest + 1}), 0).len(), 1);
    let sql = format!("SELECT * FROM 'a' WHERE x{}", " AND x".repeat(deepest));
    let mut r = rule(&sql);
    assert_eq!(r.on_message("a", &json!({"x": true}), 0).len(), 1);
    let sql = format!("SELECT * FROM 'a' WHERE x{}", " AND x".repeat(deepest + 10));
    let e = refused(&sql);
    assert!(matches!(e.kind, K::Unsupported(_)), "{e}");
    // Group scope (where every node is also tried as a GROUP BY key).
    let sql = format!(
        "SELECT device FROM 'devices/+/t' GROUP BY device, TUMBLING(1s) HAVING count(*) > 0{}",
        " AND device <> 'x'".repeat(deepest - 3)
    );
    let mut r = rule(&sql);
    r.on_message("devices/d/t", &json!({}), 0);
    assert_eq!(r.on_tick(1_000).len(), 1);
    // Many operators in a shallow tree are fine.
    let sql = format!(
        "SELECT * FROM 'a' WHERE x IN ({})",
        vec!["-1"; 200].join(", ")
    );
    rule(&sql);
    for n in [crate::parse::MAX_OPERATORS, 20_000] {
        let sql = format!("SELECT * FROM 'a' WHERE x = 1{}", " + 1".repeat(n));
        let e = refused(&sql);
        assert!(matches!(e.kind, K::Unsupported(_)), "{e}");
    }
}
