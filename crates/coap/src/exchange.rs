//! The message layer and request/response matching of RFC 7252 (§4, §5.3),
//! sans-IO: one [`Endpoint`] for every peer of one UDP socket.
//!
//! Datagrams go in through [`Endpoint::handle_datagram`]; what to send comes
//! out of [`Endpoint::poll_transmit`]; what the application must hear comes
//! out of [`Endpoint::poll_event`]; time only moves when the caller says so
//! ([`Endpoint::handle_timeout`], [`Endpoint::poll_timeout`]). The endpoint
//! plays both roles: it answers requests (piggybacked in the ACK when the
//! application answers within [`EndpointConfig::separate_ack_delay`],
//! otherwise an empty ACK and later a Confirmable separate response) and it
//! sends requests and other messages (notifications), retransmitting
//! Confirmable ones with exponential back-off until acknowledged or given
//! up.
//!
//! Every table is bounded: deduplication entries, exchanges in total and per
//! peer. A request that would exceed a bound is refused with 5.03 Service
//! Unavailable and Max-Age (or dropped when Non-confirmable), so an
//! overloaded endpoint degrades into polite refusals, not memory growth.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use crate::message::{
    option, Code, DecodeLimits, EncodeError, Message, MessageType, Rejection, Token,
};

/// Transmission parameters and bounds (RFC 7252 §4.8 defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// ACK_TIMEOUT: the first retransmission timeout's lower bound (2 s).
    pub ack_timeout: Duration,
    /// ACK_RANDOM_FACTOR × 100: the first timeout is drawn uniformly from
    /// `[ack_timeout, ack_timeout × factor]` (150, i.e. 1.5).
    pub ack_random_factor_percent: u32,
    /// MAX_RETRANSMIT (4).
    pub max_retransmit: u8,
    /// EXCHANGE_LIFETIME: how long a CON's message id is remembered (247 s).
    pub exchange_lifetime: Duration,
    /// NON_LIFETIME: how long a NON's message id is remembered (145 s).
    pub non_lifetime: Duration,
    /// How long a Confirmable request waits for the application before the
    /// endpoint sends an empty ACK and switches to a separate response. Well
    /// under the client's ACK_TIMEOUT, so the client does not retransmit.
    pub separate_ack_delay: Duration,
    /// How long an incoming request may stay unanswered before its state is
    /// dropped (the client has given up by then).
    pub response_timeout: Duration,
    /// How long a request we sent waits for a response after its ACK (or,
    /// for a NON request, after sending).
    pub request_timeout: Duration,
    /// The largest datagram accepted.
    pub max_message_size: usize,
    /// The most message ids remembered for deduplication. When full, the
    /// oldest ids are forgotten first — those older than MAX_TRANSMIT_SPAN
    /// (after which a peer no longer
    /// retransmits) are forgotten early; only if none is that old are new
    /// requests refused.
    pub max_dedup: usize,
    /// The most bytes of cached replies held for deduplication.
    pub max_dedup_bytes: usize,
    /// The most exchanges (requests being answered, CON messages in flight,
    /// requests awaiting a response) in total.
    pub max_exchanges: usize,
    /// The most exchanges with one peer.
    pub max_exchanges_per_peer: usize,
    /// Max-Age (seconds) of the 5.03 sent when a bound is hit.
    pub overload_max_age: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            ack_timeout: Duration::from_secs(2),
            ack_random_factor_percent: 150,
            max_retransmit: 4,
            exchange_lifetime: Duration::from_secs(247),
            non_lifetime: Duration::from_secs(145),
            separate_ack_delay: Duration::from_millis(500),
            response_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(93),
            max_message_size: 1280,
            max_dedup: 65_536,
            max_dedup_bytes: 16 * 1024 * 1024,
            max_exchanges: 4096,
            max_exchanges_per_peer: 32,
            overload_max_age: 5,
        }
    }
}

/// Names one exchange: a request the application must answer, or a message
/// (request, response, notification) the application sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExchangeId(pub u64);

/// Why something we sent did not get through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A Confirmable message was retransmitted MAX_RETRANSMIT times without
    /// an ACK, or a request got no response within the request timeout.
    Timeout,
    /// The peer answered with Reset.
    Reset,
}

/// What the application must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new request (never a duplicate); answer it with [`Endpoint::respond`].
    Request {
        /// The exchange to answer.
        id: ExchangeId,
        /// Who sent it.
        peer: SocketAddr,
        /// The request.
        message: Message,
    },
    /// A response to a request sent with [`Endpoint::send_request`] (for an
    /// observation, every notification).
    Response {
        /// The request's exchange.
        id: ExchangeId,
        /// Who answered.
        peer: SocketAddr,
        /// The response.
        message: Message,
    },
    /// A Confirmable message sent with [`Endpoint::send`] or a separate
    /// response was acknowledged.
    Acknowledged {
        /// Its exchange.
        id: ExchangeId,
        /// The peer.
        peer: SocketAddr,
    },
    /// Something we sent failed.
    Failed {
        /// Its exchange.
        id: ExchangeId,
        /// The peer.
        peer: SocketAddr,
        /// Timeout or Reset.
        reason: Failure,
    },
}

