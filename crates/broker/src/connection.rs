//! One client connection: CONNECT, then packets in and messages out until
//! the connection ends, then the will and the session's fate.
//!
//! This task is the I/O driver of the sans-IO protocol core
//! ([`crate::protocol`]): it decodes packets and hands them to
//! [`ConnState::handle_input`], encodes what the core decides to send,
//! hands [`ConnState::poll_timeout`] to the broker's one keep-alive timer
//! (`deadlines.rs`, no timer per connection) and checks the core when it
//! fires, and does the work the core
//! cannot do without I/O or shared state: authentication, authorization,
//! routing, the store, the publish hook, rate limits.
//!
//! The task reads and writes the same stream. Responses (PUBACK, SUBACK…)
//! and queued messages are encoded into one output buffer and written with
//! one system call per batch. Publishers never wait for this task: they
//! push into the session queue (bounded) and wake it.
//!
//! When the platform's publish hook holds back an acknowledgement, it and
//! every later one wait in an [`AckQueue`] (receive order, as MQTT
//! requires) while the task keeps reading; a full queue stops the reading.

use crate::ack_queue::{AckQueue, MAX_PENDING_ACKS};
use crate::auth::{AuthDecision, ClientIdentity, ConnectInfo};
use crate::ban::BanKey;
use crate::broker::Inner;
use crate::events::{AckGate, PublishHook, SecurityEventKind};
use crate::lazy_buf::LazyBuf;
use crate::limits::{RateRefusal, TokenBucket};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::protocol::lifetime::{self, SessionTimers, TimerEvent};
use crate::protocol::{Close, ConnState, Granted, Input, Params, Qos2};
use crate::route_cache::RouteCache;
use crate::session::{Outgoing, Session, Stage};
use crate::signal::Signal;
use crate::topic_tree::Delivery;
use crate::transport::{Transport, READ_CHUNK};
use m2mhub_broker_log::Op;
use mqtt_codec::{
    decode, decode_connect_protocol, encode, reason, AckProperties, ConnAck, ConnAckProperties,
    Connect, DecodeError, LastWill, Packet, Protocol, Publish, QoS, RetainHandling, SubAck,
    Subscribe, Unsubscribe,
};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// How long a SUBACK waits for the cluster to confirm the subscription's
/// interest before it is sent anyway (NATS unreachable).
const CLUSTER_SETTLE_WAIT: Duration = Duration::from_secs(2);
/// How long a CONNECT resuming a session waits for the cluster to find it
/// (NATS unreachable: the client gets a new session).
const CLUSTER_RESTORE_WAIT: Duration = Duration::from_secs(5);

/// Messages moved from the session queue per batch.
const BATCH: usize = 512;

/// A subscriber whose last flush carried at least this many messages waits
/// one turn of the scheduler before its next flush, so that every
/// publisher with input ready routes first and one write carries all of
/// it. Without it, a subscriber fed by many publishers wrote once per
/// publisher's read: QoS 0 fan-in at 1 M msg/s made 14 times the `sendto`
/// calls FlashMQ made, and the broker's kernel time was half its CPU. A
/// subscriber sent one message at a time (fan-out) never waits: there is
/// nothing to coalesce, and its latency stays as it was. Nor does one that
/// is behind: waiting a turn per flush, it fell further behind, and the
/// broker dropped messages at its queue limit. A turn lasts while
/// publishers keep finding input, so a publisher that fills a queue to an
/// eighth of its limit yields too (`broker::take_queue_backlog`).
const COALESCE_AT: u16 = 16;
/// Output buffers above this size are released once written.
const KEEP_WBUF: usize = 64 * 1024;
/// `Connection::admit`: serve normally.
const ADMIT_OK: u8 = 0;
/// `Connection::admit`: close at once, without reading anything.
const ADMIT_CLOSE: u8 = 0xFF;
/// Longest wait for the CONNECT of a connection that will be refused anyway
/// (banned, over the connection rate): just long enough to answer it.
const REFUSE_WAIT: Duration = Duration::from_secs(3);

/// How long a connection we closed for the client's fault keeps reading
/// (and discarding) what the client still sends; see `Connection::linger`.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering.
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// Why the packet loop stopped.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT; `publish_will` for reason 0x04.
    ClientDisconnect {
        publish_will: bool,
    },
    /// The socket closed or failed.
    Lost,
    /// We closed it with this reason (sent as DISCONNECT to MQTT 5 clients).
    Server(u8),
    /// Another connection took the session (or an operator kicked it).
    Kicked(u8),
    Shutdown,
}

thread_local! {
    /// Deliveries of the PUBLISH being routed on this worker thread.
    static ROUTE_SCRATCH: std::cell::RefCell<Vec<Delivery>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub(crate) struct Connection<S: Transport> {
    inner: Arc<Inner>,
    stream: S,
    peer: SocketAddr,
    /// Index into [`TRANSPORTS`]: a byte instead of a string slice.
    transport: u8,
    /// The client certificate, until CONNECT uses it.
    tls: Option<Box<crate::auth::TlsPeer>>,
    conn_id: u64,
    rbuf: LazyBuf,
    wbuf: LazyBuf,
    /// The protocol state machine: every decision about what the MQTT
    /// session sends and when it gives up on the client.
    core: ConnState,
    client_id: Arc<str>,
    session: Option<Arc<Session>>,
    waker: Arc<Signal>,
    identity: Arc<ClientIdentity>,
    more_pending: bool,
    /// Admission decided at accept: [`ADMIT_OK`], [`ADMIT_CLOSE`] or the
    /// CONNACK reason code to refuse the CONNECT with.
    admit: u8,
    /// The connection is counted in the per-IP connection limit (released
    /// on drop).
    ip_counted: bool,
    /// The CONNECT counted toward its client id's flapping limit (taken
    /// back if the client ends the connection with DISCONNECT).
    flap_counted: bool,
    /// The broker's IP-ban generation this connection last checked its
    /// address against: a ban of an address wakes every connection, and
    /// those that see a new generation look their own address up (a word
    /// here instead of the address on every session).
    ban_epoch: u32,
    /// Milliseconds since the broker started (wrapping) when this
    /// connection last began to wait for work.
    wait_began: u32,
    /// Its last wait lasted at least [`crate::park::PARK_AFTER`] (or it
    /// has just connected): the next time it is idle it parks.
    quiet: bool,
    /// When (in 100 ms ticks of [`Self::wait_began`], wrapping) the last
    /// requested look at whether it has gone quiet happens; none is
    /// requested before then. 16 bits: every connection holds it.
    park_check_at: u16,
    /// Messages the last flush took from the session queue (saturating):
    /// a subscriber that gets them in batches this big is busy, and lets
    /// its writes coalesce (see [`COALESCE_AT`]).
    last_batch: u16,
    /// What only a client that publishes needs, allocated on its first
    /// PUBLISH: one pointer on every connection that never does.
    publisher: Option<Box<Publisher>>,
}

/// A publishing connection's state (see [`Connection::publisher`]).
struct Publisher {
    /// `mqtt.max_publish_rate`, when one is configured.
    limit: Option<PublishLimiter>,
    /// This client's own publish-rate baseline.
    baseline: crate::rate_baseline::RateBaseline,
    /// Acknowledgements waiting for the publish hook, in receive order;
    /// allocated only while one waits.
    acks: Option<Box<AckQueue>>,
    /// The publish hook with its generation: a PUBLISH then costs one
    /// atomic load instead of a lock and a reference count every core
    /// shares.
    hook: Option<(u64, Arc<dyn PublishHook>)>,
    /// The routes of its recent topics (emptied when the connection parks).
    routes: RouteCache,
}

/// `mqtt.max_publish_rate` for one connection.
struct PublishLimiter {
    bucket: TokenBucket,
    /// Start of the current one-second window of refusals.
    window: Instant,
    refused: u32,
    /// Refusals within one second beyond which the client is disconnected.
    disconnect_after: u32,
}

enum RateVerdict {
    Pass,
    /// Refuse this message; `first` if it is the first refusal this second.
    Refuse {
        first: bool,
    },
    Disconnect,
}

impl PublishLimiter {
    fn new(rate: u32, now: Instant) -> PublishLimiter {
        let burst = rate.saturating_mul(2);
        PublishLimiter {
            bucket: TokenBucket::new(f64::from(rate), f64::from(burst), now),
            window: now,
            refused: 0,
            disconnect_after: burst.saturating_mul(5),
        }
    }

    fn check(&mut self, now: Instant) -> RateVerdict {
        if self.bucket.try_take(now) {
            return RateVerdict::Pass;
        }
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.refused = 0;
        }
        self.refused = self.refused.saturating_add(1);
        if self.refused > self.disconnect_after {
            RateVerdict::Disconnect
        } else {
            RateVerdict::Refuse {
                first: self.refused == 1,
            }
        }
    }
}

