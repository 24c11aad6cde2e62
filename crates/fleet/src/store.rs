//! The storage boundary of fleet operations. [`Fleet`](crate::Fleet) keeps
//! rules, active alarms and open commands in memory and calls this trait to
//! make each change durable; all SQL lives in the implementation
//! ([`crate::sqlite`]; PostgreSQL in `m2mhub-pgstore`, held to the same
//! semantics by one conformance suite).
//!
//! Callers guarantee the invariants (existence, uniqueness, limits) before
//! calling; a backend only has to apply each call atomically. Errors are the
//! shared [`RegistryError`](crate::RegistryError) kinds, which the API maps
//! to HTTP problems in one place.

use crate::alarm::{Alarm, AlarmFilter};
use crate::command::Command;
use crate::dashboard::{Dashboard, DashboardShare};
use crate::device_event::DeviceEvent;
use crate::diagnostic::DiagnosticBundle;
use crate::ota::{Artifact, Campaign, Job};
use crate::report::{Report, ReportRun};
use crate::rule::Rule;
use crate::setting::FleetSetting;
use crate::shadow::Shadow;
use crate::Result;

/// Everything fleet operations cache, as loaded at open.
#[derive(Debug, Default)]
pub struct FleetSnapshot {
    pub rules: Vec<Rule>,
    /// Alarms whose status is active.
    pub active_alarms: Vec<Alarm>,
    /// The largest alarm id (0 when there are none).
    pub alarm_seq: u64,
    /// Commands not finished (pending, sent or delivered).
    pub open_commands: Vec<Command>,
    /// The largest device event id (0 when there are none).
    pub device_event_seq: u64,
    /// Every device shadow.
    pub shadows: Vec<Shadow>,
    /// Every firmware artifact, campaign and job.
    pub artifacts: Vec<Artifact>,
    pub campaigns: Vec<Campaign>,
    pub jobs: Vec<Job>,
}

/// What the background writer appends in one transaction.
#[derive(Debug, Clone, Copy)]
pub struct FleetBatch<'a> {
    pub device_events: &'a [DeviceEvent],
    /// After inserting `device_events`, keep only this many of the newest
    /// stored events of each device named in them.
    pub device_events_kept: usize,
    /// Inserted or replaced (by id).
    pub alarms: &'a [Alarm],
    /// Keep only this many of the newest cleared alarms of each device
    /// with a cleared alarm in `alarms`.
    pub alarms_kept: usize,
    /// Inserted or replaced (by id).
    pub commands: &'a [Command],
    /// Keep only this many of the newest finished commands of each device
    /// with a finished command in `commands`.
    pub commands_kept: usize,
}

