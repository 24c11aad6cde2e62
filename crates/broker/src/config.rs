//! Broker settings. Validated values only: the binary turns the TOML file,
//! environment and flags into a [`BrokerConfig`] and checks it with
//! [`BrokerConfig::validate`] before the broker ever sees it.

use std::path::PathBuf;
use std::time::Duration;

/// Everything the broker needs to know to run; all fields have documented
/// defaults (see `m2mhub config default`).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Accept clients that present no credentials.
    pub allow_anonymous: bool,
    /// Optional password file (`m2mhub passwd` writes entries).
    pub password_file: Option<PathBuf>,
    /// Largest packet accepted from a client (bytes, fixed header included).
    pub max_packet_size: u32,
    /// How many QoS 1/2 messages a client may have in flight toward us
    /// (our Receive Maximum), and the default window toward a client.
    pub receive_maximum: u16,
    /// Bound of a session's queue of messages waiting to be sent; beyond it
    /// messages for that session are dropped and counted.
    pub max_queued_messages: usize,
    /// Topic aliases a client may use toward us (MQTT 5).
    pub topic_alias_maximum: u16,
    /// Upper bound for a client's keep-alive; 0 = accept any. Announced to
    /// MQTT 5 clients as Server Keep Alive when theirs is larger or zero.
    pub max_keep_alive: u16,
    /// Upper bound for session expiry (seconds).
    pub max_session_expiry: u32,
    /// A connection that sends no CONNECT within this time is dropped.
    pub connect_timeout: Duration,
    /// A client whose socket accepts no data for this long is dropped.
    pub write_timeout: Duration,
    /// Interval of `$SYS/` statistics; zero disables them.
    pub sys_interval: Duration,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Maximum connections in total (0 = unlimited).
    pub max_connections: usize,
    /// Topic filters no client may subscribe to, whoever it is. A SUBSCRIBE
    /// filter that one of these matches (their wildcards match levels of
    /// the requested filter: `test/#` refuses `test/a`, `test/+` and
    /// `test/#`) is answered 0x80 Unspecified error, under MQTT 3.1.1 and 5
    /// alike. Not access control: a wider filter (`#`) is not refused and
    /// still receives these topics; device policies (the authorizer) are
    /// for that. For retiring a topic, and for interoperability suites that
    /// check how a refused SUBSCRIBE is answered.
    /// Config key: `mqtt.refused_subscriptions` (default empty).
    pub refused_subscriptions: Vec<String>,

    // --- DoS resistance (see `limits.rs` and `ban.rs`) ---------------------
    /// Open connections per source IP (IPv6: per /64 prefix); a connection
    /// beyond it is closed right after accept, before its CONNECT is read.
    /// 0 = unlimited. Config key: `mqtt.max_connections_per_ip` (default 100).
    pub max_connections_per_ip: usize,
    /// Connection attempts per second over all clients (token bucket with a
    /// burst of twice the rate); beyond it CONNECT is answered with 0x9F
    /// Connection rate exceeded (3.1.1: return code 3). 0 = unlimited.
    /// Config key: `mqtt.max_connect_rate` (default 0).
    pub max_connect_rate: u32,
    /// Connection attempts per second from one source IP (IPv6: per /64).
    /// 0 = unlimited. Config key: `mqtt.max_connect_rate_per_ip` (default 20).
    pub max_connect_rate_per_ip: u32,
    /// Burst of the per-IP connection rate (attempts allowed at once after
    /// a quiet period); at least 1 when the rate is set.
    /// Config key: `mqtt.connect_burst_per_ip` (default 40).
    pub connect_burst_per_ip: u32,
    /// PUBLISH packets per second one client may send (token bucket, burst
    /// twice the rate). Over it, QoS 1/2 are answered with 0x97 Quota
    /// exceeded (MQTT 5; the message is not routed) and QoS 0 are dropped;
    /// 3.1.1 clients are acknowledged as usual and the message dropped. A
    /// client refused more than five bursts' worth within one second is
    /// disconnected with 0x96 Message rate too high. 0 = unlimited.
    /// Config key: `mqtt.max_publish_rate` (default 0).
    pub max_publish_rate: u32,
    /// Subscriptions one session may hold; a SUBSCRIBE beyond it gets 0x97
    /// Quota exceeded for that filter (3.1.1: 0x80). 0 = unlimited.
    /// Config key: `mqtt.max_subscriptions_per_session` (default 1000).
    pub max_subscriptions_per_session: usize,
    /// Duration of a first ban; every further ban of the same IP, client id
    /// or device doubles it, up to `ban_max_duration`.
    /// Config key: `mqtt.ban_base_secs` (default 60).
    pub ban_base_duration: Duration,
    /// Longest escalated ban. Config key: `mqtt.ban_max_secs` (default 86400).
    pub ban_max_duration: Duration,
    /// A key whose last ban ended this long ago starts over at the base
    /// duration. Config key: `mqtt.ban_forget_secs` (default 86400).
    pub ban_forget_after: Duration,
    /// Failed authentications (CONNACK 0x85/0x86/0x87) from one IP within
    /// `auth_failure_window` that ban the IP. 0 = never.
    /// Config key: `mqtt.auth_failures_before_ban` (default 10).
    pub auth_failures_before_ban: u32,
    /// Window for `auth_failures_before_ban`.
    /// Config key: `mqtt.auth_failure_window_secs` (default 60).
    pub auth_failure_window: Duration,
    /// Successful CONNECTs of one client id within `flapping_window` above
    /// which the client id is banned (connect/disconnect flapping). A
    /// connection the client ends with its own DISCONNECT does not count:
    /// flapping is connections that drop or take each other over, and a
    /// client that reconnects politely is held by the connection rates
    /// instead. 0 = never.
    /// Config key: `mqtt.max_connects_per_client_id` (default 20).
    pub max_connects_per_client_id: u32,
    /// Window for `max_connects_per_client_id`.
    /// Config key: `mqtt.flapping_window_secs` (default 60).
    pub flapping_window: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            allow_anonymous: false,
            password_file: None,
            max_packet_size: 1024 * 1024,
            receive_maximum: 128,
            max_queued_messages: 10_000,
            topic_alias_maximum: 64,
            max_keep_alive: 0,
            max_session_expiry: u32::MAX,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            sys_interval: Duration::from_secs(10),
            retain_available: true,
            max_connections: 0,
            refused_subscriptions: Vec::new(),
            max_connections_per_ip: 100,
            max_connect_rate: 0,
            max_connect_rate_per_ip: 20,
            connect_burst_per_ip: 40,
            max_publish_rate: 0,
            max_subscriptions_per_session: 1000,
            ban_base_duration: Duration::from_secs(60),
            ban_max_duration: Duration::from_secs(24 * 3600),
            ban_forget_after: Duration::from_secs(24 * 3600),
            auth_failures_before_ban: 10,
            auth_failure_window: Duration::from_secs(60),
            max_connects_per_client_id: 20,
            flapping_window: Duration::from_secs(60),
        }
    }
}

