//! Device events: things about one device an operator should be able to
//! look up later — a telemetry payload that could not be decoded, for
//! example. They are reported from the MQTT hot path, so recording one never
//! touches the database on the caller's thread, and a device that misbehaves
//! thousands of times a second cannot flood the table:
//!
//! - **Exact counts** per device and kind are kept in memory
//!   ([`Fleet::device_event_counts`]), whatever is stored.
//! - **Rate limit**: at most [`EVENTS_PER_WINDOW`] events per device are
//!   stored per window of [`WINDOW_MS`]; the rest are counted, and when the
//!   window ends one summary event per suppressed kind ("N similar events
//!   suppressed") is stored in their place, by the background writer (or by
//!   the device's next event, whichever comes first).
//! - **Cap**: the background writer keeps only the newest
//!   [`KEPT_PER_DEVICE`] stored events of each device.
//! - **Backlog**: if the writer falls [`QUEUE_LIMIT`] events behind (a
//!   stalled disk), further events are dropped and counted, never queued
//!   without bound.
//!
//! Events are queued for the fleet's background writer and written with
//! alarm and command changes, in one transaction; `Fleet::flush` writes
//! them too.

use crate::{Fleet, RegistryError, Result, Shared};
use m2mhub_identity::now_ms;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Events stored per device per window at most.
pub const EVENTS_PER_WINDOW: u32 = 10;
/// The rate-limit window.
pub const WINDOW_MS: i64 = 60_000;
/// Stored events kept per device (older ones are deleted).
pub const KEPT_PER_DEVICE: usize = 1_000;
/// Queued, unwritten events at most before new ones are dropped.
pub const QUEUE_LIMIT: usize = 100_000;
/// Kinds and details are cut to these many bytes.
const MAX_KIND: usize = 64;
const MAX_DETAIL: usize = 2_048;
/// Distinct kinds counted per device (kinds come from code, so this is
/// only a guard against a bug that makes them unbounded).
const MAX_KINDS: usize = 32;

/// A stored device event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    /// Increases with every stored event (across devices): the paging cursor.
    pub id: u64,
    pub tenant: String,
    pub device_id: String,
    pub ts_ms: i64,
    /// What happened, e.g. `decode_error`.
    pub kind: String,
    pub detail: String,
}

/// Exact counts of one device's events since the registry was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEventCounts {
    /// Every `record_device_event` call.
    pub recorded: u64,
    /// Queued for storage (the rest were suppressed or dropped).
    pub queued: u64,
    /// Over the rate limit (summarized instead).
    pub suppressed: u64,
    /// Lost because the writer's queue was full.
    pub dropped: u64,
    /// `recorded` per kind.
    pub by_kind: BTreeMap<String, u64>,
}

/// One device's counters and rate-limit window.
#[derive(Debug)]
struct DeviceState {
    tenant: String,
    counts: DeviceEventCounts,
    window_start_ms: i64,
    window_queued: u32,
    /// Suppressed in the current window, per kind.
    window_suppressed: Vec<(String, u64)>,
}

/// The in-memory side of device events (behind its own mutex, taken before
/// the log queue's when both are needed).
#[derive(Debug, Default)]
pub(crate) struct DeviceEventGate {
    devices: HashMap<String, DeviceState>,
    /// Devices whose window holds suppressed events: the only ones the
    /// writer has to look at when windows end.
    suppressing: HashSet<String>,
}

/// Cut `s` to at most `max` bytes on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn clip_owned(mut s: String, max: usize) -> String {
    let end = clip(&s, max).len();
    s.truncate(end);
    s
}

impl DeviceState {
    /// End the current window if it is over: the summaries to store.
    fn roll(&mut self, device_id: &str, now: i64, force: bool) -> Vec<NewEvent> {
        let end = self.window_start_ms.saturating_add(WINDOW_MS);
        if !force && now < end {
            return Vec::new();
        }
        self.window_queued = 0;
        self.window_start_ms = now;
        std::mem::take(&mut self.window_suppressed)
            .into_iter()
            .map(|(kind, n)| NewEvent {
                tenant: self.tenant.clone(),
                device_id: device_id.to_string(),
                ts_ms: now.min(end),
                kind,
                detail: format!(
                    "{n} similar event(s) suppressed (at most {EVENTS_PER_WINDOW} events per device are stored per {} s)",
                    WINDOW_MS / 1000
                ),
            })
            .collect()
    }
}

/// An event before it has an id.
struct NewEvent {
    tenant: String,
    device_id: String,
    ts_ms: i64,
    kind: String,
    detail: String,
}

