//! Broker counters, exported as Prometheus text at `/metrics` and as `$SYS/`
//! topics. Counters are relaxed atomics: a scrape may see a publish counted
//! as received but not yet as sent, which is fine for monitoring.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident : $help:literal),* $(,)?) => {
        #[derive(Default)]
        pub struct Metrics {
            $(pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// `(name, help, value)` for every counter.
            pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    connections_accepted: "TCP/TLS/WebSocket connections accepted",
    connections_rejected: "connections refused before or at CONNECT (limits, timeouts, bad CONNECT)",
    connects_succeeded: "successful MQTT CONNECTs",
    auth_failures: "CONNECTs refused by the authenticator",
    authz_denials: "PUBLISH or SUBSCRIBE refused by the authorizer",
    messages_received: "PUBLISH packets received from clients",
    messages_sent: "PUBLISH packets sent to clients",
    bytes_received: "bytes read from client sockets",
    bytes_sent: "bytes written to client sockets",
    messages_dropped_queue_full: "messages dropped because a session queue was full",
    messages_dropped_too_large: "messages not sent because they exceed the client's maximum packet size",
    messages_expired: "messages dropped because their message expiry interval elapsed",
    messages_dropped_unsubscribed: "queued messages not sent because the client unsubscribed from their topic before they went out",
    malformed_packets: "connections closed for a malformed packet or protocol error",
    keepalive_timeouts: "connections closed because the keep-alive elapsed",
    sessions_taken_over: "sessions taken over by a new connection with the same client id",
    sessions_expired: "persistent sessions removed after their expiry interval",
    wills_published: "will messages published",
    store_errors: "persistent store writes that failed",
    connect_timeouts: "connections closed because no complete CONNECT arrived within the connect timeout (idle or trickling sockets)",
    connections_refused_per_ip: "connections closed right after accept because their source IP had mqtt.max_connections_per_ip open",
    connections_refused_rate: "CONNECTs refused with 0x9F because the global or per-IP connection rate was exceeded",
    connections_refused_banned: "CONNECTs refused with 0x8A because the IP, client id or device is banned",
    publishes_rate_limited: "PUBLISH packets refused (QoS 1/2, 0x97) or dropped (QoS 0, MQTT 3.1.1) for exceeding mqtt.max_publish_rate",
    rate_limit_disconnects: "clients disconnected (0x96) for persistently exceeding mqtt.max_publish_rate",
    subscriptions_quota_exceeded: "subscriptions refused (0x97) because the session reached mqtt.max_subscriptions_per_session",
    subscriptions_refused: "SUBSCRIBE filters refused (0x80) because mqtt.refused_subscriptions covers them",
    bans_issued: "administrative bans (Broker::ban_ip, ban_client, ban_device)",
    bans_automatic: "automatic bans: repeated failed authentications from one IP, or connect flapping of one client id",
    clients_kicked: "connections closed by an administrative kick or ban (DISCONNECT 0x98)",
    internal_messages_delivered: "messages handed to platform-internal subscriptions",
    security_events_suppressed: "security events (limit hits) not delivered to the platform hook because more than 100/s occurred",
    internal_messages_dropped: "messages dropped because a platform-internal subscription's channel was full",
    publishes_refused_by_hook: "QoS 1/2 PUBLISH packets the platform's publish hook refused (MQTT 5: PUBACK/PUBREC with its reason code; 3.1.1: not acknowledged)",
}

/// Current values that are not counters.
pub struct Gauges {
    pub connections: u64,
    /// Idle connections parked without a task (`park.rs`).
    pub connections_parked: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    pub uptime_secs: u64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::with_capacity(4096);
        for (name, help, v) in self.counters() {
            let _ = writeln!(s, "# HELP m2mhub_mqtt_{name}_total {help}");
            let _ = writeln!(s, "# TYPE m2mhub_mqtt_{name}_total counter");
            let _ = writeln!(s, "m2mhub_mqtt_{name}_total {v}");
        }
        for (name, help, v) in [
            ("connections", "open MQTT connections", g.connections),
            (
                "connections_parked",
                "idle connections parked without a task of their own",
                g.connections_parked,
            ),
            ("sessions", "sessions, online and offline", g.sessions),
            ("subscriptions", "subscriptions", g.subscriptions),
            ("retained_messages", "retained messages", g.retained),
            (
                "uptime_seconds",
                "seconds since the broker started",
                g.uptime_secs,
            ),
        ] {
            let _ = writeln!(s, "# HELP m2mhub_mqtt_{name} {help}");
            let _ = writeln!(s, "# TYPE m2mhub_mqtt_{name} gauge");
            let _ = writeln!(s, "m2mhub_mqtt_{name} {v}");
        }
        s
    }
}
