//! Scheduled report definitions and the record of their runs, as stored.
//!
//! This module only keeps them: what a report computes, when it runs and
//! how it is delivered are `m2mhub-reports`' business, which validates a
//! definition (its time zone, its schedule) before it reaches
//! [`Fleet::create_report`]. The definitions are few and read rarely (the
//! scheduler once a minute, the API on request), so they are not cached:
//! every call goes to the [`FleetStore`](crate::FleetStore). Runs' files
//! (CSV, HTML) live under the data directory, not here; a run's row says
//! where its files are by its id.

use crate::{Fleet, RegistryError, Result};
use m2mhub_identity::ids::{new_id, validate_id, validate_name};
use serde::{Deserialize, Serialize};

/// Report definitions per tenant at most.
pub const MAX_REPORTS_PER_TENANT: usize = 100;

/// What a report computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReportKind {
    /// Energy per meter and local day from a metric: a cumulative counter
    /// (`mode = counter`: its increase, resets counted from zero) or a
    /// per-interval quantity (`mode = sum`).
    Energy {
        metric: String,
        #[serde(default)]
        mode: EnergyMode,
    },
    /// Share of the period each device was connected, from its connection
    /// history.
    Availability,
    /// Alarms raised or open in the period: counts by severity and type,
    /// the longest open.
    Alarms,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergyMode {
    #[default]
    Counter,
    Sum,
}

/// How often a report runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frequency {
    Daily,
    Weekly,
    Monthly,
}

/// When a report runs, in a time zone's wall-clock time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub every: Frequency,
    /// Local time of day, `HH:MM`.
    pub at: String,
    /// Weekly: 1 (Monday) to 7 (Sunday).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekday: Option<u8>,
    /// Monthly: 1 to 31; a shorter month runs on its last day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<u8>,
    /// An IANA time zone (`Europe/Berlin`), `UTC`, or a fixed offset
    /// (`+05:30`).
    pub time_zone: String,
}

/// Where a run's result goes besides the download list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// Mail recipients (the CSV attached, the HTML as the body).
    #[serde(default)]
    pub email: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<ReportWebhook>,
}

/// A webhook told about every run, with the download links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportWebhook {
    pub url: String,
    /// HMAC-SHA256 key of the signature header, like rule webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// How many runs (and their files) are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRetention {
    /// The newest this many runs are kept (at least 1).
    pub keep_runs: u32,
    /// Runs older than this many days are deleted (0: no age limit).
    #[serde(default)]
    pub keep_days: u32,
}

impl Default for RunRetention {
    fn default() -> Self {
        RunRetention {
            keep_runs: 30,
            keep_days: 0,
        }
    }
}

/// A stored report definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub kind: ReportKind,
    /// Devices included; empty: every device of the tenant.
    pub devices: Vec<String>,
    pub schedule: Schedule,
    pub delivery: Delivery,
    pub retention: RunRetention,
    pub enabled: bool,
    /// When the scheduler runs it next (computed by `m2mhub-reports`);
    /// `None` while disabled.
    pub next_run_ms: Option<i64>,
    pub created_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunTrigger {
    Schedule,
    Manual,
}

/// How one delivery of a run went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryOutcome {
    /// `email` or `webhook`.
    pub channel: String,
    /// The recipients or the URL.
    pub target: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Attempts made so far (a failed delivery is retried a few times).
    #[serde(default = "one")]
    pub attempts: u32,
    /// When the next attempt is due, while a failed delivery has retries
    /// left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_ms: Option<i64>,
}

fn one() -> u32 {
    1
}

/// One run of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRun {
    pub id: String,
    pub report_id: String,
    pub tenant: String,
    pub trigger: RunTrigger,
    pub started_ms: i64,
    pub finished_ms: i64,
    /// The period reported on, `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Whether the report was rendered; a failed delivery does not fail
    /// the run (see `deliveries`).
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Data rows in the CSV.
    pub rows: u64,
    pub csv_bytes: u64,
    pub html_bytes: u64,
    pub deliveries: Vec<DeliveryOutcome>,
}

