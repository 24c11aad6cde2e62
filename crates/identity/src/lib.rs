//! The m2mhub registry: the platform's identity store.
//!
//! # The model
//!
//! - **Tenants** isolate customers from each other. A tenant `default` always
//!   exists. **Groups** belong to one tenant and gather devices for policies.
//! - **Devices** have a unique id (`[A-Za-z0-9._-]{1,64}`, which is also their
//!   MQTT client id and the root of their topic namespace `devices/{id}/…`),
//!   a name, a tenant, an optional group, a profile and labels.
//! - **Credentials** prove a device's identity on CONNECT: random *tokens*
//!   (up to two active at once so a rollover never locks a device out) and
//!   X.509 *certificates* (issued elsewhere; recorded here by fingerprint so
//!   they can be revoked and listed in a CRL), and DTLS *pre-shared keys*
//!   for CoAPS (stored sealed by the caller, looked up by the identity the
//!   device sends in the handshake; see [`psk`]).
//! - **Claim tokens** let a fleet of identical devices provision themselves:
//!   a limited number of uses, an expiry, a fixed tenant/group/profile.
//! - **Operators** (users) log in with Argon2id-hashed passwords and use
//!   scoped **API tokens**; roles are Admin > Operator > Viewer.
//! - **Policies** grant devices extra topics beyond their own namespace,
//!   always within their own tenant (see [`policy`]).
//! - **Device profiles** (per tenant) say what a kind of device sends: the
//!   payload content type the telemetry ingest decodes (see [`profile`]).
//!   A profile is part of a device's identity record, so the ingest's
//!   per-message lookup joins device and profile in memory.
//! - The **audit log** is append-only and hash-chained (see [`audit`]);
//!   **security events** record what the security monitor noticed.
//!
//! What happens *to* devices (alarms, commands, device events, rule
//! definitions) is fleet operations, in `m2mhub-fleet`; it listens for
//! device deletions through [`DeviceRemoval`]. This crate knows nothing of
//! the broker: the binary adapts it to the broker's auth traits.
//!
//! # Storage and the hot path
//!
//! Everything lives in one SQLite file, `registry.db` (WAL, `synchronous =
//! NORMAL`; per-domain migrations in [`sql`]), behind the [`RegistryStore`]
//! trait; all SQL is in [`sqlite`]. `m2mhub-pgstore` implements the same
//! trait in PostgreSQL (with the same migrations) for nodes that share one
//! registry. Every
//! record except the audit log and security events is also held in memory, loaded at open and
//! updated on every write (write-through, under one writer lock), so the
//! checks on every CONNECT, PUBLISH and SUBSCRIBE, and the ingest's
//! per-message lookup ([`Registry::ingest_info`]), never touch the database.
//! Audit records, security events and "last seen" updates are queued and
//! written in batches by one background thread; their sequence numbers and
//! hashes are assigned synchronously, in order.

#![forbid(unsafe_code)]

pub mod audit;
pub mod auth_stats;
pub mod certificate;
pub mod claim;
pub mod device;
pub mod error;
pub mod policy;
pub mod profile;
pub mod psk;
mod secret;
pub mod security;
pub mod sql;
pub mod sqlite;
pub mod store;
pub mod tenant;
pub mod token;
pub mod user;

pub use audit::{AuditQuery, AuditRecord, AuditReport};
pub use auth_stats::AuthStats;
pub use certificate::{CertCheck, CertInfo, CertRecord};
pub use claim::{ClaimInfo, ClaimSpec};
pub use device::{Device, DeviceFilter, DeviceUpdate, NewDevice};
pub use error::{ClaimError, RegistryError, Result};
pub use policy::{filter_is_subset, Action, DeviceScope, Policy};
pub use profile::{
    canonical_content_type, DeviceProfile, IngestInfo, NewProfile, ProfileUpdate, CONTENT_TYPES,
    DEFAULT_PROFILE,
};
pub use psk::{PskCheck, PskInfo, SealedKey};
pub use security::{SecurityEvent, SecurityEventRecord, SecurityKind, SECURITY_EVENT_BACKLOG};
pub use store::RegistryStore;
pub use tenant::{Group, Tenant};
pub use token::{TokenCheck, TokenInfo};
pub use user::{ApiTokenInfo, Principal, Role, User};

