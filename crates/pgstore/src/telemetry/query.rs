//! Queries, with the embedded store's semantics (`tsdb/src/query.rs`):
//! the retention floor hides expired points, raw pages resume at a cursor
//! `(ts, skip)`, aggregates of whole-minute or whole-hour buckets read the
//! rollup rows for the buckets wholly inside the range and raw points only
//! for the ragged edges, and listings are sorted by byte order (not by the
//! server's collation).

use super::catalog::Known;
use super::PgTelemetryStore;
use crate::error::PgResult;
use m2mhub_tsdb::{
    Agg, AggQuery, AggSources, Bucketer, Cursor, Kind, Latest, OutPoint, RawPage, RawQuery,
    SeriesBuckets, SeriesInfo, SeriesKey, TsdbError, Value, HOUR, MAX_PAGE,
};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::Client;
use std::sync::Arc;

fn kind_of(code: i16) -> Result<Kind, TsdbError> {
    u8::try_from(code)
        .ok()
        .and_then(Kind::from_code)
        .ok_or_else(|| TsdbError::Corrupt(format!("a telemetry series of unknown kind {code}")))
}

/// A stored value as its series' kind reads it.
fn value_of(kind: Kind, value: Option<f64>, text: Option<String>) -> Value {
    match (kind, value, text) {
        (Kind::Text, _, Some(s)) => Value::Str(s.into()),
        (Kind::Bool, Some(x), _) => Value::Bool(x != 0.0),
        (_, Some(x), _) => Value::F64(x),
        (_, None, text) => Value::Str(text.unwrap_or_default().into()),
    }
}

impl PgTelemetryStore {
    /// Earliest timestamp still visible under retention.
    fn retention_floor(&self, key: &SeriesKey) -> i64 {
        match self.shared.retention.read().keep_for(key) {
            Some(keep) => m2mhub_identity::now_ms()
                .saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX)),
            None => i64::MIN,
        }
    }

    /// The id and kind of a series: from the node's cache when it has the
    /// id (ids and kinds never change), else from the database.
    fn lookup(
        &self,
        tenant: &str,
        device: &str,
        metric: &str,
    ) -> Result<Option<(i32, Kind)>, TsdbError> {
        if let Some(Known { id: Some(id), kind }) =
            self.shared.catalog.read().get(tenant, device, metric)
        {
            return Ok(Some((id, kind)));
        }
        let (t, d, m) = (tenant.to_string(), device.to_string(), metric.to_string());
        let row = self.read(move |c| {
            let row = c.query_opt(
                "SELECT id, kind FROM series WHERE tenant = $1 AND device = $2 AND metric = $3",
                &[&t, &d, &m],
            )?;
            Ok(match row {
                Some(r) => Some((r.try_get::<_, i32>(0)?, r.try_get::<_, i16>(1)?)),
                None => None,
            })
        })?;
        row.map(|(id, k)| Ok((id, kind_of(k)?))).transpose()
    }
}

