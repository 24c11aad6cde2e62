//! The writer thread: group commit into PostgreSQL.
//!
//! Appenders queue batches and hold tickets. The writer takes everything
//! queued (up to a bound), makes sure the batch's series have rows and its
//! days have partitions, then writes it in one transaction: one binary
//! `COPY` of the points, one upsert of the 1 min rollups, one of the 1 h
//! rollups and one of the latest values. Only after `COMMIT` returns does
//! it resolve the tickets, so a device's acknowledgement means the point is
//! in the database (with `synchronous_commit`, on its disk). While one
//! transaction runs the queue fills, so the next group is larger: the cost
//! of a round trip is shared by however many appends arrived during it.

use super::catalog::{Batch, Known};
use super::partition::{self, Days};
use super::Shared;
use crate::connection::Link;
use crate::error::PgResult;
use m2mhub_tsdb::{Agg, Completion, Kind, TsdbError, Value, HOUR, MINUTE};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

/// Points one group takes before it is committed, which bounds a
/// transaction's latency and memory.
const GROUP_POINTS: usize = 128 * 1024;

/// Points of one `points.seq` base: a group takes one base per this many.
const SEQ_SPAN: i64 = 1 << 24;

pub(crate) struct Pending {
    pub batch: Batch,
    pub done: Completion,
}

pub(crate) enum Cmd {
    Append(Pending),
    /// Answered once everything queued before it is committed (or failed).
    Barrier(SyncSender<()>),
    Stop,
}

/// One point as stored.
struct Row {
    series: i32,
    ts: i64,
    value: Option<f64>,
    text: Option<Arc<str>>,
}

pub(crate) fn run(mut link: Link, shared: &Shared, rx: Receiver<Cmd>) {
    let mut days = Days::default();
    loop {
        let Ok(first) = rx.recv() else {
            return;
        };
        let mut group = Vec::new();
        let mut barriers = Vec::new();
        let mut stop = false;
        let mut points = 0usize;
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Append(p) => {
                    points += p.batch.points.len();
                    group.push(p);
                }
                Cmd::Barrier(reply) => barriers.push(reply),
                Cmd::Stop => stop = true,
            }
            if !stop && points < GROUP_POINTS {
                next = rx.try_recv().ok();
            }
        }
        if !group.is_empty() {
            commit(&mut link, shared, &mut days, group);
        }
        for b in barriers {
            // The flusher may have given up waiting.
            let _ = b.send(());
        }
        if stop {
            return;
        }
    }
}

fn commit(link: &mut Link, shared: &Shared, days: &mut Days, group: Vec<Pending>) {
    let result = write_group(link, shared, days, &group);
    let c = &shared.counters;
    match &result {
        Ok(n) => {
            c.commits.fetch_add(1, Ordering::Relaxed);
            c.points_appended.fetch_add(*n, Ordering::Relaxed);
        }
        Err(e) => {
            c.write_errors.fetch_add(1, Ordering::Relaxed);
            // A partition may have been dropped by another node's retention
            // meanwhile: look again next time.
            *days = Days::default();
            tracing::error!(error = %e, appends = group.len(), "cannot write telemetry to PostgreSQL");
        }
    }
    let result = result.map(|_| ());
    for p in group {
        p.done.complete(result.clone());
    }
}

