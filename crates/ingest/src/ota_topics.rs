//! OTA firmware jobs over MQTT, and the timer that drives campaigns.
//!
//! | the device publishes | the platform answers on |
//! |---|---|
//! | `devices/{id}/ota/job/get` | `devices/{id}/ota/job`: the job (or `{"jobId": null}`) |
//! | `devices/{id}/ota/status` `{"jobId", "state", "progress", "reason", "version"}` | `…/ota/status/accepted` or `…/ota/status/rejected` `{"code", "message"}` |
//! | `devices/{id}/ota/chunk/get` `{"jobId", "chunk": n, "size": bytes}` | `devices/{id}/ota/chunk/{n}` (the bytes) or `…/ota/chunk/rejected` |
//!
//! The platform also publishes `devices/{id}/ota/job` by itself when a
//! device's turn comes (and when a job it was told of is cancelled), at
//! QoS 1. A job document names the image (`version`, `size`, `sha256`,
//! Ed25519 `signature` of the digest), a short-lived HTTP(S) download URL
//! (resumable with `Range`) and the chunk topic for devices without HTTP.
//! `state` in a report is one of `downloading` (with `progress` in
//! percent), `verifying`, `installing`, `succeeded` (with the running
//! `version`, which is also written to the device's shadow as
//! `reported.firmware.version`), `failed` (with `reason`) or `rejected`.
//!
//! A device may only fetch the image of a job it has been told of and not
//! yet finished.
//!
//! In a cluster ([`OtaCluster`]) every node answers its own devices'
//! requests from the shared store (fleet reads the job as stored and writes
//! conditionally), only the node holding a campaign's lease ticks it, asking
//! the other nodes which waiting devices they hold first, and images come
//! from the cluster's shared store into a cache file under this node's data
//! folder, checked against the artifact's SHA-256 before use.

use base64::Engine;
use m2mhub_broker::message::Message;
use m2mhub_broker::Broker;
use m2mhub_fleet::ota::{ArtifactFiles, Job, Notice, StatusReport};
use m2mhub_fleet::{Artifact, Fleet, JobState, RegistryError, ShadowUpdate, ShadowWriter};
use m2mhub_identity::now_ms;
use mqtt_codec::{PublishProperties, QoS};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A future the cluster adapter returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a cluster gives the OTA service (the binary adapts
/// `m2mhub_cluster::Cluster` and its leases to it; this crate knows no
/// NATS).
pub trait OtaCluster: Send + Sync {
    /// Whether this node drives the campaign (holds its lease) now.
    fn drives(&self, campaign_id: &str) -> bool;
    /// The campaigns not finished: this node wants a lease on each (and
    /// gets a share of them).
    fn want(&self, campaigns: BTreeSet<String>);
    /// Which of these devices are connected to another node.
    fn online_elsewhere(&self, ids: Vec<String>) -> BoxFuture<HashSet<String>>;
    /// Store an uploaded image for every node.
    fn put_image(&self, artifact_id: String, path: PathBuf) -> BoxFuture<Result<(), String>>;
    /// Copy an image into `dest`: `Ok(false)` when the store has none.
    fn fetch_image(&self, artifact_id: String, dest: PathBuf) -> BoxFuture<Result<bool, String>>;
    fn delete_image(&self, artifact_id: String) -> BoxFuture<Result<(), String>>;
}

/// Waiting devices a tick asks the other nodes about at most (one NATS
/// message of their ids).
const PRESENCE_LIMIT: usize = 4_000;

/// OTA requests queued at most; past this the broker drops them and counts.
const QUEUE: usize = 16_384;
/// Smallest chunk a device may ask for.
pub const MIN_CHUNK: usize = 256;

/// Signs and checks the short-lived download URLs of firmware images.
#[derive(Clone)]
pub struct DownloadUrls {
    key: ring::hmac::Key,
    /// `http://host:port` (no trailing slash) devices reach the API at.
    base: String,
    ttl_ms: i64,
}

impl DownloadUrls {
    pub fn new(secret: &[u8; 32], base: &str, ttl: Duration) -> DownloadUrls {
        DownloadUrls {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            base: base.trim_end_matches('/').to_string(),
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn message(artifact: &str, device: &str, job: &str, expires: i64) -> String {
        format!("ota-download\n{artifact}\n{device}\n{job}\n{expires}")
    }

    /// The URL `device` downloads `artifact` from for `job`, and when it
    /// stops working.
    pub fn url(&self, artifact: &str, device: &str, job: &str, now: i64) -> (String, i64) {
        let expires = now.saturating_add(self.ttl_ms);
        let tag = ring::hmac::sign(
            &self.key,
            Self::message(artifact, device, job, expires).as_bytes(),
        );
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref());
        (
            format!(
                "{}/api/v1/ota/download/{artifact}?device={}&job={}&expires={expires}&token={token}",
                self.base,
                encode(device),
                encode(job)
            ),
            expires,
        )
    }

    /// Whether `token` is this platform's for these values and not expired.
    pub fn check(
        &self,
        artifact: &str,
        device: &str,
        job: &str,
        expires: i64,
        token: &str,
        now: i64,
    ) -> Result<(), &'static str> {
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token) else {
            return Err("the download token is malformed");
        };
        ring::hmac::verify(
            &self.key,
            Self::message(artifact, device, job, expires).as_bytes(),
            &tag,
        )
        .map_err(|_| "the download token does not match this URL")?;
        if now >= expires {
            return Err("the download URL has expired: ask for the job again (`ota/job/get`) for a fresh one");
        }
        Ok(())
    }
}

