//! Rule backtests: what a rule would have done over stored telemetry,
//! before it is enabled.
//!
//! A backtest runs the very plan the live service runs
//! ([`CompiledRule`]), so the answer cannot drift from the engine: the
//! caller replays stored readings as messages in timestamp order, and the
//! clock is the data's own — before a message at `t` every deadline the
//! rule asked for up to `t` (a window closing, a `FOR` expiring, a silence)
//! is ticked at exactly that deadline, and [`Backtest::finish`] ticks up to
//! the end of the range. The live service ticks every 100 ms on the wall
//! clock instead, so a timer output of the backtest carries its exact
//! deadline where the live one is up to a tick later; outputs decided by
//! messages carry the message's time in both.
//!
//! Nothing is executed: each output lists what its actions would have
//! done (an alarm raised or cleared, a command sent…), so an operator can
//! judge a rule's noise and reach without a device being touched. Sans-IO
//! like the engine: reading the store is the caller's business.

use crate::actions::{self, Action, Kind};
use crate::control::RuleProblem;
use m2mhub_rules::{CompiledRule, Output, OutputKind, RuleKind, TopicFilter};
use serde_json::{json, Map, Value};

/// How many outputs a backtest lists; beyond it they are only counted.
pub const MAX_LISTED: usize = 5_000;

/// Most deadlines ticked between two messages: a rule's timers move
/// forward at every tick, so this only stops a pathological loop.
const MAX_TICKS_PER_STEP: usize = 100_000;

/// One output of the backtest, with what its actions would have done.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub output: Output,
    /// One summary per action that would have run.
    pub actions: Vec<Value>,
}

impl Firing {
    /// The JSON the API returns (the shape of a live webhook body, plus
    /// the actions).
    pub fn to_json(&self) -> Value {
        let o = &self.output;
        json!({
            "ts_ms": o.ts_ms,
            "event": event_name(o.kind),
            "device": o.device.as_deref(),
            "key": &*o.key,
            "window": o.window.map(|w| json!({"start_ms": w.start_ms, "end_ms": w.end_ms})),
            "row": o.row,
            "actions": self.actions,
        })
    }
}

fn event_name(k: OutputKind) -> &'static str {
    match k {
        OutputKind::Fire => "fire",
        OutputKind::Repeat => "repeat",
        OutputKind::Clear => "clear",
    }
}

/// What a backtest found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Messages replayed.
    pub messages: u64,
    pub fired: u64,
    pub repeated: u64,
    pub cleared: u64,
    /// Messages the rule failed on (a missing field, a wrong type) and
    /// messages late for their window, as the live counters count them.
    pub failed: u64,
    pub late: u64,
    pub last_error: Option<String>,
    /// The first [`MAX_LISTED`] outputs, in time order.
    pub firings: Vec<Firing>,
    /// More outputs happened than are listed.
    pub truncated: bool,
}

/// A rule being replayed.
#[derive(Debug)]
pub struct Backtest {
    rule: CompiledRule,
    actions: Vec<Action>,
    report: Report,
    /// The latest time fed (messages and ticks never go back).
    clock: i64,
}

impl Backtest {
    /// Compile the rule and check its actions, as the live service does
    /// before storing it; refused with the same positions.
    pub fn new(sql: &str, acts: &Value) -> Result<Backtest, RuleProblem> {
        let rule = CompiledRule::compile(sql).map_err(|e| RuleProblem {
            message: e.kind.to_string(),
            line: Some(u64::from(e.position.line)),
            column: Some(u64::from(e.position.column)),
        })?;
        let actions = actions::parse(acts).map_err(|message| RuleProblem {
            message,
            line: None,
            column: None,
        })?;
        Ok(Backtest {
            rule,
            actions,
            report: Report::default(),
            clock: i64::MIN,
        })
    }

    /// The topic filter the rule reads (what the caller must replay).
    pub fn source(&self) -> &TopicFilter {
        self.rule.source()
    }

    pub fn kind(&self) -> RuleKind {
        self.rule.kind()
    }

    /// Replay one message at `ts_ms`. Messages must come in time order;
    /// one older than the last is given the last time (as a late arrival
    /// would be stamped live).
    pub fn feed(&mut self, topic: &str, payload: &Value, ts_ms: i64) {
        let ts = ts_ms.max(self.clock);
        self.tick_until(ts);
        self.clock = ts;
        self.report.messages += 1;
        let outs = self.rule.on_message(topic, payload, ts);
        self.record(outs);
    }

