//! The STATE message of a Sparkplug host application: a retained JSON
//! `{"online": bool, "timestamp": ms}` on `spBv1.0/STATE/{host_id}`.
//!
//! Edge nodes configured with a primary host wait for its `online: true`
//! before publishing births, so a platform acting as that host publishes
//! the birth (QoS 1, retained) right after subscribing, and registers the
//! death (`online: false`, same timestamp) as its MQTT will.

use serde::{Deserialize, Serialize};

use super::topic::{TopicError, NAMESPACE};

/// The payload of a STATE message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    pub online: bool,
    /// Milliseconds since the epoch; the birth repeats the will's value.
    pub timestamp: u64,
}

/// Why a STATE payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid STATE payload: {0}")]
pub struct HostStateError(String);

impl HostState {
    /// Read a STATE payload (other hosts' births and deaths).
    pub fn decode(payload: &[u8]) -> Result<Self, HostStateError> {
        serde_json::from_slice(payload).map_err(|e| HostStateError(e.to_string()))
    }

    /// The topic and JSON payload to publish (QoS 1, retained) for
    /// `host_id`, which must be a valid Sparkplug id.
    pub fn encode(&self, host_id: &str) -> Result<(String, Vec<u8>), TopicError> {
        if host_id.is_empty() {
            return Err(TopicError::EmptyId("host_id"));
        }
        if host_id.contains(['+', '#', '/']) {
            return Err(TopicError::Wildcard("host_id"));
        }
        let body = format!(
            r#"{{"online":{},"timestamp":{}}}"#,
            self.online, self.timestamp
        );
        Ok((format!("{NAMESPACE}/STATE/{host_id}"), body.into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparkplug::topic::{parse_topic, Topic};

    #[test]
    fn birth_and_death_round_trip() {
        for online in [true, false] {
            let state = HostState {
                online,
                timestamp: 1_700_000_000_000,
            };
            let (topic, body) = state.encode("m2mhub").expect("valid id");
            assert_eq!(
                parse_topic(&topic),
                Ok(Topic::HostState {
                    host_id: "m2mhub".into()
                })
            );
            assert_eq!(HostState::decode(&body), Ok(state));
        }
        assert_eq!(
            HostState {
                online: true,
                timestamp: 5
            }
            .encode("m2mhub")
            .expect("valid")
            .1,
            br#"{"online":true,"timestamp":5}"#
        );
    }

    #[test]
    fn invalid_states() {
        assert!(HostState::decode(b"{\"online\":true}").is_err());
        assert!(HostState::decode(b"\x00").is_err());
        let s = HostState {
            online: true,
            timestamp: 0,
        };
        assert!(s.encode("").is_err());
        assert!(s.encode("a/b").is_err());
    }
}
