//! A minimal MQTT client connection over TCP or TLS, built on the sans-IO
//! codec.
//!
//! [`Conn`] owns the socket plus one read and one write buffer. Packets are
//! *queued* (encoded into the write buffer) and written in one go by
//! [`Conn::flush`], and every read pulls as many bytes as the socket has so
//! that all complete packets can be decoded from one buffer. The simple
//! awaiting helpers ([`Conn::connect`], [`Conn::subscribe`],
//! [`Conn::publish`]) are for setup and ad-hoc use; the load generator drives
//! the non-blocking [`Conn::try_fill`] / [`Conn::try_flush`] pair itself to
//! pipeline thousands of messages (those two work on plain TCP only; a TLS
//! [`Conn`] supports the awaiting helpers).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use mqtt_codec::{
    ConnAck, Connect, ConnectProperties, Disconnect, DisconnectProperties, Packet, Protocol,
    PubResponse, Publish, QoS, Subscribe, SubscribeProperties, SubscriptionOptions,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf, Ready};
use tokio::net::TcpStream;

use crate::BenchError;

/// Largest packet accepted from the broker.
pub const MAX_INCOMING_PACKET: usize = 16 * 1024 * 1024;
/// How long setup steps (TCP connect + CONNACK, SUBACK) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub host: String,
    pub client_id: String,
    pub protocol: Protocol,
    pub keep_alive: u16,
    pub clean_start: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS on top of TCP, when set.
    pub tls: Option<TlsClient>,
    /// The local address to connect from (`None`: the kernel's choice).
    /// One source address reaches one broker port about 28,000 times (the
    /// ephemeral port range); more connections need more addresses
    /// (127.0.0.2, 127.0.0.3… on loopback).
    pub local_ip: Option<std::net::IpAddr>,
}

/// TLS settings of one client: a connector (server verification and, for
/// mutual TLS, the client certificate) and the name to verify.
#[derive(Clone)]
pub struct TlsClient {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
    /// A client certificate is presented.
    pub mutual: bool,
}

impl TlsClient {
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> Self {
        TlsClient {
            mutual: config.client_auth_cert_resolver.has_certs(),
            connector: tokio_rustls::TlsConnector::from(config),
            server_name,
        }
    }
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .field("mutual", &self.mutual)
            .finish()
    }
}

/// The transport of a [`Conn`].
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Tcp(s) => f.debug_tuple("Tcp").field(s).finish(),
            Stream::Tls(s) => f.debug_tuple("Tls").field(s.get_ref().0).finish(),
        }
    }
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// The socket for non-blocking raw I/O; an error for TLS streams.
    pub fn plain(&self) -> io::Result<&TcpStream> {
        match self {
            Stream::Tcp(s) => Ok(s),
            Stream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "non-blocking raw I/O is not available on a TLS connection",
            )),
        }
    }

    /// Readiness of the underlying socket.
    pub async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        self.tcp().ready(interest).await
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An established MQTT connection.
#[derive(Debug)]
pub struct Conn {
    pub stream: Stream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub protocol: Protocol,
    pub client_id: String,
    pub connack: ConnAck,
    next_packet_id: u16,
}

/// Connect to `host` from the local address `ip` (any port).
async fn connect_from(ip: std::net::IpAddr, host: &str) -> io::Result<TcpStream> {
    let addr = tokio::net::lookup_host(host)
        .await?
        .find(|a| a.is_ipv4() == ip.is_ipv4())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no address of {host}")))?;
    let socket = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

/// `true` for "too many open files" (per process or system wide).
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23) | Some(24))
}

impl Conn {
    /// Open a TCP connection (and TLS session, if configured), send CONNECT
    /// and wait for a successful CONNACK, within [`SETUP_TIMEOUT`].
    pub async fn connect(cfg: &ClientConfig) -> Result<Conn, BenchError> {
        Self::connect_within(cfg, SETUP_TIMEOUT).await
    }

    /// [`Conn::connect`] with its own time limit for the whole setup.
    pub async fn connect_within(cfg: &ClientConfig, limit: Duration) -> Result<Conn, BenchError> {
        match tokio::time::timeout(limit, Self::connect_inner(cfg)).await {
            Ok(r) => r,
            Err(_) => Err(BenchError::Timeout(format!(
                "{}: no CONNACK from {} within {:?}",
                cfg.client_id, cfg.host, limit
            ))),
        }
    }

