//! Which devices are connected anywhere in the cluster, asked when it is
//! needed rather than kept: the OTA campaign ticker (one node per
//! campaign) tells a device its job only while it is online, and the
//! device may be connected to any node. The asking node publishes the
//! client ids it wants to know about on `{cluster}.online` (one per line)
//! with a reply inbox; every other node answers with those it holds a live
//! connection for. A node that does not answer in time counts as holding
//! none of them (its devices are told when they next ask for their job).

use crate::ClusterError;
use futures_util::StreamExt;
use m2mhub_broker::Broker;
use std::collections::HashSet;
use std::time::Duration;

/// How long the asking node waits for the other nodes' answers at most.
pub const PRESENCE_WAIT: Duration = Duration::from_millis(500);

pub(crate) fn subject(cluster: &str) -> String {
    format!("{cluster}.online")
}

/// Answer other nodes' questions with this node's connected clients.
pub(crate) async fn answer(
    nats: &async_nats::Client,
    cluster: &str,
    broker: Broker,
) -> Result<tokio::task::JoinHandle<()>, ClusterError> {
    let mut asks = nats
        .subscribe(subject(cluster))
        .await
        .map_err(|e| ClusterError::Nats(e.to_string()))?;
    let nats = nats.clone();
    Ok(tokio::spawn(async move {
        while let Some(m) = asks.next().await {
            let Some(reply) = m.reply else { continue };
            let Ok(ids) = std::str::from_utf8(&m.payload) else {
                continue;
            };
            let here: Vec<&str> = ids.lines().filter(|id| broker.is_online(id)).collect();
            if let Err(e) = nats.publish(reply, here.join("\n").into()).await {
                tracing::debug!(error = %e, "cannot answer a presence question");
            }
        }
    }))
}

/// Ask the `others` other nodes which of `ids` they hold.
pub(crate) async fn ask(
    nats: &async_nats::Client,
    cluster: &str,
    others: usize,
    ids: &[String],
) -> Result<HashSet<String>, ClusterError> {
    let mut out = HashSet::new();
    let ids: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| !id.is_empty() && !id.contains('\n'))
        .collect();
    if ids.is_empty() || others == 0 {
        return Ok(out);
    }
    let inbox = nats.new_inbox();
    let mut replies = nats
        .subscribe(inbox.clone())
        .await
        .map_err(|e| ClusterError::Nats(e.to_string()))?;
    nats.publish_with_reply(subject(cluster), inbox, ids.join("\n").into())
        .await
        .map_err(|e| ClusterError::Nats(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + PRESENCE_WAIT;
    let mut answered = 0;
    while answered < others {
        match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(m)) => {
                answered += 1;
                if let Ok(s) = std::str::from_utf8(&m.payload) {
                    out.extend(s.lines().filter(|l| !l.is_empty()).map(str::to_string));
                }
            }
            _ => break,
        }
    }
    let _ = replies.unsubscribe().await;
    Ok(out)
}
