//! [`FleetStore`] in PostgreSQL: the fleet tables in the schema `fleet`,
//! with the SQLite store's semantics call for call (batches in one
//! transaction, the same trimming of old events, alarms and commands,
//! upserts by id).

use crate::connection::Connection;
use crate::error::PgResult;
use crate::migrate::{migrate, use_schema, Steps};
use crate::sql::{execute, execute_one, flag, limit_of, rows};
use crate::url::PgUrl;
use m2mhub_fleet::alarm::{Alarm, AlarmFilter, AlarmStatus};
use m2mhub_fleet::command::Command;
use m2mhub_fleet::dashboard::{Dashboard, DashboardShare};
use m2mhub_fleet::device_event::DeviceEvent;
use m2mhub_fleet::diagnostic::DiagnosticBundle;
use m2mhub_fleet::ota::{Artifact, Campaign, Job};
use m2mhub_fleet::report::{Report, ReportRun};
use m2mhub_fleet::rule::Rule;
use m2mhub_fleet::setting::FleetSetting;
use m2mhub_fleet::shadow::Shadow;
use m2mhub_fleet::sqlite::{
    ALARM_COLUMNS, COMMANDS_OPEN, COMMAND_COLUMNS, DIAGNOSTIC_COLUMNS, MIGRATIONS, RULE_COLUMNS,
};
use m2mhub_fleet::store::{FleetBatch, FleetSnapshot, FleetStore};
use m2mhub_fleet::Result;
use m2mhub_identity::sql::{corrupt, i64_of, u64_of};
use postgres::types::ToSql;
use postgres::{Client, GenericClient, IsolationLevel, Row};

const SCHEMA: &str = "fleet";

/// Steps only PostgreSQL needs, recorded under the domain `postgres`.
const POSTGRES_MIGRATIONS: &[m2mhub_identity::sql::Migration] =
    &[m2mhub_identity::sql::Migration {
        version: 1,
        // The next free id of each kind that nodes number from in blocks
        // (`fleet/src/ids.rs`): above everything stored so far.
        sql: "CREATE TABLE IF NOT EXISTS id_blocks (kind TEXT PRIMARY KEY, next BIGINT NOT NULL);
          INSERT INTO id_blocks (kind, next) VALUES
            ('alarm', COALESCE((SELECT MAX(id) FROM alarms), 0) + 1),
            ('device_event', COALESCE((SELECT MAX(id) FROM device_events), 0) + 1)
          ON CONFLICT (kind) DO NOTHING;",
    }];

/// Insert an alarm or replace every field of the stored one (a retried
/// batch writes the same row again harmlessly).
const ALARM_UPSERT: &str = "INSERT INTO alarms (id, tenant, device_id, alarm_type, severity, status, acked, acked_by, acked_ms, \
    details, rule_id, created_ms, updated_ms, cleared_ms, cleared_by, count) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
    ON CONFLICT (id) DO UPDATE SET severity = excluded.severity, status = excluded.status, \
    acked = excluded.acked, acked_by = excluded.acked_by, acked_ms = excluded.acked_ms, \
    details = excluded.details, rule_id = excluded.rule_id, updated_ms = excluded.updated_ms, \
    cleared_ms = excluded.cleared_ms, cleared_by = excluded.cleared_by, count = excluded.count";

const COMMAND_UPSERT: &str =
    "INSERT INTO commands (id, tenant, device_id, name, params, status, created_ms, updated_ms, \
    response, error, origin, timeout_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated_ms = excluded.updated_ms, \
    response = excluded.response, error = excluded.error";

const SHADOW_UPSERT: &str =
    "INSERT INTO shadows (device_id, name, tenant, desired, reported, metadata, version, updated_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (device_id, name) DO UPDATE SET \
     tenant = excluded.tenant, desired = excluded.desired, reported = excluded.reported, \
     metadata = excluded.metadata, version = excluded.version, updated_ms = excluded.updated_ms";

/// Fleet operations' store in PostgreSQL: one connection on its own thread
/// (see `connection.rs`), apart from the identity store's, as the
/// SQLite stores each have their own connection.
pub struct PgFleetStore {
    conn: Connection,
}

impl PgFleetStore {
    /// Connect and create or migrate the `fleet` schema (under the
    /// migration lock).
    pub fn open(url: &PgUrl) -> Result<PgFleetStore> {
        let conn = Connection::open(
            "pg-fleet",
            url,
            |c| {
                migrate(
                    c,
                    SCHEMA,
                    &[
                        Steps {
                            domain: "fleet",
                            migrations: MIGRATIONS,
                        },
                        Steps {
                            domain: "postgres",
                            migrations: POSTGRES_MIGRATIONS,
                        },
                    ],
                )
            },
            |c| use_schema(c, SCHEMA),
        )?;
        Ok(PgFleetStore { conn })
    }

    /// Diagnostic bundles `WHERE <cond>` (which may end in ORDER/LIMIT).
    fn query_diagnostics(
        &self,
        cond: &'static str,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> Result<Vec<DiagnosticBundle>> {
        self.conn.run(move |c| {
            let p: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|v| &**v as &(dyn ToSql + Sync)).collect();
            rows(
                c,
                &format!("SELECT {DIAGNOSTIC_COLUMNS} FROM diagnostics WHERE {cond}"),
                &p,
                diagnostic_of,
            )
        })
    }
}

