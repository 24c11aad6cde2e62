//! [`RegistryStore`] in PostgreSQL: the identity tables in the schema
//! `identity`, with the SQLite store's semantics call for call (the same
//! tables, transactions where it has them, a unique violation reported as
//! `AlreadyExists`, the audit anchor advanced in the batch that appends).

use crate::connection::Connection;
use crate::error::PgResult;
use crate::migrate::{migrate, use_schema, Steps};
use crate::sql::{execute, execute_one, flag, limit_of, rows};
use crate::url::PgUrl;
use m2mhub_identity::audit::{AuditQuery, AuditRecord, GENESIS_HASH};
use m2mhub_identity::certificate::CertInfo;
use m2mhub_identity::claim::{ClaimInfo, ClaimRecord};
use m2mhub_identity::ids::{hex, unhex, unhex32};
use m2mhub_identity::policy::Policy;
use m2mhub_identity::profile::DeviceProfile;
use m2mhub_identity::psk::{PskInfo, PskRecord, SealedKey};
use m2mhub_identity::security::SecurityEventRecord;
use m2mhub_identity::sql::{corrupt, i64_of, u32_of, u64_of, Migration};
use m2mhub_identity::store::{AuditRow, LogBatch, PskUseUpdate, SeenUpdate, Snapshot};
use m2mhub_identity::tenant::{Group, Tenant};
use m2mhub_identity::token::{TokenInfo, TokenRecord};
use m2mhub_identity::user::{ApiTokenInfo, ApiTokenRecord, User, UserRecord};
use m2mhub_identity::{Device, RegistryError, RegistryStore, Result};
use postgres::{Client, GenericClient, IsolationLevel, Row};

const SCHEMA: &str = "identity";

/// Steps only PostgreSQL needs. SQLite lists PSKs in the order written by
/// its implicit rowid; here a serial column keeps that order (a rotation
/// lists after the key it replaced).
const POSTGRES_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: "ALTER TABLE device_psks ADD COLUMN IF NOT EXISTS written BIGSERIAL;",
}];

const AUDIT_COLUMNS: &str = "seq, ts_ms, actor, action, target, outcome, detail, prev_hash, hash";

/// How many audit rows `scan_audit` fetches per round trip to the thread.
const SCAN_PAGE: i64 = 1000;

/// The identity registry's store in PostgreSQL. One connection on its own
/// thread (see `connection.rs`): the registry serializes writes
/// anyway and reads come from its caches.
pub struct PgRegistryStore {
    conn: Connection,
}

impl PgRegistryStore {
    /// Connect, create or migrate the `identity` schema (under the
    /// migration lock), and make sure the audit anchor row exists.
    pub fn open(url: &PgUrl) -> Result<PgRegistryStore> {
        let conn = Connection::open(
            "pg-identity",
            url,
            |c| {
                migrate(
                    c,
                    SCHEMA,
                    &[
                        Steps {
                            domain: "identity",
                            migrations: m2mhub_identity::sqlite::MIGRATIONS,
                        },
                        Steps {
                            domain: "postgres",
                            migrations: POSTGRES_MIGRATIONS,
                        },
                    ],
                )?;
                use_schema(c, SCHEMA)?;
                // Two nodes opening at once both try: the first one wins.
                execute(
                    c,
                    "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, 0, $1) ON CONFLICT (id) DO NOTHING",
                    &[&hex(&GENESIS_HASH)],
                )
            },
            |c| use_schema(c, SCHEMA),
        )?;
        Ok(PgRegistryStore { conn })
    }
}

fn hash_of(s: &str, what: &str) -> Result<[u8; 32]> {
    unhex32(s).ok_or_else(|| corrupt(what))
}

