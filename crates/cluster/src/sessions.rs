//! Persistent sessions that outlive the node holding them.
//!
//! Two JetStream parts keep what a session needs on another node:
//! - the key-value bucket `{cluster}_sessions`: per client id, the session's
//!   record (expiry, subscriptions), which node wrote it, and its *floor*:
//!   a time before which every message for it had been delivered and
//!   acknowledged (the holder moves it forward when the session is drained);
//! - the stream `{cluster}_msgs`, which keeps every QoS 1/2 message published
//!   anywhere in the cluster (subjects `{cluster}.d.>`) for
//!   `queue_retention`: a publisher is acknowledged only once it is there.
//!
//! A node asked to resume a session it does not hold reads the record and
//! replays the stream from the floor through the session's own filters.
//! Messages delivered after the floor but before the old holder stopped
//! come again: QoS 1 allows that (QoS 2 messages may then arrive twice
//! across a node failure).

use crate::frame;
use crate::subject;
use async_nats::jetstream::{self, consumer, kv};
use futures_util::StreamExt;
use m2mhub_broker::message::Message;
use m2mhub_broker_log::{StoredSession, StoredSubscription};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How far before the floor a replay starts: covers clock differences
/// between nodes and messages in transit when the floor was taken.
pub const FLOOR_MARGIN_MS: u64 = 2_000;

/// A session as the sessions bucket keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionDoc {
    pub node: String,
    pub floor_ms: u64,
    pub client_id: String,
    pub protocol_v5: bool,
    pub expiry_interval: u32,
    pub disconnected_at_ms: Option<u64>,
    pub subscriptions: Vec<SubscriptionDoc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubscriptionDoc {
    pub filter: String,
    /// The subscription options byte as MQTT 5 encodes it.
    pub options: u8,
    pub subscription_id: Option<u32>,
}

impl SessionDoc {
    pub fn new(node: &str, floor_ms: u64, s: &StoredSession) -> SessionDoc {
        SessionDoc {
            node: node.to_string(),
            floor_ms,
            client_id: s.client_id.clone(),
            protocol_v5: s.protocol_v5,
            expiry_interval: s.expiry_interval,
            disconnected_at_ms: s.disconnected_at_ms,
            subscriptions: s
                .subscriptions
                .iter()
                .map(|x| SubscriptionDoc {
                    filter: x.filter.clone(),
                    options: x.options,
                    subscription_id: x.subscription_id,
                })
                .collect(),
        }
    }

    pub fn record(&self) -> StoredSession {
        StoredSession {
            client_id: self.client_id.clone(),
            protocol_v5: self.protocol_v5,
            expiry_interval: self.expiry_interval,
            disconnected_at_ms: self.disconnected_at_ms,
            subscriptions: self
                .subscriptions
                .iter()
                .map(|x| StoredSubscription {
                    filter: x.filter.clone(),
                    options: x.options,
                    subscription_id: x.subscription_id,
                })
                .collect(),
        }
    }

    /// Whether the session expired while no one held it.
    pub fn expired(&self, now_ms: u64) -> bool {
        match self.disconnected_at_ms {
            Some(at) if self.expiry_interval != u32::MAX => {
                at.saturating_add(u64::from(self.expiry_interval) * 1000) <= now_ms
            }
            _ => false,
        }
    }

    /// The filters a replay goes through (shared subscriptions are left
    /// out: their messages went to another member of the group).
    pub fn replay_filters(&self) -> Vec<&str> {
        self.subscriptions
            .iter()
            .map(|s| s.filter.as_str())
            .filter(|f| mqtt_codec::topic::parse_shared(f).is_none())
            .collect()
    }
}

/// Find `client_id`'s session in the bucket and the messages it is owed.
pub async fn restore(
    sessions: &kv::Store,
    js: &jetstream::Context,
    stream: &str,
    space: &str,
    client_id: &str,
    now_ms: u64,
) -> Result<Option<(StoredSession, Vec<Arc<Message>>)>, String> {
    let key = subject::encode_topic(client_id);
    let Some(value) = sessions.get(key).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let doc: SessionDoc = serde_json::from_slice(&value).map_err(|e| e.to_string())?;
    if doc.client_id != client_id || doc.expired(now_ms) {
        return Ok(None);
    }
    let filters = doc.replay_filters();
    let mut messages = Vec::new();
    if !filters.is_empty() {
        let subjects: Vec<String> = filters
            .iter()
            .flat_map(|f| subject::filter_subjects(space, f))
            .collect();
        let start_ms = doc.floor_ms.saturating_sub(FLOOR_MARGIN_MS);
        let start =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(start_ms) * 1_000_000)
                .map_err(|e| e.to_string())?;
        let stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subjects: subjects,
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if consumer.cached_info().num_pending > 0 {
            let mut msgs = consumer.messages().await.map_err(|e| e.to_string())?;
            let deadline = tokio::time::sleep(Duration::from_secs(4));
            tokio::pin!(deadline);
            loop {
                let m = tokio::select! {
                    m = msgs.next() => m,
                    _ = &mut deadline => return Err("replaying the session's messages took too long".into()),
                };
                let Some(m) = m else { break };
                let m = m.map_err(|e| e.to_string())?;
                let pending = m.info().map(|i| i.pending).unwrap_or(0);
                if let Ok(f) = frame::decode(m.message.payload.clone(), Instant::now()) {
                    let msg = f.message;
                    if filters
                        .iter()
                        .any(|flt| mqtt_codec::topic::matches(flt, &msg.topic))
                    {
                        messages.push(Arc::new(msg));
                    }
                }
                if pending == 0 {
                    break;
                }
            }
        }
    }
    Ok(Some((doc.record(), messages)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_and_replay_filters() {
        let doc = SessionDoc {
            node: "a".into(),
            floor_ms: 0,
            client_id: "c".into(),
            protocol_v5: true,
            expiry_interval: 60,
            disconnected_at_ms: Some(1_000),
            subscriptions: vec![
                SubscriptionDoc {
                    filter: "a/#".into(),
                    options: 1,
                    subscription_id: None,
                },
                SubscriptionDoc {
                    filter: "$share/g/b".into(),
                    options: 1,
                    subscription_id: Some(3),
                },
            ],
        };
        assert!(!doc.expired(60_999));
        assert!(doc.expired(61_000));
        assert_eq!(doc.replay_filters(), vec!["a/#"]);
        let back = SessionDoc::new("a", 0, &doc.record());
        assert_eq!(back, doc);
        let never = SessionDoc {
            expiry_interval: u32::MAX,
            ..doc
        };
        assert!(!never.expired(u64::MAX));
    }
}
