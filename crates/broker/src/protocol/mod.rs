//! The MQTT session protocol without I/O, in the quinn model: a state
//! machine fed with decoded packets ([`ConnState::handle_input`]) and the
//! time ([`ConnState::handle_timeout`]), asked what to send
//! ([`ConnState::poll_output`], [`ConnState::fill`]) and when to wake up
//! ([`ConnState::poll_timeout`]). The connection task (`connection.rs`)
//! only moves bytes, runs the async steps (authorization, routing, the
//! store) and sleeps; the protocol decisions are here, where tests step
//! them with a fake clock instead of sockets and sleeps.
//!
//! What lives where:
//! - [`ConnState`] is one connection's protocol state: the parameters
//!   negotiated at CONNECT, keep alive, topic aliases, the will, the
//!   acknowledgements to send and the resend position after a reconnect.
//!   Plain data (`Clone`, `Debug`).
//! - A session's shared state (queue, in-flight window, QoS 2 ids awaiting
//!   PUBREL) stays in [`crate::session::SessionState`] behind the session's
//!   mutex, because publishers on other tasks push into it; the methods
//!   that need it take the session and lock it only for the packets that
//!   touch it (a QoS 0/1 PUBLISH never does).
//! - [`lifetime::SessionTimers`] is the session after its connection: will
//!   delay against session expiry.
//!
//! Where quinn queues every event, [`ConnState::handle_input`] returns the
//! one thing a packet asks of the driver ([`Input`]): a PUBLISH goes to
//! routing by value, with no queue and no allocation on the way.

mod aliases;
mod keepalive;
pub(crate) mod lifetime;
#[cfg(test)]
mod tests;

use crate::config::BrokerConfig;
use crate::outbound::PublishOut;
use crate::session::{ConnLink, InFlight, Outgoing, Session, SessionState, Stage};
use aliases::Aliases;
use bytes::BytesMut;
use keepalive::KeepAlive;
use mqtt_codec::{
    encode, reason, AckProperties, Connect, Disconnect, DisconnectProperties, LastWill, Packet,
    Protocol, PubResponse, Publish, QoS, RetainHandling, Subscribe, SubscriptionOptions, UnsubAck,
    Unsubscribe,
};
use std::collections::VecDeque;
use tokio::time::Instant;

/// The connection must close with this reason code (sent in a DISCONNECT to
/// MQTT 5 clients).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("closing the connection with reason code 0x{0:02x}")]
pub(crate) struct Close(pub u8);

/// What the connection negotiated at CONNECT.
#[derive(Clone, Debug)]
pub(crate) struct Params {
    pub protocol: Protocol,
    /// The keep alive in force in seconds (the client's, or the server's
    /// maximum); 0: off. Narrow types here: every connection holds these.
    pub keep_alive: u16,
    /// Sent in CONNACK when the server overrides the client's keep alive.
    pub server_keep_alive: Option<u16>,
    /// Session Expiry Interval at CONNECT, capped by the configuration
    /// (3.1.1: 0 for a clean session, never for a persistent one).
    pub session_expiry: u32,
    /// The configured cap on session expiry, for DISCONNECT's new value.
    pub max_session_expiry: u32,
    /// Our Receive Maximum: QoS 2 messages the client may have unreleased.
    pub receive_maximum: u16,
    /// Our Topic Alias Maximum.
    pub topic_alias_maximum: u16,
    pub retain_available: bool,
    /// The client's Receive Maximum: our unacknowledged QoS 1/2 PUBLISHes.
    pub client_receive_max: u16,
    /// The client's Maximum Packet Size (`u32::MAX`: none, or as good as).
    pub client_max_packet: u32,
    /// The client's Topic Alias Maximum (0: no aliases toward it).
    pub client_alias_max: u16,
}

