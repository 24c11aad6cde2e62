//! OTA firmware campaigns: immutable, signed firmware *artifacts* rolled out
//! to a fleet in staged *waves*, one *job* per device, with automatic abort
//! when a wave fails too often.
//!
//! # The model
//!
//! - An [`Artifact`] is an image's metadata (name, version, target hardware
//!   or profile, size, SHA-256, an Ed25519 signature of the digest). The
//!   bytes live in a file under the data folder ([`ArtifactFiles`]);
//!   artifacts never change, and one used by an unfinished campaign cannot be
//!   deleted.
//! - A [`Campaign`] targets the devices a selector (group, label, profile)
//!   or an explicit list picks when it is created, split in order into
//!   waves (`percent` or `count` each; the rest joins the last wave).
//! - A [`Job`] is one device's progress: `queued` (its wave has not
//!   started) → `pending` (started; waiting for the device to be online and
//!   for the start rate limit) → `notified` → `downloading` → `verifying` →
//!   `installing` → `succeeded`, or `failed` / `rejected` (by the device),
//!   `cancelled` (campaign cancelled or aborted before the device began),
//!   `expired` (the deadline passed before it was told).
//!
//! # The engine
//!
//! [`Fleet::ota_tick`] advances every campaign; it is given the time and a
//! way to ask whether a device is online, so it is driven by a timer in
//! production and by a fake clock in tests. Each tick:
//!
//! 1. expires waiting jobs once the deadline has passed, and fails jobs in
//!    progress that have reported nothing for [`Campaign::job_timeout_s`];
//! 2. aborts the campaign when a started wave's failures (failed or
//!    rejected) exceed `failure_threshold` of the wave's size — waiting jobs
//!    are cancelled, jobs under way finish (a device half way through an
//!    install is not interrupted);
//! 3. starts the next wave once the current one has *settled* (no job in
//!    progress) and `wave_wait_s` has passed since it started;
//! 4. tells online devices of the started waves their jobs, at most
//!    `max_starts_per_minute`; an offline device keeps its job `pending` and
//!    is told when it returns (until the deadline);
//! 5. completes the campaign when every wave has started and every job is
//!    over.
//!
//! Every job and campaign change is written to the store before it takes
//! effect in memory, so a restart resumes where the campaign stood.
//!
//! # Several nodes, one store
//!
//! When other nodes write the store too ([`FleetStore::is_shared`]: the
//! cluster's PostgreSQL), memory is only a cache. A device's request is
//! answered from its job as stored, a tick (of the campaigns this node
//! drives, [`Fleet::ota_tick_owned`]) and an operator's change from the
//! campaign as stored, and every write is conditional on the stored rows
//! still being what was read ([`FleetStore::put_campaign_if`]): the loser
//! of a race (a timeout decided while the device's report went in through
//! another node) writes and tells nothing, reads again and decides again.
//! Progress reports are then written too (the driving node needs them to
//! see a device is alive), and the start rate counts the jobs'
//! `notified_ms`, which every node reads alike. [`Fleet::reload_ota`]
//! refreshes the cache when another node announces a change
//! ([`Fleet::on_ota_change`]).
//!
//! [`FleetStore::is_shared`]: crate::store::FleetStore::is_shared
//! [`FleetStore::put_campaign_if`]: crate::store::FleetStore::put_campaign_if

use crate::setting::Selector;
use crate::{random_id, Fleet, RegistryError, Result};
use m2mhub_identity::DeviceFilter;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Devices one campaign may target at most.
pub const MAX_TARGETS: usize = 100_000;
/// Waves per campaign at most.
pub const MAX_WAVES: usize = 20;
/// Longest name or version accepted.
const MAX_LABEL: usize = 128;

/// Who made an artifact's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignedBy {
    /// The platform's firmware signing key (devices pin its public key).
    Platform,
    /// Supplied at upload (made with the manufacturer's own key).
    External,
}

/// A firmware image as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub version: String,
    /// The hardware revision it is built for, if stated.
    pub hardware: Option<String>,
    /// The device profile it is meant for, if stated.
    pub profile: Option<String>,
    pub size: u64,
    /// SHA-256 of the image, lower-case hex.
    pub sha256: String,
    /// Ed25519 signature of the SHA-256 digest, base64.
    pub signature: String,
    pub signed_by: SignedBy,
    pub created_ms: i64,
    pub created_by: String,
}

/// How many devices one wave takes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WaveSize {
    /// This share of the targets (rounded up).
    Percent(f64),
    Count(usize),
}

/// A wave as planned and run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub size: usize,
    pub started_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignStatus {
    Running,
    Paused,
    Completed,
    Cancelled,
    Aborted,
}

impl CampaignStatus {
    pub fn is_over(self) -> bool {
        matches!(
            self,
            CampaignStatus::Completed | CampaignStatus::Cancelled | CampaignStatus::Aborted
        )
    }
}

/// What an operator asks for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCampaign {
    /// Platform users: the tenant (the API reads it; the fleet is given the
    /// tenant separately).
    pub tenant: Option<String>,
    pub name: Option<String>,
    pub artifact: String,
    #[serde(default)]
    pub selector: Selector,
    /// An explicit list instead of (or narrowed by) the selector.
    pub devices: Option<Vec<String>>,
    /// Empty: one wave of every target.
    #[serde(default)]
    pub waves: Vec<WaveSize>,
    /// Seconds from one wave's start to the next's, at least (default 0:
    /// as soon as the wave has settled).
    #[serde(default)]
    pub wave_wait_s: u64,
    /// Devices told their job per minute at most (default: no limit).
    pub max_starts_per_minute: Option<u32>,
    /// Abort when a wave's failures exceed this share of it (0..1, default
    /// 0.2).
    pub failure_threshold: Option<f64>,
    /// After this time (ms since the epoch) devices not yet told are not.
    pub deadline_ms: Option<i64>,
    /// A job in progress with no report for this long fails (default 3600).
    pub job_timeout_s: Option<u64>,
}

/// A campaign as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub artifact_id: String,
    pub selector: Selector,
    pub devices: Option<Vec<String>>,
    pub waves: Vec<Wave>,
    pub wave_wait_s: u64,
    pub max_starts_per_minute: Option<u32>,
    pub failure_threshold: f64,
    pub deadline_ms: Option<i64>,
    pub job_timeout_s: u64,
    pub status: CampaignStatus,
    /// Why it was aborted or cancelled.
    pub reason: Option<String>,
    /// Targets left out at creation (already in another campaign), with why.
    pub skipped: Vec<(String, String)>,
    pub created_ms: i64,
    pub created_by: String,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Pending,
    Notified,
    Downloading,
    Verifying,
    Installing,
    Succeeded,
    Failed,
    Rejected,
    Cancelled,
    Expired,
}

impl JobState {
    pub const ALL: [JobState; 11] = [
        JobState::Queued,
        JobState::Pending,
        JobState::Notified,
        JobState::Downloading,
        JobState::Verifying,
        JobState::Installing,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Rejected,
        JobState::Cancelled,
        JobState::Expired,
    ];

    pub fn is_over(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::Rejected
                | JobState::Cancelled
                | JobState::Expired
        )
    }

    /// Told, and not finished: the device is working on it.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            JobState::Notified | JobState::Downloading | JobState::Verifying | JobState::Installing
        )
    }

    fn is_failure(self) -> bool {
        matches!(self, JobState::Failed | JobState::Rejected)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Pending => "pending",
            JobState::Notified => "notified",
            JobState::Downloading => "downloading",
            JobState::Verifying => "verifying",
            JobState::Installing => "installing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Rejected => "rejected",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
        }
    }
}

/// One device's part in a campaign. Its id, as the device sees it, is the
/// campaign's id (a device has at most one job per campaign).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub campaign_id: String,
    pub device_id: String,
    pub tenant: String,
    pub wave: usize,
    pub state: JobState,
    /// Download progress in percent, as last reported.
    pub progress: u8,
    pub reason: Option<String>,
    pub notified_ms: Option<i64>,
    pub updated_ms: i64,
}

/// What a device reports on `devices/{id}/ota/status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub job_id: String,
    pub state: JobState,
    #[serde(default)]
    pub progress: Option<u8>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The firmware version now running (with `succeeded`).
    #[serde(default)]
    pub version: Option<String>,
}

