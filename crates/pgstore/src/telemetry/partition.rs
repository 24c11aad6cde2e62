//! Day partitions, retention and the maintenance thread.
//!
//! `points` is range-partitioned on its millisecond timestamp, one table
//! per UTC day named `points_YYYYMMDD`, so that retention is a `DROP
//! TABLE` — no dead rows, no vacuum — and a query for an hour touches one
//! day's index. Days are created ahead (yesterday to a week ahead) by the
//! maintenance pass and on demand by the writer, for days inside the
//! *window*: from the longest retention (at most [`PAST_DAYS`]) back to
//! [`AHEAD_DAYS`] ahead. Points outside it go to the default partition
//! `points_outside`, so a device with a broken clock cannot make a table
//! per reading; when a day enters the window its rows are moved out of the
//! default partition as its table is attached. Creating and dropping run
//! under an advisory lock, so nodes do not race each other.
//!
//! Retention: partitions whose day ended before the longest retention are
//! dropped (every pass, each minute); series with a shorter rule of their
//! own (tenant or metric) lose their older rows by `DELETE`, and rollup
//! rows go when their whole bucket is past their series' retention (hourly,
//! and on `flush`). Queries hide expired points at once, whatever the
//! passes have done yet.

use super::Shared;
use crate::connection::Connection;
use crate::error::PgResult;
use m2mhub_tsdb::{Retention, RetentionRule, SeriesKey, TsdbError, HOUR, MINUTE};
use postgres::Client;
use std::collections::{BTreeMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub(crate) const DAY: i64 = 86_400_000;
/// Days kept in partitions of their own when nothing is expired sooner.
pub(crate) const PAST_DAYS: i64 = 400;
/// Days ahead of today that get partitions.
pub(crate) const AHEAD_DAYS: i64 = 7;
/// The advisory lock for creating, attaching and dropping partitions
/// ("m2mpart" in ASCII).
const PARTITION_LOCK: i64 = 0x006d_326d_7061_7274;

pub(crate) fn day_of(ts: i64) -> i64 {
    ts.div_euclid(DAY)
}

/// The days that get partitions of their own now.
pub(crate) fn window(now_ms: i64, r: &Retention) -> RangeInclusive<i64> {
    let today = day_of(now_ms);
    let past = match r.longest() {
        Some(keep) => {
            let days = i64::try_from(keep.as_millis() / DAY as u128).unwrap_or(i64::MAX);
            days.saturating_add(1).min(PAST_DAYS)
        }
        None => PAST_DAYS,
    };
    today - past..=today + AHEAD_DAYS
}

/// Days the writer knows have partitions.
#[derive(Default)]
pub(crate) struct Days(HashSet<i64>);

impl Days {
    pub fn has(&self, d: i64) -> bool {
        self.0.contains(&d)
    }
    pub fn add(&mut self, d: i64) {
        self.0.insert(d);
    }
}

/// `(year, month, day)` of a day number (days since 1970-01-01), proleptic
/// Gregorian (H. Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The day number of a date (`days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(crate) fn part_name(day: i64) -> String {
    let (y, m, d) = civil(day);
    format!("points_{y:04}{m:02}{d:02}")
}

/// The day of a partition's name, if it is one of ours.
fn part_day(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("points_")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    let day = days_from_civil(n / 10_000, n / 100 % 100, n % 100);
    (part_name(day) == name).then_some(day)
}

/// Make sure day `day` has its partition, moving its rows out of the
/// default partition if it had some.
pub(crate) fn ensure(c: &mut Client, day: i64) -> PgResult<()> {
    let name = part_name(day);
    let (lo, hi) = (day * DAY, (day + 1) * DAY);
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])?;
    let exists: bool = tx
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("telemetry.{name}")],
        )?
        .try_get(0)?;
    if !exists {
        tx.batch_execute(&format!(
            "CREATE TABLE telemetry.{name} (LIKE telemetry.points INCLUDING DEFAULTS);
             WITH moved AS (
                 DELETE FROM telemetry.points_outside WHERE ts >= {lo} AND ts < {hi}
                 RETURNING series_id, ts, seq, value, text
             ) INSERT INTO telemetry.{name} SELECT * FROM moved;
             ALTER TABLE telemetry.points ATTACH PARTITION telemetry.{name}
                 FOR VALUES FROM ({lo}) TO ({hi});"
        ))?;
        tracing::debug!(partition = %name, "telemetry partition created");
    }
    tx.commit()?;
    Ok(())
}

