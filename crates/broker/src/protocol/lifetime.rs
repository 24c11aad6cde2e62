//! What happens to a session after its connection ends: the will is
//! published after its Will Delay Interval, but never later than the end of
//! the session (MQTT 5 §3.1.3.2.2), and the session ends after its Session
//! Expiry Interval unless the client comes back first, which also cancels
//! a will still waiting.
//!
//! Pure state, stepped with the time passed in: the broker sleeps until
//! [`SessionTimers::poll_timeout`] and calls
//! [`SessionTimers::handle_timeout`]. Plain data, so a session moved to
//! another node can take its timers along.

use std::time::Duration;
use tokio::time::Instant;

/// What a due timer asks the broker to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerEvent {
    /// Publish the will now.
    PublishWill,
    /// The Session Expiry Interval has elapsed: end the session.
    EndSession,
}

/// Session expiry of `u32::MAX` seconds: the session never expires.
pub(crate) const NEVER_EXPIRES: u32 = u32::MAX;

#[derive(Clone, Debug, Default)]
pub(crate) struct SessionTimers {
    /// When the will is due, if one waits.
    will_at: Option<Instant>,
    /// When the session ends, if it is offline and expires.
    expires_at: Option<Instant>,
}

/// Seconds after the disconnect at which the will is published: its delay
/// (MQTT 5 only; 3.1.1 publishes at once), capped by the session expiry.
pub(crate) fn will_delay(v5: bool, will_delay_interval: Option<u32>, expiry: u32) -> u32 {
    if v5 {
        will_delay_interval.unwrap_or(0).min(expiry)
    } else {
        0
    }
}

/// Whether an offline session has outlived its expiry interval.
pub(crate) fn is_expired(disconnected_at: Option<Instant>, expiry: u32, now: Instant) -> bool {
    expiry != NEVER_EXPIRES
        && disconnected_at.is_some_and(|t| {
            now.saturating_duration_since(t) >= Duration::from_secs(u64::from(expiry))
        })
}

impl SessionTimers {
    /// The connection ended at `now`. `will_delay` is `Some` if a will is to
    /// be published (see [`will_delay`]); `expiry` is the session's expiry
    /// interval in seconds.
    pub fn disconnected(&mut self, now: Instant, expiry: u32, will_delay: Option<u32>) {
        // An instant beyond the clock's range is never.
        let after = |secs: u32| now.checked_add(Duration::from_secs(u64::from(secs)));
        self.will_at = will_delay.and_then(|d| after(d.min(expiry)));
        self.expires_at = if expiry == NEVER_EXPIRES {
            None
        } else {
            after(expiry)
        };
    }

    /// The client came back: the will is not published, the session stays.
    pub fn reconnected(&mut self) {
        self.will_at = None;
        self.expires_at = None;
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.will_at, self.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One due event per call (the will before the session end when both are
    /// due); call again until `None`.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<TimerEvent> {
        if self.will_at.is_some_and(|t| t <= now) {
            self.will_at = None;
            return Some(TimerEvent::PublishWill);
        }
        if self.expires_at.is_some_and(|t| t <= now) {
            self.expires_at = None;
            // A will still waiting goes out when the session ends.
            return Some(TimerEvent::EndSession);
        }
        None
    }
}