fn alarm_of(r: &Row) -> PgResult<Alarm> {
    Ok(Alarm {
        id: u64_of(r.try_get(0)?, "alarm id")?,
        tenant: r.try_get(1)?,
        device_id: r.try_get(2)?,
        alarm_type: r.try_get(3)?,
        severity: r
            .try_get::<_, &str>(4)?
            .parse()
            .map_err(|_| corrupt("alarm severity"))?,
        status: r
            .try_get::<_, &str>(5)?
            .parse()
            .map_err(|_| corrupt("alarm status"))?,
        acked: r.try_get::<_, i32>(6)? != 0,
        acked_by: r.try_get(7)?,
        acked_ms: r.try_get(8)?,
        details: serde_json::from_str(r.try_get(9)?)?,
        rule_id: r.try_get(10)?,
        created_ms: r.try_get(11)?,
        updated_ms: r.try_get(12)?,
        cleared_ms: r.try_get(13)?,
        cleared_by: r.try_get(14)?,
        count: u64_of(r.try_get(15)?, "alarm count")?,
    })
}

fn command_of(r: &Row) -> PgResult<Command> {
    Ok(Command {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        device_id: r.try_get(2)?,
        name: r.try_get(3)?,
        params: serde_json::from_str(r.try_get(4)?)?,
        status: r
            .try_get::<_, &str>(5)?
            .parse()
            .map_err(|_| corrupt("command status"))?,
        created_ms: r.try_get(6)?,
        updated_ms: r.try_get(7)?,
        response: r
            .try_get::<_, Option<&str>>(8)?
            .map(serde_json::from_str)
            .transpose()?,
        error: r.try_get(9)?,
        origin: r.try_get(10)?,
        timeout_ms: u64_of(r.try_get(11)?, "command timeout")?,
    })
}

fn rule_of(r: &Row) -> PgResult<Rule> {
    Ok(Rule {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        name: r.try_get(2)?,
        description: r.try_get(3)?,
        sql: r.try_get(4)?,
        actions: serde_json::from_str(r.try_get(5)?)?,
        enabled: r.try_get::<_, i32>(6)? != 0,
        created_ms: r.try_get(7)?,
        updated_ms: r.try_get(8)?,
    })
}

fn diagnostic_of(r: &Row) -> PgResult<DiagnosticBundle> {
    Ok(DiagnosticBundle {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        device_id: r.try_get(2)?,
        status: r
            .try_get::<_, &str>(3)?
            .parse()
            .map_err(|_| corrupt("diagnostic bundle status"))?,
        requested_by: r.try_get(4)?,
        requested_ms: r.try_get(5)?,
        uploaded_ms: r.try_get(6)?,
        size: r
            .try_get::<_, Option<i64>>(7)?
            .map(|s| u64_of(s, "diagnostic bundle size"))
            .transpose()?,
        sha256: r.try_get(8)?,
        reason: r.try_get(9)?,
        error: r.try_get(10)?,
        token_hash: r.try_get(11)?,
        expires_ms: r.try_get(12)?,
    })
}

/// A one-column JSON document, decoded.
fn doc_of<T: serde::de::DeserializeOwned>(r: &Row) -> PgResult<T> {
    Ok(serde_json::from_str(r.try_get(0)?)?)
}

fn put_alarm(c: &mut impl GenericClient, a: &Alarm) -> PgResult<()> {
    execute(
        c,
        ALARM_UPSERT,
        &[
            &i64_of(a.id)?,
            &a.tenant,
            &a.device_id,
            &a.alarm_type,
            &a.severity.as_str(),
            &a.status.as_str(),
            &flag(a.acked),
            &a.acked_by,
            &a.acked_ms,
            &serde_json::to_string(&a.details)?,
            &a.rule_id,
            &a.created_ms,
            &a.updated_ms,
            &a.cleared_ms,
            &a.cleared_by,
            &i64_of(a.count)?,
        ],
    )
}

fn put_shadow(c: &mut impl GenericClient, s: &Shadow) -> PgResult<()> {
    execute(
        c,
        SHADOW_UPSERT,
        &[
            &s.device_id,
            &s.name,
            &s.tenant,
            &serde_json::to_string(&s.desired)?,
            &serde_json::to_string(&s.reported)?,
            &serde_json::to_string(&s.metadata)?,
            &i64_of(s.version)?,
            &s.updated_ms,
        ],
    )
}

/// Write a shadow only if the stored one is still at `prev_version` (0:
/// absent); whether it was written.
fn put_shadow_if(c: &mut impl GenericClient, s: &Shadow, prev_version: u64) -> PgResult<bool> {
    let desired = serde_json::to_string(&s.desired)?;
    let reported = serde_json::to_string(&s.reported)?;
    let metadata = serde_json::to_string(&s.metadata)?;
    let version = i64_of(s.version)?;
    let n = if prev_version == 0 {
        c.execute(
            "INSERT INTO shadows (device_id, name, tenant, desired, reported, metadata, version, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (device_id, name) DO NOTHING",
            &[&s.device_id, &s.name, &s.tenant, &desired, &reported, &metadata, &version, &s.updated_ms],
        )?
    } else {
        c.execute(
            "UPDATE shadows SET tenant = $3, desired = $4, reported = $5, metadata = $6, \
             version = $7, updated_ms = $8 WHERE device_id = $1 AND name = $2 AND version = $9",
            &[
                &s.device_id,
                &s.name,
                &s.tenant,
                &desired,
                &reported,
                &metadata,
                &version,
                &s.updated_ms,
                &i64_of(prev_version)?,
            ],
        )?
    };
    Ok(n == 1)
}

