//! The SQLite backend: every SQL statement of the identity registry is in
//! this file (fleet operations keep theirs in `m2mhub-fleet`).
//!
//! The SQL is deliberately plain (CREATE TABLE / INDEX IF NOT EXISTS in
//! versioned [`MIGRATIONS`],
//! INSERT, UPDATE, DELETE, SELECT with `?` parameters, BIGINT/TEXT/INTEGER
//! columns, booleans as 0/1, hashes and fingerprints as hex text) so a
//! PostgreSQL implementation of [`RegistryStore`] can reuse it nearly as
//! is. SQLite-specific settings are limited to the PRAGMAs at open: WAL so
//! readers (and `m2mhub audit verify` on a live system) never block the
//! writer, and `synchronous = NORMAL`, which in WAL mode stays consistent
//! after a crash and only risks the last transactions on power loss.

use crate::audit::{AuditQuery, AuditRecord, GENESIS_HASH};
use crate::certificate::CertInfo;
use crate::claim::{ClaimInfo, ClaimRecord};
use crate::device::Device;
use crate::error::{RegistryError, Result};
use crate::policy::Policy;
use crate::profile::DeviceProfile;
use crate::psk::{PskInfo, PskRecord, SealedKey};
use crate::secret::{hex, unhex, unhex32};
use crate::security::SecurityEventRecord;
use crate::sql::{corrupt, execute_one, i64_of, migrate, open_sqlite, u32_of, u64_of, Migration};
use crate::store::{AuditRow, LogBatch, RegistryStore, Snapshot};
use crate::tenant::{Group, Tenant};
use crate::token::{TokenInfo, TokenRecord};
use crate::user::{ApiTokenInfo, ApiTokenRecord, User, UserRecord};
use parking_lot::Mutex;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension, Row};
use std::path::Path;
use std::time::Duration;

