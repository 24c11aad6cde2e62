//! Rollup blocks: the per-bucket [`Agg`]s of the points of one series in
//! one flush (or one compacted partition), at 1 minute and 1 hour.
//!
//! A block is columnar so that it compresses like a chunk: bucket starts,
//! counts and the first/last offsets as varints, then `sum`, `min`, `max`,
//! `first` and `last` as five chunks keyed by the bucket start (each in
//! the smaller chunk format, see `chunk::encode_best`).

use crate::chunk::{encode_best, ChunkIter};
use crate::codec::{put_blob, put_zz, write_varint, Reader};
use crate::model::Agg;

pub const MINUTE: i64 = 60_000;
pub const HOUR: i64 = 3_600_000;

/// Which rollups answer an aggregate of `[from, to)` in buckets of
/// `bucket`: `(level, i0, i1)`, where `level` is the rollup width (1 h when
/// the bucket is whole hours, 1 min when whole minutes, else 0: none) and
/// `[i0, i1)` the whole rollup buckets inside the range (empty when
/// `i0 >= i1`); the edges outside it need raw points. Every backend plans
/// the same way, so they read the same rows.
pub fn interior(from: i64, to: i64, bucket: i64) -> (i64, i64, i64) {
    let level = if bucket % HOUR == 0 {
        HOUR
    } else if bucket % MINUTE == 0 {
        MINUTE
    } else {
        return (0, 0, 0);
    };
    let a = from.div_euclid(level) * level
        + if from.rem_euclid(level) == 0 {
            0
        } else {
            level
        };
    let b = to.div_euclid(level) * level;
    if a < b {
        (level, a, b)
    } else {
        (level, 0, 0)
    }
}

/// Build the sorted rows of `points` in buckets of `width`.
pub(crate) fn rows(points: &[(i64, f64)], width: i64) -> Vec<(i64, Agg)> {
    let mut out: Vec<(i64, Agg)> = Vec::new();
    let mut sorted: Vec<(i64, f64)>;
    let pts = if points.windows(2).all(|w| w[0].0 <= w[1].0) {
        points
    } else {
        sorted = points.to_vec();
        sorted.sort_by_key(|p| p.0);
        &sorted
    };
    for &(ts, v) in pts {
        let b = ts.div_euclid(width) * width;
        match out.last_mut() {
            Some((lb, a)) if *lb == b => a.add(ts, v),
            _ => out.push((b, Agg::of(ts, v))),
        }
    }
    out
}

pub(crate) fn encode(rows: &[(i64, Agg)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + rows.len() * 8);
    write_varint(&mut out, rows.len() as u64);
    let mut prev = 0i64;
    for (b, a) in rows {
        put_zz(&mut out, b.wrapping_sub(prev));
        prev = *b;
        write_varint(&mut out, a.count);
        put_zz(&mut out, a.first_ts.wrapping_sub(*b));
        put_zz(&mut out, a.last_ts.wrapping_sub(*b));
    }
    let cols: [fn(&Agg) -> f64; 5] = [|a| a.sum, |a| a.min, |a| a.max, |a| a.first, |a| a.last];
    let mut column = Vec::with_capacity(rows.len());
    for col in cols {
        column.clear();
        column.extend(rows.iter().map(|(b, a)| (*b, col(a))));
        put_blob(&mut out, &encode_best(&column));
    }
    out
}

pub(crate) fn decode(buf: &[u8]) -> Option<Vec<(i64, Agg)>> {
    let mut r = Reader::new(buf);
    let n = r.usize_v()?;
    // Each row costs at least four bytes: refuse absurd counts before
    // allocating for them.
    if n > buf.len() {
        return None;
    }
    let mut rows = Vec::with_capacity(n);
    let mut prev = 0i64;
    for _ in 0..n {
        let b = prev.wrapping_add(r.zz()?);
        prev = b;
        let count = r.varint()?;
        let first_ts = b.wrapping_add(r.zz()?);
        let last_ts = b.wrapping_add(r.zz()?);
        rows.push((
            b,
            Agg {
                count,
                sum: 0.0,
                min: 0.0,
                max: 0.0,
                first_ts,
                first: 0.0,
                last_ts,
                last: 0.0,
            },
        ));
    }
    for col in 0..5 {
        let blob = r.blob()?;
        let it = ChunkIter::new(blob).ok()?;
        if it.point_count() != n {
            return None;
        }
        for (row, p) in rows.iter_mut().zip(it) {
            let (_, v) = p.ok()?;
            let a = &mut row.1;
            match col {
                0 => a.sum = v,
                1 => a.min = v,
                2 => a.max = v,
                3 => a.first = v,
                _ => a.last = v,
            }
        }
    }
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rows_bucket_and_merge() {
        let pts = [(0, 1.0), (59_999, 3.0), (60_000, 5.0), (-1, 7.0)];
        let r = rows(&pts, MINUTE);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].0, -60_000);
        assert_eq!(r[1].0, 0);
        assert_eq!(r[1].1.count, 2);
        assert_eq!(r[1].1.first, 1.0);
        assert_eq!(r[1].1.last, 3.0);
        assert_eq!(r[2].1.sum, 5.0);
    }

    proptest! {
        #[test]
        fn blocks_round_trip(pts in proptest::collection::vec((-10_000_000i64..10_000_000, any::<f64>()), 0..300)) {
            let r = rows(&pts, MINUTE);
            let back = decode(&encode(&r)).expect("decodes");
            prop_assert_eq!(back.len(), r.len());
            for ((b1, a1), (b2, a2)) in r.iter().zip(&back) {
                prop_assert_eq!(b1, b2);
                prop_assert_eq!(a1.count, a2.count);
                prop_assert_eq!(a1.first_ts, a2.first_ts);
                prop_assert_eq!(a1.last_ts, a2.last_ts);
                for (x, y) in [(a1.sum, a2.sum), (a1.min, a2.min), (a1.max, a2.max), (a1.first, a2.first), (a1.last, a2.last)] {
                    prop_assert_eq!(x.to_bits(), y.to_bits());
                }
            }
        }

        #[test]
        fn merged_rows_equal_rows_of_union(a in proptest::collection::vec((0i64..1_000_000, -1e6f64..1e6), 1..100),
                                           b in proptest::collection::vec((0i64..1_000_000, -1e6f64..1e6), 1..100)) {
            let mut all = a.clone();
            all.extend_from_slice(&b);
            let whole = rows(&all, MINUTE);
            let mut merged = rows(&a, MINUTE);
            for (bk, ag) in rows(&b, MINUTE) {
                match merged.iter_mut().find(|(x, _)| *x == bk) {
                    Some((_, m)) => m.merge(&ag),
                    None => merged.push((bk, ag)),
                }
            }
            merged.sort_by_key(|r| r.0);
            prop_assert_eq!(whole.len(), merged.len());
            for ((_, w), (_, m)) in whole.iter().zip(&merged) {
                prop_assert_eq!(w.count, m.count);
                prop_assert_eq!(w.min, m.min);
                prop_assert_eq!(w.max, m.max);
                prop_assert_eq!(w.first_ts, m.first_ts);
                prop_assert_eq!(w.last_ts, m.last_ts);
                prop_assert!((w.sum - m.sum).abs() <= 1e-6 * w.sum.abs().max(1.0));
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