/// Write one group; the number of points committed.
fn write_group(
    link: &mut Link,
    shared: &Shared,
    days: &mut Days,
    group: &[Pending],
) -> Result<u64, TsdbError> {
    resolve_series(link, shared, group)?;
    let rows = rows(shared, group);
    if rows.is_empty() {
        return Ok(0);
    }
    let window = partition::window(m2mhub_identity::now_ms(), &shared.retention.read());
    let mut wanted: Vec<i64> = rows
        .iter()
        .map(|r| partition::day_of(r.ts))
        .filter(|d| window.contains(d) && !days.has(*d))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    if !wanted.is_empty() {
        link.call(|c| {
            for d in &wanted {
                partition::ensure(c, *d)?;
            }
            Ok(())
        })
        .map_err(super::tsdb_error)?;
        for d in wanted {
            days.add(d);
        }
    }
    let summary = summarize(&rows);
    let bytes: u64 = rows
        .iter()
        .map(|r| 28 + r.text.as_ref().map_or(8, |t| t.len() as u64))
        .sum();
    link.call(|c| {
        let mut tx = c.transaction()?;
        copy_points(&mut tx, &rows)?;
        upsert_rollups(&mut tx, "rollup_1m", &summary.minute)?;
        upsert_rollups(&mut tx, "rollup_1h", &summary.hour)?;
        upsert_latest(&mut tx, &summary.latest)?;
        tx.commit()?;
        Ok(())
    })
    .map_err(super::tsdb_error)?;
    shared.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
    Ok(rows.len() as u64)
}

/// Give every series of the group an id: insert the new ones (another node
/// may have inserted them first: then its kind is the series' kind).
fn resolve_series(link: &mut Link, shared: &Shared, group: &[Pending]) -> Result<(), TsdbError> {
    // (tenant, device, metric, kind) of the series without a row yet.
    type New = (Arc<str>, Arc<str>, Arc<str>, Kind);
    let mut missing: Vec<New> = Vec::new();
    {
        let cat = shared.catalog.read();
        for p in group {
            let b = &p.batch;
            for bp in b.points.iter().filter(|bp| bp.id.is_none()) {
                if let Some(Known { id: None, kind }) = cat.get(&b.tenant, &b.device, &bp.metric) {
                    missing.push((b.tenant.clone(), b.device.clone(), bp.metric.clone(), kind));
                }
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // Sorted, so that two nodes inserting the same new series lock them in
    // the same order.
    missing.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
    missing.dedup_by(|a, b| (&a.0, &a.1, &a.2) == (&b.0, &b.1, &b.2));
    let found = link
        .call(|c| {
            let tenants: Vec<&str> = missing.iter().map(|m| &*m.0).collect();
            let devices: Vec<&str> = missing.iter().map(|m| &*m.1).collect();
            let metrics: Vec<&str> = missing.iter().map(|m| &*m.2).collect();
            let kinds: Vec<i16> = missing.iter().map(|m| i16::from(m.3.code())).collect();
            c.execute(
                "INSERT INTO series (tenant, device, metric, kind, created_ms)
                 SELECT t, d, m, k, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[])
                     AS u(t, d, m, k)
                 ON CONFLICT (tenant, device, metric) DO NOTHING",
                &[
                    &tenants,
                    &devices,
                    &metrics,
                    &kinds,
                    &m2mhub_identity::now_ms(),
                ],
            )?;
            let rows = c.query(
                "SELECT s.id, s.kind, s.tenant, s.device, s.metric FROM series s
                 JOIN unnest($1::text[], $2::text[], $3::text[]) AS u(t, d, m)
                   ON s.tenant = u.t AND s.device = u.d AND s.metric = u.m",
                &[&tenants, &devices, &metrics],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let kind: i16 = r.try_get(1)?;
                out.push((
                    r.try_get::<_, i32>(0)?,
                    kind,
                    r.try_get::<_, String>(2)?,
                    r.try_get::<_, String>(3)?,
                    r.try_get::<_, String>(4)?,
                ));
            }
            PgResult::Ok(out)
        })
        .map_err(super::tsdb_error)?;
    let mut cat = shared.catalog.write();
    for (id, kind, tenant, device, metric) in found {
        let Some(kind) = u8::try_from(kind).ok().and_then(Kind::from_code) else {
            continue;
        };
        cat.set(&tenant, &device, &metric, Known { id: Some(id), kind });
    }
    Ok(())
}

/// The group's points as rows; points whose series turned out (from the
/// database) to be of another kind are dropped and counted.
fn rows(shared: &Shared, group: &[Pending]) -> Vec<Row> {
    let cat = shared.catalog.read();
    let mut rows = Vec::with_capacity(group.iter().map(|p| p.batch.points.len()).sum());
    let mut dropped = 0u64;
    for p in group {
        let b = &p.batch;
        for bp in &b.points {
            let series = match bp.id {
                Some(id) => id,
                // Resolved by now, unless the series' insert failed.
                None => match cat.get(&b.tenant, &b.device, &bp.metric) {
                    Some(Known { id: Some(id), kind }) if kind.accepts(&bp.value) => id,
                    Some(Known { id: Some(_), kind }) => {
                        tracing::warn!(
                            tenant = %b.tenant, device = %b.device,
                            reason = %kind.refusal(&bp.metric, &bp.value),
                            "a point is dropped: another node created its series with another kind"
                        );
                        dropped += 1;
                        continue;
                    }
                    _ => {
                        dropped += 1;
                        continue;
                    }
                },
            };
            let value = &bp.value;
            let (value, text) = match value {
                Value::F64(x) => (Some(*x), None),
                Value::Bool(x) => (Some(if *x { 1.0 } else { 0.0 }), None),
                Value::Str(s) => (None, Some(s.clone())),
            };
            rows.push(Row {
                series,
                ts: bp.ts,
                value,
                text,
            });
        }
    }
    shared
        .counters
        .points_rejected
        .fetch_add(dropped, Ordering::Relaxed);
    rows
}

/// What a group adds to the rollup and latest tables, each sorted by key
/// (the upserts lock rows in this order on every node, so two nodes
/// cannot deadlock).
struct Summary<'a> {
    minute: Vec<((i32, i64), Agg)>,
    hour: Vec<((i32, i64), Agg)>,
    /// The newest point of each series (a later point wins a tie, as in
    /// the embedded store).
    latest: Vec<&'a Row>,
}

/// One pass over the rows in (series, timestamp) order — stable, so
/// points with equal timestamps keep their arrival order and first/last
/// break ties as [`Agg`] does — instead of a hash map per table.
fn summarize(rows: &[Row]) -> Summary<'_> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| {
        let r = &rows[i];
        (r.series, r.ts)
    });
    let mut s = Summary {
        minute: Vec::new(),
        hour: Vec::new(),
        latest: Vec::new(),
    };
    for i in order {
        let r = &rows[i];
        match s.latest.last_mut() {
            Some(l) if l.series == r.series => *l = r,
            _ => s.latest.push(r),
        }
        let Some(v) = r.value else { continue };
        for (out, width) in [(&mut s.minute, MINUTE), (&mut s.hour, HOUR)] {
            let key = (r.series, r.ts.div_euclid(width) * width);
            match out.last_mut() {
                Some((k, a)) if *k == key => a.add(r.ts, v),
                _ => out.push((key, Agg::of(r.ts, v))),
            }
        }
    }
    s
}

