//! A small CoAP client over a tokio UDP socket: the crate's sans-IO
//! [`Endpoint`] driven for one server. The platform uses it for its load
//! generator and its tests; a device SDK could use it as it is.
//!
//! Requests are Confirmable by default (retransmitted by the endpoint);
//! [`Client::call`] waits for the response, [`Client::next_response`] for
//! the next response or notification of an exchange (Observe).

use crate::exchange::{Endpoint, EndpointConfig, Event, ExchangeId};
use crate::message::{option, BlockValue};
use crate::{Code, Message, MessageType, Token};
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::UdpSocket;

/// Why a request got no usable answer.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the endpoint refused the request: {0}")]
    Refused(String),
    #[error("the exchange failed: {0}")]
    Failed(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("block-wise transfer: {0}")]
    Block(String),
    #[error("DTLS: {0}")]
    Dtls(String),
}

/// A CoAP client for one server.
pub struct Client {
    socket: UdpSocket,
    endpoint: Endpoint,
    server: SocketAddr,
    events: VecDeque<Event>,
    /// How long [`Client::call`] waits.
    pub timeout: Duration,
    /// CoAPS: the DTLS session every message goes through.
    dtls: Option<ClientDtls>,
    /// What went over the socket (UDP payloads).
    pub wire: WireStats,
}

/// Datagrams and UDP payload bytes the client sent and received.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireStats {
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub datagrams_received: u64,
    pub bytes_received: u64,
}

struct ClientDtls {
    dtls: dimpl::Dtls,
    buf: Vec<u8>,
    connected: bool,
    closed: bool,
    timer: Option<Instant>,
}

/// The client's side of a PSK lookup: always its one key.
struct FixedKey(Vec<u8>);

impl dimpl::PskResolver for FixedKey {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

impl ClientDtls {
    /// Records to send and plaintext received, after any input.
    fn drain(&mut self, records: &mut Vec<Vec<u8>>, plain: &mut Vec<Vec<u8>>) {
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                dimpl::Output::Packet(p) => records.push(p.to_vec()),
                dimpl::Output::ApplicationData(d) => plain.push(d.to_vec()),
                dimpl::Output::Connected => self.connected = true,
                dimpl::Output::CloseNotify => self.closed = true,
                dimpl::Output::Timeout(t) => {
                    self.timer = Some(t);
                    return;
                }
                dimpl::Output::BufferTooSmall { needed } => {
                    if needed > 65_536 {
                        self.closed = true;
                        return;
                    }
                    self.buf.resize(needed, 0);
                }
                _ => {}
            }
        }
    }
}

impl Client {
    /// A client on an ephemeral port of the matching address family.
    pub async fn new(server: SocketAddr) -> Result<Client, ClientError> {
        let local: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await?;
        let seed = u64::from(socket.local_addr()?.port())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        Ok(Client {
            socket,
            endpoint: Endpoint::new(EndpointConfig::default(), seed),
            server,
            events: VecDeque::new(),
            timeout: Duration::from_secs(10),
            dtls: None,
            wire: WireStats::default(),
        })
    }

    /// A CoAPS client: DTLS 1.2 with the pre-shared key `key` under
    /// `identity`; returns once the handshake is done.
    pub async fn new_psk(
        server: SocketAddr,
        identity: &[u8],
        key: &[u8],
    ) -> Result<Client, ClientError> {
        let cfg = Self::psk_config(identity, key)?;
        Self::with_psk_config(server, cfg).await
    }

    /// The DTLS configuration of a PSK client, to share between many
    /// handshakes (building one validates the crypto provider, which is
    /// costly).
    pub fn psk_config(
        identity: &[u8],
        key: &[u8],
    ) -> Result<std::sync::Arc<dimpl::Config>, ClientError> {
        dimpl::Config::builder()
            .with_psk_client(
                identity.to_vec(),
                std::sync::Arc::new(FixedKey(key.to_vec())),
            )
            .build()
            .map(std::sync::Arc::new)
            .map_err(|e| ClientError::Dtls(e.to_string()))
    }

