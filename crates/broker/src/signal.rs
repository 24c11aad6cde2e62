//! A one-bit wake-up for a connection task.
//!
//! Publishers set it for every message they queue, so it must be cheap when
//! already set (one atomic swap, no lock), and the waiting side must cost no
//! per-connection future state while idle — unlike `tokio::sync::Notify`,
//! whose waiter node lives inside every idle connection's task.
//!
//! It is also where a parked connection waits (`park.rs`): instead of a
//! task's waker it then holds the connection itself, and a notification
//! resumes it in a new task. The signal is the waker the parked
//! connection leaves with its socket too, so one object per connection
//! serves both.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// A parked connection: continues in a new task when notified.
pub(crate) trait Resume: Send {
    fn resume(self: Box<Self>);
}

/// Who waits for the signal.
#[derive(Default)]
enum Waiter {
    #[default]
    Nobody,
    Task(Waker),
    Parked(Box<dyn Resume>),
}

#[derive(Default)]
pub(crate) struct Signal {
    set: AtomicBool,
    /// Set by the broker's keep-alive timer (`deadlines.rs`) before it
    /// notifies: the connection's deadline has passed.
    timer: AtomicBool,
    waiter: Mutex<Waiter>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.notify();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notify();
    }
}

impl Signal {
    /// Wake the waiting task, or resume the parked connection (or make the
    /// next wait return at once).
    pub fn notify(&self) {
        if self.set.swap(true, Ordering::AcqRel) {
            return; // Already pending: the task will see it.
        }
        self.wake_waiter();
    }

    /// [`Signal::notify`] for a message just queued, called holding the
    /// session's lock. A busy subscriber is notified once per message
    /// queued for it and most of those find a notification pending: a
    /// plain load then spares the atomic swap. That is safe only here:
    /// whoever clears the flag drains the queue afterwards, under the same
    /// lock, so it sees the message. (A flag with no lock behind it, like
    /// the timer's, needs the swap's ordering.)
    pub fn notify_queued(&self) {
        if self.set.load(Ordering::Acquire) || self.set.swap(true, Ordering::AcqRel) {
            return;
        }
        self.wake_waiter();
    }

    fn wake_waiter(&self) {
        let waiter = std::mem::take(&mut *self.waiter.lock());
        match waiter {
            Waiter::Nobody => {}
            Waiter::Task(w) => w.wake(),
            Waiter::Parked(conn) => conn.resume(),
        }
    }

    /// Leave `conn` here until the next notification, unless one is
    /// pending already (then it is handed back, the notification still
    /// pending for its next wait).
    pub(crate) fn park<C: Resume + 'static>(&self, conn: Box<C>) -> Option<Box<C>> {
        let mut waiter = self.waiter.lock();
        // Under the lock: a notify that set the flag before this check
        // finds nothing to resume, and one after it finds the connection.
        if self.set.load(Ordering::Acquire) {
            return Some(conn);
        }
        *waiter = Waiter::Parked(conn);
        None
    }

    /// Notify, saying that the keep-alive deadline passed.
    pub fn notify_timer(&self) {
        self.timer.store(true, Ordering::Release);
        self.notify();
    }

    /// Whether the keep-alive timer signalled since the last call.
    pub fn take_timer(&self) -> bool {
        self.timer.load(Ordering::Acquire) && self.timer.swap(false, Ordering::AcqRel)
    }

    /// Ready once [`Signal::notify`] has been called since the last time it
    /// was ready.
    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.set.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        {
            let mut slot = self.waiter.lock();
            match &*slot {
                Waiter::Task(w) if w.will_wake(cx.waker()) => {}
                // A task polls only while its connection is not parked.
                _ => *slot = Waiter::Task(cx.waker().clone()),
            }
        }
        // A notify between the first check and the registration took no
        // waker; look again so it is not lost.
        if self.set.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn notify_before_and_during_wait() {
        let s = Arc::new(Signal::default());
        s.notify();
        s.notify();
        std::future::poll_fn(|cx| s.poll_wait(cx)).await;
        let s2 = s.clone();
        let t = tokio::spawn(async move { std::future::poll_fn(|cx| s2.poll_wait(cx)).await });
        tokio::task::yield_now().await;
        s.notify();
        tokio::time::timeout(std::time::Duration::from_secs(5), t)
            .await
            .expect("woken")
            .expect("task");
        // Consumed: the next wait is pending.
        let waker = futures_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(s.poll_wait(&mut cx).is_pending());
    }

    fn futures_waker() -> Waker {
        Waker::noop().clone()
    }
}
