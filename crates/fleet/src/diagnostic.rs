//! Remote diagnostics: an operator asks a device for a diagnostic bundle,
//! the device uploads it by HTTP PUT to a one-time URL, and the bundle is
//! kept for a configured time.
//!
//! # The model
//!
//! A [`DiagnosticBundle`] is first a *request* (`requested`): it carries
//! the hash of a random one-time upload token and the URL's expiry. The
//! token itself is returned once, to be put in the command sent to the
//! device, and never stored: whoever reads the database cannot upload.
//! The upload ([`Fleet::begin_upload`]) finds the request by the token's
//! SHA-256 — a lookup by hash of a 256-bit secret reveals nothing through
//! its timing — claims it in memory so two concurrent PUTs cannot both
//! write, and streams the body into `<dir>/<id>.part` through a
//! [`BundleUpload`], counting and hashing as it goes; past the size cap the
//! request fails (`failed`, nothing kept). [`BundleUpload::finish`] syncs
//! the file, renames it to `<dir>/<id>` and records size and SHA-256
//! (`uploaded`): from then on the token is spent. An upload that is
//! dropped unfinished (the connection broke) leaves the request as it was,
//! so the device may try again until the URL expires.
//!
//! [`Fleet::sweep_diagnostics`] marks requests whose URL expired unused as
//! `expired` and deletes bundles (and their files) older than the retention,
//! and stray temporary files a crash left behind.
//!
//! Diagnostics are rare operator actions, so nothing is cached: every call
//! goes to the store, under one lock that also serializes the checks
//! (open requests per device, one upload per token) with the writes.

use crate::{random_id, Fleet, RegistryError, Result, Shared};
use m2mhub_identity::ids::{hex, random_bytes, validate_id};
use m2mhub_identity::now_ms;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Requests a device may have open (requested, URL not expired) at once:
/// a device that never uploads cannot pile them up.
pub const OPEN_PER_DEVICE: usize = 3;
/// The default size cap of one bundle (16 MiB).
pub const DEFAULT_MAX_BUNDLE_BYTES: u64 = 16 << 20;
/// The default time bundles are kept (a week).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(168 * 3600);
/// The default lifetime of an upload URL (15 minutes).
pub const DEFAULT_UPLOAD_TTL: Duration = Duration::from_secs(900);
/// An operator's note on a request is at most this long.
pub const MAX_REASON: usize = 512;
/// A listing returns at most this many bundles.
pub const MAX_LIST: usize = 1000;
/// The suffix of a bundle's file while it is being written.
const PART: &str = ".part";

/// Where a bundle request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleStatus {
    /// Waiting for the device's upload.
    Requested,
    /// The bundle is stored.
    Uploaded,
    /// The upload URL expired unused.
    Expired,
    /// The upload was refused (too large); nothing is stored.
    Failed,
}

impl BundleStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleStatus::Requested => "requested",
            BundleStatus::Uploaded => "uploaded",
            BundleStatus::Expired => "expired",
            BundleStatus::Failed => "failed",
        }
    }
}

impl std::str::FromStr for BundleStatus {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        Ok(match s {
            "requested" => BundleStatus::Requested,
            "uploaded" => BundleStatus::Uploaded,
            "expired" => BundleStatus::Expired,
            "failed" => BundleStatus::Failed,
            _ => return Err(()),
        })
    }
}

/// A diagnostic bundle: the request, and once uploaded, what was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagnosticBundle {
    pub id: String,
    pub tenant: String,
    pub device_id: String,
    pub status: BundleStatus,
    /// The operator who asked for it.
    pub requested_by: String,
    pub requested_ms: i64,
    pub uploaded_ms: Option<i64>,
    /// Bytes stored (once uploaded).
    pub size: Option<u64>,
    /// SHA-256 of the stored bytes, lower-case hex (once uploaded).
    pub sha256: Option<String>,
    /// The operator's note on why it was asked for.
    pub reason: Option<String>,
    /// Why the upload failed (status `failed`).
    pub error: Option<String>,
    /// SHA-256 (hex) of the one-time upload token; never shown.
    #[serde(skip)]
    pub token_hash: String,
    /// When the upload URL stops working.
    pub expires_ms: i64,
}