fn insert_device(c: &mut impl GenericClient, d: &Device) -> PgResult<()> {
    execute(
        c,
        "INSERT INTO devices (id, name, tenant, group_id, profile, labels, enabled, created_ms, last_seen_ms, last_addr) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &d.id,
            &d.name,
            &d.tenant,
            &d.group,
            &d.profile,
            &serde_json::to_string(&d.labels)?,
            &flag(d.enabled),
            &d.created_ms,
            &d.last_seen_ms,
            &d.last_addr,
        ],
    )
}

fn insert_psk(c: &mut impl GenericClient, p: &PskRecord) -> PgResult<()> {
    let i = &p.info;
    execute(
        c,
        "INSERT INTO device_psks (id, device_id, identity, sealed_key, created_ms, expires_ms, revoked, replaced_by, last_used_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &i.id,
            &i.device_id,
            &i.identity,
            &hex(p.sealed_key.as_bytes()),
            &i.created_ms,
            &i.expires_ms,
            &flag(i.revoked),
            &i.replaced_by,
            &i.last_used_ms,
        ],
    )
}

const UPDATE_PSK: &str =
    "UPDATE device_psks SET revoked = $1, replaced_by = $2 WHERE id = $3 AND device_id = $4";

fn update_psk(c: &mut impl GenericClient, p: &PskInfo) -> PgResult<()> {
    execute_one(
        c,
        "PSK",
        UPDATE_PSK,
        &[&flag(p.revoked), &p.replaced_by, &p.id, &p.device_id],
    )
}

fn audit_of(r: &Row) -> PgResult<AuditRow> {
    Ok(AuditRow {
        seq: u64_of(r.try_get(0)?, "audit seq")?,
        ts_ms: r.try_get(1)?,
        actor: r.try_get(2)?,
        action: r.try_get(3)?,
        target: r.try_get(4)?,
        outcome: r.try_get(5)?,
        detail: r.try_get(6)?,
        prev_hash: r.try_get(7)?,
        hash: r.try_get(8)?,
    })
}