/// Percent-encode what is not unreserved (ids are plain, but be safe).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the OTA service needs.
#[derive(Clone)]
pub struct OtaService {
    pub broker: Broker,
    pub fleet: Fleet,
    pub files: ArtifactFiles,
    pub urls: DownloadUrls,
    /// Largest chunk served over MQTT (a device may ask for less).
    pub max_chunk: usize,
    /// In a cluster: leases, presence and the shared images. `None`: one
    /// node, everything local, as it always was.
    pub cluster: Option<Arc<dyn OtaCluster>>,
    /// One image copied from the cluster at a time (two requests for an
    /// image not yet here wait for one copy).
    pub fetching: Arc<tokio::sync::Mutex<()>>,
}

impl OtaService {
    /// The file of an artifact's image on this node. In a cluster an image
    /// uploaded elsewhere is copied from the shared store on first use and
    /// its size and SHA-256 checked against the artifact's before it is
    /// put in place; alone, the file is where the upload put it.
    pub async fn image_path(&self, a: &Artifact) -> Result<PathBuf, String> {
        let path = self.files.path(&a.id);
        let Some(cluster) = &self.cluster else {
            return Ok(path);
        };
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let _one = self.fetching.lock().await;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let tmp = self.files.incoming();
        let fetched = cluster.fetch_image(a.id.clone(), tmp.clone()).await;
        let checked = match fetched {
            Ok(true) => {
                let (t, size, sha) = (tmp.clone(), a.size, a.sha256.clone());
                tokio::task::spawn_blocking(move || check_image(&t, size, &sha))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
            }
            Ok(false) => Err(format!("the cluster's image store has no image {}", a.id)),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let (f, t, id) = (self.files.clone(), tmp.clone(), a.id.clone());
        tokio::task::spawn_blocking(move || f.commit(&t, &id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot put the image in place: {e}"))?;
        tracing::info!(artifact = %a.id, size = a.size, "firmware image copied from the cluster");
        Ok(path)
    }

    /// [`OtaService::image_path`] from a blocking thread of the runtime.
    fn image_path_blocking(&self, a: &Artifact) -> Result<PathBuf, String> {
        if self.cluster.is_none() {
            return Ok(self.files.path(&a.id));
        }
        tokio::runtime::Handle::current().block_on(self.image_path(a))
    }
}

/// Whether the file at `path` is the image: `size` bytes whose SHA-256 is
/// `sha256` (hex).
fn check_image(path: &Path, size: u64, sha256: &str) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut n_total: u64 = 0;
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        hash.update(&buf[..n]);
    }
    let got: String = hash
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if n_total != size || got != sha256 {
        return Err(format!(
            "the image from the cluster is {n_total} bytes with SHA-256 {got}, not the artifact's {size} bytes with {sha256}: not used"
        ));
    }
    Ok(())
}

/// What a device asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    JobGet,
    Status,
    ChunkGet,
}

