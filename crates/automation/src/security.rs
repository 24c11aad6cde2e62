//! Security events as alarms and as a rule source.
//!
//! Every security event the registry records (failed-login bursts, bans,
//! ACL violations, new addresses, rate anomalies, flapping, operator login
//! lockouts) reaches the rule service as it is recorded, and:
//!
//! - raises an alarm, when its kind is in `security.alarms`: type
//!   `security_<kind>`, on the event's *subject* — the registered device it
//!   is about, else `ip-<address>`, else `client-<client id>` — in the
//!   subject's tenant (the default tenant for anything no device owns). A
//!   repeat while the alarm is active re-raises it (its count goes up), so
//!   an attack is one alarm with a count, not a flood of them;
//! - is fed to the tenant's rules on `$events/security/<kind>` with the
//!   body [`event_body`], so a rule can act on it (webhook, command, a
//!   `ban` action, an alarm of its own).

use m2mhub_fleet::Severity;
use m2mhub_identity::{SecurityEventRecord, SecurityKind};
use serde_json::{json, Value};

/// Which kinds raise alarms, and at what severity.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityAlarms {
    pub kinds: Vec<SecurityKind>,
}

impl Default for SecurityAlarms {
    /// Every kind.
    fn default() -> Self {
        SecurityAlarms {
            kinds: SecurityKind::ALL.to_vec(),
        }
    }
}

impl SecurityAlarms {
    pub fn none() -> Self {
        SecurityAlarms { kinds: Vec::new() }
    }

    pub fn raises(&self, kind: SecurityKind) -> bool {
        self.kinds.contains(&kind)
    }
}

/// How serious each kind is: someone guessing credentials or an operator
/// password is major; a device reaching outside its topics or a client
/// reconnecting in a loop is minor; a known device at a new address is
/// worth a look, no more.
pub fn severity(kind: SecurityKind) -> Severity {
    match kind {
        SecurityKind::AuthFailureBurst | SecurityKind::LoginLockout => Severity::Major,
        SecurityKind::Ban | SecurityKind::AclViolation | SecurityKind::Flapping => Severity::Minor,
        SecurityKind::RateAnomaly => Severity::Warning,
        SecurityKind::NewAddress => Severity::Info,
    }
}

/// The alarm type of a kind.
pub fn alarm_type(kind: SecurityKind) -> String {
    format!("security_{}", kind.as_str())
}

/// The rule topic of a kind.
pub fn topic(kind: SecurityKind) -> String {
    format!("$events/security/{}", kind.as_str())
}

/// What an event is about, as an alarm's device id (1 to 64 characters of
/// `A-Z a-z 0-9 . _ -`): the registered device, else the address, else the
/// client id the broker named.
pub fn subject(ev: &SecurityEventRecord, registered: bool) -> String {
    if let (true, Some(d)) = (registered, ev.device_id.as_deref()) {
        return d.to_string();
    }
    if let Some(a) = ev.addr.as_deref() {
        return clean(&format!("ip-{a}"));
    }
    match ev.device_id.as_deref() {
        Some(c) => clean(&format!("client-{c}")),
        None => "platform".into(),
    }
}

/// Characters an id cannot hold become `-` (IPv6's `:`, a client id's
/// `/`), cut to 64 bytes.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

/// The JSON a rule reads for an event: `device` is the subject (so alarm
/// and command actions have a target), `registered` says whether it is a
/// registered device.
pub fn event_body(ev: &SecurityEventRecord, subject: &str, registered: bool) -> Value {
    json!({
        "kind": ev.kind.as_str(),
        "device": subject,
        "registered": registered,
        "client_id": ev.device_id,
        "addr": ev.addr,
        "detail": ev.detail,
        "ts_ms": ev.ts_ms,
        "seq": ev.seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(device: Option<&str>, addr: Option<&str>) -> SecurityEventRecord {
        SecurityEventRecord {
            seq: 1,
            ts_ms: 0,
            kind: SecurityKind::AuthFailureBurst,
            device_id: device.map(str::to_string),
            addr: addr.map(str::to_string),
            detail: Value::Null,
        }
    }

    #[test]
    fn subjects_are_valid_alarm_targets() {
        assert_eq!(
            subject(&ev(Some("meter-1"), Some("10.0.0.1")), true),
            "meter-1"
        );
        assert_eq!(
            subject(&ev(Some("meter-1"), Some("10.0.0.1")), false),
            "ip-10.0.0.1"
        );
        assert_eq!(
            subject(&ev(None, Some("2001:db8::1")), false),
            "ip-2001-db8--1"
        );
        assert_eq!(subject(&ev(Some("a/b c"), None), false), "client-a-b-c");
        assert_eq!(subject(&ev(None, None), false), "platform");
        let long = "x".repeat(200);
        let s = subject(&ev(Some(&long), None), false);
        assert_eq!(s.len(), 64);
        m2mhub_identity::validate_id("device", &s).expect("valid id");
        for k in SecurityKind::ALL {
            m2mhub_identity::validate_id("alarm type", &alarm_type(k)).expect("valid type");
        }
    }
}
