//! OTA firmware through HTTP: artifacts (uploaded streamed to disk, hashed
//! and signed on the way in; immutable), campaigns (create, watch, pause,
//! resume, cancel) and the device download endpoint (authorized by a
//! short-lived signed URL, resumable with `Range`).
//!
//! The campaign engine and the device side over MQTT are in
//! `m2mhub_fleet::ota` and `m2mhub_ingest::ota_topics`.

use crate::caller::Caller;
use crate::devices::audit;
use crate::problem::{bad_json, bad_query, Problem};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures_util::StreamExt;
use m2mhub_fleet::ota::{tally, Artifact, Campaign, Job, JobState, NewCampaign, SignedBy};
use m2mhub_identity::{now_ms, Role, DEFAULT_TENANT};
use m2mhub_ingest::ota_topics::OtaService;
use m2mhub_pki::FirmwareSigner;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Bytes read from disk per step of a download: 1,000 concurrent
/// downloads hold at most this much each.
const READ_STEP: usize = 16 * 1024;
/// Failed and rejected jobs listed in a campaign view at most.
const FAILURES_SHOWN: usize = 100;

/// Image bytes read from disk and not yet written to a socket, across all
/// downloads at once. HTTP/1 buffers up to ~400 KiB per connection before
/// it stops asking for more, so without this a thousand devices downloading
/// at once would hold ~400 MiB; with it the server holds this much.
pub const DOWNLOAD_BUDGET: usize = 32 << 20;

/// What the OTA routes need beyond the shared state.
pub struct OtaApi {
    pub service: OtaService,
    pub signer: Arc<FirmwareSigner>,
    /// Largest image accepted.
    pub max_artifact_bytes: u64,
    /// Permits for [`DOWNLOAD_BUDGET`] bytes, held by each chunk until
    /// the connection has written it.
    pub download_budget: Arc<tokio::sync::Semaphore>,
    /// `http.public_url` when configured: the base of the URLs devices are
    /// given (diagnostics uploads use it too).
    pub public_url: Option<String>,
    /// Reads from image files under way at most (see [`READ_SLOTS`]).
    pub read_slots: Arc<tokio::sync::Semaphore>,
}

/// Image reads on blocking threads at once: the page cache answers in
/// microseconds, and each concurrent read would otherwise be one more
/// thread (with its own allocator heap) in the blocking pool.
pub const READ_SLOTS: usize = 4;

/// A chunk of a download, holding its share of the budget until dropped
/// (when the HTTP connection has written it out).
struct Chunk {
    data: Vec<u8>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

fn ota(state: &AppState) -> Result<&OtaApi, Problem> {
    state.ota.as_deref().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-enabled",
            "OTA is not enabled on this server",
        )
    })
}

fn internal(what: &str, e: impl std::fmt::Display) -> Problem {
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{what}: {e}"),
    )
}

