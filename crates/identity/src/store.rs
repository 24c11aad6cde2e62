//! The storage boundary. [`Registry`](crate::Registry) keeps the working
//! copy in memory and calls this trait to make each change durable; all SQL
//! lives in the implementations: [`crate::sqlite`], and PostgreSQL in
//! `m2mhub-pgstore` (one conformance suite, `pgstore/tests/conformance`,
//! holds both to the same semantics).
//!
//! Callers guarantee the invariants (existence, uniqueness, limits) before
//! calling; a backend only has to apply each call atomically.

use crate::audit::{AuditQuery, AuditRecord};
use crate::certificate::CertInfo;
use crate::claim::{ClaimInfo, ClaimRecord};
use crate::device::Device;
use crate::error::Result;
use crate::policy::Policy;
use crate::profile::DeviceProfile;
use crate::psk::{PskInfo, PskRecord};
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
    pub psks: Vec<PskRecord>,
    pub claims: Vec<ClaimRecord>,
    pub users: Vec<UserRecord>,
    pub api_tokens: Vec<ApiTokenRecord>,
    /// (tenant, policy).
    pub policies: Vec<(String, Policy)>,
    pub profiles: Vec<DeviceProfile>,
    /// The last audit record's sequence number and hash (0 and zeros when
    /// the log is empty), where the chain continues.
    pub audit_tail: (u64, [u8; 32]),
    /// The last security event's sequence number.
    pub security_seq: u64,
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

/// A PSK's latest successful handshake, persisted lazily.
#[derive(Debug, Clone)]
pub struct PskUseUpdate {
    pub psk_id: String,
    pub ms: i64,
}

/// What the background writer appends in one transaction.
#[derive(Debug, Clone, Copy)]
pub struct LogBatch<'a> {
    /// In sequence order; the anchor advances to the last one.
    pub audit: &'a [AuditRow],
    pub events: &'a [SecurityEventRecord],
    pub seen: &'a [SeenUpdate],
    /// `last_used_ms` of PSKs (a PSK deleted meanwhile is skipped).
    pub psk_used: &'a [PskUseUpdate],
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
    /// Delete the device, its tokens and its PSKs; mark its
    /// certificates revoked at `revoked_ms` (they stay listed for the CRL).
    fn delete_device(&self, id: &str, revoked_ms: i64) -> Result<()>;

    fn insert_token(&self, t: &TokenRecord) -> Result<()>;
    /// Update `expires_ms` and `revoked`.
    fn update_token(&self, t: &TokenInfo) -> Result<()>;

    fn insert_psk(&self, p: &PskRecord) -> Result<()>;
    /// Update `revoked` and `replaced_by`.
    fn update_psk(&self, p: &PskInfo) -> Result<()>;
    /// Revoke `old` (its `replaced_by` set) and insert `new`, atomically.
    fn rotate_psk(&self, old: &PskInfo, new: &PskRecord) -> Result<()>;

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
}