impl Fleet {
    /// Store a new definition (its id generated unless given).
    pub fn create_report(&self, mut r: Report) -> Result<Report> {
        validate_name("report", &r.name)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        if !s.identity.has_tenant(&r.tenant) {
            return Err(RegistryError::NotFound(format!("tenant {}", r.tenant)));
        }
        let all = s.store.list_reports()?;
        if all.iter().filter(|x| x.tenant == r.tenant).count() >= MAX_REPORTS_PER_TENANT {
            return Err(RegistryError::Conflict(format!(
                "tenant {} has {MAX_REPORTS_PER_TENANT} reports, the most it may have",
                r.tenant
            )));
        }
        if r.id.is_empty() {
            r.id = loop {
                let id = new_id("rep");
                if !all.iter().any(|x| x.id == id) {
                    break id;
                }
            };
        } else {
            validate_id("report", &r.id)?;
            if all.iter().any(|x| x.id == r.id) {
                return Err(RegistryError::AlreadyExists(format!("report {}", r.id)));
            }
        }
        s.store.put_report(&r)?;
        Ok(r)
    }

    /// Replace a definition (`NotFound` if it is gone); id, tenant and
    /// creation are kept from the stored one.
    pub fn update_report(&self, r: &Report) -> Result<Report> {
        validate_name("report", &r.name)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        let old = self.get_report(&r.id)?;
        let new = Report {
            id: old.id,
            tenant: old.tenant,
            created_by: old.created_by,
            created_ms: old.created_ms,
            ..r.clone()
        };
        s.store.put_report(&new)?;
        Ok(new)
    }

