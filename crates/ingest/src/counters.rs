//! What the ingest counted, for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Ingest counters (kept by the pipeline, whatever protocol fed it; shown on `/metrics`).
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub messages: AtomicU64,
    pub points: AtomicU64,
    pub decode_errors: AtomicU64,
    pub rejected_points: AtomicU64,
    pub refused_messages: AtomicU64,
    pub unknown_devices: AtomicU64,
}

impl IngestCounters {
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 6] {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("messages", "telemetry messages received", l(&self.messages)),
            ("points", "points accepted into the time-series store", l(&self.points)),
            ("decode_errors", "telemetry payloads that could not be decoded (kept as device events)", l(&self.decode_errors)),
            ("rejected_points", "points refused (a value of the wrong kind for its series)", l(&self.rejected_points)),
            ("refused_messages", "telemetry messages refused because the store could not take them (disk full, I/O error)", l(&self.refused_messages)),
            ("unknown_devices", "telemetry messages for devices the registry does not know", l(&self.unknown_devices)),
        ]
    }
}
