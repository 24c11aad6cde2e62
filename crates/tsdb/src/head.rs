//! In-memory head chunks: the points since the last flush, per series and
//! per partition, already compressed (a Gorilla encoder per numeric
//! series, see `chunk.rs`), plus the latest value of every series.

use crate::chunk::ChunkEncoder;
use crate::model::{SeriesId, Value};
use crate::text::TextEncoder;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(crate) enum Enc {
    Num(ChunkEncoder),
    Text(TextEncoder),
}

/// A finished chunk's bytes.
#[derive(Debug, Clone)]
pub(crate) enum ChunkBytes {
    Num(Vec<u8>),
    Text(Vec<u8>),
}

impl ChunkBytes {
    pub fn len(&self) -> usize {
        match self {
            ChunkBytes::Num(b) | ChunkBytes::Text(b) => b.len(),
        }
    }
}

impl Enc {
    pub fn snapshot(&self) -> ChunkBytes {
        match self {
            Enc::Num(e) => ChunkBytes::Num(e.snapshot()),
            Enc::Text(e) => ChunkBytes::Text(e.snapshot()),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Enc::Num(e) => e.heap_bytes(),
            Enc::Text(e) => e.heap_bytes(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HeadPart {
    pub part: i64,
    pub enc: Enc,
    pub min_ts: i64,
    pub max_ts: i64,
    pub count: u32,
}

/// Points since the last flush. Indexed by series id.
#[derive(Debug, Default)]
pub(crate) struct Heads {
    pub series: Vec<Vec<HeadPart>>,
    pub points: u64,
}

/// Head chunks are cut at this many points so a chunk's length always
/// fits its `u32` count and one decode stays small.
const MAX_HEAD_CHUNK: u32 = 1 << 20;

impl Heads {
    #[inline]
    pub fn push(&mut self, id: SeriesId, part: i64, ts: i64, v: &Value) {
        let i = id as usize;
        if self.series.len() <= i {
            self.series.resize_with(i + 1, Vec::new);
        }
        let parts = &mut self.series[i];
        let hp = match parts
            .iter()
            .rposition(|p| p.part == part && p.count < MAX_HEAD_CHUNK)
        {
            Some(j) => &mut parts[j],
            None => {
                parts.push(HeadPart {
                    part,
                    enc: match v {
                        Value::Str(_) => Enc::Text(TextEncoder::default()),
                        _ => Enc::Num(ChunkEncoder::new()),
                    },
                    min_ts: ts,
                    max_ts: ts,
                    count: 0,
                });
                let last = parts.len() - 1;
                &mut parts[last]
            }
        };
        match (&mut hp.enc, v) {
            (Enc::Num(e), Value::F64(x)) => e.push(ts, *x),
            (Enc::Num(e), Value::Bool(b)) => e.push(ts, if *b { 1.0 } else { 0.0 }),
            (Enc::Text(e), Value::Str(s)) => e.push(ts, s),
            // Kinds are checked when points are appended; a mismatch here
            // would be a bug, and dropping the point beats corrupting a chunk.
            _ => {
                debug_assert!(false, "point kind does not match its head chunk");
                return;
            }
        }
        hp.min_ts = hp.min_ts.min(ts);
        hp.max_ts = hp.max_ts.max(ts);
        hp.count += 1;
        self.points += 1;
    }

    pub fn heap_bytes(&self) -> usize {
        self.series
            .iter()
            .flat_map(|v| v.iter())
            .map(|p| p.enc.heap_bytes() + std::mem::size_of::<HeadPart>())
            .sum()
    }
}

/// The latest point of every series, kept hot (never flushed away).
#[derive(Debug, Default)]
pub(crate) struct LatestTable {
    pub by_series: Vec<Option<(i64, Value)>>,
}

impl LatestTable {
    #[inline]
    pub fn offer(&mut self, id: SeriesId, ts: i64, v: &Value) {
        let i = id as usize;
        if self.by_series.len() <= i {
            self.by_series.resize(i + 1, None);
        }
        let slot = &mut self.by_series[i];
        if slot.as_ref().is_none_or(|(t, _)| ts >= *t) {
            *slot = Some((ts, v.clone()));
        }
    }

    pub fn get(&self, id: SeriesId) -> Option<&(i64, Value)> {
        self.by_series.get(id as usize)?.as_ref()
    }
}

/// Frozen heads being written to partition files: still read by queries
/// until their segments are installed.
pub(crate) type Frozen = Arc<Heads>;
