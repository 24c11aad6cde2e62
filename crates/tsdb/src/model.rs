//! The data model: series, values, points, aggregates, queries.

use std::sync::Arc;

/// Dense id of a series, assigned in creation order and never reused.
pub type SeriesId = u32;

/// What a series identifies: one metric of one device of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub tenant: Arc<str>,
    pub device: Arc<str>,
    pub metric: Arc<str>,
}

/// The kind of a series, fixed by its first point. Booleans are stored as
/// 0/1 floats (so they aggregate: `avg` of a door switch is its duty
/// cycle); text is stored as is and supports raw reads and `latest` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Float,
    Bool,
    Text,
}

impl Kind {
    /// The kind's stable number, as stores persist it.
    pub fn code(self) -> u8 {
        match self {
            Kind::Float => 0,
            Kind::Bool => 1,
            Kind::Text => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Kind> {
        match c {
            0 => Some(Kind::Float),
            1 => Some(Kind::Bool),
            2 => Some(Kind::Text),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Float => "float",
            Kind::Bool => "bool",
            Kind::Text => "text",
        }
    }

    /// Whether a series of this kind takes `v`: numbers and booleans mix
    /// (booleans are stored as 0/1), text does not.
    pub fn accepts(self, v: &Value) -> bool {
        matches!(
            (self, v),
            (Kind::Float | Kind::Bool, Value::F64(_) | Value::Bool(_))
                | (Kind::Text, Value::Str(_))
        )
    }

    /// Why a point of `metric` was refused (`accepts` said no), in the
    /// words every backend reports.
    pub fn refusal(self, metric: &str, v: &Value) -> String {
        format!(
            "metric `{metric}` holds {} values; a {} value does not fit",
            self.name(),
            v.kind().name()
        )
    }

    /// Numeric kinds share the float chunk codec and the rollups.
    pub fn is_numeric(self) -> bool {
        !matches!(self, Kind::Text)
    }
}

/// A stored value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    F64(f64),
    Bool(bool),
    Str(Arc<str>),
}

impl Value {
    pub fn kind(&self) -> Kind {
        match self {
            Value::F64(_) => Kind::Float,
            Value::Bool(_) => Kind::Bool,
            Value::Str(_) => Kind::Text,
        }
    }
}

/// One point to append.
#[derive(Debug, Clone, PartialEq)]
pub struct InPoint<'a> {
    pub metric: &'a str,
    pub ts_ms: i64,
    pub value: Value,
}

/// One point read back.
#[derive(Debug, Clone, PartialEq)]
pub struct OutPoint {
    pub ts_ms: i64,
    pub value: Value,
}

/// Partial aggregate over a set of points; merging two gives the aggregate
/// of their union, which is what makes per-flush rollups composable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first_ts: i64,
    pub first: f64,
    pub last_ts: i64,
    pub last: f64,
}

impl Agg {
    pub fn of(ts: i64, v: f64) -> Agg {
        Agg {
            count: 1,
            sum: v,
            min: v,
            max: v,
            first_ts: ts,
            first: v,
            last_ts: ts,
            last: v,
        }
    }

    /// Add one point. Points may come in any order: first/last follow
    /// timestamps (ties keep the earlier-added first and the later last).
    #[inline]
    pub fn add(&mut self, ts: i64, v: f64) {
        self.merge(&Agg::of(ts, v));
    }

    #[inline]
    pub fn merge(&mut self, o: &Agg) {
        self.count += o.count;
        self.sum += o.sum;
        // `f64::min`/`max` ignore a NaN operand: one broken reading does
        // not hide the real extremes of a bucket.
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if o.first_ts < self.first_ts {
            self.first_ts = o.first_ts;
            self.first = o.first;
        }
        if o.last_ts >= self.last_ts {
            self.last_ts = o.last_ts;
            self.last = o.last;
        }
    }

    pub fn avg(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }
}

/// Aggregate functions a query can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFn {
    Avg,
    Min,
    Max,
    Sum,
    Count,
    First,
    Last,
}

impl AggFn {
    pub const ALL: [AggFn; 7] = [
        AggFn::Avg,
        AggFn::Min,
        AggFn::Max,
        AggFn::Sum,
        AggFn::Count,
        AggFn::First,
        AggFn::Last,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AggFn::Avg => "avg",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Sum => "sum",
            AggFn::Count => "count",
            AggFn::First => "first",
            AggFn::Last => "last",
        }
    }

    pub fn parse(s: &str) -> Option<AggFn> {
        AggFn::ALL.into_iter().find(|f| f.name() == s)
    }

    pub fn apply(self, a: &Agg) -> f64 {
        match self {
            AggFn::Avg => a.avg(),
            AggFn::Min => a.min,
            AggFn::Max => a.max,
            AggFn::Sum => a.sum,
            AggFn::Count => a.count as f64,
            AggFn::First => a.first,
            AggFn::Last => a.last,
        }
    }
}

/// A page of raw points.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPage {
    pub kind: Kind,
    pub points: Vec<OutPoint>,
    /// Where the next page starts, when there is one.
    pub next: Option<Cursor>,
}