/// Durable storage for fleet operations.
pub trait FleetStore: Send + Sync + 'static {
    fn load(&self) -> Result<FleetSnapshot>;

    fn insert_rule(&self, r: &Rule) -> Result<()>;
    /// Update everything but the id, tenant and creation time.
    fn update_rule(&self, r: &Rule) -> Result<()>;
    fn delete_rule(&self, id: &str) -> Result<()>;

    /// Delete everything kept about a device (events, alarms, commands,
    /// shadows, OTA jobs, diagnostic bundles' rows).
    fn delete_device(&self, device_id: &str) -> Result<()>;

    /// Append everything in `batch` in one transaction.
    fn append(&self, batch: &FleetBatch<'_>) -> Result<()>;
    /// A device's events, newest first: of `tenant` and `kind` if given,
    /// with an id below `before` if given, at most `limit`.
    fn list_device_events(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        kind: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeviceEvent>>;

    /// Reserve `n` ids of `kind` for this node alone and return the first
    /// (see `ids.rs`); `None` (the default): this store has one writer, and
    /// ids simply continue from the largest stored.
    fn reserve_ids(&self, kind: crate::ids::IdKind, n: u64) -> Result<Option<u64>> {
        let _ = (kind, n);
        Ok(None)
    }

    /// Insert or replace one alarm now (outside the batches).
    fn put_alarm(&self, a: &Alarm) -> Result<()>;
    fn get_alarm(&self, id: u64) -> Result<Option<Alarm>>;
    /// Alarms matching `f` (its `limit` is replaced by `limit`), newest first.
    fn list_alarms(&self, f: &AlarmFilter, limit: usize) -> Result<Vec<Alarm>>;
    fn get_command(&self, id: &str) -> Result<Option<Command>>;
    /// Insert or replace a shadow, durably (an accepted update must survive
    /// a crash).
    fn put_shadow(&self, s: &Shadow) -> Result<()>;
    fn delete_shadow(&self, device_id: &str, name: &str) -> Result<()>;
    /// Insert or replace many shadows in one transaction (a fleet-wide
    /// setting).
    fn put_shadows(&self, shadows: &[&Shadow]) -> Result<()>;

    /// Write `s` only if the stored shadow is still at `prev_version` (0:
    /// absent): false when another node sharing the store changed it
    /// first. The default, for a store with one writer, always writes.
    fn put_shadow_if(&self, s: &Shadow, prev_version: u64) -> Result<bool> {
        let _ = prev_version;
        self.put_shadow(s).map(|_| true)
    }

    /// [`FleetStore::put_shadow_if`] for many shadows in one transaction:
    /// which of them were written.
    fn put_shadows_if(&self, shadows: &[(&Shadow, u64)]) -> Result<Vec<bool>> {
        let all: Vec<&Shadow> = shadows.iter().map(|(s, _)| *s).collect();
        self.put_shadows(&all)?;
        Ok(vec![true; shadows.len()])
    }

    /// The stored shadow, bypassing any node's memory (after
    /// [`FleetStore::put_shadow_if`] lost); `None` where the store has one
    /// writer and memory is the truth.
    fn stored_shadow(&self, device_id: &str, name: &str) -> Result<Option<Shadow>> {
        let _ = (device_id, name);
        Ok(None)
    }
    /// Record a fleet-wide setting, keeping only the newest `kept`.
    fn put_setting(&self, s: &FleetSetting, kept: usize) -> Result<()>;
    fn get_setting(&self, id: &str) -> Result<Option<FleetSetting>>;
    /// Newest first, of `tenant` if given.
    fn list_settings(&self, tenant: Option<&str>, limit: usize) -> Result<Vec<FleetSetting>>;
    fn put_artifact(&self, a: &Artifact) -> Result<()>;
    fn delete_artifact(&self, id: &str) -> Result<()>;
    /// Insert or replace a campaign and some of its jobs in one
    /// transaction.
    fn put_campaign(&self, c: &Campaign, jobs: &[Job]) -> Result<()>;

    /// Whether other processes (cluster nodes) write this store too. Then
    /// OTA reads a campaign's current state from the store before acting
    /// on it and writes with [`FleetStore::put_campaign_if`]; with one
    /// writer (the default) memory is the truth.
    fn is_shared(&self) -> bool {
        false
    }

    /// Every artifact, campaign and job as stored (another node changed
    /// them).
    fn load_ota(&self) -> Result<(Vec<Artifact>, Vec<Campaign>, Vec<Job>)>;

    /// One campaign and all its jobs as stored; `None` when it is gone.
    fn stored_campaign(&self, id: &str) -> Result<Option<(Campaign, Vec<Job>)>>;

    /// One device's job in a campaign, as stored.
    fn stored_job(&self, campaign_id: &str, device_id: &str) -> Result<Option<Job>>;

    /// Write only what is still as this node read it, all or nothing, in
    /// one transaction: the campaign (if given) only if the stored one's
    /// `updated_ms` is the given one, and each job `(new, read)` only if
    /// the stored job is exactly `read`. `false`, with nothing written,
    /// when another node changed any of them first (a device's report on
    /// one node and a timeout on the ticking node: neither overwrites the
    /// other; the loser reads again and decides again).
    fn put_campaign_if(
        &self,
        campaign: Option<(&Campaign, i64)>,
        jobs: &[(&Job, &Job)],
    ) -> Result<bool>;
    /// A device's commands, newest (by creation, then id) first: of
    /// `tenant` if given, older than the command `before` if given.
    fn list_commands(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>>;

    /// Insert a new diagnostic bundle request.
    fn insert_diagnostic(&self, b: &DiagnosticBundle) -> Result<()>;
    /// Replace everything but the id, tenant, device and token hash
    /// (`NotFound` if it is gone).
    fn update_diagnostic(&self, b: &DiagnosticBundle) -> Result<()>;
    fn get_diagnostic(&self, id: &str) -> Result<Option<DiagnosticBundle>>;
    /// The request whose upload token hashes to `token_hash` (hex).
    fn find_diagnostic_by_token(&self, token_hash: &str) -> Result<Option<DiagnosticBundle>>;
    /// A device's bundles, newest first: of `tenant` if given.
    fn list_diagnostics(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<DiagnosticBundle>>;
    fn delete_diagnostic(&self, id: &str) -> Result<()>;
    /// Bundles with something for the sweep to do: requests whose URL
    /// expired at or before `expired_at`, and anything uploaded (or, never
    /// uploaded, whose URL expired) at or before `retained_until`.
    fn diagnostics_due(
        &self,
        expired_at: i64,
        retained_until: i64,
    ) -> Result<Vec<DiagnosticBundle>>;

    /// Insert or replace a dashboard (by id).
    fn put_dashboard(&self, d: &Dashboard) -> Result<()>;
    fn get_dashboard(&self, id: &str) -> Result<Option<Dashboard>>;
    /// Dashboards of `tenant` if given, else all; in any order.
    fn list_dashboards(&self, tenant: Option<&str>) -> Result<Vec<Dashboard>>;
    /// Delete a dashboard and all its shares in one transaction.
    fn delete_dashboard(&self, id: &str) -> Result<()>;
    /// Insert or replace a share (by id); token hashes are unique.
    fn put_dashboard_share(&self, s: &DashboardShare) -> Result<()>;
    /// A dashboard's shares, revoked and expired included; in any order.
    fn list_dashboard_shares(&self, dashboard_id: &str) -> Result<Vec<DashboardShare>>;
    /// The share whose token hashes to `token_hash` (hex SHA-256),
    /// whatever its state.
    fn find_dashboard_share(&self, token_hash: &str) -> Result<Option<DashboardShare>>;

    /// Insert or replace a report definition (by id).
    fn put_report(&self, r: &Report) -> Result<()>;
    /// Move a definition's next run from `due_ms` to `next_run_ms`, only if
    /// it is still `due_ms`; `false` when it is not (another node's
    /// scheduler claimed this run first, or the definition changed or is
    /// gone). Atomic against other nodes sharing the store, so each
    /// scheduled run is made by exactly one of them.
    fn claim_report_run(&self, id: &str, due_ms: i64, next_run_ms: Option<i64>) -> Result<bool>;
    /// Delete a report definition and every row of its runs in one
    /// transaction (`NotFound` if it is gone).
    fn delete_report(&self, id: &str) -> Result<()>;
    /// Every report definition, of every tenant, in any order.
    fn list_reports(&self) -> Result<Vec<Report>>;
    /// Insert or replace a report run (by id).
    fn put_report_run(&self, run: &ReportRun) -> Result<()>;
    /// A report's runs, newest (by start, then id) first, at most `limit`.
    fn list_report_runs(&self, report_id: &str, limit: usize) -> Result<Vec<ReportRun>>;
    /// Delete these runs' rows (ids that are gone are ignored).
    fn delete_report_runs(&self, ids: &[String]) -> Result<()>;
}
