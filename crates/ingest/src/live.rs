//! The live hub: what the ingest, the connection hook and the shadows have
//! just seen, broadcast to whoever watches (the API's `/api/v1/live`
//! streams, which filter and coalesce it for the console).
//!
//! Shadow changes arrive through [`ShadowWatch`]: the fleet tells the hub
//! about every accepted update, whoever wrote it (a device over MQTT, an
//! operator, a rule, a fleet-wide setting).
//!
//! Nothing is built for it while nobody listens ([`LiveHub::active`] is one
//! atomic load), so the MQTT hot path pays nothing when no console is open.

use m2mhub_fleet::{ShadowChange, ShadowWatch, ShadowWriter};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events the hub buffers for slow listeners before they lag.
const CAPACITY: usize = 8192;
/// Streams open at once at most.
pub const MAX_STREAMS: usize = 256;

/// Something that happened, as the hub carries it.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// Points a device reported (already accepted by the store).
    Telemetry {
        tenant: Arc<str>,
        device: Arc<str>,
        /// `(metric, ts_ms, value)`.
        points: Vec<(String, i64, Value)>,
    },
    /// A device connected or disconnected.
    Connection {
        tenant: Arc<str>,
        device: Arc<str>,
        online: bool,
        ts_ms: i64,
        /// The address it connected from, or why it disconnected.
        detail: String,
    },
    /// An accepted shadow update (durable before it is sent here).
    Shadow {
        tenant: Arc<str>,
        device: Arc<str>,
        /// `""` for the classic shadow.
        name: String,
        version: u64,
        writer: ShadowWriter,
        /// Top-level `desired` keys the update added, changed or deleted.
        desired: Vec<String>,
        /// The same for `reported`.
        reported: Vec<String>,
        /// The desired keys that now differ from reported (empty: in sync).
        delta: Map<String, Value>,
        ts_ms: i64,
    },
}

impl LiveEvent {
    pub fn tenant(&self) -> &str {
        match self {
            LiveEvent::Telemetry { tenant, .. }
            | LiveEvent::Connection { tenant, .. }
            | LiveEvent::Shadow { tenant, .. } => tenant,
        }
    }

    pub fn device(&self) -> &str {
        match self {
            LiveEvent::Telemetry { device, .. }
            | LiveEvent::Connection { device, .. }
            | LiveEvent::Shadow { device, .. } => device,
        }
    }

    /// The event for an accepted shadow change.
    pub fn shadow(change: &ShadowChange) -> LiveEvent {
        let s = &change.current;
        LiveEvent::Shadow {
            tenant: s.tenant.as_str().into(),
            device: s.device_id.as_str().into(),
            name: s.name.clone(),
            version: s.version,
            writer: change.writer,
            desired: change.desired_keys(),
            reported: change.reported_keys(),
            delta: s.delta(),
            ts_ms: s.updated_ms,
        }
    }
}

/// Fan-out of live events to the open streams.
pub struct LiveHub {
    tx: broadcast::Sender<Arc<LiveEvent>>,
    streams: AtomicUsize,
}

impl Default for LiveHub {
    fn default() -> Self {
        LiveHub {
            tx: broadcast::channel(CAPACITY).0,
            streams: AtomicUsize::new(0),
        }
    }
}

impl LiveHub {
    /// Whether any stream listens: producers check this before building
    /// an event.
    pub fn active(&self) -> bool {
        // The stream count, not `receiver_count()`, which takes the
        // channel's lock: this is asked for every telemetry message.
        self.streams.load(Ordering::Relaxed) > 0
    }

    /// Open a stream: its receiver and the slot that counts it while it
    /// lives; `None` when [`MAX_STREAMS`] are open.
    pub fn subscribe(
        self: &Arc<Self>,
    ) -> Option<(broadcast::Receiver<Arc<LiveEvent>>, StreamSlot)> {
        if self.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some((self.tx.subscribe(), StreamSlot(self.clone())))
    }

    /// Hand an event to every open stream (dropped if none).
    pub fn send(&self, event: LiveEvent) {
        if self.active() {
            let _ = self.tx.send(Arc::new(event));
        }
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }
}

impl ShadowWatch for LiveHub {
    fn active(&self) -> bool {
        LiveHub::active(self)
    }

    fn changed(&self, change: &ShadowChange) {
        self.send(LiveEvent::shadow(change));
    }
}

/// Counts a stream while it is open.
pub struct StreamSlot(Arc<LiveHub>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}