    /// A CoAPS client with a configuration from [`Client::psk_config`].
    pub async fn with_psk_config(
        server: SocketAddr,
        cfg: std::sync::Arc<dimpl::Config>,
    ) -> Result<Client, ClientError> {
        let mut c = Client::new(server).await?;
        let now = Instant::now();
        let mut dtls = dimpl::Dtls::new_12_psk(cfg, now);
        dtls.set_active(true);
        // The engine draws its random values and starts on its first timer.
        dtls.handle_timeout(now)
            .map_err(|e| ClientError::Dtls(e.to_string()))?;
        c.dtls = Some(ClientDtls {
            dtls,
            buf: vec![0; 2048],
            connected: false,
            closed: false,
            timer: None,
        });
        let deadline = tokio::time::Instant::now() + c.timeout;
        loop {
            c.flush().await?;
            match &c.dtls {
                Some(d) if d.connected => return Ok(c),
                Some(d) if d.closed => {
                    return Err(ClientError::Dtls("closed during the handshake".into()))
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Dtls("handshake timed out".into()));
            }
            c.step(deadline).await?;
        }
    }

    /// Whether the DTLS session is up (always true on plain CoAP until
    /// the server closes a CoAPS session).
    pub fn is_open(&self) -> bool {
        self.dtls.as_ref().is_none_or(|d| d.connected && !d.closed)
    }

    /// A request to `path` (`a/b/c`) with a fresh token, Confirmable.
    pub fn request(&mut self, code: Code, path: &str) -> Message {
        let token = self.endpoint.new_token();
        let mut m = Message::new(MessageType::Confirmable, code, 0, token);
        m.set_uri_path(path);
        m
    }

    /// Hand a request to the endpoint; its answers come from
    /// [`Client::next_response`].
    pub fn send(&mut self, m: Message) -> Result<ExchangeId, ClientError> {
        self.endpoint
            .send_request(Instant::now(), self.server, m)
            .map_err(|e| ClientError::Refused(e.to_string()))
    }

    /// Stop an observation (the next notification is answered with Reset).
    pub fn cancel(&mut self, token: Token) {
        self.endpoint.cancel_request(self.server, token);
    }

    /// Send and wait for the response.
    pub async fn call(&mut self, m: Message) -> Result<Message, ClientError> {
        let id = self.send(m)?;
        self.next_response(id, self.timeout).await
    }

