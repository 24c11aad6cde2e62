//! Keep alive: a client that sends nothing for 1.5 × its keep alive is gone
//! (MQTT 5 §3.1.2.10). Pure state: the driver passes the time in and sleeps
//! until [`KeepAlive::deadline`].
//!
//! Only the time of the last receive is kept (every connection holds one of
//! these); the keep alive itself is a negotiated parameter passed in.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub(crate) struct KeepAlive {
    /// When the client last sent anything (or when silence stopped counting).
    last_rx: Instant,
}

/// 1.5 × the keep alive; `None` when keep alive is off.
fn limit(keep_alive: u16) -> Option<Duration> {
    (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive)).mul_f32(1.5))
}

impl KeepAlive {
    pub fn new(now: Instant) -> KeepAlive {
        KeepAlive { last_rx: now }
    }

    /// The client sent something: any bytes count, not only whole packets.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// When the client is due to have sent something.
    pub fn deadline(&self, keep_alive: u16) -> Option<Instant> {
        limit(keep_alive).map(|l| self.last_rx + l)
    }

    /// True if the client has been silent too long. `reading` is false while
    /// the driver holds back reading (acknowledgements waiting for the
    /// platform): silence then is no fault of the client's, and the count
    /// starts again from `now`.
    pub fn handle_timeout(&mut self, now: Instant, reading: bool, keep_alive: u16) -> bool {
        let Some(limit) = limit(keep_alive) else {
            return false;
        };
        if !reading {
            self.last_rx = self.last_rx.max(now);
            return false;
        }
        now.saturating_duration_since(self.last_rx) >= limit
    }
}
