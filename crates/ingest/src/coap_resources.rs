//! The CoAP front door for devices: the resources a constrained device
//! uses, answered with the same identity, pipeline and fleet operations as
//! MQTT and HTTP.
//!
//! On CoAPS (DTLS 1.2 with a per-device pre-shared key) the session's key
//! names the device and paths are the resources themselves
//! (`coaps://host/telemetry`). On plain CoAP (only when configured) a
//! request names its device and token secret in the path, ThingsBoard-
//! style, so a device needs no other state:
//! `coap://host/{device_id}/{token_secret}/{resource}`. Every plain
//! request is authenticated by the broker's authenticator
//! ([`Broker::authenticate_request`]: registry check, bans, failure
//! counting, audit `coap.auth`), then authorized like the device's MQTT
//! topic for that resource.
//!
//! Resources (relative to the prefix):
//!
//! | resource | method | what |
//! |---|---|---|
//! | `telemetry` | POST, PUT | readings: SenML+CBOR (112), SenML+JSON (110), CBOR (60), JSON (50), text numbers (0); 2.04 once durable |
//! | `commands` | GET (+Observe) | the oldest undelivered command (2.05, JSON; empty payload: none); observers are told each new command |
//! | `commands/{cid}` | POST, PUT | the device's answer (JSON; `"status":"failed"` fails it) |
//! | `shadow[/{name}]` | GET (+Observe), POST, PUT, PATCH | the shadow document; an update (`{"state":{"reported":…}}`); observers get each delta |
//! | `ota` | GET, POST | the device's firmware job (the MQTT job document; `{"jobId": null}`: none); POST a status report |
//! | `ota/{job}` | GET | the job's image, in Block2 blocks (images up to `max_image`; larger: the job's HTTP URL) |
//!
//! Large uploads arrive in Block1 blocks and large answers leave in Block2
//! blocks (the CoAP layer reassembles and slices). Codes: 4.00 bad input
//! (the reason in the payload), 4.01 unknown device or wrong secret, 4.03
//! refused (disabled, banned, policy), 4.04 unknown resource, 4.15 unknown
//! content format, 5.03 the store cannot take it now (with Max-Age).

use crate::pipeline::{Ingest, Invalid, Outcome, Refusal};
use m2mhub_broker::auth::{ClientIdentity, ConnectInfo};
use m2mhub_broker::Broker;
use m2mhub_coap::message::content_format as cf;
use m2mhub_coap::{Code, Handler, Notifier, Request, Response};
use m2mhub_fleet::{CommandUpdate, Fleet, ShadowUpdate, ShadowWriter};
use mqtt_codec::{reason, PublishProperties, QoS};
use serde_json::{json, Value};
use std::sync::Arc;

/// What the CoAP resources need.
#[derive(Clone)]
pub struct CoapResources {
    pub broker: Broker,
    pub ingest: Arc<Ingest>,
    pub fleet: Fleet,
    /// Devices that registered to observe their commands, and when: only
    /// their commands are taken (marked delivered) to be pushed; anyone
    /// else's stay for MQTT, HTTP polls or a later GET. Shared by the CoAP
    /// and CoAPS listeners.
    pub observing: Arc<parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
    /// Firmware jobs and images (`ota`, `ota/{job}`), when OTA runs.
    pub ota: Option<Arc<crate::ota_topics::OtaService>>,
    /// The largest image served over CoAP (larger ones: the HTTP URL).
    pub max_image: usize,
}

/// A command observation counts as live this long after its registration
/// (a device re-registers when it wakes; the CoAP layer drops observers
/// whose confirmable notifications go unanswered).
const OBSERVATION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);
/// Bound on the observing table.
const MAX_OBSERVING: usize = 100_000;

impl CoapResources {
    pub fn new(broker: Broker, ingest: Arc<Ingest>, fleet: Fleet) -> CoapResources {
        CoapResources {
            broker,
            ingest,
            fleet,
            observing: Arc::default(),
            ota: None,
            max_image: 1024 * 1024,
        }
    }

    fn observes_commands(&self, device: &str) -> bool {
        self.observing
            .lock()
            .get(device)
            .is_some_and(|t| t.elapsed() < OBSERVATION_LIFETIME)
    }
}

/// Observers of a device's commands are registered under this key.
fn commands_key(device: &str) -> String {
    format!("cmd/{device}")
}

/// Observers of a device's shadow `name` (`""`: the classic one).
fn shadow_key(device: &str, name: &str) -> String {
    format!("shadow/{device}/{name}")
}

