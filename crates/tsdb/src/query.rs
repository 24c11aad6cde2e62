//! Queries: raw pages, bucketed aggregates (from rollups where the bucket
//! allows), latest values, series listings.
//!
//! Every query first *gathers* under the state read lock — chunk
//! references of sealed segments, snapshots of frozen and live head
//! chunks — and then reads and decodes with no lock held, so queries never
//! stall ingestion for longer than a few copies.

use crate::chunk::ChunkIter;
use crate::engine::{now_ms, Tsdb};
use crate::error::TsdbError;
use crate::head::{ChunkBytes, HeadPart};
use crate::model::{
    Agg, AggQuery, AggSources, Cursor, Kind, Latest, OutPoint, RawPage, RawQuery, SeriesBuckets,
    SeriesId, SeriesInfo, SeriesKey, Value,
};
use crate::part::{ChunkRef, PartFiles, Segment};
use crate::rollup::{self, HOUR};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most points one raw page returns.
pub const MAX_PAGE: usize = 100_000;

enum Src {
    Sealed(Arc<PartFiles>, ChunkRef),
    Head(ChunkBytes),
}

struct Piece {
    min_ts: i64,
    src: Src,
}

/// What a query needs of one series.
struct Gathered {
    /// Sealed segments overlapping the range (for rollups).
    segments: Vec<(Arc<PartFiles>, Segment)>,
    /// Head chunks overlapping the range.
    heads: Vec<Piece>,
}

fn head_pieces(parts: &[HeadPart], from: i64, to: i64, out: &mut Vec<Piece>) {
    for hp in parts {
        if hp.max_ts >= from && hp.min_ts < to {
            out.push(Piece {
                min_ts: hp.min_ts,
                src: Src::Head(hp.enc.snapshot()),
            });
        }
    }
}

fn decode_piece(kind: Kind, p: &Piece, mut f: impl FnMut(i64, Value)) -> Result<(), TsdbError> {
    let corrupt = |e: String| TsdbError::Corrupt(format!("chunk: {e}"));
    let owned;
    let (bytes, text) = match &p.src {
        Src::Sealed(files, c) => {
            owned = files.read(c.block)?;
            (&owned[..], kind == Kind::Text)
        }
        Src::Head(ChunkBytes::Num(b)) => (&b[..], false),
        Src::Head(ChunkBytes::Text(b)) => (&b[..], true),
    };
    if text {
        for (t, s) in crate::text::decode(bytes).ok_or_else(|| corrupt("text".into()))? {
            f(t, Value::Str(s));
        }
    } else {
        for pt in ChunkIter::new(bytes).map_err(|e| corrupt(e.to_string()))? {
            let (t, v) = pt.map_err(|e| corrupt(e.to_string()))?;
            f(t, Value::F64(v));
        }
    }
    Ok(())
}

fn decode_num(p: &Piece, mut f: impl FnMut(i64, f64)) -> Result<(), TsdbError> {
    decode_piece(Kind::Float, p, |t, v| {
        if let Value::F64(x) = v {
            f(t, x)
        }
    })
}

/// Accumulates points into buckets. Points mostly arrive in time order,
/// so the current bucket is kept aside and the map is touched only when
/// the bucket changes. Public so that every backend buckets (and breaks
/// first/last ties) the same way.
pub struct Bucketer {
    width: i64,
    cur: Option<(i64, Agg)>,
    map: BTreeMap<i64, Agg>,
}

impl Bucketer {
    pub fn new(width: i64) -> Self {
        Self {
            width,
            cur: None,
            map: BTreeMap::new(),
        }
    }

    /// Merge a partial aggregate (a rollup row) whose points lie at `t`'s bucket.
    #[inline]
    pub fn merge(&mut self, t: i64, a: &Agg) {
        let k = t.div_euclid(self.width) * self.width;
        match &mut self.cur {
            Some((ck, ca)) if *ck == k => ca.merge(a),
            _ => {
                if let Some((ck, ca)) = self.cur.take() {
                    self.map
                        .entry(ck)
                        .and_modify(|x| x.merge(&ca))
                        .or_insert(ca);
                }
                self.cur = Some((k, *a));
            }
        }
    }