/// What the driver must tell a device after a tick or a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Here is your job (download and install this artifact).
    Job { job: Job, artifact: Box<Artifact> },
    /// The job you were told of is cancelled; do not start it.
    Cancelled { job: Job },
}

/// A campaign with its jobs, in memory.
struct Run {
    campaign: Campaign,
    jobs: Vec<Job>,
    by_device: HashMap<String, usize>,
    /// When devices were told, over the last minute (the start rate limit).
    starts: VecDeque<i64>,
}

impl Run {
    fn new(campaign: Campaign, jobs: Vec<Job>) -> Run {
        let by_device = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.device_id.clone(), i))
            .collect();
        Run {
            campaign,
            jobs,
            by_device,
            starts: VecDeque::new(),
        }
    }

    /// The waves started so far.
    fn started_waves(&self) -> usize {
        self.campaign
            .waves
            .iter()
            .take_while(|w| w.started_ms.is_some())
            .count()
    }

    /// Starts left under the rate limit at `now`. With a shared store
    /// (`shared`), devices are told by several nodes (the ticking one and
    /// those devices ask through), so the count is the jobs' own
    /// `notified_ms` within the last minute, which every node reads alike.
    fn start_room(&mut self, now: i64, shared: bool) -> usize {
        while self.starts.front().is_some_and(|t| *t <= now - 60_000) {
            self.starts.pop_front();
        }
        let Some(max) = self.campaign.max_starts_per_minute else {
            return usize::MAX;
        };
        let recent = if shared {
            self.jobs
                .iter()
                .filter(|j| j.notified_ms.is_some_and(|t| t > now - 60_000))
                .count()
        } else {
            self.starts.len()
        };
        (max as usize).saturating_sub(recent)
    }

    fn index_devices(&mut self) {
        self.by_device = self
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.device_id.clone(), i))
            .collect();
    }
}

/// Artifacts and campaigns in memory.
#[derive(Default)]
pub(crate) struct OtaBook {
    artifacts: BTreeMap<String, Artifact>,
    runs: BTreeMap<String, Run>,
    /// Each device's unfinished job: the campaign it belongs to.
    active: HashMap<String, String>,
}

impl OtaBook {
    pub fn load(artifacts: Vec<Artifact>, campaigns: Vec<Campaign>, jobs: Vec<Job>) -> OtaBook {
        let mut by_campaign: HashMap<String, Vec<Job>> = HashMap::new();
        for j in jobs {
            by_campaign
                .entry(j.campaign_id.clone())
                .or_default()
                .push(j);
        }
        let mut book = OtaBook {
            artifacts: artifacts.into_iter().map(|a| (a.id.clone(), a)).collect(),
            ..Default::default()
        };
        for c in campaigns {
            let mut jobs = by_campaign.remove(&c.id).unwrap_or_default();
            jobs.sort_by(|a, b| (a.wave, &a.device_id).cmp(&(b.wave, &b.device_id)));
            for j in &jobs {
                if !j.state.is_over() {
                    book.active.insert(j.device_id.clone(), c.id.clone());
                }
            }
            book.runs.insert(c.id.clone(), Run::new(c, jobs));
        }
        book
    }

    /// Replace one campaign and its jobs with what the store holds (another
    /// node may have changed them), keeping this node's start times.
    fn refresh_run(&mut self, campaign: Campaign, mut jobs: Vec<Job>) {
        jobs.sort_by(|a, b| (a.wave, &a.device_id).cmp(&(b.wave, &b.device_id)));
        let id = campaign.id.clone();
        for j in &jobs {
            if j.state.is_over() {
                if self.active.get(&j.device_id) == Some(&id) {
                    self.active.remove(&j.device_id);
                }
            } else {
                self.active.insert(j.device_id.clone(), id.clone());
            }
        }
        match self.runs.get_mut(&id) {
            Some(run) => {
                run.campaign = campaign;
                run.jobs = jobs;
                run.index_devices();
            }
            None => {
                self.runs.insert(id, Run::new(campaign, jobs));
            }
        }
    }

    /// Replace one job with the stored one.
    fn refresh_job(&mut self, job: Job) {
        let Some(run) = self.runs.get_mut(&job.campaign_id) else {
            return;
        };
        let Some(&i) = run.by_device.get(&job.device_id) else {
            return;
        };
        if job.state.is_over() && self.active.get(&job.device_id) == Some(&job.campaign_id) {
            self.active.remove(&job.device_id);
        }
        run.jobs[i] = job;
    }

    /// Everything again from the store (another node changed it), keeping
    /// this node's start times. Returns the artifacts that are gone.
    fn reload(
        &mut self,
        artifacts: Vec<Artifact>,
        campaigns: Vec<Campaign>,
        jobs: Vec<Job>,
    ) -> Vec<String> {
        let mut fresh = OtaBook::load(artifacts, campaigns, jobs);
        for (id, run) in &mut self.runs {
            if let Some(new) = fresh.runs.get_mut(id) {
                new.starts = std::mem::take(&mut run.starts);
            }
        }
        let gone = self
            .artifacts
            .keys()
            .filter(|id| !fresh.artifacts.contains_key(*id))
            .cloned()
            .collect();
        *self = fresh;
        gone
    }

    pub fn forget_device(&mut self, device_id: &str) {
        self.active.remove(device_id);
        for run in self.runs.values_mut() {
            if let Some(i) = run.by_device.remove(device_id) {
                run.jobs.remove(i);
                run.by_device = run
                    .jobs
                    .iter()
                    .enumerate()
                    .map(|(i, j)| (j.device_id.clone(), i))
                    .collect();
            }
        }
    }
}

/// Where the image bytes live: `<data_dir>/ota/artifacts/<id>`, uploads in
/// progress under `<data_dir>/ota/incoming/`.
#[derive(Debug, Clone)]
pub struct ArtifactFiles {
    dir: PathBuf,
}

impl ArtifactFiles {
    pub fn new(data_dir: &Path) -> std::io::Result<ArtifactFiles> {
        let dir = data_dir.join("ota");
        std::fs::create_dir_all(dir.join("artifacts"))?;
        std::fs::create_dir_all(dir.join("incoming"))?;
        Ok(ArtifactFiles { dir })
    }

    pub fn path(&self, artifact_id: &str) -> PathBuf {
        self.dir.join("artifacts").join(artifact_id)
    }

    /// A fresh path for an upload in progress.
    pub fn incoming(&self) -> PathBuf {
        self.dir.join("incoming").join(random_id("up-"))
    }