pub(crate) fn raw(s: &PgTelemetryStore, q: &RawQuery<'_>) -> Result<RawPage, TsdbError> {
    let limit = q.limit.clamp(1, MAX_PAGE);
    let empty = |kind| RawPage {
        kind,
        points: Vec::new(),
        next: None,
    };
    let Some((id, kind)) = s.lookup(q.tenant, q.device, q.metric)? else {
        return Ok(empty(Kind::Float));
    };
    let key = SeriesKey {
        tenant: q.tenant.into(),
        device: q.device.into(),
        metric: q.metric.into(),
    };
    let mut from = q.from_ms.max(s.retention_floor(&key));
    let mut skip = 0i64;
    if let Some(c) = q.after {
        if c.ts_ms >= from {
            from = c.ts_ms;
            skip = i64::from(c.skip);
        }
    }
    let to = q.to_ms;
    if from >= to {
        return Ok(empty(kind));
    }
    // `start`: how many points at exactly `from` the cursor skips (no more
    // than there are, as the embedded store counts them).
    let want = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
    let (start, rows) = s.read(move |c| {
        let rows = c.query(
            "WITH s AS (
                 SELECT LEAST($4::bigint, count(*)) AS n FROM points WHERE series_id = $1 AND ts = $2
             )
             SELECT (SELECT n FROM s), ts, value, text FROM points
             WHERE series_id = $1 AND ts >= $2 AND ts < $3
             ORDER BY ts, seq
             OFFSET (SELECT n FROM s) LIMIT $5",
            &[&id, &from, &to, &skip, &want],
        )?;
        let mut start = 0i64;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            start = r.try_get(0)?;
            out.push((
                r.try_get::<_, i64>(1)?,
                r.try_get::<_, Option<f64>>(2)?,
                r.try_get::<_, Option<String>>(3)?,
            ));
        }
        PgResult::Ok((start, out))
    })?;
    let more = rows.len() > limit;
    let points: Vec<OutPoint> = rows
        .into_iter()
        .take(limit)
        .map(|(ts_ms, v, t)| OutPoint {
            ts_ms,
            value: value_of(kind, v, t),
        })
        .collect();
    let next = if more {
        Cursor::after_page(&points, from, usize::try_from(start).unwrap_or(0))
    } else {
        None
    };
    Ok(RawPage { kind, points, next })
}

/// One series' part of an aggregate query.
struct Plan {
    device: Arc<str>,
    id: i32,
    from: i64,
}

pub(crate) fn aggregate(
    s: &PgTelemetryStore,
    q: &AggQuery<'_>,
) -> Result<(Vec<SeriesBuckets>, AggSources), TsdbError> {
    if !q.check()? {
        return Ok((Vec::new(), AggSources::default()));
    }
    let (tenant, metric, devices) = (
        q.tenant.to_string(),
        q.metric.to_string(),
        q.devices.to_vec(),
    );
    let series = s.read(move |c| {
        let rows = if devices.is_empty() {
            c.query(
                "SELECT device, id, kind FROM series WHERE tenant = $1 AND metric = $2",
                &[&tenant, &metric],
            )?
        } else {
            c.query(
                "SELECT device, id, kind FROM series
                 WHERE tenant = $1 AND metric = $2 AND device = ANY($3)",
                &[&tenant, &metric, &devices],
            )?
        };
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, String>(0)?,
                    r.try_get::<_, i32>(1)?,
                    r.try_get::<_, i16>(2)?,
                ))
            })
            .collect::<PgResult<Vec<_>>>()
    })?;
    let mut plans = Vec::with_capacity(series.len());
    for (device, id, kind) in series {
        if !kind_of(kind)?.is_numeric() {
            return Err(TsdbError::NotNumeric(q.metric.to_string()));
        }
        let key = SeriesKey {
            tenant: q.tenant.into(),
            device: device.as_str().into(),
            metric: q.metric.into(),
        };
        let from = q.from_ms.max(s.retention_floor(&key));
        if from < q.to_ms {
            plans.push(Plan {
                device: key.device,
                id,
                from,
            });
        }
    }
    let (to, bucket) = (q.to_ms, q.bucket_ms);
    let (mut out, sources) = s.read(move |c| {
        let mut sources = AggSources::default();
        let mut out = Vec::with_capacity(plans.len());
        for p in plans {
            let buckets = aggregate_one(c, p.id, p.from, to, bucket, &mut sources)?;
            if !buckets.is_empty() {
                out.push(SeriesBuckets {
                    device: p.device,
                    buckets,
                });
            }
        }
        PgResult::Ok((out, sources))
    })?;
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok((out, sources))
}