impl<S: Transport> Drop for Connection<S> {
    fn drop(&mut self) {
        if self.ip_counted {
            self.inner.limits.close(self.peer.ip());
        }
    }
}

/// Decide at accept whether a connection from `ip` is served: the per-IP
/// connection limit (close at once), bans of the IP and the connection
/// rates (refuse its CONNECT). Returns the admission code and whether the
/// connection was counted for its IP.
fn admission(inner: &Inner, ip: std::net::IpAddr) -> (u8, bool) {
    let now = Instant::now();
    let limits = &inner.limits;
    if !limits.open(ip, now) {
        Metrics::inc(&inner.metrics.connections_rejected);
        Metrics::inc(&inner.metrics.connections_refused_per_ip);
        tracing::debug!(%ip, "too many connections from this address; closing");
        inner.security_event(
            SecurityEventKind::ConnectionsPerIpExceeded,
            None,
            Some(ip),
            || {
                format!(
                    "more than {} open connections from this address",
                    inner.config.max_connections_per_ip
                )
            },
        );
        return (ADMIT_CLOSE, false);
    }
    let counted = limits.counts_connections();
    if !inner.bans.is_empty() {
        if let Some((why, left)) = inner.bans.check(&BanKey::ip(ip), now) {
            Metrics::inc(&inner.metrics.connections_rejected);
            Metrics::inc(&inner.metrics.connections_refused_banned);
            inner.security_event(
                SecurityEventKind::BannedConnectRefused,
                None,
                Some(ip),
                || format!("address banned ({why}); {} s left", left.as_secs()),
            );
            return (reason::BANNED, counted);
        }
    }
    if let Err(r) = limits.attempt(ip, now) {
        Metrics::inc(&inner.metrics.connections_rejected);
        Metrics::inc(&inner.metrics.connections_refused_rate);
        inner.security_event(
            SecurityEventKind::ConnectRateExceeded,
            None,
            Some(ip),
            || match r {
                RateRefusal::Global => format!(
                    "global connection rate of {}/s exceeded",
                    inner.config.max_connect_rate
                ),
                RateRefusal::PerIp => format!(
                    "connection rate of {}/s from this address exceeded",
                    inner.config.max_connect_rate_per_ip
                ),
            },
        );
        return (reason::CONNECTION_RATE_EXCEEDED, counted);
    }
    (ADMIT_OK, counted)
}

/// How a connection ended, for [`crate::ConnectionEvents::disconnected`].
fn end_reason(end: &End) -> &'static str {
    match end {
        End::ClientDisconnect { .. } => "client disconnect",
        End::Lost => "connection lost",
        End::Server(c) | End::Kicked(c) => reason::name(*c),
        End::Shutdown => "server shutting down",
    }
}

/// Set up one accepted stream; the returned future serves it until it
/// closes. Not an `async fn`: the arguments move straight into the boxed
/// connection instead of also occupying the task's future, which is what
/// every idle connection costs in memory.
pub(crate) fn serve<S: Transport>(
    inner: Arc<Inner>,
    stream: S,
    peer: SocketAddr,
    transport: &'static str,
    tls: Option<Box<crate::auth::TlsPeer>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    Metrics::inc(&inner.metrics.connections_accepted);
    inner.connections.fetch_add(1, Ordering::SeqCst);
    let (admit, ip_counted) = admission(&inner, peer.ip());
    let anonymous = inner.anonymous.clone();
    let inner_ban_epoch = inner.ip_ban_epoch.load(Ordering::Acquire);
    // Where parked connections resume (see `park.rs`).
    inner.runtime.get_or_init(tokio::runtime::Handle::current);
    let conn = Box::new(Connection {
        conn_id: inner.next_id(),
        inner,
        stream,
        peer,
        transport: transport_index(transport),
        tls,
        rbuf: LazyBuf::default(),
        wbuf: LazyBuf::default(),
        core: ConnState::new(Params::default(), Instant::now()),
        client_id: "".into(),
        session: None,
        waker: Arc::new(Signal::default()),
        identity: anonymous,
        more_pending: false,
        admit,
        ip_counted,
        flap_counted: false,
        ban_epoch: inner_ban_epoch,
        wait_began: 0,
        quiet: true,
        park_check_at: 0,
        last_batch: 0,
        publisher: None,
    });
    conn.serve()
}

/// The transports connections are served over, as named to the
/// authenticator; any other name passed to `serve` is shown as "other".
const TRANSPORTS: [&str; 6] = ["tcp", "tls", "ws", "wss", "test", "other"];

fn transport_index(name: &str) -> u8 {
    let last = TRANSPORTS.len() - 1;
    let i = TRANSPORTS[..last]
        .iter()
        .position(|t| *t == name)
        .unwrap_or(last);
    i as u8
}

/// Why [`Connection::run`] returned.
enum Stop {
    End(End),
    /// Quiet and idle: the caller may park the connection.
    Idle,
}

impl<S: Transport> Connection<S> {
    async fn serve(self: Box<Self>) {
        self.drive(true).await
    }

    /// A parked connection (`park.rs`), continued in a new task.
    pub(crate) fn continued(self: Box<Self>) -> impl std::future::Future<Output = ()> + Send {
        self.drive(false)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub(crate) fn signal(&self) -> &Arc<Signal> {
        &self.waker
    }

    /// See [`Transport::park_io`].
    pub(crate) fn park_io(&mut self, waker: &std::task::Waker) -> Option<std::task::Poll<()>> {
        self.stream.park_io(waker)
    }

    /// `fresh`: a new connection, from its CONNECT on; otherwise one that
    /// was parked or tried to park, from its packet loop.
    async fn drive(mut self: Box<Self>, mut fresh: bool) {
        let end = loop {
            match self.run(fresh).await {
                Stop::End(end) => break end,
                Stop::Idle => match crate::park::park(self) {
                    None => return,
                    Some(conn) => {
                        self = conn;
                        fresh = false;
                    }
                },
            }
        };
        let linger = matches!(end, End::Server(_));
        Box::pin(self.finish(end)).await;
        if linger {
            Box::pin(self.linger()).await;
        }
        let inner = self.inner.clone();
        drop(self);
        if inner.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            inner.connections_closed.notify_waiters();
        }
    }

    fn v5(&self) -> bool {
        self.core.v5()
    }

