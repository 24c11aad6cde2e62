//! Hooks the platform installs to hear about security-relevant events
//! (limits hit, automatic bans) and about connections (presence, audit),
//! and to hold back the acknowledgement of a PUBLISH until its own work on
//! the message is durable ([`PublishHook`]).
//!
//! All are called synchronously on broker tasks, never while the broker
//! holds a lock, and must not block: hand the event to a bounded channel
//! with `try_send` (dropping when full) or update an in-memory structure.
//!
//! Limit hits can come by the thousand under attack, so security events
//! other than automatic bans pass a broker-wide token bucket
//! ([`SECURITY_EVENT_RATE`] per second, burst twice that); the rest are
//! counted (`security_events_suppressed`) and not delivered.

use crate::auth::ClientIdentity;
use crate::message::Message;
use parking_lot::RwLock;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Two connection hooks, told in the order they were installed.
struct BothConnectionHooks(Arc<dyn ConnectionEvents>, Arc<dyn ConnectionEvents>);

impl ConnectionEvents for BothConnectionHooks {
    fn connected(&self, client_id: &str, identity: &ClientIdentity, peer: SocketAddr) {
        self.0.connected(client_id, identity, peer);
        self.1.connected(client_id, identity, peer);
    }

    fn disconnected(&self, client_id: &str, identity: &ClientIdentity, reason: &str) {
        self.0.disconnected(client_id, identity, reason);
        self.1.disconnected(client_id, identity, reason);
    }

    fn auth_failed(
        &self,
        client_id: &str,
        username: Option<&str>,
        peer: SocketAddr,
        reason_code: u8,
    ) {
        self.0.auth_failed(client_id, username, peer, reason_code);
        self.1.auth_failed(client_id, username, peer, reason_code);
    }
}

/// Completion of the platform's work on one PUBLISH (see [`PublishHook`]):
/// `Ok(())` to acknowledge it, `Err(reason_code)` to refuse it.
pub type AckGate = Pin<Box<dyn Future<Output = Result<(), u8>> + Send>>;

/// Work the platform does with an authorized PUBLISH, which may hold back
/// its acknowledgement (e.g. telemetry acknowledged only once it is in the
/// time-series store's write-ahead log).
///
/// The gate is only a completion signal: the hook must start its work
/// eagerly (hand the message to a writer task and return the receiving end
/// of a oneshot, say). The broker may poll a gate late (acknowledgements go
/// out in the order the PUBLISHes arrived, so a gate is awaited only once
/// the ones before it have resolved), drops a QoS 0 message's gate without
/// polling it, and drops pending gates when the connection ends.
///
/// While gates are pending the connection keeps reading and routing further
/// PUBLISHes (up to `receive_maximum`, at most 1024, unacknowledged ones;
/// then it stops reading until the oldest resolves), so a device with many
/// messages in flight shares one store commit among them.
pub trait PublishHook: Send + Sync + 'static {
    /// Called on the connection's task for every PUBLISH that passed
    /// authorization (any QoS), after it was routed to subscribers and before
    /// it is acknowledged. Must not block.
    ///
    /// Return `None` when the acknowledgement need not wait; `Some(gate)` to
    /// hold the PUBACK/PUBREC until the gate resolves:
    /// - `Ok(())`: acknowledged with the routing's reason code, as without a
    ///   hook;
    /// - `Err(code)`: MQTT 5 gets PUBACK/PUBREC with that reason code (e.g.
    ///   0x80 unspecified error, 0x97 quota exceeded; codes below 0x80 are
    ///   sent as 0x80). MQTT 3.1.1 has no negative acknowledgement, so the
    ///   message gets no acknowledgement at all and the client will send it
    ///   again (after reconnecting). Either way a QoS 2 message is forgotten,
    ///   so its resend is processed anew.
    ///
    /// Subscribers already have the message: a refusal only tells the
    /// publisher that the platform did not keep it.
    fn on_publish(
        &self,
        client_id: &str,
        identity: &ClientIdentity,
        message: &Message,
    ) -> Option<AckGate>;
}

/// The installed hooks (none by default).
#[derive(Default)]
pub(crate) struct Hooks {
    security: RwLock<Option<Arc<dyn SecurityEvents>>>,
    connection: RwLock<Option<Arc<dyn ConnectionEvents>>>,
    publish: RwLock<Option<Arc<dyn PublishHook>>>,
    /// Bumped every time the publish hook is set; 0 while there is none.
    /// Connections cache the hook with its generation, so a PUBLISH costs
    /// one uncontended atomic load instead of a lock and a reference count
    /// shared by every core.
    publish_generation: AtomicU64,
}

impl Hooks {
    pub fn set_security(&self, h: Arc<dyn SecurityEvents>) {
        *self.security.write() = Some(h);
    }

    pub fn set_connection(&self, h: Arc<dyn ConnectionEvents>) {
        *self.connection.write() = Some(h);
    }

    /// Install `h` beside the connection hook already there (both are told).
    pub fn add_connection(&self, h: Arc<dyn ConnectionEvents>) {
        let mut slot = self.connection.write();
        *slot = Some(match slot.take() {
            Some(old) => Arc::new(BothConnectionHooks(old, h)),
            None => h,
        });
    }

    pub fn set_publish(&self, h: Arc<dyn PublishHook>) {
        let mut slot = self.publish.write();
        *slot = Some(h);
        self.publish_generation.fetch_add(1, Ordering::Release);
    }

    /// The publish hook's generation: 0 while none is installed (the fast
    /// path), otherwise compare with the one cached by [`Hooks::publish`].
    pub fn publish_generation(&self) -> u64 {
        self.publish_generation.load(Ordering::Acquire)
    }

    /// The publish hook and its generation, read together.
    pub fn publish(&self) -> (u64, Option<Arc<dyn PublishHook>>) {
        let slot = self.publish.read();
        (
            self.publish_generation.load(Ordering::Acquire),
            slot.clone(),
        )
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