impl Default for Params {
    /// Before CONNECT: MQTT 3.1.1 until the client says otherwise.
    fn default() -> Params {
        Params {
            protocol: Protocol::V311,
            keep_alive: 0,
            server_keep_alive: None,
            session_expiry: 0,
            max_session_expiry: 0,
            receive_maximum: 65_535,
            topic_alias_maximum: 0,
            retain_available: true,
            client_receive_max: 65_535,
            client_max_packet: u32::MAX,
            client_alias_max: 0,
        }
    }
}

impl Params {
    /// Negotiate from the client's CONNECT and the broker's limits.
    pub fn negotiate(c: &Connect, cfg: &BrokerConfig) -> Params {
        let v5 = c.protocol.is_v5();
        // Session expiry: MQTT 5 says it; 3.1.1 persistent sessions never expire.
        let expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            lifetime::NEVER_EXPIRES
        };
        let mut server_keep_alive = None;
        let mut ka = c.keep_alive;
        if cfg.max_keep_alive > 0 && (ka == 0 || ka > cfg.max_keep_alive) {
            ka = cfg.max_keep_alive;
            server_keep_alive = Some(ka);
        }
        Params {
            protocol: c.protocol,
            keep_alive: ka,
            server_keep_alive,
            session_expiry: expiry.min(cfg.max_session_expiry),
            max_session_expiry: cfg.max_session_expiry,
            receive_maximum: cfg.receive_maximum,
            topic_alias_maximum: cfg.topic_alias_maximum,
            retain_available: cfg.retain_available,
            client_receive_max: c.properties.receive_maximum.unwrap_or(65_535),
            client_max_packet: c.properties.maximum_packet_size.unwrap_or(u32::MAX),
            client_alias_max: if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
        }
    }

    pub fn v5(&self) -> bool {
        self.protocol.is_v5()
    }
}

/// A small packet the core decided to send; the driver encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transmit {
    PubAck(u16, u8),
    PubRec(u16, u8),
    PubRel(u16, u8),
    PubComp(u16, u8),
    PingResp,
}

impl Transmit {
    pub fn packet(self) -> Packet {
        match self {
            Transmit::PubAck(id, c) => Packet::PubAck(PubResponse::new(id, c)),
            Transmit::PubRec(id, c) => Packet::PubRec(PubResponse::new(id, c)),
            Transmit::PubRel(id, c) => Packet::PubRel(PubResponse::new(id, c)),
            Transmit::PubComp(id, c) => Packet::PubComp(PubResponse::new(id, c)),
            Transmit::PingResp => Packet::PingResp,
        }
    }
}

/// What a received packet asks of the driver beyond sending
/// [`ConnState::poll_output`].
#[derive(Debug)]
pub(crate) enum Input {
    /// Nothing more.
    Done,
    /// A valid PUBLISH, its topic alias resolved: rate-limit, authorize
    /// ([`ConnState::accept_qos2`] first for QoS 2), route, then
    /// acknowledge with [`ConnState::ack`].
    Publish(Publish),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    /// A message we sent is acknowledged for good: the store may drop the
    /// stored copy with this sequence number.
    Delivered(u64),
    /// The client sent DISCONNECT; publish the will if it asked for it.
    Disconnect {
        publish_will: bool,
    },
}

/// A retransmitted QoS 2 PUBLISH is told apart from a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Qos2 {
    /// First time: route it.
    New,
    /// Already received and not yet released: acknowledge again, do not
    /// route twice.
    Duplicate,
}

/// How one filter of a SUBSCRIBE fared, for its SUBACK reason code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Granted {
    Qos(QoS),
    NotAuthorized,
    /// The session holds the configured maximum of subscriptions.
    QuotaExceeded,
    /// The filter is on the configured refusal list
    /// (`mqtt.refused_subscriptions`, see [`refused_subscription`]).
    Refused,
}