fn copy_points(tx: &mut postgres::Transaction<'_>, rows: &[Row]) -> PgResult<()> {
    let bases = (rows.len() as i64 + SEQ_SPAN - 1) / SEQ_SPAN;
    let bases: Vec<i64> = tx
        .query(
            "SELECT nextval('batch_seq') FROM generate_series(1, $1::bigint)",
            &[&bases],
        )?
        .iter()
        .map(|r| r.try_get::<_, i64>(0))
        .collect::<Result<_, _>>()?;
    let sink =
        tx.copy_in("COPY points (series_id, ts, seq, value, text) FROM STDIN (FORMAT binary)")?;
    let mut w = BinaryCopyInWriter::new(
        sink,
        &[Type::INT4, Type::INT8, Type::INT8, Type::FLOAT8, Type::TEXT],
    );
    for (i, r) in rows.iter().enumerate() {
        let i = i as i64;
        let base = bases.get((i / SEQ_SPAN) as usize).copied().unwrap_or(0);
        let seq = base.saturating_mul(SEQ_SPAN) + i % SEQ_SPAN;
        let text = r.text.as_deref();
        w.write(&[&r.series, &r.ts, &seq, &r.value, &text])?;
    }
    w.finish()?;
    Ok(())
}

/// Merge the group's partial aggregates into a rollup table. `min`/`max`
/// skip NaN as `f64::min`/`max` do (PostgreSQL orders NaN above every
/// number), so one broken reading does not hide a bucket's extremes.
fn upsert_rollups(
    tx: &mut postgres::Transaction<'_>,
    table: &str,
    rows: &[((i32, i64), Agg)],
) -> PgResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&Agg) -> f64| rows.iter().map(|(_, a)| f(a)).collect::<Vec<f64>>();
    let series: Vec<i32> = rows.iter().map(|((s, _), _)| *s).collect();
    let buckets: Vec<i64> = rows.iter().map(|((_, b), _)| *b).collect();
    let counts: Vec<i64> = rows
        .iter()
        .map(|(_, a)| i64::try_from(a.count).unwrap_or(i64::MAX))
        .collect();
    let first_ts: Vec<i64> = rows.iter().map(|(_, a)| a.first_ts).collect();
    let last_ts: Vec<i64> = rows.iter().map(|(_, a)| a.last_ts).collect();
    let (sum, min, max, first, last) = (
        col(|a| a.sum),
        col(|a| a.min),
        col(|a| a.max),
        col(|a| a.first),
        col(|a| a.last),
    );
    let params: [&(dyn ToSql + Sync); 10] = [
        &series, &buckets, &counts, &sum, &min, &max, &first_ts, &first, &last_ts, &last,
    ];
    tx.execute(
        &format!(
            "INSERT INTO {table} AS r
                 (series_id, bucket, count, sum, min, max, first_ts, first, last_ts, last)
             SELECT * FROM unnest($1::int4[], $2::int8[], $3::int8[], $4::float8[], $5::float8[],
                                  $6::float8[], $7::int8[], $8::float8[], $9::int8[], $10::float8[])
             ON CONFLICT (series_id, bucket) DO UPDATE SET
                 count = r.count + excluded.count,
                 sum = r.sum + excluded.sum,
                 min = CASE WHEN r.min = 'NaN' OR (excluded.min <> 'NaN' AND excluded.min < r.min)
                            THEN excluded.min ELSE r.min END,
                 max = CASE WHEN r.max = 'NaN' OR (excluded.max <> 'NaN' AND excluded.max > r.max)
                            THEN excluded.max ELSE r.max END,
                 first_ts = CASE WHEN excluded.first_ts < r.first_ts
                                 THEN excluded.first_ts ELSE r.first_ts END,
                 first = CASE WHEN excluded.first_ts < r.first_ts
                              THEN excluded.first ELSE r.first END,
                 last_ts = CASE WHEN excluded.last_ts >= r.last_ts
                                THEN excluded.last_ts ELSE r.last_ts END,
                 last = CASE WHEN excluded.last_ts >= r.last_ts
                             THEN excluded.last ELSE r.last END"
        ),
        &params,
    )?;
    Ok(())
}

fn upsert_latest(tx: &mut postgres::Transaction<'_>, rows: &[&Row]) -> PgResult<()> {
    let series: Vec<i32> = rows.iter().map(|r| r.series).collect();
    let ts: Vec<i64> = rows.iter().map(|r| r.ts).collect();
    let values: Vec<Option<f64>> = rows.iter().map(|r| r.value).collect();
    let texts: Vec<Option<&str>> = rows.iter().map(|r| r.text.as_deref()).collect();
    tx.execute(
        "INSERT INTO latest AS l (series_id, ts, value, text)
         SELECT * FROM unnest($1::int4[], $2::int8[], $3::float8[], $4::text[])
         ON CONFLICT (series_id) DO UPDATE
             SET ts = excluded.ts, value = excluded.value, text = excluded.text
             WHERE excluded.ts >= l.ts",
        &[&series, &ts, &values, &texts],
    )?;
    Ok(())
}
