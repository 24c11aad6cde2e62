//! The broker's recent past: a ring of one-minute samples of its counters
//! and gauges over the last hour, for the console's overview charts
//! (`GET /api/v1/broker/history`).
//!
//! The broker keeps only totals since start (`/metrics`, `/broker`); a rate
//! over time needs someone to remember earlier totals. A Prometheus server
//! does that for a deployment that runs one; this ring does it for the
//! console alone, in a few kilobytes, and forgets on restart. The ring is
//! sans-IO: [`BrokerHistory::record`] takes a timestamp, so tests step it
//! with a fake clock; [`sample_every_minute`] is the thin driver.

use crate::caller::Caller;
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use m2mhub_identity::{now_ms, Role};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// Samples kept: an hour of minutes, plus the one before the first
/// interval (a rate needs two samples).
pub const CAPACITY: usize = 61;

/// The broker's counters (totals since start) that become rates, in the
/// order of [`Sample::counters`], with the name each rate is reported as.
pub const RATES: [(&str, &str); 6] = [
    ("messages_received", "messages_in_per_s"),
    ("messages_sent", "messages_out_per_s"),
    ("connects_succeeded", "connects_per_s"),
    ("auth_failures", "auth_failures_per_s"),
    ("bytes_received", "bytes_in_per_s"),
    ("messages_dropped_queue_full", "dropped_per_s"),
];

/// One reading of the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub ts_ms: i64,
    /// The totals of [`RATES`], in its order.
    pub counters: [u64; RATES.len()],
    /// Connections open at that moment.
    pub connections: u64,
}

impl Sample {
    /// Read the broker now.
    pub fn of(broker: &m2mhub_broker::Broker, ts_ms: i64) -> Sample {
        let all = broker.metrics().counters();
        let mut counters = [0; RATES.len()];
        for (slot, (name, _)) in counters.iter_mut().zip(RATES) {
            *slot = all
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or(0, |(_, _, v)| *v);
        }
        Sample {
            ts_ms,
            counters,
            connections: broker.gauges().connections,
        }
    }
}

/// The ring of samples, oldest first.
#[derive(Debug, Default)]
pub struct BrokerHistory {
    samples: Mutex<VecDeque<Sample>>,
}

impl BrokerHistory {
    /// Keep a sample; the oldest goes once the ring is full. A sample older
    /// than the newest kept (a clock step back) replaces nothing and is
    /// dropped, so rates never come out negative in time.
    pub fn record(&self, s: Sample) {
        let mut ring = self.samples.lock();
        if ring.back().is_some_and(|last| s.ts_ms <= last.ts_ms) {
            return;
        }
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(s);
    }

    /// One point per interval between consecutive samples, and a last one
    /// from the newest sample to `now` (the minute in progress, so a fresh
    /// server shows a rate at once). Each point is stamped with its
    /// interval's end and carries the connections open then.
    pub fn points(&self, now: Sample) -> Vec<Value> {
        let ring = self.samples.lock();
        let mut seq: Vec<Sample> = ring.iter().copied().collect();
        drop(ring);
        if seq.last().is_none_or(|last| now.ts_ms > last.ts_ms) {
            seq.push(now);
        }
        seq.windows(2)
            .map(|w| {
                let (a, b) = (w[0], w[1]);
                let secs = (b.ts_ms - a.ts_ms) as f64 / 1000.0;
                let mut o = serde_json::Map::new();
                o.insert("ts_ms".into(), json!(b.ts_ms));
                o.insert("seconds".into(), json!(secs));
                for (i, (_, rate)) in RATES.iter().enumerate() {
                    // A counter that went down (it never should) counts as
                    // no traffic rather than a negative rate.
                    let d = b.counters[i].saturating_sub(a.counters[i]) as f64;
                    let r = if secs > 0.0 { d / secs } else { 0.0 };
                    o.insert((*rate).into(), json!((r * 1000.0).round() / 1000.0));
                }
                o.insert("connections".into(), json!(b.connections));
                Value::Object(o)
            })
            .collect()
    }
}

/// Take a sample now and then every [`INTERVAL`] until the task is dropped.
pub fn sample_every_minute(
    broker: m2mhub_broker::Broker,
    history: Arc<BrokerHistory>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            history.record(Sample::of(&broker, now_ms()));
        }
    })
}

/// `GET /api/v1/broker/history`: rates over the last hour, minute by minute.
pub async fn history(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let now = Sample::of(&state.broker, now_ms());
    Ok(Json(json!({
        "interval_s": INTERVAL.as_secs(),
        "points": state.broker_history.points(now),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ts_ms: i64, received: u64, connections: u64) -> Sample {
        Sample {
            ts_ms,
            counters: [received, received * 2, 1, 0, received * 100, 0],
            connections,
        }
    }

    #[test]
    fn rates_are_differences_over_the_interval_and_the_minute_in_progress_counts() {
        let h = BrokerHistory::default();
        h.record(sample(0, 0, 1));
        h.record(sample(60_000, 600, 2));
        let pts = h.points(sample(90_000, 690, 3));
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0]["ts_ms"], 60_000);
        assert_eq!(pts[0]["messages_in_per_s"], 10.0);
        assert_eq!(pts[0]["messages_out_per_s"], 20.0);
        assert_eq!(pts[0]["bytes_in_per_s"], 1000.0);
        assert_eq!(pts[0]["connects_per_s"], 0.0);
        assert_eq!(pts[0]["connections"], 2);
        // The last 30 s, not yet a full sample.
        assert_eq!(pts[1]["seconds"], 30.0);
        assert_eq!(pts[1]["messages_in_per_s"], 3.0);
        assert_eq!(pts[1]["connections"], 3);
    }

    #[test]
    fn the_ring_keeps_an_hour_and_ignores_a_clock_going_back() {
        let h = BrokerHistory::default();
        for i in 0..200 {
            h.record(sample(i * 60_000, i as u64 * 60, 0));
        }
        h.record(sample(0, 0, 0));
        let pts = h.points(sample(199 * 60_000, 0, 0));
        // 61 samples make 60 intervals; `now` equal to the newest adds none.
        assert_eq!(pts.len(), CAPACITY - 1);
        assert_eq!(pts[0]["ts_ms"], (200 - CAPACITY as i64 + 1) * 60_000);
        assert!(pts.iter().all(|p| p["messages_in_per_s"] == 1.0), "{pts:?}");
    }

    #[test]
    fn an_empty_ring_gives_nothing_and_a_counter_reset_no_negative_rate() {
        let h = BrokerHistory::default();
        assert!(h.points(sample(5, 10, 0)).is_empty());
        h.record(sample(0, 100, 0));
        let pts = h.points(sample(60_000, 40, 0));
        assert_eq!(pts[0]["messages_in_per_s"], 0.0);
    }
}