impl Shared {
    /// Give events ids and queue them for the writer; returns how many did
    /// not fit (dropped).
    fn queue_device_events(&self, events: Vec<NewEvent>) -> u64 {
        if events.is_empty() {
            return 0;
        }
        let mut q = self.queue.lock();
        let mut dropped = 0;
        let was_empty = q.events.is_empty();
        for e in events {
            if q.events.len() >= QUEUE_LIMIT {
                dropped += 1;
                continue;
            }
            let id = match q.ids.take(&*self.store, crate::ids::IdKind::DeviceEvent) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(error = %e, "no id for a device event; dropped");
                    dropped += 1;
                    continue;
                }
            };
            q.events.push(DeviceEvent {
                id,
                tenant: e.tenant,
                device_id: e.device_id,
                ts_ms: e.ts_ms,
                kind: e.kind,
                detail: e.detail,
            });
        }
        if was_empty {
            self.wake.notify_one();
        }
        dropped
    }

    /// Queue the summaries of every window that has ended by `now` (all of
    /// them with `force`, at shutdown). Called by the background writer.
    pub(crate) fn roll_device_event_windows(&self, now: i64, force: bool) {
        let mut gate = self.device_events.lock();
        if gate.suppressing.is_empty() {
            return;
        }
        let DeviceEventGate {
            devices,
            suppressing,
        } = &mut *gate;
        let mut summaries = Vec::new();
        suppressing.retain(|id| match devices.get_mut(id) {
            Some(d) => {
                let s = d.roll(id, now, force);
                if s.is_empty() {
                    true
                } else {
                    summaries.extend(s);
                    false
                }
            }
            None => false,
        });
        // Summaries that do not fit are lost like any other event; the
        // exact counts stay in memory.
        let _ = self.queue_device_events(summaries);
    }

    /// Forget a deleted device's counters and its unwritten events (a
    /// later device with the same id starts clean).
    pub(crate) fn forget_device_events(&self, device_id: &str) {
        let mut gate = self.device_events.lock();
        gate.devices.remove(device_id);
        gate.suppressing.remove(device_id);
        self.queue
            .lock()
            .events
            .retain(|e| e.device_id != device_id);
    }
}

impl Fleet {
    /// Record an event about a device (see the module docs). Safe on the
    /// MQTT hot path: no I/O, and no allocation once the device is over its
    /// rate limit. `tenant` is the device's tenant (as in its
    /// [`IngestInfo`](m2mhub_identity::IngestInfo)); events of unknown devices are
    /// ignored, so counters exist only for registered devices.
    pub fn record_device_event(&self, tenant: &str, device_id: &str, kind: &str, detail: String) {
        self.record_device_event_at(tenant, device_id, kind, detail, now_ms());
    }

    pub(crate) fn record_device_event_at(
        &self,
        tenant: &str,
        device_id: &str,
        kind: &str,
        detail: String,
        now: i64,
    ) {
        let s = &*self.shared;
        if s.identity.with_device(device_id, |_| ()).is_none() {
            return;
        }
        let kind = clip(kind, MAX_KIND);
        let mut gate = s.device_events.lock();
        let DeviceEventGate {
            devices,
            suppressing,
        } = &mut *gate;
        let d = match devices.get_mut(device_id) {
            Some(d) => d,
            None => devices
                .entry(device_id.to_string())
                .or_insert_with(|| DeviceState {
                    tenant: tenant.to_string(),
                    counts: DeviceEventCounts::default(),
                    window_start_ms: now,
                    window_queued: 0,
                    window_suppressed: Vec::new(),
                }),
        };
        if d.tenant != tenant {
            d.tenant = tenant.to_string();
        }
        d.counts.recorded += 1;
        let kinds = d.counts.by_kind.len();
        match d.counts.by_kind.get_mut(kind) {
            Some(n) => *n += 1,
            None if kinds < MAX_KINDS => {
                d.counts.by_kind.insert(kind.to_string(), 1);
            }
            None => {}
        }
        let mut out = d.roll(device_id, now, false);
        if !out.is_empty() {
            suppressing.remove(device_id);
        }
        let own = d.window_queued < EVENTS_PER_WINDOW;
        if own {
            d.window_queued += 1;
            out.push(NewEvent {
                tenant: tenant.to_string(),
                device_id: device_id.to_string(),
                ts_ms: now,
                kind: kind.to_string(),
                detail: clip_owned(detail, MAX_DETAIL),
            });
        } else {
            d.counts.suppressed += 1;
            match d.window_suppressed.iter_mut().find(|(k, _)| k == kind) {
                Some((_, n)) => *n += 1,
                None => d.window_suppressed.push((kind.to_string(), 1)),
            }
            if !suppressing.contains(device_id) {
                suppressing.insert(device_id.to_string());
            }
        }
        // Queueing stops at the first event that does not fit, so when
        // anything was dropped, the caller's own event (queued last) was.
        let dropped = s.queue_device_events(out);
        if own {
            if dropped > 0 {
                d.counts.dropped += 1;
            } else {
                d.counts.queued += 1;
            }
        }
    }

