//! The driver: owns the clock, the run files and the deliveries.
//!
//! A run computes its content on the blocking pool (store reads), writes
//! `<dir>/<report>/<run>.csv` and `.html`, records the run through the
//! fleet store, then delivers: one mail with the HTML as body and the CSV
//! attached, one signed webhook POST with the download links. A failed
//! delivery is recorded on the run and tried again after each of
//! [`ReportsConfig::retry_delays`] (a mail relay or receiver down for a few
//! minutes still gets the report); each attempt is recorded on the run.
//! Retries live in the node that made the run: a restart drops the ones
//! pending (the files stay for download and a run can be repeated on
//! request). After each run the retention (count and age) is applied to
//! the report's runs and files.

use crate::content::{self, Content};
use crate::render;
use crate::schedule::{local_date, Plan};
use crate::smtp::{self, Mail, SmtpConfig};
use crate::ReportError;
use m2mhub_automation::webhook;
use m2mhub_fleet::{DeliveryOutcome, Fleet, Report, ReportKind, ReportRun, RunTrigger};
use m2mhub_identity::ids::{new_id, validate_id};
use m2mhub_identity::now_ms;
use m2mhub_tsdb::TimeSeriesStore;
use parking_lot::Mutex;
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What the service runs with.
#[derive(Debug, Clone)]
pub struct ReportsConfig {
    /// Where run files are kept (`<data_dir>/reports`).
    pub dir: PathBuf,
    /// The mail relay; `None`: reports with mail recipients are refused.
    pub smtp: Option<SmtpConfig>,
    /// The base URL download links in mails and webhooks start with.
    pub public_url: String,
    pub webhook_timeout: Duration,
    /// After a failed delivery, wait this long before each further
    /// attempt (the default: 1, 5 and 30 minutes).
    pub retry_delays: Vec<Duration>,
}

/// The default waits before retrying a failed delivery.
pub fn default_retry_delays() -> Vec<Duration> {
    [60, 300, 1800].map(Duration::from_secs).to_vec()
}

/// A run on request: the period, or the one a scheduled run now would
/// cover.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunRequest {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

/// "2026-03-01 to 2026-03-31 (Europe/Berlin)": a period as the
/// report's readers name it.
fn period_label(r: &Report, plan: &Plan, from_ms: i64, to_ms: i64) -> Result<String, ReportError> {
    Ok(format!(
        "{} to {} ({})",
        local_date(&plan.zone, from_ms)?,
        local_date(&plan.zone, to_ms - 1)?,
        r.schedule.time_zone
    ))
}

/// What a run delivers, kept for its retries.
struct Parcel {
    report: Report,
    period: String,
    csv: String,
    html: String,
}

/// A way a run is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Email,
    Webhook,
}

impl Channel {
    fn name(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Webhook => "webhook",
        }
    }

    fn named(name: &str) -> Option<Channel> {
        match name {
            "email" => Some(Channel::Email),
            "webhook" => Some(Channel::Webhook),
            _ => None,
        }
    }

    /// The channels a report is delivered through.
    fn of(r: &Report) -> Vec<Channel> {
        let mut out = Vec::new();
        if !r.delivery.email.is_empty() {
            out.push(Channel::Email);
        }
        if r.delivery.webhook.is_some() {
            out.push(Channel::Webhook);
        }
        out
    }
}

/// Most devices one report may name.
const MAX_DEVICES: usize = 10_000;
const MAX_RECIPIENTS: usize = 20;
/// A requested period may be at most this long (a year and a day).
const MAX_PERIOD_MS: i64 = 367 * 86_400_000;

pub struct Reports {
    fleet: Fleet,
    tsdb: Arc<dyn TimeSeriesStore>,
    config: ReportsConfig,
    /// Reports being run now: a report runs once at a time.
    running: Mutex<HashSet<String>>,
}

/// Takes a report out of `running` when its run ends, however it ends.
struct Running<'a>(&'a Reports, String);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.lock().remove(&self.1);
    }
}