/// One series: rollup rows for the whole rollup buckets inside
/// `[from, to)`, raw points for the rest (streamed, not collected).
fn aggregate_one(
    c: &mut Client,
    id: i32,
    from: i64,
    to: i64,
    bucket: i64,
    sources: &mut AggSources,
) -> PgResult<Vec<(i64, Agg)>> {
    let (level, i0, i1) = m2mhub_tsdb::rollup_interior(from, to, bucket);
    let mut acc = Bucketer::new(bucket);
    let mut raw_ranges = vec![(from, to)];
    if i0 < i1 {
        raw_ranges = vec![(from, i0), (i1, to)];
        let table = if level == HOUR {
            "rollup_1h"
        } else {
            "rollup_1m"
        };
        let rows = c.query(
            &format!(
                "SELECT bucket, count, sum, min, max, first_ts, first, last_ts, last FROM {table}
                 WHERE series_id = $1 AND bucket >= $2 AND bucket < $3 ORDER BY bucket"
            ),
            &[&id, &i0, &i1],
        )?;
        for r in rows {
            let b: i64 = r.try_get(0)?;
            let a = Agg {
                count: u64::try_from(r.try_get::<_, i64>(1)?).unwrap_or(0),
                sum: r.try_get(2)?,
                min: r.try_get(3)?,
                max: r.try_get(4)?,
                first_ts: r.try_get(5)?,
                first: r.try_get(6)?,
                last_ts: r.try_get(7)?,
                last: r.try_get(8)?,
            };
            acc.merge(b, &a);
            sources.rollup_rows += 1;
        }
    }
    for (lo, hi) in raw_ranges {
        if lo >= hi {
            continue;
        }
        let params: [&(dyn ToSql + Sync); 3] = [&id, &lo, &hi];
        let mut it = c.query_raw(
            "SELECT ts, value FROM points WHERE series_id = $1 AND ts >= $2 AND ts < $3
             AND value IS NOT NULL ORDER BY ts, seq",
            params,
        )?;
        while let Some(r) = it.next()? {
            acc.add(r.try_get(0)?, r.try_get(1)?);
            sources.raw_points += 1;
        }
    }
    Ok(acc.finish())
}

pub(crate) fn latest(
    s: &PgTelemetryStore,
    tenant: &str,
    device: &str,
) -> Result<Vec<Latest>, TsdbError> {
    let (t, d) = (tenant.to_string(), device.to_string());
    let rows = s.read(move |c| {
        let rows = c.query(
            "SELECT s.metric, s.kind, l.ts, l.value, l.text FROM series s
             JOIN latest l ON l.series_id = s.id
             WHERE s.tenant = $1 AND s.device = $2",
            &[&t, &d],
        )?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, String>(0)?,
                    r.try_get::<_, i16>(1)?,
                    r.try_get::<_, i64>(2)?,
                    r.try_get::<_, Option<f64>>(3)?,
                    r.try_get::<_, Option<String>>(4)?,
                ))
            })
            .collect::<PgResult<Vec<_>>>()
    })?;
    let mut out = Vec::with_capacity(rows.len());
    for (metric, kind, ts_ms, v, text) in rows {
        let kind = kind_of(kind)?;
        out.push(Latest {
            metric: metric.into(),
            kind,
            ts_ms,
            value: value_of(kind, v, text),
        });
    }
    out.sort_by(|a, b| a.metric.cmp(&b.metric));
    Ok(out)
}

pub(crate) fn series(
    s: &PgTelemetryStore,
    tenant: &str,
    device: Option<&str>,
    metric: Option<&str>,
) -> Result<Vec<SeriesInfo>, TsdbError> {
    let (t, d, m) = (
        tenant.to_string(),
        device.map(str::to_string),
        metric.map(str::to_string),
    );
    let rows = s.read(move |c| {
        let rows = c.query(
            "SELECT device, metric, kind FROM series WHERE tenant = $1
             AND ($2::text IS NULL OR device = $2) AND ($3::text IS NULL OR metric = $3)",
            &[&t, &d, &m],
        )?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, String>(0)?,
                    r.try_get::<_, String>(1)?,
                    r.try_get::<_, i16>(2)?,
                ))
            })
            .collect::<PgResult<Vec<_>>>()
    })?;
    let tenant: Arc<str> = tenant.into();
    let mut out = Vec::with_capacity(rows.len());
    for (device, metric, kind) in rows {
        out.push(SeriesInfo {
            key: SeriesKey {
                tenant: tenant.clone(),
                device: device.into(),
                metric: metric.into(),
            },
            kind: kind_of(kind)?,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}