use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The id of the tenant that exists from the start.
pub const DEFAULT_TENANT: &str = "default";

/// Another domain's interest in device deletions: called by
/// [`Registry::delete_device`] before the device itself is deleted, so that
/// what the domain keeps about it (fleet operations: alarms, commands,
/// events) goes first; an error aborts the deletion.
pub trait DeviceRemoval: Send + Sync {
    fn device_removed(&self, device_id: &str) -> Result<()>;
}

/// Id and randomness helpers other domain crates share, so ids look the
/// same everywhere.
pub mod ids {
    pub use crate::secret::{hex, new_id, random_bytes, unhex, unhex32};
    pub use crate::{validate_id, validate_name};
}

/// The registry handle the rest of the platform uses. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
    /// Stops and joins the background writer when the last clone drops.
    _flusher: Arc<FlusherGuard>,
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The in-memory copy of everything but the logs.
#[derive(Default)]
pub(crate) struct State {
    pub tenants: BTreeMap<String, Tenant>,
    /// Keyed by (tenant, group id).
    pub groups: BTreeMap<(String, String), Group>,
    /// Ordered by id so listing pages with an `after` cursor.
    pub devices: BTreeMap<String, Device>,
    pub tokens: HashMap<String, Vec<token::TokenRecord>>,
    pub certs: HashMap<[u8; 32], CertInfo>,
    pub psks: psk::PskTables,
    pub claims: BTreeMap<String, claim::ClaimRecord>,
    pub claim_by_hash: HashMap<[u8; 32], String>,
    pub users: BTreeMap<String, user::UserRecord>,
    pub api_tokens: BTreeMap<String, user::ApiTokenRecord>,
    pub api_by_hash: HashMap<[u8; 32], String>,
    /// tenant → policy name → policy.
    pub policies: HashMap<String, BTreeMap<String, Policy>>,
    /// Keyed by (tenant, name).
    pub profiles: BTreeMap<(String, String), DeviceProfile>,
    /// Device id → what the ingest needs, derived from `devices` and
    /// `profiles` and kept in step with them (see [`profile`]).
    pub ingest: HashMap<String, IngestInfo>,
}

/// Records waiting for the background writer, and the head of the audit
/// chain (which must advance under the same lock as the queue so the queue
/// is always in sequence order).
#[derive(Default)]
pub(crate) struct LogQueue {
    pub last_seq: u64,
    pub last_hash: [u8; 32],
    pub audit: Vec<store::AuditRow>,
    /// Audit records queued since start (see [`Registry::audit_mark`]).
    pub audit_appended: u64,
    pub last_event_seq: u64,
    pub events: Vec<SecurityEventRecord>,
}

/// Last-seen information, kept apart from [`State`] so the per-CONNECT
/// update takes a short mutex instead of the state's write lock.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub ms: i64,
    pub addr: String,
    pub persisted_ms: i64,
    pub dirty: bool,
}

/// A PSK's last successful handshake, kept apart like [`Seen`].
#[derive(Debug, Clone)]
pub(crate) struct PskUsed {
    pub ms: i64,
    pub persisted_ms: i64,
    pub dirty: bool,
}

pub(crate) struct Shared {
    pub store: Box<dyn RegistryStore>,
    pub state: RwLock<State>,
    /// Serializes writers so check-then-write sequences (two active tokens,
    /// claim uses) are atomic.
    pub write: Mutex<()>,
    pub seen: Mutex<HashMap<String, Seen>>,
    /// PSK id → last use.
    pub psk_used: Mutex<HashMap<String, PskUsed>>,
    pub log: Mutex<LogQueue>,
    /// Other domains' listeners for device deletions (weak: they must not
    /// keep this registry alive).
    pub removal: RwLock<Vec<std::sync::Weak<dyn DeviceRemoval>>>,
    pub wake: Condvar,
    /// Serializes flushes so batches reach the store in sequence order.
    pub flush_lock: Mutex<()>,
    /// Audit records written to the store since start, in queue order.
    pub audit_committed: std::sync::atomic::AtomicU64,
    pub shutdown: AtomicBool,
    pub dummy_password_hash: std::sync::OnceLock<String>,
    /// Security events as they are recorded, for the rule service (which
    /// raises alarms and runs rules on them); see `security.rs`.
    pub security_events: tokio::sync::broadcast::Sender<Arc<SecurityEventRecord>>,
}

