//! Device shadows over MQTT, following the AWS IoT topic convention under
//! the device's own namespace:
//!
//! | the device publishes | the platform answers on |
//! |---|---|
//! | `devices/{id}/shadow[/name/{name}]/get` | `…/get/accepted` (the document) or `…/get/rejected` |
//! | `devices/{id}/shadow[/name/{name}]/update` | `…/update/accepted`, `…/update/documents` (previous and current), `…/update/delta` (when desired changed and differs from reported), or `…/update/rejected` |
//!
//! Rejections carry `{"code", "message", "clientToken"}`: 400 bad request,
//! 404 no such shadow, 409 stale `version`, 413 too large. Every accepted
//! update — from the device here, or from an operator through the API
//! ([`publish_update`]) — publishes `accepted`, `documents` and, when desired
//! changed, `delta`, all at QoS 1: a device with a persistent session that
//! was offline gets the delta it missed when it returns, and one with a
//! clean session asks with `get` after subscribing. An MQTT 5 request's
//! correlation data is copied onto the answers.
//!
//! Requests are handled in arrival order, in batches of what is queued
//! (each accepted update is written to disk, off the async workers, before
//! it is answered), so two updates from one device are applied in the order
//! it sent them.

use m2mhub_broker::message::Message;
use m2mhub_broker::Broker;
use m2mhub_fleet::shadow::base_topic;
use m2mhub_fleet::{Fleet, RegistryError, ShadowChange, ShadowUpdate, ShadowWriter};
use mqtt_codec::{PublishProperties, QoS};
use serde_json::{json, Value};

/// Shadow requests queued for the handler at most; past this the broker
/// drops them and counts (the device's request times out and it retries).
const QUEUE: usize = 16_384;
/// Requests handled per trip to the blocking pool at most, so the first
/// answers of a long queue are not held back behind all of it.
const BATCH: usize = 64;

/// What a device asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Get,
    Update,
}

/// `devices/{id}/shadow[/name/{name}]/get|update` → (device, name, request);
/// `None` for any other topic (including the platform's own answers).
pub fn parse(topic: &str) -> Option<(&str, &str, Request)> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("shadow/")?;
    let (name, op) = match rest.strip_prefix("name/") {
        Some(named) => named.split_once('/')?,
        None => ("", rest),
    };
    if device.is_empty() || (name.is_empty() && rest.starts_with("name/")) {
        return None;
    }
    let request = match op {
        "get" => Request::Get,
        "update" => Request::Update,
        _ => return None,
    };
    Some((device, name, request))
}

/// Subscribe to every device's shadow requests and answer them until the
/// task is aborted (at shutdown).
pub fn serve(broker: Broker, fleet: Fleet) -> tokio::task::JoinHandle<()> {
    let mut rx = broker.subscribe_internal("devices/+/shadow/#", QUEUE);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // Whatever else is queued goes along: one trip to the blocking
            // pool per batch, not per request (under load the hand-off, a
            // futex wake and two context switches, cost as much as the
            // update itself).
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            // Our own answers, and other shadow topics.
            batch.retain(|m| parse(&m.topic).is_some());
            if batch.is_empty() {
                continue;
            }
            // The store write is synchronous: off the async workers, but
            // in arrival order so a device's updates keep their order.
            let f = fleet.clone();
            let answered = match tokio::task::spawn_blocking(move || {
                batch
                    .into_iter()
                    .map(|m| {
                        let a = answer(&f, &m);
                        (m, a)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "shadow requests failed");
                    continue;
                }
            };
            for (msg, answers) in answered {
                let props = answer_properties(&msg);
                for (topic, body) in answers {
                    send(&broker, &topic, &body, props.clone()).await;
                }
            }
        }
    })
}

