//! A one-bit wake-up for a connection task.
//!
//! Publishers set it for every message they queue, so it must be cheap when
//! already set (one atomic swap, no lock), and the waiting side must cost no
//! per-connection future state while idle — unlike `tokio::sync::Notify`,
//! whose waiter node lives inside every idle connection's task.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub(crate) struct Signal {
    set: AtomicBool,
    /// Set by the broker's keep-alive timer (`deadlines.rs`) before it
    /// notifies: the connection's deadline has passed.
    timer: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Signal {
    /// Wake the waiting task (or make its next wait return at once).
    pub fn notify(&self) {
        if self.set.swap(true, Ordering::AcqRel) {
            return; // Already pending: the task will see it.
        }
        if let Some(w) = self.waker.lock().take() {
            w.wake();
        }
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
            let mut slot = self.waker.lock();
            match &*slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
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