struct FlusherGuard {
    shared: Arc<Shared>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FlusherGuard {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _q = self.shared.log.lock();
            self.shared.wake.notify_all();
        }
        if let Some(h) = self.handle.lock().take() {
            if h.join().is_err() {
                tracing::error!("registry writer thread panicked");
            }
        }
        // Whatever the thread did not get to (it flushes on shutdown, but be
        // sure): nothing queued is lost on an orderly close.
        if let Err(e) = self.shared.flush(true) {
            tracing::error!(error = %e, "registry: final flush failed");
        }
    }
}

/// How many queued audit records make `audit` write synchronously
/// (backpressure instead of unbounded memory when the disk stalls).
const AUDIT_BACKLOG_LIMIT: usize = 50_000;
/// Last-seen times are persisted at most this often per device.
const SEEN_PERSIST_INTERVAL_MS: i64 = 60_000;

impl Registry {
    /// Open (or create) `registry.db` in `dir`.
    pub fn open(dir: &Path) -> Result<Registry> {
        std::fs::create_dir_all(dir)?;
        let store = sqlite::SqliteStore::open(&dir.join("registry.db"))?;
        Registry::with_store(Box::new(store))
    }

    /// Use another storage backend.
    pub fn with_store(store: Box<dyn RegistryStore>) -> Result<Registry> {
        let snap = store.load()?;
        let (audit_tail, security_seq) = (snap.audit_tail, snap.security_seq);
        let (mut state, seen) = State::from_snapshot(snap);
        if !state.tenants.contains_key(DEFAULT_TENANT) {
            let t = Tenant {
                id: DEFAULT_TENANT.into(),
                name: "Default".into(),
                created_ms: now_ms(),
            };
            store.insert_tenant(&t)?;
            state.tenants.insert(t.id.clone(), t);
        }
        let log = LogQueue {
            last_seq: audit_tail.0,
            last_hash: audit_tail.1,
            last_event_seq: security_seq,
            ..Default::default()
        };
        Self::start(store, state, seen, log)
    }

    /// Read everything again from the store, replacing the in-memory copy:
    /// in a cluster another node changed the shared store (a device
    /// created, a credential revoked). Last-seen times and the logs are
    /// this node's own and stay as they are.
    pub fn reload(&self) -> Result<()> {
        // Under the writer lock, so no write of this node's falls between
        // the read and the swap.
        let _w = self.shared.write.lock();
        let snap = self.shared.store.load()?;
        let (state, _) = State::from_snapshot(snap);
        *self.shared.state.write() = state;
        Ok(())
    }
}