    /// Move a finished upload into place under `artifact_id`, durably.
    pub fn commit(&self, incoming: &Path, artifact_id: &str) -> std::io::Result<()> {
        std::fs::File::open(incoming)?.sync_all()?;
        std::fs::rename(incoming, self.path(artifact_id))?;
        if let Ok(d) = std::fs::File::open(self.dir.join("artifacts")) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Remove uploads a crash left behind.
    pub fn clean_incoming(&self) {
        if let Ok(entries) = std::fs::read_dir(self.dir.join("incoming")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn check_label(what: &str, s: &str) -> Result<()> {
    if s.trim().is_empty() || s.len() > MAX_LABEL || s.chars().any(char::is_control) {
        return Err(RegistryError::Validation(format!(
            "`{what}` must be 1 to {MAX_LABEL} printable characters"
        )));
    }
    Ok(())
}

/// Split `n` targets into waves as asked; the rest joins the last wave.
pub fn plan_waves(n: usize, sizes: &[WaveSize]) -> Result<Vec<usize>> {
    if sizes.len() > MAX_WAVES {
        return Err(RegistryError::Validation(format!(
            "at most {MAX_WAVES} waves"
        )));
    }
    if sizes.is_empty() {
        return Ok(vec![n]);
    }
    let mut left = n;
    let mut out = Vec::with_capacity(sizes.len());
    for s in sizes {
        let want = match *s {
            WaveSize::Percent(p) => {
                if !(p > 0.0 && p <= 100.0) {
                    return Err(RegistryError::Validation(
                        "a wave's `percent` must be above 0 and at most 100".into(),
                    ));
                }
                ((n as f64) * p / 100.0).ceil() as usize
            }
            WaveSize::Count(c) => {
                if c == 0 {
                    return Err(RegistryError::Validation(
                        "a wave's `count` must be at least 1".into(),
                    ));
                }
                c
            }
        };
        let take = want.min(left);
        out.push(take);
        left -= take;
    }
    if let Some(last) = out.last_mut() {
        *last += left;
    }
    Ok(out)
}

/// Count of jobs by state, for progress views.
pub fn tally(jobs: &[Job]) -> BTreeMap<&'static str, usize> {
    let mut m: BTreeMap<&'static str, usize> =
        JobState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for j in jobs {
        *m.entry(j.state.as_str()).or_default() += 1;
    }
    m
}

impl Fleet {
    // ---- artifacts ----

    /// Record an artifact whose bytes are already in place under
    /// [`ArtifactFiles::path`].
    pub fn add_artifact(&self, a: Artifact) -> Result<Artifact> {
        check_label("name", &a.name)?;
        check_label("version", &a.version)?;
        if !self.shared.identity.has_tenant(&a.tenant) {
            return Err(RegistryError::NotFound(format!("tenant {}", a.tenant)));
        }
        let mut ota = self.shared.ota.lock();
        if ota
            .artifacts
            .values()
            .any(|x| x.tenant == a.tenant && x.name == a.name && x.version == a.version)
        {
            return Err(RegistryError::AlreadyExists(format!(
                "artifact {} version {} (artifacts are immutable: upload a new version)",
                a.name, a.version
            )));
        }
        self.shared.store.put_artifact(&a)?;
        ota.artifacts.insert(a.id.clone(), a.clone());
        drop(ota);
        self.ota_changed();
        Ok(a)
    }

    pub fn new_artifact_id(&self) -> String {
        random_id("fw-")
    }

    pub fn get_artifact(&self, tenant: Option<&str>, id: &str) -> Result<Artifact> {
        self.shared
            .ota
            .lock()
            .artifacts
            .get(id)
            .filter(|a| tenant.is_none_or(|t| a.tenant == t))
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("artifact {id}")))
    }

    /// Artifacts, newest first.
    pub fn list_artifacts(&self, tenant: Option<&str>) -> Vec<Artifact> {
        let mut v: Vec<Artifact> = self
            .shared
            .ota
            .lock()
            .artifacts
            .values()
            .filter(|a| tenant.is_none_or(|t| a.tenant == t))
            .cloned()
            .collect();
        v.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        v
    }

    /// Forget an artifact (the caller removes the file). Refused while an
    /// unfinished campaign uses it.
    pub fn delete_artifact(&self, tenant: Option<&str>, id: &str) -> Result<Artifact> {
        let mut ota = self.shared.ota.lock();
        let a = ota
            .artifacts
            .get(id)
            .filter(|a| tenant.is_none_or(|t| a.tenant == t))
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("artifact {id}")))?;
        if let Some(r) = ota
            .runs
            .values()
            .find(|r| r.campaign.artifact_id == id && !r.campaign.status.is_over())
        {
            return Err(RegistryError::Conflict(format!(
                "artifact {id} is in use by campaign {} ({:?}); cancel it first",
                r.campaign.id, r.campaign.status
            )));
        }
        self.shared.store.delete_artifact(id)?;
        ota.artifacts.remove(id);
        drop(ota);
        self.ota_changed();
        Ok(a)
    }

    // ---- campaigns ----

    /// Create a campaign and its jobs (all `queued`); the first wave starts
    /// on the next tick.
    pub fn create_campaign(
        &self,
        tenant: &str,
        new: NewCampaign,
        by: &str,
        now: i64,
    ) -> Result<Campaign> {
        let artifact = self.get_artifact(Some(tenant), &new.artifact)?;
        let threshold = new.failure_threshold.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&threshold) {
            return Err(RegistryError::Validation(
                "`failure_threshold` must be between 0 and 1".into(),
            ));
        }
        let name = new
            .name
            .clone()
            .unwrap_or_else(|| format!("{} {}", artifact.name, artifact.version));
        check_label("name", &name)?;
        if new.max_starts_per_minute == Some(0) {
            return Err(RegistryError::Validation(
                "`max_starts_per_minute` must be at least 1".into(),
            ));
        }
        let targets = self.campaign_targets(tenant, &new)?;
        if targets.is_empty() {
            return Err(RegistryError::Validation(
                "the campaign targets no device".into(),
            ));
        }
        let id = random_id("ota-");
        let mut ota = self.shared.ota.lock();
        let mut skipped = Vec::new();
        let mut chosen = Vec::with_capacity(targets.len());
        for d in targets {
            // An image built for one device profile is not sent to another.
            let other_profile = artifact.profile.as_ref().and_then(|want| {
                self.shared
                    .identity
                    .with_device(&d, |dev| {
                        (dev.profile != *want).then(|| dev.profile.clone())
                    })
                    .flatten()
            });
            match (ota.active.get(&d), other_profile) {
                (Some(other), _) => skipped.push((d, format!("already in campaign {other}"))),
                (None, Some(p)) => skipped.push((
                    d,
                    format!(
                        "profile {p}; the image is for {}",
                        artifact.profile.as_deref().unwrap_or_default()
                    ),
                )),
                (None, None) => chosen.push(d),
            }
        }
        if chosen.is_empty() {
            return Err(RegistryError::Validation(format!(
                "no target can take this image ({} skipped: {})",
                skipped.len(),
                skipped
                    .first()
                    .map(|(d, r)| format!("{d}: {r}"))
                    .unwrap_or_default()
            )));
        }
        let sizes = plan_waves(chosen.len(), &new.waves)?;
        let mut jobs = Vec::with_capacity(chosen.len());
        let mut it = chosen.into_iter();
        for (w, size) in sizes.iter().enumerate() {
            for d in it.by_ref().take(*size) {
                jobs.push(Job {
                    campaign_id: id.clone(),
                    device_id: d,
                    tenant: tenant.into(),
                    wave: w,
                    state: JobState::Queued,
                    progress: 0,
                    reason: None,
                    notified_ms: None,
                    updated_ms: now,
                });
            }
        }
        let campaign = Campaign {
            id: id.clone(),
            tenant: tenant.into(),
            name,
            artifact_id: artifact.id,
            selector: new.selector,
            devices: new.devices,
            waves: sizes
                .into_iter()
                .map(|size| Wave {
                    size,
                    started_ms: None,
                })
                .collect(),
            wave_wait_s: new.wave_wait_s,
            max_starts_per_minute: new.max_starts_per_minute,
            failure_threshold: threshold,
            deadline_ms: new.deadline_ms,
            job_timeout_s: new.job_timeout_s.unwrap_or(3600).max(1),
            status: CampaignStatus::Running,
            reason: None,
            skipped,
            created_ms: now,
            created_by: by.into(),
            updated_ms: now,
        };
        self.shared.store.put_campaign(&campaign, &jobs)?;
        for j in &jobs {
            ota.active.insert(j.device_id.clone(), id.clone());
        }
        ota.runs.insert(id, Run::new(campaign.clone(), jobs));
        drop(ota);
        self.ota_changed();
        Ok(campaign)
    }

    fn campaign_targets(&self, tenant: &str, new: &NewCampaign) -> Result<Vec<String>> {
        let identity = &self.shared.identity;
        if !identity.has_tenant(tenant) {
            return Err(RegistryError::NotFound(format!("tenant {tenant}")));
        }
        let sel = &new.selector;
        let mut targets = Vec::new();
        if let Some(list) = &new.devices {
            if list.len() > MAX_TARGETS {
                return Err(RegistryError::Validation(format!(
                    "at most {MAX_TARGETS} devices per campaign"
                )));
            }
            let mut seen = std::collections::HashSet::new();
            for d in list {
                // (of this tenant, picked by the selector's group and profile)
                let fits = identity.with_device(d, |dev| {
                    (
                        dev.tenant == tenant,
                        sel.group
                            .as_ref()
                            .is_none_or(|g| dev.group.as_ref() == Some(g))
                            && sel.profile.as_ref().is_none_or(|p| dev.profile == *p),
                    )
                });
                match fits {
                    None | Some((false, _)) => {
                        return Err(RegistryError::NotFound(format!("device {d}")));
                    }
                    Some((true, true)) if seen.insert(d.clone()) => targets.push(d.clone()),
                    Some(_) => {}
                }
            }
            return Ok(targets);
        }
        let mut after = None;
        loop {
            let page = identity.list_devices(&DeviceFilter {
                tenant: Some(tenant.into()),
                group: sel.group.clone(),
                label: sel.label.clone(),
                profile: sel.profile.clone(),
                after: after.take(),
                limit: Some(10_000),
                ..Default::default()
            })?;
            let full = page.len() == 10_000;
            after = page.last().map(|d| d.id.clone());
            targets.extend(page.into_iter().map(|d| d.id));
            if targets.len() > MAX_TARGETS {
                return Err(RegistryError::Validation(format!(
                    "the selector picks more than {MAX_TARGETS} devices; narrow it"
                )));
            }
            if !full {
                break;
            }
        }
        Ok(targets)
    }

    pub fn get_campaign(&self, tenant: Option<&str>, id: &str) -> Result<(Campaign, Vec<Job>)> {
        let ota = self.shared.ota.lock();
        ota.runs
            .get(id)
            .filter(|r| tenant.is_none_or(|t| r.campaign.tenant == t))
            .map(|r| (r.campaign.clone(), r.jobs.clone()))
            .ok_or_else(|| RegistryError::NotFound(format!("campaign {id}")))
    }

    /// Campaigns, newest first, with their job counts by state.
    pub fn list_campaigns(
        &self,
        tenant: Option<&str>,
    ) -> Vec<(Campaign, BTreeMap<&'static str, usize>)> {
        let ota = self.shared.ota.lock();
        let mut v: Vec<_> = ota
            .runs
            .values()
            .filter(|r| tenant.is_none_or(|t| r.campaign.tenant == t))
            .map(|r| (r.campaign.clone(), tally(&r.jobs)))
            .collect();
        v.sort_by(|a, b| (b.0.created_ms, &b.0.id).cmp(&(a.0.created_ms, &a.0.id)));
        v
    }

    /// Pause (no device is told a new job) or resume a campaign.
    pub fn pause_campaign(
        &self,
        tenant: Option<&str>,
        id: &str,
        pause: bool,
        now: i64,
    ) -> Result<Campaign> {
        let (from, to) = if pause {
            (CampaignStatus::Running, CampaignStatus::Paused)
        } else {
            (CampaignStatus::Paused, CampaignStatus::Running)
        };
        let c = self.change_campaign(tenant, id, |run| {
            if run.campaign.status != from {
                return Err(RegistryError::Conflict(format!(
                    "campaign {id} is {:?}, not {:?}",
                    run.campaign.status, from
                )));
            }
            let mut c = run.campaign.clone();
            c.status = to;
            c.updated_ms = now;
            Ok((c, Vec::new(), Vec::new()))
        })?;
        Ok(c.0)
    }

    /// Cancel a campaign: jobs not begun are cancelled (devices already told
    /// are told it is off), jobs under way finish. Returns the notices to send.
    pub fn cancel_campaign(
        &self,
        tenant: Option<&str>,
        id: &str,
        reason: &str,
        now: i64,
    ) -> Result<(Campaign, Vec<Notice>)> {
        self.change_campaign(tenant, id, |run| {
            if run.campaign.status.is_over() {
                return Err(RegistryError::Conflict(format!(
                    "campaign {id} is already {:?}",
                    run.campaign.status
                )));
            }
            let mut c = run.campaign.clone();
            c.status = CampaignStatus::Cancelled;
            c.reason = Some(reason.into());
            c.updated_ms = now;
            let (changed, notices) = stop_waiting(run, now, reason);
            Ok((c, changed, notices))
        })
    }

    /// An operator's change of a campaign: `decide` gives the new record,
    /// the changed jobs and the notices from the campaign as it stands.
    /// With a shared store it stands as stored, and the write is
    /// conditional: when the ticking node (or another operator) changed it
    /// meanwhile, read again and decide again.
    fn change_campaign(
        &self,
        tenant: Option<&str>,
        id: &str,
        decide: impl Fn(&Run) -> Result<(Campaign, Vec<Job>, Vec<Notice>)>,
    ) -> Result<(Campaign, Vec<Notice>)> {
        let shared = self.shared.store.is_shared();
        for _ in 0..RACE_RETRIES {
            let mut book = self.shared.ota.lock();
            let ota = &mut *book;
            if shared {
                if let Some((c, jobs)) = self.shared.store.stored_campaign(id)? {
                    ota.refresh_run(c, jobs);
                }
            }
            let run = ota
                .runs
                .get_mut(id)
                .filter(|r| tenant.is_none_or(|t| r.campaign.tenant == t))
                .ok_or_else(|| RegistryError::NotFound(format!("campaign {id}")))?;
            let (c, changed, notices) = decide(run)?;
            if shared {
                let pairs = read_pairs(run, &changed);
                let prev = run.campaign.updated_ms;
                if !self
                    .shared
                    .store
                    .put_campaign_if(Some((&c, prev)), &pairs)?
                {
                    continue;
                }
            } else {
                self.shared.store.put_campaign(&c, &changed)?;
            }
            apply_jobs(run, &mut ota.active, changed);
            run.campaign = c.clone();
            drop(book);
            self.ota_changed();
            return Ok((c, notices));
        }
        Err(lost_race(id))
    }

    // ---- the engine ----

    /// Advance every unfinished campaign to `now` (see the module docs).
    /// Returns what to tell devices.
    pub fn ota_tick(&self, now: i64, online: &dyn Fn(&str) -> bool) -> Result<Vec<Notice>> {
        self.ota_tick_owned(now, online, &|_| true)
    }

    /// [`Fleet::ota_tick`] for the campaigns `drives` says this node
    /// drives (in a cluster, those whose lease it holds). With a shared
    /// store each campaign is read from the store first and written
    /// conditionally: a tick that lost a race to another node's write (a
    /// device's report through another node) writes and tells nothing, and
    /// the next tick decides from what is stored.
    pub fn ota_tick_owned(
        &self,
        now: i64,
        online: &dyn Fn(&str) -> bool,
        drives: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Notice>> {
        let shared = self.shared.store.is_shared();
        let mut notices = Vec::new();
        let mut wrote = false;
        let mut ota = self.shared.ota.lock();
        let ota = &mut *ota;
        let ids: Vec<String> = ota
            .runs
            .iter()
            .filter(|(id, r)| !r.campaign.status.is_over() && drives(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if shared {
                match self.shared.store.stored_campaign(&id)? {
                    Some((c, jobs)) => ota.refresh_run(c, jobs),
                    None => continue,
                }
            }
            let Some(run) = ota.runs.get_mut(&id) else {
                continue;
            };
            if run.campaign.status.is_over() {
                continue;
            }
            let starts = run.starts.len();
            let (c, jobs, mut n) = step(run, &ota.artifacts, now, online, shared);
            if c.is_none() && jobs.is_empty() {
                continue;
            }
            if shared {
                let pairs = read_pairs(run, &jobs);
                let prev = c.as_ref().map(|c| (c, run.campaign.updated_ms));
                if !self.shared.store.put_campaign_if(prev, &pairs)? {
                    run.starts.truncate(starts);
                    tracing::debug!(campaign = %id, "another node changed the campaign during the tick; deciding again on the next");
                    continue;
                }
            } else {
                let campaign = c.clone().unwrap_or_else(|| run.campaign.clone());
                self.shared.store.put_campaign(&campaign, &jobs)?;
            }
            wrote = true;
            apply_jobs(run, &mut ota.active, jobs);
            if let Some(c) = c {
                run.campaign = c;
            }
            notices.append(&mut n);
        }
        if wrote {
            self.ota_changed();
        }
        Ok(notices)
    }

    /// A device asks for its job (`devices/{id}/ota/job/get`): its current
    /// job if its wave has started (a pending job is started now, within
    /// the rate limit), else `None`. With a shared store, the job is read
    /// from it first (the ticking node may be another).
    pub fn ota_job_for(&self, device_id: &str, now: i64) -> Result<Option<Notice>> {
        let shared = self.shared.store.is_shared();
        for _ in 0..RACE_RETRIES {
            let mut book = self.shared.ota.lock();
            let ota = &mut *book;
            let Some(cid) = ota.active.get(device_id).cloned() else {
                return Ok(None);
            };
            if shared {
                if let Some(j) = self.shared.store.stored_job(&cid, device_id)? {
                    ota.refresh_job(j);
                }
            }
            let Some(run) = ota.runs.get_mut(&cid) else {
                return Ok(None);
            };
            let Some(&i) = run.by_device.get(device_id) else {
                return Ok(None);
            };
            let Some(artifact) = ota.artifacts.get(&run.campaign.artifact_id).cloned() else {
                return Ok(None);
            };
            let job = run.jobs[i].clone();
            return match job.state {
                s if s.in_progress() => Ok(Some(Notice::Job {
                    job,
                    artifact: Box::new(artifact),
                })),
                JobState::Pending
                    if run.campaign.status == CampaignStatus::Running
                        && run.start_room(now, shared) > 0 =>
                {
                    let mut j = job.clone();
                    j.state = JobState::Notified;
                    j.notified_ms = Some(now);
                    j.updated_ms = now;
                    if shared {
                        if !self.shared.store.put_campaign_if(None, &[(&j, &job)])? {
                            continue;
                        }
                    } else {
                        self.shared
                            .store
                            .put_campaign(&run.campaign, std::slice::from_ref(&j))?;
                    }
                    run.starts.push_back(now);
                    run.jobs[i] = j.clone();
                    drop(book);
                    self.ota_changed();
                    Ok(Some(Notice::Job {
                        job: j,
                        artifact: Box::new(artifact),
                    }))
                }
                _ => Ok(None),
            };
        }
        Err(lost_race(device_id))
    }

    /// The artifact of a device's job in progress (`job_id`: its campaign),
    /// for downloads: only a device told of a job may fetch its image.
    pub fn ota_artifact_for(&self, device_id: &str, job_id: &str) -> Result<Artifact> {
        let mut ota = self.shared.ota.lock();
        if self.shared.store.is_shared() {
            self.refresh_stored_job(&mut ota, job_id, device_id)?;
        }
        let run = ota
            .runs
            .get(job_id)
            .ok_or_else(|| RegistryError::NotFound(format!("job {job_id}")))?;
        let job = run
            .by_device
            .get(device_id)
            .map(|&i| &run.jobs[i])
            .ok_or_else(|| RegistryError::NotFound(format!("job {job_id} of {device_id}")))?;
        if !job.state.in_progress() {
            return Err(RegistryError::Conflict(format!(
                "job {job_id} is {}, not in progress",
                job.state.as_str()
            )));
        }
        ota.artifacts
            .get(&run.campaign.artifact_id)
            .cloned()
            .ok_or_else(|| {
                RegistryError::NotFound(format!("artifact {}", run.campaign.artifact_id))
            })
    }

    /// A device's report on its job. Returns the job as it now stands and
    /// the artifact (to record the version it runs). With a shared store
    /// the report applies to the stored job and is written conditionally
    /// (re-read and applied again when the ticking node wrote the job
    /// first), every report, so the ticking node sees the device's
    /// progress and does not time it out.
    pub fn ota_report(
        &self,
        device_id: &str,
        r: &StatusReport,
        now: i64,
    ) -> Result<(Job, Artifact)> {
        let shared = self.shared.store.is_shared();
        for _ in 0..RACE_RETRIES {
            let mut book = self.shared.ota.lock();
            let ota = &mut *book;
            if shared {
                self.refresh_stored_job(ota, &r.job_id, device_id)?;
            }
            let run = ota
                .runs
                .get_mut(&r.job_id)
                .ok_or_else(|| RegistryError::NotFound(format!("job {}", r.job_id)))?;
            let i = *run.by_device.get(device_id).ok_or_else(|| {
                RegistryError::NotFound(format!("job {} of {device_id}", r.job_id))
            })?;
            let artifact = ota
                .artifacts
                .get(&run.campaign.artifact_id)
                .cloned()
                .ok_or_else(|| {
                    RegistryError::NotFound(format!("artifact {}", run.campaign.artifact_id))
                })?;
            let job = run.jobs[i].clone();
            let j = apply_report(&job, r, &artifact, now)?;
            if shared {
                if !self.shared.store.put_campaign_if(None, &[(&j, &job)])? {
                    continue;
                }
            } else if j.state != job.state {
                // A progress report within a state is kept in memory only:
                // the store is written on state changes.
                self.shared
                    .store
                    .put_campaign(&run.campaign, std::slice::from_ref(&j))?;
            }
            apply_jobs(run, &mut ota.active, vec![j.clone()]);
            let changed = shared || j.state != job.state;
            drop(book);
            if changed {
                self.ota_changed();
            }
            return Ok((j, artifact));
        }
        Err(lost_race(&r.job_id))
    }

    /// Bring one device's job up to date from a shared store. A campaign
    /// this node has not heard of yet (made on another node an instant
    /// ago; the driving node may tell its devices before this node's
    /// reload) is read whole.
    fn refresh_stored_job(
        &self,
        ota: &mut OtaBook,
        campaign_id: &str,
        device_id: &str,
    ) -> Result<()> {
        if ota.runs.contains_key(campaign_id) {
            if let Some(j) = self.shared.store.stored_job(campaign_id, device_id)? {
                ota.refresh_job(j);
            }
        } else if let Some((c, jobs)) = self.shared.store.stored_campaign(campaign_id)? {
            ota.refresh_run(c, jobs);
        }
        Ok(())
    }

    /// Read everything OTA again from the store: another node changed a
    /// campaign, a job or an artifact. Returns the artifacts that are gone
    /// (their cached images can go too).
    pub fn reload_ota(&self) -> Result<Vec<String>> {
        let (artifacts, campaigns, jobs) = self.shared.store.load_ota()?;
        Ok(self.shared.ota.lock().reload(artifacts, campaigns, jobs))
    }

    /// The campaigns not finished, which a cluster node wants a lease on.
    pub fn ota_unfinished(&self) -> BTreeSet<String> {
        self.shared
            .ota
            .lock()
            .runs
            .values()
            .filter(|r| !r.campaign.status.is_over())
            .map(|r| r.campaign.id.clone())
            .collect()
    }

    /// Devices a tick of the campaigns `drives` picks may tell (their jobs
    /// wait), at most `limit`: in a cluster, whether they are online is
    /// asked of every node before the tick.
    pub fn ota_waiting_devices(&self, drives: &dyn Fn(&str) -> bool, limit: usize) -> Vec<String> {
        let ota = self.shared.ota.lock();
        ota.runs
            .values()
            .filter(|r| r.campaign.status == CampaignStatus::Running && drives(&r.campaign.id))
            .flat_map(|r| {
                // Pending jobs, and those of the wave a tick may start.
                let next = r.started_waves();
                r.jobs.iter().filter(move |j| {
                    j.state == JobState::Pending || (j.state == JobState::Queued && j.wave == next)
                })
            })
            .take(limit)
            .map(|j| j.device_id.clone())
            .collect()
    }

    /// Called after every OTA change this node wrote (a cluster tells the
    /// other nodes, which reload): one listener, a later call replaces it.
    pub fn on_ota_change(&self, f: Arc<dyn Fn() + Send + Sync>) {
        *self.shared.ota_watch.write() = Some(f);
    }

    fn ota_changed(&self) {
        let f = self.shared.ota_watch.read().clone();
        if let Some(f) = f {
            f();
        }
    }
}

/// Conditional writes lost to another node in a row before giving up
/// (each retry reads again; losing this often means heavy contention).
const RACE_RETRIES: usize = 4;

fn lost_race(what: &str) -> RegistryError {
    RegistryError::Conflict(format!(
        "{what} changed on another node meanwhile, several times: try again"
    ))
}

/// Each changed job with the job as this node read it, for a conditional
/// write.
fn read_pairs<'a>(run: &'a Run, changed: &'a [Job]) -> Vec<(&'a Job, &'a Job)> {
    changed
        .iter()
        .filter_map(|j| run.by_device.get(&j.device_id).map(|&i| (j, &run.jobs[i])))
        .collect()
}

