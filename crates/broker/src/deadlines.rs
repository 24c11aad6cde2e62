//! The keep-alive deadlines of every connection, in one broker-wide
//! timer.
//!
//! A timer per connection (a boxed tokio `Sleep`, about 112 bytes and a
//! timer-wheel entry) is a large share of what an idle connection costs.
//! Here a connection registers a weak handle to its [`Signal`] under the
//! tick its deadline falls in; one task wakes every [`TICK`], takes the
//! due entries and signals their connections, which check the keep alive
//! in their protocol core and register again for the new deadline if the
//! client was heard from meanwhile. Traffic never touches this structure:
//! a packet only moves the core's deadline, and a connection has at most
//! one entry, re-armed once per keep-alive period. A deadline is seen up
//! to one tick late, well inside the 1.5 × keep-alive grace of MQTT.
//!
//! The same ticks carry plain wake-ups ([`Deadlines::wake_at`]): a
//! connection that became active waits in its task, and asks to be woken
//! once a little later to see whether it has gone quiet and can park
//! (`park.rs`); those entries do not set the timer flag.

use crate::signal::Signal;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// How often due deadlines are looked for.
pub(crate) const TICK: Duration = Duration::from_millis(100);

pub(crate) struct Deadlines {
    /// Tick number (since `epoch`) → the connections due at its end.
    slots: Mutex<BTreeMap<u64, Vec<Weak<Signal>>>>,
    /// The same for plain wake-ups.
    wakes: Mutex<BTreeMap<u64, Vec<Weak<Signal>>>>,
    epoch: Instant,
    /// The ticking task has been started (lazily, on a runtime).
    ticking: AtomicBool,
}

impl Deadlines {
    pub(crate) fn new() -> Arc<Deadlines> {
        Arc::new(Deadlines {
            slots: Mutex::new(BTreeMap::new()),
            wakes: Mutex::new(BTreeMap::new()),
            epoch: Instant::now(),
            ticking: AtomicBool::new(false),
        })
    }

    /// The tick at whose end `at` has passed (rounded up).
    fn slot_after(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.epoch);
        let tick = TICK.as_nanos();
        u64::try_from(d.as_nanos().div_ceil(tick)).unwrap_or(u64::MAX)
    }

    /// Signal `signal` (with its timer flag set) once `at` has passed.
    pub(crate) fn arm(self: &Arc<Self>, at: Instant, signal: &Arc<Signal>) {
        self.insert(&self.slots, at, signal);
    }

    /// Notify `signal` (without the timer flag) once `at` has passed.
    pub(crate) fn wake_at(self: &Arc<Self>, at: Instant, signal: &Arc<Signal>) {
        self.insert(&self.wakes, at, signal);
    }

    fn insert(
        self: &Arc<Self>,
        map: &Mutex<BTreeMap<u64, Vec<Weak<Signal>>>>,
        at: Instant,
        signal: &Arc<Signal>,
    ) {
        if !self.ticking.load(Ordering::Relaxed) && !self.ticking.swap(true, Ordering::AcqRel) {
            self.start();
        }
        let slot = self.slot_after(at);
        map.lock()
            .entry(slot)
            .or_default()
            .push(Arc::downgrade(signal));
    }

    fn start(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime: whoever arms next (from a connection task, which
            // always runs on one) starts it.
            self.ticking.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                // The broker is gone: so is every connection.
                let Some(this) = weak.upgrade() else { return };
                this.fire(Instant::now());
            }
        });
    }

    /// Signal every connection whose deadline has passed by `now`; how
    /// many were signalled.
    /// (Plain wake-ups are not counted.)
    pub(crate) fn fire(&self, now: Instant) -> usize {
        let current = {
            let d = now.saturating_duration_since(self.epoch);
            u64::try_from(d.as_nanos() / TICK.as_nanos()).unwrap_or(u64::MAX)
        };
        let mut n = 0;
        for signal in take_due(&self.slots, current) {
            if let Some(s) = signal.upgrade() {
                s.notify_timer();
                n += 1;
            }
        }
        for signal in take_due(&self.wakes, current) {
            if let Some(s) = signal.upgrade() {
                s.notify();
            }
        }
        n
    }

    /// Entries waiting (tests and metrics).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.lock().values().map(Vec::len).sum()
    }
}

/// The entries of every tick up to and including `current`.
fn take_due(map: &Mutex<BTreeMap<u64, Vec<Weak<Signal>>>>, current: u64) -> Vec<Weak<Signal>> {
    let due = {
        let mut slots = map.lock();
        match slots.first_key_value() {
            Some((first, _)) if *first <= current => {}
            _ => return Vec::new(),
        }
        let later = slots.split_off(&current.saturating_add(1));
        std::mem::replace(&mut *slots, later)
    };
    due.into_values().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn due_connections_are_signalled_once_and_gone_ones_skipped() {
        let d = Deadlines::new();
        let t0 = Instant::now();
        let a = Arc::new(Signal::default());
        let b = Arc::new(Signal::default());
        let gone = Arc::new(Signal::default());
        d.arm(t0 + Duration::from_millis(250), &a);
        d.arm(t0 + Duration::from_secs(5), &b);
        d.arm(t0 + Duration::from_millis(100), &gone);
        drop(gone);
        assert_eq!(
            d.fire(t0 + Duration::from_millis(200)),
            0,
            "a is not due yet"
        );
        assert!(!a.take_timer());
        assert_eq!(d.fire(t0 + Duration::from_millis(300)), 1);
        assert!(a.take_timer(), "a was told its deadline passed");
        assert!(!a.take_timer(), "once");
        assert!(!b.take_timer());
        assert_eq!(d.len(), 1);
        assert_eq!(d.fire(t0 + Duration::from_millis(300)), 0, "nothing twice");
        // The ticking task does the same by itself.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(b.take_timer());
        assert_eq!(d.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_wake_up_notifies_without_the_timer_flag() {
        let d = Deadlines::new();
        let t0 = Instant::now();
        let a = Arc::new(Signal::default());
        d.wake_at(t0 + Duration::from_millis(250), &a);
        assert_eq!(d.fire(t0 + Duration::from_millis(300)), 0, "not a deadline");
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(a.poll_wait(&mut cx).is_ready(), "notified");
        assert!(!a.take_timer(), "without the timer flag");
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_deadline_inside_a_tick_waits_for_its_end() {
        let d = Deadlines::new();
        let at = d.epoch + Duration::from_millis(150);
        assert_eq!(d.slot_after(at), 2);
        assert_eq!(d.slot_after(d.epoch + TICK), 1);
        assert_eq!(d.slot_after(d.epoch), 0);
    }
}