    async fn connect_inner(cfg: &ClientConfig) -> Result<Conn, BenchError> {
        let stream = match cfg.local_ip {
            None => TcpStream::connect(&cfg.host).await,
            Some(ip) => connect_from(ip, &cfg.host).await,
        }
        .map_err(|e| {
            if is_fd_exhaustion(&e) {
                BenchError::TooManyOpenFiles { opened: 0 }
            } else {
                BenchError::Connect {
                    addr: cfg.host.clone(),
                    source: e,
                }
            }
        })?;
        stream.set_nodelay(true)?;
        let stream = match &cfg.tls {
            None => Stream::Tcp(stream),
            Some(tls) => Stream::Tls(Box::new(
                tls.connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| BenchError::Tls {
                        addr: cfg.host.clone(),
                        source: e,
                    })?,
            )),
        };
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: BytesMut::with_capacity(512),
            protocol: cfg.protocol,
            client_id: cfg.client_id.clone(),
            connack: ConnAck {
                session_present: false,
                reason_code: 0,
                properties: Default::default(),
            },
            next_packet_id: 0,
        };
        let connect = Connect {
            protocol: cfg.protocol,
            clean_start: cfg.clean_start,
            keep_alive: cfg.keep_alive,
            client_id: cfg.client_id.clone(),
            will: None,
            username: cfg.username.clone(),
            password: cfg.password.clone().map(Bytes::from),
            properties: ConnectProperties::default(),
        };
        conn.queue(&Packet::Connect(Box::new(connect)))?;
        conn.flush().await?;
        match conn.recv().await? {
            Packet::ConnAck(ack) if ack.reason_code == 0 => {
                conn.connack = *ack;
                Ok(conn)
            }
            Packet::ConnAck(ack) => Err(BenchError::Refused {
                reason_code: ack.reason_code,
            }),
            other => Err(BenchError::Protocol(format!(
                "{}: expected CONNACK, got {}",
                cfg.client_id,
                other.name()
            ))),
        }
    }

    /// The next non-zero packet identifier (wrapping).
    pub fn next_packet_id(&mut self) -> u16 {
        self.next_packet_id = self.next_packet_id.wrapping_add(1);
        if self.next_packet_id == 0 {
            self.next_packet_id = 1;
        }
        self.next_packet_id
    }

    /// Subscribe to one filter and wait for the SUBACK; returns the granted
    /// QoS. Publishes arriving before the SUBACK are discarded.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<u8, BenchError> {
        let packet_id = self.next_packet_id();
        let sub = Subscribe {
            packet_id,
            properties: SubscribeProperties::default(),
            filters: vec![(
                filter.to_string(),
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            )],
        };
        self.queue(&Packet::Subscribe(sub))?;
        self.flush().await?;
        let fut = async {
            loop {
                match self.recv().await? {
                    Packet::SubAck(ack) if ack.packet_id == packet_id => {
                        let code = ack.reason_codes.first().copied().ok_or_else(|| {
                            BenchError::Protocol("SUBACK without reason codes".into())
                        })?;
                        if code >= 0x80 {
                            return Err(BenchError::SubscribeRejected {
                                filter: filter.to_string(),
                                reason_code: code,
                            });
                        }
                        return Ok(code);
                    }
                    Packet::Publish(_) | Packet::PingResp => {}
                    other => {
                        return Err(BenchError::Protocol(format!(
                            "{}: expected SUBACK, got {}",
                            self.client_id,
                            other.name()
                        )))
                    }
                }
            }
        };
        match tokio::time::timeout(SETUP_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(BenchError::Timeout(format!(
                "{}: no SUBACK within {:?}",
                self.client_id, SETUP_TIMEOUT
            ))),
        }
    }

    /// Publish one message and wait for its flow to complete (PUBACK for
    /// QoS 1, PUBREC/PUBREL/PUBCOMP for QoS 2). Other packets that arrive
    /// meanwhile are dropped. Not used on the benchmark's hot path.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<(), BenchError> {
        let packet_id = (qos != QoS::AtMostOnce).then(|| self.next_packet_id());
        self.queue(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: topic.to_string(),
            packet_id,
            properties: Default::default(),
            payload,
        }))?;
        self.flush().await?;
        let Some(id) = packet_id else {
            return Ok(());
        };
        loop {
            match self.recv().await? {
                Packet::PubAck(r) if r.packet_id == id && qos == QoS::AtLeastOnce => return Ok(()),
                Packet::PubRec(r) if r.packet_id == id && qos == QoS::ExactlyOnce => {
                    if r.reason_code >= 0x80 {
                        return Ok(());
                    }
                    self.queue(&Packet::PubRel(PubResponse::new(id, 0)))?;
                    self.flush().await?;
                }
                Packet::PubComp(r) if r.packet_id == id => return Ok(()),
                Packet::Disconnect(d) => {
                    return Err(self.lost(format!(
                        "broker sent DISCONNECT (reason {:#04x}) during publish",
                        d.reason_code
                    )))
                }
                _ => {}
            }
        }
    }

    /// Send DISCONNECT (best effort) and close the write side.
    pub async fn disconnect(&mut self) {
        let d = Packet::Disconnect(Box::new(Disconnect {
            reason_code: 0,
            properties: DisconnectProperties::default(),
        }));
        if self.queue(&d).is_ok() {
            let _ = self.flush().await;
        }
        let _ = self.stream.shutdown().await;
    }

    /// Encode `packet` at the end of the write buffer.
    pub fn queue(&mut self, packet: &Packet) -> Result<(), BenchError> {
        mqtt_codec::encode(packet, self.protocol, &mut self.wbuf)
            .map_err(|e| BenchError::Protocol(format!("cannot encode {}: {e}", packet.name())))
    }

    /// Write the whole write buffer.
    pub async fn flush(&mut self) -> Result<(), BenchError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Decode the next complete packet from the read buffer, if any.
    pub fn try_decode(&mut self) -> Result<Option<Packet>, BenchError> {
        mqtt_codec::decode(&mut self.rbuf, self.protocol, MAX_INCOMING_PACKET).map_err(|e| {
            BenchError::Protocol(format!(
                "{}: undecodable packet from broker: {e}",
                self.client_id
            ))
        })
    }

    /// Wait for the next packet.
    pub async fn recv(&mut self) -> Result<Packet, BenchError> {
        loop {
            if let Some(p) = self.try_decode()? {
                return Ok(p);
            }
            self.rbuf.reserve(4096);
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err(self.lost("broker closed the connection".into()));
            }
        }
    }

    /// Read everything the socket has without blocking. Returns the number of
    /// bytes read (0 when nothing was available); end of stream is an error.
    pub fn try_fill(&mut self, chunk: usize) -> Result<usize, BenchError> {
        let mut total = 0;
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < chunk / 4 {
                self.rbuf.reserve(chunk);
            }
            match self
                .stream
                .plain()
                .and_then(|s| s.try_read_buf(&mut self.rbuf))
            {
                Ok(0) => return Err(self.lost("broker closed the connection".into())),
                Ok(n) => {
                    total += n;
                    // Keep draining only while the socket filled our space.
                    if self.rbuf.len() >= chunk * 4 {
                        return Ok(total);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost(format!("read failed: {e}"))),
            }
        }
    }

    /// Write as much of the write buffer as the socket accepts without
    /// blocking. Returns the number of bytes written.
    pub fn try_flush(&mut self) -> Result<usize, BenchError> {
        let mut total = 0;
        while !self.wbuf.is_empty() {
            match self.stream.plain().and_then(|s| s.try_write(&self.wbuf)) {
                Ok(0) => return Err(self.lost("write returned 0".into())),
                Ok(n) => {
                    self.wbuf.advance(n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost(format!("write failed: {e}"))),
            }
        }
        if self.wbuf.is_empty() {
            // Reset to the start of the allocation so it is reused.
            self.wbuf.clear();
        }
        Ok(total)
    }

    /// A [`BenchError::ConnectionLost`] naming this client.
    pub fn lost(&self, context: String) -> BenchError {
        BenchError::ConnectionLost {
            client: self.client_id.clone(),
            context,
        }
    }
}