/// A CoAP Content-Format as the media type the decoders know.
fn media_type(content_format: Option<u16>) -> Result<Option<&'static str>, Response> {
    Ok(match content_format {
        None => None,
        Some(cf::TEXT_PLAIN) => Some("text/plain"),
        Some(cf::JSON) => Some("application/json"),
        Some(cf::CBOR) => Some("application/cbor"),
        Some(cf::SENML_JSON) => Some("application/senml+json"),
        Some(cf::SENML_CBOR) => Some("application/senml+cbor"),
        Some(other) => {
            return Err(text(
                Code::UNSUPPORTED_CONTENT_FORMAT,
                &format!("content format {other} is not read; use 112 (SenML+CBOR), 110 (SenML+JSON), 60 (CBOR), 50 (JSON) or 0 (text)"),
            ))
        }
    })
}

/// An error answer with its reason as text (a diagnostic payload, RFC 7252
/// §5.5.2).
fn text(code: Code, why: &str) -> Response {
    let mut r = Response::new(code);
    r.content_format = Some(cf::TEXT_PLAIN);
    r.payload = bytes::Bytes::from(why.to_string());
    r
}

fn json_content(v: &Value) -> Response {
    Response::content(cf::JSON, v.to_string())
}

fn unavailable(why: &str) -> Response {
    let mut r = text(Code::SERVICE_UNAVAILABLE, why);
    r.max_age = Some(5);
    r
}

fn refused(r: Refusal) -> Response {
    match r {
        Refusal::DiskFull => unavailable("the platform's disk is full; retry later"),
        Refusal::Storage => unavailable("the readings could not be stored; retry later"),
    }
}

/// The authenticated device of a request, and the rest of its path.
struct Caller {
    device: Arc<str>,
    tenant: Arc<str>,
    identity: Arc<ClientIdentity>,
}