    /// Tick every deadline up to `end_ms` and hand the report over.
    pub fn finish(mut self, end_ms: i64) -> Report {
        self.tick_until(end_ms);
        let c = self.rule.counters();
        self.report.failed = c.failed;
        self.report.late = c.late;
        self.report.last_error = c.last_error.as_ref().map(|e| e.error.to_string());
        self.report
    }

    fn tick_until(&mut self, t: i64) {
        for _ in 0..MAX_TICKS_PER_STEP {
            let Some(d) = self.rule.next_deadline().filter(|d| *d <= t) else {
                return;
            };
            let d = d.max(self.clock);
            self.clock = d;
            let outs = self.rule.on_tick(d);
            let stuck = self.rule.next_deadline() == Some(d) && outs.is_empty();
            self.record(outs);
            if stuck {
                return;
            }
        }
    }

    fn record(&mut self, outs: Vec<Output>) {
        for o in outs {
            match o.kind {
                OutputKind::Fire => self.report.fired += 1,
                OutputKind::Repeat => self.report.repeated += 1,
                OutputKind::Clear => self.report.cleared += 1,
            }
            if self.report.firings.len() >= MAX_LISTED {
                self.report.truncated = true;
                continue;
            }
            let device = o
                .device
                .as_deref()
                .map(str::to_string)
                .or_else(|| (!o.key.is_empty()).then(|| o.key.to_string()));
            let actions = self
                .actions
                .iter()
                .filter(|a| a.on.wants(o.kind))
                .map(|a| describe(a, o.kind, device.as_deref()))
                .collect();
            self.report.firings.push(Firing { output: o, actions });
        }
    }
}

/// What an action would have done for one output, in the words the
/// console and the CLI show (`summary`), with the action's type.
fn describe(a: &Action, kind: OutputKind, device: Option<&str>) -> Value {
    let on = device.unwrap_or("(no device)");
    let (ty, summary) = match &a.kind {
        Kind::Alarm {
            alarm_type,
            severity,
        } => (
            "alarm",
            match kind {
                OutputKind::Fire => {
                    format!("raise {} alarm {alarm_type} on {on}", severity.as_str())
                }
                OutputKind::Repeat => format!("update alarm {alarm_type} on {on}"),
                OutputKind::Clear => format!("clear alarm {alarm_type} on {on}"),
            },
        ),
        Kind::Command { name, params, .. } => {
            ("command", format!("send command {name} {params} to {on}"))
        }
        Kind::Config { key, value } => (
            "config",
            format!("set devices/{on}/config/{key} to {value} (retained)"),
        ),
        Kind::Desired { state, shadow } => (
            "desired",
            if shadow.is_empty() {
                format!("set desired {state} in {on}'s shadow")
            } else {
                format!("set desired {state} in {on}'s shadow {shadow:?}")
            },
        ),
        Kind::Republish { topic, .. } => (
            "republish",
            format!(
                "publish to {}",
                topic.replace("{device}", device.unwrap_or(""))
            ),
        ),
        Kind::Webhook { url, .. } => ("webhook", format!("POST {url}")),
        Kind::Log { .. } => ("log", "log the output".to_string()),
        Kind::Ban {
            target,
            duration_secs,
            ..
        } => {
            let what = match target {
                crate::actions::BanTarget::Device => format!("device {on}"),
                crate::actions::BanTarget::Address => "the output's addr".to_string(),
            };
            let how_long = duration_secs.map_or("escalating".to_string(), |s| format!("{s} s"));
            ("ban", format!("ban {what} ({how_long})"))
        }
    };
    json!({"type": ty, "summary": summary})
}

/// A stored message rebuilt from its points: the telemetry decoder
/// flattened nested objects into dotted metric names (`engine.temp`), so
/// they are nested again, and the rule reads `engine.temp` as it would in
/// the device's JSON. (Array elements come back as object members `"0"`,
/// `"1"`…; a top-level `ts` was the points' time and is not a field.)
pub fn payload_of<'a>(points: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    let mut root = Map::new();
    for (name, value) in points {
        insert_dotted(&mut root, name, value);
    }
    Value::Object(root)
}

fn insert_dotted(obj: &mut Map<String, Value>, name: &str, value: Value) {
    match name.split_once('.') {
        None => {
            obj.insert(name.to_string(), value);
        }
        Some((head, rest)) => {
            let child = obj
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            match child {
                Value::Object(m) => insert_dotted(m, rest, value),
                // `a` and `a.b` both stored: keep the scalar under its
                // full name rather than lose either.
                _ => {
                    obj.insert(name.to_string(), value);
                }
            }
        }
    }
}

