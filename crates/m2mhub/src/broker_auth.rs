//! The wiring between identity and the broker: the broker's [`Authenticator`]
//! and [`Authorizer`] traits answered from the identity registry. It lives in
//! the binary so neither crate depends on the other.
//!
//! # CONNECT
//!
//! 1. A verified TLS client certificate decides alone: its fingerprint must
//!    be recorded for an enabled device (a certificate that is not recorded
//!    but whose common name names an enabled device is accepted only with
//!    `accept_unregistered_certs`, for user-supplied CAs). The client id must
//!    be the device id.
//! 2. Username `$claim` with a claim token secret as password: a
//!    provisioning-only identity (any client id).
//! 3. Username = device id and password = token secret; the client id must
//!    be the device id.
//! 4. No credentials: allowed only with `allow_anonymous`.
//!
//! Unknown devices and wrong secrets get 0x86 (bad user name or password);
//! disabled devices, revoked or expired credentials 0x87 (not authorized);
//! a client id that is not the device id 0x85. Every decision is written to
//! the audit log (`mqtt.connect`), queued so a CONNECT never waits for disk;
//! when the queue is full the record is dropped and counted.
//!
//! Device requests over HTTP (and other request protocols) are
//! authenticated here too, one request at a time, audited as `http.auth`:
//! every refusal, but a success only once per device and address per
//! hour — a meter posting every ten seconds would otherwise write the
//! audit log full of identical records.
//!
//! # PUBLISH / SUBSCRIBE
//!
//! Internal clients may do anything; devices are checked with
//! [`Registry::authorize`]; claim clients may use only their provisioning
//! topics; anonymous clients (only possible with `allow_anonymous`) may do
//! anything. Denials are counted and recorded as `acl_violation` security
//! events, at most one per client per 10 s so a misbehaving device cannot
//! flood the log.

use m2mhub_broker::auth::{AuthDecision, Authenticator, Authorizer, ClientIdentity, ConnectInfo};
use m2mhub_identity::policy::claim_allows;
use m2mhub_identity::{
    now_ms, Action, AuthStats, CertCheck, ClaimError, Device, DeviceScope, Registry, SecurityEvent,
    SecurityKind, TokenCheck,
};
use mqtt_codec::reason;
use parking_lot::Mutex;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The username a client uses to present a claim token.
pub const CLAIM_USERNAME: &str = "$claim";
/// At most one `acl_violation` event per client per this many milliseconds.
const ACL_EVENT_INTERVAL_MS: i64 = 10_000;
/// Bound on the rate-limit map (entries are dropped wholesale beyond it).
const ACL_MAP_LIMIT: usize = 100_000;

pub struct RegistryAuth {
    registry: Registry,
    allow_anonymous: bool,
    accept_unregistered_certs: bool,
    stats: Arc<AuthStats>,
    /// client key → time of the last `acl_violation` event.
    acl_last_event: Mutex<HashMap<String, i64>>,
    /// (device, address) → when a request protocol's success was last
    /// audited.
    request_audited: Mutex<HashMap<(String, std::net::IpAddr), i64>>,
}

/// A request protocol's successful authentications are audited at most
/// this often per device and address.
const REQUEST_AUDIT_INTERVAL_MS: i64 = 3_600_000;

/// Transports where every request authenticates (not once per connection).
fn is_request_transport(transport: &str) -> bool {
    matches!(transport, "http" | "https" | "coap" | "coaps")
}