    /// Move a definition's next run (the scheduler), leaving everything else
    /// as stored: a change made through the API meanwhile is kept.
    pub fn set_report_next_run(&self, id: &str, next_run_ms: Option<i64>) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut r = self.get_report(id)?;
        r.next_run_ms = next_run_ms;
        s.store.put_report(&r)
    }

    /// Claim the scheduled run due at `due_ms` and move the next run to
    /// `next_run_ms`: `true` for the one scheduler (of all nodes sharing the
    /// store) that gets it.
    pub fn claim_report_run(
        &self,
        id: &str,
        due_ms: i64,
        next_run_ms: Option<i64>,
    ) -> Result<bool> {
        let _w = self.shared.write.lock();
        self.shared.store.claim_report_run(id, due_ms, next_run_ms)
    }

    /// Delete a definition and its runs' rows; the caller deletes the files.
    pub fn delete_report(&self, id: &str) -> Result<()> {
        let _w = self.shared.write.lock();
        self.shared.store.delete_report(id)
    }

    pub fn get_report(&self, id: &str) -> Result<Report> {
        self.shared
            .store
            .list_reports()?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| RegistryError::NotFound(format!("report {id}")))
    }

    /// Definitions of `tenant`, or of every tenant.
    pub fn list_reports(&self, tenant: Option<&str>) -> Result<Vec<Report>> {
        let mut all = self.shared.store.list_reports()?;
        all.retain(|r| tenant.is_none_or(|t| r.tenant == t));
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    /// Record a run (insert or replace).
    pub fn put_report_run(&self, run: &ReportRun) -> Result<()> {
        self.shared.store.put_report_run(run)
    }

    /// A report's runs, newest first.
    pub fn list_report_runs(&self, report_id: &str, limit: usize) -> Result<Vec<ReportRun>> {
        self.shared.store.list_report_runs(report_id, limit)
    }

    pub fn delete_report_runs(&self, ids: &[String]) -> Result<()> {
        self.shared.store.delete_report_runs(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;

    fn report(id: &str) -> Report {
        Report {
            id: id.into(),
            tenant: "default".into(),
            name: "energy".into(),
            kind: ReportKind::Energy {
                metric: "kwh".into(),
                mode: EnergyMode::Counter,
            },
            devices: vec![],
            schedule: Schedule {
                every: Frequency::Monthly,
                at: "06:00".into(),
                weekday: None,
                day: Some(31),
                time_zone: "Europe/Berlin".into(),
            },
            delivery: Delivery::default(),
            retention: RunRetention::default(),
            enabled: true,
            next_run_ms: Some(1),
            created_by: "admin".into(),
            created_ms: 1,
            updated_ms: 1,
        }
    }

    fn run(id: &str, report_id: &str, started_ms: i64) -> ReportRun {
        ReportRun {
            id: id.into(),
            report_id: report_id.into(),
            tenant: "default".into(),
            trigger: RunTrigger::Manual,
            started_ms,
            finished_ms: started_ms,
            from_ms: 0,
            to_ms: 1,
            ok: true,
            error: None,
            rows: 1,
            csv_bytes: 1,
            html_bytes: 1,
            deliveries: vec![],
        }
    }

    /// Definitions and runs round-trip through the store, runs newest
    /// first; deleting a report deletes its runs; unknown tenants and
    /// duplicate ids are refused.
    #[test]
    fn reports_and_runs_are_stored() {
        let (_d, fleet) = testutil::open();
        let r = fleet.create_report(report("r1")).expect("create");
        assert_eq!(fleet.get_report("r1").expect("get"), r);
        assert!(matches!(
            fleet.create_report(report("r1")),
            Err(RegistryError::AlreadyExists(_))
        ));
        let mut other = report("");
        other.tenant = "nope".into();
        assert!(matches!(
            fleet.create_report(other),
            Err(RegistryError::NotFound(_))
        ));
        let generated = fleet.create_report(report("")).expect("generated id");
        assert!(generated.id.starts_with("rep"), "{}", generated.id);

        let mut changed = r.clone();
        changed.name = "renamed".into();
        changed.tenant = "other".into();
        let u = fleet.update_report(&changed).expect("update");
        assert_eq!((u.name.as_str(), u.tenant.as_str()), ("renamed", "default"));
        fleet.set_report_next_run("r1", Some(42)).expect("next run");
        let moved = fleet.get_report("r1").expect("get");
        assert_eq!(
            (moved.next_run_ms, moved.name.as_str()),
            (Some(42), "renamed")
        );
        // A scheduled run is claimed once: the second claim of the same due
        // time (another node's scheduler) gets nothing.
        assert!(fleet.claim_report_run("r1", 42, Some(99)).expect("claim"));
        assert!(!fleet
            .claim_report_run("r1", 42, Some(99))
            .expect("claim again"));
        assert!(!fleet
            .claim_report_run("gone", 42, None)
            .expect("claim unknown"));
        let claimed = fleet.get_report("r1").expect("get");
        assert_eq!(
            (claimed.next_run_ms, claimed.name.as_str()),
            (Some(99), "renamed")
        );

        for (i, t) in [10, 30, 20].into_iter().enumerate() {
            fleet
                .put_report_run(&run(&format!("run{i}"), "r1", t))
                .expect("run");
        }
        let runs = fleet.list_report_runs("r1", 10).expect("runs");
        let order: Vec<i64> = runs.iter().map(|r| r.started_ms).collect();
        assert_eq!(order, vec![30, 20, 10]);
        fleet
            .delete_report_runs(&["run0".to_string()])
            .expect("delete runs");
        assert_eq!(fleet.list_report_runs("r1", 10).expect("runs").len(), 2);
        fleet.delete_report("r1").expect("delete");
        assert!(fleet.get_report("r1").is_err());
        assert!(fleet.list_report_runs("r1", 10).expect("runs").is_empty());
        assert!(matches!(
            fleet.delete_report("r1"),
            Err(RegistryError::NotFound(_))
        ));
    }
}
