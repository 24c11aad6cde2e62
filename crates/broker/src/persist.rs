//! Translation between the broker's in-memory state and the records of the
//! persistent store (`m2mhub-store`).

use crate::message::Message;
use crate::session::SessionState;
use m2mhub_broker_log::{StoredMessage, StoredSession, StoredSubscription};
use mqtt_codec::QoS;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Convert a monotonic deadline to wall-clock milliseconds for storage.
pub(crate) fn instant_to_unix_ms(t: Instant, now: Instant, now_ms: u64) -> u64 {
    if t >= now {
        now_ms + (t - now).as_millis() as u64
    } else {
        now_ms.saturating_sub((now - t).as_millis() as u64)
    }
}

pub(crate) fn unix_ms_to_instant(ms: u64, now: Instant, now_ms: u64) -> Instant {
    if ms >= now_ms {
        now + std::time::Duration::from_millis(ms - now_ms)
    } else {
        now.checked_sub(std::time::Duration::from_millis(now_ms - ms))
            .unwrap_or(now)
    }
}

pub(crate) fn to_stored(m: &Message) -> Arc<StoredMessage> {
    let now = Instant::now();
    let now_ms = unix_ms_now();
    let p = &m.properties;
    Arc::new(StoredMessage {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos: m.qos as u8,
        retain: m.retain,
        payload_format_indicator: p.payload_format_indicator,
        expires_at_ms: m.expires_at.map(|t| instant_to_unix_ms(t, now, now_ms)),
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
    })
}

pub(crate) fn from_stored(s: &StoredMessage, now: Instant, now_ms: u64) -> Message {
    Message {
        topic: s.topic.clone(),
        payload: s.payload.clone(),
        qos: QoS::from_u8(s.qos).unwrap_or(QoS::AtLeastOnce),
        retain: s.retain,
        properties: mqtt_codec::PublishProperties {
            payload_format_indicator: s.payload_format_indicator,
            content_type: s.content_type.clone(),
            response_topic: s.response_topic.clone(),
            correlation_data: s.correlation_data.clone(),
            user_properties: s.user_properties.clone(),
            ..Default::default()
        }
        .into(),
        expires_at: s
            .expires_at_ms
            .map(|ms| unix_ms_to_instant(ms, now, now_ms)),
        publisher: 0,
    }
}

pub(crate) fn session_record(client_id: &str, st: &SessionState) -> StoredSession {
    let now = Instant::now();
    let now_ms = unix_ms_now();
    StoredSession {
        client_id: client_id.to_string(),
        protocol_v5: st.protocol.is_v5(),
        expiry_interval: st.expiry_interval,
        disconnected_at_ms: st
            .disconnected_at
            .map(|t| instant_to_unix_ms(t, now, now_ms)),
        subscriptions: st
            .subscriptions
            .iter()
            .map(|(filter, rec)| StoredSubscription {
                filter: filter.clone(),
                options: rec.options.to_byte(),
                subscription_id: rec.sub_id,
            })
            .collect(),
    }
}