    /// Exact counts of a device's events since the registry was opened
    /// (`None` if it has had none).
    pub fn device_event_counts(&self, device_id: &str) -> Option<DeviceEventCounts> {
        self.shared
            .device_events
            .lock()
            .devices
            .get(device_id)
            .map(|d| d.counts.clone())
    }

    /// A device's stored events, newest first: those with an id below
    /// `before` (the paging cursor), of one `kind` if given, at most `limit`
    /// (1 to 1,000). With `tenant`, a device of another tenant is not found.
    pub fn list_device_events(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        kind: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeviceEvent>> {
        let known = self
            .shared
            .identity
            .with_device(device_id, |d| tenant.is_none_or(|t| d.tenant == t))
            .unwrap_or(false);
        if !known {
            return Err(RegistryError::NotFound(format!("device {device_id}")));
        }
        self.flush()?;
        self.shared
            .store
            .list_device_events(tenant, device_id, kind, before, limit.clamp(1, 1_000))
    }

    /// Queue the summaries of windows that ended by `now` (the background
    /// writer does this every second with the wall clock).
    #[cfg(test)]
    pub(crate) fn roll_device_event_windows(&self, now: i64) {
        self.shared.roll_device_event_windows(now, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;
    use m2mhub_identity::NewDevice;

    /// Fake times far ahead of the wall clock, so the background writer's
    /// own window rolling (with the real time) never interferes.
    fn base() -> i64 {
        now_ms() + 1_000_000_000
    }

    fn setup() -> (tempfile::TempDir, Fleet) {
        let (d, reg) = open();
        reg.identity()
            .create_tenant("acme", "Acme")
            .expect("tenant");
        for id in ["d1", "d2"] {
            reg.identity()
                .create_device(NewDevice {
                    id: Some(id.into()),
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .expect("device");
        }
        (d, reg)
    }

    fn list(reg: &Fleet, id: &str, kind: Option<&str>) -> Vec<DeviceEvent> {
        reg.list_device_events(Some("acme"), id, kind, None, 1_000)
            .expect("list")
    }

    #[test]
    fn rate_limited_with_exact_counts_and_summaries() {
        let (_d, reg) = setup();
        let t0 = base();
        for i in 0..25 {
            reg.record_device_event_at("acme", "d1", "decode_error", format!("bad {i}"), t0 + i);
        }
        reg.record_device_event_at("acme", "d2", "decode_error", "other".into(), t0);
        let stored = list(&reg, "d1", None);
        assert_eq!(stored.len(), 10, "at most 10 per window");
        assert_eq!(stored[0].detail, "bad 9", "newest first");
        assert_eq!(stored[9].detail, "bad 0");
        assert!(stored
            .iter()
            .all(|e| e.tenant == "acme" && e.device_id == "d1"));
        let c = reg.device_event_counts("d1").expect("counts");
        assert_eq!(
            (c.recorded, c.queued, c.suppressed, c.dropped),
            (25, 10, 15, 0)
        );
        assert_eq!(c.by_kind.get("decode_error"), Some(&25));
        assert_eq!(list(&reg, "d2", None).len(), 1, "per device");

        // Not before the window ends…
        reg.roll_device_event_windows(t0 + WINDOW_MS - 1);
        assert_eq!(list(&reg, "d1", None).len(), 10);
        // …then one summary in place of the 15.
        reg.roll_device_event_windows(t0 + WINDOW_MS);
        let stored = list(&reg, "d1", None);
        assert_eq!(stored.len(), 11);
        assert_eq!(stored[0].kind, "decode_error");
        assert!(
            stored[0]
                .detail
                .starts_with("15 similar event(s) suppressed"),
            "{}",
            stored[0].detail
        );
        assert_eq!(stored[0].ts_ms, t0 + WINDOW_MS);
        reg.roll_device_event_windows(t0 + 10 * WINDOW_MS);
        assert_eq!(list(&reg, "d1", None).len(), 11, "summarized once");

        // A new window: the device's next event also ends the old window,
        // summarizing per kind.
        let t1 = t0 + 2 * WINDOW_MS;
        for i in 0..12 {
            let kind = if i % 2 == 0 {
                "decode_error"
            } else {
                "too_large"
            };
            reg.record_device_event_at("acme", "d1", kind, format!("w2 {i}"), t1 + i);
        }
        assert_eq!(list(&reg, "d1", None).len(), 21);
        reg.record_device_event_at("acme", "d1", "too_large", "w3".into(), t1 + WINDOW_MS + 5);
        let stored = list(&reg, "d1", None);
        assert_eq!(stored.len(), 24, "two summaries and the new event");
        assert_eq!(stored[0].detail, "w3");
        assert!(stored[1..3]
            .iter()
            .all(|e| e.detail.starts_with("1 similar event(s) suppressed")));
        let too_large = list(&reg, "d1", Some("too_large"));
        assert_eq!(too_large.len(), 7, "5 + summary + w3");
        let c = reg.device_event_counts("d1").expect("counts");
        assert_eq!((c.recorded, c.queued, c.suppressed), (38, 21, 17));
        assert_eq!(c.by_kind.get("too_large"), Some(&7));
    }

    #[test]
    fn paging_scope_unknown_devices_and_clipping() {
        let (_d, reg) = setup();
        let t0 = base();
        for i in 0..10 {
            reg.record_device_event_at("acme", "d1", "k", format!("{i}"), t0 + i);
        }
        reg.record_device_event("acme", "ghost", "k", "x".into());
        assert_eq!(reg.device_event_counts("ghost"), None);
        let page1 = reg
            .list_device_events(None, "d1", None, None, 4)
            .expect("page 1");
        assert_eq!(page1.len(), 4);
        let page2 = reg
            .list_device_events(None, "d1", None, page1.last().map(|e| e.id), 4)
            .expect("page 2");
        assert_eq!(page2.len(), 4);
        assert!(page1.last().map(|e| e.id) > page2.first().map(|e| e.id));
        assert!(matches!(
            reg.list_device_events(Some("default"), "d1", None, None, 10),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.list_device_events(None, "ghost", None, None, 10),
            Err(RegistryError::NotFound(_))
        ));
        reg.record_device_event_at("acme", "d2", &"k".repeat(100), "é".repeat(2_000), t0);
        let e = &list(&reg, "d2", None)[0];
        assert_eq!(e.kind.len(), MAX_KIND);
        assert!(e.detail.len() <= MAX_DETAIL && e.detail.chars().all(|c| c == 'é'));
    }

    #[test]
    fn newest_are_kept_and_deleting_the_device_forgets_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t0 = base();
        let n = KEPT_PER_DEVICE + 25;
        let last_id = {
            let reg = crate::testutil::open_in(dir.path());
            reg.identity()
                .create_device(NewDevice {
                    id: Some("d1".into()),
                    ..Default::default()
                })
                .expect("device");
            // One event per window, so none is suppressed.
            for i in 0..n {
                let t = t0 + i as i64 * WINDOW_MS;
                reg.record_device_event_at("default", "d1", "k", format!("{i}"), t);
                if i % 300 == 0 {
                    reg.flush().expect("flush");
                }
            }
            let all = reg
                .list_device_events(None, "d1", None, None, 1_000)
                .expect("list");
            assert_eq!(all.len(), KEPT_PER_DEVICE);
            assert_eq!(all[0].detail, format!("{}", n - 1));
            assert_eq!(
                all[KEPT_PER_DEVICE - 1].detail,
                "25",
                "the oldest 25 are gone"
            );
            let older = reg
                .list_device_events(None, "d1", None, all.last().map(|e| e.id), 1_000)
                .expect("older");
            assert!(older.is_empty());
            all[0].id
        };
        // Ids continue after a reopen.
        let reg = crate::testutil::open_in(dir.path());
        reg.record_device_event_at("default", "d1", "k", "after".into(), t0);
        let newest = reg
            .list_device_events(None, "d1", None, None, 1)
            .expect("list");
        assert_eq!(newest[0].id, last_id + 1);

        reg.record_device_event_at("default", "d1", "k", "queued".into(), t0 + 1);
        reg.identity().delete_device("d1").expect("delete");
        assert_eq!(reg.device_event_counts("d1"), None);
        reg.identity()
            .create_device(NewDevice {
                id: Some("d1".into()),
                ..Default::default()
            })
            .expect("same id again");
        assert!(reg
            .list_device_events(None, "d1", None, None, 10)
            .expect("list")
            .is_empty());
    }

    #[test]
    fn shutdown_writes_the_open_windows_summaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = crate::testutil::open_in(dir.path());
            reg.identity()
                .create_device(NewDevice {
                    id: Some("d1".into()),
                    ..Default::default()
                })
                .expect("device");
            for _ in 0..13 {
                reg.record_device_event("default", "d1", "decode_error", "x".into());
            }
        }
        let reg = crate::testutil::open_in(dir.path());
        let all = reg
            .list_device_events(None, "d1", None, None, 100)
            .expect("list");
        assert_eq!(all.len(), 11);
        assert!(all[0].detail.starts_with("3 similar event(s) suppressed"));
    }
}