fn parse(topic: &str) -> Option<(&str, Request)> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    if device.is_empty() {
        return None;
    }
    let r = match rest {
        "ota/job/get" => Request::JobGet,
        "ota/status" => Request::Status,
        "ota/chunk/get" => Request::ChunkGet,
        _ => return None,
    };
    Some((device, r))
}

/// Answer device requests and tick campaigns every `tick` until aborted.
pub fn serve(svc: OtaService, tick: Duration) -> tokio::task::JoinHandle<()> {
    let mut rx = svc.broker.subscribe_internal("devices/+/ota/#", QUEUE);
    let svc = Arc::new(svc);
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    handle(&svc, &msg).await;
                }
                _ = timer.tick() => {
                    let notices = match svc.cluster.clone() {
                        None => {
                            let s = Arc::clone(&svc);
                            tokio::task::spawn_blocking(move || {
                                let broker = s.broker.clone();
                                s.fleet.ota_tick(now_ms(), &|d| broker.is_online(d))
                            })
                            .await
                        }
                        Some(c) => cluster_tick(&svc, c).await,
                    };
                    match notices {
                        Ok(Ok(n)) => notify(&svc, n).await,
                        Ok(Err(e)) => tracing::warn!(error = %e, "OTA tick failed; will retry"),
                        Err(e) => tracing::error!(error = %e, "OTA tick panicked"),
                    }
                }
            }
        }
    })
}

/// A tick in a cluster: the campaigns whose lease this node holds, with
/// the waiting devices' presence asked of every node first.
async fn cluster_tick(
    svc: &Arc<OtaService>,
    c: Arc<dyn OtaCluster>,
) -> Result<Result<Vec<Notice>, RegistryError>, tokio::task::JoinError> {
    c.want(svc.fleet.ota_unfinished());
    let waiting = svc
        .fleet
        .ota_waiting_devices(&|id| c.drives(id), PRESENCE_LIMIT);
    let (mut online, elsewhere): (HashSet<String>, Vec<String>) = {
        let (here, there): (Vec<String>, Vec<String>) =
            waiting.into_iter().partition(|d| svc.broker.is_online(d));
        (here.into_iter().collect(), there)
    };
    if !elsewhere.is_empty() {
        online.extend(c.online_elsewhere(elsewhere).await);
    }
    let s = Arc::clone(svc);
    tokio::task::spawn_blocking(move || {
        s.fleet
            .ota_tick_owned(now_ms(), &|d| online.contains(d), &|id| c.drives(id))
    })
    .await
}

/// Publish what a tick or an operator action decided.
pub async fn notify(svc: &OtaService, notices: Vec<Notice>) {
    for n in notices {
        let (device, body) = match &n {
            Notice::Job { job, artifact } => (job.device_id.clone(), job_doc(svc, job, artifact)),
            Notice::Cancelled { job } => (
                job.device_id.clone(),
                json!({"jobId": job.campaign_id, "state": "cancelled", "reason": job.reason}),
            ),
        };
        send(
            &svc.broker,
            &format!("devices/{device}/ota/job"),
            body,
            &PublishProperties::default(),
        )
        .await;
    }
}