/// Why the endpoint refused a call.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExchangeError {
    /// The exchange is unknown: answered already, or timed out.
    #[error("unknown or finished exchange")]
    UnknownExchange,
    /// The exchange bounds are reached.
    #[error("too many exchanges in progress")]
    Busy,
    /// A request with this token is already waiting for a response from
    /// this peer.
    #[error("token already in use with this peer")]
    TokenInUse,
    /// The message cannot be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// A request we are answering.
#[derive(Debug)]
struct Incoming {
    peer: SocketAddr,
    message_id: u16,
    token: Token,
    con: bool,
    /// The empty ACK went out: the answer must be a separate response.
    acked: bool,
    ack_at: Instant,
    expires: Instant,
}

/// A Confirmable message we keep retransmitting.
#[derive(Debug)]
struct InFlight {
    id: ExchangeId,
    bytes: Bytes,
    retransmits: u8,
    timeout: Duration,
    next_at: Instant,
    /// The request's token when this is a request: its ACK may carry the
    /// response.
    request: Option<Token>,
}

/// A request we sent, waiting for its response.
#[derive(Debug)]
struct Pending {
    id: ExchangeId,
    /// Keep matching responses after the first (an observation).
    observe: bool,
    /// A notification arrived: the observation lasts until cancelled.
    observing: bool,
    expires: Instant,
}

#[derive(Debug)]
struct Dedup {
    /// What to resend for a duplicate; `None` while the application works.
    reply: Option<Bytes>,
    /// The request being answered, if any.
    pending: Option<ExchangeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Retransmit(SocketAddr, u16),
    EmptyAck(ExchangeId),
    IncomingExpiry(ExchangeId),
    RequestExpiry(SocketAddr, Token),
}

/// A small xorshift64* generator: message ids and tokens need to be hard to
/// guess for an off-path attacker, not cryptographically strong; the caller
/// seeds it from the OS.
#[derive(Debug)]
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The sans-IO CoAP endpoint. See the module documentation.
#[derive(Debug)]
pub struct Endpoint {
    config: EndpointConfig,
    limits: DecodeLimits,
    rng: Xorshift,
    /// The next message id per peer (see `allocate_mid`).
    mids: HashMap<SocketAddr, u16>,
    next_id: u64,
    incoming: HashMap<ExchangeId, Incoming>,
    in_flight: HashMap<(SocketAddr, u16), InFlight>,
    in_flight_by_id: HashMap<ExchangeId, (SocketAddr, u16)>,
    pending: HashMap<(SocketAddr, Token), Pending>,
    per_peer: HashMap<SocketAddr, usize>,
    exchanges: usize,
    dedup: HashMap<(SocketAddr, u16), Dedup>,
    dedup_bytes: usize,
    /// Ids forgotten before MAX_TRANSMIT_SPAN because the table was full.
    dedup_evicted_young: u64,
    /// Message ids in arrival order, with their arrival time.
    dedup_con: VecDeque<(Instant, SocketAddr, u16)>,
    dedup_non: VecDeque<(Instant, SocketAddr, u16)>,
    /// NON messages we sent, for matching a Reset (an observer cancelling).
    sent_non: HashMap<(SocketAddr, u16), ExchangeId>,
    sent_non_order: VecDeque<(Instant, SocketAddr, u16)>,
    /// Peers that answered a message of ours (proved they see our datagrams).
    verified: HashMap<SocketAddr, Instant>,
    verified_order: VecDeque<(Instant, SocketAddr)>,
    timers: BTreeSet<(Instant, Timer)>,
    transmits: VecDeque<(SocketAddr, Bytes)>,
    events: VecDeque<Event>,
}

