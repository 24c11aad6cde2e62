//! The CoAP listener's configuration: defaults, and validation that names
//! the offending key and the fix.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

use crate::block::UploadLimits;
use crate::exchange::EndpointConfig;
use crate::message::BlockValue;
use crate::observe::ObserveConfig;

/// The CoAP listener's settings. [`CoapConfig::default`] is a sensible
/// public-facing server; [`CoapConfig::validate`] must pass before use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoapConfig {
    /// The UDP address to listen on (`0.0.0.0:5683`).
    pub bind: SocketAddr,
    /// The largest datagram accepted (1280: what IPv6 always carries).
    pub max_message_size: usize,
    /// The block size for Block2 responses and the preferred Block1 size:
    /// a power of two, 16..=1024 (1024).
    pub block_size: usize,
    /// The largest request body a Block1 upload may reach (1 MiB).
    pub max_body: usize,
    /// The most Block1 uploads in progress (64).
    pub max_uploads: usize,
    /// How long an upload waits for its next block (60 s).
    pub upload_timeout: Duration,
    /// The most exchanges in progress (4096).
    pub max_exchanges: usize,
    /// The most exchanges in progress with one client address (32).
    pub max_exchanges_per_peer: usize,
    /// The most message ids remembered for duplicate detection (65536);
    /// when full, ids older than MAX_TRANSMIT_SPAN (45 s) make room.
    pub max_dedup: usize,
    /// Requests per second allowed per client IP address (20); over it,
    /// a CON gets 5.03 with Max-Age and a NON is dropped.
    pub rate_per_second: u32,
    /// The burst allowed per client IP address (40).
    pub rate_burst: u32,
    /// The most client addresses tracked by the rate limiter (16384).
    pub max_rate_entries: usize,
    /// The most observers in total (4096).
    pub max_observers: usize,
    /// Every this many notifications one is Confirmable (16).
    pub observe_con_every: u32,
    /// At most this many response bytes per request byte to a client whose
    /// address is not verified (a larger GET answer is preceded by an Echo
    /// challenge, other answers are cut into small blocks); 0 disables the
    /// limit, e.g. behind DTLS, whose handshake verifies the address (3).
    pub amplification_factor: u32,
    /// How long the application may take to answer (30 s); then 5.03.
    pub handler_timeout: Duration,
    /// How long a CON request waits for the application before the empty
    /// ACK (500 ms).
    pub separate_ack_delay: Duration,
    /// Max-Age of 5.03 refusals when the server is full (5 s).
    pub overload_max_age: u32,
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 5683)),
            max_message_size: 1280,
            block_size: 1024,
            max_body: 1024 * 1024,
            max_uploads: 64,
            upload_timeout: Duration::from_secs(60),
            max_exchanges: 4096,
            max_exchanges_per_peer: 32,
            max_dedup: 65_536,
            rate_per_second: 20,
            rate_burst: 40,
            max_rate_entries: 16_384,
            max_observers: 4096,
            observe_con_every: 16,
            amplification_factor: 3,
            handler_timeout: Duration::from_secs(30),
            separate_ack_delay: Duration::from_millis(500),
            overload_max_age: 5,
        }
    }
}

/// A setting that cannot work, with the key and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// `block_size` is not a power of two in 16..=1024.
    #[error("coap.block_size = {0}: use a power of two from 16 to 1024")]
    BlockSize(usize),
    /// `max_message_size` cannot hold a block and its headers.
    #[error("coap.max_message_size = {got}: must be at least block_size + 64 = {need}")]
    MessageSize {
        /// The configured value.
        got: usize,
        /// The smallest workable value.
        need: usize,
    },
    /// A limit that must be at least one is zero.
    #[error("coap.{0} = 0: must be at least 1")]
    Zero(&'static str),
    /// `max_exchanges_per_peer` above `max_exchanges`.
    #[error("coap.max_exchanges_per_peer must not exceed coap.max_exchanges")]
    PerPeer,
    /// `separate_ack_delay` so long that clients retransmit first.
    #[error("coap.separate_ack_delay = {0:?}: use less than the 2 s ACK timeout")]
    AckDelay(Duration),
}

impl CoapConfig {
    /// Check every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if BlockValue::szx_for_size(self.block_size).is_none() {
            return Err(ConfigError::BlockSize(self.block_size));
        }
        let need = self.block_size + 64;
        if self.max_message_size < need {
            return Err(ConfigError::MessageSize {
                got: self.max_message_size,
                need,
            });
        }
        for (name, v) in [
            ("max_body", self.max_body),
            ("max_uploads", self.max_uploads),
            ("max_exchanges", self.max_exchanges),
            ("max_exchanges_per_peer", self.max_exchanges_per_peer),
            ("max_dedup", self.max_dedup),
            ("max_rate_entries", self.max_rate_entries),
            ("rate_per_second", self.rate_per_second as usize),
            ("rate_burst", self.rate_burst as usize),
            ("observe_con_every", self.observe_con_every as usize),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.max_exchanges_per_peer > self.max_exchanges {
            return Err(ConfigError::PerPeer);
        }
        if self.separate_ack_delay >= Duration::from_secs(2) {
            return Err(ConfigError::AckDelay(self.separate_ack_delay));
        }
        Ok(())
    }

    /// The block size exponent (valid after [`CoapConfig::validate`]).
    pub fn szx(&self) -> u8 {
        BlockValue::szx_for_size(self.block_size).unwrap_or(6)
    }

    pub(crate) fn endpoint(&self) -> EndpointConfig {
        EndpointConfig {
            separate_ack_delay: self.separate_ack_delay,
            max_message_size: self.max_message_size,
            max_dedup: self.max_dedup,
            max_exchanges: self.max_exchanges,
            max_exchanges_per_peer: self.max_exchanges_per_peer,
            overload_max_age: self.overload_max_age,
            // The application's answer is awaited a little longer than the
            // driver's handler timeout, which then answers 5.03 itself.
            response_timeout: self.handler_timeout + Duration::from_secs(5),
            ..EndpointConfig::default()
        }
    }

    pub(crate) fn uploads(&self) -> UploadLimits {
        UploadLimits {
            max_body: self.max_body,
            max_uploads: self.max_uploads,
            max_total_bytes: self.max_body.saturating_mul(4).max(self.max_body),
            lifetime: self.upload_timeout,
            szx: self.szx(),
        }
    }

    pub(crate) fn observe(&self) -> ObserveConfig {
        ObserveConfig {
            max_observers: self.max_observers,
            con_every: self.observe_con_every,
            ..ObserveConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(CoapConfig::default().validate(), Ok(()));
        assert_eq!(CoapConfig::default().szx(), 6);
    }

    #[test]
    fn errors_name_the_key() {
        let c = CoapConfig {
            block_size: 1000,
            ..CoapConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e, ConfigError::BlockSize(1000));
        assert!(e.to_string().contains("coap.block_size"));
        let c = CoapConfig {
            max_message_size: 500,
            ..CoapConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::MessageSize { .. })));
        let c = CoapConfig {
            max_uploads: 0,
            ..CoapConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Zero("max_uploads")));
        let c = CoapConfig {
            separate_ack_delay: Duration::from_secs(3),
            ..CoapConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::AckDelay(_))));
    }
}
