//! The CoAP server core, sans-IO: the [`Endpoint`] plus what a server adds
//! on top of the message layer — rate limiting, block-wise reassembly and
//! slicing, Observe registrations — so that the application sees whole
//! requests ([`Request`]) and answers with whole responses ([`Response`]).
//!
//! Amplification (RFC 7252 §11.3, RFC 9175 §2.4): a response to a client
//! whose address is not verified carries at most
//! [`CoapConfig::amplification_factor`] times the request's size. A client
//! is verified once it has acknowledged or reset one of our Confirmable
//! messages, or repeated an Echo value we sent it — both need datagrams an
//! off-path spoofer never sees. When the answer to a GET or FETCH from an
//! unverified client would exceed the limit, the server answers 4.01
//! Unauthorized with an Echo option instead (the method is safe, so the
//! application is simply asked again when the client repeats the request
//! with the Echo value, as libcoap does on its own); the Echo value is an
//! HMAC of the client's address and a timestamp, so checking it needs no
//! table. Other methods (whose handler must not run twice) get their
//! answer block-wise (Block2) in the largest block under the limit, at
//! least 16 bytes. Verified clients get blocks of
//! [`CoapConfig::block_size`]. Notifications to unverified observers are
//! Confirmable and sized like the response to their registration (see
//! [`crate::observe`]).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use crate::block::{block2_slice, Block1Outcome, Downloads, Uploads};
use crate::config::{CoapConfig, ConfigError};
use crate::exchange::{Endpoint, Event, ExchangeError, ExchangeId, Failure};
use crate::message::{option, BlockValue, Code, Message, MessageType, Token};
use crate::observe::Observers;
use crate::rate_limit::RateLimiter;

/// A complete request for the application (after Block1 reassembly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The client's address.
    pub peer: SocketAddr,
    /// GET, POST, PUT, DELETE, FETCH, PATCH or iPATCH.
    pub method: Code,
    /// The Uri-Path segments.
    pub path: Vec<String>,
    /// The Uri-Query items.
    pub query: Vec<String>,
    /// The Content-Format of the payload.
    pub content_format: Option<u16>,
    /// The Accept option.
    pub accept: Option<u16>,
    /// The whole payload.
    pub payload: Bytes,
    /// A GET with Observe 0: the client wants to observe. Answer with
    /// [`Response::observe`] to register it.
    pub observe: bool,
    /// On CoAPS, the device the session's pre-shared key belongs to (set
    /// by the driver); `None` on plain CoAP.
    pub identity: Option<std::sync::Arc<str>>,
}

impl Request {
    /// The path joined with `/`.
    pub fn path_str(&self) -> String {
        self.path.join("/")
    }
}

/// The application's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The response code (2.xx, 4.xx, 5.xx).
    pub code: Code,
    /// The payload's Content-Format.
    pub content_format: Option<u16>,
    /// The payload (sent block-wise when large).
    pub payload: Bytes,
    /// Max-Age in seconds.
    pub max_age: Option<u32>,
    /// For an observe request: register the client under this key, so that
    /// notifications for the key reach it.
    pub observe: Option<String>,
}

impl Response {
    /// A response with no payload.
    pub fn new(code: Code) -> Response {
        Response {
            code,
            content_format: None,
            payload: Bytes::new(),
            max_age: None,
            observe: None,
        }
    }

    /// 2.05 Content with a payload.
    pub fn content(content_format: u16, payload: impl Into<Bytes>) -> Response {
        Response {
            content_format: Some(content_format),
            payload: payload.into(),
            ..Response::new(Code::CONTENT)
        }
    }

    /// Register the observer under `key` (ignored unless the request asked
    /// to observe and the code is 2.xx).
    pub fn with_observe(mut self, key: impl Into<String>) -> Response {
        self.observe = Some(key.into());
        self
    }
}

/// Why [`Server::respond`] failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RespondError {
    /// The request is unknown or was answered already.
    #[error("unknown or already answered request")]
    UnknownRequest,
    /// The message layer refused.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
}

/// What the server remembers about a request the application is answering.
#[derive(Debug)]
struct Pending {
    peer: SocketAddr,
    method: Code,
    token: Token,
    uri: String,
    observe: bool,
    block2: Option<BlockValue>,
    block1: Option<BlockValue>,
    size2: bool,
    request_len: usize,
}