fn load(c: &mut Client) -> PgResult<Snapshot> {
    // One consistent view of every table, as SQLite's single reader sees.
    let mut tx = c
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    let c = &mut tx;
    let mut snap = Snapshot {
        tenants: rows(c, "SELECT id, name, created_ms FROM tenants", &[], |r| {
            Ok(Tenant {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                created_ms: r.try_get(2)?,
            })
        })?,
        groups: rows(
            c,
            "SELECT tenant, id, name, created_ms FROM device_groups",
            &[],
            |r| {
                Ok(Group {
                    tenant: r.try_get(0)?,
                    id: r.try_get(1)?,
                    name: r.try_get(2)?,
                    created_ms: r.try_get(3)?,
                })
            },
        )?,
        devices: rows(
            c,
            "SELECT id, name, tenant, group_id, profile, labels, enabled, created_ms, last_seen_ms, last_addr FROM devices",
            &[],
            |r| {
                Ok(Device {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    tenant: r.try_get(2)?,
                    group: r.try_get(3)?,
                    profile: r.try_get(4)?,
                    labels: serde_json::from_str(r.try_get(5)?)?,
                    enabled: r.try_get::<_, i32>(6)? != 0,
                    created_ms: r.try_get(7)?,
                    last_seen_ms: r.try_get(8)?,
                    last_addr: r.try_get(9)?,
                })
            },
        )?,
        tokens: rows(
            c,
            "SELECT id, device_id, hash, created_ms, expires_ms, revoked FROM device_tokens",
            &[],
            |r| {
                Ok(TokenRecord {
                    hash: hash_of(r.try_get(2)?, "token hash")?,
                    info: TokenInfo {
                        id: r.try_get(0)?,
                        device_id: r.try_get(1)?,
                        created_ms: r.try_get(3)?,
                        expires_ms: r.try_get(4)?,
                        revoked: r.try_get::<_, i32>(5)? != 0,
                    },
                })
            },
        )?,
        certs: rows(
            c,
            "SELECT fingerprint, device_id, serial_hex, not_after_ms, issuer, created_ms, revoked_ms FROM certificates",
            &[],
            |r| {
                Ok(CertInfo {
                    fingerprint: hash_of(r.try_get(0)?, "certificate fingerprint")?,
                    device_id: r.try_get(1)?,
                    serial_hex: r.try_get(2)?,
                    not_after_ms: r.try_get(3)?,
                    issuer: r.try_get(4)?,
                    created_ms: r.try_get(5)?,
                    revoked_ms: r.try_get(6)?,
                })
            },
        )?,
        psks: rows(
            c,
            "SELECT id, device_id, identity, sealed_key, created_ms, expires_ms, revoked, replaced_by, last_used_ms \
             FROM device_psks ORDER BY written",
            &[],
            |r| {
                Ok(PskRecord {
                    sealed_key: SealedKey::new(
                        unhex(r.try_get(3)?).ok_or_else(|| corrupt("sealed PSK"))?,
                    ),
                    info: PskInfo {
                        id: r.try_get(0)?,
                        device_id: r.try_get(1)?,
                        identity: r.try_get(2)?,
                        created_ms: r.try_get(4)?,
                        expires_ms: r.try_get(5)?,
                        revoked: r.try_get::<_, i32>(6)? != 0,
                        replaced_by: r.try_get(7)?,
                        last_used_ms: r.try_get(8)?,
                    },
                })
            },
        )?,
        claims: rows(
            c,
            "SELECT id, name, hash, tenant, group_id, profile, max_uses, uses, expires_ms, revoked, created_ms FROM claim_tokens",
            &[],
            |r| {
                Ok(ClaimRecord {
                    hash: hash_of(r.try_get(2)?, "claim hash")?,
                    info: ClaimInfo {
                        id: r.try_get(0)?,
                        name: r.try_get(1)?,
                        tenant: r.try_get(3)?,
                        group: r.try_get(4)?,
                        profile: r.try_get(5)?,
                        max_uses: u32_of(r.try_get(6)?, "claim max_uses")?,
                        uses: u32_of(r.try_get(7)?, "claim uses")?,
                        expires_ms: r.try_get(8)?,
                        revoked: r.try_get::<_, i32>(9)? != 0,
                        created_ms: r.try_get(10)?,
                    },
                })
            },
        )?,
        users: rows(
            c,
            "SELECT username, password_hash, role, tenant, created_ms FROM users",
            &[],
            |r| {
                Ok(UserRecord {
                    user: User {
                        username: r.try_get(0)?,
                        role: r
                            .try_get::<_, &str>(2)?
                            .parse()
                            .map_err(|_| corrupt("user role"))?,
                        tenant: r.try_get(3)?,
                        created_ms: r.try_get(4)?,
                    },
                    password_hash: r.try_get(1)?,
                })
            },
        )?,
        api_tokens: rows(
            c,
            "SELECT id, username, name, hash, role, created_ms, expires_ms, revoked FROM api_tokens",
            &[],
            |r| {
                Ok(ApiTokenRecord {
                    hash: hash_of(r.try_get(3)?, "API token hash")?,
                    info: ApiTokenInfo {
                        id: r.try_get(0)?,
                        username: r.try_get(1)?,
                        name: r.try_get(2)?,
                        role: r
                            .try_get::<_, &str>(4)?
                            .parse()
                            .map_err(|_| corrupt("API token role"))?,
                        created_ms: r.try_get(5)?,
                        expires_ms: r.try_get(6)?,
                        revoked: r.try_get::<_, i32>(7)? != 0,
                    },
                })
            },
        )?,
        policies: rows(
            c,
            "SELECT tenant, name, group_id, publish, subscribe FROM policies",
            &[],
            |r| {
                Ok((
                    r.try_get(0)?,
                    Policy {
                        name: r.try_get(1)?,
                        group: r.try_get(2)?,
                        publish: serde_json::from_str(r.try_get(3)?)?,
                        subscribe: serde_json::from_str(r.try_get(4)?)?,
                    },
                ))
            },
        )?,
        profiles: rows(
            c,
            "SELECT tenant, name, content_type, description, created_ms FROM device_profiles",
            &[],
            |r| {
                Ok(DeviceProfile {
                    tenant: r.try_get(0)?,
                    name: r.try_get(1)?,
                    content_type: r.try_get(2)?,
                    description: r.try_get(3)?,
                    created_ms: r.try_get(4)?,
                })
            },
        )?,
        audit_tail: (0, GENESIS_HASH),
        security_seq: 0,
    };
    if let Some(r) = c.query_opt(
        "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
        &[],
    )? {
        snap.audit_tail = (
            u64_of(r.try_get(0)?, "audit seq")?,
            hash_of(r.try_get(1)?, "audit hash")?,
        );
    }
    let anchor = c.query_one("SELECT seq, hash FROM audit_anchor WHERE id = 1", &[])?;
    let anchor_seq = u64_of(anchor.try_get(0)?, "audit anchor")?;
    if anchor_seq > snap.audit_tail.0 {
        // Records were removed from the end. Continue after the anchor, so
        // new records never reuse a removed sequence number and the gap
        // stays visible to verification.
        tracing::error!(
            anchor = anchor_seq,
            last = snap.audit_tail.0,
            "registry: audit log is shorter than its anchor (records removed)"
        );
        snap.audit_tail = (
            anchor_seq,
            hash_of(anchor.try_get(1)?, "audit anchor hash")?,
        );
    }
    if let Some(r) = c.query_opt(
        "SELECT seq FROM security_events ORDER BY seq DESC LIMIT 1",
        &[],
    )? {
        snap.security_seq = u64_of(r.try_get(0)?, "security event seq")?;
    }
    tx.commit()?;
    Ok(snap)
}