/// A device's attributes as rules read them under `meta` (`WHERE
/// meta.group = 'line-3'`); the live service and backtests build it alike.
pub fn device_meta(d: &m2mhub_identity::Device) -> Value {
    json!({"name": d.name, "group": d.group, "profile": d.profile, "labels": d.labels, "tenant": d.tenant})
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "devices/m1/telemetry";

    #[test]
    fn a_filter_rule_fires_and_clears_at_the_readings_times() {
        let mut b = Backtest::new(
            "SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > 85 CLEAR WHEN temperature < 75",
            &json!([{"type": "alarm", "alarm_type": "hot", "severity": "critical"},
                    {"type": "command", "name": "shutdown"}]),
        )
        .expect("rule");
        for (i, t) in [70.0, 90.0, 88.0, 80.0, 70.0].iter().enumerate() {
            b.feed(TOPIC, &json!({"temperature": t}), 1_000 * i as i64);
        }
        let r = b.finish(10_000);
        let got: Vec<(&str, i64)> = r
            .firings
            .iter()
            .map(|f| (event_name(f.output.kind), f.output.ts_ms))
            .collect();
        assert_eq!(got, [("fire", 1_000), ("repeat", 2_000), ("clear", 4_000)]);
        assert_eq!(r.messages, 5);
        assert_eq!((r.fired, r.repeated, r.cleared), (1, 1, 1));
        let fire = r.firings[0].to_json();
        assert_eq!(
            fire["actions"][0]["summary"],
            "raise critical alarm hot on m1"
        );
        assert_eq!(
            fire["actions"][1]["summary"],
            "send command shutdown null to m1"
        );
        // Clear runs the alarm's clear only (commands default to fire).
        assert_eq!(r.firings[2].actions.len(), 1);
        assert_eq!(r.firings[2].actions[0]["summary"], "clear alarm hot on m1");
    }

    #[test]
    fn timers_run_on_the_datas_clock() {
        // Ten-second windows hot for 30 s fire at the close of the window
        // ending at 30 s, ticked at exactly that deadline.
        let mut b = Backtest::new(
            "SELECT device, avg(t) AS t FROM 'devices/+/telemetry' GROUP BY device, TUMBLING(10s) HAVING avg(t) > 85 FOR 30s",
            &json!([]),
        )
        .expect("rule");
        for s in 0..45 {
            b.feed(TOPIC, &json!({"t": 90}), s * 1_000);
        }
        let r = b.finish(60_000);
        assert_eq!(r.firings[0].output.kind, OutputKind::Fire);
        assert_eq!(r.firings[0].output.ts_ms, 30_000);
        // Silence: the only deadline is the data's gap.
        let mut b = Backtest::new(
            "SELECT device, last_seen() AS seen FROM 'devices/+/telemetry' GROUP BY device HAVING silent(10m)",
            &json!([]),
        )
        .expect("rule");
        b.feed(TOPIC, &json!({"t": 1}), 0);
        b.feed(TOPIC, &json!({"t": 1}), 3_600_000);
        let r = b.finish(3_600_000);
        let got: Vec<(OutputKind, i64)> = r
            .firings
            .iter()
            .map(|f| (f.output.kind, f.output.ts_ms))
            .collect();
        assert_eq!(
            got,
            [(OutputKind::Fire, 600_000), (OutputKind::Clear, 3_600_000)]
        );
    }

    #[test]
    fn bad_rules_are_refused_with_a_position() {
        let e = Backtest::new("SELECT frobnicate(x) FROM 'a'", &json!([])).expect_err("bad");
        assert_eq!((e.line, e.column), (Some(1), Some(8)));
        let e = Backtest::new("SELECT * FROM 'a'", &json!([{"type": "nope"}])).expect_err("bad");
        assert!(e.message.contains("unknown type"), "{e}");
    }

    #[test]
    fn outputs_past_the_list_are_counted() {
        let mut b = Backtest::new("SELECT * FROM 'devices/+/telemetry'", &json!([])).expect("rule");
        for i in 0..(MAX_LISTED as i64 + 10) {
            b.feed(TOPIC, &json!({"x": i}), i);
        }
        let r = b.finish(0);
        assert_eq!(r.firings.len(), MAX_LISTED);
        assert!(r.truncated);
        assert_eq!(r.fired + r.repeated, MAX_LISTED as u64 + 10);
    }

    #[test]
    fn dotted_metrics_nest_again() {
        let p = payload_of([
            ("engine.temp", json!(90)),
            ("engine.rpm", json!(1200)),
            ("ok", json!(true)),
        ]);
        assert_eq!(p, json!({"engine": {"temp": 90, "rpm": 1200}, "ok": true}));
        let p = payload_of([("a", json!(1)), ("a.b", json!(2))]);
        assert_eq!(p, json!({"a": 1, "a.b": 2}));
    }
}