/// Where bundles are kept and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagnosticsConfig {
    /// The directory of bundle files (`<data_dir>/diagnostics`). Empty:
    /// none configured, and requests are refused.
    pub dir: PathBuf,
    pub max_bundle_bytes: u64,
    /// Bundles (and failed or expired requests) are deleted this long
    /// after their upload (or their URL's expiry).
    pub retention: Duration,
    /// How long an upload URL works.
    pub upload_ttl: Duration,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        DiagnosticsConfig {
            dir: PathBuf::new(),
            max_bundle_bytes: DEFAULT_MAX_BUNDLE_BYTES,
            retention: DEFAULT_RETENTION,
            upload_ttl: DEFAULT_UPLOAD_TTL,
        }
    }
}

/// A new request and its one-time upload token (shown only here).
#[derive(Debug, Clone)]
pub struct RequestedBundle {
    pub bundle: DiagnosticBundle,
    pub token: String,
}

/// What became of a sweep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Requests whose URL expired unused.
    pub expired: usize,
    /// Bundles and requests deleted past the retention.
    pub deleted: usize,
}

/// Why an upload was refused. The API turns each into its status code
/// (404, 410, 409, 413, 500).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// No request has this token (it never existed, or was deleted).
    #[error("no diagnostic upload with this token")]
    UnknownToken,
    /// The token was used already (the bundle is uploaded, or the upload
    /// failed).
    #[error("this upload URL was used already")]
    Used,
    /// The URL expired before the upload began.
    #[error("this upload URL has expired")]
    Expired,
    /// Another upload with this token is under way.
    #[error("an upload with this token is under way")]
    Busy,
    /// The body is larger than the cap; nothing was stored.
    #[error("the bundle is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Storage(#[from] RegistryError),
}

impl From<std::io::Error> for UploadError {
    fn from(e: std::io::Error) -> Self {
        UploadError::Storage(e.into())
    }
}

/// The diagnostics state behind one lock: the configuration and the
/// requests whose upload is under way.
#[derive(Debug, Default)]
pub(crate) struct DiagnosticBook {
    pub config: DiagnosticsConfig,
    uploading: HashSet<String>,
}

impl DiagnosticBook {
    fn dir(&self) -> Result<&Path> {
        if self.config.dir.as_os_str().is_empty() {
            return Err(RegistryError::Storage(
                "no directory for diagnostic bundles is configured".into(),
            ));
        }
        Ok(&self.config.dir)
    }
}

fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Remove a file, ignoring that it is not there.
fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// A bundle id is ours (`diag-` and hex) before it names a file.
fn check_bundle_id(id: &str) -> Result<()> {
    validate_id("diagnostic bundle", id)?;
    if !id.starts_with("diag-") {
        return Err(RegistryError::NotFound(format!("diagnostic bundle {id}")));
    }
    Ok(())
}

impl Fleet {
    /// Where bundles go, their size cap, retention and URL lifetime.
    pub fn configure_diagnostics(&self, config: DiagnosticsConfig) {
        self.shared.diagnostics.lock().config = config;
    }

    pub fn diagnostics_config(&self) -> DiagnosticsConfig {
        self.shared.diagnostics.lock().config.clone()
    }

    /// Ask for a bundle from `device_id` of `tenant` (which must exist):
    /// the request, and the one-time token for its upload URL. At most
    /// [`OPEN_PER_DEVICE`] requests of a device may wait for an upload.
    pub fn request_diagnostic(
        &self,
        tenant: &str,
        device_id: &str,
        requested_by: &str,
        reason: Option<String>,
    ) -> Result<RequestedBundle> {
        validate_id("device", device_id)?;
        if let Some(r) = &reason {
            if r.len() > MAX_REASON || r.chars().any(char::is_control) {
                return Err(RegistryError::Validation(format!(
                    "reason must be at most {MAX_REASON} bytes without control characters"
                )));
            }
        }
        let s = &*self.shared;
        if s.identity.with_device(device_id, |d| d.tenant == tenant) != Some(true) {
            return Err(RegistryError::NotFound(format!("device {device_id}")));
        }
        let book = s.diagnostics.lock();
        book.dir()?;
        let now = now_ms();
        let open = s
            .store
            .list_diagnostics(Some(tenant), device_id, MAX_LIST)?
            .iter()
            .filter(|b| b.status == BundleStatus::Requested && b.expires_ms > now)
            .count();
        if open >= OPEN_PER_DEVICE {
            return Err(RegistryError::Conflict(format!(
                "device {device_id} has {open} diagnostic requests waiting for an upload: \
                 wait for them or delete one"
            )));
        }
        let token = hex(&random_bytes::<32>());
        let bundle = DiagnosticBundle {
            id: random_id("diag-"),
            tenant: tenant.into(),
            device_id: device_id.into(),
            status: BundleStatus::Requested,
            requested_by: requested_by.into(),
            requested_ms: now,
            uploaded_ms: None,
            size: None,
            sha256: None,
            reason,
            error: None,
            token_hash: token_hash(&token),
            expires_ms: now.saturating_add(ms(book.config.upload_ttl)),
        };
        s.store.insert_diagnostic(&bundle)?;
        Ok(RequestedBundle { bundle, token })
    }

