//! Security events: what the security monitor (and the authorizer) noticed
//! about devices — failure bursts, bans, ACL violations, new addresses,
//! unusual rates, flapping connections. Operators review them; alarms and
//! bans are driven from them.

use crate::error::{RegistryError, Result};
use crate::{now_ms, Registry};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityKind {
    AuthFailureBurst,
    Ban,
    AclViolation,
    NewAddress,
    RateAnomaly,
    Flapping,
    /// Operator logins refused for a while after repeated wrong passwords,
    /// for one user name or one source address (`api/src/lockout.rs`).
    LoginLockout,
}

impl SecurityKind {
    /// Every kind, in a stable order (settings, docs).
    pub const ALL: [SecurityKind; 7] = [
        SecurityKind::AuthFailureBurst,
        SecurityKind::Ban,
        SecurityKind::AclViolation,
        SecurityKind::NewAddress,
        SecurityKind::RateAnomaly,
        SecurityKind::Flapping,
        SecurityKind::LoginLockout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SecurityKind::AuthFailureBurst => "auth_failure_burst",
            SecurityKind::Ban => "ban",
            SecurityKind::AclViolation => "acl_violation",
            SecurityKind::NewAddress => "new_address",
            SecurityKind::RateAnomaly => "rate_anomaly",
            SecurityKind::Flapping => "flapping",
            SecurityKind::LoginLockout => "login_lockout",
        }
    }
}

impl fmt::Display for SecurityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SecurityKind {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auth_failure_burst" => SecurityKind::AuthFailureBurst,
            "ban" => SecurityKind::Ban,
            "acl_violation" => SecurityKind::AclViolation,
            "new_address" => SecurityKind::NewAddress,
            "rate_anomaly" => SecurityKind::RateAnomaly,
            "flapping" => SecurityKind::Flapping,
            "login_lockout" => SecurityKind::LoginLockout,
            _ => {
                return Err(RegistryError::Validation(format!(
                    "unknown security event kind {s:?}"
                )))
            }
        })
    }
}

/// How many recorded security events a slow listener may fall behind
/// before it misses some.
pub const SECURITY_EVENT_BACKLOG: usize = 4096;

/// A new security event.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityEvent {
    pub kind: SecurityKind,
    pub device_id: Option<String>,
    pub addr: Option<String>,
    pub detail: serde_json::Value,
    /// `None`: now.
    pub ts_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurityEventRecord {
    pub seq: u64,
    pub ts_ms: i64,
    pub kind: SecurityKind,
    pub device_id: Option<String>,
    pub addr: Option<String>,
    pub detail: serde_json::Value,
}

impl Registry {
    /// Record a security event; returns its sequence number. Queued for the
    /// background writer, so it is safe to call from a connection task.
    pub fn record_security_event(&self, ev: SecurityEvent) -> Result<u64> {
        let s = &*self.shared;
        let mut q = s.log.lock();
        let seq = q.last_event_seq + 1;
        q.last_event_seq = seq;
        let rec = SecurityEventRecord {
            seq,
            ts_ms: ev.ts_ms.unwrap_or_else(now_ms),
            kind: ev.kind,
            device_id: ev.device_id,
            addr: ev.addr,
            detail: ev.detail,
        };
        if s.security_events.receiver_count() > 0 {
            // Sent under the queue's lock, so listeners see sequence order.
            let _ = s.security_events.send(Arc::new(rec.clone()));
        }
        q.events.push(rec);
        if q.events.len() == 1 {
            s.wake.notify_one();
        }
        Ok(seq)
    }

    /// Every security event recorded from now on, as it is recorded (before
    /// it is stored). A listener that falls more than
    /// [`SECURITY_EVENT_BACKLOG`] events behind is told how many it missed
    /// (`RecvError::Lagged`); the events stay in the store either way.
    pub fn subscribe_security_events(
        &self,
    ) -> tokio::sync::broadcast::Receiver<Arc<SecurityEventRecord>> {
        self.shared.security_events.subscribe()
    }

    /// The tenant a security event belongs to: its device's, or the default
    /// tenant's (the platform operators') for events about an address, an
    /// operator login or a client id no device owns.
    pub fn security_event_tenant(&self, ev: &SecurityEventRecord) -> String {
        ev.device_id
            .as_deref()
            .and_then(|d| self.with_device(d, |d| d.tenant.clone()))
            .unwrap_or_else(|| crate::DEFAULT_TENANT.to_string())
    }

    /// Events with a sequence number after `after`, oldest first.
    pub fn list_security_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<SecurityEventRecord>> {
        self.flush()?;
        self.shared
            .store
            .list_security_events(after, limit.clamp(1, 10_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listeners_get_events_in_order_with_their_tenant() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        let mut rx = reg.subscribe_security_events();
        for (kind, dev) in [
            (SecurityKind::AclViolation, Some("nobody-registered")),
            (SecurityKind::AuthFailureBurst, None),
        ] {
            reg.record_security_event(SecurityEvent {
                kind,
                device_id: dev.map(str::to_string),
                addr: Some("10.0.0.9".into()),
                detail: json!({}),
                ts_ms: None,
            })
            .expect("record");
        }
        let a = rx.try_recv().expect("first");
        let b = rx.try_recv().expect("second");
        assert_eq!((a.kind, a.seq + 1), (SecurityKind::AclViolation, b.seq));
        assert_eq!(b.kind, SecurityKind::AuthFailureBurst);
        // Nobody owns either: the platform's (default) tenant.
        assert_eq!(reg.security_event_tenant(&a), crate::DEFAULT_TENANT);
        assert!(rx.try_recv().is_err(), "nothing else");
    }

    #[test]
    fn events_round_trip_and_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = Registry::open(dir.path()).expect("open");
            for (i, kind) in [
                SecurityKind::Ban,
                SecurityKind::NewAddress,
                SecurityKind::AclViolation,
            ]
            .into_iter()
            .enumerate()
            {
                let seq = reg
                    .record_security_event(SecurityEvent {
                        kind,
                        device_id: Some("d1".into()),
                        addr: Some("10.0.0.1".into()),
                        detail: json!({ "n": i }),
                        ts_ms: None,
                    })
                    .expect("record");
                assert_eq!(seq, i as u64 + 1);
            }
            let all = reg.list_security_events(None, 100).expect("list");
            assert_eq!(all.len(), 3);
            assert_eq!(all[1].kind, SecurityKind::NewAddress);
            assert_eq!(all[2].detail["n"], 2);
            assert_eq!(
                reg.list_security_events(Some(2), 100).expect("list").len(),
                1
            );
        }
        let reg = Registry::open(dir.path()).expect("reopen");
        let seq = reg
            .record_security_event(SecurityEvent {
                kind: SecurityKind::Flapping,
                device_id: None,
                addr: None,
                detail: json!(null),
                ts_ms: Some(5),
            })
            .expect("record");
        assert_eq!(seq, 4);
        let all = reg.list_security_events(None, 2).expect("list");
        assert_eq!(all.len(), 2);
        for k in [
            "ban",
            "flapping",
            "rate_anomaly",
            "auth_failure_burst",
            "login_lockout",
        ] {
            assert_eq!(k.parse::<SecurityKind>().expect("parse").as_str(), k);
        }
    }
}