/// `GET /ota/public-key`: the key devices pin to verify images.
pub async fn public_key(State(state): State<AppState>) -> Result<Json<Value>, Problem> {
    let o = ota(&state)?;
    Ok(Json(json!({
        "algorithm": "ed25519",
        "signs": "the SHA-256 digest of the image",
        "publicKey": o.signer.public_key_base64(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    tenant: Option<String>,
    name: String,
    version: String,
    hardware: Option<String>,
    profile: Option<String>,
    /// An external Ed25519 signature of the image's SHA-256 (base64);
    /// absent: the platform signs.
    signature: Option<String>,
    /// The external signer's raw public key (base64), to check `signature`
    /// against before accepting the image.
    public_key: Option<String>,
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>, Problem> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-parameter",
                format!("`{what}` is not base64: {e}"),
            )
        })
}

/// `POST /ota/artifacts?name=&version=…` with the image as the body.
pub async fn upload(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<UploadQuery>, QueryRejection>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let o = ota(&state)?;
    let Query(q) = q.map_err(bad_query)?;
    let tenant = caller
        .scope(q.tenant.as_deref())?
        .unwrap_or_else(|| DEFAULT_TENANT.into());
    if !state.registry.has_tenant(&tenant) {
        return Err(m2mhub_identity::RegistryError::NotFound(format!("tenant {tenant}")).into());
    }
    let external = match &q.signature {
        Some(sig) => {
            let sig = b64("signature", sig)?;
            if sig.len() != 64 {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-parameter",
                    "`signature` must be 64 bytes (Ed25519)",
                ));
            }
            let key = q
                .public_key
                .as_deref()
                .map(|k| b64("public_key", k))
                .transpose()?;
            Some((sig, key))
        }
        None => None,
    };
    // Stream to a temporary file, hashing on the way; never whole in memory.
    let files = &o.service.files;
    let tmp = files.incoming();
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| internal("cannot create the upload file", e))?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    let outcome: Result<(), Problem> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "upload-interrupted",
                    format!("the upload stopped: {e}"),
                )
            })?;
            size += chunk.len() as u64;
            if size > o.max_artifact_bytes {
                return Err(Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too-large",
                    format!(
                        "images are at most {} bytes (`ota.max_artifact_bytes`)",
                        o.max_artifact_bytes
                    ),
                ));
            }
            hash.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| internal("cannot write the upload", e))?;
        }
        if size == 0 {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "empty",
                "the image is empty: send it as the request body",
            ));
        }
        file.flush()
            .await
            .map_err(|e| internal("cannot write the upload", e))?;
        Ok(())
    }
    .await;
    drop(file);
    if let Err(p) = outcome {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(p);
    }
    let digest: [u8; 32] = hash
        .finish()
        .as_ref()
        .try_into()
        .map_err(|e| internal("SHA-256", e))?;
    let (signature, signed_by) = match external {
        Some((sig, key)) => {
            if let Some(key) = key {
                if !m2mhub_pki::verify_firmware(&key, &digest, &sig) {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "bad-signature",
                        "`signature` does not verify against `public_key` for this image",
                    ));
                }
            }
            (sig, SignedBy::External)
        }
        None => (o.signer.sign_digest(&digest).to_vec(), SignedBy::Platform),
    };
    let artifact = Artifact {
        id: state.fleet.new_artifact_id(),
        tenant,
        name: q.name,
        version: q.version,
        hardware: q.hardware,
        profile: q.profile,
        size,
        sha256: hex(&digest),
        signature: base64::engine::general_purpose::STANDARD.encode(signature),
        signed_by,
        created_ms: now_ms(),
        created_by: caller.username.clone(),
    };
    // The file goes into place first: a crash between the two leaves an
    // unreferenced file, never a record without its image.
    let f = files.clone();
    let (t, id) = (tmp.clone(), artifact.id.clone());
    tokio::task::spawn_blocking(move || f.commit(&t, &id))
        .await
        .map_err(|e| internal("upload", e))?
        .map_err(|e| internal("cannot store the image", e))?;
    // In a cluster the image goes to the shared store before the record
    // exists, so no node ever sees an artifact whose image it cannot get.
    if let Some(cluster) = &o.service.cluster {
        if let Err(e) = cluster
            .put_image(artifact.id.clone(), files.path(&artifact.id))
            .await
        {
            let _ = tokio::fs::remove_file(files.path(&artifact.id)).await;
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster-unavailable",
                format!("cannot store the image for the cluster's other nodes: {e}"),
            ));
        }
    }
    let fleet = state.fleet.clone();
    let a = artifact.clone();
    let added = tokio::task::spawn_blocking(move || fleet.add_artifact(a))
        .await
        .map_err(|e| internal("upload", e))?;
    let artifact = match added {
        Ok(a) => a,
        Err(e) => {
            let _ = tokio::fs::remove_file(files.path(&artifact.id)).await;
            if let Some(cluster) = &o.service.cluster {
                let _ = cluster.delete_image(artifact.id.clone()).await;
            }
            return Err(e.into());
        }
    };
    audit(
        &state,
        &caller,
        "ota.artifact.upload",
        &artifact.id,
        json!({"name": artifact.name, "version": artifact.version, "size": artifact.size,
               "sha256": artifact.sha256, "signed_by": artifact.signed_by}),
    );
    Ok((StatusCode::CREATED, Json(json!(artifact))))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    tenant: Option<String>,
}

pub async fn list_artifacts(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    ota(&state)?;
    let Query(q) = q.map_err(bad_query)?;
    let tenant = caller.scope(q.tenant.as_deref())?;
    Ok(Json(
        json!({"items": state.fleet.list_artifacts(tenant.as_deref())}),
    ))
}

pub async fn show_artifact(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    ota(&state)?;
    Ok(Json(json!(state
        .fleet
        .get_artifact(caller.tenant.as_deref(), &id)?)))
}

