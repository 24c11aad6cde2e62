//! Hooks the platform installs to hear about security-relevant events
//! (limits hit, automatic bans) and about connections (presence, audit).
//!
//! Both are called synchronously on broker tasks, never while the broker
//! holds a lock, and must not block: hand the event to a bounded channel
//! with `try_send` (dropping when full) or update an in-memory structure.
//!
//! Limit hits can come by the thousand under attack, so security events
//! other than automatic bans pass a broker-wide token bucket
//! ([`SECURITY_EVENT_RATE`] per second, burst twice that); the rest are
//! counted (`security_events_suppressed`) and not delivered.

use crate::auth::ClientIdentity;
use parking_lot::RwLock;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Security events per second delivered to the hook (automatic bans are
/// always delivered).
pub const SECURITY_EVENT_RATE: u32 = 100;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecurityEventKind {
    /// A connection was closed at once: its IP already had
    /// `max_connections_per_ip` open.
    ConnectionsPerIpExceeded,
    /// A CONNECT was refused with 0x9F: the global or per-IP connection
    /// rate was exceeded (`detail` says which).
    ConnectRateExceeded,
    /// A CONNECT from a banned IP, client id or device was refused (0x8A).
    BannedConnectRefused,
    /// A client exceeded `max_publish_rate` (reported once per second of
    /// excess, not per message).
    PublishRateExceeded,
    /// A client kept exceeding the publish rate and was disconnected (0x96).
    PublishRateDisconnect,
    /// A SUBSCRIBE hit `max_subscriptions_per_session`.
    SubscriptionQuotaExceeded,
    /// A client published far above its own long-run rate (see
    /// `rate_baseline.rs`): a compromised or malfunctioning device.
    RateAnomaly,
    /// An IP was banned after repeated failed authentications.
    AutoBanAuthFailures,
    /// A client id was banned for connecting too often (flapping).
    AutoBanFlapping,
}

/// One security event. `client_id` and `ip` are set when known.
#[derive(Debug, Clone)]
pub struct SecurityEvent {
    pub kind: SecurityEventKind,
    pub client_id: Option<String>,
    pub ip: Option<IpAddr>,
    pub detail: String,
}

/// Receives security events. Must not block (see the module docs).
pub trait SecurityEvents: Send + Sync {
    fn event(&self, e: SecurityEvent);
}

/// Receives connection lifecycle events. Must not block.
///
/// After a session takeover the old connection's `disconnected` may arrive
/// after the new connection's `connected` for the same client id.
pub trait ConnectionEvents: Send + Sync {
    /// A CONNECT was accepted (after CONNACK success was queued).
    fn connected(&self, client_id: &str, identity: &ClientIdentity, peer: SocketAddr);
    /// A connection that had connected ended; `reason` is human-readable
    /// (`client disconnect`, `connection lost`, or the reason code's name).
    fn disconnected(&self, client_id: &str, identity: &ClientIdentity, reason: &str);
    /// The authenticator refused a CONNECT with `reason_code`.
    fn auth_failed(
        &self,
        client_id: &str,
        username: Option<&str>,
        peer: SocketAddr,
        reason_code: u8,
    );
}

/// The installed hooks (none by default).
#[derive(Default)]
pub(crate) struct Hooks {
    security: RwLock<Option<Arc<dyn SecurityEvents>>>,
    connection: RwLock<Option<Arc<dyn ConnectionEvents>>>,
}

impl Hooks {
    pub fn set_security(&self, h: Arc<dyn SecurityEvents>) {
        *self.security.write() = Some(h);
    }

    pub fn set_connection(&self, h: Arc<dyn ConnectionEvents>) {
        *self.connection.write() = Some(h);
    }

    /// Whether a security hook is installed.
    pub fn has_security(&self) -> bool {
        self.security.read().is_some()
    }

    pub fn security(
        &self,
        kind: SecurityEventKind,
        client_id: Option<&str>,
        ip: Option<IpAddr>,
        detail: impl FnOnce() -> String,
    ) {
        let Some(h) = self.security.read().clone() else {
            return;
        };
        h.event(SecurityEvent {
            kind,
            client_id: client_id.map(str::to_string),
            ip,
            detail: detail(),
        });
    }

    /// The connection hook, if one is installed (cloned out of the lock).
    pub fn connection(&self) -> Option<Arc<dyn ConnectionEvents>> {
        self.connection.read().clone()
    }
}