/// A plausible mail address: one `@`, no spaces, brackets, commas or
/// control characters (it goes into SMTP commands and headers).
pub fn validate_email(a: &str) -> Result<(), ReportError> {
    let ok = a.len() <= 254
        && a.split('@').count() == 2
        && a.split('@').all(|p| !p.is_empty())
        && !a
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>,;:\"()[]\\".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ReportError::Invalid(format!(
            "{a:?} is not a mail address (name@example.com)"
        )))
    }
}

impl Reports {
    pub fn new(fleet: Fleet, tsdb: Arc<dyn TimeSeriesStore>, config: ReportsConfig) -> Arc<Self> {
        Arc::new(Reports {
            fleet,
            tsdb,
            config,
            running: Mutex::new(HashSet::new()),
        })
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Check a definition before it is stored and set when it runs next
    /// (after `now`; `None` while disabled).
    pub fn prepare(&self, r: &mut Report, now: i64) -> Result<(), ReportError> {
        let plan = Plan::new(&r.schedule)?;
        if let ReportKind::Energy { metric, .. } = &r.kind {
            if metric.is_empty() || metric.len() > m2mhub_tsdb::MAX_NAME {
                return Err(ReportError::Invalid(
                    "an energy report needs the metric of its meters".into(),
                ));
            }
        }
        if r.devices.len() > MAX_DEVICES {
            return Err(ReportError::Invalid(format!(
                "at most {MAX_DEVICES} devices; name none for all"
            )));
        }
        for d in &r.devices {
            validate_id("device", d)?;
        }
        if r.delivery.email.len() > MAX_RECIPIENTS {
            return Err(ReportError::Invalid(format!(
                "at most {MAX_RECIPIENTS} mail recipients"
            )));
        }
        for a in &r.delivery.email {
            validate_email(a)?;
        }
        if !r.delivery.email.is_empty() && self.config.smtp.is_none() {
            return Err(ReportError::Invalid(
                "no mail relay is configured ([reports.smtp] host): remove the mail recipients"
                    .into(),
            ));
        }
        if let Some(w) = &r.delivery.webhook {
            webhook::parse_url(&w.url).map_err(|e| ReportError::Invalid(e.to_string()))?;
        }
        if !(1..=1000).contains(&r.retention.keep_runs) {
            return Err(ReportError::Invalid(
                "retention.keep_runs must be 1 to 1000".into(),
            ));
        }
        r.next_run_ms = if r.enabled {
            Some(plan.next_after(now)?)
        } else {
            None
        };
        Ok(())
    }

    /// The file of a run (`csv` or `html`).
    pub fn file(&self, run: &ReportRun, ext: &str) -> PathBuf {
        self.config
            .dir
            .join(&run.report_id)
            .join(format!("{}.{ext}", run.id))
    }

    /// Delete a report, its runs and their files.
    pub fn delete(&self, id: &str) -> Result<(), ReportError> {
        self.fleet.delete_report(id)?;
        validate_id("report", id)?;
        match std::fs::remove_dir_all(self.config.dir.join(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Compute a report over `[from, to)`: the content alone, no files
    /// (what a run renders; tests check it against the stored data).
    pub fn compute(&self, r: &Report, from_ms: i64, to_ms: i64) -> Result<Content, ReportError> {
        let plan = Plan::new(&r.schedule)?;
        match &r.kind {
            ReportKind::Energy { metric, mode } => content::energy(
                &*self.tsdb,
                &r.tenant,
                &r.devices,
                metric,
                *mode,
                &plan.zone,
                from_ms,
                to_ms,
            ),
            ReportKind::Availability => {
                content::availability(&self.fleet, &r.tenant, &r.devices, from_ms, to_ms)
            }
            ReportKind::Alarms => {
                content::alarms(&self.fleet, &r.tenant, &r.devices, from_ms, to_ms)
            }
        }
    }

    /// Run a report now and deliver it; the run as recorded.
    pub async fn run(
        self: &Arc<Self>,
        report_id: &str,
        trigger: RunTrigger,
        req: RunRequest,
    ) -> Result<ReportRun, ReportError> {
        if !self.running.lock().insert(report_id.to_string()) {
            return Err(ReportError::Busy(report_id.into()));
        }
        let _running = Running(self, report_id.to_string());
        let r = self.fleet.get_report(report_id)?;
        let plan = Plan::new(&r.schedule)?;
        let started = now_ms();
        let (from_ms, to_ms) = match (req.from_ms, req.to_ms) {
            (Some(f), Some(t)) if f < t && t - f <= MAX_PERIOD_MS => (f, t),
            (None, None) => plan.period_of(started)?,
            _ => {
                return Err(ReportError::Invalid(
                    "give both from_ms and to_ms, from before to, at most a year apart".into(),
                ))
            }
        };
        let period = period_label(&r, &plan, from_ms, to_ms)?;
        let mut run = ReportRun {
            id: new_id("run"),
            report_id: r.id.clone(),
            tenant: r.tenant.clone(),
            trigger,
            started_ms: started,
            finished_ms: started,
            from_ms,
            to_ms,
            ok: false,
            error: None,
            rows: 0,
            csv_bytes: 0,
            html_bytes: 0,
            deliveries: Vec::new(),
        };
        let this = Arc::clone(self);
        let (r2, run2, period2) = (r.clone(), run.clone(), period.clone());
        let rendered = tokio::task::spawn_blocking(move || {
            let c = this.compute(&r2, from_ms, to_ms)?;
            let csv = render::csv(&c);
            let html = render::html(&c, &r2.name, &period2);
            let dir = this.config.dir.join(&r2.id);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(this.file(&run2, "csv"), &csv)?;
            std::fs::write(this.file(&run2, "html"), &html)?;
            Ok::<_, ReportError>((c.rows.len(), csv, html))
        })
        .await
        .map_err(|e| ReportError::Invalid(format!("report task failed: {e}")))?;
        let mut retry = None;
        match rendered {
            Ok((rows, csv, html)) => {
                run.ok = true;
                run.rows = rows as u64;
                run.csv_bytes = csv.len() as u64;
                run.html_bytes = html.len() as u64;
                run.finished_ms = now_ms();
                self.fleet.put_report_run(&run)?;
                let parcel = Arc::new(Parcel {
                    report: r.clone(),
                    period: period.clone(),
                    csv,
                    html,
                });
                let mut deliveries = Vec::new();
                for channel in Channel::of(&r) {
                    deliveries.push(self.deliver(channel, &run, &parcel, 1).await);
                }
                run.deliveries = deliveries;
                retry = Some(parcel);
            }
            Err(e) => {
                tracing::warn!(report = %r.id, error = %e, "report run failed");
                run.error = Some(e.to_string());
            }
        }
        run.finished_ms = now_ms();
        if let Some(parcel) = retry {
            self.schedule_retry(&mut run, parcel, 0);
        }
        self.fleet.put_report_run(&run)?;
        if let Err(e) = self.prune(&r, run.finished_ms) {
            tracing::warn!(report = %r.id, error = %e, "report retention failed");
        }
        Ok(run)
    }

    /// The file of a run (`csv` or `html`), rendered again from the stored
    /// data when this node does not have it: in a cluster a run's files
    /// are written by the node that made it, and any node serves the
    /// download. (Data that arrived late for the period since is then in
    /// the new copy.)
    pub async fn ensure_file(
        self: &Arc<Self>,
        run: &ReportRun,
        ext: &str,
    ) -> Result<PathBuf, ReportError> {
        let path = self.file(run, ext);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let r = self.fleet.get_report(&run.report_id)?;
        let this = Arc::clone(self);
        let run = run.clone();
        tokio::task::spawn_blocking(move || {
            let plan = Plan::new(&r.schedule)?;
            let period = period_label(&r, &plan, run.from_ms, run.to_ms)?;
            let c = this.compute(&r, run.from_ms, run.to_ms)?;
            std::fs::create_dir_all(this.config.dir.join(&r.id))?;
            // Written aside and renamed: a concurrent download never reads
            // half a file.
            for (ext, body) in [
                ("csv", render::csv(&c)),
                ("html", render::html(&c, &r.name, &period)),
            ] {
                let tmp = this.file(&run, &format!("{ext}.tmp{}", new_id("t")));
                std::fs::write(&tmp, body)?;
                std::fs::rename(&tmp, this.file(&run, ext))?;
            }
            tracing::info!(report = %r.id, run = %run.id, "report files rendered again on this node");
            Ok(path)
        })
        .await
        .map_err(|e| ReportError::Invalid(format!("report task failed: {e}")))?
    }

    fn link(&self, run: &ReportRun, ext: &str) -> String {
        format!(
            "{}/api/v1/reports/{}/runs/{}/{ext}",
            self.config.public_url.trim_end_matches('/'),
            run.report_id,
            run.id
        )
    }

    /// One attempt at one channel.
    async fn deliver(
        &self,
        channel: Channel,
        run: &ReportRun,
        parcel: &Parcel,
        attempt: u32,
    ) -> DeliveryOutcome {
        let r = &parcel.report;
        let (target, res) = match channel {
            Channel::Email => {
                let Some(cfg) = &self.config.smtp else {
                    return DeliveryOutcome {
                        channel: channel.name().into(),
                        target: r.delivery.email.join(", "),
                        ok: false,
                        error: Some("no mail relay is configured".into()),
                        attempts: attempt,
                        next_retry_ms: None,
                    };
                };
                let mail = Mail {
                    to: r.delivery.email.clone(),
                    subject: format!("{}: {}", r.name, parcel.period),
                    html: parcel.html.clone(),
                    attachments: vec![(
                        format!("{}-{}.csv", r.id, run.id),
                        "text/csv; charset=utf-8".into(),
                        parcel.csv.clone().into_bytes(),
                    )],
                    id: run.id.clone(),
                };
                let res = smtp::send(cfg, &mail).await.map_err(|e| e.to_string());
                (r.delivery.email.join(", "), res)
            }
            Channel::Webhook => {
                let Some(w) = &r.delivery.webhook else {
                    return DeliveryOutcome {
                        channel: channel.name().into(),
                        target: String::new(),
                        ok: false,
                        error: Some("the report has no webhook".into()),
                        attempts: attempt,
                        next_retry_ms: None,
                    };
                };
                let body = json!({
                    "event": "report.run",
                    "report": {"id": r.id, "name": r.name, "tenant": r.tenant},
                    "run": {
                        "id": run.id, "trigger": run.trigger, "from_ms": run.from_ms,
                        "to_ms": run.to_ms, "rows": run.rows, "period": parcel.period,
                    },
                    "links": {"csv": self.link(run, "csv"), "html": self.link(run, "html")},
                });
                let target = webhook::Target {
                    url: w.url.clone(),
                    secret: w.secret.clone(),
                };
                // The run id is the delivery id: a receiver that saw an
                // earlier attempt arrive can tell this one is the same.
                let res = webhook::post(
                    &target,
                    &run.id,
                    body.to_string().as_bytes(),
                    self.config.webhook_timeout,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
                (w.url.clone(), res)
            }
        };
        if let Err(e) = &res {
            tracing::warn!(report = %r.id, run = %run.id, channel = channel.name(), attempt, error = %e, "report delivery failed");
        }
        DeliveryOutcome {
            channel: channel.name().into(),
            target,
            ok: res.is_ok(),
            error: res.err(),
            attempts: attempt,
            next_retry_ms: None,
        }
    }

    /// If a delivery of `run` failed and retries are left (`done` of them
    /// made), note when the next is due on the run and start a task that
    /// makes it; the caller stores the run.
    fn schedule_retry(self: &Arc<Self>, run: &mut ReportRun, parcel: Arc<Parcel>, done: usize) {
        let Some(wait) = self.config.retry_delays.get(done).copied() else {
            return;
        };
        if run.deliveries.iter().all(|d| d.ok) {
            return;
        }
        let due = now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
        for d in run.deliveries.iter_mut().filter(|d| !d.ok) {
            d.next_retry_ms = Some(due);
        }
        let this = Arc::clone(self);
        let mut run = run.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            for i in 0..run.deliveries.len() {
                let d = &run.deliveries[i];
                if d.ok {
                    continue;
                }
                let Some(channel) = Channel::named(&d.channel) else {
                    continue;
                };
                let attempt = d.attempts.saturating_add(1);
                run.deliveries[i] = this.deliver(channel, &run, &parcel, attempt).await;
            }
            this.schedule_retry(&mut run, Arc::clone(&parcel), done + 1);
            // The run may have been pruned or its report deleted meanwhile:
            // then there is nothing to record.
            if this.fleet.get_report(&run.report_id).is_ok() {
                let kept = this
                    .fleet
                    .list_report_runs(&run.report_id, 100_000)
                    .map(|runs| runs.iter().any(|r| r.id == run.id));
                if matches!(kept, Ok(true)) {
                    if let Err(e) = this.fleet.put_report_run(&run) {
                        tracing::warn!(run = %run.id, error = %e, "report delivery not recorded");
                    }
                }
            }
        });
    }

    /// Keep the newest `keep_runs` runs, and none older than `keep_days`.
    fn prune(&self, r: &Report, now: i64) -> Result<(), ReportError> {
        let runs = self.fleet.list_report_runs(&r.id, 100_000)?;
        let keep = r.retention.keep_runs as usize;
        let oldest = (r.retention.keep_days > 0)
            .then(|| now - i64::from(r.retention.keep_days) * 86_400_000);
        let gone: Vec<ReportRun> = runs
            .into_iter()
            .enumerate()
            .filter(|(i, run)| *i >= keep || oldest.is_some_and(|o| run.started_ms < o))
            .map(|(_, run)| run)
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = gone.iter().map(|g| g.id.clone()).collect();
        self.fleet.delete_report_runs(&ids)?;
        for run in &gone {
            for ext in ["csv", "html"] {
                let _ = std::fs::remove_file(self.file(run, ext));
            }
        }
        Ok(())
    }

    /// Run every enabled report whose time has come, each over the period
    /// of its scheduled instant (so a run late after a restart still covers
    /// the right days); runs missed while stopped are not repeated.
    pub async fn tick(self: &Arc<Self>, now: i64) {
        let due = match self.fleet.list_reports(None) {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "reports: cannot list definitions");
                return;
            }
        };
        for r in due {
            let Some(at) = r.next_run_ms.filter(|at| r.enabled && *at <= now) else {
                continue;
            };
            let planned =
                Plan::new(&r.schedule).and_then(|p| Ok((p.period_of(at)?, p.next_after(now)?)));
            let (period, next) = match planned {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(report = %r.id, error = %e, "report schedule failed");
                    continue;
                }
            };
            // Claimed and moved on first: a run that fails is not repeated
            // forever, and of the nodes sharing the store only the one whose
            // claim succeeds makes this run.
            match self.fleet.claim_report_run(&r.id, at, Some(next)) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(report = %r.id, "scheduled run claimed elsewhere");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(report = %r.id, error = %e, "report schedule not saved");
                    continue;
                }
            }
            let req = RunRequest {
                from_ms: Some(period.0),
                to_ms: Some(period.1),
            };
            if let Err(e) = self.run(&r.id, RunTrigger::Schedule, req).await {
                tracing::warn!(report = %r.id, error = %e, "scheduled report failed");
            }
        }
    }

    /// Tick every `interval` until the task is aborted.
    pub fn start(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.tick(now_ms()).await;
            }
        })
    }
}
