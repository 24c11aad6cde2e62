//! Each client's own publish-rate baseline, to notice a device that suddenly
//! publishes far more than it usually does (a compromised or broken device)
//! even when no fixed limit is configured.
//!
//! One-minute windows; the baseline is an exponentially weighted average of
//! past windows. A window is anomalous when, after a few windows of history,
//! its rate is more than [`FACTOR`] times the baseline and above a floor, so
//! a device going from 1 to 3 messages a minute is not an event.

use std::time::Duration;
use tokio::time::Instant;

const WINDOW: Duration = Duration::from_secs(60);
/// How many times the baseline counts as anomalous.
pub(crate) const FACTOR: f64 = 10.0;
/// Below this rate (messages per second) nothing is anomalous.
const FLOOR_PER_SEC: f64 = 1.0;
/// Windows of history before judging.
const WARMUP_WINDOWS: u32 = 3;

pub(crate) struct RateBaseline {
    window_start: Instant,
    count: u32,
    baseline: f64,
    windows: u32,
}

/// A window that stood out: its rate and the baseline it was judged against.
#[derive(Debug, PartialEq)]
pub(crate) struct Anomaly {
    pub rate: f64,
    pub baseline: f64,
}

impl RateBaseline {
    pub fn new(now: Instant) -> Self {
        RateBaseline {
            window_start: now,
            count: 0,
            baseline: 0.0,
            windows: 0,
        }
    }

    /// Count one PUBLISH; at the end of a window, judge it.
    pub fn record(&mut self, now: Instant) -> Option<Anomaly> {
        self.count = self.count.saturating_add(1);
        let elapsed = now.duration_since(self.window_start);
        if elapsed < WINDOW {
            return None;
        }
        let rate = f64::from(self.count) / elapsed.as_secs_f64();
        let verdict = (self.windows >= WARMUP_WINDOWS
            && rate > FLOOR_PER_SEC
            && rate > FACTOR * self.baseline)
            .then_some(Anomaly {
                rate,
                baseline: self.baseline,
            });
        self.baseline = if self.windows == 0 {
            rate
        } else {
            0.8 * self.baseline + 0.2 * rate
        };
        self.windows += 1;
        self.window_start = now;
        self.count = 0;
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publish `per_min` messages spread over one minute.
    fn minute(b: &mut RateBaseline, start: Instant, per_min: u32) -> (Option<Anomaly>, Instant) {
        let step = WINDOW / per_min.max(1);
        let mut t = start;
        let mut out = None;
        for _ in 0..per_min {
            t += step;
            if let Some(a) = b.record(t) {
                out = Some(a);
            }
        }
        (out, t)
    }

    #[test]
    fn steady_devices_are_quiet_and_a_burst_is_noticed() {
        let mut t = Instant::now();
        let mut b = RateBaseline::new(t);
        for _ in 0..6 {
            let (a, end) = minute(&mut b, t, 120);
            assert_eq!(a, None, "steady rate is not an anomaly");
            t = end;
        }
        let (a, end) = minute(&mut b, t, 3000);
        t = end;
        // The burst is judged when the next window closes.
        let (a2, _) = minute(&mut b, t, 120);
        let a = a.or(a2).expect("a 25x burst is an anomaly");
        assert!(a.rate > 10.0 * a.baseline, "{a:?}");
    }

    #[test]
    fn slow_devices_never_trigger() {
        let mut t = Instant::now();
        let mut b = RateBaseline::new(t);
        for per_min in [1, 1, 1, 1, 30, 50] {
            let (a, end) = minute(&mut b, t, per_min);
            assert_eq!(a, None, "{per_min}/min is under the floor");
            t = end;
        }
    }
}
