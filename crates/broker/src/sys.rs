//! `$SYS/broker/…` statistics, published as retained messages at a fixed
//! interval so any client can watch the broker with a plain subscription.

use crate::broker::Broker;
use bytes::Bytes;
use mqtt_codec::QoS;
use std::sync::atomic::Ordering;

pub(crate) fn spawn(broker: Broker) {
    let interval = broker.config().sys_interval;
    let mut shutdown = broker.shutdown_signal();
    let weak = std::sync::Arc::downgrade(&broker.inner);
    drop(broker);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let Some(inner) = weak.upgrade() else { return };
            let broker = Broker { inner };
            publish_stats(&broker).await;
        }
    });
}

async fn publish_stats(broker: &Broker) {
    let g = broker.gauges();
    let m = &broker.inner.metrics;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed).to_string();
    let stats: Vec<(&str, String)> = vec![
        (
            "$SYS/broker/version",
            format!("m2mhub {}", env!("CARGO_PKG_VERSION")),
        ),
        ("$SYS/broker/uptime", format!("{} seconds", g.uptime_secs)),
        ("$SYS/broker/clients/connected", g.connections.to_string()),
        ("$SYS/broker/clients/total", g.sessions.to_string()),
        (
            "$SYS/broker/subscriptions/count",
            g.subscriptions.to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            g.retained.to_string(),
        ),
        ("$SYS/broker/messages/received", load(&m.messages_received)),
        ("$SYS/broker/messages/sent", load(&m.messages_sent)),
        (
            "$SYS/broker/messages/dropped",
            load(&m.messages_dropped_queue_full),
        ),
        ("$SYS/broker/bytes/received", load(&m.bytes_received)),
        ("$SYS/broker/bytes/sent", load(&m.bytes_sent)),
    ];
    for (topic, value) in stats {
        broker
            .publish(topic, Bytes::from(value), QoS::AtMostOnce, true)
            .await;
    }
}