/// A device's report applied to its job as it stands.
fn apply_report(job: &Job, r: &StatusReport, artifact: &Artifact, now: i64) -> Result<Job> {
    if !job.state.in_progress() {
        return Err(RegistryError::Conflict(format!(
            "job {} is {}: no report is expected",
            r.job_id,
            job.state.as_str()
        )));
    }
    if matches!(
        r.state,
        JobState::Queued
            | JobState::Pending
            | JobState::Notified
            | JobState::Cancelled
            | JobState::Expired
    ) {
        return Err(RegistryError::Validation(format!(
            "`state` must be downloading, verifying, installing, succeeded, failed or rejected, not {}",
            r.state.as_str()
        )));
    }
    let mut j = job.clone();
    j.state = r.state;
    j.updated_ms = now;
    if let Some(p) = r.progress {
        j.progress = p.min(100);
    }
    j.reason = r.reason.as_ref().map(|s| s.chars().take(256).collect());
    if r.state == JobState::Succeeded {
        j.progress = 100;
        match &r.version {
            Some(v) if *v != artifact.version => {
                j.state = JobState::Failed;
                j.reason = Some(format!(
                    "reported version {v} after the install, expected {}",
                    artifact.version
                ));
            }
            _ => {}
        }
    }
    if j.state.is_failure() && j.reason.is_none() {
        j.reason = Some("no reason given".into());
    }
    Ok(j)
}

