//! The broker's own form of an application message: decoded once, shared by
//! every subscriber through an `Arc`, never copied on the routing path.

use bytes::Bytes;
use mqtt_codec::{BoxedProperties, QoS};
use tokio::time::Instant;

#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// QoS as published; each subscriber gets the minimum of this and its
    /// subscription's QoS.
    pub qos: QoS,
    pub retain: bool,
    /// Properties passed through unchanged (topic alias and subscription
    /// identifiers are per-delivery and never stored here).
    pub properties: BoxedProperties,
    /// From Message Expiry Interval: the message is dropped after this.
    pub expires_at: Option<Instant>,
    /// Session id of the publisher, for No Local; 0 for internal messages.
    pub publisher: u64,
}

impl Message {
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Remaining expiry interval in whole seconds (rounded up, at least 1)
    /// to send to a subscriber, as the spec requires.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|t| {
            let left = t.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            secs.clamp(1, u64::from(u32::MAX)) as u32
        })
    }
}