/// A configuration value that cannot work, named by its config key.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for `{key}`: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl BrokerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, reason: &str| {
            Err(ConfigError {
                key,
                reason: reason.to_string(),
            })
        };
        if self.max_packet_size < 64 {
            return err(
                "mqtt.max_packet_size",
                "must be at least 64 bytes (default 1048576)",
            );
        }
        if self.max_packet_size as usize > mqtt_codec::MAX_REMAINING_LENGTH + 5 {
            return err("mqtt.max_packet_size", "must be at most 268435460 bytes");
        }
        if self.receive_maximum == 0 {
            return err("mqtt.receive_maximum", "must be between 1 and 65535");
        }
        if self.max_queued_messages == 0 {
            return err(
                "mqtt.max_queued_messages",
                "must be at least 1 (default 10000)",
            );
        }
        if self.connect_timeout.is_zero() {
            return err(
                "mqtt.connect_timeout_secs",
                "must be at least 1 second (default 10)",
            );
        }
        if self.write_timeout.is_zero() {
            return err(
                "mqtt.write_timeout_secs",
                "must be at least 1 second (default 30)",
            );
        }
        if self.max_connect_rate_per_ip > 0 && self.connect_burst_per_ip == 0 {
            return err(
                "mqtt.connect_burst_per_ip",
                "must be at least 1 when mqtt.max_connect_rate_per_ip is set (default 40)",
            );
        }
        if self.ban_base_duration.is_zero() {
            return err(
                "mqtt.ban_base_secs",
                "must be at least 1 second (default 60)",
            );
        }
        if self.ban_max_duration < self.ban_base_duration {
            return err(
                "mqtt.ban_max_secs",
                "must be at least mqtt.ban_base_secs (default 86400)",
            );
        }
        if self.auth_failure_window.is_zero() {
            return err(
                "mqtt.auth_failure_window_secs",
                "must be at least 1 second (default 60)",
            );
        }
        for f in &self.refused_subscriptions {
            if mqtt_codec::topic::validate_topic_filter(f).is_err() {
                return Err(ConfigError {
                    key: "mqtt.refused_subscriptions",
                    reason: format!("{f:?} is not a valid topic filter"),
                });
            }
        }
        if self.flapping_window.is_zero() {
            return err(
                "mqtt.flapping_window_secs",
                "must be at least 1 second (default 60)",
            );
        }
        Ok(())
    }
}