/// Whether the configured refusal list covers a requested SUBSCRIBE filter:
/// a refused pattern's wildcards match levels of the requested filter, so
/// `a/#` covers `a/b`, `a/+` and `a/#`, but not `#`.
pub(crate) fn refused_subscription(refused: &[String], filter: &str) -> bool {
    refused
        .iter()
        .any(|pattern| mqtt_codec::topic::matches(pattern, filter))
}

/// One packet taken from the session to send (see [`ConnState::fill`]).
#[derive(Debug)]
pub(crate) enum SessionPacket {
    Publish {
        out: Outgoing,
        packet_id: Option<u16>,
        /// A retransmission after reconnecting (DUP set, no topic alias).
        dup: bool,
    },
    /// A PUBREL repeated after reconnecting.
    PubRel(u16),
}

/// What [`ConnState::fill`] discarded, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FillStats {
    /// Messages whose expiry passed while they waited.
    pub expired: u64,
    /// Messages larger than the client's Maximum Packet Size.
    pub too_large: u64,
    /// The batch is full and more is waiting.
    pub more: bool,
}

/// One connection's protocol state. See the module documentation.
#[derive(Clone, Debug)]
pub(crate) struct ConnState {
    pub params: Params,
    keep_alive: KeepAlive,
    /// Allocated only for clients that use topic aliases.
    aliases: Option<Box<Aliases>>,
    /// The will, until the connection's end decides its fate.
    will: Option<Box<LastWill>>,
    /// Acknowledgements and other small packets to send, in order. Reused:
    /// no allocation per packet once warm; boxed, and given back by
    /// [`ConnState::release_idle`], so an idle connection holds a pointer.
    #[allow(clippy::box_collection)] // the point: 8 bytes while idle, not 32
    transmit: Option<Box<VecDeque<Transmit>>>,
    /// After a reconnect: in-flight messages from this packet id on have
    /// not been resent yet (they go out as the client's window allows,
    /// before anything new).
    resend_from: Option<u16>,
}

impl ConnState {
    pub fn new(params: Params, now: Instant) -> ConnState {
        ConnState {
            keep_alive: KeepAlive::new(now),
            params,
            aliases: None,
            will: None,
            transmit: None,
            resend_from: None,
        }
    }

    pub fn v5(&self) -> bool {
        self.params.v5()
    }

    /// Keep the will until the connection ends. Its bytes are copied: a
    /// slice would pin the whole read buffer for the life of the connection.
    pub fn set_will(&mut self, will: Option<LastWill>) {
        self.will = will.map(|mut w| {
            w.payload = bytes::Bytes::copy_from_slice(&w.payload);
            Box::new(w)
        });
    }

    /// The will, if the way the connection ended publishes it.
    pub fn take_will(&mut self, publish: bool) -> Option<LastWill> {
        let w = self.will.take()?;
        publish.then_some(*w)
    }

    /// Bytes arrived: the client is alive.
    pub fn on_receive(&mut self, now: Instant) {
        self.keep_alive.on_receive(now);
    }