impl State {
    /// The in-memory copy of a snapshot, and the devices' last-seen times.
    fn from_snapshot(snap: store::Snapshot) -> (State, HashMap<String, Seen>) {
        let mut state = State::default();
        for t in snap.tenants {
            state.tenants.insert(t.id.clone(), t);
        }
        for g in snap.groups {
            state.groups.insert((g.tenant.clone(), g.id.clone()), g);
        }
        let mut seen = HashMap::new();
        for d in snap.devices {
            if let (Some(ms), Some(addr)) = (d.last_seen_ms, d.last_addr.clone()) {
                seen.insert(
                    d.id.clone(),
                    Seen {
                        ms,
                        addr,
                        persisted_ms: ms,
                        dirty: false,
                    },
                );
            }
            state.devices.insert(d.id.clone(), d);
        }
        for t in snap.tokens {
            state
                .tokens
                .entry(t.info.device_id.clone())
                .or_default()
                .push(t);
        }
        for v in state.tokens.values_mut() {
            v.sort_by(|a, b| (a.info.created_ms, &a.info.id).cmp(&(b.info.created_ms, &b.info.id)));
        }
        for c in snap.certs {
            state.certs.insert(c.fingerprint, c);
        }
        for p in snap.psks {
            state.psks.insert(p);
        }
        state.psks.sort();
        for c in snap.claims {
            state.claim_by_hash.insert(c.hash, c.info.id.clone());
            state.claims.insert(c.info.id.clone(), c);
        }
        for u in snap.users {
            state.users.insert(u.user.username.clone(), u);
        }
        for t in snap.api_tokens {
            state.api_by_hash.insert(t.hash, t.info.id.clone());
            state.api_tokens.insert(t.info.id.clone(), t);
        }
        for (tenant, p) in snap.policies {
            state
                .policies
                .entry(tenant)
                .or_default()
                .insert(p.name.clone(), p);
        }
        for p in snap.profiles {
            state.profiles.insert((p.tenant.clone(), p.name.clone()), p);
        }
        state.rebuild_ingest();
        (state, seen)
    }
}

impl Registry {
    fn start(
        store: Box<dyn RegistryStore>,
        state: State,
        seen: HashMap<String, Seen>,
        log: LogQueue,
    ) -> Result<Registry> {
        let shared = Arc::new(Shared {
            store,
            state: RwLock::new(state),
            write: Mutex::new(()),
            seen: Mutex::new(seen),
            psk_used: Mutex::new(HashMap::new()),
            log: Mutex::new(log),
            removal: RwLock::new(Vec::new()),
            wake: Condvar::new(),
            flush_lock: Mutex::new(()),
            audit_committed: std::sync::atomic::AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            dummy_password_hash: std::sync::OnceLock::new(),
            security_events: tokio::sync::broadcast::channel(SECURITY_EVENT_BACKLOG).0,
        });
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("registry-writer".into())
            .spawn(move || {
                // Background work: its SQLite bursts (a second's audit,
                // alarm and command changes) must not delay message
                // handling on a small machine, so it yields the CPU to it.
                let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
                writer_loop(&thread_shared)
            })?;
        Ok(Registry {
            _flusher: Arc::new(FlusherGuard {
                shared: Arc::clone(&shared),
                handle: Mutex::new(Some(handle)),
            }),
            shared,
        })
    }

    /// Write everything queued (audit records, security events, last-seen
    /// times) now. Reads of
    /// the logs call this first; call it before a planned shutdown if the
    /// handle may outlive the process's orderly exit.
    pub fn flush(&self) -> Result<()> {
        self.shared.flush(true)
    }

    /// A mark covering every audit record queued so far, for
    /// [`Registry::audit_durable`].
    pub fn audit_mark(&self) -> u64 {
        self.shared.log.lock().audit_appended
    }

    /// Make sure every audit record queued before `mark` is in the store
    /// (committed: it survives the process being killed), writing the queue
    /// now if the background writer has not yet. Whoever acknowledges an
    /// audited action calls this first; concurrent callers share one write.
    pub fn audit_durable(&self, mark: u64) -> Result<()> {
        let committed = || self.shared.audit_committed.load(Ordering::SeqCst);
        if committed() >= mark {
            return Ok(());
        }
        self.shared.flush(false)?;
        if committed() >= mark {
            Ok(())
        } else {
            Err(RegistryError::Storage(
                "the audit log could not be written".into(),
            ))
        }
    }

    /// How many audit records wait for the background writer.
    pub fn audit_backlog(&self) -> usize {
        self.shared.log.lock().audit.len()
    }
}

fn writer_loop(shared: &Shared) {
    loop {
        {
            let mut q = shared.log.lock();
            if !shared.shutdown.load(Ordering::SeqCst) && q.audit.is_empty() && q.events.is_empty()
            {
                shared.wake.wait_for(&mut q, Duration::from_secs(1));
            }
        }
        let stop = shared.shutdown.load(Ordering::SeqCst);
        if let Err(e) = shared.flush(stop) {
            tracing::warn!(error = %e, "registry: background write failed; will retry");
            std::thread::sleep(Duration::from_millis(200));
        }
        if stop {
            return;
        }
    }
}