impl Endpoint {
    /// A new endpoint; `seed` seeds message ids and tokens.
    pub fn new(config: EndpointConfig, seed: u64) -> Endpoint {
        let rng = Xorshift(seed | 1);
        Endpoint {
            limits: DecodeLimits {
                max_size: config.max_message_size,
                ..DecodeLimits::default()
            },
            config,
            rng,
            mids: HashMap::new(),
            next_id: 1,
            incoming: HashMap::new(),
            in_flight: HashMap::new(),
            in_flight_by_id: HashMap::new(),
            pending: HashMap::new(),
            per_peer: HashMap::new(),
            exchanges: 0,
            dedup: HashMap::new(),
            dedup_bytes: 0,
            dedup_evicted_young: 0,
            dedup_con: VecDeque::new(),
            dedup_non: VecDeque::new(),
            sent_non: HashMap::new(),
            sent_non_order: VecDeque::new(),
            verified: HashMap::new(),
            verified_order: VecDeque::new(),
            timers: BTreeSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// A fresh random 8-byte token.
    pub fn new_token(&mut self) -> Token {
        Token::from_u64(self.rng.next())
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.transmits.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.timers.first().map(|(t, _)| *t),
            self.dedup_con
                .front()
                .map(|e| e.0 + self.config.exchange_lifetime),
            self.dedup_non
                .front()
                .map(|e| e.0 + self.config.non_lifetime),
            self.sent_non_order.front().map(|e| e.0),
            self.verified_order.front().map(|e| e.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether `peer` has answered one of our Confirmable messages recently,
    /// proving that it receives what is sent to its address (used to limit
    /// amplification towards spoofed addresses).
    pub fn is_verified(&self, peer: SocketAddr) -> bool {
        self.verified.contains_key(&peer)
    }

    /// Whether the request `id` still waits for [`Endpoint::respond`].
    pub fn is_open(&self, id: ExchangeId) -> bool {
        self.incoming.contains_key(&id)
    }

    /// Exchanges in progress (for metrics and tests).
    pub fn exchanges(&self) -> usize {
        self.exchanges
    }

    /// Timers scheduled (bounded by the live exchanges: finished ones
    /// take theirs with them).
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Message ids remembered for deduplication.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// Ids forgotten before MAX_TRANSMIT_SPAN because the table was full.
    pub fn dedup_evicted_young(&self) -> u64 {
        self.dedup_evicted_young
    }

    /// Feed one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, peer: SocketAddr, data: &[u8]) {
        self.expire(now);
        let msg = match Message::decode_with(data, &self.limits) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "malformed CoAP message");
                if let Rejection::Reset { message_id } = e.rejection() {
                    self.send_empty(peer, MessageType::Reset, message_id);
                }
                return;
            }
        };
        if msg.code.is_empty() {
            self.handle_empty(now, peer, msg);
        } else if msg.code.is_request() {
            self.handle_request(now, peer, msg);
        } else {
            self.handle_response(now, peer, msg);
        }
    }

    fn handle_empty(&mut self, now: Instant, peer: SocketAddr, msg: Message) {
        match msg.mtype {
            // A CoAP ping (RFC 7252 §4.3): answer with Reset.
            MessageType::Confirmable => {
                self.send_empty(peer, MessageType::Reset, msg.message_id);
            }
            // An empty NON is a format error: ignore.
            MessageType::NonConfirmable => {}
            MessageType::Acknowledgement => {
                let Some(f) = self.take_in_flight(peer, msg.message_id) else {
                    return;
                };
                self.verify(now, peer);
                match f.request {
                    // The response will come separately.
                    Some(token) => {
                        if let Some(p) = self.pending.get_mut(&(peer, token)) {
                            self.timers
                                .remove(&(p.expires, Timer::RequestExpiry(peer, token)));
                            p.expires = now + self.config.request_timeout;
                            let at = p.expires;
                            self.timers.insert((at, Timer::RequestExpiry(peer, token)));
                        }
                    }
                    None => {
                        self.release(peer);
                        self.events
                            .push_back(Event::Acknowledged { id: f.id, peer });
                    }
                }
            }
            MessageType::Reset => {
                if let Some(f) = self.take_in_flight(peer, msg.message_id) {
                    self.verify(now, peer);
                    self.release_in_flight(peer, &f);
                    self.events.push_back(Event::Failed {
                        id: f.id,
                        peer,
                        reason: Failure::Reset,
                    });
                } else if let Some(id) = self.sent_non.remove(&(peer, msg.message_id)) {
                    self.cancel_pending_by_id(peer, id);
                    self.events.push_back(Event::Failed {
                        id,
                        peer,
                        reason: Failure::Reset,
                    });
                }
            }
        }
    }

    fn handle_request(&mut self, now: Instant, peer: SocketAddr, msg: Message) {
        let con = match msg.mtype {
            MessageType::Confirmable => true,
            MessageType::NonConfirmable => false,
            // A request in an ACK or RST is meaningless: ignore it.
            _ => return,
        };
        if self.answer_duplicate(peer, &msg) {
            return;
        }
        match msg.option_rejection() {
            None => {}
            Some(Rejection::BadOption {
                message_id, token, ..
            }) => {
                let mut reply = Message::new(
                    MessageType::Acknowledgement,
                    Code::BAD_OPTION,
                    message_id,
                    token,
                );
                reply.payload = Bytes::from_static(b"unrecognised critical option");
                let bytes = self.encode_or_empty(&reply);
                if self.make_room(now) {
                    self.remember(now, peer, &msg, Some(bytes.clone()), None);
                }
                self.transmits.push_back((peer, bytes));
                return;
            }
            Some(Rejection::Reset { message_id }) => {
                self.send_empty(peer, MessageType::Reset, message_id);
                return;
            }
            Some(Rejection::Ignore) => return,
        }
        if !self.make_room(now) || !self.acquire(peer) {
            tracing::debug!(%peer, "CoAP request refused: endpoint busy");
            if con {
                let reply = self.overload_reply(msg.message_id, msg.token);
                self.transmits.push_back((peer, reply));
            }
            return;
        }
        let id = self.new_id();
        let ack_at = now + self.config.separate_ack_delay;
        let expires = now + self.config.response_timeout;
        self.incoming.insert(
            id,
            Incoming {
                peer,
                message_id: msg.message_id,
                token: msg.token,
                con,
                acked: false,
                ack_at,
                expires,
            },
        );
        if con {
            self.timers.insert((ack_at, Timer::EmptyAck(id)));
        }
        self.timers.insert((expires, Timer::IncomingExpiry(id)));
        self.remember(now, peer, &msg, None, Some(id));
        self.events.push_back(Event::Request {
            id,
            peer,
            message: msg,
        });
    }

