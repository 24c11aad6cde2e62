//! The storage boundary. [`Registry`](crate::Registry) keeps the working
//! copy in memory and calls this trait to make each change durable; all SQL
//! lives in the implementation ([`crate::sqlite`]), so a PostgreSQL backend
//! is one more implementation of this trait.
//!
//! Callers guarantee the invariants (existence, uniqueness, limits) before
//! calling; a backend only has to apply each call atomically.

use crate::alarm::{Alarm, AlarmFilter};
use crate::audit::{AuditQuery, AuditRecord};
use crate::certificate::CertInfo;
use crate::claim::{ClaimInfo, ClaimRecord};
use crate::command::Command;
use crate::device::Device;
use crate::device_event::DeviceEvent;
use crate::error::Result;
use crate::policy::Policy;
use crate::profile::DeviceProfile;
use crate::rule::Rule;
use crate::security::SecurityEventRecord;
use crate::tenant::{Group, Tenant};
use crate::token::{TokenInfo, TokenRecord};
use crate::user::{ApiTokenInfo, ApiTokenRecord, UserRecord};

/// Everything the registry caches, as loaded at open.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub tenants: Vec<Tenant>,
    pub groups: Vec<Group>,
    pub devices: Vec<Device>,
    pub tokens: Vec<TokenRecord>,
    pub certs: Vec<CertInfo>,
    pub claims: Vec<ClaimRecord>,
    pub users: Vec<UserRecord>,
    pub api_tokens: Vec<ApiTokenRecord>,
    /// (tenant, policy).
    pub policies: Vec<(String, Policy)>,
    pub profiles: Vec<DeviceProfile>,
    pub rules: Vec<Rule>,
    /// Alarms whose status is active.
    pub active_alarms: Vec<Alarm>,
    /// The largest alarm id (0 when there are none).
    pub alarm_seq: u64,
    /// Commands not finished (pending, sent or delivered).
    pub open_commands: Vec<Command>,
    /// The last audit record's sequence number and hash (0 and zeros when
    /// the log is empty), where the chain continues.
    pub audit_tail: (u64, [u8; 32]),
    /// The last security event's sequence number.
    pub security_seq: u64,
    /// The largest device event id (0 when there are none).
    pub device_event_seq: u64,
}

/// One audit record exactly as stored and hashed: `detail` is the JSON text
/// that went into the hash, so verification never depends on how a JSON
/// library orders or formats a re-serialized value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: u64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A device's latest connection, persisted lazily.
#[derive(Debug, Clone)]
pub struct SeenUpdate {
    pub device_id: String,
    pub ms: i64,
    pub addr: String,
}

/// What the background writer appends in one transaction.
#[derive(Debug, Clone, Copy)]
pub struct LogBatch<'a> {
    /// In sequence order; the anchor advances to the last one.
    pub audit: &'a [AuditRow],
    pub events: &'a [SecurityEventRecord],
    pub seen: &'a [SeenUpdate],
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

/// Durable storage for the registry.
pub trait RegistryStore: Send + Sync + 'static {
    fn load(&self) -> Result<Snapshot>;

    fn insert_tenant(&self, t: &Tenant) -> Result<()>;
    fn insert_group(&self, g: &Group) -> Result<()>;
    fn delete_group(&self, tenant: &str, id: &str) -> Result<()>;

    fn insert_device(&self, d: &Device) -> Result<()>;
    /// Update the mutable fields (name, group, profile, labels, enabled).
    fn update_device(&self, d: &Device) -> Result<()>;
    /// Delete the device, its tokens, device events, alarms and commands; mark its
    /// certificates revoked at `revoked_ms` (they stay listed for the CRL).
    fn delete_device(&self, id: &str, revoked_ms: i64) -> Result<()>;

    fn insert_token(&self, t: &TokenRecord) -> Result<()>;
    /// Update `expires_ms` and `revoked`.
    fn update_token(&self, t: &TokenInfo) -> Result<()>;

    fn insert_certificate(&self, c: &CertInfo) -> Result<()>;
    /// Update `revoked_ms`.
    fn update_certificate(&self, c: &CertInfo) -> Result<()>;

    fn insert_claim(&self, c: &ClaimRecord) -> Result<()>;
    /// Update `uses` and `revoked`.
    fn update_claim(&self, c: &ClaimInfo) -> Result<()>;
    /// Consume a use and create the device, atomically.
    fn redeem_claim(&self, c: &ClaimInfo, d: &Device) -> Result<()>;

    fn insert_user(&self, u: &UserRecord) -> Result<()>;
    /// Update password hash and role.
    fn update_user(&self, u: &UserRecord) -> Result<()>;
    /// Delete the user and its API tokens.
    fn delete_user(&self, username: &str) -> Result<()>;
    fn insert_api_token(&self, t: &ApiTokenRecord) -> Result<()>;
    /// Update `revoked`.
    fn update_api_token(&self, t: &ApiTokenInfo) -> Result<()>;

    /// Insert or replace the tenant's policy of that name.
    fn put_policy(&self, tenant: &str, p: &Policy) -> Result<()>;
    fn delete_policy(&self, tenant: &str, name: &str) -> Result<()>;

    fn insert_profile(&self, p: &DeviceProfile) -> Result<()>;
    /// Update `content_type` and `description`.
    fn update_profile(&self, p: &DeviceProfile) -> Result<()>;
    fn delete_profile(&self, tenant: &str, name: &str) -> Result<()>;

    fn insert_rule(&self, r: &Rule) -> Result<()>;
    /// Update everything but the id, tenant and creation time.
    fn update_rule(&self, r: &Rule) -> Result<()>;
    fn delete_rule(&self, id: &str) -> Result<()>;

    /// Append everything in `batch` in one transaction.
    fn append(&self, batch: &LogBatch<'_>) -> Result<()>;
    fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>>;
    /// Every audit row in sequence order, for verification; `f` returns
    /// false to stop early.
    fn scan_audit(&self, f: &mut dyn FnMut(AuditRow) -> bool) -> Result<()>;
    /// The anchor: the sequence number and hash of the last append.
    fn audit_anchor(&self) -> Result<(u64, String)>;
    fn list_security_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<SecurityEventRecord>>;
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

    /// Insert or replace one alarm now (outside the batches).
    fn put_alarm(&self, a: &Alarm) -> Result<()>;
    fn get_alarm(&self, id: u64) -> Result<Option<Alarm>>;
    /// Alarms matching `f` (its `limit` is replaced by `limit`), newest first.
    fn list_alarms(&self, f: &AlarmFilter, limit: usize) -> Result<Vec<Alarm>>;
    fn get_command(&self, id: &str) -> Result<Option<Command>>;
    /// A device's commands, newest (by creation, then id) first: of
    /// `tenant` if given, older than the command `before` if given.
    fn list_commands(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>>;
}