    fn send(&mut self, packet: &Packet) {
        if let Err(e) = encode(packet, self.core.params.protocol, &mut self.wbuf) {
            tracing::warn!(error = %e, packet = packet.name(), "cannot encode packet");
        }
    }

    /// Encode what the core decided to send, in its order.
    fn drain_core(&mut self) {
        while let Some(t) = self.core.poll_output() {
            self.send(&t.packet());
        }
    }

    async fn write_out(&mut self) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let n = self.wbuf.len();
        let timeout = self.inner.config.write_timeout;
        match tokio::time::timeout(timeout, self.stream.write_all(&self.wbuf[..])).await {
            Ok(Ok(())) => {
                Metrics::add(&self.inner.metrics.bytes_sent, n as u64);
                if self.wbuf.capacity() > KEEP_WBUF {
                    self.wbuf.release();
                } else {
                    self.wbuf.clear();
                }
                Ok(())
            }
            Ok(Err(_)) => Err(End::Lost),
            Err(_) => {
                tracing::debug!(client_id = %self.client_id, "client stopped reading; closing");
                Err(End::Lost)
            }
        }
    }

    /// Admission, CONNECT and what the client sent right behind it.
    async fn open(&mut self) -> Result<(), End> {
        match self.admit {
            ADMIT_OK => {}
            ADMIT_CLOSE => return Err(End::Lost),
            _ => return Err(Box::pin(self.refuse_admission()).await),
        }
        // The CONNECT phase runs once: its futures live on the heap only
        // while it lasts, keeping the per-connection task small.
        let deadline = Instant::now() + self.inner.config.connect_timeout;
        let connect = Box::pin(self.read_connect(deadline)).await?;
        Box::pin(self.accept_connect(connect)).await?;
        // Packets the client sent right behind its CONNECT (without waiting
        // for CONNACK) may already be in the read buffer: handle them now.
        // Waiting for the socket to be readable again would leave a
        // SUBSCRIBE or UNSUBSCRIBE unapplied while other clients' messages
        // are routed, for as long as this client stays quiet.
        if !self.rbuf.is_empty() {
            Box::pin(self.process_input()).await?;
        }
        Ok(())
    }

    /// Milliseconds since the broker started, wrapping (for [`Self::quiet`]).
    fn now_ms(&self) -> u32 {
        self.inner.started.elapsed().as_millis() as u32
    }

    /// A wait ended: remember whether it was a long one.
    fn woke(&mut self) {
        let waited = self.now_ms().wrapping_sub(self.wait_began);
        self.quiet = u128::from(waited) >= crate::park::PARK_AFTER.as_millis();
    }

    /// Not quiet yet: have the broker's timer wake the connection once it
    /// could have been waiting long enough to park (at most one such
    /// request per [`crate::park::PARK_AFTER`], so a busy connection pays
    /// one extra wake-up a second, not one per message).
    fn ask_to_look_again(&mut self) {
        let tick = (self.wait_began / 100) as u16;
        if (tick.wrapping_sub(self.park_check_at) as i16) < 0 {
            return;
        }
        let after = crate::park::PARK_AFTER + crate::deadlines::TICK;
        self.park_check_at = tick.wrapping_add((after.as_millis() / 100) as u16);
        self.inner
            .deadlines
            .wake_at(Instant::now() + after, &self.waker);
    }

    async fn run(&mut self, fresh: bool) -> Stop {
        // A socket handed to the parking reactor comes back first.
        if self.stream.unpark_io().is_err() {
            return Stop::End(End::Lost);
        }
        if fresh {
            if let Err(end) = Box::pin(self.open()).await {
                return Stop::End(end);
            }
        } else {
            // Back from parking (or an attempt that found work): what woke
            // it is handled before it may park again.
            self.woke();
        }
        // A resumed connection first handles what woke it.
        let mut may_park = fresh;
        loop {
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                return Stop::End(End::Shutdown);
            }
            if let Err(end) = Box::pin(self.flush()).await {
                return Stop::End(end);
            }
            if self.rbuf.is_empty() && self.rbuf.is_allocated() {
                // Idle connections hold no read buffer...
                self.rbuf.release();
            }
            if !self.more_pending && self.wbuf.is_empty() && self.wbuf.is_allocated() {
                // ...no write buffer...
                self.wbuf.release();
            }
            // ...and no output queue.
            self.core.release_idle();
            let more = self.more_pending;
            self.wait_began = self.now_ms();
            if S::PARKS
                && !more
                && self.acks().is_none()
                && self.rbuf.is_empty()
                && self.wbuf.is_empty()
            {
                if self.quiet {
                    if may_park {
                        // ...no routes either (they hold other sessions).
                        if let Some(p) = self.publisher.as_mut() {
                            p.routes.clear();
                        }
                        return Stop::Idle;
                    }
                } else {
                    self.ask_to_look_again();
                }
            }
            // The first wait after parking is not measured: what woke the
            // connection is usually there at once, which says nothing
            // about how busy it is.
            let measure = may_park;
            may_park = true;
            let signal = self.waker.clone();
            let acks_waiting = self.acks().is_some();
            // Backpressure: a full acknowledgement queue stops the reading.
            let reading = !self.acks_full();
            tokio::select! {
                biased;
                _ = std::future::poll_fn(|cx| signal.poll_wait(cx)) => {
                    if measure {
                        self.woke();
                    }
                    if let Some(end) = self.check_kicked() {
                        return Stop::End(end);
                    }
                    // Not when behind (the last flush left messages
                    // queued): a subscriber catching up writes at once.
                    if self.last_batch >= COALESCE_AT && !self.more_pending {
                        tokio::task::yield_now().await;
                    }
                    if self.waker.take_timer() {
                        // Not reading (waiting for the platform) is no
                        // fault of the client's.
                        if let Err(Close(code)) = self.core.handle_timeout(Instant::now(), reading) {
                            Metrics::inc(&self.inner.metrics.keepalive_timeouts);
                            return Stop::End(End::Server(code));
                        }
                        if let Some(next) = self.core.poll_timeout() {
                            self.inner.deadlines.arm(next, &self.waker);
                        }
                    }
                }
                _ = std::future::poll_fn(|cx| match self.publisher.as_mut().and_then(|p| p.acks.as_mut()) {
                    Some(q) => q.poll_head(cx),
                    None => std::task::Poll::Pending,
                }), if acks_waiting => {
                    if measure {
                        self.woke();
                    }
                    self.release_acks();
                    if !self.rbuf.is_empty() {
                        // Packets left unhandled while the queue was full.
                        if let Err(end) = Box::pin(self.process_input()).await {
                            return Stop::End(end);
                        }
                    }
                }
                r = self.stream.read_some(&mut self.rbuf, READ_CHUNK), if reading => match r {
                    Ok(0) | Err(_) => return Stop::End(End::Lost),
                    Ok(n) => {
                        if measure {
                        self.woke();
                    }
                        Metrics::add(&self.inner.metrics.bytes_received, n as u64);
                        self.core.on_receive(Instant::now());
                        let drops = self.inner.metrics.messages_dropped_queue_full.load(Ordering::Relaxed);
                        // Only this batch's routing counts.
                        crate::broker::take_queue_backlog();
                        if let Err(end) = Box::pin(self.process_input()).await {
                            return Stop::End(end);
                        }
                        let backlog = crate::broker::take_queue_backlog();
                        if backlog || self.inner.metrics.messages_dropped_queue_full.load(Ordering::Relaxed) != drops {
                            // Subscribers are falling behind (or a queue is
                            // filling while its subscriber coalesces): give
                            // the worker thread to them (and to I/O polling)
                            // before reading more, instead of reading only
                            // to drop.
                            tokio::task::yield_now().await;
                        }
                    }
                },
                _ = std::future::ready(()), if more => {}
            }
        }
    }

    /// Taken over (no longer ours) or kicked by an operator (still ours:
    /// `finish` detaches as usual).
    fn check_kicked(&mut self) -> Option<End> {
        let session = self.session.as_ref()?;
        {
            let st = session.state.lock();
            if let Some(code) = crate::protocol::kicked(&st, self.conn_id) {
                return Some(End::Kicked(code));
            }
        }
        // An address was banned since this connection last looked: is it
        // this one's?
        let epoch = self.inner.ip_ban_epoch.load(Ordering::Acquire);
        if epoch != self.ban_epoch {
            self.ban_epoch = epoch;
            let key = crate::ban::BanKey::ip(self.peer.ip());
            if let Some((why, _)) = self.inner.bans.check(&key, Instant::now()) {
                tracing::info!(peer = %self.peer, client_id = %self.client_id, reason = %why, "closing the connection of a banned address");
                Metrics::inc(&self.inner.metrics.clients_kicked);
                return Some(End::Kicked(reason::ADMINISTRATIVE_ACTION));
            }
        }
        None
    }

    /// A connection refused at accept (banned address, connection rate):
    /// read its CONNECT only to answer in the client's own protocol
    /// version, waiting briefly, then close.
    async fn refuse_admission(&mut self) -> End {
        let code = self.admit;
        let wait = self.inner.config.connect_timeout.min(REFUSE_WAIT);
        if let Ok(c) = self.read_connect(Instant::now() + wait).await {
            self.core.params.protocol = c.protocol;
            tracing::debug!(peer = %self.peer, client_id = %c.client_id, reason = reason::name(code), "connection refused at accept");
            self.refuse_connect(code).await;
        }
        End::Lost
    }

    /// Wait for the first packet, which must be CONNECT, until `deadline`
    /// (however slowly its bytes trickle in).
    async fn read_connect(&mut self, deadline: Instant) -> Result<Box<Connect>, End> {
        let max = self.inner.config.max_packet_size as usize;
        loop {
            // Known before decoding: the decoder consumes a bad packet, and
            // the refusal must go out in the client's own version.
            let announced = decode_connect_protocol(&self.rbuf);
            match decode(&mut self.rbuf, Protocol::V5, max) {
                Ok(Some(Packet::Connect(c))) => return Ok(c),
                Ok(Some(_)) => {
                    Metrics::inc(&self.inner.metrics.connections_rejected);
                    return Err(End::Lost);
                }
                Ok(None) => {}
                Err(e) => {
                    Metrics::inc(&self.inner.metrics.connections_rejected);
                    Metrics::inc(&self.inner.metrics.malformed_packets);
                    tracing::debug!(peer = %self.peer, error = %e, "bad CONNECT");
                    if let Some(p) = announced {
                        self.core.params.protocol = p;
                        let code = match e {
                            DecodeError::UnsupportedProtocolVersion(_) => {
                                reason::UNSUPPORTED_PROTOCOL_VERSION
                            }
                            other => other.reason_code(),
                        };
                        self.refuse_connect(code).await;
                    }
                    return Err(End::Lost);
                }
            }
            // Start small (a CONNECT is rarely more than a few hundred
            // bytes) and grow only for a large one.
            let chunk = (self.rbuf.len() * 2).clamp(256, READ_CHUNK);
            match tokio::time::timeout_at(deadline, self.stream.read_some(&mut self.rbuf, chunk))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(End::Lost),
                Ok(Ok(n)) => Metrics::add(&self.inner.metrics.bytes_received, n as u64),
                Err(_) => {
                    Metrics::inc(&self.inner.metrics.connections_rejected);
                    Metrics::inc(&self.inner.metrics.connect_timeouts);
                    tracing::debug!(peer = %self.peer, "no CONNECT within the connect timeout");
                    return Err(End::Lost);
                }
            }
        }
    }

    async fn refuse_connect(&mut self, code: u8) {
        let p = Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            reason_code: code,
            properties: ConnAckProperties::default(),
        }));
        self.send(&p);
        let _ = self.write_out().await;
    }

    async fn accept_connect(&mut self, c: Box<Connect>) -> Result<(), End> {
        let mut c = *c;
        let tls = self.tls.take();
        let transport = TRANSPORTS[usize::from(self.transport)];
        let inner = self.inner.clone();
        let cfg = &inner.config;
        self.core.params.protocol = c.protocol;
        let v5 = c.protocol.is_v5();
        if v5 && c.properties.authentication_method.is_some() {
            self.refuse_connect(reason::BAD_AUTHENTICATION_METHOD).await;
            return Err(End::Lost);
        }
        if cfg.max_connections > 0
            && self.inner.connections.load(Ordering::Relaxed) as usize > cfg.max_connections
        {
            Metrics::inc(&self.inner.metrics.connections_rejected);
            self.refuse_connect(reason::SERVER_BUSY).await;
            return Err(End::Lost);
        }
        let mut assigned = None;
        let client_id: String = if c.client_id.is_empty() {
            if !v5 && !c.clean_start {
                self.refuse_connect(reason::CLIENT_IDENTIFIER_NOT_VALID)
                    .await;
                return Err(End::Lost);
            }
            let id = format!("auto-{:016x}", self.conn_id ^ random_u64());
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.clone()
        };
        if !self.inner.bans.is_empty()
            && self
                .refuse_if_banned(BanKey::ClientId(client_id.clone()), &client_id)
                .await
        {
            return Err(End::Lost);
        }
        let decision = self.inner.authn.authenticate(&ConnectInfo {
            client_id: &client_id,
            username: c.username.as_deref(),
            password: c.password.as_deref(),
            peer: self.peer,
            transport,
            tls: tls.as_deref(),
        });
        match decision {
            // Every anonymous client shares one identity: 112 bytes less
            // per connection where anonymous access is allowed.
            AuthDecision::Allow(identity) if identity.is_anonymous() => {
                self.identity = self.inner.anonymous.clone();
            }
            AuthDecision::Allow(identity) => self.identity = Arc::new(identity),
            AuthDecision::Deny(code) => {
                Metrics::inc(&self.inner.metrics.auth_failures);
                tracing::info!(peer = %self.peer, client_id = %client_id, reason = reason::name(code), "connection refused");
                if let Some(h) = self.inner.hooks.connection() {
                    h.auth_failed(&client_id, c.username.as_deref(), self.peer, code);
                }
                self.inner
                    .count_auth_failure(code, &client_id, self.peer.ip());
                self.refuse_connect(code).await;
                return Err(End::Lost);
            }
        }
        if !self.inner.bans.is_empty() {
            if let Some(dev) = self.identity.device_id.clone() {
                if self
                    .refuse_if_banned(BanKey::Device(dev.to_string()), &client_id)
                    .await
                {
                    return Err(End::Lost);
                }
            }
        }
        if let Some(w) = &c.will {
            if !self
                .inner
                .authz
                .can_publish(&client_id, &self.identity, &w.topic)
            {
                Metrics::inc(&self.inner.metrics.authz_denials);
                self.refuse_connect(reason::NOT_AUTHORIZED).await;
                return Err(End::Lost);
            }
        }
        self.client_id = client_id.as_str().into();
        // Flapping is counted per client id the client chose (an assigned
        // one is new every time).
        if assigned.is_none()
            && self
                .inner
                .limits
                .client_connected(&self.client_id, Instant::now())
        {
            let d = self.inner.bans.ban(
                BanKey::ClientId(client_id.clone()),
                "connect flapping",
                None,
                true,
                Instant::now(),
            );
            if let Some(d) = d {
                Metrics::inc(&self.inner.metrics.bans_automatic);
                tracing::warn!(client_id = %client_id, peer = %self.peer, secs = d.as_secs(), "client id banned for connect flapping");
                let n = cfg.max_connects_per_client_id;
                let w = cfg.flapping_window.as_secs();
                self.inner.security_event(
                    SecurityEventKind::AutoBanFlapping,
                    Some(&client_id),
                    Some(self.peer.ip()),
                    || {
                        format!(
                            "more than {n} connects within {w} s; client id banned for {} s",
                            d.as_secs()
                        )
                    },
                );
            }
            Metrics::inc(&self.inner.metrics.connections_rejected);
            Metrics::inc(&self.inner.metrics.connections_refused_banned);
            self.refuse_connect(reason::BANNED).await;
            return Err(End::Lost);
        }
        self.flap_counted = assigned.is_none();

        let params = Params::negotiate(&c, cfg);
        let expiry = params.session_expiry;
        let server_keep_alive = params.server_keep_alive;
        self.core = ConnState::new(params, Instant::now());
        if let Some(at) = self.core.poll_timeout() {
            self.inner.deadlines.arm(at, &self.waker);
        }
        self.core.set_will(c.will.take());

        if !c.clean_start {
            self.inner
                .restore_from_cluster(&client_id, CLUSTER_RESTORE_WAIT)
                .await;
        }
        let Ok((session, present)) = self.inner.attach(
            &client_id,
            c.clean_start,
            c.protocol,
            self.conn_id,
            self.waker.clone(),
            self.identity.clone(),
        ) else {
            tracing::info!(client_id = %client_id, peer = %self.peer, "refused: the client id's session belongs to another identity");
            self.refuse_connect(reason::CLIENT_IDENTIFIER_NOT_VALID)
                .await;
            return Err(End::Lost);
        };
        let put = {
            let mut st = session.state.lock();
            st.expiry_interval = expiry;
            st.persistent = expiry > 0;
            st.persistent
        };
        // Share the session's copy of the id rather than keep a second one.
        self.client_id = session.client_id.clone();
        if present {
            // A resumed session keeps only what its owner may still subscribe
            // to: policies may have changed while it was away.
            self.inner.revalidate(&session, &self.identity);
        }
        self.session = Some(session.clone());
        if put {
            if let Some(op) = self.inner.session_put_op(&session) {
                self.inner.submit(vec![op]);
            }
        } else if present {
            // A session that was persistent and is now connected with
            // expiry 0 leaves the store.
            self.inner.submit(vec![Op::SessionDelete {
                client_id: client_id.clone(),
            }]);
        }
        Metrics::inc(&self.inner.metrics.connects_succeeded);
        tracing::debug!(client_id = %client_id, peer = %self.peer, protocol = ?c.protocol, present, "client connected");

        let mut props = ConnAckProperties::default();
        if v5 {
            props.receive_maximum = (cfg.receive_maximum != 65_535).then_some(cfg.receive_maximum);
            props.maximum_packet_size = Some(cfg.max_packet_size);
            props.topic_alias_maximum =
                (cfg.topic_alias_maximum > 0).then_some(cfg.topic_alias_maximum);
            props.assigned_client_identifier = assigned;
            props.server_keep_alive = server_keep_alive;
            if !cfg.retain_available {
                props.retain_available = Some(0);
            }
            if c.properties.session_expiry_interval.unwrap_or(0) != expiry {
                props.session_expiry_interval = Some(expiry);
            }
        }
        self.send(&Packet::ConnAck(Box::new(ConnAck {
            session_present: present,
            reason_code: reason::SUCCESS,
            properties: props,
        })));
        if present {
            // What was in flight goes out again first, within the client's
            // window.
            self.core.start_resend(&session.state.lock());
            self.fill_from_queue();
        }
        if let Some(h) = self.inner.hooks.connection() {
            h.connected(&self.client_id, &self.identity, self.peer);
        }
        self.write_out().await
    }

    /// Refuse the CONNECT with 0x8A if `key` is banned. True if refused.
    async fn refuse_if_banned(&mut self, key: BanKey, client_id: &str) -> bool {
        let Some((why, left)) = self.inner.bans.check(&key, Instant::now()) else {
            return false;
        };
        Metrics::inc(&self.inner.metrics.connections_rejected);
        Metrics::inc(&self.inner.metrics.connections_refused_banned);
        tracing::debug!(peer = %self.peer, client_id, key = %key, "banned; connection refused");
        self.inner.security_event(
            SecurityEventKind::BannedConnectRefused,
            Some(client_id),
            Some(self.peer.ip()),
            || format!("{key} banned ({why}); {} s left", left.as_secs()),
        );
        self.refuse_connect(reason::BANNED).await;
        true
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.fill_from_queue();
        self.write_out().await
    }

    /// Move messages from the session queue to the output buffer, within the
    /// client's receive maximum and maximum packet size (see
    /// [`ConnState::fill`]): taken under the session lock, encoded after it.
    fn fill_from_queue(&mut self) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut forget = Vec::new();
        let stats = {
            let mut st = session.state.lock();
            if st.conn.as_ref().map(|c| c.conn_id) != Some(self.conn_id) {
                self.more_pending = false;
                return;
            }
            self.core.fill(now, &mut st, &mut batch, BATCH, &mut forget)
        };
        self.more_pending = stats.more;
        self.last_batch = u16::try_from(batch.len()).unwrap_or(u16::MAX);
        let m = &self.inner.metrics;
        if stats.expired > 0 {
            Metrics::add(&m.messages_expired, stats.expired);
        }
        if stats.too_large > 0 {
            Metrics::add(&m.messages_dropped_too_large, stats.too_large);
        }
        if !forget.is_empty() {
            self.inner.submit(
                forget
                    .into_iter()
                    .map(|seq| Op::Ack {
                        client_id: self.client_id.to_string(),
                        seq,
                    })
                    .collect(),
            );
        }
        if batch.is_empty() {
            return;
        }
        let sent = batch
            .iter()
            .filter(|b| {
                matches!(
                    b,
                    crate::protocol::SessionPacket::Publish { dup: false, .. }
                )
            })
            .count();
        Metrics::add(&self.inner.metrics.messages_sent, sent as u64);
        self.core.encode(now, &batch, &mut self.wbuf);
    }

    /// Decode and handle every complete packet in the read buffer.
    async fn process_input(&mut self) -> Result<(), End> {
        let max = self.inner.config.max_packet_size as usize;
        // One clock read per batch of packets, not per packet.
        let now = Instant::now();
        // PUBLISHes received, counted before validation (invalid ones
        // too) and added to the metric once per batch, not per message.
        let mut publishes = 0;
        let r = loop {
            if self.acks_full() {
                // The rest waits in the read buffer until acknowledgements
                // go out (see `run`).
                break Ok(());
            }
            match decode(&mut self.rbuf, self.core.params.protocol, max) {
                Ok(Some(p)) => {
                    publishes += u64::from(matches!(p, Packet::Publish(_)));
                    if let Err(end) = self.handle(p, now).await {
                        break Err(end);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    Metrics::inc(&self.inner.metrics.malformed_packets);
                    tracing::debug!(client_id = %self.client_id, error = %e, "closing connection");
                    break Err(End::Server(e.reason_code()));
                }
            }
        };
        if publishes > 0 {
            Metrics::add(&self.inner.metrics.messages_received, publishes);
        }
        r
    }

    async fn handle(&mut self, packet: Packet, now: Instant) -> Result<(), End> {
        let session = self.session.as_deref().ok_or(End::Lost)?;
        // The hot path: a PUBLISH is checked in place and goes straight to
        // routing (no trip of the packet through the core's `Input`).
        let packet = match packet {
            Packet::Publish(mut p) => {
                let r = match self.core.accept_publish(now, &mut p) {
                    Ok(()) => self.on_publish(p, now).await,
                    Err(Close(code)) => Err(End::Server(code)),
                };
                self.drain_core();
                return r;
            }
            Packet::PubAck(r) => {
                if let Some(seq) = self.core.accept_puback(now, session, r.packet_id) {
                    self.ack_store(Some(seq));
                }
                return Ok(());
            }
            other => other,
        };
        let input = self
            .core
            .handle_input(now, packet, session)
            .map_err(|Close(code)| End::Server(code));
        let r = match input? {
            Input::Done => Ok(()),
            Input::Publish(p) => self.on_publish(p, now).await,
            Input::Subscribe(s) => self.on_subscribe(s).await,
            Input::Unsubscribe(u) => self.on_unsubscribe(u).await,
            Input::Delivered(seq) => {
                self.ack_store(Some(seq));
                Ok(())
            }
            Input::Disconnect { publish_will } => Err(End::ClientDisconnect { publish_will }),
        };
        self.drain_core();
        r
    }

    /// Acknowledge a PUBLISH now, or behind the acknowledgements that wait.
    fn ack(&mut self, qos: QoS, packet_id: Option<u16>, code: u8) {
        let Some(id) = packet_id else { return };
        match self.publisher.as_mut().and_then(|p| p.acks.as_mut()) {
            Some(q) => q.push(qos, id, code, None),
            None => self.send_ack(qos, id, code),
        }
    }

    fn send_ack(&mut self, qos: QoS, packet_id: u16, code: u8) {
        self.core.ack(qos, packet_id, code);
    }

    /// Acknowledgements waiting for the publish hook, if any.
    fn acks(&self) -> Option<&AckQueue> {
        self.publisher.as_ref()?.acks.as_deref()
    }

    /// Whether the acknowledgement queue is full (stop reading).
    fn acks_full(&self) -> bool {
        self.acks().is_some_and(|q| {
            q.len() >= usize::from(self.inner.config.receive_maximum).min(MAX_PENDING_ACKS)
        })
    }

    /// Send the acknowledgements at the front of the queue whose gates have
    /// resolved; free the queue once it is empty.
    fn release_acks(&mut self) {
        let Some(mut q) = self.publisher.as_mut().and_then(|p| p.acks.take()) else {
            return;
        };
        while let Some(a) = q.pop_ready() {
            match a.outcome {
                Ok(code) => self.send_ack(a.qos, a.packet_id, code),
                Err(code) => {
                    Metrics::inc(&self.inner.metrics.publishes_refused_by_hook);
                    tracing::debug!(client_id = %self.client_id, packet_id = a.packet_id, reason = reason::name(code), "publish refused by the platform");
                    if a.qos == QoS::ExactlyOnce {
                        // Its flow ends here: a resend is a new message.
                        self.forget_qos2([a.packet_id]);
                    }
                    // MQTT 3.1.1 cannot refuse: no acknowledgement, so the
                    // client sends the message again.
                    if self.v5() {
                        self.send_ack(a.qos, a.packet_id, code);
                    }
                }
            }
        }
        if !q.is_empty() {
            if let Some(p) = self.publisher.as_mut() {
                p.acks = Some(q);
            }
        }
        self.drain_core();
    }

    fn forget_qos2(&mut self, ids: impl IntoIterator<Item = u16>) {
        if let Some(session) = &self.session {
            self.core.forget_qos2(session, ids);
        }
    }

    /// Hand a routed message to the platform's publish hook, if one is
    /// installed; returns the gate its acknowledgement waits for.
    fn run_publish_hook(&mut self, msg: &Message) -> Option<AckGate> {
        let generation = self.inner.hooks.publish_generation();
        if generation == 0 {
            return None;
        }
        let publisher = self.publisher.as_mut()?;
        if publisher.hook.as_ref().map(|b| b.0) != Some(generation) {
            let (g, hook) = self.inner.hooks.publish();
            publisher.hook = hook.map(|h| (g, h));
        }
        let hook = &publisher.hook.as_ref()?.1;
        hook.on_publish(&self.client_id, &self.identity, msg)
    }

    /// A PUBLISH the core found valid (see [`ConnState::handle_input`]).
    async fn on_publish(&mut self, p: Publish, now: Instant) -> Result<(), End> {
        let v5 = self.v5();
        let rate = self.inner.config.max_publish_rate;
        let publisher = self.publisher.get_or_insert_with(|| {
            Box::new(Publisher {
                limit: (rate > 0).then(|| PublishLimiter::new(rate, now)),
                baseline: crate::rate_baseline::RateBaseline::new(now),
                acks: None,
                hook: None,
                routes: RouteCache::default(),
            })
        });
        if let Some(a) = publisher.baseline.record(now) {
            self.inner.security_event(
                SecurityEventKind::RateAnomaly,
                Some(&self.client_id),
                Some(self.peer.ip()),
                || {
                    format!(
                        "published {:.1} msg/s against its own baseline of {:.2} msg/s",
                        a.rate, a.baseline
                    )
                },
            );
        }
        if let Some(l) = self.publisher.as_mut().and_then(|p| p.limit.as_mut()) {
            match l.check(now) {
                RateVerdict::Pass => {}
                RateVerdict::Refuse { first } => {
                    Metrics::inc(&self.inner.metrics.publishes_rate_limited);
                    if first {
                        let rate = self.inner.config.max_publish_rate;
                        self.inner.security_event(
                            SecurityEventKind::PublishRateExceeded,
                            Some(&self.client_id),
                            Some(self.peer.ip()),
                            || format!("publish rate of {rate}/s exceeded"),
                        );
                    }
                    // MQTT 5: the message is refused (0x97: 0x96 is not a
                    // PUBACK/PUBREC reason code). 3.1.1 has no refusal: the
                    // acknowledgement looks normal and the message is dropped.
                    self.ack(p.qos, p.packet_id, reason::QUOTA_EXCEEDED);
                    return Ok(());
                }
                RateVerdict::Disconnect => {
                    Metrics::inc(&self.inner.metrics.publishes_rate_limited);
                    Metrics::inc(&self.inner.metrics.rate_limit_disconnects);
                    let rate = self.inner.config.max_publish_rate;
                    self.inner.security_event(
                        SecurityEventKind::PublishRateDisconnect,
                        Some(&self.client_id),
                        Some(self.peer.ip()),
                        || format!("kept exceeding the publish rate of {rate}/s; disconnected"),
                    );
                    return Err(End::Server(reason::MESSAGE_RATE_TOO_HIGH));
                }
            }
        }
        // Borrowed, not cloned: a reference count is two atomic operations
        // per message.
        let session = self.session.as_deref().ok_or(End::Lost)?;
        let session_id = session.id;
        if p.qos == QoS::ExactlyOnce {
            let id = p.packet_id.unwrap_or(0);
            let verdict = self
                .core
                .accept_qos2(session, id)
                .map_err(|Close(code)| End::Server(code))?;
            if verdict == Qos2::Duplicate {
                // A retransmission of a message we already have; if its
                // PUBREC still waits for the platform, that one answers both.
                if !self.acks().is_some_and(|q| q.holds_pubrec(id)) {
                    self.ack(p.qos, p.packet_id, reason::SUCCESS);
                }
                return Ok(());
            }
        }
        // `$SYS/` is the broker's own; other `$` topics (`$provision/…`)
        // are for the authorizer to decide.
        let sys = p.topic == "$SYS" || p.topic.starts_with("$SYS/");
        let allowed = !sys
            && self
                .inner
                .authz
                .can_publish(&self.client_id, &self.identity, &p.topic);
        if !allowed {
            Metrics::inc(&self.inner.metrics.authz_denials);
            tracing::debug!(client_id = %self.client_id, topic = %p.topic, "publish not authorized");
            if let (QoS::ExactlyOnce, true, Some(session)) = (p.qos, v5, self.session.as_deref()) {
                // A refused QoS 2 message ends its flow at PUBREC.
                self.core.forget_qos2(session, [p.packet_id.unwrap_or(0)]);
            }
            self.ack(p.qos, p.packet_id, reason::NOT_AUTHORIZED);
            return Ok(());
        }
        let expires_at = p
            .properties
            .message_expiry_interval
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
        let qos = p.qos;
        let packet_id = p.packet_id;
        let msg = Arc::new(Message {
            topic: p.topic,
            payload: p.payload,
            qos,
            retain: p.retain,
            properties: p.properties,
            expires_at,
            publisher: session_id,
        });
        let mut ops = Vec::new();
        // The routing scratch is per worker thread, not per connection: an
        // idle connection holds none (publish does not await).
        let routes = self.publisher.as_mut().map(|p| &mut p.routes);
        let (matched, cluster_gate) = if self.inner.clustered.load(Ordering::Acquire) {
            // A clustered node walks the trie for every message (its
            // routes are not cached) into the worker's scratch.
            ROUTE_SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let routed = self
                    .inner
                    .publish_gated(&msg, routes, &mut scratch, &mut ops);
                scratch.clear();
                routed
            })
        } else {
            // Routed through the connection's route cache: the scratch
            // stays empty (and unallocated).
            self.inner
                .publish_gated(&msg, routes, &mut Vec::new(), &mut ops)
        };
        // Before our own commit, so the platform's write overlaps it.
        let gate = match (self.run_publish_hook(&msg), cluster_gate) {
            (g, None) | (None, g) => g,
            (Some(a), Some(b)) => Some(Box::pin(async move {
                a.await?;
                b.await
            }) as crate::events::AckGate),
        };
        let mut code = if matched == 0 {
            reason::NO_MATCHING_SUBSCRIBERS
        } else {
            reason::SUCCESS
        };
        if qos == QoS::AtMostOnce {
            self.inner.submit(ops);
        } else if let Err(e) = self.inner.commit(ops).await {
            tracing::error!(error = %e, "cannot persist an incoming message");
            code = reason::IMPLEMENTATION_SPECIFIC_ERROR;
        }
        match (gate, packet_id) {
            (Some(gate), Some(id)) => match self.publisher.as_mut() {
                Some(p) => {
                    p.acks
                        .get_or_insert_with(Default::default)
                        .push(qos, id, code, Some(gate))
                }
                // Unreachable: `on_publish` made it first. Acknowledge
                // rather than lose the acknowledgement.
                None => self.ack(qos, packet_id, code),
            },
            // QoS 0: nothing to hold back; the gate is dropped unpolled.
            _ => self.ack(qos, packet_id, code),
        }
        Ok(())
    }

    fn ack_store(&self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.inner.submit(vec![Op::Ack {
                client_id: self.client_id.to_string(),
                seq,
            }]);
        }
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let session = self.session.clone().ok_or(End::Lost)?;
        let sub_id = s.properties.subscription_identifier;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let now = Instant::now();
        let mut quota_reported = false;
        for (filter, opts) in s.filters {
            let shared = mqtt_codec::topic::parse_shared(&filter).is_some();
            let opts = self
                .core
                .subscription_options(shared, opts)
                .map_err(|Close(code)| End::Server(code))?;
            if crate::protocol::refused_subscription(
                &self.inner.config.refused_subscriptions,
                &filter,
            ) {
                Metrics::inc(&self.inner.metrics.subscriptions_refused);
                codes.push(self.core.suback_code(Granted::Refused));
                continue;
            }
            if !self
                .inner
                .authz
                .can_subscribe(&self.client_id, &self.identity, &filter)
            {
                Metrics::inc(&self.inner.metrics.authz_denials);
                codes.push(self.core.suback_code(Granted::NotAuthorized));
                continue;
            }
            let limit = self.inner.config.max_subscriptions_per_session;
            let Some(is_new) = self.inner.subscribe(&session, &filter, opts, sub_id, limit) else {
                Metrics::inc(&self.inner.metrics.subscriptions_quota_exceeded);
                if !quota_reported {
                    quota_reported = true;
                    self.inner.security_event(
                        SecurityEventKind::SubscriptionQuotaExceeded,
                        Some(&self.client_id),
                        Some(self.peer.ip()),
                        || format!("session holds the maximum of {limit} subscriptions"),
                    );
                }
                codes.push(self.core.suback_code(Granted::QuotaExceeded));
                continue;
            };
            codes.push(self.core.suback_code(Granted::Qos(opts.qos)));
            let send_retained = !shared
                && self.inner.config.retain_available
                && match opts.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendIfNew => is_new,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                let mut found = Vec::new();
                self.inner
                    .retained
                    .read()
                    .matching(&filter, now, &mut found);
                for m in found {
                    retained.push(Outgoing {
                        qos: m.qos.min(opts.qos),
                        retain: true,
                        msg: m,
                        sub_ids: sub_id.into_iter().collect(),
                        seq: None,
                        share: None,
                    });
                }
            }
        }
        // The retained messages join the queue now, not after the store's
        // commit below: messages routed to the new subscription meanwhile
        // are newer than them and must not be overtaken by an older
        // retained value. They still go out after the SUBACK, which is
        // encoded before the queue is next drained.
        let mut ops = Vec::new();
        for out in retained {
            self.inner.enqueue(&session, out, &mut ops, &mut None);
        }
        self.inner.submit(ops);
        if let Some(op) = self.inner.session_put_op(&session) {
            if self.inner.commit(vec![op]).await.is_err() {
                tracing::error!(client_id = %self.client_id, "cannot persist subscriptions");
            }
        }
        // In a cluster, SUBACK once the other nodes route to this one: a
        // client that subscribes and then has something published anywhere
        // gets it.
        if let Some(settled) = self.inner.cluster_settled() {
            if tokio::time::timeout(CLUSTER_SETTLE_WAIT, settled)
                .await
                .is_err()
            {
                tracing::warn!(client_id = %self.client_id, "the cluster did not confirm a subscription in time; acknowledging it anyway");
            }
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties: AckProperties::default(),
            reason_codes: codes,
        }));
        Ok(())
    }

    /// The trie changes before anything is awaited, so a message another
    /// connection routes once this UNSUBSCRIBE was handled no longer comes
    /// here (MQTT 5 §3.10.4: stop adding new messages). Messages already
    /// routed to the session but not yet sent are dropped unless another
    /// subscription of the session wants them (the specification leaves it
    /// open): after UNSUBACK the client gets nothing more on the topics it
    /// left, except the completion of QoS 1/2 messages already in flight.
    async fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), End> {
        let session = self.session.clone().ok_or(End::Lost)?;
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut removed = false;
        for filter in &u.filters {
            let existed = self.inner.unsubscribe(&session, filter);
            removed |= existed;
            codes.push(if existed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        if removed {
            let dropped = self.inner.drop_unwanted_queued(&session);
            if dropped > 0 {
                Metrics::add(
                    &self.inner.metrics.messages_dropped_unsubscribed,
                    dropped as u64,
                );
            }
        }
        if let Some(op) = self.inner.session_put_op(&session) {
            let _ = self.inner.commit(vec![op]).await;
        }
        let unsuback = self.core.unsuback(u.packet_id, codes);
        self.send(&unsuback);
        Ok(())
    }

    /// After the packet loop: tell the client why (MQTT 5), publish the will
    /// if due, and detach from the session (ending it if it does not persist).
    async fn finish(&mut self, end: End) {
        if self.flap_counted && matches!(end, End::ClientDisconnect { .. }) {
            // Before the socket closes: a client that reconnects once it
            // sees the close finds this connection already let off.
            self.inner.limits.client_left_cleanly(&self.client_id);
        }
        // Acknowledgements still waiting for the platform are dropped. A
        // QoS 2 message among them is forgotten: the client resends it after
        // reconnecting, and it must be stored then, not acknowledged as known.
        self.release_acks();
        if let Some(q) = self.publisher.as_mut().and_then(|p| p.acks.take()) {
            self.forget_qos2(q.unconfirmed_qos2());
        }
        let code = match &end {
            End::Server(c) | End::Kicked(c) => Some(*c),
            End::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            _ => None,
        };
        if code.is_some() && self.session.is_some() {
            // Acks already encoded go out first (MQTT 3.1.1 clients too,
            // which get no DISCONNECT), unless the client stopped reading
            // and the buffer is full of undeliverable messages.
            if self.wbuf.len() > KEEP_WBUF {
                self.wbuf.clear();
            }
            if let Some(disconnect) = code.and_then(|c| self.core.disconnect(c)) {
                self.send(&disconnect);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.write_out()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
        let Some(session) = self.session.take() else {
            return;
        };
        tracing::debug!(client_id = %self.client_id, end = ?end, "connection closed");
        if let Some(h) = self.inner.hooks.connection() {
            h.disconnected(&self.client_id, &self.identity, end_reason(&end));
        }

        let publish_will = match end {
            End::ClientDisconnect { publish_will } => publish_will,
            End::Shutdown => false,
            _ => true,
        };
        let will = self.core.take_will(publish_will);

        // Detach, unless another connection already owns the session.
        let (owner, expiry, generation, handover) = {
            let mut st = session.state.lock();
            let owner = st.conn.as_ref().map(|c| c.conn_id) == Some(self.conn_id);
            let mut handover = Vec::new();
            if owner {
                st.conn = None;
                session.set_online(false);
                st.disconnected_at = Some(Instant::now());
                // Shared-subscription messages not yet acknowledged go to
                // another member instead of waiting for this client.
                if !matches!(end, End::Shutdown) {
                    let (shared, rest): (Vec<_>, Vec<_>) =
                        st.queue.drain(..).partition(|o| o.share.is_some());
                    st.queue.extend(rest);
                    handover = shared;
                    let ids: Vec<u16> = st
                        .inflight
                        .iter()
                        .filter(|(_, f)| {
                            f.out.share.is_some()
                                && f.stage == Stage::Published
                                && f.out.qos == QoS::AtLeastOnce
                        })
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        if let Some(f) = st.inflight.remove(&id) {
                            handover.push(f.out);
                        }
                    }
                }
            }
            (owner, st.expiry_interval, st.generation, handover)
        };
        if let Some(will) = will {
            self.schedule_will(&session, will, expiry, generation);
        }
        if !owner {
            return;
        }
        self.inner.hand_over_shared(session.id, handover);
        if expiry == 0 {
            self.inner.end_session(&session);
        } else if let Some(op) = self.inner.session_put_op(&session) {
            self.inner.submit(vec![op]);
        }
    }

    /// After we closed the connection for the client's fault (our
    /// DISCONNECT is written and our side shut down): read and discard what
    /// the client still sends, until it closes too, for at most [`LINGER`]
    /// and [`LINGER_BYTES`]. Closing a socket with unread data makes the
    /// kernel answer with a reset, and a client that gets the reset while
    /// still writing (a burst past our Receive Maximum, say) may never read
    /// the DISCONNECT that says why.
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER;
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            self.rbuf.clear();
            match tokio::time::timeout_at(
                deadline,
                self.stream.read_some(&mut self.rbuf, READ_CHUNK),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => discarded += n,
                _ => break,
            }
        }
        self.rbuf.release();
    }

    /// Publish the will now or after its delay (see [`SessionTimers`]).
    /// The session's own end stays with the broker's expiry sweep; this
    /// only waits for the will.
    fn schedule_will(&self, session: &Arc<Session>, will: LastWill, expiry: u32, generation: u32) {
        let now = Instant::now();
        let delay = lifetime::will_delay(self.v5(), will.properties.will_delay_interval, expiry);
        let mut timers = SessionTimers::default();
        timers.disconnected(now, expiry, Some(delay));
        let msg = will_message(will, session.id);
        let inner = self.inner.clone();
        if timers.handle_timeout(now) == Some(TimerEvent::PublishWill) {
            publish_will(&inner, msg);
            return;
        }
        let session = session.clone();
        tokio::spawn(async move {
            while let Some(at) = timers.poll_timeout() {
                tokio::time::sleep_until(at).await;
                {
                    // The client came back in the meantime (a newer
                    // generation holds the session, which has not ended):
                    // that cancels the will.
                    let st = session.state.lock();
                    if !st.ended && (st.generation != generation || st.conn.is_some()) {
                        timers.reconnected();
                    }
                }
                match timers.handle_timeout(Instant::now()) {
                    Some(TimerEvent::PublishWill) => {
                        publish_will(&inner, msg);
                        return;
                    }
                    Some(TimerEvent::EndSession) => return,
                    None => {}
                }
            }
        });
    }
}