/// The job document a device is told.
pub fn job_doc(svc: &OtaService, job: &Job, a: &Artifact) -> Value {
    let (url, expires) = svc
        .urls
        .url(&a.id, &job.device_id, &job.campaign_id, now_ms());
    json!({
        "jobId": job.campaign_id,
        "state": job.state.as_str(),
        "artifact": {
            "id": a.id,
            "name": a.name,
            "version": a.version,
            "size": a.size,
            "sha256": a.sha256,
            "signature": a.signature,
            "signatureAlgorithm": "ed25519-sha256",
            "signedBy": a.signed_by,
        },
        "url": url,
        "urlExpiresMs": expires,
        "chunkTopic": format!("devices/{}/ota/chunk/get", job.device_id),
        "chunkSize": svc.max_chunk,
    })
}

async fn handle(svc: &Arc<OtaService>, msg: &Message) {
    let Some((device, request)) = parse(&msg.topic) else {
        return; // our own answers
    };
    let device = device.to_string();
    let props = PublishProperties {
        correlation_data: msg.properties.correlation_data.clone(),
        ..Default::default()
    };
    let s = Arc::clone(svc);
    let payload = msg.payload.clone();
    let d = device.clone();
    let answer = tokio::task::spawn_blocking(move || answer(&s, &d, request, &payload)).await;
    let answers = match answer {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, topic = %msg.topic, "OTA request failed");
            return;
        }
    };
    for (topic, body, shadow) in answers {
        match body {
            Body::Json(v) => send(&svc.broker, &topic, v, &props).await,
            Body::Bytes(b) => {
                let p = PublishProperties {
                    content_type: Some("application/octet-stream".into()),
                    ..props.clone()
                };
                svc.broker
                    .publish_with(&topic, b, QoS::AtLeastOnce, false, p)
                    .await;
            }
        }
        if let Some((change, update)) = shadow {
            crate::shadow_topics::publish_update(
                &svc.broker,
                &change,
                &update,
                PublishProperties::default(),
            )
            .await;
        }
    }
}

/// The job and status requests of a device on a request protocol (CoAP):
/// the same answers as the MQTT topics give, as `(accepted, body)`. A
/// succeeded job's version goes into the shadow before the answer.
pub async fn device_request(
    svc: &Arc<OtaService>,
    device: &str,
    status_report: bool,
    payload: bytes::Bytes,
) -> (bool, Value) {
    let request = if status_report {
        Request::Status
    } else {
        Request::JobGet
    };
    let (s, d) = (Arc::clone(svc), device.to_string());
    let answers = match tokio::task::spawn_blocking(move || answer(&s, &d, request, &payload)).await
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "OTA request failed");
            return (false, json!({"code": 500, "message": "the request failed"}));
        }
    };
    let mut out = (false, json!({"jobId": null}));
    for (topic, body, shadow) in answers {
        if let Some((change, update)) = shadow {
            crate::shadow_topics::publish_update(
                &svc.broker,
                &change,
                &update,
                PublishProperties::default(),
            )
            .await;
        }
        if let Body::Json(v) = body {
            out = (!topic.ends_with("/rejected"), v);
        }
    }
    out
}

/// Why an image cannot be served over a request protocol.
#[derive(Debug)]
pub enum ImageRefusal {
    /// No such job for this device, or not in progress.
    NotYours(String),
    /// Larger than the protocol's limit: use the HTTP download URL.
    TooLarge {
        size: u64,
        limit: usize,
    },
    Io(String),
}

/// The whole image of a device's job in progress (`job_id`), at most
/// `limit` bytes (CoAP serves it in Block2 blocks).
pub fn job_image(
    svc: &OtaService,
    device: &str,
    job_id: &str,
    limit: usize,
) -> Result<Vec<u8>, ImageRefusal> {
    let a = svc
        .fleet
        .ota_artifact_for(device, job_id)
        .map_err(|e| ImageRefusal::NotYours(e.to_string()))?;
    if a.size > limit as u64 {
        return Err(ImageRefusal::TooLarge {
            size: a.size,
            limit,
        });
    }
    let path = svc.image_path_blocking(&a).map_err(ImageRefusal::Io)?;
    std::fs::read(path).map_err(|e| ImageRefusal::Io(e.to_string()))
}