    #[inline]
    pub fn add(&mut self, t: i64, v: f64) {
        self.merge(t, &Agg::of(t, v));
    }

    /// The buckets, ascending, empty ones left out.
    pub fn finish(mut self) -> Vec<(i64, Agg)> {
        if let Some((ck, ca)) = self.cur.take() {
            self.map
                .entry(ck)
                .and_modify(|x| x.merge(&ca))
                .or_insert(ca);
        }
        self.map.into_iter().collect()
    }
}

impl Tsdb {
    fn lookup(
        &self,
        tenant: &str,
        device: &str,
        metric: &str,
    ) -> Option<(SeriesId, SeriesKey, Kind)> {
        let idx = self.shared.series.read();
        let id = idx.get(tenant, device, metric)?;
        let m = idx.meta(id)?;
        Some((id, m.key.clone(), m.kind))
    }

    /// Earliest timestamp still visible under retention.
    fn retention_floor(&self, key: &SeriesKey) -> i64 {
        match self.shared.retention.read().keep_for(key) {
            Some(keep) => now_ms().saturating_sub(keep.as_millis().min(i64::MAX as u128) as i64),
            None => i64::MIN,
        }
    }

    fn gather(&self, id: SeriesId, from: i64, to: i64) -> Gathered {
        let sh = &self.shared;
        let (p0, p1) = (sh.part_of(from), sh.part_of(to.saturating_sub(1)));
        let st = sh.state.read();
        let mut segments = Vec::new();
        for (_, view) in st.parts.range(p0..=p1) {
            if let Some(segs) = view.index.get(&id) {
                for s in segs {
                    if s.max_ts >= from && s.min_ts < to {
                        segments.push((view.files.clone(), s.clone()));
                    }
                }
            }
        }
        let mut heads = Vec::new();
        for f in &st.frozen {
            if let Some(parts) = f.series.get(id as usize) {
                head_pieces(parts, from, to, &mut heads);
            }
        }
        if let Some(parts) = st.heads.series.get(id as usize) {
            head_pieces(parts, from, to, &mut heads);
        }
        Gathered { segments, heads }
    }