/// Our partitions, by day.
fn partitions(c: &mut Client) -> PgResult<BTreeMap<i64, String>> {
    let rows = c.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'telemetry.points'::regclass",
        &[],
    )?;
    let mut out = BTreeMap::new();
    for r in rows {
        let name: String = r.try_get(0)?;
        if let Some(d) = part_day(&name) {
            out.insert(d, name);
        }
    }
    Ok(out)
}

pub(crate) fn load_rules(c: &mut Client) -> PgResult<Vec<RetentionRule>> {
    let rows = c.query(
        "SELECT tenant, metric, keep_ms FROM telemetry.retention_rules ORDER BY position",
        &[],
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let keep: Option<i64> = r.try_get(2)?;
        out.push(RetentionRule {
            tenant: r.try_get(0)?,
            metric: r.try_get(1)?,
            keep: keep.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        });
    }
    Ok(out)
}

pub(crate) fn save_rules(c: &mut Client, rules: &[RetentionRule]) -> PgResult<()> {
    let mut tx = c.transaction()?;
    tx.execute("DELETE FROM telemetry.retention_rules", &[])?;
    for (i, r) in rules.iter().enumerate() {
        let keep = r
            .keep
            .map(|k| i64::try_from(k.as_millis()).unwrap_or(i64::MAX));
        tx.execute(
            "INSERT INTO telemetry.retention_rules (position, tenant, metric, keep_ms)
             VALUES ($1, $2, $3, $4)",
            &[
                &i32::try_from(i).unwrap_or(i32::MAX),
                &r.tenant,
                &r.metric,
                &keep,
            ],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// How often the row-deleting part of retention (series kept for less than
/// the longest, rollup rows) runs on its own: it probes an index per
/// series, too much to repeat every minute; queries hide expired rows
/// meanwhile.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// One maintenance pass: the shared retention rules, partitions ahead,
/// dropping expired partitions, figures; with `sweep`, the row deletes too.
fn pass(c: &mut Client, shared: &Shared, sweep: bool) -> PgResult<()> {
    let rules = load_rules(c)?;
    shared.retention.write().rules = rules;
    let retention = shared.retention.read().clone();
    let now = m2mhub_identity::now_ms();
    let window = window(now, &retention);
    let today = day_of(now);
    for d in (today - 1).max(*window.start())..=*window.end() {
        ensure(c, d)?;
    }
    let longest = retention.longest();
    if let Some(keep) = longest {
        let cutoff = now.saturating_sub(ms(keep));
        for (day, name) in partitions(c)? {
            if (day + 1) * DAY <= cutoff {
                let mut tx = c.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])?;
                tx.batch_execute(&format!("DROP TABLE IF EXISTS telemetry.{name}"))?;
                tx.commit()?;
                tracing::info!(partition = %name, "telemetry partition past retention dropped");
            }
        }
        c.execute(
            "DELETE FROM telemetry.points_outside WHERE ts < $1",
            &[&cutoff],
        )?;
    }
    // Series kept for less than the longest: their own older rows; every
    // series with a retention: its rollup rows past it.
    let mut by_keep: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
    let any_keep = retention.default.is_some() || retention.rules.iter().any(|r| r.keep.is_some());
    if sweep && any_keep {
        for r in c.query(
            "SELECT id, tenant, device, metric FROM telemetry.series",
            &[],
        )? {
            let key = SeriesKey {
                tenant: r.try_get::<_, &str>(1)?.into(),
                device: r.try_get::<_, &str>(2)?.into(),
                metric: r.try_get::<_, &str>(3)?.into(),
            };
            if let Some(keep) = retention.keep_for(&key) {
                by_keep.entry(ms(keep)).or_default().push(r.try_get(0)?);
            }
        }
    }
    for (keep, ids) in &by_keep {
        let floor = now.saturating_sub(*keep);
        if longest.is_none_or(|l| *keep < ms(l)) {
            c.execute(
                "DELETE FROM telemetry.points WHERE series_id = ANY($1) AND ts < $2",
                &[ids, &floor],
            )?;
        }
        for (table, width) in [("rollup_1m", MINUTE), ("rollup_1h", HOUR)] {
            c.execute(
                &format!(
                    "DELETE FROM telemetry.{table} WHERE series_id = ANY($1) AND bucket <= $2"
                ),
                &[ids, &floor.saturating_sub(width)],
            )?;
        }
    }
    figures(c, shared)
}

fn figures(c: &mut Client, shared: &Shared) -> PgResult<()> {
    let row = c.query_one(
        "SELECT (SELECT count(*) FROM telemetry.series),
                (SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry.points'::regclass),
                (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = 'telemetry' AND c.relkind = 'r')",
        &[],
    )?;
    let as_u64 = |v: i64| u64::try_from(v).unwrap_or(0);
    let c = &shared.counters;
    c.series.store(as_u64(row.try_get(0)?), Ordering::Relaxed);
    c.partitions
        .store(as_u64(row.try_get(1)?), Ordering::Relaxed);
    c.disk_bytes
        .store(as_u64(row.try_get(2)?), Ordering::Relaxed);
    Ok(())
}

pub(crate) enum MaintReq {
    /// A maintenance pass now.
    Pass,
}

pub(crate) enum MaintCmd {
    Run(MaintReq, SyncSender<Result<(), TsdbError>>),
    Stop,
}

/// Start the maintenance thread: a pass every `maintenance_interval` and
/// whenever asked.
pub(crate) fn start(
    conn: Connection,
    shared: Arc<Shared>,
    opts: &super::PgTelemetryOptions,
) -> Result<(SyncSender<MaintCmd>, JoinHandle<()>), TsdbError> {
    let (tx, rx) = mpsc::sync_channel::<MaintCmd>(16);
    let every = opts.maintenance_interval;
    let run = move |sweep: bool| {
        let sh = shared.clone();
        conn.run(move |c| pass(c, &sh, sweep))
            .map_err(super::tsdb_error)
    };
    let t = std::thread::Builder::new()
        .name("pg-telemetry-maint".into())
        .spawn(move || {
            let mut last_sweep: Option<Instant> = None;
            loop {
                match rx.recv_timeout(every) {
                    // Asked for (open, flush): everything, now.
                    Ok(MaintCmd::Run(MaintReq::Pass, reply)) => {
                        let r = run(true);
                        if r.is_ok() {
                            last_sweep = Some(Instant::now());
                        }
                        let _ = reply.send(r);
                    }
                    Ok(MaintCmd::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => {
                        let sweep = last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
                        match run(sweep) {
                            Ok(()) if sweep => last_sweep = Some(Instant::now()),
                            Ok(()) => {}
                            Err(e) => tracing::warn!(
                                error = %e,
                                "telemetry maintenance in PostgreSQL failed"
                            ),
                        }
                    }
                }
            }
        })
        .map_err(|e| TsdbError::Io(e.to_string()))?;
    Ok((tx, t))
}

/// Ask the maintenance thread for `req` and wait for it.
pub(crate) fn request(tx: &SyncSender<MaintCmd>, req: MaintReq) -> Result<(), TsdbError> {
    let (reply, answer) = mpsc::sync_channel(1);
    tx.send(MaintCmd::Run(req, reply))
        .map_err(|_| TsdbError::Closed)?;
    answer.recv().map_err(|_| TsdbError::Closed)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_are_dates_and_read_back() {
        assert_eq!(part_name(0), "points_19700101");
        assert_eq!(part_name(-1), "points_19691231");
        assert_eq!(part_name(20_428), "points_20251206");
        assert_eq!(part_name(11_016), "points_20000229");
        for d in [-800, -1, 0, 59, 60, 11_016, 20_428, 40_000] {
            assert_eq!(part_day(&part_name(d)), Some(d), "{d}");
        }
        for bad in [
            "points_outside",
            "points_20251301",
            "points_2025120",
            "rollup_1m",
        ] {
            assert_eq!(part_day(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_window_follows_the_longest_retention() {
        let now = 20_428 * DAY + 5;
        let forever = Retention::default();
        assert_eq!(
            window(now, &forever),
            20_428 - PAST_DAYS..=20_428 + AHEAD_DAYS
        );
        let week = Retention {
            default: Some(Duration::from_secs(7 * 86_400)),
            rules: Vec::new(),
        };
        assert_eq!(window(now, &week), 20_428 - 8..=20_428 + AHEAD_DAYS);
    }
}
