//! Idle connections without a task.
//!
//! Most of a large fleet's connections are idle most of the time: a meter
//! that reports every fifteen minutes and pings in between. A tokio task
//! per connection costs its cell (the future, the scheduler's header and
//! trailer, aligned to 128 bytes: 384 bytes here) for as long as the
//! connection lives, even though it does nothing. So when a plain-TCP
//! connection has nothing to read, write or acknowledge, its task ends
//! and the boxed [`Connection`] is *parked*: it is kept alive only by the
//! wakers it registered with the two things that can give it work, the
//! socket's read readiness and its [`crate::signal::Signal`] (deliveries,
//! kicks, bans, shutdown, the keep-alive timer). The first of them to
//! fire spawns a new task that resumes the connection where it stopped.
//! Mosquitto gets the same effect from its single event loop.
//!
//! The cost moves to activity: one task spawn (an allocation and a
//! scheduling) per wake-up from parking. A connection therefore parks only
//! once it has been quiet for a while ([`PARK_AFTER`]) — a busy
//! subscriber or publisher stays in its task — except right after its
//! CONNECT, when most connections of a fleet go quiet at once.
//!
//! The hand-over is a three-state atomic so a wake-up that races the
//! parking is never lost: the parking side stores the connection, then
//! moves `PARKING → PARKED`; a waker that finds `PARKING` marks `WOKEN`
//! and leaves the connection to the parking side, which sees its compare
//! fail and carries on in its own task.

use crate::connection::Connection;
use crate::transport::Transport;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// How long a connection must have been waiting in its task before it
/// parks at its next wait. Short enough that idle fleets park within a
/// second or two, long enough that a steady subscriber (a message every
/// few hundred milliseconds or faster) never pays a spawn per message.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

const PARKING: u8 = 0;
const PARKED: u8 = 1;
const WOKEN: u8 = 2;

/// A parked connection, owned by the wakers that point at it.
struct Parked<S: Transport> {
    state: AtomicU8,
    conn: Mutex<Option<Box<Connection<S>>>>,
}

/// Park `conn` if neither its socket nor its signal has work for it now.
/// `None`: parked (the task should end). `Some(conn)`: something is ready
/// (or the transport cannot park): carry on in this task; a consumed
/// signal has been raised again so the caller's wait sees it.
pub(crate) fn park<S: Transport>(conn: Box<Connection<S>>) -> Option<Box<Connection<S>>> {
    let parked = Arc::new(Parked {
        state: AtomicU8::new(PARKING),
        conn: Mutex::new(None),
    });
    let waker = Waker::from(parked.clone());
    let mut cx = Context::from_waker(&waker);
    match conn.poll_idle(&mut cx) {
        Some(Poll::Pending) => {}
        // Readable, failed (the read reports it) or not parkable.
        Some(Poll::Ready(())) | None => return Some(conn),
    }
    if conn.signal().poll_wait(&mut cx).is_ready() {
        conn.signal().notify();
        return Some(conn);
    }
    let inner = conn.inner().clone();
    *parked.conn.lock() = Some(conn);
    if parked
        .state
        .compare_exchange(PARKING, PARKED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Woken while parking: the waker left the connection to us.
        return parked.conn.lock().take();
    }
    inner.parked.fetch_add(1, Ordering::Relaxed);
    None
}

impl<S: Transport> Wake for Parked<S> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.swap(WOKEN, Ordering::AcqRel) != PARKED {
            return; // Still parking (it carries on), or already resumed.
        }
        let Some(conn) = self.conn.lock().take() else {
            return;
        };
        conn.inner().parked.fetch_sub(1, Ordering::Relaxed);
        // The connection's own runtime, even when the waker runs on
        // another one (the cluster fabric's) or on a plain thread.
        match conn.inner().runtime.get().cloned() {
            Some(rt) => {
                rt.spawn(conn.resume());
            }
            // Never parked without one; should it happen, dropping the
            // connection closes its socket rather than leaking it.
            None => drop(conn),
        }
    }
}