    /// A device's bundles, newest first (of `tenant` if given).
    pub fn list_diagnostics(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<DiagnosticBundle>> {
        let now = now_ms();
        let mut items =
            self.shared
                .store
                .list_diagnostics(tenant, device_id, limit.min(MAX_LIST))?;
        for b in &mut items {
            b.status = effective_status(b, now);
        }
        Ok(items)
    }

    /// One bundle of `device_id` (of `tenant` if given).
    pub fn get_diagnostic(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        id: &str,
    ) -> Result<DiagnosticBundle> {
        check_bundle_id(id)?;
        let mut b = self
            .shared
            .store
            .get_diagnostic(id)?
            .filter(|b| b.device_id == device_id && tenant.is_none_or(|t| b.tenant == t))
            .ok_or_else(|| RegistryError::NotFound(format!("diagnostic bundle {id}")))?;
        b.status = effective_status(&b, now_ms());
        Ok(b)
    }

    /// The file of an uploaded bundle, to be read by the caller.
    pub fn diagnostic_file(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        id: &str,
    ) -> Result<(DiagnosticBundle, PathBuf)> {
        let b = self.get_diagnostic(tenant, device_id, id)?;
        if b.status != BundleStatus::Uploaded {
            return Err(RegistryError::Conflict(format!(
                "diagnostic bundle {id} is {}, not uploaded",
                b.status.as_str()
            )));
        }
        let path = self.shared.diagnostics.lock().dir()?.join(&b.id);
        Ok((b, path))
    }

    /// Delete a bundle (or request) and its file; an upload under way
    /// with its token then fails.
    pub fn delete_diagnostic(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        id: &str,
    ) -> Result<DiagnosticBundle> {
        let b = self.get_diagnostic(tenant, device_id, id)?;
        let book = self.shared.diagnostics.lock();
        self.shared.store.delete_diagnostic(&b.id)?;
        if let Ok(dir) = book.dir() {
            remove(&dir.join(&b.id))?;
        }
        Ok(b)
    }

    /// Start the upload of the request `token` belongs to: refused if the
    /// token is unknown, spent or expired, or another upload with it is
    /// under way.
    pub fn begin_upload(&self, token: &str) -> std::result::Result<BundleUpload, UploadError> {
        // A token is 64 hex digits; anything else cannot match.
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(UploadError::UnknownToken);
        }
        let s = &self.shared;
        let mut book = s.diagnostics.lock();
        let b = s
            .store
            .find_diagnostic_by_token(&token_hash(token))?
            .ok_or(UploadError::UnknownToken)?;
        match b.status {
            BundleStatus::Requested => {}
            BundleStatus::Expired => return Err(UploadError::Expired),
            BundleStatus::Uploaded | BundleStatus::Failed => return Err(UploadError::Used),
        }
        if now_ms() >= b.expires_ms {
            return Err(UploadError::Expired);
        }
        if book.uploading.contains(&b.id) {
            return Err(UploadError::Busy);
        }
        let dir = book.dir()?.to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let part = dir.join(format!("{}{PART}", b.id));
        let file = std::fs::File::create(&part)?;
        book.uploading.insert(b.id.clone());
        Ok(BundleUpload {
            shared: Arc::clone(&self.shared),
            limit: book.config.max_bundle_bytes,
            bundle: b,
            file: Some(std::io::BufWriter::with_capacity(64 * 1024, file)),
            part,
            dir,
            size: 0,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
        })
    }

    /// Mark requests whose URL expired unused as `expired`; delete bundles
    /// and requests past the retention, with their files, and temporary
    /// files no upload is writing.
    pub fn sweep_diagnostics(&self) -> Result<SweepReport> {
        self.sweep_diagnostics_at(now_ms())
    }