pub async fn delete_artifact(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let o = ota(&state)?;
    let a = state.fleet.delete_artifact(caller.tenant.as_deref(), &id)?;
    if let Err(e) = tokio::fs::remove_file(o.service.files.path(&a.id)).await {
        if o.service.cluster.is_none() || e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(artifact = %a.id, error = %e, "cannot remove the image file");
        }
    }
    // The other nodes drop their copies when they reload the artifacts.
    if let Some(cluster) = &o.service.cluster {
        if let Err(e) = cluster.delete_image(a.id.clone()).await {
            tracing::warn!(artifact = %a.id, error = %e, "cannot delete the image from the cluster's store");
        }
    }
    audit(
        &state,
        &caller,
        "ota.artifact.delete",
        &id,
        json!({"name": a.name, "version": a.version}),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// Whether this node drives the campaign: always alone; in a cluster,
/// while it holds the campaign's lease.
fn driven_here(o: &OtaApi, campaign_id: &str) -> bool {
    o.service
        .cluster
        .as_ref()
        .is_none_or(|c| c.drives(campaign_id))
}

/// A campaign with its progress: jobs by state, per wave, and the failures.
fn campaign_json(
    c: &Campaign,
    jobs: &[Job],
    artifact: Option<&Artifact>,
    driven_here: bool,
) -> Value {
    let waves: Vec<Value> = c
        .waves
        .iter()
        .enumerate()
        .map(|(w, wave)| {
            let in_wave: Vec<Job> = jobs.iter().filter(|j| j.wave == w).cloned().collect();
            json!({"size": wave.size, "started_ms": wave.started_ms, "jobs": tally(&in_wave)})
        })
        .collect();
    let failures: Vec<Value> = jobs
        .iter()
        .filter(|j| matches!(j.state, JobState::Failed | JobState::Rejected))
        .take(FAILURES_SHOWN)
        .map(|j| json!({"device": j.device_id, "state": j.state.as_str(), "reason": j.reason, "wave": j.wave + 1}))
        .collect();
    json!({
        "id": c.id,
        "tenant": c.tenant,
        "name": c.name,
        "artifact": artifact.map(|a| json!({"id": a.id, "name": a.name, "version": a.version, "size": a.size}))
            .unwrap_or_else(|| json!({"id": c.artifact_id})),
        "status": c.status,
        "reason": c.reason,
        "selector": c.selector,
        "devices": c.devices,
        "wave_wait_s": c.wave_wait_s,
        "max_starts_per_minute": c.max_starts_per_minute,
        "failure_threshold": c.failure_threshold,
        "deadline_ms": c.deadline_ms,
        "job_timeout_s": c.job_timeout_s,
        "skipped": c.skipped.iter().map(|(d, r)| json!({"device": d, "reason": r})).collect::<Vec<_>>(),
        "created_ms": c.created_ms,
        "created_by": c.created_by,
        "updated_ms": c.updated_ms,
        "targets": jobs.len(),
        "jobs": tally(jobs),
        "waves": waves,
        "failures": failures,
        "driven_here": driven_here,
    })
}

pub async fn create_campaign(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<NewCampaign>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let o = ota(&state)?;
    let Json(new) = body.map_err(bad_json)?;
    let tenant = caller
        .scope(new.tenant.as_deref())?
        .unwrap_or_else(|| DEFAULT_TENANT.into());
    let fleet = state.fleet.clone();
    let by = caller.username.clone();
    let t = tenant.clone();
    let c = tokio::task::spawn_blocking(move || fleet.create_campaign(&t, new, &by, now_ms()))
        .await
        .map_err(|e| internal("campaign", e))??;
    let (c, jobs) = state.fleet.get_campaign(None, &c.id)?;
    let artifact = state.fleet.get_artifact(None, &c.artifact_id).ok();
    audit(
        &state,
        &caller,
        "ota.campaign.create",
        &c.id,
        json!({"artifact": c.artifact_id, "targets": jobs.len(), "waves": c.waves.len(),
               "skipped": c.skipped.len()}),
    );
    Ok((
        StatusCode::CREATED,
        Json(campaign_json(
            &c,
            &jobs,
            artifact.as_ref(),
            driven_here(o, &c.id),
        )),
    ))
}

pub async fn list_campaigns(
    caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    ota(&state)?;
    let Query(q) = q.map_err(bad_query)?;
    let tenant = caller.scope(q.tenant.as_deref())?;
    let items: Vec<Value> = state
        .fleet
        .list_campaigns(tenant.as_deref())
        .into_iter()
        .map(|(c, t)| json!({"id": c.id, "tenant": c.tenant, "name": c.name, "artifact": c.artifact_id,
                             "status": c.status, "reason": c.reason, "created_ms": c.created_ms, "jobs": t,
                             "waves": c.waves.len(),
                             "waves_started": c.waves.iter().filter(|w| w.started_ms.is_some()).count()}))
        .collect();
    Ok(Json(json!({"items": items})))
}

pub async fn show_campaign(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let o = ota(&state)?;
    let (c, jobs) = state.fleet.get_campaign(caller.tenant.as_deref(), &id)?;
    let artifact = state.fleet.get_artifact(None, &c.artifact_id).ok();
    Ok(Json(campaign_json(
        &c,
        &jobs,
        artifact.as_ref(),
        driven_here(o, &c.id),
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    state: Option<String>,
    limit: Option<usize>,
}

pub async fn list_jobs(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    ota(&state)?;
    let Query(q) = q.map_err(bad_query)?;
    let (_, jobs) = state.fleet.get_campaign(caller.tenant.as_deref(), &id)?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
    let items: Vec<&Job> = jobs
        .iter()
        .filter(|j| q.state.as_deref().is_none_or(|s| j.state.as_str() == s))
        .take(limit)
        .collect();
    Ok(Json(json!({"items": items})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    reason: Option<String>,
}

pub async fn pause(
    caller: Caller,
    state: State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    pause_or_resume(caller, state, id, true).await
}

pub async fn resume(
    caller: Caller,
    state: State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    pause_or_resume(caller, state, id, false).await
}

async fn pause_or_resume(
    caller: Caller,
    State(state): State<AppState>,
    id: String,
    pause: bool,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let o = ota(&state)?;
    state
        .fleet
        .pause_campaign(caller.tenant.as_deref(), &id, pause, now_ms())?;
    audit(
        &state,
        &caller,
        if pause {
            "ota.campaign.pause"
        } else {
            "ota.campaign.resume"
        },
        &id,
        json!({}),
    );
    let (c, jobs) = state.fleet.get_campaign(None, &id)?;
    Ok(Json(campaign_json(
        &c,
        &jobs,
        state.fleet.get_artifact(None, &c.artifact_id).ok().as_ref(),
        driven_here(o, &c.id),
    )))
}

pub async fn cancel(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<CancelBody>>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Operator)?;
    let o = ota(&state)?;
    let reason = body
        .and_then(|Json(b)| b.reason)
        .unwrap_or_else(|| format!("cancelled by {}", caller.username));
    let (c, notices) =
        state
            .fleet
            .cancel_campaign(caller.tenant.as_deref(), &id, &reason, now_ms())?;
    m2mhub_ingest::ota_topics::notify(&o.service, notices).await;
    audit(
        &state,
        &caller,
        "ota.campaign.cancel",
        &id,
        json!({"reason": reason}),
    );
    let (c, jobs) = state.fleet.get_campaign(None, &c.id)?;
    Ok(Json(campaign_json(
        &c,
        &jobs,
        state.fleet.get_artifact(None, &c.artifact_id).ok().as_ref(),
        driven_here(o, &c.id),
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadQuery {
    device: String,
    job: String,
    expires: i64,
    token: String,
}

/// What a `Range` header cannot ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A `Range: bytes=…` header against a `size`-byte image: `Ok(None)` for
/// the whole image, `Ok(Some((first, last)))` inclusive, `Err` when it
/// cannot be satisfied. Several ranges are served as the whole image
/// (RFC 9110 lets a server ignore Range).
pub fn parse_range(h: &str, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    if size == 0 {
        return Err(Unsatisfiable);
    }
    let (first, last) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
        if n == 0 {
            return Err(Unsatisfiable);
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let first: u64 = a.parse().map_err(|_| Unsatisfiable)?;
        let last = if b.is_empty() {
            size - 1
        } else {
            b.parse::<u64>().map_err(|_| Unsatisfiable)?.min(size - 1)
        };
        (first, last)
    };
    if first >= size || first > last {
        return Err(Unsatisfiable);
    }
    Ok(Some((first, last)))
}

/// `GET /ota/download/{artifact}?device=&job=&expires=&token=`: the image,
/// or the asked `Range` of it (206), streamed from disk.
pub async fn download(
    State(state): State<AppState>,
    Path(artifact_id): Path<String>,
    q: Result<Query<DownloadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let o = ota(&state)?;
    let Query(q) = q.map_err(bad_query)?;
    let now = now_ms();
    o.service
        .urls
        .check(&artifact_id, &q.device, &q.job, q.expires, &q.token, now)
        .map_err(|m| Problem::new(StatusCode::FORBIDDEN, "forbidden", m))?;
    // The job must still be under way: a finished or cancelled job's URL
    // stops working even before it expires.
    let a = state.fleet.ota_artifact_for(&q.device, &q.job)?;
    if a.id != artifact_id {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this URL is not for the job's image",
        ));
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(h) => parse_range(h, a.size),
        None => Ok(None),
    };
    let (status, first, last) = match range {
        Ok(None) => (StatusCode::OK, 0, a.size.saturating_sub(1)),
        Ok(Some((f, l))) => (StatusCode::PARTIAL_CONTENT, f, l),
        Err(Unsatisfiable) => {
            let mut r = Problem::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range-not-satisfiable",
                format!("the image has {} bytes", a.size),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", a.size)) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    let len = last + 1 - first;
    let path = o.service.image_path(&a).await.map_err(|e| {
        tracing::warn!(artifact = %a.id, error = %e, "cannot get a firmware image from the cluster");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "image-unavailable",
            "the image cannot be read now: try again",
        )
    })?;
    let file = std::fs::File::open(path).map_err(|e| internal("cannot open the image", e))?;
    let file = Arc::new(file);
    let budget = Arc::clone(&o.download_budget);
    let reads = Arc::clone(&o.read_slots);
    let stream = futures_util::stream::unfold((first, len), move |(at, left)| {
        let (budget, reads, file) = (Arc::clone(&budget), Arc::clone(&reads), Arc::clone(&file));
        async move {
            if left == 0 {
                return None;
            }
            let step = READ_STEP.min(left as usize);
            let permit = match budget.acquire_many_owned(step as u32).await {
                Ok(p) => p,
                Err(e) => return Some((Err(std::io::Error::other(e)), (at, 0))),
            };
            // A few reads at a time: each runs on a blocking thread, and a
            // thousand downloads must not grow the pool to hundreds of them.
            let slot = match reads.acquire_owned().await {
                Ok(s) => s,
                Err(e) => return Some((Err(std::io::Error::other(e)), (at, 0))),
            };
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; step];
                file.read_exact_at(&mut buf, at).map(|()| buf)
            })
            .await;
            drop(slot);
            match read {
                Ok(Ok(buf)) => {
                    let chunk = bytes::Bytes::from_owner(Chunk {
                        data: buf,
                        _permit: permit,
                    });
                    Some((
                        Ok::<_, std::io::Error>(chunk),
                        (at + step as u64, left - step as u64),
                    ))
                }
                Ok(Err(e)) => Some((Err(e), (at, 0))),
                Err(e) => Some((Err(std::io::Error::other(e)), (at, 0))),
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", a.sha256)) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{}", a.size)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::{parse_range, Unsatisfiable};

    #[test]
    fn ranges_are_parsed_against_the_size() {
        assert_eq!(parse_range("bytes=0-99", 1000), Ok(Some((0, 99))));
        assert_eq!(parse_range("bytes=500-", 1000), Ok(Some((500, 999))));
        assert_eq!(parse_range("bytes=-100", 1000), Ok(Some((900, 999))));
        assert_eq!(parse_range("bytes=990-2000", 1000), Ok(Some((990, 999))));
        assert_eq!(parse_range("bytes=-5000", 1000), Ok(Some((0, 999))));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Ok(None));
        assert_eq!(parse_range("items=0-1", 1000), Ok(None));
        assert_eq!(parse_range("bytes=1000-", 1000), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=5-1", 1000), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=-0", 1000), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=x-1", 1000), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=0-", 0), Err(Unsatisfiable));
    }

    proptest::proptest! {
        /// Whatever the header, a satisfiable answer lies inside the image.
        #[test]
        fn any_range_header_stays_inside_the_image(h in "\\PC{0,40}", size in 0u64..10_000) {
            if let Ok(Some((f, l))) = parse_range(&h, size) {
                proptest::prop_assert!(f <= l && l < size);
            }
        }
    }
}