    /// A 5.03 Service Unavailable with Max-Age, piggybacked on the ACK.
    fn overload_reply(&self, message_id: u16, token: Token) -> Bytes {
        let mut reply = Message::new(
            MessageType::Acknowledgement,
            Code::SERVICE_UNAVAILABLE,
            message_id,
            token,
        );
        reply.set_uint_option(option::MAX_AGE, self.config.overload_max_age);
        self.encode_or_empty(&reply)
    }

    /// Handle a duplicate CON/NON (§4.5): resend what we answered, never
    /// deliver twice. Returns whether `msg` was a duplicate.
    fn answer_duplicate(&mut self, peer: SocketAddr, msg: &Message) -> bool {
        let Some(entry) = self.dedup.get(&(peer, msg.message_id)) else {
            return false;
        };
        if msg.mtype != MessageType::Confirmable {
            return true;
        }
        match (&entry.reply, entry.pending) {
            (Some(bytes), _) => {
                let bytes = bytes.clone();
                self.transmits.push_back((peer, bytes));
            }
            // The client retransmitted while the application is still
            // working: acknowledge now rather than at the timer.
            (None, Some(id)) => self.send_empty_ack(id),
            (None, None) => {}
        }
        true
    }

    fn handle_response(&mut self, now: Instant, peer: SocketAddr, msg: Message) {
        match msg.mtype {
            MessageType::Acknowledgement => {
                let key = (peer, msg.message_id);
                let matches = self
                    .in_flight
                    .get(&key)
                    .is_some_and(|f| f.request == Some(msg.token));
                if !matches {
                    return;
                }
                let Some(f) = self.take_in_flight(peer, msg.message_id) else {
                    return;
                };
                self.verify(now, peer);
                self.deliver_response(peer, f.id, msg);
            }
            MessageType::Confirmable | MessageType::NonConfirmable => {
                let con = msg.mtype == MessageType::Confirmable;
                if self.dedup.contains_key(&(peer, msg.message_id)) {
                    if let Some(Some(bytes)) = self
                        .dedup
                        .get(&(peer, msg.message_id))
                        .map(|d| d.reply.clone())
                    {
                        self.transmits.push_back((peer, bytes));
                    }
                    return;
                }
                let Some(id) = self.pending.get(&(peer, msg.token)).map(|p| p.id) else {
                    // A response nobody waits for (e.g. a notification after
                    // we forgot the observation): Reset tells the peer to stop.
                    self.send_empty(peer, MessageType::Reset, msg.message_id);
                    return;
                };
                if let Some(Rejection::Reset { message_id }) = msg.option_rejection() {
                    self.send_empty(peer, MessageType::Reset, message_id);
                    return;
                }
                // The separate response may overtake the lost empty ACK.
                if let Some(&key) = self.in_flight_by_id.get(&id) {
                    self.take_in_flight(key.0, key.1);
                }
                let reply = if con {
                    let ack = Message::empty(MessageType::Acknowledgement, msg.message_id);
                    let bytes = self.encode_or_empty(&ack);
                    self.transmits.push_back((peer, bytes.clone()));
                    Some(bytes)
                } else {
                    None
                };
                if self.make_room(now) {
                    self.remember(now, peer, &msg, reply, None);
                }
                self.deliver_response(peer, id, msg);
            }
            MessageType::Reset => {}
        }
    }

    fn deliver_response(&mut self, peer: SocketAddr, id: ExchangeId, msg: Message) {
        let key = (peer, msg.token);
        let observe = self.pending.get(&key).is_some_and(|p| p.observe);
        // A notification keeps the observation; a final response (or an
        // error, which ends an observation) closes the request.
        let keep = observe && msg.observe().is_some() && msg.code.is_success();
        if keep {
            if let Some(p) = self.pending.get_mut(&key) {
                p.observing = true;
            }
        }
        if !keep && self.take_pending(key).is_some() {
            self.release(peer);
        }
        self.events.push_back(Event::Response {
            id,
            peer,
            message: msg,
        });
    }