    pub(crate) fn sweep_diagnostics_at(&self, now: i64) -> Result<SweepReport> {
        let s = &self.shared;
        let book = s.diagnostics.lock();
        let Ok(dir) = book.dir() else {
            return Ok(SweepReport::default());
        };
        let cutoff = now.saturating_sub(ms(book.config.retention));
        let mut report = SweepReport::default();
        for mut b in s.store.diagnostics_due(now, cutoff)? {
            if book.uploading.contains(&b.id) {
                continue;
            }
            if b.uploaded_ms.unwrap_or(b.expires_ms) <= cutoff {
                s.store.delete_diagnostic(&b.id)?;
                remove(&dir.join(&b.id))?;
                report.deleted += 1;
            } else if b.status == BundleStatus::Requested {
                b.status = BundleStatus::Expired;
                s.store.update_diagnostic(&b)?;
                report.expired += 1;
            }
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(PART)) else {
                    continue;
                };
                if !book.uploading.contains(id) {
                    remove(&e.path())?;
                }
            }
        }
        Ok(report)
    }
}

impl Shared {
    /// The device is being deleted: its bundles' rows go with the other
    /// fleet rows (the caller deletes them); this removes their files.
    pub(crate) fn forget_diagnostics(&self, ids: &[String]) {
        let book = self.diagnostics.lock();
        let Ok(dir) = book.dir() else { return };
        for id in ids {
            if let Err(e) = remove(&dir.join(id)) {
                tracing::warn!(bundle = %id, error = %e, "cannot delete a diagnostic bundle's file");
            }
        }
    }
}

/// A request waiting past its URL's expiry is expired even before the
/// sweep has written it.
fn effective_status(b: &DiagnosticBundle, now: i64) -> BundleStatus {
    if b.status == BundleStatus::Requested && now >= b.expires_ms {
        BundleStatus::Expired
    } else {
        b.status
    }
}

/// One upload under way: bytes go to a temporary file, counted and
/// hashed. Blocking file I/O: async callers run it off their workers.
/// Dropped unfinished, the temporary file is removed and the request can
/// be uploaded again.
pub struct BundleUpload {
    shared: Arc<Shared>,
    bundle: DiagnosticBundle,
    file: Option<std::io::BufWriter<std::fs::File>>,
    part: PathBuf,
    dir: PathBuf,
    limit: u64,
    size: u64,
    hash: ring::digest::Context,
}

impl std::fmt::Debug for BundleUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleUpload")
            .field("bundle", &self.bundle.id)
            .field("size", &self.size)
            .finish()
    }
}

impl BundleUpload {
    /// The request being uploaded.
    pub fn bundle(&self) -> &DiagnosticBundle {
        &self.bundle
    }

    /// The size cap.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Refuse at once a body declared larger than the cap.
    pub fn check_length(&mut self, declared: u64) -> std::result::Result<(), UploadError> {
        if declared > self.limit {
            return Err(self.too_large());
        }
        Ok(())
    }

    /// Append a piece of the body; past the cap, the request fails and
    /// nothing is kept.
    pub fn write(&mut self, chunk: &[u8]) -> std::result::Result<(), UploadError> {
        let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
        if self.size.saturating_add(len) > self.limit {
            return Err(self.too_large());
        }
        let Some(file) = self.file.as_mut() else {
            return Err(UploadError::Used);
        };
        file.write_all(chunk)?;
        self.hash.update(chunk);
        self.size += len;
        Ok(())
    }

    /// The whole body is written: make it durable, move it in place and
    /// record it as uploaded.
    pub fn finish(mut self) -> std::result::Result<DiagnosticBundle, UploadError> {
        let Some(file) = self.file.take() else {
            return Err(UploadError::Used);
        };
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        let shared = Arc::clone(&self.shared);
        let mut book = shared.diagnostics.lock();
        book.uploading.remove(&self.bundle.id);
        // Deleted while it was being uploaded: nothing to keep.
        let Some(mut b) = shared.store.get_diagnostic(&self.bundle.id)? else {
            remove(&self.part)?;
            return Err(UploadError::UnknownToken);
        };
        let target = self.dir.join(&b.id);
        std::fs::rename(&self.part, &target)?;
        b.status = BundleStatus::Uploaded;
        b.uploaded_ms = Some(now_ms());
        b.size = Some(self.size);
        b.sha256 = Some(hex(self.hash.clone().finish().as_ref()));
        if let Err(e) = shared.store.update_diagnostic(&b) {
            remove(&target)?;
            return Err(e.into());
        }
        Ok(b)
    }