    /// Raw points of one series, oldest first, paged.
    pub fn raw(&self, q: &RawQuery<'_>) -> Result<RawPage, TsdbError> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let Some((id, key, kind)) = self.lookup(q.tenant, q.device, q.metric) else {
            return Ok(RawPage {
                kind: Kind::Float,
                points: Vec::new(),
                next: None,
            });
        };
        let mut from = q.from_ms.max(self.retention_floor(&key));
        let mut skip = 0usize;
        if let Some(c) = q.after {
            if c.ts_ms >= from {
                from = c.ts_ms;
                skip = c.skip as usize;
            }
        }
        let to = q.to_ms;
        if from >= to {
            return Ok(RawPage {
                kind,
                points: Vec::new(),
                next: None,
            });
        }
        let g = self.gather(id, from, to);
        let mut pieces: Vec<Piece> = Vec::new();
        for (files, seg) in &g.segments {
            for c in &seg.chunks {
                if c.max_ts >= from && c.min_ts < to {
                    pieces.push(Piece {
                        min_ts: c.min_ts,
                        src: Src::Sealed(files.clone(), *c),
                    });
                }
            }
        }
        pieces.extend(g.heads);
        pieces.sort_by_key(|p| p.min_ts);
        let want = skip + limit + 1;
        let mut out: Vec<(i64, Value)> = Vec::new();
        let mut stopped_early = false;
        for i in 0..pieces.len() {
            decode_piece(kind, &pieces[i], |t, v| {
                if t >= from && t < to {
                    out.push((t, v));
                }
            })?;
            if out.len() >= want {
                if let Some(next) = pieces.get(i + 1) {
                    out.sort_by_key(|p| p.0);
                    if out[want - 1].0 < next.min_ts {
                        stopped_early = true;
                        break;
                    }
                }
            }
        }
        out.sort_by_key(|p| p.0);
        // Points at the cursor's timestamp already returned.
        let mut start = 0;
        while start < out.len() && start < skip && out[start].0 == from {
            start += 1;
        }
        let rest = &out[start..];
        let page: Vec<OutPoint> = rest
            .iter()
            .take(limit)
            .map(|(t, v)| OutPoint {
                ts_ms: *t,
                value: match (kind, v) {
                    (Kind::Bool, Value::F64(x)) => Value::Bool(*x != 0.0),
                    _ => v.clone(),
                },
            })
            .collect();
        let more = rest.len() > limit || stopped_early;
        let next = if more {
            Cursor::after_page(&page, from, start)
        } else {
            None
        };
        Ok(RawPage {
            kind,
            points: page,
            next,
        })
    }

    /// Bucketed aggregates of one metric over devices. Buckets whose width
    /// is a whole number of hours (minutes) are answered from the 1 h
    /// (1 min) rollups of sealed data wherever whole rollup buckets fall
    /// inside the range; the ragged edges and the heads are computed from
    /// raw points.
    pub fn aggregate(
        &self,
        q: &AggQuery<'_>,
    ) -> Result<(Vec<SeriesBuckets>, AggSources), TsdbError> {
        if !q.check()? {
            return Ok((Vec::new(), AggSources::default()));
        }
        let ids: Vec<(Arc<str>, SeriesId, SeriesKey, Kind)> = {
            let idx = self.shared.series.read();
            let mut ids = Vec::new();
            let mut add = |dev: &str| {
                if let Some(id) = idx.get(q.tenant, dev, q.metric) {
                    if let Some(m) = idx.meta(id) {
                        ids.push((m.key.device.clone(), id, m.key.clone(), m.kind));
                    }
                }
            };
            if q.devices.is_empty() {
                let devs: Vec<Arc<str>> = idx.devices(q.tenant).map(|(d, _)| d.clone()).collect();
                for d in devs {
                    add(&d);
                }
            } else {
                for d in q.devices {
                    add(d);
                }
            }
            ids
        };
        let mut sources = AggSources::default();
        let mut out = Vec::with_capacity(ids.len());
        for (device, id, key, kind) in ids {
            if !kind.is_numeric() {
                return Err(TsdbError::NotNumeric(q.metric.to_string()));
            }
            let from = q.from_ms.max(self.retention_floor(&key));
            if from >= q.to_ms {
                continue;
            }
            let buckets = self.aggregate_one(id, from, q.to_ms, q.bucket_ms, &mut sources)?;
            if !buckets.is_empty() {
                out.push(SeriesBuckets { device, buckets });
            }
        }
        out.sort_by(|a, b| a.device.cmp(&b.device));
        Ok((out, sources))
    }

    fn aggregate_one(
        &self,
        id: SeriesId,
        from: i64,
        to: i64,
        bucket: i64,
        sources: &mut AggSources,
    ) -> Result<Vec<(i64, Agg)>, TsdbError> {
        let (level, i0, i1) = rollup::interior(from, to, bucket);
        let g = self.gather(id, from, to);
        let mut acc = Bucketer::new(bucket);
        let mut raw_points = 0u64;
        for (files, seg) in &g.segments {
            let use_rollup = i0 < i1 && seg.min_ts < i1 && seg.max_ts >= i0;
            if use_rollup {
                let block = if level == HOUR { seg.r1h } else { seg.r1m };
                let bytes = files.read(block)?;
                let rows = rollup::decode(&bytes)
                    .ok_or_else(|| TsdbError::Corrupt(format!("series {id}: rollup block")))?;
                for (b, a) in rows {
                    if b >= i0 && b < i1 {
                        acc.merge(b, &a);
                        sources.rollup_rows += 1;
                    }
                }
            }
            for c in &seg.chunks {
                // With rollups, only the parts of the range outside the
                // interior still need raw points.
                let needed = if use_rollup {
                    (c.min_ts < i0 && c.max_ts >= from) || (c.max_ts >= i1 && c.min_ts < to)
                } else {
                    c.max_ts >= from && c.min_ts < to
                };
                if !needed {
                    continue;
                }
                let piece = Piece {
                    min_ts: c.min_ts,
                    src: Src::Sealed(files.clone(), *c),
                };
                decode_num(&piece, |t, v| {
                    let inside = t >= from && t < to && !(use_rollup && t >= i0 && t < i1);
                    if inside {
                        raw_points += 1;
                        acc.add(t, v);
                    }
                })?;
            }
        }
        for piece in &g.heads {
            decode_num(piece, |t, v| {
                if t >= from && t < to {
                    raw_points += 1;
                    acc.add(t, v);
                }
            })?;
        }
        sources.raw_points += raw_points;
        Ok(acc.finish())
    }

    /// The latest value of every series of a device, by metric name.
    pub fn latest(&self, tenant: &str, device: &str) -> Result<Vec<Latest>, TsdbError> {
        let series: Vec<(Arc<str>, SeriesId, Kind)> = {
            let idx = self.shared.series.read();
            match idx.device(tenant, device) {
                Some(m) => m
                    .iter()
                    .filter_map(|(metric, id)| Some((metric.clone(), *id, idx.meta(*id)?.kind)))
                    .collect(),
                None => Vec::new(),
            }
        };
        let mut out = Vec::with_capacity(series.len());
        for (metric, id, kind) in series {
            let hot = self.shared.state.read().latest.get(id).cloned();
            let found = match hot {
                Some(p) => Some(p),
                None => {
                    let cold = self.latest_sealed(id, kind)?;
                    if let Some((t, v)) = &cold {
                        self.shared.state.write().latest.offer(id, *t, v);
                    }
                    cold
                }
            };
            if let Some((ts_ms, value)) = found {
                let value = match (kind, value) {
                    (Kind::Bool, Value::F64(x)) => Value::Bool(x != 0.0),
                    (Kind::Bool, Value::Bool(b)) => Value::Bool(b),
                    (Kind::Float, Value::Bool(b)) => Value::F64(if b { 1.0 } else { 0.0 }),
                    (_, v) => v,
                };
                out.push(Latest {
                    metric,
                    kind,
                    ts_ms,
                    value,
                });
            }
        }
        out.sort_by(|a, b| a.metric.cmp(&b.metric));
        Ok(out)
    }

    /// Latest point of a series found only in partition files (after a
    /// restart, before the series reports again).
    fn latest_sealed(&self, id: SeriesId, kind: Kind) -> Result<Option<(i64, Value)>, TsdbError> {
        let best = {
            let st = self.shared.state.read();
            let mut best: Option<(Arc<PartFiles>, ChunkRef)> = None;
            for view in st.parts.values().rev() {
                if let Some(segs) = view.index.get(&id) {
                    for c in segs.iter().flat_map(|s| s.chunks.iter()) {
                        if best.as_ref().is_none_or(|(_, b)| c.max_ts >= b.max_ts) {
                            best = Some((view.files.clone(), *c));
                        }
                    }
                }
                if best.is_some() {
                    break;
                }
            }
            best
        };
        let Some((files, c)) = best else {
            return Ok(None);
        };
        let piece = Piece {
            min_ts: c.min_ts,
            src: Src::Sealed(files, c),
        };
        let mut last: Option<(i64, Value)> = None;
        decode_piece(kind, &piece, |t, v| {
            if last.as_ref().is_none_or(|(lt, _)| t >= *lt) {
                last = Some((t, v));
            }
        })?;
        Ok(last)
    }

    /// Series of a tenant, optionally of one device and/or one metric,
    /// sorted by device then metric.
    pub fn series(
        &self,
        tenant: &str,
        device: Option<&str>,
        metric: Option<&str>,
    ) -> Vec<SeriesInfo> {
        let idx = self.shared.series.read();
        let mut out = Vec::new();
        for (dev, metrics) in idx.devices(tenant) {
            if device.is_some_and(|d| d != &**dev) {
                continue;
            }
            for (m, id) in metrics {
                if metric.is_some_and(|x| x != &**m) {
                    continue;
                }
                if let Some(meta) = idx.meta(*id) {
                    out.push(SeriesInfo {
                        key: meta.key.clone(),
                        kind: meta.kind,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}
