//! Keep alive: a client that sends nothing for 1.5 × its keep alive is gone
//! (MQTT 5 §3.1.2.10). Pure state: the driver passes the time in and sleeps
//! until [`KeepAlive::poll_timeout`].

use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub(crate) struct KeepAlive {
    /// 1.5 × the negotiated keep alive; zero when keep alive is off.
    limit: Duration,
    /// When the client last sent anything.
    last_rx: Instant,
    /// When the driver should next call [`KeepAlive::handle_timeout`]. It is
    /// not moved on every receive (that would cost a timer reset per read);
    /// a check that finds the client alive sets the next one.
    next_check: Instant,
}

impl KeepAlive {
    pub fn new(keep_alive: Duration, now: Instant) -> KeepAlive {
        let limit = keep_alive.mul_f32(1.5);
        KeepAlive {
            limit,
            last_rx: now,
            next_check: now + limit,
        }
    }

    /// The client sent something: any bytes count, not only whole packets.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = now;
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.limit.is_zero()).then_some(self.next_check)
    }

    /// True if the client has been silent too long. `reading` is false while
    /// the driver holds back reading (acknowledgements waiting for the
    /// platform): silence then is no fault of the client's, and the count
    /// starts again from `now`.
    pub fn handle_timeout(&mut self, now: Instant, reading: bool) -> bool {
        let limit = self.limit;
        if limit.is_zero() || now < self.next_check {
            return false;
        }
        if reading && now.saturating_duration_since(self.last_rx) >= limit {
            return true;
        }
        self.next_check = if reading {
            self.last_rx + limit
        } else {
            now + limit
        };
        false
    }
}
