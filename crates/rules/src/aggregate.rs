//! Aggregate functions as mergeable states.
//!
//! Every aggregate is a small state that takes one value at a time and can
//! be merged with another state of the same function; the merge is
//! associative and commutative (`first`/`last` compare timestamps, not
//! arrival order; `stddev` merges Welford states by Chan's formula). That
//! one property serves all three window kinds: tumbling windows fold values
//! into one state, hopping windows merge the panes a window spans, and
//! sliding windows keep a two-stack queue of states (see `window.rs`).

use crate::error::EvalError;
use crate::value::Val;

/// The aggregate functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AggFunc {
    Avg,
    Min,
    Max,
    Sum,
    /// `count(x)`: non-null values; `count(*)`: messages.
    Count,
    /// Sample standard deviation (n − 1), null below 2 values.
    Stddev,
    First,
    Last,
    /// Change per second between the earliest and the latest value.
    Rate,
    /// Latest value minus earliest value.
    Delta,
}

impl AggFunc {
    pub(crate) fn from_name(name: &str) -> Option<AggFunc> {
        Some(match name {
            "avg" => AggFunc::Avg,
            "min" => AggFunc::Min,
            "max" => AggFunc::Max,
            "sum" => AggFunc::Sum,
            "count" => AggFunc::Count,
            "stddev" => AggFunc::Stddev,
            "first" => AggFunc::First,
            "last" => AggFunc::Last,
            "rate" => AggFunc::Rate,
            "delta" => AggFunc::Delta,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            AggFunc::Avg => "avg",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
            AggFunc::Sum => "sum",
            AggFunc::Count => "count",
            AggFunc::Stddev => "stddev",
            AggFunc::First => "first",
            AggFunc::Last => "last",
            AggFunc::Rate => "rate",
            AggFunc::Delta => "delta",
        }
    }

    /// Whether the function needs numbers (all but count, first, last).
    pub(crate) fn numeric(self) -> bool {
        !matches!(self, AggFunc::Count | AggFunc::First | AggFunc::Last)
    }

    /// Check an input before any state changes, so that a message that
    /// fails on its second aggregate leaves the first one untouched.
    pub(crate) fn check(self, v: &Val<'_>) -> Result<(), EvalError> {
        match v {
            Val::Null | Val::Num(_) => Ok(()),
            _ if !self.numeric() => Ok(()),
            other => Err(EvalError::WrongType {
                op: self.name(),
                expected: "a number",
                found: other.type_name(),
            }),
        }
    }

    pub(crate) fn empty(self) -> AggState {
        match self {
            AggFunc::Count => AggState::Count(0),
            AggFunc::Avg | AggFunc::Sum => AggState::Sum { sum: 0.0, n: 0 },
            AggFunc::Min => AggState::Min(None),
            AggFunc::Max => AggState::Max(None),
            AggFunc::Stddev => AggState::Welford {
                n: 0,
                mean: 0.0,
                m2: 0.0,
            },
            AggFunc::First => AggState::First(None),
            AggFunc::Last => AggState::Last(None),
            AggFunc::Rate | AggFunc::Delta => AggState::Span(None),
        }
    }
}

/// The running state of one aggregate.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AggState {
    Count(u64),
    Sum {
        sum: f64,
        n: u64,
    },
    Min(Option<f64>),
    Max(Option<f64>),
    Welford {
        n: u64,
        mean: f64,
        m2: f64,
    },
    First(Option<(i64, Val<'static>)>),
    Last(Option<(i64, Val<'static>)>),
    /// Earliest and latest (timestamp, value).
    Span(Option<((i64, f64), (i64, f64))>),
}

impl AggState {
    /// Add one value observed at `ts`. Nulls are skipped (SQL semantics),
    /// except by `count(*)`, whose input is always `true`.
    pub(crate) fn add(&mut self, ts: i64, v: &Val<'_>) {
        if matches!(v, Val::Null) {
            return;
        }
        let x = match v {
            Val::Num(x) => *x,
            _ => f64::NAN,
        };
        match self {
            AggState::Count(n) => *n += 1,
            AggState::Sum { sum, n } => {
                *sum += x;
                *n += 1;
            }
            AggState::Min(m) => *m = Some(m.map_or(x, |m| m.min(x))),
            AggState::Max(m) => *m = Some(m.map_or(x, |m| m.max(x))),
            AggState::Welford { n, mean, m2 } => {
                *n += 1;
                let d = x - *mean;
                *mean += d / *n as f64;
                *m2 += d * (x - *mean);
            }
            AggState::First(f) => {
                if f.as_ref().is_none_or(|(t, _)| ts < *t) {
                    *f = Some((ts, v.clone().into_owned()));
                }
            }
            AggState::Last(l) => {
                if l.as_ref().is_none_or(|(t, _)| ts >= *t) {
                    *l = Some((ts, v.clone().into_owned()));
                }
            }
            AggState::Span(s) => {
                *s = Some(match *s {
                    None => ((ts, x), (ts, x)),
                    Some((first, last)) => (
                        if ts < first.0 { (ts, x) } else { first },
                        if ts >= last.0 { (ts, x) } else { last },
                    ),
                })
            }
        }
    }

    /// Fold another state of the same function into this one.
    pub(crate) fn merge(&mut self, other: &AggState) {
        match (self, other) {
            (AggState::Count(a), AggState::Count(b)) => *a += b,
            (AggState::Sum { sum, n }, AggState::Sum { sum: s2, n: n2 }) => {
                *sum += s2;
                *n += n2;
            }
            (AggState::Min(a), AggState::Min(b)) => {
                *a = match (*a, *b) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                }
            }
            (AggState::Max(a), AggState::Max(b)) => {
                *a = match (*a, *b) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    (x, y) => x.or(y),
                }
            }
            (
                AggState::Welford { n, mean, m2 },
                &AggState::Welford {
                    n: nb,
                    mean: mb,
                    m2: m2b,
                },
            ) => {
                if nb == 0 {
                    return;
                }
                if *n == 0 {
                    (*n, *mean, *m2) = (nb, mb, m2b);
                    return;
                }
                let total = *n + nb;
                let d = mb - *mean;
                let (na, nbf, nt) = (*n as f64, nb as f64, total as f64);
                *mean += d * nbf / nt;
                *m2 += m2b + d * d * na * nbf / nt;
                *n = total;
            }
            (AggState::First(a), AggState::First(Some((tb, vb))))
                if a.as_ref().is_none_or(|(ta, _)| tb < ta) =>
            {
                *a = Some((*tb, vb.clone()));
            }
            (AggState::Last(a), AggState::Last(Some((tb, vb))))
                if a.as_ref().is_none_or(|(ta, _)| tb >= ta) =>
            {
                *a = Some((*tb, vb.clone()));
            }
            (AggState::Span(a), AggState::Span(b)) => {
                *a = match (*a, *b) {
                    (Some((fa, la)), Some((fb, lb))) => Some((
                        if fb.0 < fa.0 { fb } else { fa },
                        if lb.0 >= la.0 { lb } else { la },
                    )),
                    (x, y) => x.or(y),
                }
            }
            // Nothing to take (an empty or later first, an earlier last), or
            // kinds that differ, which a plan never builds.
            _ => {}
        }
    }

    /// The aggregate's value; null for an empty window.
    pub(crate) fn finish(&self, func: AggFunc) -> Val<'static> {
        match (self, func) {
            (AggState::Count(n), _) => Val::Num(*n as f64),
            (AggState::Sum { n: 0, .. }, _) => Val::Null,
            (AggState::Sum { sum, n }, AggFunc::Avg) => Val::Num(sum / *n as f64),
            (AggState::Sum { sum, .. }, _) => Val::Num(*sum),
            (AggState::Min(m) | AggState::Max(m), _) => m.map_or(Val::Null, Val::Num),
            (AggState::Welford { n, m2, .. }, _) => {
                if *n < 2 {
                    Val::Null
                } else {
                    Val::Num((m2.max(0.0) / (*n - 1) as f64).sqrt())
                }
            }
            (AggState::First(v) | AggState::Last(v), _) => {
                v.as_ref().map_or(Val::Null, |(_, v)| v.clone())
            }
            (AggState::Span(None), _) => Val::Null,
            (AggState::Span(Some((first, last))), AggFunc::Rate) => {
                if last.0 > first.0 {
                    Val::Num((last.1 - first.1) / ((last.0 - first.0) as f64 / 1000.0))
                } else {
                    Val::Null
                }
            }
            (AggState::Span(Some((first, last))), _) => Val::Num(last.1 - first.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn run(func: AggFunc, values: &[(i64, f64)]) -> Val<'static> {
        let mut s = func.empty();
        for &(t, v) in values {
            s.add(t, &Val::Num(v));
        }
        s.finish(func)
    }

    const XS: [(i64, f64); 5] = [
        (0, 2.0),
        (1000, 4.0),
        (2000, 4.0),
        (3000, 5.0),
        (4000, 10.0),
    ];

    #[test]
    fn each_function() {
        assert_eq!(run(AggFunc::Avg, &XS), Val::Num(5.0));
        assert_eq!(run(AggFunc::Min, &XS), Val::Num(2.0));
        assert_eq!(run(AggFunc::Max, &XS), Val::Num(10.0));
        assert_eq!(run(AggFunc::Sum, &XS), Val::Num(25.0));
        assert_eq!(run(AggFunc::Count, &XS), Val::Num(5.0));
        // 2,4,4,5,10: squared deviations from 5 sum to 36; 36 / (5 − 1) = 9.
        let Val::Num(sd) = run(AggFunc::Stddev, &XS) else {
            panic!("stddev")
        };
        assert!((sd - 3.0).abs() < 1e-12, "{sd}");
        assert_eq!(run(AggFunc::First, &XS), Val::Num(2.0));
        assert_eq!(run(AggFunc::Last, &XS), Val::Num(10.0));
        assert_eq!(run(AggFunc::Delta, &XS), Val::Num(8.0));
        assert_eq!(run(AggFunc::Rate, &XS), Val::Num(2.0));
    }

    #[test]
    fn empty_and_single() {
        for f in [
            AggFunc::Avg,
            AggFunc::Min,
            AggFunc::Max,
            AggFunc::Sum,
            AggFunc::Stddev,
        ] {
            assert_eq!(run(f, &[]), Val::Null, "{f:?}");
        }
        assert_eq!(run(AggFunc::Count, &[]), Val::Num(0.0));
        assert_eq!(run(AggFunc::Stddev, &[(0, 1.0)]), Val::Null);
        assert_eq!(run(AggFunc::Rate, &[(0, 1.0)]), Val::Null);
        assert_eq!(run(AggFunc::Delta, &[(0, 1.0)]), Val::Num(0.0));
    }

    #[test]
    fn first_last_by_timestamp_not_arrival() {
        let late_first = [(5000, 1.0), (1000, 7.0), (9000, 3.0), (2000, 8.0)];
        assert_eq!(run(AggFunc::First, &late_first), Val::Num(7.0));
        assert_eq!(run(AggFunc::Last, &late_first), Val::Num(3.0));
        assert_eq!(run(AggFunc::Delta, &late_first), Val::Num(-4.0));
    }

    #[test]
    fn merge_equals_sequential() {
        for f in [
            AggFunc::Avg,
            AggFunc::Min,
            AggFunc::Max,
            AggFunc::Sum,
            AggFunc::Count,
            AggFunc::Stddev,
            AggFunc::First,
            AggFunc::Last,
            AggFunc::Rate,
            AggFunc::Delta,
        ] {
            let whole = run(f, &XS);
            for cut in 0..=XS.len() {
                let mut a = f.empty();
                let mut b = f.empty();
                for &(t, v) in &XS[..cut] {
                    a.add(t, &Val::Num(v));
                }
                for &(t, v) in &XS[cut..] {
                    b.add(t, &Val::Num(v));
                }
                // Both orders: merge is commutative.
                let mut ab = a.clone();
                ab.merge(&b);
                b.merge(&a);
                for got in [ab.finish(f), b.finish(f)] {
                    match (&whole, &got) {
                        (Val::Num(x), Val::Num(y)) => assert!((x - y).abs() < 1e-9, "{f:?}"),
                        _ => assert_eq!(whole, got, "{f:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn nulls_skipped_and_types_checked() {
        let mut s = AggFunc::Avg.empty();
        s.add(0, &Val::Null);
        s.add(0, &Val::Num(4.0));
        assert_eq!(s.finish(AggFunc::Avg), Val::Num(4.0));
        assert!(AggFunc::Avg.check(&Val::Str(Cow::Borrowed("x"))).is_err());
        assert!(AggFunc::Last.check(&Val::Str(Cow::Borrowed("x"))).is_ok());
        let mut l = AggFunc::Last.empty();
        l.add(1, &Val::Str(Cow::Borrowed("on")));
        assert_eq!(l.finish(AggFunc::Last), Val::Str(Cow::Borrowed("on")));
    }
}