enum Body {
    Json(Value),
    Bytes(bytes::Bytes),
}

type Answer = (
    String,
    Body,
    Option<(m2mhub_fleet::ShadowChange, ShadowUpdate)>,
);

fn answer(svc: &OtaService, device: &str, request: Request, payload: &[u8]) -> Vec<Answer> {
    let base = format!("devices/{device}/ota");
    let now = now_ms();
    match request {
        Request::JobGet => {
            let body = match svc.fleet.ota_job_for(device, now) {
                Ok(Some(Notice::Job { job, artifact })) => job_doc(svc, &job, &artifact),
                Ok(_) => json!({"jobId": null}),
                Err(e) => json!({"jobId": null, "code": code(&e), "message": e.to_string()}),
            };
            vec![(format!("{base}/job"), Body::Json(body), None)]
        }
        Request::Status => {
            let report: StatusReport = match serde_json::from_slice(payload) {
                Ok(r) => r,
                Err(e) => {
                    return vec![rejected(
                        &format!("{base}/status/rejected"),
                        400,
                        &format!("a status report is JSON {{\"jobId\": \"…\", \"state\": \"downloading|verifying|installing|succeeded|failed|rejected\", \"progress\": 0-100, \"reason\": \"…\", \"version\": \"…\"}}: {e}"),
                    )]
                }
            };
            match svc.fleet.ota_report(device, &report, now) {
                Ok((job, artifact)) => {
                    // The version goes into the shadow before the report is
                    // acknowledged.
                    let shadow = (job.state == JobState::Succeeded)
                        .then(|| record_version(svc, &job, &artifact))
                        .flatten();
                    vec![(
                        format!("{base}/status/accepted"),
                        Body::Json(
                            json!({"jobId": job.campaign_id, "state": job.state.as_str(), "reason": job.reason}),
                        ),
                        shadow,
                    )]
                }
                Err(e) => vec![rejected(
                    &format!("{base}/status/rejected"),
                    code(&e),
                    &e.to_string(),
                )],
            }
        }
        Request::ChunkGet => chunk(svc, device, payload),
    }
}

/// Write the version a device now runs into its shadow's reported state.
fn record_version(
    svc: &OtaService,
    job: &Job,
    a: &Artifact,
) -> Option<(m2mhub_fleet::ShadowChange, ShadowUpdate)> {
    let update: ShadowUpdate = serde_json::from_value(json!({
        "state": {"reported": {"firmware": {"version": a.version}}},
        "clientToken": job.campaign_id,
    }))
    .ok()?;
    match svc.fleet.update_shadow(
        &job.tenant,
        &job.device_id,
        "",
        &update,
        ShadowWriter::Device,
    ) {
        Ok(change) => Some((change, update)),
        Err(e) => {
            tracing::warn!(device = %job.device_id, error = %e, "could not record the firmware version in the shadow");
            None
        }
    }
}

