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
//! The connection waits inside its own [`Signal`], which is also the
//! waker it leaves with its socket: a notification and the socket
//! becoming readable are the same event, and the signal's lock decides
//! the race between a notification and the parking (see
//! [`Signal::park`]).

use crate::connection::Connection;
use crate::signal::{Resume, Signal};
use crate::transport::Transport;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// How long a connection must have been waiting in its task before it
/// parks at its next wait. Short enough that idle fleets park within a
/// second or two, long enough that a steady subscriber (a message every
/// few hundred milliseconds or faster) never pays a spawn per message.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// Park `conn` if neither its socket nor its signal has work for it now.
/// `None`: parked (the task should end). `Some(conn)`: something is ready
/// (or the transport cannot park): carry on in this task.
pub(crate) fn park<S: Transport>(conn: Box<Connection<S>>) -> Option<Box<Connection<S>>> {
    let signal: Arc<Signal> = conn.signal().clone();
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    match conn.poll_idle(&mut cx) {
        Some(Poll::Pending) => {}
        // Readable, failed (the read reports it) or not parkable.
        Some(Poll::Ready(())) | None => return Some(conn),
    }
    let inner = conn.inner().clone();
    // Counted before the hand-over: a resume on another thread at once
    // must not count down first.
    inner.parked.fetch_add(1, Ordering::Relaxed);
    let back = signal.park(conn);
    if back.is_some() {
        inner.parked.fetch_sub(1, Ordering::Relaxed);
    }
    back
}

impl<S: Transport> Resume for Connection<S> {
    fn resume(self: Box<Self>) {
        let inner = self.inner().clone();
        inner.parked.fetch_sub(1, Ordering::Relaxed);
        // The connection's own runtime, even when the notification comes
        // from another one (the cluster fabric's) or from a plain thread.
        match inner.runtime.get() {
            Some(rt) => {
                rt.spawn(self.continued());
            }
            // Never parked without one; should it happen, dropping the
            // connection closes its socket rather than leaking it.
            None => drop(self),
        }
    }
}
