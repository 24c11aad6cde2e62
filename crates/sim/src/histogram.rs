//! A small log-bucketed histogram for latencies (in nanoseconds).
//!
//! Values below 32 are counted exactly; above that every power-of-two range
//! `[2^e, 2^(e+1))` is split into 32 equal buckets, so a value is known to
//! within 1/32 (~3%) of itself, and percentiles report the bucket midpoint
//! (error at most ~1.6%). Recording is one `leading_zeros`, a shift and an
//! increment; the whole table is 1,920 counters and can be merged.

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS; // sub-buckets per power of two
const GROUPS: usize = 64 - SUB_BITS as usize + 1;
const BUCKETS: usize = GROUPS * SUB;

/// A latency histogram over `u64` values with ~3% relative precision.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.total)
            .field("min", &self.min())
            .field("max", &self.max)
            .field("p50", &self.percentile(50.0))
            .field("p99", &self.percentile(99.0))
            .finish()
    }
}

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = e - SUB_BITS;
    let mantissa = (v >> shift) as usize; // in [SUB, 2*SUB)
    (e - SUB_BITS + 1) as usize * SUB + (mantissa - SUB)
}

/// `(lowest value, width)` of bucket `idx`.
fn bounds(idx: usize) -> (u64, u64) {
    if idx < SUB {
        return (idx as u64, 1);
    }
    let group = idx / SUB; // >= 1
    let mantissa = (idx % SUB + SUB) as u64;
    let shift = (group - 1) as u32;
    (mantissa << shift, 1u64 << shift)
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0u64; BUCKETS].into_boxed_slice(),
            total: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }

    /// Count one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v as u128;
    }

    /// Add every value counted by `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += *b;
        }
        self.total += other.total;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// Smallest recorded value (exact), 0 when empty.
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest recorded value (exact), 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value below which `p` percent of the recorded values fall
    /// (nearest-rank, reported as the bucket midpoint clamped to the exact
    /// min/max; p0 and p100 are the exact min and max). 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let p = p.clamp(0.0, 100.0);
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        if rank >= self.total {
            return self.max;
        }
        if p == 0.0 {
            return self.min;
        }
        let mut seen = 0u64;
        for (idx, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            seen += c;
            if seen >= rank {
                let (low, width) = bounds(idx);
                let mid = low.saturating_add((width - 1) / 2);
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_bounds_agree() {
        for v in (0..100_000u64).chain([u64::MAX, u64::MAX / 3, 1 << 40, (1 << 40) - 1]) {
            let (low, width) = bounds(index(v));
            assert!(low <= v && v - low < width, "v={v} low={low} width={width}");
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn empty() {
        let h = Histogram::new();
        assert_eq!(h.percentile(50.0), 0);
        assert_eq!(h.max(), 0);
        assert_eq!(h.min(), 0);
        assert_eq!(h.count(), 0);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=20 {
            h.record(v);
        }
        assert_eq!(h.percentile(50.0), 10);
        assert_eq!(h.percentile(100.0), 20);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.percentile(95.0), 19);
    }

    fn close(actual: u64, expected: u64) -> bool {
        let err = (actual as f64 - expected as f64).abs() / expected as f64;
        err <= 1.0 / 32.0
    }

    #[test]
    fn uniform_percentiles() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (p, want) in [
            (50.0, 50_000_000),
            (90.0, 90_000_000),
            (99.0, 99_000_000),
            (99.9, 99_900_000),
        ] {
            let got = h.percentile(p);
            assert!(close(got, want), "p{p}: got {got}, want ~{want}");
        }
        assert_eq!(h.max(), 100_000_000);
        assert_eq!(h.min(), 1000);
        assert_eq!(h.percentile(100.0), 100_000_000);
        assert!((h.mean() - 50_000_500.0).abs() < 1.0);
    }

    #[test]
    fn skewed_distribution_and_merge() {
        // 990 fast values and 10 slow outliers: p50 fast, p99 fast, max slow.
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for _ in 0..990 {
            a.record(200_000);
        }
        for _ in 0..10 {
            b.record(50_000_000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 1000);
        assert!(close(a.percentile(50.0), 200_000));
        assert!(close(a.percentile(99.0), 200_000));
        assert!(close(a.percentile(99.1), 50_000_000));
        assert_eq!(a.max(), 50_000_000);
    }
}
