//! Fleet operations: what operators and rules do *to* devices once they
//! exist — alarms with a lifecycle ([`alarm`]), commands sent to devices with
//! their status ([`command`]), device events recorded from the data path
//! ([`device_event`]), and the rules engine's definitions as written
//! ([`rule`]), device shadows ([`shadow`]) and fleet-wide settings
//! ([`setting`]), OTA firmware campaigns ([`ota`]) and diagnostic bundles
//! uploaded by devices on request ([`diagnostic`]), and scheduled report
//! definitions with their runs ([`report`]).
//!
//! # The model
//!
//! Identity (`m2mhub-identity`) answers *who* a device is; this crate keeps
//! what happens to it. It depends on identity only to check that a tenant
//! and a device exist and belong together, and it registers itself with the
//! identity registry as a [`DeviceRemoval`] listener so that deleting a
//! device deletes its alarms, commands, events, shadows and diagnostic
//! bundles first.
//!
//! # Storage and the hot path
//!
//! Everything is behind the [`FleetStore`] trait (SQLite in [`sqlite`], in
//! the same `registry.db` file as identity, with its own tables and its own
//! migrations). Rules are cached in memory; active alarms and open commands
//! are held in memory while open and written by one background thread, once
//! per change batch rather than once per change, because rules change them
//! at message rates. Device events are reported from the MQTT hot path: they
//! are counted and rate-limited in memory and queued for the same thread.

#![forbid(unsafe_code)]

pub mod alarm;
pub mod command;
pub mod dashboard;
pub mod device_event;
pub mod diagnostic;
pub mod ids;
pub mod ota;
pub mod report;
pub mod rule;
pub mod setting;
pub mod shadow;
pub mod sqlite;
pub mod store;

pub use alarm::{
    Alarm, AlarmChange, AlarmCounts, AlarmEvent, AlarmFilter, AlarmStatus, ClearedBy, RaiseOutcome,
    Severity,
};
pub use command::{Command, CommandStatus, CommandUpdate, NewCommand};
pub use dashboard::{Dashboard, DashboardShare, DashboardUpdate, NewDashboard};
pub use device_event::{DeviceEvent, DeviceEventCounts};
pub use diagnostic::{
    BundleStatus, BundleUpload, DiagnosticBundle, DiagnosticsConfig, RequestedBundle, SweepReport,
    UploadError,
};
pub use m2mhub_identity::{RegistryError, Result};
pub use ota::{
    Artifact, ArtifactFiles, Campaign, CampaignStatus, Job, JobState, NewCampaign, Notice,
    SignedBy, StatusReport, WaveSize,
};
pub use report::{
    Delivery, DeliveryOutcome, EnergyMode, Frequency, Report, ReportKind, ReportRun, ReportWebhook,
    RunRetention, RunTrigger, Schedule,
};
pub use rule::{NewRule, Rule, RuleUpdate};
pub use setting::{FleetSetting, Progress, Selector};
pub use shadow::{Shadow, ShadowChange, ShadowUpdate, ShadowWatch, ShadowWriter};
pub use store::FleetStore;

use m2mhub_identity::{now_ms, DeviceRemoval, Registry};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The fleet-operations handle. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
    /// Stops and joins the background writer when the last clone drops.
    _flusher: Arc<FlusherGuard>,
}

/// Device events waiting for the background writer.
#[derive(Default)]
pub(crate) struct EventQueue {
    pub ids: ids::IdBlock,
    pub events: Vec<DeviceEvent>,
}

pub(crate) struct Shared {
    pub store: Box<dyn FleetStore>,
    /// Who exists: tenants and devices are checked against it.
    pub identity: Registry,
    /// Rule definitions by id.
    pub rules: RwLock<BTreeMap<String, Rule>>,
    /// Serializes rule writers so check-then-write sequences are atomic.
    pub write: Mutex<()>,
    /// Device-event counters and rate limits; taken before `queue`.
    pub device_events: Mutex<device_event::DeviceEventGate>,
    pub queue: Mutex<EventQueue>,
    /// Active alarms and unwritten alarm changes; taken after `flush_lock`.
    pub alarms: Mutex<alarm::AlarmBook>,
    pub alarm_events: tokio::sync::broadcast::Sender<AlarmEvent>,
    /// Open commands and unwritten command changes; taken after `flush_lock`.
    pub commands: Mutex<command::CommandBook>,
    /// Every shadow by (device, name); updates are serialized by this lock
    /// and written through to the store before they are acknowledged.
    pub shadows: Mutex<shadow::ShadowBook>,
    /// Told about every accepted shadow change (the live hub), if set.
    pub shadow_watch: RwLock<Option<Arc<dyn shadow::ShadowWatch>>>,
    /// Firmware artifacts, campaigns and their jobs; changes are written
    /// through to the store under this lock.
    pub ota: Mutex<ota::OtaBook>,
    /// Told after every OTA change this node wrote (a cluster's notice).
    pub ota_watch: RwLock<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Diagnostics configuration and the uploads under way; serializes
    /// every diagnostics change.
    pub diagnostics: Mutex<diagnostic::DiagnosticBook>,
    pub wake: Condvar,
    /// Serializes flushes so batches reach the store in order.
    pub flush_lock: Mutex<()>,
    pub shutdown: AtomicBool,
}

