//! What a rule does when it fires, repeats or clears: the `actions` array
//! stored with the rule, parsed and checked once (at creation, so a typo
//! is refused with the action's index and field) and executed by the
//! service.
//!
//! ```json
//! [
//!   {"type": "alarm", "alarm_type": "overheating", "severity": "critical"},
//!   {"type": "command", "name": "shutdown", "params": {"reason": "overheat"}, "timeout_secs": 30},
//!   {"type": "config", "key": "fan_speed", "value": 100},
//!   {"type": "desired", "state": {"valve": "open"}, "shadow": "irrigation"},
//!   {"type": "republish", "topic": "alerts/{device}", "qos": 1},
//!   {"type": "webhook", "url": "https://ops.example.com/hook", "secret": "…"},
//!   {"type": "log", "level": "warn"},
//!   {"type": "ban", "target": "address", "duration_secs": 3600, "reason": "ACL probing"}
//! ]
//! ```
//!
//! Each action may say `"on": ["fire", "repeat", "clear"]`; the defaults
//! are: alarm all three (fire and repeat raise or update, clear clears),
//! command, config and desired `fire`, republish all, webhook and log `fire` and
//! `clear`, ban `fire`. `{device}` in a republish topic is the output's
//! device.
//!
//! A `ban` refuses new connections and closes the open ones: `target`
//! `device` bans the output's device (any client id it uses), `address`
//! the address in the output row's `addr` column (the security events'
//! `$events/security/…` carry one); without `duration_secs` the ban
//! escalates like the broker's own. An address is shared by every tenant's
//! devices behind it, so only the default tenant's (the platform
//! operators') rules may ban addresses.

use m2mhub_fleet::Severity;
use m2mhub_rules::OutputKind;
use serde_json::Value;
use std::str::FromStr;

/// When an action runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct On {
    pub fire: bool,
    pub repeat: bool,
    pub clear: bool,
}

impl On {
    const ALL: On = On {
        fire: true,
        repeat: true,
        clear: true,
    };
    const FIRE: On = On {
        fire: true,
        repeat: false,
        clear: false,
    };
    const FIRE_CLEAR: On = On {
        fire: true,
        repeat: false,
        clear: true,
    };

    pub fn wants(&self, k: OutputKind) -> bool {
        match k {
            OutputKind::Fire => self.fire,
            OutputKind::Repeat => self.repeat,
            OutputKind::Clear => self.clear,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Alarm {
        alarm_type: String,
        severity: Severity,
    },
    Command {
        name: String,
        params: Value,
        timeout_ms: u64,
    },
    Config {
        key: String,
        value: Value,
    },
    /// Merge `state` into the device's desired shadow state (`shadow`: a
    /// named shadow, else the classic one); the device is told the delta.
    Desired {
        state: Value,
        shadow: String,
    },
    Republish {
        topic: String,
        qos: u8,
        retain: bool,
    },
    Webhook {
        url: String,
        secret: Option<String>,
    },
    Log {
        level: LogLevel,
    },
    Ban {
        target: BanTarget,
        /// `None`: escalating, as the broker's automatic bans.
        duration_secs: Option<u64>,
        reason: String,
    },
}

/// What a `ban` action bans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanTarget {
    /// The output's device.
    Device,
    /// The output row's `addr`.
    Address,
}

/// Longest ban a rule may set: 30 days.
const MAX_BAN_SECS: u64 = 30 * 86_400;

#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub kind: Kind,
    pub on: On,
}

/// Parse and check a rule's actions; the error names the action and field.
pub fn parse(actions: &Value) -> Result<Vec<Action>, String> {
    let list = actions
        .as_array()
        .ok_or("`actions` must be a JSON array of action objects")?;
    if list.len() > 32 {
        return Err("at most 32 actions per rule".into());
    }
    list.iter()
        .enumerate()
        .map(|(i, a)| parse_one(a).map_err(|e| format!("action {i}: {e}")))
        .collect()
}

fn text(a: &Value, key: &str, max: usize) -> Result<String, String> {
    match a.get(key) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= max => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("`{key}` must be 1 to {max} bytes")),
        Some(_) => Err(format!("`{key}` must be a string")),
        None => Err(format!("`{key}` is required")),
    }
}

