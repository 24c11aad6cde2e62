//! Per-address request rate limiting: a token bucket per client IP address.
//!
//! The table is bounded. When it is full, idle addresses (whose bucket has
//! refilled) are dropped; if it is still full, addresses not in the table
//! share one overflow bucket, so a flood from many spoofed addresses
//! cannot grow memory and can only starve other newcomers, never the
//! clients already known.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// One bucket, in thousandths of a request so that integer refill is exact.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli: u64,
    updated: Instant,
}

/// Token buckets per IP address. See the module documentation.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: u64,
    burst_milli: u64,
    max_entries: usize,
    buckets: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
    last_sweep: Option<Instant>,
}

impl RateLimiter {
    /// `per_second` requests per second on average, bursts of `burst`, for
    /// at most `max_entries` addresses.
    pub fn new(now: Instant, per_second: u32, burst: u32, max_entries: usize) -> RateLimiter {
        let burst_milli = u64::from(burst.max(1)) * 1000;
        RateLimiter {
            per_second: u64::from(per_second),
            burst_milli,
            max_entries,
            buckets: HashMap::new(),
            overflow: Bucket {
                milli: burst_milli,
                updated: now,
            },
            last_sweep: None,
        }
    }

    /// Addresses tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// No address tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Take one request from `ip`'s bucket; `false` when over the limit.
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_entries {
            self.sweep(now);
        }
        let (per_second, burst) = (self.per_second, self.burst_milli);
        let bucket = if self.buckets.len() < self.max_entries || self.buckets.contains_key(&ip) {
            self.buckets.entry(ip).or_insert(Bucket {
                milli: burst,
                updated: now,
            })
        } else {
            &mut self.overflow
        };
        refill(bucket, now, per_second, burst);
        if bucket.milli >= 1000 {
            bucket.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// How long until `ip` may send again (the Max-Age of a refusal), in
    /// whole seconds, at least one.
    pub fn retry_after(&self, ip: IpAddr) -> u32 {
        let bucket = self.buckets.get(&ip).unwrap_or(&self.overflow);
        if self.per_second == 0 {
            return 60;
        }
        let missing = 1000u64.saturating_sub(bucket.milli);
        let secs = missing.div_ceil(self.per_second * 1000).max(1);
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    /// Drop the buckets that are full again (their addresses are idle), at
    /// most once a second so that a flood does not make every request scan.
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_sweep = Some(now);
        let (per_second, burst) = (self.per_second, self.burst_milli);
        self.buckets.retain(|_, b| {
            refill(b, now, per_second, burst);
            b.milli < burst
        });
    }
}

fn refill(b: &mut Bucket, now: Instant, per_second: u64, burst: u64) {
    let elapsed = now.saturating_duration_since(b.updated).as_millis();
    let elapsed = u64::try_from(elapsed).unwrap_or(u64::MAX);
    b.milli = b
        .milli
        .saturating_add(elapsed.saturating_mul(per_second))
        .min(burst);
    b.updated = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(t0, 2, 3, 10);
        assert!((0..3).all(|_| rl.allow(t0, ip(1))));
        assert!(!rl.allow(t0, ip(1)));
        assert_eq!(rl.retry_after(ip(1)), 1);
        // Another address has its own bucket.
        assert!(rl.allow(t0, ip(2)));
        // Two per second.
        let t1 = t0 + Duration::from_millis(500);
        assert!(rl.allow(t1, ip(1)));
        assert!(!rl.allow(t1, ip(1)));
    }

    #[test]
    fn full_table_sweeps_idle_addresses_then_shares_an_overflow_bucket() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(t0, 1, 1, 2);
        assert!(rl.allow(t0, ip(1)));
        assert!(rl.allow(t0, ip(2)));
        // Full, nobody idle: newcomers share the overflow bucket.
        assert!(rl.allow(t0, ip(3)));
        assert!(!rl.allow(t0, ip(4)));
        assert_eq!(rl.len(), 2);
        // Later the idle buckets are swept and the newcomer gets its own.
        let t1 = t0 + Duration::from_secs(5);
        assert!(rl.allow(t1, ip(4)));
        assert!(rl.len() <= 2);
    }
}