    /// Answer a request. The response's type, message id and token are set
    /// here: piggybacked in the ACK if the empty ACK has not gone out yet,
    /// otherwise a Confirmable separate response (retransmitted until
    /// acknowledged; [`Event::Acknowledged`] / [`Event::Failed`] report its
    /// fate under the same id), and a NON response to a NON request.
    pub fn respond(
        &mut self,
        now: Instant,
        id: ExchangeId,
        mut response: Message,
    ) -> Result<(), ExchangeError> {
        let inc = self
            .take_incoming(id)
            .ok_or(ExchangeError::UnknownExchange)?;
        response.token = inc.token;
        let dedup_key = (inc.peer, inc.message_id);
        if !(inc.con && inc.acked) {
            self.release(inc.peer);
        }
        if inc.con && !inc.acked {
            response.mtype = MessageType::Acknowledgement;
            response.message_id = inc.message_id;
            let bytes = Bytes::from(response.encode()?);
            self.set_dedup_reply(dedup_key, bytes.clone());
            self.transmits.push_back((inc.peer, bytes));
            return Ok(());
        }
        if let Some(d) = self.dedup.get_mut(&dedup_key) {
            d.pending = None;
        }
        response.mtype = if inc.con {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        };
        // A CON separate response keeps the request's slot.
        let result = self.send_with_id(now, inc.peer, response, id, None, inc.con);
        if result.is_err() && inc.con {
            self.release(inc.peer);
        }
        result
    }

    /// Drop a request without answering (a NON the application ignores). A
    /// Confirmable one still gets its empty ACK, so the client stops
    /// retransmitting.
    pub fn abandon(&mut self, id: ExchangeId) {
        if self.incoming.get(&id).is_some_and(|i| i.con && !i.acked) {
            self.send_empty_ack(id);
        }
        if let Some(inc) = self.take_incoming(id) {
            self.release(inc.peer);
            if let Some(d) = self.dedup.get_mut(&(inc.peer, inc.message_id)) {
                d.pending = None;
            }
        }
    }

    /// Send a request; its response(s) arrive as [`Event::Response`] under
    /// the returned id. The message's type (CON or NON) and token are kept,
    /// its message id is assigned. A request with Observe 0 stays open for
    /// notifications until [`Endpoint::cancel_request`] or an error.
    pub fn send_request(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        request: Message,
    ) -> Result<ExchangeId, ExchangeError> {
        let key = (peer, request.token);
        if self.pending.contains_key(&key) {
            return Err(ExchangeError::TokenInUse);
        }
        if !self.acquire(peer) {
            return Err(ExchangeError::Busy);
        }
        let id = self.new_id();
        let observe = request.observe() == Some(0);
        let token = request.token;
        if let Err(e) = self.send_with_id(now, peer, request, id, Some(token), false) {
            self.release(peer);
            return Err(e);
        }
        let expires = now + self.config.request_timeout;
        self.pending.insert(
            key,
            Pending {
                id,
                observe,
                observing: false,
                expires,
            },
        );
        // A CON request's expiry starts when it is acknowledged; until then
        // the retransmission schedule bounds it.
        if !self.in_flight_by_id.contains_key(&id) {
            self.timers
                .insert((expires, Timer::RequestExpiry(peer, token)));
        }
        Ok(id)
    }

    /// Forget a request (stop retransmitting it and ignore its responses:
    /// later notifications are answered with Reset).
    pub fn cancel_request(&mut self, peer: SocketAddr, token: Token) {
        if let Some(p) = self.take_pending((peer, token)) {
            self.release(peer);
            if let Some(&(peer, mid)) = self.in_flight_by_id.get(&p.id) {
                self.take_in_flight(peer, mid);
            }
        }
    }

    /// Send a message that is not a request (a notification): CON messages
    /// are retransmitted until acknowledged; for both types a Reset from the
    /// peer is reported as [`Event::Failed`]. The message id is assigned.
    pub fn send(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        message: Message,
    ) -> Result<ExchangeId, ExchangeError> {
        let id = self.new_id();
        self.send_with_id(now, peer, message, id, None, false)?;
        Ok(id)
    }

    /// Replace a Confirmable message still in flight by a newer one (RFC
    /// 7641 §4.5.2: a newer notification supersedes one not yet
    /// acknowledged). The new message goes out now with a new message id
    /// but keeps the old one's retransmission counter and timeout, so a
    /// dead peer is still given up on in bounded time. Returns false when
    /// nothing is in flight under `id`.
    pub fn replace(&mut self, id: ExchangeId, mut message: Message) -> Result<bool, ExchangeError> {
        let Some(&(peer, old_mid)) = self.in_flight_by_id.get(&id) else {
            return Ok(false);
        };
        let mid = self.allocate_mid(peer);
        message.message_id = mid;
        message.mtype = MessageType::Confirmable;
        let bytes = Bytes::from(message.encode()?);
        let Some(mut f) = self.in_flight.remove(&(peer, old_mid)) else {
            return Ok(false);
        };
        self.timers
            .remove(&(f.next_at, Timer::Retransmit(peer, old_mid)));
        f.bytes = bytes.clone();
        self.timers
            .insert((f.next_at, Timer::Retransmit(peer, mid)));
        self.in_flight.insert((peer, mid), f);
        self.in_flight_by_id.insert(id, (peer, mid));
        self.transmits.push_back((peer, bytes));
        Ok(true)
    }

