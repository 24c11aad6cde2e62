//! `zscore(x [, n])`: how unusual a value is against the device's own
//! recent history.
//!
//! The baseline is an exponentially weighted mean and variance whose
//! weight is `1/k` for the k-th sample until `n` samples (so the warm-up is
//! the exact running mean and population variance) and `1/n` after, which
//! behaves like a rolling window of about `n` samples without storing them.
//! A value is scored against the baseline *before* it is folded in. The
//! score is null until [`WARMUP`] samples (fewer when `n` is smaller), so a
//! fresh device raises no anomaly on its first readings; a flat baseline
//! (zero variance) scores any different value as ±infinity.

/// Samples needed before a score is given.
pub(crate) const WARMUP: u64 = 10;
/// Default `n` of `zscore(x)`.
pub(crate) const DEFAULT_SAMPLES: f64 = 100.0;

/// One baseline (per key and per `zscore` call in the rule).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Baseline {
    n: u64,
    mean: f64,
    var: f64,
    /// The last score, replayed when a timer re-evaluates the condition.
    pub(crate) last: Option<f64>,
}

impl Baseline {
    /// Score `x`, then fold it into the baseline.
    pub(crate) fn observe(&mut self, x: f64, samples: f64) -> Option<f64> {
        let warm = WARMUP.min(samples as u64);
        let score = if self.n >= warm {
            let sd = self.var.max(0.0).sqrt();
            let d = x - self.mean;
            Some(if sd > 0.0 {
                d / sd
            } else if d == 0.0 {
                0.0
            } else {
                d.signum() * f64::INFINITY
            })
        } else {
            None
        };
        if x.is_finite() {
            self.n += 1;
            let a = (1.0 / self.n as f64).max(1.0 / samples);
            let d = x - self.mean;
            let inc = a * d;
            self.mean += inc;
            self.var = (1.0 - a) * (self.var + d * inc);
        }
        self.last = score;
        score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_scores() {
        let mut b = Baseline::default();
        // Alternating 19/21: mean 20, population sd 1.
        for i in 0..WARMUP {
            let x = if i % 2 == 0 { 19.0 } else { 21.0 };
            assert_eq!(b.observe(x, 100.0), None);
        }
        let z = b.observe(25.0, 100.0).expect("warm");
        assert!((z - 5.0).abs() < 1e-9, "{z}");
        let z = b.observe(20.0, 100.0).expect("warm");
        assert!(z.abs() < 0.5, "{z}");
    }

    #[test]
    fn flat_baseline() {
        let mut b = Baseline::default();
        for _ in 0..WARMUP {
            b.observe(5.0, 100.0);
        }
        assert_eq!(b.observe(5.0, 100.0), Some(0.0));
        assert_eq!(b.observe(6.0, 100.0), Some(f64::INFINITY));
    }

    #[test]
    fn forgets_old_history() {
        let mut b = Baseline::default();
        for _ in 0..1000 {
            b.observe(0.0, 20.0);
        }
        for _ in 0..200 {
            b.observe(100.0, 20.0);
        }
        // After 10× n samples at the new level, the new level is normal.
        let z = b.observe(100.0, 20.0).expect("warm");
        assert!(z.abs() < 0.1, "{z}");
    }
}