    /// The next response or notification for `id`, within `wait`.
    pub async fn next_response(
        &mut self,
        id: ExchangeId,
        wait: Duration,
    ) -> Result<Message, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let found = self.events.iter().position(|e| match e {
                Event::Response { id: i, .. } | Event::Failed { id: i, .. } => *i == id,
                _ => false,
            });
            if let Some(pos) = found {
                return match self.events.remove(pos) {
                    Some(Event::Response { message, .. }) => Ok(message),
                    other => Err(ClientError::Failed(format!("{other:?}"))),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout(wait));
            }
            self.step(deadline).await?;
        }
    }

    /// Send what is queued, then wait for one datagram or timer (or `until`).
    async fn step(&mut self, until: tokio::time::Instant) -> Result<(), ClientError> {
        self.flush().await?;
        let mut wake = self
            .endpoint
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .map_or(until, |t| t.min(until));
        if let Some(t) = self.dtls.as_ref().and_then(|d| d.timer) {
            wake = wake.min(tokio::time::Instant::from_std(t));
        }
        let mut buf = [0u8; 2048];
        tokio::select! {
            r = self.socket.recv_from(&mut buf) => {
                let (n, peer) = r?;
                self.wire.datagrams_received += 1;
                self.wire.bytes_received += n as u64;
                self.receive(peer, &buf[..n]).await?;
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                self.endpoint.handle_timeout(now);
                if let Some(d) = &mut self.dtls {
                    if d.timer.is_some_and(|t| t <= now) {
                        d.timer = None;
                        d.dtls.handle_timeout(now).map_err(|e| ClientError::Dtls(e.to_string()))?;
                    }
                }
            }
        }
        self.flush().await?;
        self.events
            .extend(std::iter::from_fn(|| self.endpoint.poll_event()));
        Ok(())
    }

    async fn receive(&mut self, peer: SocketAddr, data: &[u8]) -> Result<(), ClientError> {
        let Some(d) = &mut self.dtls else {
            self.endpoint.handle_datagram(Instant::now(), peer, data);
            return Ok(());
        };
        if d.dtls.handle_packet(data).is_err() {
            // A stray or damaged record: DTLS drops it.
            return Ok(());
        }
        let (mut records, mut plain) = (Vec::new(), Vec::new());
        d.drain(&mut records, &mut plain);
        for r in records {
            self.send_datagram(&r).await?;
        }
        for p in plain {
            self.endpoint.handle_datagram(Instant::now(), peer, &p);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        let mut records = Vec::new();
        match &mut self.dtls {
            None => {
                while let Some((_, bytes)) = self.endpoint.poll_transmit() {
                    self.send_datagram(&bytes).await?;
                }
                return Ok(());
            }
            Some(d) => {
                let mut plain = Vec::new();
                d.drain(&mut records, &mut plain);
                while let Some((_, bytes)) = self.endpoint.poll_transmit() {
                    if d.connected && !d.closed {
                        d.dtls
                            .send_application_data(&bytes)
                            .map_err(|e| ClientError::Dtls(e.to_string()))?;
                        d.drain(&mut records, &mut plain);
                    }
                }
            }
        }
        for r in records {
            self.send_datagram(&r).await?;
        }
        Ok(())
    }

    async fn send_datagram(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.socket.send_to(bytes, self.server).await?;
        self.wire.datagrams_sent += 1;
        self.wire.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    /// GET `path` block by block (Block2 of `size` bytes, 16..=1024),
    /// answering an RFC 9175 Echo challenge when the server sends one;
    /// returns the whole body.
    pub async fn download_blockwise(
        &mut self,
        path: &str,
        size: usize,
        max_body: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let szx = BlockValue::szx_for_size(size)
            .ok_or_else(|| ClientError::Block(format!("block size {size} is not 16..=1024")))?;
        let mut body = Vec::new();
        let mut num = 0u32;
        let mut echo: Option<Vec<u8>> = None;
        loop {
            let block = BlockValue::new(num, false, szx)
                .ok_or_else(|| ClientError::Block(format!("block {num} cannot be numbered")))?;
            let mut m = self.request(Code::GET, path);
            m.set_block(option::BLOCK2, block);
            if let Some(e) = &echo {
                m.set_option(option::ECHO, Bytes::copy_from_slice(e));
            }
            let r = self.call(m).await?;
            if r.code == Code::UNAUTHORIZED && echo.is_none() {
                if let Some(e) = r.option(option::ECHO) {
                    echo = Some(e.value.to_vec());
                    continue;
                }
            }
            if r.code != Code::CONTENT {
                return Err(ClientError::Block(format!(
                    "block {num}: {} {}",
                    r.code,
                    String::from_utf8_lossy(&r.payload)
                )));
            }
            body.extend_from_slice(&r.payload);
            if body.len() > max_body {
                return Err(ClientError::Block(format!("more than {max_body} bytes")));
            }
            match r.block2() {
                Some(Ok(b)) if b.more => num = b.num + 1,
                _ => return Ok(body),
            }
        }
    }

    /// POST or PUT `body` in Block1 blocks of `size` bytes (16..=1024, a
    /// power of two); returns the final response.
    pub async fn upload_blockwise(
        &mut self,
        code: Code,
        path: &str,
        content_format: Option<u16>,
        body: &[u8],
        size: usize,
    ) -> Result<Message, ClientError> {
        let szx = BlockValue::szx_for_size(size)
            .ok_or_else(|| ClientError::Block(format!("block size {size} is not 16..=1024")))?;
        let chunks: Vec<&[u8]> = body.chunks(size).collect();
        let mut last = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let more = i + 1 < chunks.len();
            let num = u32::try_from(i).map_err(|_| ClientError::Block("too many blocks".into()))?;
            let block = BlockValue::new(num, more, szx)
                .ok_or_else(|| ClientError::Block(format!("block {i} cannot be numbered")))?;
            let mut m = self.request(code, path);
            if let Some(cf) = content_format {
                m.set_content_format(cf);
            }
            m.set_block(option::BLOCK1, block);
            m.payload = Bytes::copy_from_slice(chunk);
            let r = self.call(m).await?;
            if more && r.code != Code::CONTINUE {
                return Ok(r);
            }
            last = Some(r);
        }
        last.ok_or_else(|| ClientError::Block("empty body".into()))
    }
}