    /// Whether a Confirmable message sent under `id` is still unacknowledged.
    pub fn in_flight(&self, id: ExchangeId) -> bool {
        self.in_flight_by_id.contains_key(&id)
    }

    /// Stop retransmitting a message sent with [`Endpoint::send`].
    pub fn cancel(&mut self, id: ExchangeId) {
        if let Some(&(peer, mid)) = self.in_flight_by_id.get(&id) {
            if let Some(f) = self.take_in_flight(peer, mid) {
                self.release_in_flight(peer, &f);
            }
        }
    }

    fn send_with_id(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        mut message: Message,
        id: ExchangeId,
        request: Option<Token>,
        slot_free: bool,
    ) -> Result<(), ExchangeError> {
        message.message_id = self.allocate_mid(peer);
        let bytes = Bytes::from(message.encode()?);
        match message.mtype {
            MessageType::Confirmable => {
                // A request's slot is held by its pending entry; a separate
                // response takes over its request's slot.
                if request.is_none() && !slot_free && !self.acquire(peer) {
                    return Err(ExchangeError::Busy);
                }
                let timeout = self.initial_timeout();
                let next_at = now + timeout;
                self.timers
                    .insert((next_at, Timer::Retransmit(peer, message.message_id)));
                self.in_flight.insert(
                    (peer, message.message_id),
                    InFlight {
                        id,
                        bytes: bytes.clone(),
                        retransmits: 0,
                        timeout,
                        next_at,
                        request,
                    },
                );
                self.in_flight_by_id.insert(id, (peer, message.message_id));
            }
            _ => {
                self.remember_sent_non(now, peer, message.message_id, id);
            }
        }
        self.transmits.push_back((peer, bytes));
        Ok(())
    }

    fn remember_sent_non(&mut self, now: Instant, peer: SocketAddr, mid: u16, id: ExchangeId) {
        if self.sent_non.len() >= self.config.max_dedup {
            if let Some((_, p, m)) = self.sent_non_order.pop_front() {
                self.sent_non.remove(&(p, m));
            }
        }
        self.sent_non.insert((peer, mid), id);
        self.sent_non_order
            .push_back((now + self.config.non_lifetime, peer, mid));
    }

    fn cancel_pending_by_id(&mut self, peer: SocketAddr, id: ExchangeId) {
        let key = self
            .pending
            .iter()
            .find(|(k, p)| k.0 == peer && p.id == id)
            .map(|(k, _)| *k);
        if let Some(key) = key {
            self.take_pending(key);
            self.release(peer);
        }
    }

    /// The first retransmission timeout, uniformly random in
    /// `[ACK_TIMEOUT, ACK_TIMEOUT × ACK_RANDOM_FACTOR]` (§4.2), so that many
    /// clients that lost the same datagram do not retransmit in lockstep.
    fn initial_timeout(&mut self) -> Duration {
        let base = self.config.ack_timeout.as_millis() as u64;
        let spread =
            base * u64::from(self.config.ack_random_factor_percent.saturating_sub(100)) / 100;
        let extra = if spread == 0 {
            0
        } else {
            self.rng.next() % (spread + 1)
        };
        Duration::from_millis(base + extra)
    }

    /// The next message id not in flight to `peer`. Each peer has its own
    /// counter (from a random start), so an id returns to a peer only after
    /// 65,536 messages *to that peer* — RFC 7252 §4.4 forbids reusing one
    /// within EXCHANGE_LIFETIME, and a peer that deduplicates our NON
    /// messages would drop a reused one. The table is bounded; a peer
    /// forgotten when it is full starts again from a random id.
    fn allocate_mid(&mut self, peer: SocketAddr) -> u16 {
        if !self.mids.contains_key(&peer) && self.mids.len() >= self.config.max_dedup {
            self.mids.clear();
        }
        let start = self.rng.next() as u16;
        let counter = self.mids.entry(peer).or_insert(start);
        for _ in 0..16 {
            let mid = *counter;
            *counter = counter.wrapping_add(1);
            if !self.in_flight.contains_key(&(peer, mid)) {
                return mid;
            }
        }
        let mid = *counter;
        *counter = counter.wrapping_add(1);
        mid
    }