/// The identity tables, version by version (see [`crate::sql`]). Plain
/// enough SQL that the PostgreSQL store (`m2mhub-pgstore`) applies the same
/// steps, so both backends share one schema history.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS device_groups (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    group_id TEXT,
    profile TEXT NOT NULL,
    labels TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    created_ms BIGINT NOT NULL,
    last_seen_ms BIGINT,
    last_addr TEXT
);
CREATE TABLE IF NOT EXISTS device_tokens (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT,
    revoked INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS device_tokens_device ON device_tokens (device_id);
CREATE TABLE IF NOT EXISTS certificates (
    fingerprint TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    serial_hex TEXT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    issuer TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
CREATE TABLE IF NOT EXISTS claim_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    group_id TEXT,
    profile TEXT NOT NULL,
    max_uses BIGINT NOT NULL,
    uses BIGINT NOT NULL,
    expires_ms BIGINT,
    revoked INTEGER NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    tenant TEXT,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT,
    revoked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS policies (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    group_id TEXT,
    publish TEXT NOT NULL,
    subscribe TEXT NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_actor ON audit_log (actor, seq);
CREATE INDEX IF NOT EXISTS audit_log_action ON audit_log (action, seq);
CREATE TABLE IF NOT EXISTS audit_anchor (
    id INTEGER PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS security_events (
    seq BIGINT PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    addr TEXT,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS device_profiles (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    content_type TEXT,
    description TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);
",
    },
    // DTLS pre-shared keys (psk.rs). The key is sealed by the caller
    // (hex text like every other binary value here); the partial unique
    // index lets revoked rows keep their identity for the record while a
    // new PSK takes it (SQLite and PostgreSQL both have partial indexes).
    Migration {
        version: 2,
        sql: "
CREATE TABLE IF NOT EXISTS device_psks (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    identity TEXT NOT NULL,
    sealed_key TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT,
    revoked INTEGER NOT NULL,
    replaced_by TEXT,
    last_used_ms BIGINT
);
CREATE INDEX IF NOT EXISTS device_psks_device ON device_psks (device_id);
CREATE UNIQUE INDEX IF NOT EXISTS device_psks_live_identity ON device_psks (identity) WHERE revoked = 0;
",
    },
];

/// SQLite-backed [`RegistryStore`]. One connection behind a mutex: the
/// registry serializes writes anyway and reads come from its caches.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn hash_of(s: &str, what: &str) -> Result<[u8; 32]> {
    unhex32(s).ok_or_else(|| corrupt(what))
}

impl SqliteStore {
    /// Open or create the database and bring the schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn = open_sqlite(path)?;
        migrate(&mut conn, "identity", MIGRATIONS)?;
        let anchors: i64 = conn.query_row("SELECT COUNT(*) FROM audit_anchor", [], |r| r.get(0))?;
        if anchors == 0 {
            conn.execute(
                "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, 0, ?)",
                params![hex(&GENESIS_HASH)],
            )?;
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    /// Open an existing database read-only (offline audit verification).
    pub fn open_read_only(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn exec(&self, sql: &str, p: impl rusqlite::Params) -> Result<usize> {
        Ok(self.conn.lock().execute(sql, p)?)
    }

    /// Execute an UPDATE/DELETE that must hit a row.
    fn exec_one(&self, what: &str, sql: &str, p: impl rusqlite::Params) -> Result<()> {
        execute_one(&self.conn.lock(), what, sql, p)
    }
}

fn device_from_row(r: &Row<'_>) -> rusqlite::Result<(Device, String)> {
    Ok((
        Device {
            id: r.get(0)?,
            name: r.get(1)?,
            tenant: r.get(2)?,
            group: r.get(3)?,
            profile: r.get(4)?,
            labels: Default::default(),
            enabled: r.get::<_, i64>(6)? != 0,
            created_ms: r.get(7)?,
            last_seen_ms: r.get(8)?,
            last_addr: r.get(9)?,
        },
        r.get(5)?,
    ))
}

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<(i64, AuditRow)> {
    Ok((
        r.get(0)?,
        AuditRow {
            seq: 0,
            ts_ms: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            target: r.get(4)?,
            outcome: r.get(5)?,
            detail: r.get(6)?,
            prev_hash: r.get(7)?,
            hash: r.get(8)?,
        },
    ))
}

const AUDIT_COLUMNS: &str = "seq, ts_ms, actor, action, target, outcome, detail, prev_hash, hash";

fn insert_psk(c: &Connection, p: &PskRecord) -> Result<()> {
    let i = &p.info;
    c.execute(
        "INSERT INTO device_psks (id, device_id, identity, sealed_key, created_ms, expires_ms, revoked, replaced_by, last_used_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        params![
            i.id,
            i.device_id,
            i.identity,
            hex(p.sealed_key.as_bytes()),
            i.created_ms,
            i.expires_ms,
            i64::from(i.revoked),
            i.replaced_by,
            i.last_used_ms
        ],
    )?;
    Ok(())
}

fn insert_device(c: &Connection, d: &Device) -> Result<()> {
    c.execute(
        "INSERT INTO devices (id, name, tenant, group_id, profile, labels, enabled, created_ms, last_seen_ms, last_addr) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        params![
            d.id,
            d.name,
            d.tenant,
            d.group,
            d.profile,
            serde_json::to_string(&d.labels)?,
            i64::from(d.enabled),
            d.created_ms,
            d.last_seen_ms,
            d.last_addr
        ],
    )?;
    Ok(())
}

impl RegistryStore for SqliteStore {
    fn load(&self) -> Result<Snapshot> {
        let c = self.conn.lock();
        let mut snap = Snapshot::default();

        let mut st = c.prepare("SELECT id, name, created_ms FROM tenants")?;
        for t in st.query_map([], |r| {
            Ok(Tenant {
                id: r.get(0)?,
                name: r.get(1)?,
                created_ms: r.get(2)?,
            })
        })? {
            snap.tenants.push(t?);
        }

        let mut st = c.prepare("SELECT tenant, id, name, created_ms FROM device_groups")?;
        for g in st.query_map([], |r| {
            Ok(Group {
                tenant: r.get(0)?,
                id: r.get(1)?,
                name: r.get(2)?,
                created_ms: r.get(3)?,
            })
        })? {
            snap.groups.push(g?);
        }

        let mut st = c.prepare(
            "SELECT id, name, tenant, group_id, profile, labels, enabled, created_ms, last_seen_ms, last_addr FROM devices",
        )?;
        for row in st.query_map([], device_from_row)? {
            let (mut d, labels) = row?;
            d.labels = serde_json::from_str(&labels)?;
            snap.devices.push(d);
        }

        let mut st = c.prepare(
            "SELECT id, device_id, hash, created_ms, expires_ms, revoked FROM device_tokens",
        )?;
        for row in st.query_map([], |r| {
            Ok((
                TokenInfo {
                    id: r.get(0)?,
                    device_id: r.get(1)?,
                    created_ms: r.get(3)?,
                    expires_ms: r.get(4)?,
                    revoked: r.get::<_, i64>(5)? != 0,
                },
                r.get::<_, String>(2)?,
            ))
        })? {
            let (info, hash) = row?;
            snap.tokens.push(TokenRecord {
                hash: hash_of(&hash, "token hash")?,
                info,
            });
        }

        let mut st = c.prepare(
            "SELECT fingerprint, device_id, serial_hex, not_after_ms, issuer, created_ms, revoked_ms FROM certificates",
        )?;
        for row in st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })? {
            let (fp, device_id, serial_hex, not_after_ms, issuer, created_ms, revoked_ms) = row?;
            snap.certs.push(CertInfo {
                fingerprint: hash_of(&fp, "certificate fingerprint")?,
                device_id,
                serial_hex,
                not_after_ms,
                issuer,
                created_ms,
                revoked_ms,
            });
        }

        // In the order written (SQLite's rowid; a PostgreSQL backend would
        // order by a serial column), so a rotation lists after what it replaced.
        let mut st = c.prepare(
            "SELECT id, device_id, identity, sealed_key, created_ms, expires_ms, revoked, replaced_by, last_used_ms FROM device_psks ORDER BY rowid",
        )?;
        for row in st.query_map([], |r| {
            Ok((
                PskInfo {
                    id: r.get(0)?,
                    device_id: r.get(1)?,
                    identity: r.get(2)?,
                    created_ms: r.get(4)?,
                    expires_ms: r.get(5)?,
                    revoked: r.get::<_, i64>(6)? != 0,
                    replaced_by: r.get(7)?,
                    last_used_ms: r.get(8)?,
                },
                r.get::<_, String>(3)?,
            ))
        })? {
            let (info, sealed) = row?;
            snap.psks.push(PskRecord {
                sealed_key: SealedKey::new(unhex(&sealed).ok_or_else(|| corrupt("sealed PSK"))?),
                info,
            });
        }

        let mut st = c.prepare(
            "SELECT id, name, hash, tenant, group_id, profile, max_uses, uses, expires_ms, revoked, created_ms FROM claim_tokens",
        )?;
        for row in st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, Option<i64>>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, i64>(10)?,
            ))
        })? {
            let (
                id,
                name,
                hash,
                tenant,
                group,
                profile,
                max_uses,
                uses,
                expires_ms,
                revoked,
                created_ms,
            ) = row?;
            snap.claims.push(ClaimRecord {
                hash: hash_of(&hash, "claim hash")?,
                info: ClaimInfo {
                    id,
                    name,
                    tenant,
                    group,
                    profile,
                    max_uses: u32_of(max_uses, "claim max_uses")?,
                    uses: u32_of(uses, "claim uses")?,
                    expires_ms,
                    revoked: revoked != 0,
                    created_ms,
                },
            });
        }

        let mut st =
            c.prepare("SELECT username, password_hash, role, tenant, created_ms FROM users")?;
        for row in st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })? {
            let (username, password_hash, role, tenant, created_ms) = row?;
            snap.users.push(UserRecord {
                user: User {
                    username,
                    role: role.parse().map_err(|_| corrupt("user role"))?,
                    tenant,
                    created_ms,
                },
                password_hash,
            });
        }

        let mut st = c.prepare(
            "SELECT id, username, name, hash, role, created_ms, expires_ms, revoked FROM api_tokens",
        )?;
        for row in st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })? {
            let (id, username, name, hash, role, created_ms, expires_ms, revoked) = row?;
            snap.api_tokens.push(ApiTokenRecord {
                hash: hash_of(&hash, "API token hash")?,
                info: ApiTokenInfo {
                    id,
                    username,
                    name,
                    role: role.parse().map_err(|_| corrupt("API token role"))?,
                    created_ms,
                    expires_ms,
                    revoked: revoked != 0,
                },
            });
        }

        let mut st =
            c.prepare("SELECT tenant, name, group_id, publish, subscribe FROM policies")?;
        for row in st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })? {
            let (tenant, name, group, publish, subscribe) = row?;
            snap.policies.push((
                tenant,
                Policy {
                    name,
                    group,
                    publish: serde_json::from_str(&publish)?,
                    subscribe: serde_json::from_str(&subscribe)?,
                },
            ));
        }

        let mut st = c.prepare(
            "SELECT tenant, name, content_type, description, created_ms FROM device_profiles",
        )?;
        for p in st.query_map([], |r| {
            Ok(DeviceProfile {
                tenant: r.get(0)?,
                name: r.get(1)?,
                content_type: r.get(2)?,
                description: r.get(3)?,
                created_ms: r.get(4)?,
            })
        })? {
            snap.profiles.push(p?);
        }

        drop(st);
        let tail: Option<(i64, String)> = c
            .query_row(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        snap.audit_tail = match tail {
            Some((seq, hash)) => (u64_of(seq, "audit seq")?, hash_of(&hash, "audit hash")?),
            None => (0, GENESIS_HASH),
        };
        let (anchor_seq, anchor_hash): (i64, String) =
            c.query_row("SELECT seq, hash FROM audit_anchor WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let anchor_seq = u64_of(anchor_seq, "audit anchor")?;
        if anchor_seq > snap.audit_tail.0 {
            // Records were removed from the end. Continue after the anchor,
            // so new records never reuse a removed sequence number and the
            // gap stays visible to verification.
            tracing::error!(
                anchor = anchor_seq,
                last = snap.audit_tail.0,
                "registry: audit log is shorter than its anchor (records removed)"
            );
            snap.audit_tail = (anchor_seq, hash_of(&anchor_hash, "audit anchor hash")?);
        }
        let ev: Option<i64> = c
            .query_row(
                "SELECT seq FROM security_events ORDER BY seq DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        snap.security_seq = ev.map_or(Ok(0), |s| u64_of(s, "security event seq"))?;
        Ok(snap)
    }

    fn insert_tenant(&self, t: &Tenant) -> Result<()> {
        self.exec(
            "INSERT INTO tenants (id, name, created_ms) VALUES (?, ?, ?)",
            params![t.id, t.name, t.created_ms],
        )?;
        Ok(())
    }

    fn insert_group(&self, g: &Group) -> Result<()> {
        self.exec(
            "INSERT INTO device_groups (tenant, id, name, created_ms) VALUES (?, ?, ?, ?)",
            params![g.tenant, g.id, g.name, g.created_ms],
        )?;
        Ok(())
    }

    fn delete_group(&self, tenant: &str, id: &str) -> Result<()> {
        self.exec_one(
            "group",
            "DELETE FROM device_groups WHERE tenant = ? AND id = ?",
            params![tenant, id],
        )
    }

    fn insert_device(&self, d: &Device) -> Result<()> {
        insert_device(&self.conn.lock(), d)
    }

    fn update_device(&self, d: &Device) -> Result<()> {
        self.exec_one(
            "device",
            "UPDATE devices SET name = ?, group_id = ?, profile = ?, labels = ?, enabled = ? WHERE id = ?",
            params![
                d.name,
                d.group,
                d.profile,
                serde_json::to_string(&d.labels)?,
                i64::from(d.enabled),
                d.id
            ],
        )
    }

    fn delete_device(&self, id: &str, revoked_ms: i64) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM device_tokens WHERE device_id = ?", params![id])?;
        tx.execute("DELETE FROM device_psks WHERE device_id = ?", params![id])?;
        tx.execute(
            "UPDATE certificates SET revoked_ms = ? WHERE device_id = ? AND revoked_ms IS NULL",
            params![revoked_ms, id],
        )?;
        if tx.execute("DELETE FROM devices WHERE id = ?", params![id])? == 0 {
            return Err(RegistryError::NotFound(format!("device {id}")));
        }
        tx.commit()?;
        Ok(())
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        self.exec(
            "INSERT INTO device_tokens (id, device_id, hash, created_ms, expires_ms, revoked) VALUES (?, ?, ?, ?, ?, ?)",
            params![
                t.info.id,
                t.info.device_id,
                hex(&t.hash),
                t.info.created_ms,
                t.info.expires_ms,
                i64::from(t.info.revoked)
            ],
        )?;
        Ok(())
    }

    fn update_token(&self, t: &TokenInfo) -> Result<()> {
        self.exec_one(
            "token",
            "UPDATE device_tokens SET expires_ms = ?, revoked = ? WHERE id = ? AND device_id = ?",
            params![t.expires_ms, i64::from(t.revoked), t.id, t.device_id],
        )
    }

    fn insert_psk(&self, p: &PskRecord) -> Result<()> {
        insert_psk(&self.conn.lock(), p)
    }

    fn update_psk(&self, p: &PskInfo) -> Result<()> {
        self.exec_one(
            "PSK",
            "UPDATE device_psks SET revoked = ?, replaced_by = ? WHERE id = ? AND device_id = ?",
            params![i64::from(p.revoked), p.replaced_by, p.id, p.device_id],
        )
    }

    fn rotate_psk(&self, old: &PskInfo, new: &PskRecord) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        // The old row first: the identity's unique index admits one live row.
        execute_one(
            &tx,
            "PSK",
            "UPDATE device_psks SET revoked = ?, replaced_by = ? WHERE id = ? AND device_id = ?",
            params![
                i64::from(old.revoked),
                old.replaced_by,
                old.id,
                old.device_id
            ],
        )?;
        insert_psk(&tx, new)?;
        tx.commit()?;
        Ok(())
    }

    fn insert_certificate(&self, c: &CertInfo) -> Result<()> {
        self.exec(
            "INSERT INTO certificates (fingerprint, device_id, serial_hex, not_after_ms, issuer, created_ms, revoked_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
            params![
                hex(&c.fingerprint),
                c.device_id,
                c.serial_hex,
                c.not_after_ms,
                c.issuer,
                c.created_ms,
                c.revoked_ms
            ],
        )?;
        Ok(())
    }

    fn update_certificate(&self, c: &CertInfo) -> Result<()> {
        self.exec_one(
            "certificate",
            "UPDATE certificates SET revoked_ms = ? WHERE fingerprint = ?",
            params![c.revoked_ms, hex(&c.fingerprint)],
        )
    }

    fn insert_claim(&self, c: &ClaimRecord) -> Result<()> {
        let i = &c.info;
        self.exec(
            "INSERT INTO claim_tokens (id, name, hash, tenant, group_id, profile, max_uses, uses, expires_ms, revoked, created_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            params![
                i.id,
                i.name,
                hex(&c.hash),
                i.tenant,
                i.group,
                i.profile,
                i64::from(i.max_uses),
                i64::from(i.uses),
                i.expires_ms,
                i64::from(i.revoked),
                i.created_ms
            ],
        )?;
        Ok(())
    }

    fn update_claim(&self, c: &ClaimInfo) -> Result<()> {
        self.exec_one(
            "claim token",
            "UPDATE claim_tokens SET uses = ?, revoked = ? WHERE id = ?",
            params![i64::from(c.uses), i64::from(c.revoked), c.id],
        )
    }

    fn redeem_claim(&self, c: &ClaimInfo, d: &Device) -> Result<()> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction()?;
        // The guard in the WHERE clause keeps the limit even if another
        // process shared the file.
        let n = tx.execute(
            "UPDATE claim_tokens SET uses = ? WHERE id = ? AND uses = ? AND uses < max_uses",
            params![i64::from(c.uses), c.id, i64::from(c.uses) - 1],
        )?;
        if n == 0 {
            return Err(RegistryError::Conflict(format!(
                "claim token {} changed concurrently",
                c.id
            )));
        }
        insert_device(&tx, d)?;
        tx.commit()?;
        Ok(())
    }

    fn insert_user(&self, u: &UserRecord) -> Result<()> {
        self.exec(
            "INSERT INTO users (username, password_hash, role, tenant, created_ms) VALUES (?, ?, ?, ?, ?)",
            params![
                u.user.username,
                u.password_hash,
                u.user.role.as_str(),
                u.user.tenant,
                u.user.created_ms
            ],
        )?;
        Ok(())
    }

    fn update_user(&self, u: &UserRecord) -> Result<()> {
        self.exec_one(
            "user",
            "UPDATE users SET password_hash = ?, role = ? WHERE username = ?",
            params![u.password_hash, u.user.role.as_str(), u.user.username],
        )
    }

    fn delete_user(&self, username: &str) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.execute(
            "DELETE FROM api_tokens WHERE username = ?",
            params![username],
        )?;
        if tx.execute("DELETE FROM users WHERE username = ?", params![username])? == 0 {
            return Err(RegistryError::NotFound(format!("user {username}")));
        }
        tx.commit()?;
        Ok(())
    }

    fn insert_api_token(&self, t: &ApiTokenRecord) -> Result<()> {
        let i = &t.info;
        self.exec(
            "INSERT INTO api_tokens (id, username, name, hash, role, created_ms, expires_ms, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            params![
                i.id,
                i.username,
                i.name,
                hex(&t.hash),
                i.role.as_str(),
                i.created_ms,
                i.expires_ms,
                i64::from(i.revoked)
            ],
        )?;
        Ok(())
    }

    fn update_api_token(&self, t: &ApiTokenInfo) -> Result<()> {
        self.exec_one(
            "API token",
            "UPDATE api_tokens SET revoked = ? WHERE id = ?",
            params![i64::from(t.revoked), t.id],
        )
    }

    fn put_policy(&self, tenant: &str, p: &Policy) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.execute(
            "DELETE FROM policies WHERE tenant = ? AND name = ?",
            params![tenant, p.name],
        )?;
        tx.execute(
            "INSERT INTO policies (tenant, name, group_id, publish, subscribe) VALUES (?, ?, ?, ?, ?)",
            params![
                tenant,
                p.name,
                p.group,
                serde_json::to_string(&p.publish)?,
                serde_json::to_string(&p.subscribe)?
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn delete_policy(&self, tenant: &str, name: &str) -> Result<()> {
        self.exec_one(
            "policy",
            "DELETE FROM policies WHERE tenant = ? AND name = ?",
            params![tenant, name],
        )
    }

    fn insert_profile(&self, p: &DeviceProfile) -> Result<()> {
        self.exec(
            "INSERT INTO device_profiles (tenant, name, content_type, description, created_ms) VALUES (?, ?, ?, ?, ?)",
            params![p.tenant, p.name, p.content_type, p.description, p.created_ms],
        )?;
        Ok(())
    }

    fn update_profile(&self, p: &DeviceProfile) -> Result<()> {
        self.exec_one(
            "profile",
            "UPDATE device_profiles SET content_type = ?, description = ? WHERE tenant = ? AND name = ?",
            params![p.content_type, p.description, p.tenant, p.name],
        )
    }

    fn delete_profile(&self, tenant: &str, name: &str) -> Result<()> {
        self.exec_one(
            "profile",
            "DELETE FROM device_profiles WHERE tenant = ? AND name = ?",
            params![tenant, name],
        )
    }

    fn append(&self, batch: &LogBatch<'_>) -> Result<()> {
        let LogBatch {
            audit,
            events,
            seen,
            psk_used,
        } = *batch;
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        {
            let mut ins = tx.prepare(&format!(
                "INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))?;
            for r in audit {
                ins.execute(params![
                    i64_of(r.seq)?,
                    r.ts_ms,
                    r.actor,
                    r.action,
                    r.target,
                    r.outcome,
                    r.detail,
                    r.prev_hash,
                    r.hash
                ])?;
            }
            if let Some(last) = audit.last() {
                tx.execute(
                    "UPDATE audit_anchor SET seq = ?, hash = ? WHERE id = 1",
                    params![i64_of(last.seq)?, last.hash],
                )?;
            }
            let mut ins = tx.prepare(
                "INSERT INTO security_events (seq, ts_ms, kind, device_id, addr, detail) VALUES (?, ?, ?, ?, ?, ?)",
            )?;
            for e in events {
                ins.execute(params![
                    i64_of(e.seq)?,
                    e.ts_ms,
                    e.kind.as_str(),
                    e.device_id,
                    e.addr,
                    serde_json::to_string(&e.detail)?
                ])?;
            }
            let mut upd =
                tx.prepare("UPDATE devices SET last_seen_ms = ?, last_addr = ? WHERE id = ?")?;
            for s in seen {
                upd.execute(params![s.ms, s.addr, s.device_id])?;
            }
            let mut upd = tx.prepare("UPDATE device_psks SET last_used_ms = ? WHERE id = ?")?;
            for u in psk_used {
                upd.execute(params![u.ms, u.psk_id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let mut cond = Vec::new();
        let mut vals: Vec<Value> = Vec::new();
        if let Some(a) = q.after_seq {
            cond.push("seq > ?");
            vals.push(Value::Integer(i64_of(a)?));
        }
        if let Some(b) = q.before_seq {
            cond.push("seq < ?");
            vals.push(Value::Integer(i64_of(b)?));
        }
        if let Some(a) = &q.actor {
            cond.push("actor = ?");
            vals.push(Value::Text(a.clone()));
        }
        if let Some(a) = &q.action {
            cond.push("action = ?");
            vals.push(Value::Text(a.clone()));
        }
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        vals.push(Value::Integer(i64::try_from(limit).unwrap_or(10_000)));
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log {} {} ORDER BY seq {} LIMIT ?",
            if cond.is_empty() { "" } else { "WHERE" },
            cond.join(" AND "),
            if q.newest_first { "DESC" } else { "ASC" },
        );
        let c = self.conn.lock();
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map(params_from_iter(vals.iter()), audit_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, mut r) = row?;
            r.seq = u64_of(seq, "audit seq")?;
            out.push(AuditRecord::try_from(r)?);
        }
        Ok(out)
    }

    fn scan_audit(&self, f: &mut dyn FnMut(AuditRow) -> bool) -> Result<()> {
        let c = self.conn.lock();
        let mut st = c.prepare(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq"
        ))?;
        let mut rows = st.query([])?;
        while let Some(row) = rows.next()? {
            let (seq, mut r) = audit_from_row(row)?;
            r.seq = u64_of(seq, "audit seq")?;
            if !f(r) {
                break;
            }
        }
        Ok(())
    }

    fn audit_anchor(&self) -> Result<(u64, String)> {
        let c = self.conn.lock();
        let a: Option<(i64, String)> = c
            .query_row("SELECT seq, hash FROM audit_anchor WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        match a {
            Some((seq, hash)) => Ok((u64_of(seq, "audit anchor")?, hash)),
            None => Err(corrupt("audit anchor (missing)")),
        }
    }

    fn list_security_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<SecurityEventRecord>> {
        let c = self.conn.lock();
        let mut st = c.prepare(
            "SELECT seq, ts_ms, kind, device_id, addr, detail FROM security_events WHERE seq > ? ORDER BY seq LIMIT ?",
        )?;
        let rows = st.query_map(
            params![
                i64_of(after.unwrap_or(0))?,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, ts_ms, kind, device_id, addr, detail) = row?;
            out.push(SecurityEventRecord {
                seq: u64_of(seq, "security event seq")?,
                ts_ms,
                kind: kind.parse().map_err(|_| corrupt("security event kind"))?,
                device_id,
                addr,
                detail: serde_json::from_str(&detail)?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;

    /// A `registry.db` written before PSKs existed (schema version 1) opens
    /// with its devices, gains the PSK table, and its PSKs persist.
    #[test]
    fn a_version_1_database_gains_the_psk_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.db");
        {
            let mut c = open_sqlite(&path).expect("open");
            migrate(&mut c, "identity", &MIGRATIONS[..1]).expect("version 1");
            c.execute(
                "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, 0, ?)",
                params![hex(&GENESIS_HASH)],
            )
            .expect("anchor");
            insert_device(
                &c,
                &Device {
                    id: "old-1".into(),
                    name: "written by version 1".into(),
                    tenant: crate::DEFAULT_TENANT.into(),
                    group: None,
                    profile: crate::DEFAULT_PROFILE.into(),
                    labels: Default::default(),
                    enabled: true,
                    created_ms: 1,
                    last_seen_ms: None,
                    last_addr: None,
                },
            )
            .expect("device");
        }
        {
            let reg = Registry::open(dir.path()).expect("upgrade");
            assert_eq!(
                reg.get_device("old-1").expect("kept").name,
                "written by version 1"
            );
            reg.create_psk("old-1", None, vec![7; 48], None)
                .expect("psk");
        }
        let reg = Registry::open(dir.path()).expect("reopen");
        assert_eq!(reg.list_psks("old-1").expect("list").len(), 1);
        let c = rusqlite::Connection::open(&path).expect("db");
        let v: i64 = c
            .query_row(
                "SELECT MAX(version) FROM schema_migrations WHERE domain = 'identity'",
                [],
                |r| r.get(0),
            )
            .expect("version");
        assert_eq!(v, 2);
    }
}
