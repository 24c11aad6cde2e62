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
        Ok(())
    }
}