/// Resume point of a raw read: the last timestamp returned and how many
/// points with exactly that timestamp were already returned (a series may
/// hold several points with one timestamp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub ts_ms: i64,
    pub skip: u32,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}.{}", self.ts_ms, self.skip)
    }

    /// Where the page after `page` starts: its last timestamp, and how
    /// many points at that timestamp have been returned — those of this
    /// page, plus the `skipped` a cursor skipped at `from` when the page
    /// never left that timestamp. `None` for an empty page.
    pub fn after_page(page: &[OutPoint], from: i64, skipped: usize) -> Option<Cursor> {
        let last = page.last()?;
        let same = page
            .iter()
            .rev()
            .take_while(|p| p.ts_ms == last.ts_ms)
            .count();
        let carried = if last.ts_ms == from { skipped } else { 0 };
        Some(Cursor {
            ts_ms: last.ts_ms,
            skip: u32::try_from(same + carried).unwrap_or(u32::MAX),
        })
    }

    pub fn decode(s: &str) -> Option<Cursor> {
        let (a, b) = s.split_once('.')?;
        Some(Cursor {
            ts_ms: a.parse().ok()?,
            skip: b.parse().ok()?,
        })
    }
}

/// Raw points of one series in `[from_ms, to_ms)`, oldest first.
#[derive(Debug, Clone)]
pub struct RawQuery<'a> {
    pub tenant: &'a str,
    pub device: &'a str,
    pub metric: &'a str,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: usize,
    pub after: Option<Cursor>,
}

/// Per-bucket aggregates of one metric over several devices.
#[derive(Debug, Clone)]
pub struct AggQuery<'a> {
    pub tenant: &'a str,
    pub metric: &'a str,
    /// Devices to include; empty means every device with this metric.
    pub devices: &'a [String],
    pub from_ms: i64,
    pub to_ms: i64,
    /// Bucket width; buckets are aligned to the epoch.
    pub bucket_ms: i64,
}

impl AggQuery<'_> {
    /// Most buckets one query may ask for.
    pub const MAX_BUCKETS: i128 = 1_000_000;

    /// Refuse a bad bucket or too many buckets; `Ok(false)` when the range
    /// is empty (nothing to read). Every backend checks the same way.
    pub fn check(&self) -> Result<bool, crate::TsdbError> {
        if self.bucket_ms <= 0 {
            return Err(crate::TsdbError::Invalid("bucket must be positive".into()));
        }
        if self.to_ms <= self.from_ms {
            return Ok(false);
        }
        let span = (self.to_ms as i128 - self.from_ms as i128) / self.bucket_ms as i128;
        if span > Self::MAX_BUCKETS {
            return Err(crate::TsdbError::Invalid(format!(
                "{span} buckets requested; at most {} per query (widen the bucket or narrow the range)",
                Self::MAX_BUCKETS
            )));
        }
        Ok(true)
    }
}

/// The buckets of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesBuckets {
    pub device: Arc<str>,
    /// `(bucket start, aggregate)`, ascending, empty buckets left out.
    pub buckets: Vec<(i64, Agg)>,
}

/// Where an aggregate query's data came from (reported so that callers
/// and tests can see rollups being used).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggSources {
    pub raw_points: u64,
    pub rollup_rows: u64,
}

/// The latest point of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    pub metric: Arc<str>,
    pub kind: Kind,
    pub ts_ms: i64,
    pub value: Value,
}

/// One series, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesInfo {
    pub key: SeriesKey,
    pub kind: Kind,
}

/// How long data is kept. Rules are matched most specific first
/// (tenant and metric, then metric, then tenant); `default` applies
/// otherwise. `None` keeps forever.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    pub default: Option<std::time::Duration>,
    pub rules: Vec<RetentionRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetentionRule {
    pub tenant: Option<String>,
    pub metric: Option<String>,
    pub keep: Option<std::time::Duration>,
}

impl Retention {
    /// How long the series `key` is kept.
    pub fn keep_for(&self, key: &SeriesKey) -> Option<std::time::Duration> {
        let mut best: Option<(u8, Option<std::time::Duration>)> = None;
        for r in &self.rules {
            let t = r.tenant.as_deref().map(|t| t == &*key.tenant);
            let m = r.metric.as_deref().map(|m| m == &*key.metric);
            if t == Some(false) || m == Some(false) {
                continue;
            }
            let rank = u8::from(t.is_some()) + 2 * u8::from(m.is_some());
            if best.is_none_or(|(b, _)| rank > b) {
                best = Some((rank, r.keep));
            }
        }
        match best {
            Some((_, keep)) => keep,
            None => self.default,
        }
    }

    /// Refuse rule names the stores cannot keep (the embedded store saves
    /// rules as tab-separated lines; every backend refuses the same names).
    pub fn validate(&self) -> Result<(), crate::TsdbError> {
        for rule in &self.rules {
            for name in [&rule.tenant, &rule.metric].into_iter().flatten() {
                if name.is_empty() || name.contains(['\t', '\n', '\r']) {
                    return Err(crate::TsdbError::Invalid(format!(
                        "retention rule name {name:?} must be non-empty, without tabs or line breaks"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The longest time anything is kept (`None`: forever), which bounds
    /// when a whole partition can be dropped.
    pub fn longest(&self) -> Option<std::time::Duration> {
        let mut longest = self.default?;
        for r in &self.rules {
            longest = longest.max(r.keep?);
        }
        Some(longest)
    }
}

/// Counters and sizes, for `/metrics` and benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub series: u64,
    pub points_appended: u64,
    pub points_rejected: u64,
    pub wal_commits: u64,
    pub wal_bytes: u64,
    pub flushes: u64,
    pub compactions: u64,
    pub partitions: u64,
    pub head_points: u64,
    /// Memory held by head chunks (compressed points not yet flushed).
    pub head_bytes: u64,
    pub disk_bytes: u64,
    pub write_errors: u64,
    pub disk_full: bool,
    /// The most data a compaction has held in memory at once since the
    /// store opened (chunks read, decoded points, encoded output), in
    /// bytes: bounded by the largest series of a partition, not by the
    /// partition, so a soak can tell a compaction spike from a leak.
    pub compaction_peak_bytes: u64,
}