    /// When [`ConnState::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.keep_alive.deadline(self.params.keep_alive)
    }

    /// Check the keep alive. `reading` is false while the driver holds back
    /// reading, which is no fault of the client's.
    pub fn handle_timeout(&mut self, now: Instant, reading: bool) -> Result<(), Close> {
        if self
            .keep_alive
            .handle_timeout(now, reading, self.params.keep_alive)
        {
            return Err(Close(reason::KEEP_ALIVE_TIMEOUT));
        }
        Ok(())
    }

    fn queue(&mut self, t: Transmit) {
        self.transmit
            .get_or_insert_with(Default::default)
            .push_back(t);
    }

    /// Give back the output queue if it is empty (the connection is about
    /// to wait for work).
    pub fn release_idle(&mut self) {
        if self.transmit.as_ref().is_some_and(|q| q.is_empty()) {
            self.transmit = None;
        }
    }

    /// The next packet to send.
    pub fn poll_output(&mut self) -> Option<Transmit> {
        self.transmit.as_mut()?.pop_front()
    }

    /// Handle one packet from the client (after CONNECT).
    pub fn handle_input(
        &mut self,
        now: Instant,
        packet: Packet,
        session: &Session,
    ) -> Result<Input, Close> {
        self.keep_alive.on_receive(now);
        match packet {
            Packet::Publish(mut p) => {
                self.check_publish(&mut p)?;
                Ok(Input::Publish(p))
            }
            Packet::PubAck(r) => Ok(delivered(on_puback(session, r.packet_id))),
            Packet::PubRec(r) => Ok(delivered(self.on_pubrec(session, &r))),
            Packet::PubRel(r) => {
                self.on_pubrel(session, r.packet_id);
                Ok(Input::Done)
            }
            Packet::PubComp(r) => {
                on_pubcomp(session, r.packet_id);
                Ok(Input::Done)
            }
            Packet::Subscribe(s) => Ok(Input::Subscribe(s)),
            Packet::Unsubscribe(u) => Ok(Input::Unsubscribe(u)),
            Packet::PingReq => {
                self.queue(Transmit::PingResp);
                Ok(Input::Done)
            }
            Packet::Disconnect(d) => self.on_disconnect(&d, session),
            Packet::Connect(_)
            | Packet::Auth(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => Err(Close(reason::PROTOCOL_ERROR)),
        }
    }

    /// Validate a PUBLISH and resolve its topic alias.
    /// A PUBLISH from the client, checked and its topic alias resolved in
    /// place: the driver's fast path (no moves of the packet through the
    /// core; [`ConnState::handle_input`] does the same for the tests).
    pub fn accept_publish(&mut self, now: Instant, p: &mut Publish) -> Result<(), Close> {
        self.keep_alive.on_receive(now);
        self.check_publish(p)
    }

    /// A PUBACK for a QoS 1 message we sent, the driver's other fast
    /// path (at QoS 1 there is one per message delivered): the store
    /// sequence to drop, if any.
    pub fn accept_puback(&mut self, now: Instant, session: &Session, id: u16) -> Option<u64> {
        self.keep_alive.on_receive(now);
        on_puback(session, id)
    }

    fn check_publish(&mut self, p: &mut Publish) -> Result<(), Close> {
        if self.v5() {
            if !p.properties.subscription_identifiers.is_empty() {
                return Err(Close(reason::PROTOCOL_ERROR));
            }
            // Read before written: writing through `DerefMut` would
            // allocate properties for every message that has none.
            if let Some(a) = p.properties.topic_alias {
                p.properties.topic_alias = None;
                self.aliases
                    .get_or_insert_with(Default::default)
                    .resolve_inbound(a, &mut p.topic, self.params.topic_alias_maximum)
                    .map_err(Close)?;
            }
        }
        if p.topic.is_empty() {
            return Err(Close(reason::PROTOCOL_ERROR));
        }
        if p.retain && !self.params.retain_available {
            return Err(Close(reason::RETAIN_NOT_SUPPORTED));
        }
        Ok(())
    }

    /// Record an incoming QoS 2 PUBLISH until its PUBREL. More unreleased
    /// than our Receive Maximum is a protocol violation (0x93).
    pub fn accept_qos2(&mut self, session: &Session, packet_id: u16) -> Result<Qos2, Close> {
        let mut st = session.state.lock();
        if st.incoming_qos2.contains(&packet_id) {
            return Ok(Qos2::Duplicate);
        }
        if st.incoming_qos2.len() >= usize::from(self.params.receive_maximum) {
            return Err(Close(reason::RECEIVE_MAXIMUM_EXCEEDED));
        }
        st.incoming_qos2.insert(packet_id);
        Ok(Qos2::New)
    }

    /// End incoming QoS 2 flows without a PUBREL (refused, or their
    /// acknowledgement was never sent): a resend is then a new message.
    pub fn forget_qos2(&mut self, session: &Session, ids: impl IntoIterator<Item = u16>) {
        let mut st = session.state.lock();
        for id in ids {
            st.incoming_qos2.remove(&id);
        }
    }

    /// Acknowledge an incoming PUBLISH (PUBACK for QoS 1, PUBREC for QoS 2;
    /// nothing for QoS 0). MQTT 3.1.1 has no reason codes.
    pub fn ack(&mut self, qos: QoS, packet_id: u16, code: u8) {
        let code = if self.v5() { code } else { 0 };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue(Transmit::PubAck(packet_id, code)),
            QoS::ExactlyOnce => self.queue(Transmit::PubRec(packet_id, code)),
        }
    }

    fn on_pubrel(&mut self, session: &Session, id: u16) {
        let known = session.state.lock().incoming_qos2.remove(&id);
        let code = if known || !self.v5() {
            0
        } else {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.queue(Transmit::PubComp(id, code));
    }

    /// PUBREC for a QoS 2 message we sent: release it (PUBREL), or end its
    /// flow if the client refused it. Returns the store sequence to drop.
    fn on_pubrec(&mut self, session: &Session, r: &PubResponse) -> Option<u64> {
        let mut st = session.state.lock();
        match st.inflight.get_mut(&r.packet_id) {
            Some(f) if f.out.qos == QoS::ExactlyOnce && f.stage == Stage::Published => {
                if r.reason_code >= 0x80 {
                    return st.inflight.remove(&r.packet_id).and_then(|f| f.out.seq);
                }
                f.stage = Stage::Released;
                let seq = f.out.seq.take();
                drop(st);
                self.queue(Transmit::PubRel(r.packet_id, 0));
                seq
            }
            Some(f) if f.stage == Stage::Released => {
                drop(st);
                self.queue(Transmit::PubRel(r.packet_id, 0));
                None
            }
            _ => {
                drop(st);
                let code = if self.v5() {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                } else {
                    0
                };
                self.queue(Transmit::PubRel(r.packet_id, code));
                None
            }
        }
    }

    /// DISCONNECT from the client: it may change the session expiry, but
    /// not from 0 (MQTT 5 §3.14.2.2.2).
    fn on_disconnect(&mut self, d: &Disconnect, session: &Session) -> Result<Input, Close> {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.params.session_expiry == 0 && expiry != 0 {
                return Err(Close(reason::PROTOCOL_ERROR));
            }
            let mut st = session.state.lock();
            st.expiry_interval = expiry.min(self.params.max_session_expiry);
            st.persistent = st.expiry_interval > 0;
        }
        Ok(Input::Disconnect {
            publish_will: d.reason_code == reason::DISCONNECT_WITH_WILL,
        })
    }

    /// The options a SUBSCRIBE filter is registered with. No Local on a
    /// shared subscription is a protocol error (MQTT 5 §3.8.3.1); MQTT 3.1.1
    /// has none of the MQTT 5 options, whatever the bits say.
    pub fn subscription_options(
        &self,
        shared: bool,
        mut opts: SubscriptionOptions,
    ) -> Result<SubscriptionOptions, Close> {
        if !self.v5() {
            opts.no_local = false;
            opts.retain_as_published = false;
            opts.retain_handling = RetainHandling::SendAtSubscribe;
        } else if shared && opts.no_local {
            return Err(Close(reason::PROTOCOL_ERROR));
        }
        Ok(opts)
    }

    /// The SUBACK reason code for one filter; MQTT 3.1.1 knows only 0x80
    /// for a failure.
    pub fn suback_code(&self, granted: Granted) -> u8 {
        match granted {
            Granted::Qos(q) => q as u8,
            // The same code in both versions: MQTT 3.1.1 knows no other,
            // and a refusal by configuration has no more specific one.
            Granted::Refused => reason::UNSPECIFIED_ERROR,
            _ if !self.v5() => reason::UNSPECIFIED_ERROR,
            Granted::NotAuthorized => reason::NOT_AUTHORIZED,
            Granted::QuotaExceeded => reason::QUOTA_EXCEEDED,
        }
    }

    /// UNSUBACK with a reason code per filter (MQTT 3.1.1 has none).
    pub fn unsuback(&self, packet_id: u16, mut codes: Vec<u8>) -> Packet {
        if !self.v5() {
            codes = Vec::new();
        }
        Packet::UnsubAck(UnsubAck {
            packet_id,
            properties: AckProperties::default(),
            reason_codes: codes,
        })
    }

    /// The DISCONNECT telling the client why we close, with the reason
    /// spelled out; MQTT 3.1.1 has no server DISCONNECT (`None`).
    pub fn disconnect(&self, code: u8) -> Option<Packet> {
        self.v5().then(|| {
            Packet::Disconnect(Box::new(Disconnect {
                reason_code: code,
                properties: DisconnectProperties {
                    reason_string: Some(reason::name(code).to_string()),
                    ..Default::default()
                },
            }))
        })
    }

    /// The client resumed a session: what is in flight goes out again
    /// (PUBLISH with DUP, or PUBREL) before anything new.
    pub fn start_resend(&mut self, st: &SessionState) {
        self.resend_from = (!st.inflight.is_empty()).then_some(0);
    }

    /// Move what may be sent now from the session into `batch` (at most
    /// `max` entries): first the in-flight messages to resend after a
    /// reconnect, then queued messages, never more unacknowledged QoS 1/2
    /// PUBLISHes than the client's Receive Maximum, dropping expired and
    /// oversized messages (their store sequences go to `forget`).
    pub fn fill(
        &mut self,
        now: Instant,
        st: &mut SessionState,
        batch: &mut Vec<SessionPacket>,
        max: usize,
        forget: &mut Vec<u64>,
    ) -> FillStats {
        let mut stats = FillStats::default();
        let window = usize::from(self.params.client_receive_max);
        if let Some(from) = self.resend_from {
            // Resent ones count against the window like new ones.
            let already = st.inflight.range(..from).count();
            let mut stopped = None;
            for (sent, (id, f)) in (already..).zip(st.inflight.range(from..)) {
                if sent >= window || batch.len() >= max {
                    stopped = Some(*id);
                    break;
                }
                batch.push(match f.stage {
                    Stage::Published => SessionPacket::Publish {
                        out: f.out.clone(),
                        packet_id: Some(*id),
                        dup: true,
                    },
                    Stage::Released => SessionPacket::PubRel(*id),
                });
            }
            self.resend_from = stopped;
            if stopped.is_some() {
                stats.more = batch.len() >= max;
                return stats;
            }
        }
        let v5 = self.v5();
        while batch.len() < max {
            let Some(front) = st.queue.front() else { break };
            if front.msg.is_expired(now) {
                if let Some(o) = st.queue.pop_front() {
                    stats.expired += 1;
                    forget.extend(o.seq);
                }
                continue;
            }
            if front.qos != QoS::AtMostOnce && st.inflight.len() >= window {
                break;
            }
            let Some(o) = st.queue.pop_front() else { break };
            if self.params.client_max_packet != u32::MAX {
                let size = PublishOut {
                    topic: &o.msg.topic,
                    packet_id: (o.qos != QoS::AtMostOnce).then_some(1),
                    qos: o.qos,
                    retain: o.retain,
                    dup: false,
                    properties: &o.msg.properties,
                    expiry: o.msg.remaining_expiry(now),
                    topic_alias: None,
                    sub_ids: &o.sub_ids,
                    payload: &o.msg.payload,
                }
                .len(v5);
                if size > self.params.client_max_packet as usize {
                    st.dropped += 1;
                    stats.too_large += 1;
                    forget.extend(o.seq);
                    continue;
                }
            }
            let packet_id = if o.qos != QoS::AtMostOnce {
                let Some(id) = st.allocate_packet_id() else {
                    st.queue.push_front(o);
                    break;
                };
                st.inflight.insert(
                    id,
                    InFlight {
                        out: o.clone(),
                        stage: Stage::Published,
                    },
                );
                Some(id)
            } else {
                None
            };
            batch.push(SessionPacket::Publish {
                out: o,
                packet_id,
                dup: false,
            });
        }
        stats.more = batch.len() >= max && !st.queue.is_empty();
        stats
    }

    /// Encode a batch from [`ConnState::fill`] (outside the session lock),
    /// giving new messages topic aliases when the client accepts them.
    pub fn encode(&mut self, now: Instant, batch: &[SessionPacket], wbuf: &mut BytesMut) {
        let v5 = self.v5();
        for item in batch {
            let (o, packet_id, dup) = match item {
                SessionPacket::Publish {
                    out,
                    packet_id,
                    dup,
                } => (out, *packet_id, *dup),
                SessionPacket::PubRel(id) => {
                    let p = Packet::PubRel(PubResponse::new(*id, 0));
                    if let Err(e) = encode(&p, self.params.protocol, wbuf) {
                        tracing::warn!(error = %e, "cannot encode PUBREL");
                    }
                    continue;
                }
            };
            let m = &o.msg;
            let mut topic: &str = &m.topic;
            let mut alias = None;
            if self.params.client_alias_max > 0 && !dup {
                let (a, send_topic) = self
                    .aliases
                    .get_or_insert_with(Default::default)
                    .outbound(&m.topic, self.params.client_alias_max);
                alias = a;
                if !send_topic {
                    topic = "";
                }
            }
            PublishOut {
                topic,
                packet_id,
                qos: o.qos,
                retain: o.retain,
                dup,
                properties: &m.properties,
                expiry: m.remaining_expiry(now),
                topic_alias: alias,
                sub_ids: &o.sub_ids,
                payload: &m.payload,
            }
            .encode(v5, wbuf);
        }
    }
}