/// Counters of conditions worth a metric.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServerStats {
    /// Requests refused by the rate limiter.
    pub rate_limited: u64,
    /// Observers removed because a notification failed.
    pub observers_lost: u64,
    /// Notifications not sent because the endpoint was full.
    pub notifications_dropped: u64,
}

/// The sans-IO server. See the module documentation.
#[derive(Debug)]
pub struct Server {
    config: CoapConfig,
    endpoint: Endpoint,
    uploads: Uploads,
    downloads: Downloads,
    observers: Observers,
    rate: RateLimiter,
    pending: HashMap<ExchangeId, Pending>,
    requests: VecDeque<(ExchangeId, Request)>,
    stats: ServerStats,
    echo_key: ring::hmac::Key,
    epoch: Instant,
}

/// How long an Echo value stays valid.
const ECHO_FRESHNESS: Duration = Duration::from_secs(120);

/// FETCH (RFC 8132): safe, like GET.
const FETCH: Code = Code::new(0, 5);

impl Server {
    /// A server with a validated configuration; `seed` seeds message ids
    /// and the key of Echo values (use [`Server::with_key`] to give that
    /// key its own 256 bits).
    pub fn new(config: CoapConfig, seed: u64, now: Instant) -> Result<Server, ConfigError> {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        Server::with_key(config, seed, key, now)
    }