/// Cut untrusted strings (user names can be 64 KiB) before they reach the
/// audit log.
fn clip(s: &str) -> &str {
    if s.len() <= 128 {
        return s;
    }
    let mut end = 128;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl RegistryAuth {
    pub fn new(registry: Registry, allow_anonymous: bool, accept_unregistered_certs: bool) -> Self {
        RegistryAuth {
            registry,
            allow_anonymous,
            accept_unregistered_certs,
            stats: Arc::new(AuthStats::default()),
            acl_last_event: Mutex::new(HashMap::new()),
            request_audited: Mutex::new(HashMap::new()),
        }
    }

    pub fn stats(&self) -> Arc<AuthStats> {
        Arc::clone(&self.stats)
    }

    fn log(&self, actor: &str, info: &ConnectInfo<'_>, method: &str, outcome: &str, why: &str) {
        let detail = json!({
            "addr": info.peer.to_string(),
            "transport": info.transport,
            "method": method,
            "client_id": clip(info.client_id),
            "reason": why,
        });
        let request = is_request_transport(info.transport);
        if request && outcome == "ok" {
            let now = now_ms();
            let key = (clip(actor).to_string(), info.peer.ip());
            let mut seen = self.request_audited.lock();
            if seen
                .get(&key)
                .is_some_and(|t| now - t < REQUEST_AUDIT_INTERVAL_MS)
            {
                return;
            }
            if seen.len() >= ACL_MAP_LIMIT {
                seen.clear();
            }
            seen.insert(key, now);
        }
        let action = if request {
            if info.transport.starts_with("coap") {
                "coap.auth"
            } else {
                "http.auth"
            }
        } else {
            "mqtt.connect"
        };
        if self
            .registry
            .try_audit(clip(actor), action, clip(info.client_id), outcome, detail)
            .is_none()
        {
            self.stats.audit_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn deny(&self, actor: &str, info: &ConnectInfo<'_>, method: &str, code: u8) -> AuthDecision {
        self.stats.connect_denied.fetch_add(1, Ordering::Relaxed);
        let outcome =
            if code == reason::NOT_AUTHORIZED || code == reason::CLIENT_IDENTIFIER_NOT_VALID {
                "denied"
            } else {
                "failed"
            };
        self.log(actor, info, method, outcome, reason::name(code));
        AuthDecision::Deny(code)
    }

    fn allow(
        &self,
        actor: &str,
        info: &ConnectInfo<'_>,
        method: &str,
        id: ClientIdentity,
    ) -> AuthDecision {
        self.stats.connect_allowed.fetch_add(1, Ordering::Relaxed);
        self.log(actor, info, method, "ok", "ok");
        AuthDecision::Allow(id)
    }

    /// A device proved its identity: check the client id, note where it
    /// came from, and allow.
    fn device_ok(&self, d: Device, info: &ConnectInfo<'_>, method: &str) -> AuthDecision {
        if info.client_id != d.id {
            return self.deny(&d.id, info, method, reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
        let ip = info.peer.ip().to_string();
        if let Some(prev) = self.registry.record_seen(&d.id, &ip) {
            let _ = self.registry.record_security_event(SecurityEvent {
                kind: SecurityKind::NewAddress,
                device_id: Some(d.id.clone()),
                addr: Some(ip.clone()),
                detail: json!({ "previous": prev, "transport": info.transport }),
                ts_ms: None,
            });
        }
        let identity = ClientIdentity {
            username: info.username.map(Into::into),
            device_id: Some(d.id.as_str().into()),
            tenant: Some(d.tenant.as_str().into()),
            group: d.group.as_deref().map(Into::into),
            claim: None,
            internal: false,
        };
        self.allow(&d.id, info, method, identity)
    }

    fn denied(&self, client_id: &str, identity: &ClientIdentity, action: Action, topic: &str) {
        self.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
        let key = identity
            .device_id
            .as_deref()
            .map(str::to_string)
            .unwrap_or_else(|| format!("client:{}", clip(client_id)));
        let now = now_ms();
        {
            let mut last = self.acl_last_event.lock();
            if last
                .get(&key)
                .is_some_and(|t| now - t < ACL_EVENT_INTERVAL_MS)
            {
                self.stats
                    .acl_events_suppressed
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if last.len() >= ACL_MAP_LIMIT {
                last.retain(|_, t| now - *t < ACL_EVENT_INTERVAL_MS);
            }
            last.insert(key, now);
        }
        let _ = self.registry.record_security_event(SecurityEvent {
            kind: SecurityKind::AclViolation,
            device_id: identity.device_id.as_deref().map(str::to_string),
            addr: None,
            detail: json!({
                "client_id": clip(client_id),
                "action": action.as_str(),
                "topic": clip(topic),
                "claim": identity.claim.as_deref(),
            }),
            ts_ms: None,
        });
    }

    fn check(
        &self,
        client_id: &str,
        identity: &ClientIdentity,
        action: Action,
        topic: &str,
    ) -> bool {
        if identity.internal {
            return true;
        }
        let ok = if identity.claim.is_some() {
            claim_allows(client_id, action, topic)
        } else if let (Some(device_id), Some(tenant)) = (&identity.device_id, &identity.tenant) {
            self.registry.authorize(
                &DeviceScope {
                    device_id,
                    tenant,
                    group: identity.group.as_deref(),
                },
                action,
                topic,
            )
        } else {
            self.allow_anonymous
        };
        if !ok {
            self.denied(client_id, identity, action, topic);
        }
        ok
    }
}

impl Authenticator for RegistryAuth {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> AuthDecision {
        let now = now_ms();
        if let Some(tls) = info.tls {
            let cn = tls.common_name.as_deref();
            let actor = cn.unwrap_or("anonymous");
            return match self.registry.check_certificate(&tls.fingerprint, cn, now) {
                CertCheck::Valid(d) => self.device_ok(d, info, "certificate"),
                CertCheck::NotRegistered(Some(d)) if self.accept_unregistered_certs => {
                    self.device_ok(d, info, "certificate")
                }
                CertCheck::NotRegistered(_) => {
                    self.deny(actor, info, "certificate", reason::NOT_AUTHORIZED)
                }
                CertCheck::Revoked | CertCheck::Expired | CertCheck::Disabled => {
                    self.deny(actor, info, "certificate", reason::NOT_AUTHORIZED)
                }
                CertCheck::UnknownDevice => self.deny(
                    actor,
                    info,
                    "certificate",
                    reason::BAD_USER_NAME_OR_PASSWORD,
                ),
            };
        }
        match (info.username, info.password) {
            (Some(CLAIM_USERNAME), Some(_)) if self.registry.get_device(info.client_id).is_ok() => {
                // A claim client must not speak as (or take over the session
                // of) a registered device.
                self.deny("claim", info, "claim", reason::CLIENT_IDENTIFIER_NOT_VALID)
            }
            (Some(CLAIM_USERNAME), Some(secret)) => match self.registry.check_claim(secret, now) {
                Ok(claim) => {
                    let identity = ClientIdentity {
                        username: Some(CLAIM_USERNAME.into()),
                        device_id: None,
                        tenant: Some(claim.tenant.as_str().into()),
                        group: claim.group.as_deref().map(Into::into),
                        claim: Some(claim.id.as_str().into()),
                        internal: false,
                    };
                    self.allow(&format!("claim:{}", claim.id), info, "claim", identity)
                }
                Err(e) => {
                    let code = match e {
                        ClaimError::Unknown => reason::BAD_USER_NAME_OR_PASSWORD,
                        ClaimError::Expired | ClaimError::Exhausted | ClaimError::Revoked => {
                            reason::NOT_AUTHORIZED
                        }
                        ClaimError::Registry(_) => reason::SERVER_UNAVAILABLE,
                    };
                    self.deny("claim", info, "claim", code)
                }
            },
            (Some(user), Some(secret)) => {
                match self.registry.verify_device_token(user, secret, now) {
                    TokenCheck::Valid(d) => self.device_ok(d, info, "token"),
                    TokenCheck::UnknownDevice | TokenCheck::BadSecret => {
                        self.deny(user, info, "token", reason::BAD_USER_NAME_OR_PASSWORD)
                    }
                    TokenCheck::Disabled | TokenCheck::Expired => {
                        self.deny(user, info, "token", reason::NOT_AUTHORIZED)
                    }
                }
            }
            (Some(user), None) if !self.allow_anonymous => {
                self.deny(user, info, "token", reason::BAD_USER_NAME_OR_PASSWORD)
            }
            _ if self.allow_anonymous => {
                // An anonymous client never speaks for a device, whatever
                // user name it gives.
                let identity = ClientIdentity {
                    username: info.username.map(Into::into),
                    ..Default::default()
                };
                self.allow("anonymous", info, "anonymous", identity)
            }
            _ => self.deny("anonymous", info, "anonymous", reason::NOT_AUTHORIZED),
        }
    }
}

impl Authorizer for RegistryAuth {
    fn can_publish(&self, client_id: &str, identity: &ClientIdentity, topic: &str) -> bool {
        self.check(client_id, identity, Action::Publish, topic)
    }

    fn can_subscribe(&self, client_id: &str, identity: &ClientIdentity, filter: &str) -> bool {
        self.check(client_id, identity, Action::Subscribe, filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use m2mhub_identity::{AuditQuery, CertRecord, ClaimSpec, NewDevice};

    fn open() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open registry");
        (dir, reg)
    }
    use m2mhub_broker::auth::TlsPeer;

    fn info<'a>(
        client_id: &'a str,
        user: Option<&'a str>,
        pw: Option<&'a [u8]>,
        tls: Option<&'a TlsPeer>,
    ) -> ConnectInfo<'a> {
        ConnectInfo {
            client_id,
            username: user,
            password: pw,
            peer: "192.0.2.7:40000".parse().expect("addr"),
            transport: "tcp",
            tls,
        }
    }

    fn code(d: AuthDecision) -> u8 {
        match d {
            AuthDecision::Allow(_) => 0,
            AuthDecision::Deny(c) => c,
        }
    }

    fn identity(d: AuthDecision) -> ClientIdentity {
        match d {
            AuthDecision::Allow(i) => i,
            AuthDecision::Deny(c) => panic!("denied with {c:#x}"),
        }
    }

    #[test]
    fn token_connects() {
        let (_d, reg) = open();
        reg.create_device(NewDevice {
            id: Some("d1".into()),
            ..Default::default()
        })
        .expect("device");
        let (_t, secret) = reg.issue_token("d1", None).expect("token");
        let auth = RegistryAuth::new(reg.clone(), false, false);
        let id =
            identity(auth.authenticate(&info("d1", Some("d1"), Some(secret.as_bytes()), None)));
        assert_eq!(id.device_id.as_deref(), Some("d1"));
        assert_eq!(id.tenant.as_deref(), Some("default"));
        assert_eq!(
            code(auth.authenticate(&info("other", Some("d1"), Some(secret.as_bytes()), None))),
            0x85
        );
        assert_eq!(
            code(auth.authenticate(&info("d1", Some("d1"), Some(b"nope"), None))),
            0x86
        );
        assert_eq!(
            code(auth.authenticate(&info("d9", Some("d9"), Some(b"nope"), None))),
            0x86
        );
        assert_eq!(
            code(auth.authenticate(&info("d1", Some("d1"), None, None))),
            0x86
        );
        assert_eq!(code(auth.authenticate(&info("x", None, None, None))), 0x87);
        reg.set_device_enabled("d1", false).expect("disable");
        assert_eq!(
            code(auth.authenticate(&info("d1", Some("d1"), Some(secret.as_bytes()), None))),
            0x87
        );

        let stats = auth.stats();
        assert_eq!(stats.connect_allowed.load(Ordering::Relaxed), 1);
        assert_eq!(stats.connect_denied.load(Ordering::Relaxed), 6);
        let log = reg
            .list_audit(&AuditQuery {
                action: Some("mqtt.connect".into()),
                ..Default::default()
            })
            .expect("audit");
        assert_eq!(log.len(), 7);
        assert_eq!(log[0].outcome, "ok");
        assert_eq!(log[0].actor, "d1");
        assert_eq!(log[0].detail["addr"], "192.0.2.7:40000");
        assert_eq!(log[0].detail["transport"], "tcp");
        assert_eq!(log[5].actor, "anonymous");
        assert!(reg.verify_audit().expect("verify").ok);
        assert_eq!(
            reg.get_device("d1").expect("get").last_addr.as_deref(),
            Some("192.0.2.7")
        );
    }

    #[test]
    fn anonymous_when_allowed_never_becomes_a_device() {
        let (_d, reg) = open();
        reg.create_device(NewDevice {
            id: Some("d1".into()),
            ..Default::default()
        })
        .expect("device");
        let auth = RegistryAuth::new(reg, true, false);
        let id = identity(auth.authenticate(&info("d1", Some("d1"), None, None)));
        assert_eq!(id.device_id, None);
        assert!(auth.can_publish("d1", &id, "anything/at/all"));
        // Wrong credentials are still wrong with anonymous access on.
        assert_eq!(
            code(auth.authenticate(&info("d1", Some("d1"), Some(b"bad"), None))),
            0x86
        );
    }

    #[test]
    fn certificate_connects() {
        let (_d, reg) = open();
        for id in ["c1", "c2"] {
            reg.create_device(NewDevice {
                id: Some(id.into()),
                ..Default::default()
            })
            .expect("device");
        }
        reg.add_certificate(
            "c1",
            CertRecord {
                fingerprint: [1; 32],
                serial_hex: "01".into(),
                not_after_ms: now_ms() + 60_000,
                issuer: "builtin".into(),
            },
        )
        .expect("cert");
        let peer = |fp: u8, cn: &str| TlsPeer {
            common_name: Some(cn.into()),
            fingerprint: [fp; 32],
            der: vec![],
        };
        let strict = RegistryAuth::new(reg.clone(), false, false);
        let lax = RegistryAuth::new(reg.clone(), false, true);
        let p1 = peer(1, "c1");
        assert_eq!(
            code(strict.authenticate(&info("c1", None, None, Some(&p1)))),
            0
        );
        assert_eq!(
            code(strict.authenticate(&info("c2", None, None, Some(&p1)))),
            0x85
        );
        let p2 = peer(2, "c2");
        assert_eq!(
            code(strict.authenticate(&info("c2", None, None, Some(&p2)))),
            0x87
        );
        assert_eq!(
            code(lax.authenticate(&info("c2", None, None, Some(&p2)))),
            0
        );
        let p3 = peer(3, "ghost");
        assert_eq!(
            code(lax.authenticate(&info("ghost", None, None, Some(&p3)))),
            0x86
        );
        reg.revoke_certificate("c1", &[1; 32]).expect("revoke");
        assert_eq!(
            code(strict.authenticate(&info("c1", None, None, Some(&p1)))),
            0x87
        );
    }

    #[test]
    fn claim_clients_are_confined() {
        let (_d, reg) = open();
        let (claim, secret) = reg
            .create_claim_token(ClaimSpec {
                name: "batch".into(),
                tenant: "default".into(),
                group: None,
                profile: None,
                max_uses: 1,
                expires_ms: None,
            })
            .expect("claim");
        let auth = RegistryAuth::new(reg.clone(), false, false);
        let id = identity(auth.authenticate(&info(
            "factory-42",
            Some("$claim"),
            Some(secret.as_bytes()),
            None,
        )));
        assert_eq!(id.claim.as_deref(), Some(claim.id.as_str()));
        assert!(auth.can_publish("factory-42", &id, "$provision/factory-42/request"));
        assert!(auth.can_subscribe("factory-42", &id, "$provision/factory-42/response"));
        assert!(!auth.can_subscribe("factory-42", &id, "$provision/+/response"));
        assert!(!auth.can_publish("factory-42", &id, "devices/factory-42/x"));
        assert_eq!(
            code(auth.authenticate(&info("f", Some("$claim"), Some(b"m2mclaim_nope"), None))),
            0x86
        );
        reg.redeem_claim(secret.as_bytes(), now_ms(), None)
            .expect("redeem");
        assert_eq!(
            code(auth.authenticate(&info("f", Some("$claim"), Some(secret.as_bytes()), None))),
            0x87
        );
    }

    #[test]
    fn acl_denials_are_counted_and_rate_limited() {
        let (_d, reg) = open();
        reg.create_device(NewDevice {
            id: Some("d1".into()),
            ..Default::default()
        })
        .expect("device");
        let (_t, secret) = reg.issue_token("d1", None).expect("token");
        let auth = RegistryAuth::new(reg.clone(), false, false);
        let id =
            identity(auth.authenticate(&info("d1", Some("d1"), Some(secret.as_bytes()), None)));
        assert!(auth.can_publish("d1", &id, "devices/d1/telemetry"));
        assert!(auth.can_subscribe("d1", &id, "devices/d1/cmd/#"));
        for _ in 0..5 {
            assert!(!auth.can_publish("d1", &id, "devices/d2/telemetry"));
        }
        assert!(!auth.can_subscribe("d1", &id, "#"));
        assert_eq!(auth.stats().acl_denied.load(Ordering::Relaxed), 6);
        let events = reg.list_security_events(None, 100).expect("events");
        let acl: Vec<_> = events
            .iter()
            .filter(|e| e.kind == SecurityKind::AclViolation)
            .collect();
        assert_eq!(acl.len(), 1);
        assert_eq!(acl[0].detail["topic"], "devices/d2/telemetry");
        let internal = ClientIdentity {
            internal: true,
            ..Default::default()
        };
        assert!(auth.can_subscribe("sys", &internal, "$SYS/#"));
    }

    #[test]
    fn new_address_is_a_security_event() {
        let (_d, reg) = open();
        reg.create_device(NewDevice {
            id: Some("d1".into()),
            ..Default::default()
        })
        .expect("device");
        let (_t, secret) = reg.issue_token("d1", None).expect("token");
        let auth = RegistryAuth::new(reg.clone(), false, false);
        let mut i = info("d1", Some("d1"), Some(secret.as_bytes()), None);
        identity(auth.authenticate(&i));
        identity(auth.authenticate(&i));
        i.peer = "198.51.100.1:1".parse().expect("addr");
        identity(auth.authenticate(&i));
        let ev = reg.list_security_events(None, 10).expect("events");
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, SecurityKind::NewAddress);
        assert_eq!(ev[0].detail["previous"], "192.0.2.7");
    }
}