struct FlusherGuard {
    shared: Arc<Shared>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FlusherGuard {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _q = self.shared.queue.lock();
            self.shared.wake.notify_all();
        }
        if let Some(h) = self.handle.lock().take() {
            if h.join().is_err() {
                tracing::error!("fleet writer thread panicked");
            }
        }
        // Nothing queued is lost on an orderly close.
        if let Err(e) = self.shared.flush() {
            tracing::error!(error = %e, "fleet: final flush failed");
        }
    }
}

impl Fleet {
    /// Open (or create) the fleet tables in `registry.db` in `dir`, beside
    /// the identity tables of `identity`. Diagnostic bundles go to
    /// `dir/diagnostics` until [`Fleet::configure_diagnostics`] says
    /// otherwise.
    pub fn open(dir: &Path, identity: Registry) -> Result<Fleet> {
        std::fs::create_dir_all(dir)?;
        let store = sqlite::SqliteFleetStore::open(&dir.join("registry.db"))?;
        let fleet = Fleet::with_store(Box::new(store), identity)?;
        fleet.configure_diagnostics(DiagnosticsConfig {
            dir: dir.join("diagnostics"),
            ..Default::default()
        });
        Ok(fleet)
    }

    /// Use another storage backend. Diagnostic bundles are refused until
    /// [`Fleet::configure_diagnostics`] names their directory.
    pub fn with_store(store: Box<dyn FleetStore>, identity: Registry) -> Result<Fleet> {
        let snap = store.load()?;
        let rules = snap.rules.into_iter().map(|r| (r.id.clone(), r)).collect();
        let shadows = shadow::ShadowBook::load(snap.shadows);
        let event_ids =
            ids::IdBlock::open(&*store, ids::IdKind::DeviceEvent, snap.device_event_seq)?;
        let alarm_ids = ids::IdBlock::open(&*store, ids::IdKind::Alarm, snap.alarm_seq)?;
        let shared = Arc::new(Shared {
            store,
            identity: identity.clone(),
            rules: RwLock::new(rules),
            write: Mutex::new(()),
            device_events: Mutex::new(device_event::DeviceEventGate::default()),
            queue: Mutex::new(EventQueue {
                ids: event_ids,
                events: Vec::new(),
            }),
            alarms: Mutex::new(alarm::AlarmBook::load(snap.active_alarms, alarm_ids)),
            alarm_events: tokio::sync::broadcast::channel(alarm::EVENT_CAPACITY).0,
            commands: Mutex::new(command::CommandBook::load(snap.open_commands)),
            shadows: Mutex::new(shadows),
            shadow_watch: RwLock::new(None),
            ota: Mutex::new(ota::OtaBook::load(
                snap.artifacts,
                snap.campaigns,
                snap.jobs,
            )),
            ota_watch: RwLock::new(None),
            diagnostics: Mutex::new(diagnostic::DiagnosticBook::default()),
            wake: Condvar::new(),
            flush_lock: Mutex::new(()),
            shutdown: AtomicBool::new(false),
        });
        // Weak: the identity registry must not keep this crate's state (and
        // through it, the identity registry itself) alive.
        let listener: Arc<dyn DeviceRemoval> = shared.clone();
        identity.add_device_removal(Arc::downgrade(&listener));
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("fleet-writer".into())
            .spawn(move || {
                // Background work: its SQLite bursts must not delay message
                // handling on a small machine, so it yields the CPU to it.
                let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
                writer_loop(&thread_shared)
            })?;
        Ok(Fleet {
            _flusher: Arc::new(FlusherGuard {
                shared: Arc::clone(&shared),
                handle: Mutex::new(Some(handle)),
            }),
            shared,
        })
    }

    /// The identity registry this fleet checks devices against.
    pub fn identity(&self) -> &Registry {
        &self.shared.identity
    }

    /// Tell `watch` about every accepted shadow change from now on (one
    /// watcher: a later call replaces it).
    pub fn watch_shadows(&self, watch: Arc<dyn shadow::ShadowWatch>) {
        *self.shared.shadow_watch.write() = Some(watch);
    }

    /// Write everything queued (device events, alarm and command changes)
    /// now. Reads of stored history call this first.
    pub fn flush(&self) -> Result<()> {
        self.shared.flush()
    }
}

impl Shared {
    /// Hand accepted shadow changes to the watcher, if one listens. Called
    /// with the shadows locked (see [`shadow::ShadowWatch`]).
    pub(crate) fn tell_watcher(&self, changes: &[shadow::ShadowChange]) {
        let watch = self.shadow_watch.read();
        if let Some(w) = watch.as_ref().filter(|w| w.active()) {
            for c in changes {
                w.changed(c);
            }
        }
    }
}

