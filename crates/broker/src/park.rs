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
//! [`Signal::park`]). A parked plain-TCP socket leaves tokio's reactor
//! for the parking [`Reactor`] below, which watches it for a fraction of
//! the memory.

use crate::connection::Connection;
use crate::signal::{Resume, Signal};
use crate::transport::Transport;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

/// How long a connection must have been waiting in its task before it
/// parks at its next wait. Short enough that idle fleets park within a
/// second or two, long enough that a steady subscriber (a message every
/// few hundred milliseconds or faster) never pays a spawn per message.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// Park `conn` if neither its socket nor its signal has work for it now.
/// `None`: parked (the task should end). `Some(conn)`: something is ready
/// (or the transport cannot park): carry on in this task.
pub(crate) fn park<S: Transport>(mut conn: Box<Connection<S>>) -> Option<Box<Connection<S>>> {
    let signal: Arc<Signal> = conn.signal().clone();
    let waker = Waker::from(signal.clone());
    match conn.park_io(&waker) {
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

/// The parking reactor: one thread and one epoll instance that watch the
/// sockets of parked plain-TCP connections for readability.
///
/// Tokio's registration of a socket (its `ScheduledIo`, readiness state
/// padded to two cache lines, plus the waker slots) costs 256 bytes for as
/// long as the socket is registered — a quarter of an idle connection.
/// A parked socket leaves tokio's reactor and is watched here instead,
/// where it costs one slot (a waker, 16 bytes) and the kernel's epoll
/// item, which is not process memory. When it becomes readable, errs or
/// hangs up, the slot's waker (the connection's [`Signal`]) resumes the
/// connection, which registers the socket with tokio again
/// ([`ParkedSocket::unpark`]). The cost moves to the transitions: two
/// `epoll_ctl` calls each way, once per park.
pub(crate) struct Reactor {
    registry: mio::Registry,
    slots: parking_lot::Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<u32>,
}

static REACTOR: std::sync::OnceLock<Option<Reactor>> = std::sync::OnceLock::new();

/// The process's parking reactor, started on first use; `None` if it could
/// not be (no epoll instance or thread): sockets then stay with tokio.
pub(crate) fn reactor() -> Option<&'static Reactor> {
    REACTOR
        .get_or_init(|| match Reactor::start() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "parking reactor unavailable; parked sockets stay registered with tokio");
                None
            }
        })
        .as_ref()
}

impl Reactor {
    fn start() -> std::io::Result<Reactor> {
        let mut poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        std::thread::Builder::new()
            .name("m2mhub-park".into())
            .spawn(move || {
                let mut events = mio::Events::with_capacity(1024);
                loop {
                    if let Err(e) = poll.poll(&mut events, None) {
                        if e.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        tracing::error!(error = %e, "parking reactor stopped");
                        return;
                    }
                    for event in events.iter() {
                        let waker = REACTOR
                            .get()
                            .and_then(|r| r.as_ref())
                            .and_then(|r| r.waker(event.token().0));
                        // Outside the slots' lock: a wake-up resumes the
                        // connection (a task spawn).
                        if let Some(w) = waker {
                            w.wake();
                        }
                    }
                }
            })?;
        Ok(Reactor {
            registry,
            slots: parking_lot::Mutex::new(Slots::default()),
        })
    }

    fn waker(&self, slot: usize) -> Option<Waker> {
        self.slots.lock().wakers.get(slot).cloned().flatten()
    }

    /// Watch `socket` until it is unparked; `waker` is woken when it becomes
    /// readable (at once if it already is: epoll reports the current state
    /// when a socket is added, edge-triggered or not). On failure the
    /// socket is handed back.
    pub(crate) fn park(
        &self,
        socket: std::net::TcpStream,
        waker: &Waker,
    ) -> Result<ParkedSocket, (std::net::TcpStream, std::io::Error)> {
        use std::os::fd::AsRawFd;
        let slot = {
            let mut slots = self.slots.lock();
            match slots.free.pop() {
                Some(i) => {
                    slots.wakers[i as usize] = Some(waker.clone());
                    i
                }
                None => {
                    slots.wakers.push(Some(waker.clone()));
                    (slots.wakers.len() - 1) as u32
                }
            }
        };
        let fd = socket.as_raw_fd();
        match self.registry.register(
            &mut mio::unix::SourceFd(&fd),
            mio::Token(slot as usize),
            mio::Interest::READABLE,
        ) {
            Ok(()) => Ok(ParkedSocket {
                socket: Some(socket),
                slot,
            }),
            Err(e) => {
                self.release(slot);
                Err((socket, e))
            }
        }
    }

    /// Slots in use and slots allocated.
    #[cfg(test)]
    pub(crate) fn occupancy(&self) -> (usize, usize) {
        let slots = self.slots.lock();
        let live = slots.wakers.iter().filter(|w| w.is_some()).count();
        (live, slots.wakers.len())
    }

    fn release(&self, slot: u32) {
        let mut slots = self.slots.lock();
        if let Some(w) = slots.wakers.get_mut(slot as usize) {
            *w = None;
            slots.free.push(slot);
        }
    }
}

/// A socket watched by the parking [`Reactor`] instead of tokio's.
pub(crate) struct ParkedSocket {
    /// `Some` until [`ParkedSocket::unpark`] takes it; `None` in a
    /// placeholder ([`ParkedSocket::gone`]).
    socket: Option<std::net::TcpStream>,
    slot: u32,
}

impl ParkedSocket {
    /// A placeholder holding no socket (and no slot).
    pub(crate) fn gone() -> ParkedSocket {
        ParkedSocket {
            socket: None,
            slot: u32::MAX,
        }
    }

    /// Stop watching the socket and hand it back, to be registered with
    /// tokio again.
    pub(crate) fn unpark(mut self) -> Option<std::net::TcpStream> {
        let socket = self.socket.take()?;
        self.forget(&socket);
        Some(socket)
    }

    fn forget(&self, socket: &std::net::TcpStream) {
        use std::os::fd::AsRawFd;
        // Only the reactor makes parked sockets.
        let Some(reactor) = REACTOR.get().and_then(|r| r.as_ref()) else {
            return;
        };
        let fd = socket.as_raw_fd();
        // Fails only if the socket was never added: nothing to undo then.
        let _ = reactor.registry.deregister(&mut mio::unix::SourceFd(&fd));
        // After the deregistration: a late event for the slot finds it
        // empty or, if reused, wakes another connection once for nothing.
        reactor.release(self.slot);
    }
}

impl Drop for ParkedSocket {
    fn drop(&mut self) {
        // A parked connection dropped without resuming (its runtime gone):
        // closing the socket removes it from the epoll set; the slot must
        // be freed by hand.
        if let Some(socket) = self.socket.take() {
            self.forget(&socket);
        }
    }
}