fn shadow_of(r: &Row) -> PgResult<Shadow> {
    Ok(Shadow {
        device_id: r.try_get(0)?,
        name: r.try_get(1)?,
        tenant: r.try_get(2)?,
        desired: serde_json::from_str(r.try_get(3)?)?,
        reported: serde_json::from_str(r.try_get(4)?)?,
        metadata: serde_json::from_str(r.try_get(5)?)?,
        version: u64_of(r.try_get(6)?, "shadow version")?,
        updated_ms: r.try_get(7)?,
    })
}

fn load(c: &mut Client) -> PgResult<FleetSnapshot> {
    // One consistent view of every table.
    let mut tx = c
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    let c = &mut tx;
    let max = |c: &mut postgres::Transaction<'_>, sql: &str, what: &str| -> PgResult<u64> {
        let v: Option<i64> = c.query_one(sql, &[])?.try_get(0)?;
        Ok(v.map_or(Ok(0), |s| u64_of(s, what))?)
    };
    let snap = FleetSnapshot {
        rules: rows(c, &format!("SELECT {RULE_COLUMNS} FROM rules"), &[], rule_of)?,
        active_alarms: rows(
            c,
            &format!("SELECT {ALARM_COLUMNS} FROM alarms WHERE status = 'active' ORDER BY id"),
            &[],
            alarm_of,
        )?,
        alarm_seq: max(c, "SELECT MAX(id) FROM alarms", "alarm id")?,
        open_commands: rows(
            c,
            &format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE status IN {COMMANDS_OPEN}"),
            &[],
            command_of,
        )?,
        device_event_seq: max(c, "SELECT MAX(id) FROM device_events", "device event id")?,
        shadows: rows(
            c,
            "SELECT device_id, name, tenant, desired, reported, metadata, version, updated_ms FROM shadows",
            &[],
            shadow_of,
        )?,
        artifacts: rows(c, "SELECT doc FROM ota_artifacts", &[], doc_of)?,
        campaigns: rows(c, "SELECT doc FROM ota_campaigns", &[], doc_of)?,
        jobs: rows(c, "SELECT doc FROM ota_jobs", &[], doc_of)?,
    };
    tx.commit()?;
    Ok(snap)
}

/// Owned copies of a [`FleetBatch`], to move to the connection's thread.
struct OwnedBatch {
    device_events: Vec<DeviceEvent>,
    device_events_kept: usize,
    alarms: Vec<Alarm>,
    alarms_kept: usize,
    commands: Vec<Command>,
    commands_kept: usize,
}