/// Put changed jobs in place and keep the device index in step.
fn apply_jobs(run: &mut Run, active: &mut HashMap<String, String>, jobs: Vec<Job>) {
    for j in jobs {
        if let Some(&i) = run.by_device.get(&j.device_id) {
            if j.state.is_over() && active.get(&j.device_id) == Some(&j.campaign_id) {
                active.remove(&j.device_id);
            }
            run.jobs[i] = j;
        }
    }
}

/// Cancel every job not begun; devices already told are told it is off.
fn stop_waiting(run: &Run, now: i64, reason: &str) -> (Vec<Job>, Vec<Notice>) {
    let mut changed = Vec::new();
    let mut notices = Vec::new();
    for j in &run.jobs {
        if matches!(
            j.state,
            JobState::Queued | JobState::Pending | JobState::Notified
        ) {
            let mut c = j.clone();
            let told = j.state == JobState::Notified;
            c.state = JobState::Cancelled;
            c.reason = Some(reason.into());
            c.updated_ms = now;
            if told {
                notices.push(Notice::Cancelled { job: c.clone() });
            }
            changed.push(c);
        }
    }
    (changed, notices)
}

/// One campaign's tick: the new campaign record (if it changed), the jobs
/// that changed, and the notices. Nothing is applied here.
fn step(
    run: &mut Run,
    artifacts: &BTreeMap<String, Artifact>,
    now: i64,
    online: &dyn Fn(&str) -> bool,
    shared: bool,
) -> (Option<Campaign>, Vec<Job>, Vec<Notice>) {
    let mut room = run.start_room(now, shared);
    let mut started_now = 0;
    let mut c = run.campaign.clone();
    let mut changed: HashMap<usize, Job> = HashMap::new();
    let mut notices = Vec::new();
    let current = |changed: &HashMap<usize, Job>, i: usize| -> JobState {
        changed.get(&i).map_or(run.jobs[i].state, |j| j.state)
    };

    // 1. Deadline and silence.
    let timeout_ms = (c.job_timeout_s as i64).saturating_mul(1000);
    let past_deadline = c.deadline_ms.is_some_and(|d| now >= d);
    for (i, j) in run.jobs.iter().enumerate() {
        if past_deadline && matches!(j.state, JobState::Queued | JobState::Pending) {
            let mut x = j.clone();
            x.state = JobState::Expired;
            x.reason = Some("the campaign's deadline passed before the device was told".into());
            x.updated_ms = now;
            changed.insert(i, x);
        } else if j.state.in_progress() && now - j.updated_ms >= timeout_ms {
            let mut x = j.clone();
            x.state = JobState::Failed;
            x.reason = Some(format!("no report for {} s", c.job_timeout_s));
            x.updated_ms = now;
            changed.insert(i, x);
        }
    }

    // 2. Abort on a wave's failures.
    let started = run.started_waves();
    let mut failures = vec![0usize; c.waves.len()];
    let mut busy = vec![0usize; c.waves.len()];
    for (i, j) in run.jobs.iter().enumerate() {
        let s = current(&changed, i);
        if s.is_failure() {
            failures[j.wave] += 1;
        }
        if s.in_progress() {
            busy[j.wave] += 1;
        }
    }
    let failed_wave = (0..started).find(|&w| {
        let size = c.waves[w].size.max(1);
        failures[w] as f64 / size as f64 > c.failure_threshold
    });
    if let Some(w) = failed_wave {
        let reason = format!(
            "wave {} failed on {} of {} devices (more than {:.0} %)",
            w + 1,
            failures[w],
            c.waves[w].size,
            c.failure_threshold * 100.0
        );
        // Apply the changes so far, then cancel what waits.
        let mut tmp = Run {
            campaign: c.clone(),
            jobs: run.jobs.clone(),
            by_device: HashMap::new(),
            starts: VecDeque::new(),
        };
        for (i, j) in &changed {
            tmp.jobs[*i] = j.clone();
        }
        let (cancelled, mut n) = stop_waiting(&tmp, now, &reason);
        for j in cancelled {
            if let Some(&i) = run.by_device.get(&j.device_id) {
                changed.insert(i, j);
            }
        }
        notices.append(&mut n);
        c.status = CampaignStatus::Aborted;
        c.reason = Some(reason);
        c.updated_ms = now;
        return (Some(c), changed.into_values().collect(), notices);
    }

    if c.status == CampaignStatus::Running && !past_deadline {
        // 3. The next wave.
        let next = started;
        if next < c.waves.len() {
            let prev_ok = next == 0 || {
                let prev_start = c.waves[next - 1].started_ms.unwrap_or(now);
                busy[next - 1] == 0 && now - prev_start >= (c.wave_wait_s as i64) * 1000
            };
            if prev_ok {
                c.waves[next].started_ms = Some(now);
                c.updated_ms = now;
                for (i, j) in run.jobs.iter().enumerate() {
                    if j.wave == next && current(&changed, i) == JobState::Queued {
                        let mut x = changed.get(&i).cloned().unwrap_or_else(|| j.clone());
                        x.state = JobState::Pending;
                        x.updated_ms = now;
                        changed.insert(i, x);
                    }
                }
            }
        }
        // 4. Tell online devices.
        if let Some(artifact) = artifacts.get(&c.artifact_id) {
            for (i, j) in run.jobs.iter().enumerate() {
                if room == 0 {
                    break;
                }
                if current(&changed, i) == JobState::Pending && online(&j.device_id) {
                    let mut x = changed.get(&i).cloned().unwrap_or_else(|| j.clone());
                    x.state = JobState::Notified;
                    x.notified_ms = Some(now);
                    x.updated_ms = now;
                    notices.push(Notice::Job {
                        job: x.clone(),
                        artifact: Box::new(artifact.clone()),
                    });
                    changed.insert(i, x);
                    started_now += 1;
                    room -= 1;
                }
            }
        }
    }

    run.starts.extend(std::iter::repeat_n(now, started_now));

    // 5. Done?
    let all_started = c.waves.iter().all(|w| w.started_ms.is_some()) || past_deadline;
    let all_over = (0..run.jobs.len()).all(|i| current(&changed, i).is_over());
    if all_started && all_over && !c.status.is_over() {
        c.status = CampaignStatus::Completed;
        c.updated_ms = now;
    }
    let campaign = (c != run.campaign).then_some(c);
    let mut jobs: Vec<(usize, Job)> = changed.into_iter().collect();
    jobs.sort_by_key(|(i, _)| *i);
    (
        campaign,
        jobs.into_iter().map(|(_, j)| j).collect(),
        notices,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;
    use m2mhub_identity::NewDevice;

    fn device(fleet: &Fleet, id: &str) {
        fleet
            .identity()
            .create_device(NewDevice {
                id: Some(id.into()),
                name: None,
                tenant: "default".into(),
                group: None,
                profile: None,
                labels: BTreeMap::new(),
                enabled: true,
            })
            .expect("device");
    }

    fn artifact_template(fleet: &Fleet) -> Artifact {
        Artifact {
            id: fleet.new_artifact_id(),
            tenant: "default".into(),
            name: "pump-fw".into(),
            version: "9.0".into(),
            hardware: None,
            profile: None,
            size: 10,
            sha256: "00".repeat(32),
            signature: String::new(),
            signed_by: SignedBy::Platform,
            created_ms: 1,
            created_by: "t".into(),
        }
    }

    fn artifact(fleet: &Fleet) -> Artifact {
        fleet
            .add_artifact(Artifact {
                id: fleet.new_artifact_id(),
                tenant: "default".into(),
                name: "fw".into(),
                version: "2.0".into(),
                hardware: None,
                profile: None,
                size: 10,
                sha256: "00".repeat(32),
                signature: String::new(),
                signed_by: SignedBy::Platform,
                created_ms: 1,
                created_by: "t".into(),
            })
            .expect("artifact")
    }

    fn report(fleet: &Fleet, d: &str, job: &str, state: JobState, now: i64) -> Job {
        fleet
            .ota_report(
                d,
                &StatusReport {
                    job_id: job.into(),
                    state,
                    progress: None,
                    reason: None,
                    version: (state == JobState::Succeeded).then(|| "2.0".into()),
                },
                now,
            )
            .expect("report")
            .0
    }

    fn told(n: &[Notice]) -> Vec<String> {
        let mut v: Vec<String> = n
            .iter()
            .filter_map(|n| match n {
                Notice::Job { job, .. } => Some(job.device_id.clone()),
                Notice::Cancelled { .. } => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Two fleets over one store marked shared, as two nodes of a cluster
    /// see theirs (SQLite standing in for PostgreSQL).
    fn two_nodes(dir: &std::path::Path) -> (Fleet, Fleet) {
        let reg = m2mhub_identity::Registry::open(dir).expect("registry");
        let node = || {
            let store = crate::sqlite::SqliteFleetStore::open(&dir.join("registry.db"))
                .expect("store")
                .shared();
            Fleet::with_store(Box::new(store), reg.clone()).expect("fleet")
        };
        (node(), node())
    }

    /// Two nodes over one store (SQLite standing in for the cluster's
    /// PostgreSQL): a device's report through one node is what the other,
    /// driving node's tick sees (no timeout of a device that reported), and
    /// a job the driving node timed out is not brought back by a report
    /// through a node whose copy still says it runs.
    #[test]
    fn nodes_sharing_the_store_neither_lose_nor_resurrect_a_job() {
        let dir = tempfile::tempdir().unwrap();
        let (driver, other) = two_nodes(dir.path());
        for d in ["d1", "d2"] {
            device(&driver, d);
        }
        let a = artifact(&driver);
        let c = driver
            .create_campaign(
                "default",
                NewCampaign {
                    artifact: a.id.clone(),
                    devices: Some(vec!["d1".into(), "d2".into()]),
                    job_timeout_s: Some(10),
                    failure_threshold: Some(1.0),
                    ..Default::default()
                },
                "ops",
                1_000,
            )
            .expect("campaign");
        other.reload_ota().expect("reload");
        assert_eq!(other.get_campaign(None, &c.id).expect("seen").1.len(), 2);

        // The driving node tells both devices.
        let n = driver.ota_tick(1_000, &|_| true).expect("tick");
        assert_eq!(told(&n), vec!["d1", "d2"]);
        // d1 reports through the other node, whose copy still says
        // pending: the report applies to the stored job.
        let j = report(&other, "d1", &c.id, JobState::Downloading, 8_000);
        assert_eq!((j.state, j.updated_ms), (JobState::Downloading, 8_000));
        // At 12 s the driving node's copy of d1 is silent for 11 s, but it
        // ticks from the store: only d2, really silent, fails.
        driver.ota_tick(12_000, &|_| true).expect("tick");
        let (_, jobs) = driver.get_campaign(None, &c.id).expect("campaign");
        let state = |d: &str| jobs.iter().find(|j| j.device_id == d).map(|j| j.state);
        assert_eq!(state("d1"), Some(JobState::Downloading));
        assert_eq!(state("d2"), Some(JobState::Failed));
        // d2 reports late through the other node, whose copy says notified:
        // refused, and the stored job stays failed.
        let late = other.ota_report(
            "d2",
            &StatusReport {
                job_id: c.id.clone(),
                state: JobState::Downloading,
                progress: Some(10),
                reason: None,
                version: None,
            },
            12_500,
        );
        assert!(matches!(late, Err(RegistryError::Conflict(_))), "{late:?}");
        other.reload_ota().expect("reload");
        let (_, jobs) = other.get_campaign(None, &c.id).expect("campaign");
        let d2 = jobs.iter().find(|j| j.device_id == "d2").expect("d2");
        assert_eq!(d2.state, JobState::Failed);
        // d1 finishes through the other node; the driver completes it.
        report(&other, "d1", &c.id, JobState::Succeeded, 13_000);
        driver.ota_tick(14_000, &|_| true).expect("tick");
        let (c, _) = driver.get_campaign(None, &c.id).expect("campaign");
        assert_eq!(c.status, CampaignStatus::Completed);
    }

    /// An operator pauses a campaign through a node that does not drive
    /// it: the driving node, whose copy still says running, ticks from the
    /// store and tells no one until it is resumed.
    #[test]
    fn a_pause_through_another_node_holds_the_driving_node() {
        let dir = tempfile::tempdir().unwrap();
        let (driver, other) = two_nodes(dir.path());
        device(&driver, "d1");
        let a = artifact(&driver);
        let c = driver
            .create_campaign(
                "default",
                NewCampaign {
                    artifact: a.id.clone(),
                    devices: Some(vec!["d1".into()]),
                    ..Default::default()
                },
                "ops",
                1_000,
            )
            .expect("campaign");
        other.reload_ota().expect("reload");
        other
            .pause_campaign(None, &c.id, true, 1_500)
            .expect("pause");
        assert!(told(&driver.ota_tick(2_000, &|_| true).expect("tick")).is_empty());
        assert_eq!(
            driver.get_campaign(None, &c.id).expect("campaign").0.status,
            CampaignStatus::Paused
        );
        // Resumed through the other node (which decides from the stored
        // campaign too): the driver tells the device on its next tick.
        other
            .pause_campaign(None, &c.id, false, 2_500)
            .expect("resume");
        assert_eq!(
            told(&driver.ota_tick(3_000, &|_| true).expect("tick")),
            vec!["d1"]
        );
    }

    #[test]
    fn waves_are_planned_with_the_rest_in_the_last() {
        assert_eq!(plan_waves(10, &[]).unwrap(), vec![10]);
        assert_eq!(
            plan_waves(
                100,
                &[
                    WaveSize::Percent(10.0),
                    WaveSize::Percent(30.0),
                    WaveSize::Count(20)
                ]
            )
            .unwrap(),
            vec![10, 30, 60]
        );
        assert_eq!(
            plan_waves(3, &[WaveSize::Count(5), WaveSize::Count(5)]).unwrap(),
            vec![3, 0]
        );
        assert!(plan_waves(3, &[WaveSize::Percent(0.0)]).is_err());
        assert!(plan_waves(3, &[WaveSize::Count(0)]).is_err());
    }

    /// Waves start one after the other once the previous has settled and
    /// the wait has passed; offline devices are told when they return; the
    /// campaign completes and survives a reopen.
    #[test]
    fn a_campaign_runs_in_waves_with_a_fake_clock() {
        let dir = tempfile::tempdir().unwrap();
        let cid;
        {
            let fleet = testutil::open_in(dir.path());
            for i in 0..4 {
                device(&fleet, &format!("d{i}"));
            }
            let a = artifact(&fleet);
            let c = fleet
                .create_campaign(
                    "default",
                    NewCampaign {
                        artifact: a.id.clone(),
                        waves: vec![WaveSize::Count(2), WaveSize::Count(2)],
                        wave_wait_s: 60,
                        ..Default::default()
                    },
                    "op",
                    0,
                )
                .unwrap();
            cid = c.id.clone();
            assert_eq!(
                c.waves.iter().map(|w| w.size).collect::<Vec<_>>(),
                vec![2, 2]
            );
            // d1 is offline: only d0 is told.
            let online = |d: &str| d != "d1";
            let n = fleet.ota_tick(1_000, &online).unwrap();
            assert_eq!(told(&n), vec!["d0"]);
            // Nothing new while the wave is under way.
            assert!(fleet.ota_tick(2_000, &online).unwrap().is_empty());
            report(&fleet, "d0", &cid, JobState::Downloading, 3_000);
            report(&fleet, "d0", &cid, JobState::Succeeded, 4_000);
            // d1 pending (offline) does not hold the wave back, but the wait does.
            assert!(fleet.ota_tick(30_000, &online).unwrap().is_empty());
            let n = fleet.ota_tick(61_000, &online).unwrap();
            assert_eq!(told(&n), vec!["d2", "d3"]);
            // d1 returns and asks.
            match fleet.ota_job_for("d1", 62_000).unwrap() {
                Some(Notice::Job { job, artifact }) => {
                    assert_eq!(job.state, JobState::Notified);
                    assert_eq!(artifact.version, "2.0");
                }
                other => panic!("{other:?}"),
            }
        }
        // Reopen: the state is what it was.
        let fleet = testutil::open_in(dir.path());
        let (c, jobs) = fleet.get_campaign(None, &cid).unwrap();
        assert_eq!(c.status, CampaignStatus::Running);
        let t = tally(&jobs);
        assert_eq!((t["succeeded"], t["notified"]), (1, 3), "{t:?}");
        for d in ["d1", "d2", "d3"] {
            report(&fleet, d, &cid, JobState::Succeeded, 70_000);
        }
        fleet.ota_tick(71_000, &|_| true).unwrap();
        let (c, _) = fleet.get_campaign(None, &cid).unwrap();
        assert_eq!(c.status, CampaignStatus::Completed);
        // A finished campaign frees its devices and its artifact.
        fleet.delete_artifact(None, &c.artifact_id).unwrap();
    }

    #[test]
    fn failures_past_the_threshold_abort_and_cancel_what_waits() {
        let (_dir, fleet) = testutil::open();
        for i in 0..10 {
            device(&fleet, &format!("d{i}"));
        }
        let a = artifact(&fleet);
        let c = fleet
            .create_campaign(
                "default",
                NewCampaign {
                    artifact: a.id.clone(),
                    waves: vec![WaveSize::Count(4), WaveSize::Percent(100.0)],
                    failure_threshold: Some(0.25),
                    ..Default::default()
                },
                "op",
                0,
            )
            .unwrap();
        let n = fleet.ota_tick(1, &|_| true).unwrap();
        assert_eq!(told(&n).len(), 4);
        // Deleting the artifact is refused while the campaign runs.
        assert!(matches!(
            fleet.delete_artifact(None, &a.id),
            Err(RegistryError::Conflict(_))
        ));
        report(&fleet, "d0", &c.id, JobState::Failed, 2);
        fleet.ota_tick(3, &|_| true).unwrap();
        assert_eq!(
            fleet.get_campaign(None, &c.id).unwrap().0.status,
            CampaignStatus::Running
        );
        report(&fleet, "d1", &c.id, JobState::Rejected, 4);
        let n = fleet.ota_tick(5, &|_| true).unwrap();
        let (c, jobs) = fleet.get_campaign(None, &c.id).unwrap();
        assert_eq!(c.status, CampaignStatus::Aborted, "{c:?}");
        assert!(
            c.reason.as_deref().unwrap_or("").contains("wave 1"),
            "{c:?}"
        );
        let t = tally(&jobs);
        // d2, d3 were told and hear it is off; the 6 queued are cancelled.
        assert_eq!(t["cancelled"], 8, "{t:?}");
        assert_eq!(
            n.iter()
                .filter(|n| matches!(n, Notice::Cancelled { .. }))
                .count(),
            2
        );
        // The devices are free for another campaign.
        let again = fleet
            .create_campaign(
                "default",
                NewCampaign {
                    artifact: a.id.clone(),
                    ..Default::default()
                },
                "op",
                6,
            )
            .unwrap();
        assert!(again.skipped.is_empty());
    }

    #[test]
    fn rate_limit_deadline_silence_and_version_checks() {
        let (_dir, fleet) = testutil::open();
        for i in 0..5 {
            device(&fleet, &format!("d{i}"));
        }
        let a = artifact(&fleet);
        let c = fleet
            .create_campaign(
                "default",
                NewCampaign {
                    artifact: a.id.clone(),
                    max_starts_per_minute: Some(2),
                    deadline_ms: Some(100_000),
                    job_timeout_s: Some(300),
                    failure_threshold: Some(1.0),
                    ..Default::default()
                },
                "op",
                0,
            )
            .unwrap();
        // A device already in a campaign is skipped by the next one.
        let other = fleet.create_campaign(
            "default",
            NewCampaign {
                artifact: a.id.clone(),
                devices: Some(vec!["d0".into()]),
                ..Default::default()
            },
            "op",
            0,
        );
        assert!(
            matches!(other, Err(RegistryError::Validation(_))),
            "{other:?}"
        );
        assert_eq!(told(&fleet.ota_tick(1_000, &|_| true).unwrap()).len(), 2);
        assert!(fleet.ota_tick(2_000, &|_| true).unwrap().is_empty());
        assert_eq!(told(&fleet.ota_tick(61_001, &|_| true).unwrap()).len(), 2);
        // A wrong version after the install is a failure.
        let j = fleet
            .ota_report(
                "d0",
                &StatusReport {
                    job_id: c.id.clone(),
                    state: JobState::Succeeded,
                    progress: None,
                    reason: None,
                    version: Some("1.9".into()),
                },
                62_000,
            )
            .unwrap()
            .0;
        assert_eq!(j.state, JobState::Failed);
        // A report on a finished job is refused.
        assert!(fleet
            .ota_report(
                "d0",
                &StatusReport {
                    job_id: c.id.clone(),
                    state: JobState::Installing,
                    progress: None,
                    reason: None,
                    version: None
                },
                62_001
            )
            .is_err());
        // The deadline expires the one never told; silence fails the rest.
        fleet.ota_tick(100_000, &|_| false).unwrap();
        fleet.ota_tick(400_000, &|_| false).unwrap();
        let (c, jobs) = fleet.get_campaign(None, &c.id).unwrap();
        let t = tally(&jobs);
        assert_eq!((t["expired"], t["failed"]), (1, 4), "{t:?}");
        assert_eq!(c.status, CampaignStatus::Completed);
    }

    #[test]
    fn an_image_for_one_profile_skips_devices_of_another() {
        let (_dir, fleet) = testutil::open();
        device(&fleet, "d0");
        let a = fleet
            .add_artifact(Artifact {
                profile: Some("pump".into()),
                ..artifact_template(&fleet)
            })
            .unwrap();
        let e = fleet.create_campaign(
            "default",
            NewCampaign {
                artifact: a.id.clone(),
                ..Default::default()
            },
            "op",
            0,
        );
        match e {
            Err(RegistryError::Validation(m)) => {
                assert!(m.contains("the image is for pump"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pause_resume_cancel() {
        let (_dir, fleet) = testutil::open();
        for i in 0..3 {
            device(&fleet, &format!("d{i}"));
        }
        let a = artifact(&fleet);
        let c = fleet
            .create_campaign(
                "default",
                NewCampaign {
                    artifact: a.id.clone(),
                    ..Default::default()
                },
                "op",
                0,
            )
            .unwrap();
        fleet.pause_campaign(None, &c.id, true, 1).unwrap();
        assert!(fleet.ota_tick(2, &|_| true).unwrap().is_empty());
        assert!(fleet.ota_job_for("d0", 3).unwrap().is_none());
        fleet.pause_campaign(None, &c.id, false, 4).unwrap();
        assert_eq!(
            told(&fleet.ota_tick(5, &|d| d == "d0").unwrap()),
            vec!["d0"]
        );
        let (c2, n) = fleet.cancel_campaign(None, &c.id, "operator", 6).unwrap();
        assert_eq!(c2.status, CampaignStatus::Cancelled);
        assert_eq!(n.len(), 1, "only d0 was told");
        assert!(fleet.cancel_campaign(None, &c.id, "again", 7).is_err());
        assert!(fleet.get_campaign(Some("other"), &c.id).is_err());
    }
}
