//! Topic aliases (MQTT 5 §3.3.2.3.4), both directions of one connection.

use mqtt_codec::reason;
use std::collections::HashMap;

#[derive(Clone, Debug, Default)]
pub(crate) struct Aliases {
    /// Topic → alias we assigned toward the client.
    outbound: HashMap<String, u16>,
    /// Alias → topic the client assigned toward us.
    inbound: HashMap<u16, String>,
}

impl Aliases {
    /// Apply the alias of an incoming PUBLISH: an empty topic is looked up,
    /// a topic with an alias (re)defines it. Err is the DISCONNECT reason.
    pub fn resolve_inbound(&mut self, alias: u16, topic: &mut String, max: u16) -> Result<(), u8> {
        if alias == 0 || alias > max {
            return Err(reason::TOPIC_ALIAS_INVALID);
        }
        if topic.is_empty() {
            match self.inbound.get(&alias) {
                Some(t) => topic.clone_from(t),
                None => return Err(reason::PROTOCOL_ERROR),
            }
        } else {
            self.inbound.insert(alias, topic.clone());
        }
        Ok(())
    }

    /// The alias for an outgoing PUBLISH on `topic`, and whether the topic
    /// must still be sent (first use of the alias). Aliases are assigned
    /// first come, first served until the client's maximum; later topics go
    /// without one (no eviction: a stable map costs no re-announcements).
    pub fn outbound(&mut self, topic: &str, max: u16) -> (Option<u16>, bool) {
        if let Some(a) = self.outbound.get(topic) {
            return (Some(*a), false);
        }
        if self.outbound.len() < usize::from(max) {
            let a = self.outbound.len() as u16 + 1;
            self.outbound.insert(topic.to_string(), a);
            return (Some(a), true);
        }
        (None, true)
    }
}