fn parse_one(a: &Value) -> Result<Action, String> {
    let obj = a.as_object().ok_or("must be an object")?;
    let ty = text(a, "type", 32)?;
    let allowed: &[&str] = match ty.as_str() {
        "alarm" => &["type", "on", "alarm_type", "severity"],
        "command" => &["type", "on", "name", "params", "timeout_secs"],
        "config" => &["type", "on", "key", "value"],
        "desired" => &["type", "on", "state", "shadow"],
        "republish" => &["type", "on", "topic", "qos", "retain"],
        "webhook" => &["type", "on", "url", "secret"],
        "log" => &["type", "on", "level"],
        "ban" => &["type", "on", "target", "duration_secs", "reason"],
        other => {
            return Err(format!(
                "unknown type {other:?}; use alarm, command, config, desired, republish, webhook, log or ban"
            ))
        }
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "unknown field `{k}` for a {ty} action (fields: {})",
            allowed.join(", ")
        ));
    }
    let kind = match ty.as_str() {
        "alarm" => Kind::Alarm {
            alarm_type: text(a, "alarm_type", 64)?,
            severity: match a.get("severity") {
                None => Severity::Major,
                Some(Value::String(s)) => Severity::from_str(s).map_err(|_| {
                    format!("`severity` {s:?}: use critical, major, minor, warning or info")
                })?,
                Some(_) => return Err("`severity` must be a string".into()),
            },
        },
        "command" => Kind::Command {
            name: text(a, "name", 64)?,
            params: a.get("params").cloned().unwrap_or(Value::Null),
            timeout_ms: match a.get("timeout_secs") {
                None => 30_000,
                Some(v) => {
                    v.as_u64()
                        .filter(|s| (1..=86_400).contains(s))
                        .ok_or("`timeout_secs` must be 1 to 86400")?
                        * 1000
                }
            },
        },
        "config" => {
            let key = text(a, "key", 128)?;
            if key.contains(['/', '+', '#']) {
                return Err("`key` must not contain /, + or #".into());
            }
            Kind::Config {
                key,
                value: a.get("value").cloned().ok_or("`value` is required")?,
            }
        }
        "desired" => {
            let state = a.get("state").cloned().ok_or("`state` is required")?;
            if state.as_object().is_none_or(|m| m.is_empty()) {
                return Err("`state` must be a non-empty JSON object of desired keys".into());
            }
            let shadow = match a.get("shadow") {
                None | Some(Value::Null) => String::new(),
                Some(_) => text(a, "shadow", 64)?,
            };
            m2mhub_fleet::shadow::validate_name(&shadow).map_err(|e| e.to_string())?;
            Kind::Desired { state, shadow }
        }
        "republish" => {
            let topic = text(a, "topic", 1024)?;
            let probe = topic.replace("{device}", "x");
            if mqtt_codec::topic::validate_topic_name(&probe).is_err() {
                return Err(format!(
                    "`topic` {topic:?} is not a valid topic name (no wildcards)"
                ));
            }
            Kind::Republish {
                topic,
                qos: match a.get("qos") {
                    None => 0,
                    Some(v) => v
                        .as_u64()
                        .filter(|q| *q <= 2)
                        .ok_or("`qos` must be 0, 1 or 2")? as u8,
                },
                retain: match a.get("retain") {
                    None => false,
                    Some(v) => v.as_bool().ok_or("`retain` must be true or false")?,
                },
            }
        }
        "webhook" => {
            let url = text(a, "url", 2048)?;
            crate::webhook::parse_url(&url).map_err(|e| e.to_string())?;
            Kind::Webhook {
                url,
                secret: match a.get("secret") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(text(a, "secret", 256)?),
                },
            }
        }
        "ban" => Kind::Ban {
            target: match text(a, "target", 16)?.as_str() {
                "device" => BanTarget::Device,
                "address" => BanTarget::Address,
                other => return Err(format!("`target` {other:?}: use device or address")),
            },
            duration_secs: match a.get("duration_secs") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .filter(|s| (1..=MAX_BAN_SECS).contains(s))
                        .ok_or(format!("`duration_secs` must be 1 to {MAX_BAN_SECS}"))?,
                ),
            },
            reason: match a.get("reason") {
                None | Some(Value::Null) => "banned by a rule".into(),
                Some(_) => text(a, "reason", 256)?,
            },
        },
        _ => Kind::Log {
            level: match a.get("level").and_then(Value::as_str) {
                None | Some("info") => LogLevel::Info,
                Some("warn") => LogLevel::Warn,
                Some("error") => LogLevel::Error,
                Some(other) => return Err(format!("`level` {other:?}: use info, warn or error")),
            },
        },
    };
    let default = match kind {
        Kind::Alarm { .. } | Kind::Republish { .. } => On::ALL,
        Kind::Command { .. } | Kind::Config { .. } | Kind::Desired { .. } | Kind::Ban { .. } => {
            On::FIRE
        }
        Kind::Webhook { .. } | Kind::Log { .. } => On::FIRE_CLEAR,
    };
    let on = match a.get("on") {
        None => default,
        Some(Value::Array(list)) if !list.is_empty() => {
            let mut on = On {
                fire: false,
                repeat: false,
                clear: false,
            };
            for v in list {
                match v.as_str() {
                    Some("fire") => on.fire = true,
                    Some("repeat") => on.repeat = true,
                    Some("clear") => on.clear = true,
                    _ => return Err("`on` lists fire, repeat and/or clear".into()),
                }
            }
            on
        }
        Some(_) => return Err("`on` must be a non-empty array of fire, repeat, clear".into()),
    };
    Ok(Action { kind, on })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_parses_with_defaults() {
        let a = parse(&json!([
            {"type": "alarm", "alarm_type": "overheating", "severity": "critical"},
            {"type": "command", "name": "shutdown"},
            {"type": "config", "key": "fan", "value": 3},
            {"type": "republish", "topic": "alerts/{device}", "qos": 1},
            {"type": "webhook", "url": "http://127.0.0.1:9/x", "secret": "s"},
            {"type": "log", "on": ["clear"]},
            {"type": "desired", "state": {"valve": "open"}, "shadow": "irrigation"}
        ]))
        .expect("valid");
        assert_eq!(a.len(), 7);
        assert_eq!(a[6].on, On::FIRE);
        assert!(matches!(&a[6].kind, Kind::Desired { shadow, .. } if shadow == "irrigation"));
        assert_eq!(a[0].on, On::ALL);
        assert_eq!(a[1].on, On::FIRE);
        assert!(matches!(
            a[1].kind,
            Kind::Command {
                timeout_ms: 30_000,
                ..
            }
        ));
        assert_eq!(a[4].on, On::FIRE_CLEAR);
        assert!(!a[5].on.fire && a[5].on.clear);

        let b = parse(&json!([
            {"type": "ban", "target": "address"},
            {"type": "ban", "target": "device", "duration_secs": 60, "reason": "probing"}
        ]))
        .expect("valid bans");
        assert_eq!(b[0].on, On::FIRE);
        assert!(matches!(
            &b[0].kind,
            Kind::Ban { target: BanTarget::Address, duration_secs: None, reason } if reason == "banned by a rule"
        ));
        assert!(matches!(
            &b[1].kind,
            Kind::Ban { target: BanTarget::Device, duration_secs: Some(60), reason } if reason == "probing"
        ));
    }

    #[test]
    fn mistakes_name_the_action_and_field() {
        for (bad, want) in [
            (json!({}), "must be a JSON array"),
            (json!([{"type": "page"}]), "action 0: unknown type"),
            (
                json!([{"type": "alarm"}]),
                "action 0: `alarm_type` is required",
            ),
            (
                json!([{"type": "alarm", "alarm_type": "x", "severity": "bad"}]),
                "severity",
            ),
            (
                json!([{"type": "alarm", "alarm_type": "x", "sevrity": "minor"}]),
                "unknown field `sevrity`",
            ),
            (
                json!([{"type": "log"}, {"type": "webhook", "url": "ftp://x"}]),
                "action 1: bad webhook URL",
            ),
            (
                json!([{"type": "republish", "topic": "a/#"}]),
                "not a valid topic name",
            ),
            (
                json!([{"type": "desired", "state": {}}]),
                "non-empty JSON object",
            ),
            (
                json!([{"type": "desired", "state": {"a": 1}, "shadow": "no spaces"}]),
                "shadow name",
            ),
            (
                json!([{"type": "command", "name": "x", "timeout_secs": 0}]),
                "timeout_secs",
            ),
            (json!([{"type": "log", "on": ["sometimes"]}]), "`on`"),
            (json!([{"type": "ban"}]), "`target` is required"),
            (
                json!([{"type": "ban", "target": "planet"}]),
                "use device or address",
            ),
            (
                json!([{"type": "ban", "target": "device", "duration_secs": 0}]),
                "duration_secs",
            ),
        ] {
            let e = parse(&bad).expect_err("refused");
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