impl CoapResources {
    /// Authenticate `/{device}/{secret}/…`; the rest of the path on success.
    fn authenticate<'r>(&self, req: &'r Request) -> Result<(Caller, &'r [String]), Response> {
        // CoAPS: the session's pre-shared key already named the device.
        if let Some(device) = &req.identity {
            let d = self
                .ingest
                .registry
                .get_device(device)
                .map_err(|_| text(Code::FORBIDDEN, "the key's device no longer exists"))?;
            if !d.enabled {
                return Err(text(Code::FORBIDDEN, "the device is disabled"));
            }
            let identity = Arc::new(ClientIdentity {
                username: None,
                device_id: Some(Arc::from(d.id.as_str())),
                tenant: Some(Arc::from(d.tenant.as_str())),
                group: d.group.as_deref().map(Arc::from),
                claim: None,
                internal: false,
            });
            return Ok((
                Caller {
                    device: Arc::from(d.id.as_str()),
                    tenant: Arc::from(d.tenant.as_str()),
                    identity,
                },
                &req.path,
            ));
        }
        let [device, secret, rest @ ..] = req.path.as_slice() else {
            return Err(text(
                Code::UNAUTHORIZED,
                "name the device and its token secret in the path: /{device_id}/{secret}/telemetry",
            ));
        };
        let info = ConnectInfo {
            client_id: device,
            username: Some(device),
            password: Some(secret.as_bytes()),
            peer: req.peer,
            transport: "coap",
            tls: None,
        };
        match self.broker.authenticate_request(&info) {
            Ok(identity) => match (identity.device_id.clone(), identity.tenant.clone()) {
                (Some(d), Some(t)) if &*d == device.as_str() => Ok((
                    Caller {
                        device: d,
                        tenant: t,
                        identity,
                    },
                    rest,
                )),
                _ => Err(text(Code::FORBIDDEN, "this credential is not the device's")),
            },
            Err(reason::BAD_USER_NAME_OR_PASSWORD) => {
                Err(text(Code::UNAUTHORIZED, "unknown device or wrong secret"))
            }
            Err(reason::BANNED) => Err(text(Code::FORBIDDEN, "banned for now")),
            Err(reason::SERVER_UNAVAILABLE) => Err(unavailable("the registry cannot answer now")),
            Err(code) => Err(text(
                Code::FORBIDDEN,
                &format!(
                    "refused: {} (disabled device, or expired or revoked credential)",
                    reason::name(code)
                ),
            )),
        }
    }

    fn may_publish(&self, c: &Caller, topic: &str) -> Result<(), Response> {
        if self.broker.may_publish(&c.device, &c.identity, topic) {
            Ok(())
        } else {
            Err(text(Code::FORBIDDEN, "not allowed by the device's policy"))
        }
    }

    async fn telemetry(&self, c: &Caller, req: &Request) -> Response {
        let topic = format!("devices/{}/telemetry", c.device);
        if let Err(r) = self.may_publish(c, &topic) {
            return r;
        }
        if req.payload.is_empty() {
            return text(
                Code::BAD_REQUEST,
                "no payload: send readings, e.g. SenML+CBOR",
            );
        }
        let mime = match media_type(req.content_format) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let durable = match self
            .ingest
            .ingest(Some(&c.tenant), &c.device, mime, &req.payload, true)
        {
            Outcome::Done => None,
            Outcome::Pending(d) => Some(d),
            Outcome::Refused(r) => return refused(r),
            Outcome::Invalid(Invalid::UnsupportedType(why)) => {
                return text(Code::UNSUPPORTED_CONTENT_FORMAT, &why)
            }
            Outcome::Invalid(Invalid::Undecodable(why)) => return text(Code::BAD_REQUEST, &why),
        };
        // Routed like the device's own MQTT publish (rules, subscribers).
        let props = PublishProperties {
            content_type: mime.map(str::to_string),
            ..Default::default()
        };
        self.broker
            .publish_with(&topic, req.payload.clone(), QoS::AtMostOnce, false, props)
            .await;
        if let Some(d) = durable {
            if let Err(r) = d.await {
                return refused(r);
            }
        }
        Response::new(Code::CHANGED)
    }

    fn next_command(&self, c: &Caller, req: &Request) -> Response {
        let body = match self.fleet.take_next_command(&c.device) {
            Some(cmd) => json!({"id": cmd.id, "name": cmd.name, "params": cmd.params}).to_string(),
            None => String::new(),
        };
        let r = Response::content(cf::JSON, body);
        let mut observing = self.observing.lock();
        if req.observe {
            if observing.len() >= MAX_OBSERVING {
                observing.retain(|_, t| t.elapsed() < OBSERVATION_LIFETIME);
            }
            observing.insert(c.device.to_string(), std::time::Instant::now());
            r.with_observe(commands_key(&c.device))
        } else {
            // A plain GET (or a deregistration): no longer pushed to.
            observing.remove(&*c.device);
            r
        }
    }

    fn answer_command(&self, c: &Caller, cid: &str, req: &Request) -> Response {
        let answer: Value = if req.payload.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&req.payload) {
                Ok(v) => v,
                Err(e) => return text(Code::BAD_REQUEST, &format!("the answer must be JSON: {e}")),
            }
        };
        match self.fleet.get_command(cid) {
            Ok(cmd) if *cmd.device_id == *c.device => {}
            _ => return text(Code::NOT_FOUND, "no such command for this device"),
        }
        match self
            .fleet
            .update_command(cid, CommandUpdate::answer(answer))
        {
            Ok(Some(_)) => Response::new(Code::CHANGED),
            Ok(None) => text(Code::PRECONDITION_FAILED, "the command is already finished"),
            Err(e) => text(Code::BAD_REQUEST, &e.to_string()),
        }
    }

    async fn shadow(&self, c: &Caller, name: &str, req: &Request) -> Response {
        if req.method == Code::GET {
            return match self.fleet.get_shadow(Some(&c.tenant), &c.device, name) {
                Ok(s) => {
                    let r = json_content(&s.document());
                    if req.observe {
                        r.with_observe(shadow_key(&c.device, name))
                    } else {
                        r
                    }
                }
                Err(e) => text(Code::NOT_FOUND, &e.to_string()),
            };
        }
        let update: ShadowUpdate = match serde_json::from_slice(&req.payload) {
            Ok(u) => u,
            Err(e) => {
                return text(
                    Code::BAD_REQUEST,
                    &format!("the update must be JSON {{\"state\": {{\"reported\": {{…}}}}, \"version\": n}}: {e}"),
                )
            }
        };
        match self
            .fleet
            .update_shadow(&c.tenant, &c.device, name, &update, ShadowWriter::Device)
        {
            Ok(change) => {
                // Subscribers of the MQTT shadow topics hear of it too.
                crate::shadow_topics::publish_update(
                    &self.broker,
                    &change,
                    &update,
                    PublishProperties::default(),
                )
                .await;
                json_content(&change.current.document())
            }
            Err(m2mhub_identity::RegistryError::Conflict(why)) => {
                text(Code::PRECONDITION_FAILED, &why)
            }
            Err(e) => text(Code::BAD_REQUEST, &e.to_string()),
        }
    }

    async fn ota_job(&self, c: &Caller, req: &Request) -> Response {
        let Some(ota) = &self.ota else {
            return text(
                Code::NOT_FOUND,
                "firmware updates are not running on this server",
            );
        };
        let report = req.method == Code::POST;
        let (accepted, body) =
            crate::ota_topics::device_request(ota, &c.device, report, req.payload.clone()).await;
        match (report, accepted) {
            (false, _) => json_content(&body),
            (true, true) => {
                let mut r = json_content(&body);
                r.code = Code::CHANGED;
                r
            }
            (true, false) => {
                let mut r = json_content(&body);
                r.code = Code::BAD_REQUEST;
                r
            }
        }
    }

    async fn ota_image(&self, c: &Caller, job: &str) -> Response {
        let Some(ota) = self.ota.clone() else {
            return text(
                Code::NOT_FOUND,
                "firmware updates are not running on this server",
            );
        };
        let (device, job, limit) = (c.device.to_string(), job.to_string(), self.max_image);
        let image = tokio::task::spawn_blocking(move || {
            crate::ota_topics::job_image(&ota, &device, &job, limit)
        })
        .await;
        use crate::ota_topics::ImageRefusal;
        match image {
            Ok(Ok(bytes)) => Response::content(cf::OCTET_STREAM, bytes),
            Ok(Err(ImageRefusal::NotYours(why))) => text(Code::NOT_FOUND, &why),
            Ok(Err(ImageRefusal::TooLarge { size, limit })) => text(
                Code::REQUEST_ENTITY_TOO_LARGE,
                &format!("the image is {size} bytes; CoAP serves up to {limit}: download it from the job's url"),
            ),
            Ok(Err(ImageRefusal::Io(why))) => {
                tracing::error!(error = %why, "reading a firmware image failed");
                unavailable("the image cannot be read now")
            }
            Err(_) => unavailable("the image cannot be read now"),
        }
    }

    /// Watch the broker for what CoAP observers wait for (new commands,
    /// shadow deltas) and notify them through every listener's notifier.
    pub fn start_notifications(&self, notifiers: Vec<Notifier>) {
        let (id, mut rx) = self.broker.observer(4096);
        self.broker.set_observed(
            id,
            &[
                "devices/+/commands".to_string(),
                "devices/+/shadow/update/delta".to_string(),
                "devices/+/shadow/name/+/update/delta".to_string(),
            ],
        );
        let fleet = self.fleet.clone();
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let levels: Vec<&str> = msg.topic.split('/').collect();
                let (key, payload) = match levels.as_slice() {
                    ["devices", device, "commands"] => {
                        // Only for a device that observes its commands.
                        // Take it now: the notification carries it, so it
                        // is delivered (NON notifications may be lost; a
                        // device that misses one GETs `commands`).
                        if !this.observes_commands(device) {
                            continue;
                        }
                        let Some(cmd) = fleet.take_next_command(device) else {
                            continue;
                        };
                        (
                            commands_key(device),
                            json!({"id": cmd.id, "name": cmd.name, "params": cmd.params})
                                .to_string()
                                .into_bytes(),
                        )
                    }
                    ["devices", device, "shadow", "update", "delta"] => {
                        (shadow_key(device, ""), msg.payload.to_vec())
                    }
                    ["devices", device, "shadow", "name", name, "update", "delta"] => {
                        (shadow_key(device, name), msg.payload.to_vec())
                    }
                    _ => continue,
                };
                for n in &notifiers {
                    if let Err(e) = n.notify(key.clone(), payload.clone(), Some(cf::JSON)) {
                        tracing::debug!(error = %e, "CoAP notification dropped");
                    }
                }
            }
        });
    }
}