/// Each distinct device id of `ids`, in first-seen order.
fn distinct<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for id in ids {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// An OFFSET that keeps the newest `kept` rows.
fn kept_offset(kept: usize) -> i64 {
    limit_of(kept.saturating_sub(1))
}

fn append(c: &mut Client, b: &OwnedBatch) -> PgResult<()> {
    let mut tx = c.transaction()?;
    if !b.device_events.is_empty() {
        let ins = tx.prepare(
            "INSERT INTO device_events (id, tenant, device_id, ts_ms, kind, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )?;
        for e in &b.device_events {
            tx.execute(
                &ins,
                &[
                    &i64_of(e.id)?,
                    &e.tenant,
                    &e.device_id,
                    &e.ts_ms,
                    &e.kind,
                    &e.detail,
                ],
            )?;
        }
        // Keep the newest `device_events_kept` per device: everything below
        // the id of the kept-th newest goes (nothing when a device has
        // fewer, as the comparison with NULL is never true).
        let trim = tx.prepare(
            "DELETE FROM device_events WHERE device_id = $1 AND id < \
             (SELECT id FROM device_events WHERE device_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
        )?;
        let offset = kept_offset(b.device_events_kept);
        for d in distinct(b.device_events.iter().map(|e| e.device_id.as_str())) {
            tx.execute(&trim, &[&d, &offset])?;
        }
    }
    for a in &b.alarms {
        put_alarm(&mut tx, a)?;
    }
    let cleared = distinct(
        b.alarms
            .iter()
            .filter(|a| a.status == AlarmStatus::Cleared)
            .map(|a| a.device_id.as_str()),
    );
    if !cleared.is_empty() {
        let trim = tx.prepare(
            "DELETE FROM alarms WHERE device_id = $1 AND status = 'cleared' AND id < \
             (SELECT id FROM alarms WHERE device_id = $1 AND status = 'cleared' ORDER BY id DESC LIMIT 1 OFFSET $2)",
        )?;
        let offset = kept_offset(b.alarms_kept);
        for d in cleared {
            tx.execute(&trim, &[&d, &offset])?;
        }
    }
    if !b.commands.is_empty() {
        let ins = tx.prepare(COMMAND_UPSERT)?;
        for c in &b.commands {
            tx.execute(
                &ins,
                &[
                    &c.id,
                    &c.tenant,
                    &c.device_id,
                    &c.name,
                    &serde_json::to_string(&c.params)?,
                    &c.status.as_str(),
                    &c.created_ms,
                    &c.updated_ms,
                    &c.response.as_ref().map(serde_json::to_string).transpose()?,
                    &c.error,
                    &c.origin,
                    &i64_of(c.timeout_ms)?,
                ],
            )?;
        }
    }
    let finished = distinct(
        b.commands
            .iter()
            .filter(|c| c.status.is_finished())
            .map(|c| c.device_id.as_str()),
    );
    if !finished.is_empty() {
        // Row values order commands by (created_ms, id), as listed.
        let trim = tx.prepare(&format!(
            "DELETE FROM commands WHERE device_id = $1 AND status NOT IN {COMMANDS_OPEN} AND (created_ms, id) < \
             (SELECT created_ms, id FROM commands WHERE device_id = $1 AND status NOT IN {COMMANDS_OPEN} \
              ORDER BY created_ms DESC, id DESC LIMIT 1 OFFSET $2)"
        ))?;
        let offset = kept_offset(b.commands_kept);
        for d in finished {
            tx.execute(&trim, &[&d, &offset])?;
        }
    }
    tx.commit()?;
    Ok(())
}

impl FleetStore for PgFleetStore {
    fn load(&self) -> Result<FleetSnapshot> {
        self.conn.run(load)
    }

    fn insert_rule(&self, r: &Rule) -> Result<()> {
        self.conn.with(r.clone(), |c, r| {
            execute(
                c,
                &format!(
                    "INSERT INTO rules ({RULE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                ),
                &[
                    &r.id,
                    &r.tenant,
                    &r.name,
                    &r.description,
                    &r.sql,
                    &serde_json::to_string(&r.actions)?,
                    &flag(r.enabled),
                    &r.created_ms,
                    &r.updated_ms,
                ],
            )
        })
    }

    fn update_rule(&self, r: &Rule) -> Result<()> {
        self.conn.with(r.clone(), |c, r| {
            execute_one(
                c,
                "rule",
                "UPDATE rules SET name = $1, description = $2, sql = $3, actions = $4, enabled = $5, updated_ms = $6 WHERE id = $7",
                &[
                    &r.name,
                    &r.description,
                    &r.sql,
                    &serde_json::to_string(&r.actions)?,
                    &flag(r.enabled),
                    &r.updated_ms,
                    &r.id,
                ],
            )
        })
    }

    fn delete_rule(&self, id: &str) -> Result<()> {
        self.conn.with(id.to_string(), |c, id| {
            execute_one(c, "rule", "DELETE FROM rules WHERE id = $1", &[&id])
        })
    }

    fn delete_device(&self, device_id: &str) -> Result<()> {
        self.conn.with(device_id.to_string(), |c, id| {
            let mut tx = c.transaction()?;
            for table in [
                "device_events",
                "alarms",
                "commands",
                "shadows",
                "ota_jobs",
                "diagnostics",
            ] {
                tx.execute(&format!("DELETE FROM {table} WHERE device_id = $1"), &[&id])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn append(&self, batch: &FleetBatch<'_>) -> Result<()> {
        let owned = OwnedBatch {
            device_events: batch.device_events.to_vec(),
            device_events_kept: batch.device_events_kept,
            alarms: batch.alarms.to_vec(),
            alarms_kept: batch.alarms_kept,
            commands: batch.commands.to_vec(),
            commands_kept: batch.commands_kept,
        };
        self.conn.with(owned, |c, b| append(c, &b))
    }

    fn list_device_events(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        kind: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeviceEvent>> {
        let tenant = tenant.map(str::to_string);
        let device_id = device_id.to_string();
        let kind = kind.map(str::to_string);
        let before = before.map(i64_of).transpose()?;
        let limit = limit_of(limit);
        self.conn.run(move |c| {
            rows(
                c,
                "SELECT id, tenant, device_id, ts_ms, kind, detail FROM device_events \
                 WHERE device_id = $1 AND ($2::TEXT IS NULL OR tenant = $2) \
                 AND ($3::TEXT IS NULL OR kind = $3) AND ($4::BIGINT IS NULL OR id < $4) \
                 ORDER BY id DESC LIMIT $5",
                &[&device_id, &tenant, &kind, &before, &limit],
                |r| {
                    Ok(DeviceEvent {
                        id: u64_of(r.try_get(0)?, "device event id")?,
                        tenant: r.try_get(1)?,
                        device_id: r.try_get(2)?,
                        ts_ms: r.try_get(3)?,
                        kind: r.try_get(4)?,
                        detail: r.try_get(5)?,
                    })
                },
            )
        })
    }

    fn reserve_ids(&self, kind: m2mhub_fleet::ids::IdKind, n: u64) -> Result<Option<u64>> {
        let n = i64::try_from(n.max(1)).unwrap_or(i64::MAX);
        self.conn.with(kind.as_str(), move |c, kind| {
            // One row update: concurrent reservations queue on the row lock
            // and each gets its own range.
            let row = c.query_one(
                "UPDATE id_blocks SET next = next + $2 WHERE kind = $1 RETURNING next - $2",
                &[&kind, &n],
            )?;
            Ok(Some(u64_of(row.try_get(0)?, "id block")?))
        })
    }

    fn put_alarm(&self, a: &Alarm) -> Result<()> {
        self.conn.with(a.clone(), |c, a| put_alarm(c, &a))
    }

    fn get_alarm(&self, id: u64) -> Result<Option<Alarm>> {
        let id = i64_of(id)?;
        self.conn.run(move |c| {
            c.query_opt(
                &format!("SELECT {ALARM_COLUMNS} FROM alarms WHERE id = $1"),
                &[&id],
            )?
            .as_ref()
            .map(alarm_of)
            .transpose()
        })
    }

    fn list_alarms(&self, f: &AlarmFilter, limit: usize) -> Result<Vec<Alarm>> {
        let f = f.clone();
        let before = f.before.map(i64_of).transpose()?;
        let limit = limit_of(limit);
        self.conn.run(move |c| {
            rows(
                c,
                &format!(
                    "SELECT {ALARM_COLUMNS} FROM alarms \
                     WHERE ($1::TEXT IS NULL OR tenant = $1) AND ($2::TEXT IS NULL OR device_id = $2) \
                     AND ($3::TEXT IS NULL OR status = $3) AND ($4::TEXT IS NULL OR severity = $4) \
                     AND ($5::TEXT IS NULL OR alarm_type = $5) AND ($6::BIGINT IS NULL OR id < $6) \
                     ORDER BY id DESC LIMIT $7"
                ),
                &[
                    &f.tenant,
                    &f.device_id,
                    &f.status.map(AlarmStatus::as_str),
                    &f.severity.map(|s| s.as_str()),
                    &f.alarm_type,
                    &before,
                    &limit,
                ],
                alarm_of,
            )
        })
    }

    fn get_command(&self, id: &str) -> Result<Option<Command>> {
        let id = id.to_string();
        self.conn.run(move |c| {
            c.query_opt(
                &format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1"),
                &[&id],
            )?
            .as_ref()
            .map(command_of)
            .transpose()
        })
    }

    fn put_shadow(&self, s: &Shadow) -> Result<()> {
        self.conn.with(s.clone(), |c, s| put_shadow(c, &s))
    }

    fn put_shadow_if(&self, s: &Shadow, prev_version: u64) -> Result<bool> {
        self.conn
            .with(s.clone(), move |c, s| put_shadow_if(c, &s, prev_version))
    }

    fn put_shadows_if(&self, shadows: &[(&Shadow, u64)]) -> Result<Vec<bool>> {
        let owned: Vec<(Shadow, u64)> = shadows.iter().map(|(s, v)| ((*s).clone(), *v)).collect();
        self.conn.with(owned, |c, shadows| {
            let mut tx = c.transaction()?;
            let mut out = Vec::with_capacity(shadows.len());
            for (s, prev) in &shadows {
                out.push(put_shadow_if(&mut tx, s, *prev)?);
            }
            tx.commit()?;
            Ok(out)
        })
    }

    fn stored_shadow(&self, device_id: &str, name: &str) -> Result<Option<Shadow>> {
        self.conn
            .with((device_id.to_string(), name.to_string()), |c, (d, n)| {
                let r = c.query_opt(
                    "SELECT device_id, name, tenant, desired, reported, metadata, version, updated_ms \
                     FROM shadows WHERE device_id = $1 AND name = $2",
                    &[&d, &n],
                )?;
                r.map(|r| shadow_of(&r)).transpose()
            })
    }

    fn delete_shadow(&self, device_id: &str, name: &str) -> Result<()> {
        self.conn
            .with((device_id.to_string(), name.to_string()), |c, (d, n)| {
                execute_one(
                    c,
                    "shadow",
                    "DELETE FROM shadows WHERE device_id = $1 AND name = $2",
                    &[&d, &n],
                )
            })
    }

    fn put_shadows(&self, shadows: &[&Shadow]) -> Result<()> {
        let owned: Vec<Shadow> = shadows.iter().map(|s| (*s).clone()).collect();
        self.conn.with(owned, |c, shadows| {
            let mut tx = c.transaction()?;
            for s in &shadows {
                put_shadow(&mut tx, s)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn put_setting(&self, s: &FleetSetting, kept: usize) -> Result<()> {
        let doc = serde_json::to_string(s)?;
        let kept = limit_of(kept);
        self.conn.with(s.clone(), move |c, s| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO fleet_settings (id, tenant, created_ms, doc) VALUES ($1, $2, $3, $4)",
                &[&s.id, &s.tenant, &s.created_ms, &doc],
            )?;
            tx.execute(
                "DELETE FROM fleet_settings WHERE id NOT IN \
                 (SELECT id FROM fleet_settings ORDER BY created_ms DESC, id DESC LIMIT $1)",
                &[&kept],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn get_setting(&self, id: &str) -> Result<Option<FleetSetting>> {
        let id = id.to_string();
        self.conn.run(move |c| {
            c.query_opt("SELECT doc FROM fleet_settings WHERE id = $1", &[&id])?
                .as_ref()
                .map(doc_of)
                .transpose()
        })
    }

    fn list_settings(&self, tenant: Option<&str>, limit: usize) -> Result<Vec<FleetSetting>> {
        let tenant = tenant.map(str::to_string);
        let limit = limit_of(limit);
        self.conn.run(move |c| {
            rows(
                c,
                "SELECT doc FROM fleet_settings WHERE ($1::TEXT IS NULL OR tenant = $1) \
                 ORDER BY created_ms DESC, id DESC LIMIT $2",
                &[&tenant, &limit],
                doc_of,
            )
        })
    }

    fn put_artifact(&self, a: &Artifact) -> Result<()> {
        let doc = serde_json::to_string(a)?;
        self.conn
            .with((a.id.clone(), a.tenant.clone()), move |c, (id, tenant)| {
                execute(
                    c,
                    "INSERT INTO ota_artifacts (id, tenant, doc) VALUES ($1, $2, $3)",
                    &[&id, &tenant, &doc],
                )
            })
    }

    fn delete_artifact(&self, id: &str) -> Result<()> {
        self.conn.with(id.to_string(), |c, id| {
            execute_one(
                c,
                "artifact",
                "DELETE FROM ota_artifacts WHERE id = $1",
                &[&id],
            )
        })
    }

    fn put_campaign(&self, camp: &Campaign, jobs: &[Job]) -> Result<()> {
        let camp_doc = serde_json::to_string(camp)?;
        let jobs = jobs
            .iter()
            .map(|j| {
                Ok((
                    j.campaign_id.clone(),
                    j.device_id.clone(),
                    j.state.as_str(),
                    serde_json::to_string(j)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.conn.with(
            (camp.id.clone(), camp.tenant.clone()),
            move |c, (id, tenant)| {
                let mut tx = c.transaction()?;
                tx.execute(
                    "INSERT INTO ota_campaigns (id, tenant, doc) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                    &[&id, &tenant, &camp_doc],
                )?;
                if !jobs.is_empty() {
                    let st = tx.prepare(
                        "INSERT INTO ota_jobs (campaign_id, device_id, state, doc) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (campaign_id, device_id) DO UPDATE SET state = excluded.state, doc = excluded.doc",
                    )?;
                    for (campaign_id, device_id, state, doc) in &jobs {
                        tx.execute(&st, &[campaign_id, device_id, state, doc])?;
                    }
                }
                tx.commit()?;
                Ok(())
            },
        )
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn load_ota(&self) -> Result<(Vec<Artifact>, Vec<Campaign>, Vec<Job>)> {
        self.conn.run(|c| {
            // One snapshot: no job without its campaign.
            let mut tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let out = (
                rows(&mut tx, "SELECT doc FROM ota_artifacts", &[], doc_of)?,
                rows(&mut tx, "SELECT doc FROM ota_campaigns", &[], doc_of)?,
                rows(&mut tx, "SELECT doc FROM ota_jobs", &[], doc_of)?,
            );
            tx.commit()?;
            Ok(out)
        })
    }

    fn stored_campaign(&self, id: &str) -> Result<Option<(Campaign, Vec<Job>)>> {
        self.conn.with(id.to_string(), |c, id| {
            let mut tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let Some(row) = tx.query_opt("SELECT doc FROM ota_campaigns WHERE id = $1", &[&id])?
            else {
                return Ok(None);
            };
            let campaign: Campaign = doc_of(&row)?;
            let jobs = rows(
                &mut tx,
                "SELECT doc FROM ota_jobs WHERE campaign_id = $1",
                &[&id],
                doc_of,
            )?;
            tx.commit()?;
            Ok(Some((campaign, jobs)))
        })
    }

    fn stored_job(&self, campaign_id: &str, device_id: &str) -> Result<Option<Job>> {
        self.conn.with(
            (campaign_id.to_string(), device_id.to_string()),
            |c, (campaign, device)| {
                c.query_opt(
                    "SELECT doc FROM ota_jobs WHERE campaign_id = $1 AND device_id = $2",
                    &[&campaign, &device],
                )?
                .map(|r| doc_of(&r))
                .transpose()
            },
        )
    }

    fn put_campaign_if(
        &self,
        campaign: Option<(&Campaign, i64)>,
        jobs: &[(&Job, &Job)],
    ) -> Result<bool> {
        let campaign = campaign
            .map(|(c, prev)| {
                Ok::<_, m2mhub_fleet::RegistryError>((
                    c.id.clone(),
                    serde_json::to_string(c)?,
                    prev,
                ))
            })
            .transpose()?;
        let jobs = jobs
            .iter()
            .map(|(j, read)| {
                Ok((
                    j.campaign_id.clone(),
                    j.device_id.clone(),
                    j.state.as_str(),
                    serde_json::to_string(j)?,
                    serde_json::to_string(read)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.conn.with((campaign, jobs), |c, (campaign, jobs)| {
            let mut tx = c.transaction()?;
            if let Some((id, doc, prev)) = &campaign {
                // The documents are TEXT: the condition reads the field.
                let n = tx.execute(
                    "UPDATE ota_campaigns SET doc = $2 WHERE id = $1 \
                     AND (doc::jsonb ->> 'updated_ms')::BIGINT = $3",
                    &[id, doc, prev],
                )?;
                if n != 1 {
                    return Ok(false); // dropped: rolled back
                }
            }
            if !jobs.is_empty() {
                let st = tx.prepare(
                    "UPDATE ota_jobs SET state = $3, doc = $4 \
                     WHERE campaign_id = $1 AND device_id = $2 AND doc = $5",
                )?;
                for (campaign_id, device_id, state, doc, read) in &jobs {
                    if tx.execute(&st, &[campaign_id, device_id, state, doc, read])? != 1 {
                        return Ok(false);
                    }
                }
            }
            tx.commit()?;
            Ok(true)
        })
    }

    fn list_commands(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>> {
        let tenant = tenant.map(str::to_string);
        let device_id = device_id.to_string();
        let before = before.map(str::to_string);
        let limit = limit_of(limit);
        self.conn.run(move |c| {
            // An unknown cursor compares with NULL: an empty page.
            rows(
                c,
                &format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands \
                     WHERE device_id = $1 AND ($2::TEXT IS NULL OR tenant = $2) \
                     AND ($3::TEXT IS NULL OR (created_ms, id) < \
                          (SELECT created_ms, id FROM commands WHERE id = $3)) \
                     ORDER BY created_ms DESC, id DESC LIMIT $4"
                ),
                &[&device_id, &tenant, &before, &limit],
                command_of,
            )
        })
    }

    fn insert_diagnostic(&self, b: &DiagnosticBundle) -> Result<()> {
        let size = b.size.map(i64_of).transpose()?;
        self.conn.with(b.clone(), move |c, b| {
            execute(
                c,
                &format!(
                    "INSERT INTO diagnostics ({DIAGNOSTIC_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                ),
                &[
                    &b.id,
                    &b.tenant,
                    &b.device_id,
                    &b.status.as_str(),
                    &b.requested_by,
                    &b.requested_ms,
                    &b.uploaded_ms,
                    &size,
                    &b.sha256,
                    &b.reason,
                    &b.error,
                    &b.token_hash,
                    &b.expires_ms,
                ],
            )
        })
    }

    fn update_diagnostic(&self, b: &DiagnosticBundle) -> Result<()> {
        let size = b.size.map(i64_of).transpose()?;
        self.conn.with(b.clone(), move |c, b| {
            execute_one(
                c,
                "diagnostic bundle",
                "UPDATE diagnostics SET status = $1, requested_by = $2, requested_ms = $3, uploaded_ms = $4, \
                 size = $5, sha256 = $6, reason = $7, error = $8, expires_ms = $9 WHERE id = $10",
                &[
                    &b.status.as_str(),
                    &b.requested_by,
                    &b.requested_ms,
                    &b.uploaded_ms,
                    &size,
                    &b.sha256,
                    &b.reason,
                    &b.error,
                    &b.expires_ms,
                    &b.id,
                ],
            )
        })
    }

    fn get_diagnostic(&self, id: &str) -> Result<Option<DiagnosticBundle>> {
        self.query_diagnostics("id = $1", vec![Box::new(id.to_string())])
            .map(|v| v.into_iter().next())
    }

    fn find_diagnostic_by_token(&self, token_hash: &str) -> Result<Option<DiagnosticBundle>> {
        self.query_diagnostics("token_hash = $1", vec![Box::new(token_hash.to_string())])
            .map(|v| v.into_iter().next())
    }

    fn list_diagnostics(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<DiagnosticBundle>> {
        self.query_diagnostics(
            "device_id = $1 AND ($2::TEXT IS NULL OR tenant = $2) \
             ORDER BY requested_ms DESC, id DESC LIMIT $3",
            vec![
                Box::new(device_id.to_string()),
                Box::new(tenant.map(str::to_string)),
                Box::new(limit_of(limit)),
            ],
        )
    }

    fn delete_diagnostic(&self, id: &str) -> Result<()> {
        self.conn.with(id.to_string(), |c, id| {
            execute_one(
                c,
                "diagnostic bundle",
                "DELETE FROM diagnostics WHERE id = $1",
                &[&id],
            )
        })
    }

    fn diagnostics_due(
        &self,
        expired_at: i64,
        retained_until: i64,
    ) -> Result<Vec<DiagnosticBundle>> {
        self.query_diagnostics(
            "(status = 'requested' AND expires_ms <= $1) \
             OR COALESCE(uploaded_ms, expires_ms) <= $2",
            vec![Box::new(expired_at), Box::new(retained_until)],
        )
    }

    fn put_dashboard(&self, d: &Dashboard) -> Result<()> {
        let doc = serde_json::to_string(d)?;
        self.conn
            .with((d.id.clone(), d.tenant.clone()), move |c, (id, tenant)| {
                execute(
                    c,
                    "INSERT INTO dashboards (id, tenant, doc) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, doc = excluded.doc",
                    &[&id, &tenant, &doc],
                )
            })
    }

    fn get_dashboard(&self, id: &str) -> Result<Option<Dashboard>> {
        let id = id.to_string();
        self.conn.run(move |c| {
            c.query_opt("SELECT doc FROM dashboards WHERE id = $1", &[&id])?
                .as_ref()
                .map(doc_of)
                .transpose()
        })
    }

    fn list_dashboards(&self, tenant: Option<&str>) -> Result<Vec<Dashboard>> {
        let tenant = tenant.map(str::to_string);
        self.conn.run(move |c| {
            rows(
                c,
                "SELECT doc FROM dashboards WHERE ($1::TEXT IS NULL OR tenant = $1)",
                &[&tenant],
                doc_of,
            )
        })
    }

    fn delete_dashboard(&self, id: &str) -> Result<()> {
        self.conn.with(id.to_string(), |c, id| {
            let mut tx = c.transaction()?;
            execute(
                &mut tx,
                "DELETE FROM dashboard_shares WHERE dashboard_id = $1",
                &[&id],
            )?;
            execute(&mut tx, "DELETE FROM dashboards WHERE id = $1", &[&id])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn put_dashboard_share(&self, s: &DashboardShare) -> Result<()> {
        let doc = serde_json::to_string(s)?;
        self.conn.with(
            (s.id.clone(), s.dashboard_id.clone(), s.token_hash.clone()),
            move |c, (id, dashboard, hash)| {
                execute(
                    c,
                    "INSERT INTO dashboard_shares (id, dashboard_id, token_hash, doc) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                    &[&id, &dashboard, &hash, &doc],
                )
            },
        )
    }

    fn list_dashboard_shares(&self, dashboard_id: &str) -> Result<Vec<DashboardShare>> {
        let id = dashboard_id.to_string();
        self.conn.run(move |c| {
            rows(
                c,
                "SELECT doc, token_hash FROM dashboard_shares WHERE dashboard_id = $1",
                &[&id],
                |r| {
                    // The hash is kept in its column only (the document
                    // omits it), as in SQLite.
                    let mut s: DashboardShare = doc_of(r)?;
                    s.token_hash = r.try_get(1)?;
                    Ok(s)
                },
            )
        })
    }

    fn find_dashboard_share(&self, token_hash: &str) -> Result<Option<DashboardShare>> {
        let hash = token_hash.to_string();
        self.conn.run(move |c| {
            let Some(r) = c.query_opt(
                "SELECT doc FROM dashboard_shares WHERE token_hash = $1",
                &[&hash],
            )?
            else {
                return Ok(None);
            };
            let mut s: DashboardShare = doc_of(&r)?;
            s.token_hash = hash.clone();
            Ok(Some(s))
        })
    }

    fn put_report(&self, r: &Report) -> Result<()> {
        let doc = serde_json::to_string(r)?;
        self.conn
            .with((r.id.clone(), r.tenant.clone()), move |c, (id, tenant)| {
                execute(
                    c,
                    "INSERT INTO reports (id, tenant, doc) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, doc = excluded.doc",
                    &[&id, &tenant, &doc],
                )
            })
    }

    fn claim_report_run(&self, id: &str, due_ms: i64, next_run_ms: Option<i64>) -> Result<bool> {
        self.conn.with(id.to_string(), move |c, id| {
            let mut tx = c.transaction()?;
            // The row lock makes a second node's claim wait for this one
            // and then see the moved time.
            let doc: Option<String> = tx
                .query_opt("SELECT doc FROM reports WHERE id = $1 FOR UPDATE", &[&id])?
                .map(|r| r.try_get(0))
                .transpose()?;
            let Some(doc) = doc else { return Ok(false) };
            let mut r: Report = serde_json::from_str(&doc)?;
            if r.next_run_ms != Some(due_ms) {
                return Ok(false);
            }
            r.next_run_ms = next_run_ms;
            let doc = serde_json::to_string(&r)?;
            execute(
                &mut tx,
                "UPDATE reports SET doc = $2 WHERE id = $1",
                &[&id, &doc],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn delete_report(&self, id: &str) -> Result<()> {
        self.conn.with(id.to_string(), |c, id| {
            let mut tx = c.transaction()?;
            execute(
                &mut tx,
                "DELETE FROM report_runs WHERE report_id = $1",
                &[&id],
            )?;
            execute_one(
                &mut tx,
                "report",
                "DELETE FROM reports WHERE id = $1",
                &[&id],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn list_reports(&self) -> Result<Vec<Report>> {
        self.conn
            .run(|c| rows(c, "SELECT doc FROM reports", &[], doc_of))
    }

    fn put_report_run(&self, run: &ReportRun) -> Result<()> {
        let doc = serde_json::to_string(run)?;
        self.conn.with(
            (run.id.clone(), run.report_id.clone(), run.started_ms),
            move |c, (id, report, started)| {
                execute(
                    c,
                    "INSERT INTO report_runs (id, report_id, started_ms, doc) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                    &[&id, &report, &started, &doc],
                )
            },
        )
    }

    fn list_report_runs(&self, report_id: &str, limit: usize) -> Result<Vec<ReportRun>> {
        let id = report_id.to_string();
        let limit = limit_of(limit);
        self.conn.run(move |c| {
            rows(
                c,
                "SELECT doc FROM report_runs WHERE report_id = $1 \
                 ORDER BY started_ms DESC, id DESC LIMIT $2",
                &[&id, &limit],
                doc_of,
            )
        })
    }

    fn delete_report_runs(&self, ids: &[String]) -> Result<()> {
        self.conn.with(ids.to_vec(), |c, ids| {
            execute(c, "DELETE FROM report_runs WHERE id = ANY($1)", &[&ids])
        })
    }
}