/// Owned copies of a [`LogBatch`], to move to the connection's thread.
struct OwnedBatch {
    audit: Vec<AuditRow>,
    events: Vec<SecurityEventRecord>,
    seen: Vec<SeenUpdate>,
    psk_used: Vec<PskUseUpdate>,
}

/// The key of the transaction-scoped advisory lock that serializes audit
/// appends across every node sharing the database.
const AUDIT_APPEND_LOCK: i64 = 0x6d32_6d68_6175_6474; // "m2mhaudt"

fn append(c: &mut Client, b: &OwnedBatch) -> PgResult<()> {
    let mut tx = c.transaction()?;
    if !b.audit.is_empty() {
        // Several nodes append to one chain: each batch continues from the
        // table's real tail, under a lock all nodes take, and is numbered
        // and hashed again from there. A node's own idea of the tail (which
        // another node's appends make stale) only ever orders its batch.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_APPEND_LOCK])?;
        let tail = tx.query_one("SELECT seq, hash FROM audit_anchor WHERE id = 1", &[])?;
        let mut seq: i64 = tail.get(0);
        let mut prev = hash_of(&tail.get::<_, String>(1), "audit anchor")?;
        let ins = tx.prepare(&format!(
            "INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))?;
        for r in &b.audit {
            seq += 1;
            let hash = m2mhub_identity::audit::record_hash(
                &prev,
                u64::try_from(seq).unwrap_or(0),
                r.ts_ms,
                &r.actor,
                &r.action,
                &r.target,
                &r.outcome,
                &r.detail,
            );
            tx.execute(
                &ins,
                &[
                    &seq,
                    &r.ts_ms,
                    &r.actor,
                    &r.action,
                    &r.target,
                    &r.outcome,
                    &r.detail,
                    &hex(&prev),
                    &hex(&hash),
                ],
            )?;
            prev = hash;
        }
        tx.execute(
            "UPDATE audit_anchor SET seq = $1, hash = $2 WHERE id = 1",
            &[&seq, &hex(&prev)],
        )?;
    }
    if !b.events.is_empty() {
        // Numbered after the table's last event, under the same lock as the
        // audit chain: nodes sharing the store number events apart.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_APPEND_LOCK])?;
        let mut seq: i64 = tx
            .query_one("SELECT COALESCE(MAX(seq), 0) FROM security_events", &[])?
            .get(0);
        let ins = tx.prepare(
            "INSERT INTO security_events (seq, ts_ms, kind, device_id, addr, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )?;
        for e in &b.events {
            seq += 1;
            tx.execute(
                &ins,
                &[
                    &seq,
                    &e.ts_ms,
                    &e.kind.as_str(),
                    &e.device_id,
                    &e.addr,
                    &serde_json::to_string(&e.detail)?,
                ],
            )?;
        }
    }
    if !b.seen.is_empty() {
        let upd =
            tx.prepare("UPDATE devices SET last_seen_ms = $1, last_addr = $2 WHERE id = $3")?;
        for s in &b.seen {
            tx.execute(&upd, &[&s.ms, &s.addr, &s.device_id])?;
        }
    }
    if !b.psk_used.is_empty() {
        let upd = tx.prepare("UPDATE device_psks SET last_used_ms = $1 WHERE id = $2")?;
        for u in &b.psk_used {
            tx.execute(&upd, &[&u.ms, &u.psk_id])?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn list_audit(c: &mut Client, q: &AuditQuery) -> PgResult<Vec<AuditRecord>> {
    let after = q.after_seq.map(i64_of).transpose()?;
    let before = q.before_seq.map(i64_of).transpose()?;
    let limit = limit_of(q.limit.unwrap_or(100).clamp(1, 10_000));
    // Absent filters are NULL parameters; the statement is planned with the
    // values, so they cost nothing.
    let sql = format!(
        "SELECT {AUDIT_COLUMNS} FROM audit_log \
         WHERE ($1::BIGINT IS NULL OR seq > $1) AND ($2::BIGINT IS NULL OR seq < $2) \
         AND ($3::TEXT IS NULL OR actor = $3) AND ($4::TEXT IS NULL OR action = $4) \
         ORDER BY seq {} LIMIT $5",
        if q.newest_first { "DESC" } else { "ASC" }
    );
    rows(
        c,
        &sql,
        &[&after, &before, &q.actor, &q.action, &limit],
        |r| Ok(AuditRecord::try_from(audit_of(r)?)?),
    )
}

impl RegistryStore for PgRegistryStore {
    fn load(&self) -> Result<Snapshot> {
        self.conn.run(load)
    }

    fn insert_tenant(&self, t: &Tenant) -> Result<()> {
        self.conn.with(t.clone(), |c, t| {
            execute(
                c,
                "INSERT INTO tenants (id, name, created_ms) VALUES ($1, $2, $3)",
                &[&t.id, &t.name, &t.created_ms],
            )
        })
    }

    fn insert_group(&self, g: &Group) -> Result<()> {
        self.conn.with(g.clone(), |c, g| {
            execute(
                c,
                "INSERT INTO device_groups (tenant, id, name, created_ms) VALUES ($1, $2, $3, $4)",
                &[&g.tenant, &g.id, &g.name, &g.created_ms],
            )
        })
    }

    fn delete_group(&self, tenant: &str, id: &str) -> Result<()> {
        self.conn
            .with((tenant.to_string(), id.to_string()), |c, (t, id)| {
                execute_one(
                    c,
                    "group",
                    "DELETE FROM device_groups WHERE tenant = $1 AND id = $2",
                    &[&t, &id],
                )
            })
    }

    fn insert_device(&self, d: &Device) -> Result<()> {
        self.conn.with(d.clone(), |c, d| insert_device(c, &d))
    }

    fn update_device(&self, d: &Device) -> Result<()> {
        self.conn.with(d.clone(), |c, d| {
            execute_one(
                c,
                "device",
                "UPDATE devices SET name = $1, group_id = $2, profile = $3, labels = $4, enabled = $5 WHERE id = $6",
                &[
                    &d.name,
                    &d.group,
                    &d.profile,
                    &serde_json::to_string(&d.labels)?,
                    &flag(d.enabled),
                    &d.id,
                ],
            )
        })
    }

    fn delete_device(&self, id: &str, revoked_ms: i64) -> Result<()> {
        self.conn.with(id.to_string(), move |c, id| {
            let mut tx = c.transaction()?;
            tx.execute("DELETE FROM device_tokens WHERE device_id = $1", &[&id])?;
            tx.execute("DELETE FROM device_psks WHERE device_id = $1", &[&id])?;
            tx.execute(
                "UPDATE certificates SET revoked_ms = $1 WHERE device_id = $2 AND revoked_ms IS NULL",
                &[&revoked_ms, &id],
            )?;
            execute_one(
                &mut tx,
                &format!("device {id}"),
                "DELETE FROM devices WHERE id = $1",
                &[&id],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        self.conn.with(t.clone(), |c, t| {
            execute(
                c,
                "INSERT INTO device_tokens (id, device_id, hash, created_ms, expires_ms, revoked) VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &t.info.id,
                    &t.info.device_id,
                    &hex(&t.hash),
                    &t.info.created_ms,
                    &t.info.expires_ms,
                    &flag(t.info.revoked),
                ],
            )
        })
    }

    fn update_token(&self, t: &TokenInfo) -> Result<()> {
        self.conn.with(t.clone(), |c, t| {
            execute_one(
                c,
                "token",
                "UPDATE device_tokens SET expires_ms = $1, revoked = $2 WHERE id = $3 AND device_id = $4",
                &[&t.expires_ms, &flag(t.revoked), &t.id, &t.device_id],
            )
        })
    }

    fn insert_psk(&self, p: &PskRecord) -> Result<()> {
        self.conn.with(p.clone(), |c, p| insert_psk(c, &p))
    }

    fn update_psk(&self, p: &PskInfo) -> Result<()> {
        self.conn.with(p.clone(), |c, p| update_psk(c, &p))
    }

    fn rotate_psk(&self, old: &PskInfo, new: &PskRecord) -> Result<()> {
        self.conn.with((old.clone(), new.clone()), |c, (old, new)| {
            let mut tx = c.transaction()?;
            // The old row first: the identity's unique index admits one
            // live row.
            update_psk(&mut tx, &old)?;
            insert_psk(&mut tx, &new)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn insert_certificate(&self, c: &CertInfo) -> Result<()> {
        self.conn.with(c.clone(), |c, cert| {
            execute(
                c,
                "INSERT INTO certificates (fingerprint, device_id, serial_hex, not_after_ms, issuer, created_ms, revoked_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &hex(&cert.fingerprint),
                    &cert.device_id,
                    &cert.serial_hex,
                    &cert.not_after_ms,
                    &cert.issuer,
                    &cert.created_ms,
                    &cert.revoked_ms,
                ],
            )
        })
    }

    fn update_certificate(&self, c: &CertInfo) -> Result<()> {
        self.conn.with(c.clone(), |c, cert| {
            execute_one(
                c,
                "certificate",
                "UPDATE certificates SET revoked_ms = $1 WHERE fingerprint = $2",
                &[&cert.revoked_ms, &hex(&cert.fingerprint)],
            )
        })
    }

    fn insert_claim(&self, c: &ClaimRecord) -> Result<()> {
        self.conn.with(c.clone(), |c, claim| {
            let i = &claim.info;
            execute(
                c,
                "INSERT INTO claim_tokens (id, name, hash, tenant, group_id, profile, max_uses, uses, expires_ms, revoked, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &i.id,
                    &i.name,
                    &hex(&claim.hash),
                    &i.tenant,
                    &i.group,
                    &i.profile,
                    &i64::from(i.max_uses),
                    &i64::from(i.uses),
                    &i.expires_ms,
                    &flag(i.revoked),
                    &i.created_ms,
                ],
            )
        })
    }

    fn update_claim(&self, c: &ClaimInfo) -> Result<()> {
        self.conn.with(c.clone(), |c, claim| {
            execute_one(
                c,
                "claim token",
                "UPDATE claim_tokens SET uses = $1, revoked = $2 WHERE id = $3",
                &[&i64::from(claim.uses), &flag(claim.revoked), &claim.id],
            )
        })
    }

    fn redeem_claim(&self, c: &ClaimInfo, d: &Device) -> Result<()> {
        self.conn.with((c.clone(), d.clone()), |c, (claim, d)| {
            let mut tx = c.transaction()?;
            // The guard in the WHERE clause keeps the limit when another
            // node redeems the same token at the same time.
            let n = tx.execute(
                "UPDATE claim_tokens SET uses = $1 WHERE id = $2 AND uses = $3 AND uses < max_uses",
                &[
                    &i64::from(claim.uses),
                    &claim.id,
                    &(i64::from(claim.uses) - 1),
                ],
            )?;
            if n == 0 {
                return Err(RegistryError::Conflict(format!(
                    "claim token {} changed concurrently",
                    claim.id
                ))
                .into());
            }
            insert_device(&mut tx, &d)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn insert_user(&self, u: &UserRecord) -> Result<()> {
        self.conn.with(u.clone(), |c, u| {
            execute(
                c,
                "INSERT INTO users (username, password_hash, role, tenant, created_ms) VALUES ($1, $2, $3, $4, $5)",
                &[
                    &u.user.username,
                    &u.password_hash,
                    &u.user.role.as_str(),
                    &u.user.tenant,
                    &u.user.created_ms,
                ],
            )
        })
    }

    fn update_user(&self, u: &UserRecord) -> Result<()> {
        self.conn.with(u.clone(), |c, u| {
            execute_one(
                c,
                "user",
                "UPDATE users SET password_hash = $1, role = $2 WHERE username = $3",
                &[&u.password_hash, &u.user.role.as_str(), &u.user.username],
            )
        })
    }

    fn delete_user(&self, username: &str) -> Result<()> {
        self.conn.with(username.to_string(), |c, username| {
            let mut tx = c.transaction()?;
            tx.execute("DELETE FROM api_tokens WHERE username = $1", &[&username])?;
            execute_one(
                &mut tx,
                &format!("user {username}"),
                "DELETE FROM users WHERE username = $1",
                &[&username],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn insert_api_token(&self, t: &ApiTokenRecord) -> Result<()> {
        self.conn.with(t.clone(), |c, t| {
            let i = &t.info;
            execute(
                c,
                "INSERT INTO api_tokens (id, username, name, hash, role, created_ms, expires_ms, revoked) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &i.id,
                    &i.username,
                    &i.name,
                    &hex(&t.hash),
                    &i.role.as_str(),
                    &i.created_ms,
                    &i.expires_ms,
                    &flag(i.revoked),
                ],
            )
        })
    }

    fn update_api_token(&self, t: &ApiTokenInfo) -> Result<()> {
        self.conn.with(t.clone(), |c, t| {
            execute_one(
                c,
                "API token",
                "UPDATE api_tokens SET revoked = $1 WHERE id = $2",
                &[&flag(t.revoked), &t.id],
            )
        })
    }

    fn put_policy(&self, tenant: &str, p: &Policy) -> Result<()> {
        self.conn.with((tenant.to_string(), p.clone()), |c, (tenant, p)| {
            execute(
                c,
                "INSERT INTO policies (tenant, name, group_id, publish, subscribe) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (tenant, name) DO UPDATE SET group_id = excluded.group_id, \
                 publish = excluded.publish, subscribe = excluded.subscribe",
                &[
                    &tenant,
                    &p.name,
                    &p.group,
                    &serde_json::to_string(&p.publish)?,
                    &serde_json::to_string(&p.subscribe)?,
                ],
            )
        })
    }

    fn delete_policy(&self, tenant: &str, name: &str) -> Result<()> {
        self.conn
            .with((tenant.to_string(), name.to_string()), |c, (t, n)| {
                execute_one(
                    c,
                    "policy",
                    "DELETE FROM policies WHERE tenant = $1 AND name = $2",
                    &[&t, &n],
                )
            })
    }

    fn insert_profile(&self, p: &DeviceProfile) -> Result<()> {
        self.conn.with(p.clone(), |c, p| {
            execute(
                c,
                "INSERT INTO device_profiles (tenant, name, content_type, description, created_ms) VALUES ($1, $2, $3, $4, $5)",
                &[&p.tenant, &p.name, &p.content_type, &p.description, &p.created_ms],
            )
        })
    }

    fn update_profile(&self, p: &DeviceProfile) -> Result<()> {
        self.conn.with(p.clone(), |c, p| {
            execute_one(
                c,
                "profile",
                "UPDATE device_profiles SET content_type = $1, description = $2 WHERE tenant = $3 AND name = $4",
                &[&p.content_type, &p.description, &p.tenant, &p.name],
            )
        })
    }

    fn delete_profile(&self, tenant: &str, name: &str) -> Result<()> {
        self.conn
            .with((tenant.to_string(), name.to_string()), |c, (t, n)| {
                execute_one(
                    c,
                    "profile",
                    "DELETE FROM device_profiles WHERE tenant = $1 AND name = $2",
                    &[&t, &n],
                )
            })
    }

    fn append(&self, batch: &LogBatch<'_>) -> Result<()> {
        let owned = OwnedBatch {
            audit: batch.audit.to_vec(),
            events: batch.events.to_vec(),
            seen: batch.seen.to_vec(),
            psk_used: batch.psk_used.to_vec(),
        };
        self.conn.with(owned, |c, b| append(c, &b))
    }

    fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let q = q.clone();
        self.conn.run(move |c| list_audit(c, &q))
    }

    fn scan_audit(&self, f: &mut dyn FnMut(AuditRow) -> bool) -> Result<()> {
        // Page by page: the callback runs here, on the caller's thread,
        // and a long log is never held in memory whole.
        let mut after: i64 = -1;
        loop {
            let page = self.conn.run(move |c| {
                rows(
                    c,
                    &format!(
                        "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
                    ),
                    &[&after, &SCAN_PAGE],
                    audit_of,
                )
            })?;
            let full = page.len() == usize::try_from(SCAN_PAGE).unwrap_or(usize::MAX);
            for r in page {
                after = i64_of(r.seq)?;
                if !f(r) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn audit_anchor(&self) -> Result<(u64, String)> {
        self.conn.run(|c| {
            let r = c
                .query_opt("SELECT seq, hash FROM audit_anchor WHERE id = 1", &[])?
                .ok_or_else(|| corrupt("audit anchor (missing)"))?;
            Ok((u64_of(r.try_get(0)?, "audit anchor")?, r.try_get(1)?))
        })
    }

    fn list_security_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<SecurityEventRecord>> {
        let after = i64_of(after.unwrap_or(0))?;
        let limit = limit_of(limit);
        self.conn.run(move |c| {
            rows(
                c,
                "SELECT seq, ts_ms, kind, device_id, addr, detail FROM security_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &limit],
                |r| {
                    Ok(SecurityEventRecord {
                        seq: u64_of(r.try_get(0)?, "security event seq")?,
                        ts_ms: r.try_get(1)?,
                        kind: r
                            .try_get::<_, &str>(2)?
                            .parse()
                            .map_err(|_| corrupt("security event kind"))?,
                        device_id: r.try_get(3)?,
                        addr: r.try_get(4)?,
                        detail: serde_json::from_str(r.try_get(5)?)?,
                    })
                },
            )
        })
    }
}