impl Handler for CoapResources {
    async fn handle(&self, req: Request) -> Response {
        let (caller, rest) = match self.authenticate(&req) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let m = req.method;
        let post_or_put = m == Code::POST || m == Code::PUT || m == Code::new(0, 6);
        match rest {
            [r] if r == "telemetry" && post_or_put => self.telemetry(&caller, &req).await,
            [r] if r == "commands" && m == Code::GET => self.next_command(&caller, &req),
            [r, cid] if r == "commands" && post_or_put => self.answer_command(&caller, cid, &req),
            [r] if r == "shadow" && (m == Code::GET || post_or_put) => {
                self.shadow(&caller, "", &req).await
            }
            [r, name] if r == "shadow" && (m == Code::GET || post_or_put) => {
                self.shadow(&caller, name, &req).await
            }
            [r] if r == "ota" && (m == Code::GET || m == Code::POST) => {
                self.ota_job(&caller, &req).await
            }
            [r, job] if r == "ota" && m == Code::GET => self.ota_image(&caller, job).await,
            [r, ..] if ["telemetry", "commands", "shadow", "ota"].contains(&r.as_str()) => {
                Response::new(Code::METHOD_NOT_ALLOWED)
            }
            _ => text(
                Code::NOT_FOUND,
                "resources: telemetry, commands, commands/{id}, shadow, shadow/{name}, ota, ota/{job}",
            ),
        }
    }
}
