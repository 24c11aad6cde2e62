//! The connection history: a device's connects and disconnects become
//! device events of kind `connection` (rate-limited and capped like every
//! device event, in `m2mhub-fleet`) and live events for open consoles.

use crate::live::{LiveEvent, LiveHub};
use m2mhub_broker::auth::ClientIdentity;
use m2mhub_broker::ConnectionEvents;
use m2mhub_fleet::Fleet;
use std::net::SocketAddr;
use std::sync::Arc;

/// The connection history: a device's connects and disconnects become
/// device events of kind `connection` (rate-limited and capped like every
/// device event) and live events for open consoles.
pub struct ConnectionHistory {
    pub fleet: Fleet,
    pub live: Arc<LiveHub>,
}

impl ConnectionHistory {
    fn record(&self, identity: &ClientIdentity, online: bool, detail: String) {
        // Only registered devices have a history; operator tools and
        // claim-token clients do not.
        let (Some(device), Some(tenant), None) =
            (&identity.device_id, &identity.tenant, &identity.claim)
        else {
            return;
        };
        self.live.send(LiveEvent::Connection {
            tenant: tenant.clone(),
            device: device.clone(),
            online,
            ts_ms: m2mhub_identity::now_ms(),
            detail: detail.clone(),
        });
        self.fleet
            .record_device_event(tenant, device, "connection", detail);
    }
}

impl ConnectionEvents for ConnectionHistory {
    fn connected(&self, client_id: &str, identity: &ClientIdentity, peer: SocketAddr) {
        self.record(
            identity,
            true,
            format!("connected from {} as client {client_id:?}", peer.ip()),
        );
    }

    fn disconnected(&self, _client_id: &str, identity: &ClientIdentity, reason: &str) {
        self.record(identity, false, format!("disconnected: {reason}"));
    }

    fn auth_failed(&self, _: &str, _: Option<&str>, _: SocketAddr, _: u8) {
        // Refused CONNECTs are security events, recorded elsewhere.
    }
}