    /// A server whose Echo values are keyed with `echo_key` (random bytes).
    pub fn with_key(
        config: CoapConfig,
        seed: u64,
        echo_key: [u8; 32],
        now: Instant,
    ) -> Result<Server, ConfigError> {
        config.validate()?;
        Ok(Server {
            endpoint: Endpoint::new(config.endpoint(), seed),
            uploads: Uploads::new(config.uploads()),
            downloads: Downloads::new(
                config.max_uploads,
                config.max_body.saturating_mul(4),
                config.upload_timeout,
            ),
            observers: Observers::new(config.observe()),
            rate: RateLimiter::new(
                now,
                config.rate_per_second,
                config.rate_burst,
                config.max_rate_entries,
            ),
            pending: HashMap::new(),
            requests: VecDeque::new(),
            stats: ServerStats::default(),
            echo_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &echo_key),
            epoch: now,
            config,
        })
    }

    /// An Echo value for `peer`: the time in seconds since the server
    /// started, and a MAC binding it to the address.
    fn echo_value(&self, now: Instant, peer: SocketAddr) -> [u8; 12] {
        let secs = now.saturating_duration_since(self.epoch).as_secs() as u32;
        let mut out = [0u8; 12];
        out[..4].copy_from_slice(&secs.to_be_bytes());
        out[4..].copy_from_slice(&self.echo_mac(secs, peer));
        out
    }

    fn echo_mac(&self, secs: u32, peer: SocketAddr) -> [u8; 8] {
        let mut ctx = ring::hmac::Context::with_key(&self.echo_key);
        ctx.update(&secs.to_be_bytes());
        match peer.ip() {
            IpAddr::V4(ip) => ctx.update(&ip.octets()),
            IpAddr::V6(ip) => ctx.update(&ip.octets()),
        }
        ctx.update(&peer.port().to_be_bytes());
        let tag = ctx.sign();
        let mut mac = [0u8; 8];
        mac.copy_from_slice(&tag.as_ref()[..8]);
        mac
    }

    /// Whether `value` is an Echo value we gave `peer` recently.
    fn echo_valid(&self, now: Instant, peer: SocketAddr, value: &[u8]) -> bool {
        let (Some(secs), Some(mac)) = (value.get(..4), value.get(4..)) else {
            return false;
        };
        let secs = u32::from_be_bytes([secs[0], secs[1], secs[2], secs[3]]);
        let age = now
            .saturating_duration_since(self.epoch)
            .saturating_sub(Duration::from_secs(u64::from(secs)));
        // Compared without an early exit, so timing does not leak a prefix.
        let expected = self.echo_mac(secs, peer);
        let diff = mac
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        age <= ECHO_FRESHNESS && mac.len() == expected.len() && diff == 0
    }

    /// The message layer (for inspection in tests and metrics).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The observer registry.
    pub fn observers(&self) -> &Observers {
        &self.observers
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// Requests waiting for the application's answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Feed one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, peer: SocketAddr, data: &[u8]) {
        self.endpoint.handle_datagram(now, peer, data);
        self.process_events(now, data.len());
    }

    /// Advance time.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
        self.uploads.expire(now);
        self.downloads.expire(now);
        self.process_events(now, 0);
    }

    /// When [`Server::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.endpoint.poll_transmit()
    }

    /// The next complete request for the application; answer it with
    /// [`Server::respond`].
    pub fn poll_request(&mut self) -> Option<(ExchangeId, Request)> {
        self.requests.pop_front()
    }

    fn process_events(&mut self, now: Instant, datagram_len: usize) {
        while let Some(ev) = self.endpoint.poll_event() {
            match ev {
                Event::Request { id, peer, message } => {
                    self.on_request(now, id, peer, message, datagram_len);
                }
                Event::Acknowledged { id, .. } => self.observers.acknowledged(id),
                Event::Failed { id, peer, reason } => {
                    if let Some((_, token)) = self.observers.failed(id) {
                        self.stats.observers_lost += 1;
                        tracing::debug!(%peer, ?token, ?reason, "CoAP observer removed");
                    } else if reason == Failure::Timeout {
                        tracing::debug!(%peer, "CoAP separate response not acknowledged");
                    }
                }
                // This endpoint sends no requests of its own.
                Event::Response { .. } => {}
            }
        }
        // Requests the endpoint forgot (the application never answered).
        if self.pending.len() > self.config.max_exchanges {
            let endpoint = &self.endpoint;
            self.pending.retain(|id, _| endpoint.is_open(*id));
        }
    }

    fn reply(&mut self, now: Instant, id: ExchangeId, code: Code, edit: impl FnOnce(&mut Message)) {
        let mut m = Message::new(MessageType::Acknowledgement, code, 0, Token::default());
        edit(&mut m);
        if let Err(e) = self.endpoint.respond(now, id, m) {
            tracing::debug!(error = %e, "CoAP reply not sent");
        }
    }

    fn on_request(
        &mut self,
        now: Instant,
        id: ExchangeId,
        peer: SocketAddr,
        msg: Message,
        request_len: usize,
    ) {
        let con = msg.mtype == MessageType::Confirmable;
        if let Some(echo) = msg.option(option::ECHO) {
            if self.echo_valid(now, peer, &echo.value) {
                self.endpoint.verify(now, peer);
            }
        }
        // FETCH, PATCH and iPATCH (RFC 8132) are 0.05..=0.07.
        if !(1..=7).contains(&msg.code.0) {
            self.reply(now, id, Code::METHOD_NOT_ALLOWED, |_| {});
            return;
        }
        let (Ok(path), Ok(query)) = (msg.uri_path(), msg.uri_query()) else {
            self.reply(now, id, Code::BAD_REQUEST, |m| {
                m.payload = Bytes::from_static(b"Uri-Path and Uri-Query must be UTF-8");
            });
            return;
        };
        let uri = if query.is_empty() {
            path.join("/")
        } else {
            format!("{}?{}", path.join("/"), query.join("&"))
        };
        // Option values were checked by the endpoint (bad critical options
        // never get here), so these parse.
        let block2 = msg.block2().and_then(Result::ok);
        let block1 = msg.block1().and_then(Result::ok);
        let size2 = msg.option(option::SIZE2).is_some();

        // The rate limit counts requests, not blocks: a later block of a
        // transfer in progress is part of the request that started it (and
        // the transfer tables are bounded on their own).
        let continuation = block1.is_some_and(|b| b.num > 0 && self.uploads.contains(peer, &uri))
            || block2.is_some_and(|b| b.num > 0 && self.downloads.get(now, peer, &uri).is_some());
        if !continuation && !self.rate.allow(now, peer.ip()) {
            self.stats.rate_limited += 1;
            if con {
                let max_age = self.rate.retry_after(peer.ip());
                self.reply(now, id, Code::SERVICE_UNAVAILABLE, |m| {
                    m.set_uint_option(option::MAX_AGE, max_age);
                });
            } else {
                self.endpoint.abandon(id);
            }
            return;
        }

        // A later block of a body we are serving block-wise.
        if let Some(b2) = block2.filter(|b| b.num > 0) {
            if let Some(dl) = self.downloads.get(now, peer, &uri).cloned() {
                let limit = self.payload_limit(peer, request_len);
                self.send_block(now, id, peer, &uri, &dl.body, Some(b2), limit, |m| {
                    m.code = dl.code;
                    if let Some(cf) = dl.content_format {
                        m.set_content_format(cf);
                    }
                    m.set_option(option::ETAG, Bytes::copy_from_slice(&dl.etag));
                    if size2 {
                        m.set_uint_option(option::SIZE2, dl.body.len() as u32);
                    }
                });
                return;
            }
        }

        let mut payload = msg.payload.clone();
        let mut block1_final = None;
        if let Some(b1) = block1 {
            let size1 = msg.uint_option(option::SIZE1);
            match self
                .uploads
                .receive(now, peer, &uri, b1, size1, &msg.payload)
            {
                Block1Outcome::Complete { body, block } => {
                    payload = body;
                    block1_final = Some(block);
                }
                Block1Outcome::Continue(v) => {
                    self.reply(now, id, Code::CONTINUE, |m| m.set_block(option::BLOCK1, v));
                    return;
                }
                Block1Outcome::TooLarge { max } => {
                    self.reply(now, id, Code::REQUEST_ENTITY_TOO_LARGE, |m| {
                        m.set_uint_option(option::SIZE1, u32::try_from(max).unwrap_or(u32::MAX));
                    });
                    return;
                }
                Block1Outcome::Busy => {
                    let max_age = self.config.overload_max_age;
                    self.reply(now, id, Code::SERVICE_UNAVAILABLE, |m| {
                        m.set_uint_option(option::MAX_AGE, max_age);
                    });
                    return;
                }
                other @ (Block1Outcome::Incomplete | Block1Outcome::BadBlock) => {
                    self.reply(now, id, other.code(), |_| {});
                    return;
                }
            }
        }

        let observe = match (msg.code, msg.observe()) {
            (Code::GET, Some(0)) => true,
            // Observe 1, or a plain GET with the token of an observation,
            // ends it (RFC 7641 §3.6, §4.1).
            (Code::GET, _) => {
                self.observers.deregister(peer, msg.token);
                false
            }
            _ => false,
        };
        self.pending.insert(
            id,
            Pending {
                peer,
                method: msg.code,
                token: msg.token,
                uri,
                observe,
                block2,
                block1: block1_final,
                size2,
                request_len,
            },
        );
        self.requests.push_back((
            id,
            Request {
                peer,
                method: msg.code,
                path,
                query,
                content_format: msg.content_format(),
                accept: msg
                    .uint_option(option::ACCEPT)
                    .and_then(|v| u16::try_from(v).ok()),
                payload,
                observe,
                identity: None,
            },
        ));
    }

    /// The largest payload one response to `peer` may carry.
    fn payload_limit(&self, peer: SocketAddr, request_len: usize) -> usize {
        let block = self.config.block_size;
        if self.config.amplification_factor == 0 || self.endpoint.is_verified(peer) {
            return block;
        }
        // Headers, token and options take about 32 bytes of the budget.
        let budget = (request_len * self.config.amplification_factor as usize).saturating_sub(32);
        budget.clamp(16, block)
    }

    /// Send the block of `body` the request asked for (block 0 when it did
    /// not), in blocks no larger than `limit`.
    #[allow(clippy::too_many_arguments)]
    fn send_block(
        &mut self,
        now: Instant,
        id: ExchangeId,
        peer: SocketAddr,
        uri: &str,
        body: &Bytes,
        requested: Option<BlockValue>,
        limit: usize,
        edit: impl FnOnce(&mut Message),
    ) {
        let max_szx = szx_at_most(limit);
        let Some((block, range)) = block2_slice(body.len(), requested, max_szx) else {
            self.reply(now, id, Code::BAD_OPTION, |m| {
                m.payload = Bytes::from_static(b"block beyond the end of the body");
            });
            return;
        };
        if !block.more {
            self.downloads.remove(&(peer, uri.to_owned()));
        }
        let slice = body.slice(range);
        self.reply(now, id, Code::CONTENT, |m| {
            edit(m);
            m.set_block(option::BLOCK2, block);
            m.payload = slice;
        });
    }

    /// Answer a request taken from [`Server::poll_request`].
    pub fn respond(
        &mut self,
        now: Instant,
        id: ExchangeId,
        response: Response,
    ) -> Result<(), RespondError> {
        let p = self
            .pending
            .remove(&id)
            .ok_or(RespondError::UnknownRequest)?;
        let limit = self.payload_limit(p.peer, p.request_len);
        let first_block = !matches!(p.block2, Some(b) if b.num > 0);
        if response.payload.len() > limit
            && limit < self.config.block_size
            && matches!(p.method, Code::GET | FETCH)
            && first_block
        {
            // Verify the address before sending a large answer to it.
            let mut m = Message::new(MessageType::Acknowledgement, Code::UNAUTHORIZED, 0, p.token);
            m.set_option(
                option::ECHO,
                Bytes::copy_from_slice(&self.echo_value(now, p.peer)),
            );
            self.endpoint.respond(now, id, m)?;
            return Ok(());
        }
        let mut m = Message::new(MessageType::Acknowledgement, response.code, 0, p.token);
        if let Some(cf) = response.content_format {
            m.set_content_format(cf);
        }
        if let Some(age) = response.max_age {
            m.set_uint_option(option::MAX_AGE, age);
        }
        if let Some(b1) = p.block1 {
            m.set_block(option::BLOCK1, b1);
        }
        if p.observe {
            match (&response.observe, response.code.is_success()) {
                (Some(key), true) => {
                    match self
                        .observers
                        .register(now, p.peer, p.token, key, &p.uri, p.request_len)
                    {
                        Ok(seq) => m.set_observe(seq),
                        Err(e) => {
                            tracing::debug!(peer = %p.peer, error = %e, "CoAP observe refused")
                        }
                    }
                }
                _ => {
                    self.observers.deregister(p.peer, p.token);
                }
            }
        }
        let body = response.payload;
        if body.len() > limit || p.block2.is_some() {
            let max_szx = szx_at_most(limit);
            let Some((block, range)) = block2_slice(body.len(), p.block2, max_szx) else {
                let bad = Message::new(MessageType::Acknowledgement, Code::BAD_OPTION, 0, p.token);
                return Ok(self.endpoint.respond(now, id, bad)?);
            };
            if block.more {
                let etag = self.downloads.insert(
                    now,
                    p.peer,
                    &p.uri,
                    response.code,
                    response.content_format,
                    body.clone(),
                );
                m.set_option(option::ETAG, Bytes::copy_from_slice(&etag));
            } else {
                self.downloads.remove(&(p.peer, p.uri.clone()));
            }
            if block.num == 0 || p.size2 {
                m.set_uint_option(option::SIZE2, body.len() as u32);
            }
            m.set_block(option::BLOCK2, block);
            m.payload = body.slice(range);
        } else {
            m.payload = body;
        }
        self.endpoint.respond(now, id, m)?;
        Ok(())
    }

    /// Send a new representation to every observer registered under `key`.
    /// Large payloads go out as their first block (RFC 7959 §3.4), sized
    /// like a response to the observer's registration request would be;
    /// the client fetches the rest with GET and Block2.
    pub fn notify(
        &mut self,
        now: Instant,
        key: &str,
        payload: Bytes,
        content_format: Option<u16>,
    ) -> usize {
        let endpoint = &self.endpoint;
        let notes = self
            .observers
            .notify(now, key, payload, content_format, |p| {
                endpoint.is_verified(p)
            });
        let mut sent = 0;
        for mut n in notes {
            let token = n.message.token;
            let body = std::mem::take(&mut n.message.payload);
            let limit = self.payload_limit(n.peer, n.request_len);
            if body.len() > limit {
                let etag = self.downloads.insert(
                    now,
                    n.peer,
                    &n.uri,
                    Code::CONTENT,
                    content_format,
                    body.clone(),
                );
                let szx = szx_at_most(limit);
                let block = BlockValue {
                    num: 0,
                    more: true,
                    szx,
                };
                n.message
                    .set_option(option::ETAG, Bytes::copy_from_slice(&etag));
                n.message.set_uint_option(option::SIZE2, body.len() as u32);
                n.message.set_block(option::BLOCK2, block);
                n.message.payload = body.slice(..block.size());
            } else {
                n.message.payload = body;
            }
            let con = n.message.mtype == MessageType::Confirmable;
            if let Some(old) = n.replaces {
                match self.endpoint.replace(old, n.message.clone()) {
                    Ok(true) => {
                        sent += 1;
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "CoAP notification not encoded");
                        continue;
                    }
                }
            }
            match self.endpoint.send(now, n.peer, n.message) {
                Ok(id) => {
                    self.observers.sent(n.peer, token, id, con);
                    sent += 1;
                }
                Err(e) => {
                    self.stats.notifications_dropped += 1;
                    tracing::debug!(peer = %n.peer, error = %e, "CoAP notification dropped");
                }
            }
        }
        sent
    }
}

/// The largest SZX whose block fits in `limit` bytes (at least 16).
fn szx_at_most(limit: usize) -> u8 {
    let mut szx = 6u8;
    while szx > 0 && (1usize << (szx + 4)) > limit {
        szx -= 1;
    }
    szx
}

#[cfg(test)]
mod tests;