impl DeviceRemoval for Shared {
    fn device_removed(&self, device_id: &str) -> Result<()> {
        // No flush may be writing this device's rows while they are
        // deleted, or some would outlive it.
        let _f = self.flush_lock.lock();
        let bundles: Vec<String> = self
            .store
            .list_diagnostics(None, device_id, usize::MAX)?
            .into_iter()
            .map(|b| b.id)
            .collect();
        self.store.delete_device(device_id)?;
        self.forget_diagnostics(&bundles);
        self.forget_device_events(device_id);
        self.alarms.lock().forget_device(device_id);
        self.commands.lock().forget_device(device_id);
        self.shadows.lock().forget_device(device_id);
        self.ota.lock().forget_device(device_id);
        Ok(())
    }
}

fn writer_loop(shared: &Shared) {
    loop {
        {
            let mut q = shared.queue.lock();
            if !shared.shutdown.load(Ordering::SeqCst) && q.events.is_empty() {
                shared.wake.wait_for(&mut q, Duration::from_secs(1));
            }
        }
        let stop = shared.shutdown.load(Ordering::SeqCst);
        // At most a second late; at shutdown, every open window's
        // suppressed count is written rather than lost.
        shared.roll_device_event_windows(now_ms(), stop);
        if let Err(e) = shared.flush() {
            tracing::warn!(error = %e, "fleet: background write failed; will retry");
            std::thread::sleep(Duration::from_millis(200));
        }
        if stop {
            return;
        }
    }
}

impl Shared {
    /// Write queued device events and alarm and command changes.
    pub(crate) fn flush(&self) -> Result<()> {
        let _g = self.flush_lock.lock();
        let device_events = std::mem::take(&mut self.queue.lock().events);
        let alarms = self.alarms.lock().take_batch();
        let commands = self.commands.lock().take_batch();
        if device_events.is_empty() && alarms.is_empty() && commands.is_empty() {
            return Ok(());
        }
        let batch = store::FleetBatch {
            device_events: &device_events,
            device_events_kept: device_event::KEPT_PER_DEVICE,
            alarms: &alarms,
            alarms_kept: alarm::CLEARED_KEPT_PER_DEVICE,
            commands: &commands,
            commands_kept: command::KEPT_PER_DEVICE,
        };
        match self.store.append(&batch) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Put everything back in front of what arrived meanwhile so
                // the next attempt keeps the order.
                {
                    let mut q = self.queue.lock();
                    let mut de = device_events;
                    de.append(&mut q.events);
                    q.events = de;
                }
                self.alarms.lock().requeue(alarms);
                self.commands.lock().requeue(commands);
                Err(e)
            }
        }
    }
}

/// A random id: `prefix` and 16 hex digits.
pub(crate) fn random_id(prefix: &str) -> String {
    let bytes: [u8; 8] = m2mhub_identity::ids::random_bytes();
    format!("{prefix}{}", m2mhub_identity::ids::hex(&bytes))
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A fleet over a fresh identity registry in a temporary directory.
    pub fn open() -> (tempfile::TempDir, Fleet) {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = open_in(dir.path());
        (dir, fleet)
    }

    /// A fleet over the identity registry in `dir`.
    pub fn open_in(dir: &Path) -> Fleet {
        let reg = Registry::open(dir).expect("open registry");
        Fleet::open(dir, reg).expect("open fleet")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use m2mhub_identity::NewDevice;
    use serde_json::json;

    /// Rules, alarms and commands survive a close and reopen; deleting a
    /// device through identity deletes its fleet rows.
    #[test]
    fn reopen_persists_and_device_removal_cascades() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = Registry::open(dir.path()).expect("open");
            let fleet = Fleet::open(dir.path(), reg.clone()).expect("fleet");
            for id in ["d1", "d2"] {
                reg.create_device(NewDevice {
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
            fleet
                .create_rule(
                    "default",
                    NewRule {
                        id: Some("r1".into()),
                        name: None,
                        description: String::new(),
                        sql: "SELECT * FROM 'devices/+/telemetry'".into(),
                        actions: json!([]),
                        enabled: true,
                    },
                )
                .expect("rule");
            for d in ["d1", "d2"] {
                fleet
                    .raise_alarm("default", d, "hot", Severity::Major, json!({}), None)
                    .expect("alarm");
            }
            fleet.flush().expect("flush");
        }
        let reg = Registry::open(dir.path()).expect("reopen");
        let fleet = Fleet::open(dir.path(), reg.clone()).expect("fleet");
        assert_eq!(fleet.list_rules(None).expect("rules").len(), 1);
        assert!(fleet.active_alarm("default", "d1", "hot").is_some());
        reg.delete_device("d1").expect("delete");
        assert!(fleet.active_alarm("default", "d1", "hot").is_none());
        assert!(fleet.active_alarm("default", "d2", "hot").is_some());
        let stored = fleet
            .list_alarms(&AlarmFilter {
                device_id: Some("d1".into()),
                ..Default::default()
            })
            .expect("list");
        assert!(stored.is_empty(), "{stored:?}");
    }
}