    /// Fail the request as too large and drop what was written.
    fn too_large(&mut self) -> UploadError {
        self.file = None;
        let limit = self.limit;
        let mut b = self.bundle.clone();
        b.status = BundleStatus::Failed;
        b.error = Some(format!("the bundle was larger than {limit} bytes"));
        let mut book = self.shared.diagnostics.lock();
        book.uploading.remove(&b.id);
        if let Err(e) = remove(&self.part) {
            tracing::warn!(bundle = %b.id, error = %e, "cannot remove a refused upload");
        }
        match self.shared.store.update_diagnostic(&b) {
            // Deleted meanwhile: nothing to mark.
            Ok(()) | Err(RegistryError::NotFound(_)) => UploadError::TooLarge { limit },
            Err(e) => e.into(),
        }
    }
}

impl Drop for BundleUpload {
    fn drop(&mut self) {
        // Finished or refused uploads have let go of the file already.
        if self.file.take().is_some() {
            self.shared
                .diagnostics
                .lock()
                .uploading
                .remove(&self.bundle.id);
            if let Err(e) = remove(&self.part) {
                tracing::warn!(bundle = %self.bundle.id, error = %e, "cannot remove an unfinished upload");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;
    use m2mhub_identity::NewDevice;
    use std::collections::BTreeMap;

    fn setup(dir: &Path) -> Fleet {
        let fleet = testutil::open_in(dir);
        fleet.configure_diagnostics(DiagnosticsConfig {
            dir: dir.join("diagnostics"),
            max_bundle_bytes: 100,
            ..Default::default()
        });
        fleet
            .identity()
            .create_device(NewDevice {
                id: Some("d1".into()),
                name: None,
                tenant: "default".into(),
                group: None,
                profile: None,
                labels: BTreeMap::new(),
                enabled: true,
            })
            .expect("device");
        fleet
    }

    fn hex_sha256(data: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
    }

    #[test]
    fn upload_round_trip_survives_reopen_and_token_is_one_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id;
        {
            let fleet = setup(dir.path());
            let r = fleet
                .request_diagnostic("default", "d1", "alice", Some("slow".into()))
                .expect("request");
            id = r.bundle.id.clone();
            assert_eq!(r.token.len(), 64);
            assert_ne!(r.bundle.token_hash, r.token);
            let mut up = fleet.begin_upload(&r.token).expect("begin");
            // A second upload with the same token while the first runs.
            assert!(matches!(
                fleet.begin_upload(&r.token),
                Err(UploadError::Busy)
            ));
            up.write(b"hello ").expect("write");
            up.write(b"world").expect("write");
            let b = up.finish().expect("finish");
            assert_eq!(b.status, BundleStatus::Uploaded);
            assert_eq!(b.size, Some(11));
            assert_eq!(
                b.sha256.as_deref(),
                Some(hex_sha256(b"hello world").as_str())
            );
            assert!(matches!(
                fleet.begin_upload(&r.token),
                Err(UploadError::Used)
            ));
            assert!(matches!(
                fleet.begin_upload(&"0".repeat(64)),
                Err(UploadError::UnknownToken)
            ));
        }
        let fleet = setup_reopen(dir.path());
        let b = fleet
            .get_diagnostic(Some("default"), "d1", &id)
            .expect("get");
        assert_eq!(b.reason.as_deref(), Some("slow"));
        assert_eq!(b.requested_by, "alice");
        let (_, path) = fleet
            .diagnostic_file(Some("default"), "d1", &id)
            .expect("file");
        assert_eq!(std::fs::read(path).expect("read"), b"hello world");
        // Another tenant, or another device, does not see it.
        assert!(fleet.get_diagnostic(Some("other"), "d1", &id).is_err());
        assert!(fleet.get_diagnostic(None, "d2", &id).is_err());
        assert_eq!(
            fleet
                .list_diagnostics(Some("default"), "d1", 10)
                .expect("list")
                .len(),
            1
        );
    }

    fn setup_reopen(dir: &Path) -> Fleet {
        let fleet = testutil::open_in(dir);
        fleet.configure_diagnostics(DiagnosticsConfig {
            dir: dir.join("diagnostics"),
            max_bundle_bytes: 100,
            ..Default::default()
        });
        fleet
    }

    #[test]
    fn too_large_fails_and_keeps_nothing_and_aborted_can_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = setup(dir.path());
        let r = fleet
            .request_diagnostic("default", "d1", "alice", None)
            .expect("request");
        // Aborted (dropped) upload: the token still works.
        {
            let mut up = fleet.begin_upload(&r.token).expect("begin");
            up.write(b"partial").expect("write");
        }
        let mut up = fleet.begin_upload(&r.token).expect("begin again");
        up.write(&[0u8; 60]).expect("write");
        assert!(matches!(
            up.write(&[0u8; 60]),
            Err(UploadError::TooLarge { limit: 100 })
        ));
        drop(up);
        let b = fleet.get_diagnostic(None, "d1", &r.bundle.id).expect("get");
        assert_eq!(b.status, BundleStatus::Failed);
        assert!(matches!(
            fleet.begin_upload(&r.token),
            Err(UploadError::Used)
        ));
        let files: Vec<_> = std::fs::read_dir(dir.path().join("diagnostics"))
            .expect("dir")
            .collect();
        assert!(files.is_empty(), "{files:?}");
    }

    #[test]
    fn open_requests_are_limited_and_checked_against_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = setup(dir.path());
        for _ in 0..OPEN_PER_DEVICE {
            fleet
                .request_diagnostic("default", "d1", "alice", None)
                .expect("request");
        }
        assert!(matches!(
            fleet.request_diagnostic("default", "d1", "alice", None),
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            fleet.request_diagnostic("other", "d1", "alice", None),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            fleet.request_diagnostic("default", "nope", "alice", None),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn sweep_expires_then_deletes_and_device_removal_cascades() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = setup(dir.path());
        let cfg = fleet.diagnostics_config();
        let waiting = fleet
            .request_diagnostic("default", "d1", "alice", None)
            .expect("request");
        let done = fleet
            .request_diagnostic("default", "d1", "alice", None)
            .expect("request");
        let mut up = fleet.begin_upload(&done.token).expect("begin");
        up.write(b"x").expect("write");
        let uploaded = up.finish().expect("finish");
        std::fs::write(dir.path().join("diagnostics/diag-stray.part"), b"x").expect("stray");

        let after_expiry = waiting.bundle.expires_ms + 1;
        let r = fleet.sweep_diagnostics_at(after_expiry).expect("sweep");
        assert_eq!(
            r,
            SweepReport {
                expired: 1,
                deleted: 0
            }
        );
        assert!(!dir.path().join("diagnostics/diag-stray.part").exists());
        let b = fleet
            .get_diagnostic(None, "d1", &waiting.bundle.id)
            .expect("get");
        assert_eq!(b.status, BundleStatus::Expired);
        assert!(matches!(
            fleet.begin_upload(&waiting.token),
            Err(UploadError::Expired)
        ));

        let retention = i64::try_from(cfg.retention.as_millis()).expect("ms");
        let uploaded_ms = uploaded.uploaded_ms.expect("uploaded");
        let first = uploaded_ms.min(waiting.bundle.expires_ms);
        let last = uploaded_ms.max(waiting.bundle.expires_ms);
        let r = fleet
            .sweep_diagnostics_at(first + retention - 1)
            .expect("sweep");
        assert_eq!(r.deleted, 0, "not yet");
        let r = fleet.sweep_diagnostics_at(last + retention).expect("sweep");
        assert_eq!(r.deleted, 2);
        assert!(fleet
            .list_diagnostics(None, "d1", 10)
            .expect("list")
            .is_empty());
        assert!(!dir.path().join("diagnostics").join(&uploaded.id).exists());

        // Deleting the device deletes its bundles and their files.
        let again = fleet
            .request_diagnostic("default", "d1", "alice", None)
            .expect("request");
        let mut up = fleet.begin_upload(&again.token).expect("begin");
        up.write(b"y").expect("write");
        let b = up.finish().expect("finish");
        fleet.identity().delete_device("d1").expect("delete");
        assert!(fleet
            .list_diagnostics(None, "d1", 10)
            .expect("list")
            .is_empty());
        assert!(!dir.path().join("diagnostics").join(&b.id).exists());
    }
}