fn chunk(svc: &OtaService, device: &str, payload: &[u8]) -> Vec<Answer> {
    let reject_topic = format!("devices/{device}/ota/chunk/rejected");
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ChunkGet {
        job_id: String,
        chunk: u64,
        size: Option<usize>,
    }
    let req: ChunkGet = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            return vec![rejected(
                &reject_topic,
                400,
                &format!(
                "a chunk request is JSON {{\"jobId\": \"…\", \"chunk\": n, \"size\": bytes}}: {e}"
            ),
            )]
        }
    };
    let size = req.size.unwrap_or(svc.max_chunk);
    if size < MIN_CHUNK || size > svc.max_chunk {
        return vec![rejected(
            &reject_topic,
            400,
            &format!("`size` must be {MIN_CHUNK} to {} bytes", svc.max_chunk),
        )];
    }
    let artifact = match svc.fleet.ota_artifact_for(device, &req.job_id) {
        Ok(a) => a,
        Err(e) => return vec![rejected(&reject_topic, code(&e), &e.to_string())],
    };
    let offset = req.chunk.saturating_mul(size as u64);
    if offset >= artifact.size {
        return vec![rejected(
            &reject_topic,
            416,
            &format!(
                "chunk {} of {size} bytes starts past the end of the {}-byte image",
                req.chunk, artifact.size
            ),
        )];
    }
    let len = (artifact.size - offset).min(size as u64) as usize;
    let read = svc
        .image_path_blocking(&artifact)
        .map_err(std::io::Error::other)
        .and_then(|p| read_at(&p, offset, len));
    match read {
        Ok(b) => vec![(
            format!("devices/{device}/ota/chunk/{}", req.chunk),
            Body::Bytes(b.into()),
            None,
        )],
        Err(e) => {
            tracing::error!(artifact = %artifact.id, error = %e, "cannot read a firmware image");
            vec![rejected(&reject_topic, 500, "the image cannot be read")]
        }
    }
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn rejected(topic: &str, code: u16, message: &str) -> Answer {
    (
        topic.to_string(),
        Body::Json(json!({"code": code, "message": message})),
        None,
    )
}

/// The status code of a refused request, HTTP-style.
fn code(e: &RegistryError) -> u16 {
    match e {
        RegistryError::NotFound(_) => 404,
        RegistryError::Conflict(_) | RegistryError::AlreadyExists(_) => 409,
        RegistryError::Validation(_) => 400,
        RegistryError::Unauthorized => 403,
        RegistryError::Storage(_) => 500,
        RegistryError::DiskFull(_) => 507,
    }
}

async fn send(broker: &Broker, topic: &str, body: Value, props: &PublishProperties) {
    let p = PublishProperties {
        content_type: Some("application/json".into()),
        ..props.clone()
    };
    broker
        .publish_with(
            topic,
            bytes::Bytes::from(body.to_string()),
            QoS::AtLeastOnce,
            false,
            p,
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_parsed_and_answers_are_not() {
        assert_eq!(
            parse("devices/t1/ota/job/get"),
            Some(("t1", Request::JobGet))
        );
        assert_eq!(
            parse("devices/t1/ota/status"),
            Some(("t1", Request::Status))
        );
        assert_eq!(
            parse("devices/t1/ota/chunk/get"),
            Some(("t1", Request::ChunkGet))
        );
        for t in [
            "devices/t1/ota/job",
            "devices/t1/ota/status/accepted",
            "devices/t1/ota/chunk/3",
            "devices//ota/status",
            "devices/t1/shadow/get",
        ] {
            assert_eq!(parse(t), None, "{t}");
        }
    }

    #[test]
    fn download_urls_are_signed_bound_and_expire() {
        let u = DownloadUrls::new(&[9; 32], "http://127.0.0.1:8080/", Duration::from_secs(60));
        let (url, exp) = u.url("fw-1", "dev 1", "ota-1", 1_000);
        assert!(url.starts_with("http://127.0.0.1:8080/api/v1/ota/download/fw-1?device=dev%201&job=ota-1&expires=61000&token="), "{url}");
        let token = url.rsplit("token=").next().unwrap();
        assert_eq!(u.check("fw-1", "dev 1", "ota-1", exp, token, 2_000), Ok(()));
        assert!(u
            .check("fw-1", "dev 1", "ota-1", exp, token, 61_000)
            .is_err());
        assert!(u
            .check("fw-2", "dev 1", "ota-1", exp, token, 2_000)
            .is_err());
        assert!(u
            .check("fw-1", "dev 2", "ota-1", exp, token, 2_000)
            .is_err());
        assert!(u
            .check("fw-1", "dev 1", "ota-1", exp + 1, token, 2_000)
            .is_err());
        let other = DownloadUrls::new(&[8; 32], "http://x", Duration::from_secs(60));
        assert!(other
            .check("fw-1", "dev 1", "ota-1", exp, token, 2_000)
            .is_err());
    }
}