    fn new_id(&mut self) -> ExchangeId {
        let id = ExchangeId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Release the slot an in-flight message holds: a request's is held by
    /// its pending entry, which goes with it.
    fn release_in_flight(&mut self, peer: SocketAddr, f: &InFlight) {
        match f.request {
            Some(token) => {
                if self.take_pending((peer, token)).is_some() {
                    self.release(peer);
                }
            }
            None => self.release(peer),
        }
    }

    fn take_in_flight(&mut self, peer: SocketAddr, mid: u16) -> Option<InFlight> {
        let f = self.in_flight.remove(&(peer, mid))?;
        self.in_flight_by_id.remove(&f.id);
        self.timers
            .remove(&(f.next_at, Timer::Retransmit(peer, mid)));
        Some(f)
    }

    /// Remove an incoming request and its timers.
    fn take_incoming(&mut self, id: ExchangeId) -> Option<Incoming> {
        let inc = self.incoming.remove(&id)?;
        self.timers.remove(&(inc.ack_at, Timer::EmptyAck(id)));
        self.timers
            .remove(&(inc.expires, Timer::IncomingExpiry(id)));
        Some(inc)
    }

    /// Remove a request we sent, and its timer.
    fn take_pending(&mut self, key: (SocketAddr, Token)) -> Option<Pending> {
        let p = self.pending.remove(&key)?;
        self.timers
            .remove(&(p.expires, Timer::RequestExpiry(key.0, key.1)));
        Some(p)
    }

    fn acquire(&mut self, peer: SocketAddr) -> bool {
        if self.exchanges >= self.config.max_exchanges {
            return false;
        }
        let n = self.per_peer.entry(peer).or_insert(0);
        if *n >= self.config.max_exchanges_per_peer {
            return false;
        }
        *n += 1;
        self.exchanges += 1;
        true
    }

    fn release(&mut self, peer: SocketAddr) {
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
            self.exchanges = self.exchanges.saturating_sub(1);
        }
    }

    /// Record that `peer` proved it receives what is sent to its address
    /// (it answered one of our CON messages, or echoed an Echo value).
    pub fn verify(&mut self, now: Instant, peer: SocketAddr) {
        if self.verified.contains_key(&peer) {
            return;
        }
        if self.verified.len() >= self.config.max_dedup {
            if let Some((_, p)) = self.verified_order.pop_front() {
                self.verified.remove(&p);
            }
        }
        let until = now + self.config.exchange_lifetime;
        self.verified.insert(peer, until);
        self.verified_order.push_back((until, peer));
    }

    fn remember(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        msg: &Message,
        reply: Option<Bytes>,
        pending: Option<ExchangeId>,
    ) {
        let key = (peer, msg.message_id);
        self.dedup_bytes += reply.as_ref().map_or(0, Bytes::len);
        if let Some(old) = self.dedup.insert(key, Dedup { reply, pending }) {
            self.dedup_bytes -= old.reply.as_ref().map_or(0, Bytes::len);
        }
        if msg.mtype == MessageType::Confirmable {
            self.dedup_con.push_back((now, peer, msg.message_id));
        } else {
            self.dedup_non.push_back((now, peer, msg.message_id));
        }
    }

    /// Record what a duplicate of `key` gets, and that nothing waits on it.
    fn set_dedup_reply(&mut self, key: (SocketAddr, u16), bytes: Bytes) {
        if let Some(d) = self.dedup.get_mut(&key) {
            self.dedup_bytes += bytes.len();
            self.dedup_bytes -= d.reply.as_ref().map_or(0, Bytes::len);
            d.reply = Some(bytes);
            d.pending = None;
        }
    }

    fn forget_message(&mut self, key: (SocketAddr, u16)) {
        if let Some(d) = self.dedup.remove(&key) {
            self.dedup_bytes -= d.reply.as_ref().map_or(0, Bytes::len);
        }
    }

    /// MAX_TRANSMIT_SPAN (§4.8.2): after this long a peer no longer
    /// retransmits a CON, so forgetting its id risks little.
    fn max_transmit_span(&self) -> Duration {
        let factor = self.config.ack_random_factor_percent.max(100);
        let spans = (1u32 << self.config.max_retransmit.min(16)) - 1;
        self.config
            .ack_timeout
            .saturating_mul(spans)
            .saturating_mul(factor)
            / 100
    }

    /// Make room for one more remembered message: forget ids that are past
    /// MAX_TRANSMIT_SPAN, oldest first, while a bound is reached. False
    /// when every remembered id is younger (then the request is refused).
    fn make_room(&mut self, now: Instant) -> bool {
        let span = self.max_transmit_span();
        while self.dedup.len() >= self.config.max_dedup
            || self.dedup_bytes >= self.config.max_dedup_bytes
        {
            let con = self.dedup_con.front().map(|e| e.0);
            let non = self.dedup_non.front().map(|e| e.0);
            let queue = match (con, non) {
                (Some(c), Some(n)) if n < c => &mut self.dedup_non,
                (Some(_), _) => &mut self.dedup_con,
                (None, Some(_)) => &mut self.dedup_non,
                (None, None) => return false,
            };
            let Some(&(at, peer, mid)) = queue.front() else {
                return false;
            };
            // Ids older than MAX_TRANSMIT_SPAN go first (the queues are in
            // arrival order); under a load that fills the table sooner,
            // younger ones go too: a late retransmission of a forgotten id
            // may then be processed twice, which beats refusing every new
            // request until ids age out.
            if now.saturating_duration_since(at) < span {
                self.dedup_evicted_young += 1;
            }
            queue.pop_front();
            let waiting = self
                .dedup
                .get(&(peer, mid))
                .is_some_and(|d| d.pending.is_some());
            if !waiting {
                self.forget_message((peer, mid));
            }
        }
        true
    }