/// The answers to one request: (topic, body) in publishing order.
fn answer(fleet: &Fleet, msg: &Message) -> Vec<(String, Value)> {
    let Some((device, name, request)) = parse(&msg.topic) else {
        return Vec::new();
    };
    let base = base_topic(device, name);
    // The device's tenant is the registry's: only registered devices have
    // shadows.
    let Some(tenant) = fleet.identity().ingest_info(device).map(|i| i.tenant) else {
        let reply = rejection(404, &format!("device {device} is not registered"), &None);
        return vec![(format!("{base}/{}/rejected", op_name(request)), reply)];
    };
    match request {
        Request::Get => {
            let token = client_token_of(&msg.payload);
            vec![match fleet.get_shadow(Some(&*tenant), device, name) {
                Ok(s) => (
                    format!("{base}/get/accepted"),
                    m2mhub_fleet::shadow::with_token(s.document(), &token),
                ),
                Err(e) => (format!("{base}/get/rejected"), reject(&e, &token)),
            }]
        }
        Request::Update => {
            let update: ShadowUpdate = match serde_json::from_slice(&msg.payload) {
                Ok(u) => u,
                Err(e) => {
                    let reply = rejection(
                        400,
                        &format!(
                            "the update must be JSON {{\"state\": {{\"desired\": {{…}}, \"reported\": {{…}}}}, \"version\": n, \"clientToken\": \"…\"}}: {e}"
                        ),
                        &client_token_of(&msg.payload),
                    );
                    return vec![(format!("{base}/update/rejected"), reply)];
                }
            };
            match fleet.update_shadow(&tenant, device, name, &update, ShadowWriter::Device) {
                Ok(change) => change.answers(&update),
                Err(e) => vec![(
                    format!("{base}/update/rejected"),
                    reject(&e, &update.client_token),
                )],
            }
        }
    }
}

fn op_name(r: Request) -> &'static str {
    match r {
        Request::Get => "get",
        Request::Update => "update",
    }
}

/// An MQTT 5 request's correlation data goes back on its answers.
fn answer_properties(msg: &Message) -> PublishProperties {
    PublishProperties {
        correlation_data: msg.properties.correlation_data.clone(),
        content_type: Some("application/json".into()),
        ..Default::default()
    }
}

/// Tell the device (and anyone watching its shadow topics) about an
/// accepted update made elsewhere (the API, a rule, a fleet-wide setting).
pub async fn publish_update(
    broker: &Broker,
    change: &ShadowChange,
    request: &ShadowUpdate,
    props: PublishProperties,
) {
    for (topic, body) in change.answers(request) {
        send(broker, &topic, &body, props.clone()).await;
    }
}

async fn send(broker: &Broker, topic: &str, body: &Value, props: PublishProperties) {
    let payload = bytes::Bytes::from(body.to_string());
    broker
        .publish_with(topic, payload, QoS::AtLeastOnce, false, props)
        .await;
}

fn client_token_of(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    v.get("clientToken")?.as_str().map(str::to_string)
}

/// The status code of a refused request, HTTP-style as AWS does.
pub fn status_of(e: &RegistryError) -> u16 {
    match e {
        RegistryError::NotFound(_) => 404,
        RegistryError::Conflict(m) if m.contains("version") => 409,
        RegistryError::Conflict(_) => 429,
        RegistryError::Validation(m) if m.contains("bytes, more than") => 413,
        RegistryError::Validation(_) | RegistryError::AlreadyExists(_) => 400,
        RegistryError::Unauthorized => 403,
        RegistryError::Storage(_) => 500,
        RegistryError::DiskFull(_) => 507,
    }
}

fn reject(e: &RegistryError, token: &Option<String>) -> Value {
    rejection(status_of(e), &e.to_string(), token)
}

fn rejection(code: u16, message: &str, token: &Option<String>) -> Value {
    m2mhub_fleet::shadow::with_token(json!({"code": code, "message": message}), token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_request_topics_are_parsed_and_answers_are_not() {
        assert_eq!(
            parse("devices/t1/shadow/get"),
            Some(("t1", "", Request::Get))
        );
        assert_eq!(
            parse("devices/t1/shadow/update"),
            Some(("t1", "", Request::Update))
        );
        assert_eq!(
            parse("devices/t1/shadow/name/cfg/update"),
            Some(("t1", "cfg", Request::Update))
        );
        for answer in [
            "devices/t1/shadow/get/accepted",
            "devices/t1/shadow/update/delta",
            "devices/t1/shadow/name/cfg/update/documents",
            "devices/t1/shadow/name//update",
            "devices//shadow/get",
            "devices/t1/telemetry",
            "devices/t1/shadow/delete",
        ] {
            assert_eq!(parse(answer), None, "{answer}");
        }
        assert_eq!(base_topic("t1", ""), "devices/t1/shadow");
        assert_eq!(base_topic("t1", "cfg"), "devices/t1/shadow/name/cfg");
    }
}