impl Shared {
    /// Write queued records. `all_seen` writes every dirty last-seen entry;
    /// otherwise only those not persisted for [`SEEN_PERSIST_INTERVAL_MS`].
    pub(crate) fn flush(&self, all_seen: bool) -> Result<()> {
        let _g = self.flush_lock.lock();
        let (audit, events) = {
            let mut q = self.log.lock();
            (std::mem::take(&mut q.audit), std::mem::take(&mut q.events))
        };
        let now = now_ms();
        let seen: Vec<store::SeenUpdate> = {
            let mut seen = self.seen.lock();
            seen.iter_mut()
                .filter(|(_, s)| {
                    s.dirty && (all_seen || now - s.persisted_ms >= SEEN_PERSIST_INTERVAL_MS)
                })
                .map(|(id, s)| {
                    s.dirty = false;
                    s.persisted_ms = now;
                    store::SeenUpdate {
                        device_id: id.clone(),
                        ms: s.ms,
                        addr: s.addr.clone(),
                    }
                })
                .collect()
        };
        let psk_used: Vec<store::PskUseUpdate> = {
            let mut used = self.psk_used.lock();
            used.iter_mut()
                .filter(|(_, u)| {
                    u.dirty && (all_seen || now - u.persisted_ms >= SEEN_PERSIST_INTERVAL_MS)
                })
                .map(|(id, u)| {
                    u.dirty = false;
                    u.persisted_ms = now;
                    store::PskUseUpdate {
                        psk_id: id.clone(),
                        ms: u.ms,
                    }
                })
                .collect()
        };
        if audit.is_empty() && events.is_empty() && seen.is_empty() && psk_used.is_empty() {
            return Ok(());
        }
        let batch = store::LogBatch {
            audit: &audit,
            events: &events,
            seen: &seen,
            psk_used: &psk_used,
        };
        match self.store.append(&batch) {
            Ok(()) => {
                self.audit_committed
                    .fetch_add(audit.len() as u64, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                // Put everything back in front of what arrived meanwhile so
                // the next attempt keeps the sequence order.
                let mut q = self.log.lock();
                let mut a = audit;
                a.append(&mut q.audit);
                q.audit = a;
                let mut ev = events;
                ev.append(&mut q.events);
                q.events = ev;
                drop(q);
                let mut s = self.seen.lock();
                for u in seen {
                    if let Some(e) = s.get_mut(&u.device_id) {
                        e.dirty = true;
                    }
                }
                drop(s);
                let mut used = self.psk_used.lock();
                for u in psk_used {
                    if let Some(e) = used.get_mut(&u.psk_id) {
                        e.dirty = true;
                    }
                }
                drop(used);
                Err(e)
            }
        }
    }
}

/// Checks shared by every kind of id that may end up in a topic level.
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(RegistryError::Validation(format!(
            "{kind} id {id:?} must be 1 to 64 characters from A-Z a-z 0-9 . _ -"
        )));
    }
    Ok(())
}

pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    if name.len() > 256 || name.chars().any(char::is_control) {
        return Err(RegistryError::Validation(format!(
            "{kind} name must be at most 256 characters without control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub fn open() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open registry");
        (dir, reg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Everything written survives a close and reopen, and the caches are
    /// rebuilt from the file.
    #[test]
    fn reopen_persists_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = now_ms();
        let (tok_secret, api_secret, claim_secret) = {
            let reg = Registry::open(dir.path()).expect("open");
            reg.create_tenant("acme", "Acme").expect("tenant");
            reg.create_group("acme", "g1", "G1").expect("group");
            reg.create_profile(
                "acme",
                NewProfile {
                    name: "p".into(),
                    content_type: Some("application/json".into()),
                    description: "JSON".into(),
                },
            )
            .expect("profile");
            let mut labels = BTreeMap::new();
            labels.insert("site".to_string(), "north".to_string());
            reg.create_device(NewDevice {
                id: Some("d1".into()),
                name: Some("Device one".into()),
                tenant: "acme".into(),
                group: Some("g1".into()),
                profile: Some("p".into()),
                labels,
                enabled: true,
            })
            .expect("device");
            let (_t, tok) = reg.issue_token("d1", Some(now + 3_600_000)).expect("token");
            reg.add_certificate(
                "d1",
                CertRecord {
                    fingerprint: [7; 32],
                    serial_hex: "0a".into(),
                    not_after_ms: now + 3_600_000,
                    issuer: "external".into(),
                },
            )
            .expect("cert");
            reg.put_policy(
                "acme",
                Policy {
                    name: "p1".into(),
                    group: Some("g1".into()),
                    publish: vec!["tenants/{tenant}/x".into()],
                    subscribe: vec![],
                },
            )
            .expect("policy");
            reg.create_user("ops", "long enough", Role::Operator, Some("acme"))
                .expect("user");
            let (_a, api) = reg
                .create_api_token("ops", Role::Viewer, None, "ci")
                .expect("api token");
            let (_c, claim) = reg
                .create_claim_token(ClaimSpec {
                    name: "b".into(),
                    tenant: "acme".into(),
                    group: None,
                    profile: None,
                    max_uses: 3,
                    expires_ms: None,
                })
                .expect("claim");
            reg.redeem_claim(claim.as_bytes(), now, None)
                .expect("redeem");
            reg.record_seen("d1", "10.1.1.1");
            reg.audit("ops", "device.create", "d1", "ok", json!({"k": "v"}))
                .expect("audit");
            reg.record_security_event(SecurityEvent {
                kind: SecurityKind::Ban,
                device_id: Some("d1".into()),
                addr: None,
                detail: json!({}),
                ts_ms: None,
            })
            .expect("event");
            (tok, api, claim)
        };
        let reg = Registry::open(dir.path()).expect("reopen");
        assert_eq!(reg.list_tenants().expect("tenants").len(), 2);
        assert_eq!(reg.list_groups(Some("acme")).expect("groups").len(), 1);
        let d = reg.get_device("d1").expect("device");
        assert_eq!(d.labels.get("site").map(String::as_str), Some("north"));
        assert_eq!(d.last_addr.as_deref(), Some("10.1.1.1"));
        assert_eq!(d.group.as_deref(), Some("g1"));
        assert_eq!(
            reg.get_profile("acme", "p").expect("profile").description,
            "JSON"
        );
        assert_eq!(
            reg.ingest_info("d1").and_then(|i| i.content_type),
            Some("application/json")
        );
        assert!(matches!(
            reg.verify_device_token("d1", tok_secret.as_bytes(), now),
            TokenCheck::Valid(_)
        ));
        assert!(matches!(
            reg.check_certificate(&[7; 32], None, now),
            CertCheck::Valid(_)
        ));
        let scope = DeviceScope {
            device_id: "d1",
            tenant: "acme",
            group: Some("g1"),
        };
        assert!(reg.authorize(&scope, Action::Publish, "tenants/acme/x"));
        assert_eq!(
            reg.verify_api_token(&api_secret, now).expect("api").role,
            Role::Viewer
        );
        assert!(reg.verify_password("ops", "long enough").is_ok());
        assert_eq!(
            reg.check_claim(claim_secret.as_bytes(), now)
                .expect("claim")
                .uses,
            1
        );
        assert_eq!(reg.count_devices(Some("acme")).expect("count"), 2);
        assert_eq!(
            reg.list_audit(&AuditQuery::default()).expect("audit").len(),
            1
        );
        assert_eq!(reg.list_security_events(None, 10).expect("events").len(), 1);
        assert!(reg.verify_audit().expect("verify").ok);
    }

    #[test]
    fn database_is_in_wal_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _reg = Registry::open(dir.path()).expect("open");
        let c = rusqlite::Connection::open(dir.path().join("registry.db")).expect("db");
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("pragma");
        assert_eq!(mode.to_lowercase(), "wal");
    }
}