fn will_message(will: LastWill, publisher: u64) -> Arc<Message> {
    let p = will.properties;
    Arc::new(Message {
        topic: will.topic,
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        expires_at: p
            .message_expiry_interval
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s))),
        properties: mqtt_codec::PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        }
        .into(),
        publisher,
    })
}

fn publish_will(inner: &Arc<Inner>, msg: Arc<Message>) {
    Metrics::inc(&inner.metrics.wills_published);
    let mut scratch = Vec::new();
    let mut ops = Vec::new();
    inner.publish(&msg, &mut scratch, &mut ops);
    inner.submit(ops);
}

/// Unpredictable enough for assigned client identifiers.
fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return Instant::now().elapsed().as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AllowAll, StaticAuth};
    use crate::{Broker, BrokerConfig, BrokerParts};

    /// Every idle connection is one of these futures: keep it small.
    #[tokio::test]
    async fn idle_connection_state_is_small() {
        let broker = Broker::open(BrokerParts {
            config: BrokerConfig::default(),
            data_dir: None,
            fsync: false,
            authenticator: Arc::new(StaticAuth::new(true)),
            authorizer: Arc::new(AllowAll),
        })
        .expect("broker");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (a, _) = listener.accept().await.expect("accept");
        drop(client);
        let fut = serve(
            broker.inner.clone(),
            a,
            "127.0.0.1:1".parse().expect("addr"),
            "test",
            None,
        );
        let size = std::mem::size_of_val(&fut);
        drop(fut);
        let conn = std::mem::size_of::<Connection<crate::transport::Tcp>>();
        let session = std::mem::size_of::<Session>();
        println!("serve future {size} B, Connection {conn} B, Session {session} B");
        assert!(size <= 256, "serve future is {size} bytes");
        // 256 is an allocator size class (mimalloc: 224, 256, 320): a
        // parked connection is this box and little else.
        assert!(conn <= 256, "Connection is {conn} bytes");
        // Behind an `Arc` (16 bytes more): the 224-byte class.
        assert!(session <= 208, "Session is {session} bytes");
    }
}