fn delivered(seq: Option<u64>) -> Input {
    match seq {
        Some(s) => Input::Delivered(s),
        None => Input::Done,
    }
}

/// PUBACK for a QoS 1 message we sent: it is done. Returns the store
/// sequence to drop.
fn on_puback(session: &Session, id: u16) -> Option<u64> {
    let mut st = session.state.lock();
    if matches!(st.inflight.get(&id), Some(f) if f.out.qos == QoS::AtLeastOnce) {
        return st.inflight.remove(&id).and_then(|f| f.out.seq);
    }
    None
}

/// PUBCOMP ends the QoS 2 flow of a message we sent.
fn on_pubcomp(session: &Session, id: u16) {
    let mut st = session.state.lock();
    if matches!(st.inflight.get(&id), Some(f) if f.stage == Stage::Released) {
        st.inflight.remove(&id);
    }
}

/// A new connection takes the session: the connection that held it is
/// told to close with 0x8E (Session taken over). Returns the old link, to
/// wake it.
pub(crate) fn take_over(st: &mut SessionState) -> Option<ConnLink> {
    let old = st.conn.take()?;
    st.kicked = Some((old.conn_id, reason::SESSION_TAKEN_OVER));
    Some(old)
}

/// Why connection `conn_id` must close, if it must: it was kicked (by an
/// operator, with that reason) or its session now belongs to another
/// connection (0x8E).
pub(crate) fn kicked(st: &SessionState, conn_id: u64) -> Option<u8> {
    if let Some((id, r)) = st.kicked {
        if id == conn_id {
            return Some(r);
        }
    }
    let mine = st.conn.as_ref().is_some_and(|c| c.conn_id == conn_id);
    (!mine).then_some(reason::SESSION_TAKEN_OVER)
}