    fn send_empty(&mut self, peer: SocketAddr, mtype: MessageType, message_id: u16) {
        let bytes = self.encode_or_empty(&Message::empty(mtype, message_id));
        self.transmits.push_back((peer, bytes));
    }

    fn send_empty_ack(&mut self, id: ExchangeId) {
        let Some(inc) = self.incoming.get_mut(&id) else {
            return;
        };
        if !inc.con || inc.acked {
            return;
        }
        inc.acked = true;
        let (peer, mid) = (inc.peer, inc.message_id);
        let bytes = self.encode_or_empty(&Message::empty(MessageType::Acknowledgement, mid));
        self.set_dedup_reply((peer, mid), bytes.clone());
        self.transmits.push_back((peer, bytes));
    }

    /// Messages built here have short options: encoding cannot fail, but a
    /// failure must not panic on the network path either.
    fn encode_or_empty(&self, m: &Message) -> Bytes {
        m.encode().map(Bytes::from).unwrap_or_default()
    }

    /// Advance time: retransmit, give up, send pending empty ACKs, forget
    /// expired state.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Retransmit(peer, mid) => self.on_retransmit(now, at, peer, mid),
                Timer::EmptyAck(id) => {
                    if self.incoming.get(&id).is_some_and(|i| i.ack_at == at) {
                        self.send_empty_ack(id);
                    }
                }
                Timer::IncomingExpiry(id) => {
                    if self.incoming.get(&id).is_some_and(|i| i.expires == at) {
                        if let Some(inc) = self.take_incoming(id) {
                            self.release(inc.peer);
                            if let Some(d) = self.dedup.get_mut(&(inc.peer, inc.message_id)) {
                                d.pending = None;
                            }
                        }
                    }
                }
                Timer::RequestExpiry(peer, token) => {
                    let expired = self.pending.get(&(peer, token)).is_some_and(|p| {
                        p.expires == at && !p.observing && !self.in_flight_by_id.contains_key(&p.id)
                    });
                    if expired {
                        if let Some(p) = self.take_pending((peer, token)) {
                            self.release(peer);
                            self.events.push_back(Event::Failed {
                                id: p.id,
                                peer,
                                reason: Failure::Timeout,
                            });
                        }
                    }
                }
            }
        }
    }

    fn on_retransmit(&mut self, now: Instant, at: Instant, peer: SocketAddr, mid: u16) {
        let max = self.config.max_retransmit;
        let Some(f) = self.in_flight.get_mut(&(peer, mid)) else {
            return;
        };
        if f.next_at != at {
            return;
        }
        if f.retransmits < max {
            f.retransmits += 1;
            f.timeout = f.timeout.saturating_mul(2);
            f.next_at = now + f.timeout;
            let (next_at, bytes) = (f.next_at, f.bytes.clone());
            self.timers.insert((next_at, Timer::Retransmit(peer, mid)));
            self.transmits.push_back((peer, bytes));
            return;
        }
        let Some(f) = self.take_in_flight(peer, mid) else {
            return;
        };
        self.release_in_flight(peer, &f);
        self.events.push_back(Event::Failed {
            id: f.id,
            peer,
            reason: Failure::Timeout,
        });
    }

    fn expire(&mut self, now: Instant) {
        let lifetimes = [self.config.exchange_lifetime, self.config.non_lifetime];
        for (con, lifetime) in [true, false].into_iter().zip(lifetimes) {
            loop {
                let queue = if con {
                    &mut self.dedup_con
                } else {
                    &mut self.dedup_non
                };
                let Some(&(at, peer, mid)) = queue.front() else {
                    break;
                };
                if at + lifetime > now {
                    break;
                }
                queue.pop_front();
                // The response timeout is shorter than both lifetimes, so
                // nothing still waits on an entry this old.
                self.forget_message((peer, mid));
            }
        }
        while let Some(&(at, peer, mid)) = self.sent_non_order.front() {
            if at > now {
                break;
            }
            self.sent_non_order.pop_front();
            self.sent_non.remove(&(peer, mid));
        }
        while let Some(&(at, peer)) = self.verified_order.front() {
            if at > now {
                break;
            }
            self.verified_order.pop_front();
            if self.verified.get(&peer) == Some(&at) {
                self.verified.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
mod tests;
