//! The SQLite backend of fleet operations: every SQL statement of this
//! crate is in this file. Its tables live in `registry.db` beside the
//! identity tables, opened on their own connection and migrated as their own
//! domain (`fleet`), see `m2mhub_identity::sql`.
//!
//! The SQL is deliberately plain (`?` parameters, BIGINT/TEXT/INTEGER
//! columns, booleans as 0/1, JSON as text) so a PostgreSQL implementation of
//! [`FleetStore`] can reuse it nearly as is.

use crate::alarm::{Alarm, AlarmFilter, AlarmStatus};
use crate::command::{Command, CommandStatus};
use crate::dashboard::{Dashboard, DashboardShare};
use crate::device_event::DeviceEvent;
use crate::diagnostic::DiagnosticBundle;
use crate::ota::{Artifact, Campaign, Job};
use crate::report::{Report, ReportRun};
use crate::rule::Rule;
use crate::setting::FleetSetting;
use crate::shadow::Shadow;
use crate::store::{FleetBatch, FleetSnapshot, FleetStore};
use crate::Result;
use m2mhub_identity::sql::{corrupt, execute_one, i64_of, migrate, open_sqlite, u64_of, Migration};
use parking_lot::Mutex;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use std::path::Path;

/// The fleet tables, version by version; the PostgreSQL store
/// (`m2mhub-pgstore`) applies the same steps.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
CREATE TABLE IF NOT EXISTS device_events (
    id BIGINT PRIMARY KEY,
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS device_events_device ON device_events (device_id, id);
CREATE TABLE IF NOT EXISTS alarms (
    id BIGINT PRIMARY KEY,
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    alarm_type TEXT NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,
    acked INTEGER NOT NULL,
    acked_by TEXT,
    acked_ms BIGINT,
    details TEXT NOT NULL,
    rule_id TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    cleared_ms BIGINT,
    cleared_by TEXT,
    count BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS alarms_device ON alarms (device_id, status, id);
CREATE INDEX IF NOT EXISTS alarms_tenant ON alarms (tenant, id);
CREATE INDEX IF NOT EXISTS alarms_status ON alarms (status, id);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    response TEXT,
    error TEXT,
    origin TEXT NOT NULL,
    timeout_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_device ON commands (device_id, created_ms, id);
CREATE INDEX IF NOT EXISTS commands_status ON commands (status);
CREATE TABLE IF NOT EXISTS rules (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    sql TEXT NOT NULL,
    actions TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
",
    },
    Migration {
        version: 2,
        sql: "
CREATE TABLE IF NOT EXISTS shadows (
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    desired TEXT NOT NULL,
    reported TEXT NOT NULL,
    metadata TEXT NOT NULL,
    version BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (device_id, name)
);
",
    },
    Migration {
        version: 3,
        sql: "
CREATE TABLE IF NOT EXISTS fleet_settings (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fleet_settings_tenant ON fleet_settings (tenant, created_ms);
",
    },
    Migration {
        version: 4,
        sql: "
CREATE TABLE IF NOT EXISTS ota_artifacts (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ota_campaigns (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ota_jobs (
    campaign_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (campaign_id, device_id)
);
CREATE INDEX IF NOT EXISTS ota_jobs_device ON ota_jobs (device_id);
",
    },
    DIAGNOSTICS_MIGRATION,
    Migration {
        version: 6,
        sql: "
CREATE TABLE IF NOT EXISTS dashboards (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dashboards_tenant ON dashboards (tenant);
CREATE TABLE IF NOT EXISTS dashboard_shares (
    id TEXT PRIMARY KEY,
    dashboard_id TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dashboard_shares_dashboard ON dashboard_shares (dashboard_id);
",
    },
    REPORTS_MIGRATION,
];

/// Scheduled reports (`report.rs`): definitions and runs as JSON
/// documents, with the columns their queries select on.
const REPORTS_MIGRATION: Migration = Migration {
    version: 7,
    sql: "
CREATE TABLE IF NOT EXISTS reports (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS report_runs (
    id TEXT PRIMARY KEY,
    report_id TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS report_runs_report ON report_runs (report_id, started_ms);
",
};

/// Diagnostic bundles (`diagnostic.rs`): kept apart so it can be
/// renumbered when branches merge.
const DIAGNOSTICS_MIGRATION: Migration = Migration {
    version: 5,
    sql: "
CREATE TABLE IF NOT EXISTS diagnostics (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_ms BIGINT NOT NULL,
    uploaded_ms BIGINT,
    size BIGINT,
    sha256 TEXT,
    reason TEXT,
    error TEXT,
    token_hash TEXT NOT NULL UNIQUE,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS diagnostics_device ON diagnostics (device_id, requested_ms);
CREATE INDEX IF NOT EXISTS diagnostics_status ON diagnostics (status, expires_ms);
",
};

// The column lists (and COMMANDS_OPEN) are public for the PostgreSQL
// store (`m2mhub-pgstore`), whose tables are these same ones.
pub const DIAGNOSTIC_COLUMNS: &str = "id, tenant, device_id, status, requested_by, requested_ms, \
    uploaded_ms, size, sha256, reason, error, token_hash, expires_ms";

pub const ALARM_COLUMNS: &str =
    "id, tenant, device_id, alarm_type, severity, status, acked, acked_by, acked_ms, \
    details, rule_id, created_ms, updated_ms, cleared_ms, cleared_by, count";

/// Insert an alarm or replace every field of the stored one (a retried
/// batch writes the same row again harmlessly).
const ALARM_UPSERT: &str = "INSERT INTO alarms (id, tenant, device_id, alarm_type, severity, status, acked, acked_by, acked_ms, \
    details, rule_id, created_ms, updated_ms, cleared_ms, cleared_by, count) \
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
    ON CONFLICT (id) DO UPDATE SET severity = excluded.severity, status = excluded.status, \
    acked = excluded.acked, acked_by = excluded.acked_by, acked_ms = excluded.acked_ms, \
    details = excluded.details, rule_id = excluded.rule_id, updated_ms = excluded.updated_ms, \
    cleared_ms = excluded.cleared_ms, cleared_by = excluded.cleared_by, count = excluded.count";

pub const COMMAND_COLUMNS: &str =
    "id, tenant, device_id, name, params, status, created_ms, updated_ms, response, error, origin, timeout_ms";

const COMMAND_UPSERT: &str =
    "INSERT INTO commands (id, tenant, device_id, name, params, status, created_ms, updated_ms, \
    response, error, origin, timeout_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated_ms = excluded.updated_ms, \
    response = excluded.response, error = excluded.error";

pub const COMMANDS_OPEN: &str = "('pending', 'sent', 'delivered')";

pub const RULE_COLUMNS: &str =
    "id, tenant, name, description, sql, actions, enabled, created_ms, updated_ms";

/// SQLite-backed [`FleetStore`]. One connection behind a mutex: the fleet
/// serializes writes anyway and reads come mostly from its caches.
pub struct SqliteFleetStore {
    conn: Mutex<Connection>,
    /// Other writers share the file (tests only; see `shared`).
    shared: bool,
}

impl SqliteFleetStore {
    /// Open or create the database and bring the fleet tables up to date.
    pub fn open(path: &Path) -> Result<SqliteFleetStore> {
        let mut conn = open_sqlite(path)?;
        migrate(&mut conn, "fleet", MIGRATIONS)?;
        Ok(SqliteFleetStore {
            conn: Mutex::new(conn),
            shared: false,
        })
    }

    /// Say other fleets write this file too: the unit tests' stand-in for
    /// cluster nodes sharing PostgreSQL (two fleets, two connections, one
    /// file), to drive the shared-store paths without a server.
    #[cfg(test)]
    pub(crate) fn shared(mut self) -> SqliteFleetStore {
        self.shared = true;
        self
    }

    fn exec(&self, sql: &str, p: impl rusqlite::Params) -> Result<usize> {
        Ok(self.conn.lock().execute(sql, p)?)
    }

    /// Execute an UPDATE/DELETE that must hit a row.
    fn exec_one(&self, what: &str, sql: &str, p: impl rusqlite::Params) -> Result<()> {
        execute_one(&self.conn.lock(), what, sql, p)
    }
}

/// An alarm row with its text-encoded columns still to decode.
struct AlarmRow {
    alarm: Alarm,
    id: i64,
    severity: String,
    status: String,
    details: String,
    count: i64,
}

fn alarm_from_row(r: &Row<'_>) -> rusqlite::Result<AlarmRow> {
    Ok(AlarmRow {
        id: r.get(0)?,
        severity: r.get(4)?,
        status: r.get(5)?,
        details: r.get(9)?,
        count: r.get(15)?,
        alarm: Alarm {
            id: 0,
            tenant: r.get(1)?,
            device_id: r.get(2)?,
            alarm_type: r.get(3)?,
            severity: crate::alarm::Severity::Info,
            status: AlarmStatus::Active,
            acked: r.get::<_, i64>(6)? != 0,
            acked_by: r.get(7)?,
            acked_ms: r.get(8)?,
            details: serde_json::Value::Null,
            rule_id: r.get(10)?,
            created_ms: r.get(11)?,
            updated_ms: r.get(12)?,
            cleared_ms: r.get(13)?,
            cleared_by: r.get(14)?,
            count: 0,
        },
    })
}

fn alarm_of(row: AlarmRow) -> Result<Alarm> {
    let mut a = row.alarm;
    a.id = u64_of(row.id, "alarm id")?;
    a.severity = row
        .severity
        .parse()
        .map_err(|_| corrupt("alarm severity"))?;
    a.status = row.status.parse().map_err(|_| corrupt("alarm status"))?;
    a.details = serde_json::from_str(&row.details)?;
    a.count = u64_of(row.count, "alarm count")?;
    Ok(a)
}

fn put_alarm(c: &Connection, a: &Alarm) -> Result<()> {
    c.prepare_cached(ALARM_UPSERT)?.execute(params![
        i64_of(a.id)?,
        a.tenant,
        a.device_id,
        a.alarm_type,
        a.severity.as_str(),
        a.status.as_str(),
        i64::from(a.acked),
        a.acked_by,
        a.acked_ms,
        serde_json::to_string(&a.details)?,
        a.rule_id,
        a.created_ms,
        a.updated_ms,
        a.cleared_ms,
        a.cleared_by,
        i64_of(a.count)?
    ])?;
    Ok(())
}

/// A command row with its text-encoded columns still to decode.
struct CommandRow {
    command: Command,
    params: String,
    status: String,
    response: Option<String>,
    timeout_ms: i64,
}

fn command_from_row(r: &Row<'_>) -> rusqlite::Result<CommandRow> {
    Ok(CommandRow {
        params: r.get(4)?,
        status: r.get(5)?,
        response: r.get(8)?,
        timeout_ms: r.get(11)?,
        command: Command {
            id: r.get(0)?,
            tenant: r.get(1)?,
            device_id: r.get(2)?,
            name: r.get(3)?,
            params: serde_json::Value::Null,
            status: CommandStatus::Pending,
            created_ms: r.get(6)?,
            updated_ms: r.get(7)?,
            response: None,
            error: r.get(9)?,
            origin: r.get(10)?,
            timeout_ms: 0,
        },
    })
}

fn command_of(row: CommandRow) -> Result<Command> {
    let mut c = row.command;
    c.params = serde_json::from_str(&row.params)?;
    c.status = row.status.parse().map_err(|_| corrupt("command status"))?;
    c.response = row
        .response
        .as_deref()
        .map(serde_json::from_str)
        .transpose()?;
    c.timeout_ms = u64_of(row.timeout_ms, "command timeout")?;
    Ok(c)
}

fn rule_from_row(r: &Row<'_>) -> rusqlite::Result<(Rule, String)> {
    Ok((
        Rule {
            id: r.get(0)?,
            tenant: r.get(1)?,
            name: r.get(2)?,
            description: r.get(3)?,
            sql: r.get(4)?,
            actions: serde_json::Value::Null,
            enabled: r.get::<_, i64>(6)? != 0,
            created_ms: r.get(7)?,
            updated_ms: r.get(8)?,
        },
        r.get(5)?,
    ))
}

impl FleetStore for SqliteFleetStore {
    fn load(&self) -> Result<FleetSnapshot> {
        let c = self.conn.lock();
        let mut snap = FleetSnapshot::default();

        let mut st = c.prepare(&format!("SELECT {RULE_COLUMNS} FROM rules"))?;
        for row in st.query_map([], rule_from_row)? {
            let (mut r, actions) = row?;
            r.actions = serde_json::from_str(&actions)?;
            snap.rules.push(r);
        }

        let mut st = c.prepare(&format!(
            "SELECT {ALARM_COLUMNS} FROM alarms WHERE status = 'active' ORDER BY id"
        ))?;
        for row in st.query_map([], alarm_from_row)? {
            snap.active_alarms.push(alarm_of(row?)?);
        }
        let last: Option<i64> = c.query_row("SELECT MAX(id) FROM alarms", [], |r| r.get(0))?;
        snap.alarm_seq = last.map_or(Ok(0), |s| u64_of(s, "alarm id"))?;

        let mut st = c.prepare(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE status IN {COMMANDS_OPEN}"
        ))?;
        for row in st.query_map([], command_from_row)? {
            snap.open_commands.push(command_of(row?)?);
        }

        let de: Option<i64> = c.query_row("SELECT MAX(id) FROM device_events", [], |r| r.get(0))?;
        snap.device_event_seq = de.map_or(Ok(0), |s| u64_of(s, "device event id"))?;
        let mut st = c.prepare(
            "SELECT device_id, name, tenant, desired, reported, metadata, version, updated_ms FROM shadows",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        for row in rows {
            let (device_id, name, tenant, desired, reported, metadata, version, updated_ms) = row?;
            snap.shadows.push(Shadow {
                device_id,
                name,
                tenant,
                desired: serde_json::from_str(&desired)?,
                reported: serde_json::from_str(&reported)?,
                metadata: serde_json::from_str(&metadata)?,
                version: u64_of(version, "shadow version")?,
                updated_ms,
            });
        }
        snap.artifacts = docs(&c, "SELECT doc FROM ota_artifacts")?;
        snap.campaigns = docs(&c, "SELECT doc FROM ota_campaigns")?;
        snap.jobs = docs(&c, "SELECT doc FROM ota_jobs")?;
        Ok(snap)
    }

    fn insert_rule(&self, r: &Rule) -> Result<()> {
        self.exec(
            &format!("INSERT INTO rules ({RULE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            params![
                r.id,
                r.tenant,
                r.name,
                r.description,
                r.sql,
                serde_json::to_string(&r.actions)?,
                i64::from(r.enabled),
                r.created_ms,
                r.updated_ms
            ],
        )?;
        Ok(())
    }

    fn update_rule(&self, r: &Rule) -> Result<()> {
        self.exec_one(
            "rule",
            "UPDATE rules SET name = ?, description = ?, sql = ?, actions = ?, enabled = ?, updated_ms = ? WHERE id = ?",
            params![
                r.name,
                r.description,
                r.sql,
                serde_json::to_string(&r.actions)?,
                i64::from(r.enabled),
                r.updated_ms,
                r.id
            ],
        )
    }

    fn delete_rule(&self, id: &str) -> Result<()> {
        self.exec_one("rule", "DELETE FROM rules WHERE id = ?", params![id])
    }

    fn delete_device(&self, device_id: &str) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.execute(
            "DELETE FROM device_events WHERE device_id = ?",
            params![device_id],
        )?;
        tx.execute("DELETE FROM alarms WHERE device_id = ?", params![device_id])?;
        tx.execute(
            "DELETE FROM commands WHERE device_id = ?",
            params![device_id],
        )?;
        tx.execute(
            "DELETE FROM shadows WHERE device_id = ?",
            params![device_id],
        )?;
        tx.execute(
            "DELETE FROM ota_jobs WHERE device_id = ?",
            params![device_id],
        )?;
        tx.execute(
            "DELETE FROM diagnostics WHERE device_id = ?",
            params![device_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn append(&self, batch: &FleetBatch<'_>) -> Result<()> {
        let FleetBatch {
            device_events,
            device_events_kept,
            alarms,
            alarms_kept,
            commands,
            commands_kept,
        } = *batch;
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        {
            let mut ins = tx.prepare(
                "INSERT INTO device_events (id, tenant, device_id, ts_ms, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
            )?;
            for e in device_events {
                ins.execute(params![
                    i64_of(e.id)?,
                    e.tenant,
                    e.device_id,
                    e.ts_ms,
                    e.kind,
                    e.detail
                ])?;
            }
            // Keep the newest `device_events_kept` per device: everything
            // below the id of the kept-th newest goes (nothing when a device
            // has fewer, as the comparison with NULL is never true).
            let mut trim = tx.prepare(
                "DELETE FROM device_events WHERE device_id = ?1 AND id < \
                 (SELECT id FROM device_events WHERE device_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?;
            let offset = i64::try_from(device_events_kept.saturating_sub(1)).unwrap_or(i64::MAX);
            let mut trimmed: Vec<&str> = Vec::new();
            for e in device_events {
                if !trimmed.contains(&e.device_id.as_str()) {
                    trim.execute(params![e.device_id, offset])?;
                    trimmed.push(&e.device_id);
                }
            }

            for a in alarms {
                put_alarm(&tx, a)?;
            }
            let mut trim = tx.prepare(
                "DELETE FROM alarms WHERE device_id = ?1 AND status = 'cleared' AND id < \
                 (SELECT id FROM alarms WHERE device_id = ?1 AND status = 'cleared' ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?;
            let offset = i64::try_from(alarms_kept.saturating_sub(1)).unwrap_or(i64::MAX);
            let mut trimmed: Vec<&str> = Vec::new();
            for a in alarms {
                if a.status == AlarmStatus::Cleared && !trimmed.contains(&a.device_id.as_str()) {
                    trim.execute(params![a.device_id, offset])?;
                    trimmed.push(&a.device_id);
                }
            }

            let mut ins = tx.prepare(COMMAND_UPSERT)?;
            for c in commands {
                ins.execute(params![
                    c.id,
                    c.tenant,
                    c.device_id,
                    c.name,
                    serde_json::to_string(&c.params)?,
                    c.status.as_str(),
                    c.created_ms,
                    c.updated_ms,
                    c.response.as_ref().map(serde_json::to_string).transpose()?,
                    c.error,
                    c.origin,
                    i64_of(c.timeout_ms)?
                ])?;
            }
            // Row values order commands by (created_ms, id), as listed.
            let mut trim = tx.prepare(&format!(
                "DELETE FROM commands WHERE device_id = ?1 AND status NOT IN {COMMANDS_OPEN} AND (created_ms, id) < \
                 (SELECT created_ms, id FROM commands WHERE device_id = ?1 AND status NOT IN {COMMANDS_OPEN} \
                  ORDER BY created_ms DESC, id DESC LIMIT 1 OFFSET ?2)"
            ))?;
            let offset = i64::try_from(commands_kept.saturating_sub(1)).unwrap_or(i64::MAX);
            let mut trimmed: Vec<&str> = Vec::new();
            for c in commands {
                if c.status.is_finished() && !trimmed.contains(&c.device_id.as_str()) {
                    trim.execute(params![c.device_id, offset])?;
                    trimmed.push(&c.device_id);
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn list_device_events(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        kind: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeviceEvent>> {
        let mut sql = String::from(
            "SELECT id, tenant, device_id, ts_ms, kind, detail FROM device_events WHERE device_id = ?",
        );
        let mut vals: Vec<Value> = vec![Value::Text(device_id.into())];
        if let Some(t) = tenant {
            sql.push_str(" AND tenant = ?");
            vals.push(Value::Text(t.into()));
        }
        if let Some(k) = kind {
            sql.push_str(" AND kind = ?");
            vals.push(Value::Text(k.into()));
        }
        if let Some(b) = before {
            sql.push_str(" AND id < ?");
            vals.push(Value::Integer(i64_of(b)?));
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?");
        vals.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        let c = self.conn.lock();
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map(params_from_iter(vals.iter()), |r| {
            Ok((
                r.get::<_, i64>(0)?,
                DeviceEvent {
                    id: 0,
                    tenant: r.get(1)?,
                    device_id: r.get(2)?,
                    ts_ms: r.get(3)?,
                    kind: r.get(4)?,
                    detail: r.get(5)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, mut e) = row?;
            e.id = u64_of(id, "device event id")?;
            out.push(e);
        }
        Ok(out)
    }

    fn put_alarm(&self, a: &Alarm) -> Result<()> {
        put_alarm(&self.conn.lock(), a)
    }

    fn get_alarm(&self, id: u64) -> Result<Option<Alarm>> {
        let c = self.conn.lock();
        let row = c
            .query_row(
                &format!("SELECT {ALARM_COLUMNS} FROM alarms WHERE id = ?"),
                params![i64_of(id)?],
                alarm_from_row,
            )
            .optional()?;
        row.map(alarm_of).transpose()
    }

    fn list_alarms(&self, f: &AlarmFilter, limit: usize) -> Result<Vec<Alarm>> {
        let mut cond: Vec<&str> = Vec::new();
        let mut vals: Vec<Value> = Vec::new();
        if let Some(t) = &f.tenant {
            cond.push("tenant = ?");
            vals.push(Value::Text(t.clone()));
        }
        if let Some(d) = &f.device_id {
            cond.push("device_id = ?");
            vals.push(Value::Text(d.clone()));
        }
        if let Some(s) = f.status {
            cond.push("status = ?");
            vals.push(Value::Text(s.as_str().into()));
        }
        if let Some(s) = f.severity {
            cond.push("severity = ?");
            vals.push(Value::Text(s.as_str().into()));
        }
        if let Some(t) = &f.alarm_type {
            cond.push("alarm_type = ?");
            vals.push(Value::Text(t.clone()));
        }
        if let Some(b) = f.before {
            cond.push("id < ?");
            vals.push(Value::Integer(i64_of(b)?));
        }
        vals.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        let sql = format!(
            "SELECT {ALARM_COLUMNS} FROM alarms {} {} ORDER BY id DESC LIMIT ?",
            if cond.is_empty() { "" } else { "WHERE" },
            cond.join(" AND "),
        );
        let c = self.conn.lock();
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map(params_from_iter(vals.iter()), alarm_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(alarm_of(row?)?);
        }
        Ok(out)
    }

    fn get_command(&self, id: &str) -> Result<Option<Command>> {
        let c = self.conn.lock();
        let row = c
            .query_row(
                &format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?"),
                params![id],
                command_from_row,
            )
            .optional()?;
        row.map(command_of).transpose()
    }

    fn list_commands(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>> {
        let mut sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = ?");
        let mut vals: Vec<Value> = vec![Value::Text(device_id.into())];
        if let Some(t) = tenant {
            sql.push_str(" AND tenant = ?");
            vals.push(Value::Text(t.into()));
        }
        if let Some(b) = before {
            // An unknown cursor compares with NULL: an empty page.
            sql.push_str(
                " AND (created_ms, id) < (SELECT created_ms, id FROM commands WHERE id = ?)",
            );
            vals.push(Value::Text(b.into()));
        }
        sql.push_str(" ORDER BY created_ms DESC, id DESC LIMIT ?");
        vals.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        let c = self.conn.lock();
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map(params_from_iter(vals.iter()), command_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(command_of(row?)?);
        }
        Ok(out)
    }

    fn put_shadow(&self, s: &Shadow) -> Result<()> {
        put_shadow(&self.conn.lock(), s)
    }

    fn put_shadows(&self, shadows: &[&Shadow]) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        for s in shadows {
            put_shadow(&tx, s)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn put_setting(&self, s: &FleetSetting, kept: usize) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO fleet_settings (id, tenant, created_ms, doc) VALUES (?, ?, ?, ?)",
            params![s.id, s.tenant, s.created_ms, serde_json::to_string(s)?],
        )?;
        tx.execute(
            "DELETE FROM fleet_settings WHERE id NOT IN \
             (SELECT id FROM fleet_settings ORDER BY created_ms DESC, id DESC LIMIT ?)",
            params![i64::try_from(kept).unwrap_or(i64::MAX)],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn get_setting(&self, id: &str) -> Result<Option<FleetSetting>> {
        let c = self.conn.lock();
        let doc: Option<String> = c
            .query_row(
                "SELECT doc FROM fleet_settings WHERE id = ?",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(doc.map(|d| serde_json::from_str(&d)).transpose()?)
    }

    fn list_settings(&self, tenant: Option<&str>, limit: usize) -> Result<Vec<FleetSetting>> {
        let c = self.conn.lock();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut st = c.prepare(
            "SELECT doc FROM fleet_settings WHERE (?1 IS NULL OR tenant = ?1) \
             ORDER BY created_ms DESC, id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![tenant, limit], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for doc in rows {
            out.push(serde_json::from_str(&doc?)?);
        }
        Ok(out)
    }

    fn put_artifact(&self, a: &Artifact) -> Result<()> {
        self.exec(
            "INSERT INTO ota_artifacts (id, tenant, doc) VALUES (?, ?, ?)",
            params![a.id, a.tenant, serde_json::to_string(a)?],
        )?;
        Ok(())
    }

    fn delete_artifact(&self, id: &str) -> Result<()> {
        self.exec_one(
            "artifact",
            "DELETE FROM ota_artifacts WHERE id = ?",
            params![id],
        )
    }

    fn put_campaign(&self, camp: &Campaign, jobs: &[Job]) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.prepare_cached(
            "INSERT INTO ota_campaigns (id, tenant, doc) VALUES (?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
        )?
        .execute(params![camp.id, camp.tenant, serde_json::to_string(camp)?])?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO ota_jobs (campaign_id, device_id, state, doc) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (campaign_id, device_id) DO UPDATE SET state = excluded.state, doc = excluded.doc",
            )?;
            for j in jobs {
                st.execute(params![
                    j.campaign_id,
                    j.device_id,
                    j.state.as_str(),
                    serde_json::to_string(j)?
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn is_shared(&self) -> bool {
        self.shared
    }

    fn load_ota(&self) -> Result<(Vec<Artifact>, Vec<Campaign>, Vec<Job>)> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        let out = (
            docs(&tx, "SELECT doc FROM ota_artifacts")?,
            docs(&tx, "SELECT doc FROM ota_campaigns")?,
            docs(&tx, "SELECT doc FROM ota_jobs")?,
        );
        tx.commit()?;
        Ok(out)
    }

    fn stored_campaign(&self, id: &str) -> Result<Option<(Campaign, Vec<Job>)>> {
        let c = self.conn.lock();
        let doc: Option<String> = c
            .query_row(
                "SELECT doc FROM ota_campaigns WHERE id = ?",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(doc) = doc else {
            return Ok(None);
        };
        let mut st = c.prepare_cached("SELECT doc FROM ota_jobs WHERE campaign_id = ?")?;
        let rows = st.query_map(params![id], |r| r.get::<_, String>(0))?;
        let mut jobs = Vec::new();
        for j in rows {
            jobs.push(serde_json::from_str(&j?)?);
        }
        Ok(Some((serde_json::from_str(&doc)?, jobs)))
    }

    fn stored_job(&self, campaign_id: &str, device_id: &str) -> Result<Option<Job>> {
        let doc: Option<String> = self
            .conn
            .lock()
            .query_row(
                "SELECT doc FROM ota_jobs WHERE campaign_id = ? AND device_id = ?",
                params![campaign_id, device_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(doc.map(|d| serde_json::from_str(&d)).transpose()?)
    }

    fn put_campaign_if(
        &self,
        campaign: Option<(&Campaign, i64)>,
        jobs: &[(&Job, &Job)],
    ) -> Result<bool> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        if let Some((camp, prev_ms)) = campaign {
            let n = tx
                .prepare_cached(
                    "UPDATE ota_campaigns SET doc = ? WHERE id = ? \
                     AND json_extract(doc, '$.updated_ms') = ?",
                )?
                .execute(params![serde_json::to_string(camp)?, camp.id, prev_ms])?;
            if n != 1 {
                return Ok(false); // dropped: rolled back
            }
        }
        {
            let mut st = tx.prepare_cached(
                "UPDATE ota_jobs SET state = ?, doc = ? \
                 WHERE campaign_id = ? AND device_id = ? AND doc = ?",
            )?;
            for (j, read) in jobs {
                let n = st.execute(params![
                    j.state.as_str(),
                    serde_json::to_string(j)?,
                    j.campaign_id,
                    j.device_id,
                    serde_json::to_string(read)?
                ])?;
                if n != 1 {
                    return Ok(false);
                }
            }
        }
        tx.commit()?;
        Ok(true)
    }

    fn delete_shadow(&self, device_id: &str, name: &str) -> Result<()> {
        self.exec_one(
            "shadow",
            "DELETE FROM shadows WHERE device_id = ? AND name = ?",
            params![device_id, name],
        )
    }

    fn insert_diagnostic(&self, b: &DiagnosticBundle) -> Result<()> {
        self.exec(
            &format!(
                "INSERT INTO diagnostics ({DIAGNOSTIC_COLUMNS}) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            params![
                b.id,
                b.tenant,
                b.device_id,
                b.status.as_str(),
                b.requested_by,
                b.requested_ms,
                b.uploaded_ms,
                b.size.map(i64_of).transpose()?,
                b.sha256,
                b.reason,
                b.error,
                b.token_hash,
                b.expires_ms
            ],
        )?;
        Ok(())
    }

    fn update_diagnostic(&self, b: &DiagnosticBundle) -> Result<()> {
        self.exec_one(
            "diagnostic bundle",
            "UPDATE diagnostics SET status = ?, requested_by = ?, requested_ms = ?, uploaded_ms = ?, \
             size = ?, sha256 = ?, reason = ?, error = ?, expires_ms = ? WHERE id = ?",
            params![
                b.status.as_str(),
                b.requested_by,
                b.requested_ms,
                b.uploaded_ms,
                b.size.map(i64_of).transpose()?,
                b.sha256,
                b.reason,
                b.error,
                b.expires_ms,
                b.id
            ],
        )
    }

    fn get_diagnostic(&self, id: &str) -> Result<Option<DiagnosticBundle>> {
        self.query_diagnostics("id = ?", params![id])
            .map(|v| v.into_iter().next())
    }

    fn find_diagnostic_by_token(&self, token_hash: &str) -> Result<Option<DiagnosticBundle>> {
        self.query_diagnostics("token_hash = ?", params![token_hash])
            .map(|v| v.into_iter().next())
    }

    fn list_diagnostics(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<DiagnosticBundle>> {
        self.query_diagnostics(
            "device_id = ?1 AND (?2 IS NULL OR tenant = ?2) \
             ORDER BY requested_ms DESC, id DESC LIMIT ?3",
            params![device_id, tenant, i64::try_from(limit).unwrap_or(i64::MAX)],
        )
    }

    fn delete_diagnostic(&self, id: &str) -> Result<()> {
        self.exec_one(
            "diagnostic bundle",
            "DELETE FROM diagnostics WHERE id = ?",
            params![id],
        )
    }

    fn diagnostics_due(
        &self,
        expired_at: i64,
        retained_until: i64,
    ) -> Result<Vec<DiagnosticBundle>> {
        self.query_diagnostics(
            "(status = 'requested' AND expires_ms <= ?1) \
             OR COALESCE(uploaded_ms, expires_ms) <= ?2",
            params![expired_at, retained_until],
        )
    }

    fn put_dashboard(&self, d: &Dashboard) -> Result<()> {
        self.exec(
            "INSERT INTO dashboards (id, tenant, doc) VALUES (?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, doc = excluded.doc",
            params![d.id, d.tenant, serde_json::to_string(d)?],
        )?;
        Ok(())
    }

    fn get_dashboard(&self, id: &str) -> Result<Option<Dashboard>> {
        let c = self.conn.lock();
        let doc: Option<String> = c
            .query_row(
                "SELECT doc FROM dashboards WHERE id = ?",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(doc.map(|d| serde_json::from_str(&d)).transpose()?)
    }

    fn list_dashboards(&self, tenant: Option<&str>) -> Result<Vec<Dashboard>> {
        let c = self.conn.lock();
        let mut st = c.prepare("SELECT doc FROM dashboards WHERE (?1 IS NULL OR tenant = ?1)")?;
        let rows = st.query_map(params![tenant], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for doc in rows {
            out.push(serde_json::from_str(&doc?)?);
        }
        Ok(out)
    }

    fn delete_dashboard(&self, id: &str) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.execute(
            "DELETE FROM dashboard_shares WHERE dashboard_id = ?",
            params![id],
        )?;
        tx.execute("DELETE FROM dashboards WHERE id = ?", params![id])?;
        tx.commit()?;
        Ok(())
    }

    fn put_dashboard_share(&self, s: &DashboardShare) -> Result<()> {
        self.exec(
            "INSERT INTO dashboard_shares (id, dashboard_id, token_hash, doc) VALUES (?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
            params![
                s.id,
                s.dashboard_id,
                s.token_hash,
                serde_json::to_string(s)?
            ],
        )?;
        Ok(())
    }

    fn list_dashboard_shares(&self, dashboard_id: &str) -> Result<Vec<DashboardShare>> {
        let c = self.conn.lock();
        let mut st =
            c.prepare("SELECT doc, token_hash FROM dashboard_shares WHERE dashboard_id = ?")?;
        let rows = st.query_map(params![dashboard_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (doc, hash) = row?;
            let mut s: DashboardShare = serde_json::from_str(&doc)?;
            s.token_hash = hash;
            out.push(s);
        }
        Ok(out)
    }

    fn find_dashboard_share(&self, token_hash: &str) -> Result<Option<DashboardShare>> {
        let c = self.conn.lock();
        let doc: Option<String> = c
            .query_row(
                "SELECT doc FROM dashboard_shares WHERE token_hash = ?",
                params![token_hash],
                |r| r.get(0),
            )
            .optional()?;
        let Some(doc) = doc else { return Ok(None) };
        let mut s: DashboardShare = serde_json::from_str(&doc)?;
        s.token_hash = token_hash.to_string();
        Ok(Some(s))
    }

    fn put_report(&self, r: &Report) -> Result<()> {
        self.exec(
            "INSERT INTO reports (id, tenant, doc) VALUES (?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, doc = excluded.doc",
            params![r.id, r.tenant, serde_json::to_string(r)?],
        )?;
        Ok(())
    }

    fn claim_report_run(&self, id: &str, due_ms: i64, next_run_ms: Option<i64>) -> Result<bool> {
        let mut c = self.conn.lock();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let doc: Option<String> = tx
            .query_row("SELECT doc FROM reports WHERE id = ?", params![id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(doc) = doc else { return Ok(false) };
        let mut r: Report = serde_json::from_str(&doc)?;
        if r.next_run_ms != Some(due_ms) {
            return Ok(false);
        }
        r.next_run_ms = next_run_ms;
        tx.execute(
            "UPDATE reports SET doc = ? WHERE id = ?",
            params![serde_json::to_string(&r)?, id],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn delete_report(&self, id: &str) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM report_runs WHERE report_id = ?", params![id])?;
        execute_one(
            &tx,
            "report",
            "DELETE FROM reports WHERE id = ?",
            params![id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn list_reports(&self) -> Result<Vec<Report>> {
        docs(&self.conn.lock(), "SELECT doc FROM reports")
    }

    fn put_report_run(&self, run: &ReportRun) -> Result<()> {
        self.exec(
            "INSERT INTO report_runs (id, report_id, started_ms, doc) VALUES (?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
            params![
                run.id,
                run.report_id,
                run.started_ms,
                serde_json::to_string(run)?
            ],
        )?;
        Ok(())
    }

    fn list_report_runs(&self, report_id: &str, limit: usize) -> Result<Vec<ReportRun>> {
        let c = self.conn.lock();
        let mut st = c.prepare_cached(
            "SELECT doc FROM report_runs WHERE report_id = ? \
             ORDER BY started_ms DESC, id DESC LIMIT ?",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st.query_map(params![report_id, limit], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for doc in rows {
            out.push(serde_json::from_str(&doc?)?);
        }
        Ok(out)
    }

    fn delete_report_runs(&self, ids: &[String]) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        for id in ids {
            tx.execute("DELETE FROM report_runs WHERE id = ?", params![id])?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl SqliteFleetStore {
    /// Diagnostic bundles `WHERE <cond>` (which may end in ORDER/LIMIT).
    fn query_diagnostics(
        &self,
        cond: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<DiagnosticBundle>> {
        let c = self.conn.lock();
        let mut st = c.prepare(&format!(
            "SELECT {DIAGNOSTIC_COLUMNS} FROM diagnostics WHERE {cond}"
        ))?;
        let rows = st.query_map(p, |r| {
            Ok((
                DiagnosticBundle {
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    device_id: r.get(2)?,
                    status: crate::diagnostic::BundleStatus::Requested,
                    requested_by: r.get(4)?,
                    requested_ms: r.get(5)?,
                    uploaded_ms: r.get(6)?,
                    size: None,
                    sha256: r.get(8)?,
                    reason: r.get(9)?,
                    error: r.get(10)?,
                    token_hash: r.get(11)?,
                    expires_ms: r.get(12)?,
                },
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut b, status, size) = row?;
            b.status = status
                .parse()
                .map_err(|_| corrupt("diagnostic bundle status"))?;
            b.size = size
                .map(|s| u64_of(s, "diagnostic bundle size"))
                .transpose()?;
            out.push(b);
        }
        Ok(out)
    }
}

/// Every row of a one-column query of JSON documents, decoded.
fn docs<T: serde::de::DeserializeOwned>(c: &Connection, sql: &str) -> Result<Vec<T>> {
    let mut st = c.prepare(sql)?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for doc in rows {
        out.push(serde_json::from_str(&doc?)?);
    }
    Ok(out)
}

fn put_shadow(c: &Connection, s: &Shadow) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO shadows (device_id, name, tenant, desired, reported, metadata, version, updated_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, name) DO UPDATE SET \
         tenant = excluded.tenant, desired = excluded.desired, reported = excluded.reported, \
         metadata = excluded.metadata, version = excluded.version, updated_ms = excluded.updated_ms",
    )?
    .execute(params![
        s.device_id,
        s.name,
        s.tenant,
        serde_json::to_string(&s.desired)?,
        serde_json::to_string(&s.reported)?,
        serde_json::to_string(&s.metadata)?,
        i64_of(s.version)?,
        s.updated_ms
    ])?;
    Ok(())
}
