//! Shared helpers: a real server on ephemeral ports, a raw MQTT client built
//! on `mqtt-codec` (for exact control of the bytes), rumqttc wrappers that
//! turn the event loop into a stream of events, and a tiny HTTP client.

#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use m2mhub::server::Server;
use m2mhub::settings::Settings;
use mqtt_codec::{
    decode, encode, AckProperties, ConnAck, Connect, ConnectProperties, Disconnect, LastWill,
    Packet, Protocol, PubResponse, Publish, QoS, SubAck, Subscribe, SubscribeProperties,
    SubscriptionOptions,
};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Longest wait for anything that is expected to happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Await `f` for at most `WAIT`, naming `what` if it does not finish.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    within_for(WAIT, what, f).await
}

pub async fn within_for<T>(d: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?} waiting for {what}"),
    }
}

/// Poll `cond` every 20 ms until it holds (at most `WAIT`).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// The server

/// A real m2mhub (MQTT, HTTP, optionally TLS) on ephemeral loopback ports
/// with its own temporary data directory.
pub struct TestServer {
    pub server: Option<Server>,
    pub settings: Settings,
    pub dir: tempfile::TempDir,
}

/// Test defaults: loopback, port 0, anonymous access, no `$SYS` noise.
/// The secure default (no anonymous access) without the loopback throttles
/// that would otherwise trip over a test's many connects from 127.0.0.1:
/// no connect rate, no flapping ban, no ban after failed authentications.
pub fn secure(s: &mut Settings) {
    s.mqtt.allow_anonymous = false;
    s.mqtt.auth_failures_before_ban = 0;
    s.mqtt.max_connect_rate_per_ip = 0;
    s.mqtt.max_connects_per_client_id = 0;
}

pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.join("data"),
        ..Default::default()
    };
    s.mqtt.listen = "127.0.0.1:0".into();
    s.mqtt.tls_listen = "127.0.0.1:0".into();
    s.http.tls_listen = "127.0.0.1:0".into();
    s.coap.dtls_listen = "127.0.0.1:0".into();
    s.http.listen = "127.0.0.1:0".into();
    s.mqtt.allow_anonymous = true;
    s.mqtt.sys_interval_secs = 0;
    s
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with(|_| {}).await
    }

    /// Start with test defaults adjusted by `f`.
    pub async fn with(f: impl FnOnce(&mut Settings)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = test_settings(dir.path());
        f(&mut settings);
        let v = settings.validate().expect("valid settings");
        let server = within("server start", Server::start(&v))
            .await
            .expect("server starts");
        TestServer {
            server: Some(server),
            settings,
            dir,
        }
    }

    pub fn get(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    pub fn mqtt(&self) -> SocketAddr {
        self.get().mqtt_addr
    }

    pub fn http(&self) -> SocketAddr {
        self.get().http_addr
    }

    /// An admin API token, made directly in the registry.
    pub fn admin_token(&self) -> String {
        self.get()
            .registry
            .create_api_token("admin", m2mhub_identity::Role::Admin, None, "tests")
            .expect("admin token")
            .1
    }

    /// Value of a broker counter (name as in `Metrics`, e.g. `messages_received`).
    pub fn counter(&self, name: &str) -> u64 {
        self.get()
            .broker
            .metrics()
            .counters()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, v)| v)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Graceful stop (like SIGTERM).
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            within_for(Duration::from_secs(15), "server shutdown", s.shutdown()).await;
        }
    }

    /// Stop, then start again on the same data directory (new ports).
    pub async fn restart(&mut self) {
        self.stop().await;
        let v = self.settings.validate().expect("valid settings");
        self.server = Some(
            within("server restart", Server::start(&v))
                .await
                .expect("server restarts"),
        );
    }
}

/// A bare broker (TCP listener only, in-memory, no HTTP) on an ephemeral
/// loopback port, configured through `BrokerConfig` directly: for broker
/// settings the configuration file does not expose, and for the platform
/// hooks (`Broker::kick`, `subscribe_internal`, bans…) on `broker`.
pub struct BrokerServer {
    pub broker: m2mhub_broker::Broker,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BrokerServer {
    /// Test defaults (anonymous access, no `$SYS`) adjusted by `f`; the
    /// password file in the config, if any, is loaded.
    pub async fn start(f: impl FnOnce(&mut m2mhub_broker::BrokerConfig)) -> BrokerServer {
        Self::start_with(f, std::sync::Arc::new(m2mhub_broker::auth::AllowAll)).await
    }

    /// Like [`BrokerServer::start`] with a custom authorizer.
    pub async fn start_with(
        f: impl FnOnce(&mut m2mhub_broker::BrokerConfig),
        authorizer: std::sync::Arc<dyn m2mhub_broker::auth::Authorizer>,
    ) -> BrokerServer {
        use m2mhub_broker::auth::StaticAuth;
        let mut cfg = m2mhub_broker::BrokerConfig {
            allow_anonymous: true,
            sys_interval: Duration::ZERO,
            ..Default::default()
        };
        f(&mut cfg);
        let mut authn = StaticAuth::new(cfg.allow_anonymous);
        if let Some(p) = &cfg.password_file {
            authn = authn.with_password_file(p).expect("password file");
        }
        let broker = m2mhub_broker::Broker::open(m2mhub_broker::BrokerParts {
            config: cfg,
            data_dir: None,
            fsync: false,
            authenticator: std::sync::Arc::new(authn),
            authorizer,
        })
        .expect("broker opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let b = broker.clone();
        let task = tokio::spawn(async move { b.run_tcp(listener).await });
        BrokerServer { broker, addr, task }
    }

    /// Value of a broker counter (name as in `Metrics`).
    pub fn counter(&self, name: &str) -> u64 {
        self.broker
            .metrics()
            .counters()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, v)| v)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }
}

impl Drop for BrokerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Raw MQTT client over any byte stream

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the next read produced.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Next {
    Packet(Packet),
    /// End of stream or connection reset.
    Closed,
    Timeout,
}

/// A hand-driven MQTT client: every packet is explicit, nothing is acked
/// behind the test's back.
pub struct Raw {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    /// Packets read while waiting for something else (e.g. a PUBLISH that
    /// arrived before a PUBACK); returned first by `next`.
    pending: std::collections::VecDeque<Packet>,
    pub protocol: Protocol,
}

impl Raw {
    pub async fn tcp(addr: SocketAddr, protocol: Protocol) -> Raw {
        let s = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        s.set_nodelay(true).expect("nodelay");
        Raw::over(Box::new(s), protocol)
    }

    pub fn over(io: Box<dyn Io>, protocol: Protocol) -> Raw {
        Raw {
            io,
            rbuf: BytesMut::new(),
            pending: Default::default(),
            protocol,
        }
    }

    /// Open a TCP connection, send `c`, and return the CONNACK.
    pub async fn connect(addr: SocketAddr, c: Connect) -> (Raw, ConnAck) {
        let mut raw = Raw::tcp(addr, c.protocol).await;
        let ack = raw.handshake(c).await;
        (raw, ack)
    }

    /// Connect and insist on success.
    pub async fn connect_ok(addr: SocketAddr, c: Connect) -> (Raw, ConnAck) {
        let (raw, ack) = Raw::connect(addr, c).await;
        assert_eq!(ack.reason_code, 0, "CONNACK refused: {ack:?}");
        (raw, ack)
    }

    pub async fn handshake(&mut self, c: Connect) -> ConnAck {
        self.protocol = c.protocol;
        self.send(&Packet::Connect(Box::new(c))).await;
        match self.recv().await {
            Packet::ConnAck(a) => *a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut buf = BytesMut::new();
        encode(p, self.protocol, &mut buf).expect("encode");
        self.send_raw(&buf).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        within("write", self.io.write_all(bytes))
            .await
            .expect("write to broker");
        self.io.flush().await.expect("flush");
    }

    /// Send without failing if the broker already closed the socket.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(WAIT, self.io.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    pub async fn next(&mut self, wait: Duration) -> Next {
        if let Some(p) = self.pending.pop_front() {
            return Next::Packet(p);
        }
        self.read_packet(wait).await
    }

    async fn read_packet(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match decode(&mut self.rbuf, self.protocol, usize::MAX) {
                Ok(Some(p)) => return Next::Packet(p),
                Ok(None) => {}
                Err(e) => panic!("broker sent an undecodable packet: {e}"),
            }
            self.rbuf.reserve(64 * 1024);
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf)).await {
                Err(_) => return Next::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Next::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet (within `WAIT`); panics on close or timeout.
    pub async fn recv(&mut self) -> Packet {
        match self.next(WAIT).await {
            Next::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Wait for the first packet `f` accepts; others are kept for `next`.
    pub async fn recv_where<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&Packet) -> Option<T>,
    ) -> T {
        if let Some(i) = self.pending.iter().position(|p| f(p).is_some()) {
            let p = self.pending.remove(i).expect("index");
            return f(&p).expect("matched");
        }
        loop {
            match self.read_packet(WAIT).await {
                Next::Packet(p) => match f(&p) {
                    Some(v) => return v,
                    None => self.pending.push_back(p),
                },
                other => panic!("waiting for {what}: got {other:?}"),
            }
        }
    }

    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Assert that nothing arrives within `wait` (and the socket stays open).
    pub async fn expect_nothing(&mut self, wait: Duration) {
        match self.next(wait).await {
            Next::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Read until the broker closes the connection (within `wait`); returns
    /// the packets that arrived first.
    pub async fn expect_close(&mut self, wait: Duration) -> Vec<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Packet(p) => seen.push(p),
                Next::Closed => return seen,
                Next::Timeout => panic!("connection still open after {wait:?}; saw {seen:?}"),
            }
        }
    }

    /// Expect a v5 DISCONNECT with `code`, then the close.
    pub async fn expect_disconnect(&mut self, code: u8) {
        let seen = self.expect_close(WAIT).await;
        match seen.last() {
            Some(Packet::Disconnect(d)) => assert_eq!(
                d.reason_code, code,
                "DISCONNECT reason 0x{:02x}, expected 0x{code:02x}: {d:?}",
                d.reason_code
            ),
            _ => panic!("expected DISCONNECT 0x{code:02x} before close, saw {seen:?}"),
        }
    }

    /// PINGREQ → PINGRESP: everything sent before it has been handled.
    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        self.recv_where("PINGRESP", |p| matches!(p, Packet::PingResp).then_some(()))
            .await
    }

    pub async fn subscribe(&mut self, pid: u16, filter: &str, qos: QoS) -> SubAck {
        self.subscribe_with(
            pid,
            filter,
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
            None,
        )
        .await
    }

    pub async fn subscribe_with(
        &mut self,
        pid: u16,
        filter: &str,
        opts: SubscriptionOptions,
        sub_id: Option<u32>,
    ) -> SubAck {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: pid,
            properties: SubscribeProperties {
                subscription_identifier: sub_id,
                user_properties: Vec::new(),
            },
            filters: vec![(filter.to_string(), opts)],
        }))
        .await;
        self.recv_where("SUBACK", |p| match p {
            Packet::SubAck(a) if a.packet_id == pid => Some(a.clone()),
            _ => None,
        })
        .await
    }

    /// Publish and wait for the acknowledgement flow to finish (QoS 1: PUBACK;
    /// QoS 2: PUBREC, PUBREL, PUBCOMP; QoS 0: a ping round trip).
    pub async fn publish(&mut self, p: Publish) -> u8 {
        let qos = p.qos;
        let pid = p.packet_id;
        self.send(&Packet::Publish(p)).await;
        match qos {
            QoS::AtMostOnce => {
                self.ping().await;
                0
            }
            QoS::AtLeastOnce => {
                self.recv_where("PUBACK", |p| match p {
                    Packet::PubAck(a) if Some(a.packet_id) == pid => Some(a.reason_code),
                    _ => None,
                })
                .await
            }
            QoS::ExactlyOnce => {
                let code = self
                    .recv_where("PUBREC", |p| match p {
                        Packet::PubRec(a) if Some(a.packet_id) == pid => Some(a.reason_code),
                        _ => None,
                    })
                    .await;
                let id = pid.expect("packet id");
                self.send(&Packet::PubRel(PubResponse::new(id, 0))).await;
                self.recv_where("PUBCOMP", |p| match p {
                    Packet::PubComp(a) if a.packet_id == id => Some(()),
                    _ => None,
                })
                .await;
                code
            }
        }
    }

    pub async fn puback(&mut self, pid: u16) {
        self.send(&Packet::PubAck(PubResponse::new(pid, 0))).await;
    }

    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Box::default())).await;
        let _ = self.expect_close(WAIT).await;
    }

    /// Shut down the write side (TCP FIN) and drop: an abrupt end from the
    /// broker's point of view (no DISCONNECT).
    pub async fn drop_abruptly(mut self) {
        let _ = self.io.shutdown().await;
        drop(self);
    }
}

// Packet builders

pub fn connect(protocol: Protocol, client_id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.to_string(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

pub fn v5(client_id: &str) -> Connect {
    connect(Protocol::V5, client_id)
}

pub fn v3(client_id: &str) -> Connect {
    connect(Protocol::V311, client_id)
}

/// A v5 CONNECT that resumes/keeps a session for `expiry` seconds.
pub fn v5_persistent(client_id: &str, clean_start: bool, expiry: u32) -> Connect {
    let mut c = v5(client_id);
    c.clean_start = clean_start;
    c.properties.session_expiry_interval = Some(expiry);
    c
}

/// A v3.1.1 CONNECT with clean session false.
pub fn v3_persistent(client_id: &str) -> Connect {
    let mut c = v3(client_id);
    c.clean_start = false;
    c
}

pub fn will(topic: &str, payload: &str) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    }
}

pub fn publish(topic: &str, qos: QoS, pid: u16, payload: impl AsRef<[u8]>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_string(),
        packet_id: (qos != QoS::AtMostOnce).then_some(pid),
        properties: Default::default(),
        payload: Bytes::copy_from_slice(payload.as_ref()),
    }
}

pub fn retained(topic: &str, qos: QoS, pid: u16, payload: impl AsRef<[u8]>) -> Publish {
    Publish {
        retain: true,
        ..publish(topic, qos, pid, payload)
    }
}

pub fn disconnect_with(code: u8) -> Packet {
    Packet::Disconnect(Box::new(Disconnect {
        reason_code: code,
        properties: Default::default(),
    }))
}

pub fn ack_props() -> AckProperties {
    AckProperties::default()
}

pub fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// Encode one packet to bytes.
pub fn bytes_of(p: &Packet, protocol: Protocol) -> BytesMut {
    let mut b = BytesMut::new();
    encode(p, protocol, &mut b).expect("encode");
    b
}

// ---------------------------------------------------------------------------
// rumqttc wrappers: the event loop runs on its own task and reports events.

/// A rumqttc MQTT 3.1.1 client.
pub struct V3 {
    pub client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::Event, String>>,
    task: JoinHandle<()>,
}

impl V3 {
    pub fn options(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connect and wait for the CONNACK.
    pub async fn connect(opts: rumqttc::MqttOptions) -> (V3, rumqttc::ConnAck) {
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 1000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(e) => {
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut c = V3 {
            client,
            events,
            task,
        };
        let ack = c
            .wait("CONNACK", |p| match p {
                rumqttc::Packet::ConnAck(a) => Some(a.clone()),
                _ => None,
            })
            .await;
        assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success, "{ack:?}");
        (c, ack)
    }

    /// Next incoming packet (within `WAIT`), or the connection error.
    pub async fn next_incoming(
        &mut self,
        wait: Duration,
    ) -> Option<Result<rumqttc::Packet, String>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return None,
                Ok(None) => return Some(Err("event loop ended".into())),
                Ok(Some(Err(e))) => return Some(Err(e)),
                Ok(Some(Ok(rumqttc::Event::Incoming(p)))) => return Some(Ok(p)),
                Ok(Some(Ok(rumqttc::Event::Outgoing(_)))) => {}
            }
        }
    }

    /// Wait for the first incoming packet for which `f` returns Some.
    pub async fn wait<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&rumqttc::Packet) -> Option<T>,
    ) -> T {
        within(what, async {
            loop {
                match self.next_incoming(WAIT).await {
                    Some(Ok(p)) => {
                        if let Some(v) = f(&p) {
                            return v;
                        }
                    }
                    Some(Err(e)) => panic!("connection failed waiting for {what}: {e}"),
                    None => {}
                }
            }
        })
        .await
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        self.wait("SUBACK", |p| match p {
            rumqttc::Packet::SubAck(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    }

    pub async fn recv_publish(&mut self) -> rumqttc::Publish {
        self.wait("PUBLISH", |p| match p {
            rumqttc::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// Assert that no PUBLISH arrives within `wait`.
    pub async fn expect_no_publish(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_incoming(left).await {
                None => return,
                Some(Ok(rumqttc::Packet::Publish(p))) => panic!("unexpected PUBLISH {p:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("connection failed: {e}"),
            }
        }
    }

    /// Wait until the event loop reports the connection as failed/closed.
    pub async fn wait_error(&mut self) -> String {
        within("connection end", async {
            loop {
                if let Some(Err(e)) = self.next_incoming(WAIT).await {
                    return e;
                }
            }
        })
        .await
    }

    /// Normal DISCONNECT, then wait for the event loop to end.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("disconnect");
        let _ = self.wait_error().await;
        self.task.abort();
    }

    /// Drop the connection without DISCONNECT (the socket closes).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A rumqttc MQTT 5 client.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
    task: JoinHandle<()>,
}

pub type V5Packet = rumqttc::v5::mqttbytes::v5::Packet;

impl V5 {
    pub fn options(addr: SocketAddr, id: &str) -> rumqttc::v5::MqttOptions {
        let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    pub async fn connect(
        opts: rumqttc::v5::MqttOptions,
    ) -> (V5, rumqttc::v5::mqttbytes::v5::ConnAck) {
        let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 1000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(e) => {
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:?}")));
                        return;
                    }
                }
            }
        });
        let mut c = V5 {
            client,
            events,
            task,
        };
        let ack = c
            .wait("CONNACK", |p| match p {
                V5Packet::ConnAck(a) => Some(a.clone()),
                _ => None,
            })
            .await;
        assert_eq!(
            ack.code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success,
            "{ack:?}"
        );
        (c, ack)
    }

    pub async fn next_incoming(&mut self, wait: Duration) -> Option<Result<V5Packet, String>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return None,
                Ok(None) => return Some(Err("event loop ended".into())),
                Ok(Some(Err(e))) => return Some(Err(e)),
                Ok(Some(Ok(rumqttc::v5::Event::Incoming(p)))) => return Some(Ok(p)),
                Ok(Some(Ok(rumqttc::v5::Event::Outgoing(_)))) => {}
            }
        }
    }

    pub async fn wait<T>(&mut self, what: &str, mut f: impl FnMut(&V5Packet) -> Option<T>) -> T {
        within(what, async {
            loop {
                match self.next_incoming(WAIT).await {
                    Some(Ok(p)) => {
                        if let Some(v) = f(&p) {
                            return v;
                        }
                    }
                    Some(Err(e)) => panic!("connection failed waiting for {what}: {e}"),
                    None => {}
                }
            }
        })
        .await
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::v5::mqttbytes::QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        self.wait("SUBACK", |p| match p {
            V5Packet::SubAck(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    }

    pub async fn recv_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        self.wait("PUBLISH", |p| match p {
            V5Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    pub async fn expect_no_publish(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_incoming(left).await {
                None => return,
                Some(Ok(V5Packet::Publish(p))) => panic!("unexpected PUBLISH {p:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("connection failed: {e}"),
            }
        }
    }

    /// Wait for the connection to end; returns the error text (a server
    /// DISCONNECT shows up as `ServerDisconnect { reason_code, .. }`).
    pub async fn wait_error(&mut self) -> String {
        within("connection end", async {
            loop {
                if let Some(Err(e)) = self.next_incoming(WAIT).await {
                    return e;
                }
            }
        })
        .await
    }

    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("disconnect");
        let _ = self.wait_error().await;
        self.task.abort();
    }

    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 over a raw socket

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// `/api/v1{path}` with `token`: must succeed (2xx); the JSON body, or
/// Null when empty.
pub async fn api(
    srv: &TestServer,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let r = http_request(
        srv.http(),
        method,
        &format!("/api/v1{path}"),
        Some(token),
        body.as_ref(),
    )
    .await;
    assert!(
        (200..300).contains(&r.status),
        "{method} {path}: {} {}",
        r.status,
        r.body
    );
    if r.body.is_empty() {
        serde_json::Value::Null
    } else {
        r.json()
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, None, None).await
}

/// GET with `Authorization: Bearer <token>`.
pub async fn http_get_as(addr: SocketAddr, path: &str, token: &str) -> HttpResponse {
    http_request(addr, "GET", path, Some(token), None).await
}

/// Any request, optionally authenticated and with a JSON body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> HttpResponse {
    within(&format!("{method} {path}"), async {
        let mut s = TcpStream::connect(addr).await.expect("connect HTTP");
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if body.is_some() {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                payload.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&payload);
        s.write_all(req.as_bytes()).await.expect("write request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read response");
        parse_http(&raw)
    })
    .await
}

pub fn parse_http(raw: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n..];
        s = s.strip_prefix("\r\n").unwrap_or(s);
    }
    out
}

/// A metric's value from Prometheus text.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("metric {name} not in /metrics output"))
}

pub async fn scrape(addr: SocketAddr, name: &str) -> u64 {
    let r = http_get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    metric(&r.body, name)
}

// ---------------------------------------------------------------------------
// The real binary

/// `m2mhub serve` running as a child process; killed (SIGKILL) on drop.
pub struct BinServer {
    pub child: std::process::Child,
    pub mqtt: SocketAddr,
    pub mqtts: SocketAddr,
    pub http: SocketAddr,
    pub log: std::path::PathBuf,
    _stdout: Option<std::io::BufReader<std::process::ChildStdout>>,
}

impl BinServer {
    /// Start `m2mhub serve` on loopback port 0 with `data_dir`, anonymous
    /// access allowed, and wait for its `m2mhub ready` line.
    pub async fn start(data_dir: &std::path::Path, log: &std::path::Path) -> BinServer {
        Self::start_with(data_dir, log, &[], &[]).await
    }

    /// [`BinServer::start`] with more arguments and environment variables.
    pub async fn start_with(
        data_dir: &std::path::Path,
        log: &std::path::Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> BinServer {
        use std::io::BufRead;
        let log_file = std::fs::File::create(log).expect("log file");
        let mut child = m2mhub_command()
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--mqtts-listen",
                "127.0.0.1:0",
                "--https-listen",
                "127.0.0.1:0",
                "--coaps-listen",
                "127.0.0.1:0",
                "--allow-anonymous",
            ])
            .args(args)
            .envs(envs.iter().copied())
            .env_remove("M2MHUB_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn m2mhub");
        let stdout = child.stdout.take().expect("stdout");
        let read = tokio::task::spawn_blocking(move || {
            // The first start prints the administrator's credentials first.
            let mut r = std::io::BufReader::new(stdout);
            loop {
                let mut line = String::new();
                let n = r.read_line(&mut line).unwrap_or(0);
                if n == 0 || line.starts_with("m2mhub ready") {
                    return (r, line, n);
                }
            }
        });
        let (reader, line, n) = match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(v)) => v,
            _ => {
                let _ = child.kill();
                panic!(
                    "no ready line from m2mhub; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        };
        if n == 0 {
            let _ = child.kill();
            panic!(
                "m2mhub exited before it was ready; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let field = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in ready line {line:?}"))
        };
        assert!(line.starts_with("m2mhub ready "), "{line:?}");
        BinServer {
            mqtt: field("mqtt="),
            mqtts: field("mqtts="),
            http: field("http="),
            child,
            log: log.to_path_buf(),
            _stdout: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (at most `d`) for the process to exit.
    pub async fn wait_exit(&mut self, d: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "m2mhub still running after {d:?}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub async fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.wait_exit(WAIT).await;
    }

    pub fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill {sig} failed");
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run the binary to completion (at most 10 s): (exit code, stdout, stderr).
pub async fn run_bin(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = m2mhub_command();
    cmd.args(args)
        .env_remove("M2MHUB_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn m2mhub");
    let pid = child.id();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(Duration::from_secs(10), out).await {
        Ok(Ok(Ok(o))) => (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        _ => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("m2mhub {args:?} did not finish within 10 s");
        }
    }
}

// ---------------------------------------------------------------------------
// The real binary with the secure defaults (identity tests)

impl BinServer {
    /// Start `m2mhub serve` on loopback port 0 with `data_dir` and the
    /// secure defaults (no anonymous access), wait for its `m2mhub ready`
    /// line, and return it with the stdout lines printed before that line
    /// (on a first start: the administrator's credentials).
    pub async fn start_secure(
        data_dir: &std::path::Path,
        log: &std::path::Path,
    ) -> (BinServer, Vec<String>) {
        use std::io::BufRead;
        let log_file = std::fs::File::create(log).expect("log file");
        let mut child = m2mhub_command()
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--mqtts-listen",
                "127.0.0.1:0",
                "--https-listen",
                "127.0.0.1:0",
                "--coaps-listen",
                "127.0.0.1:0",
            ])
            .env_remove("M2MHUB_CONFIG")
            .env_remove("M2MHUB_MASTER_KEY")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn m2mhub");
        let stdout = child.stdout.take().expect("stdout");
        let read = tokio::task::spawn_blocking(move || {
            let mut r = std::io::BufReader::new(stdout);
            let mut before = Vec::new();
            loop {
                let mut line = String::new();
                let n = r.read_line(&mut line).unwrap_or(0);
                if n == 0 || line.starts_with("m2mhub ready") {
                    return (r, line, n, before);
                }
                before.push(line.trim_end().to_string());
            }
        });
        let (reader, line, n, before) =
            match tokio::time::timeout(Duration::from_secs(10), read).await {
                Ok(Ok(v)) => v,
                _ => {
                    let _ = child.kill();
                    panic!(
                        "no ready line from m2mhub; log:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            };
        if n == 0 {
            let _ = child.kill();
            panic!(
                "m2mhub exited before it was ready; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let field = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in ready line {line:?}"))
        };
        let server = BinServer {
            mqtt: field("mqtt="),
            mqtts: field("mqtts="),
            http: field("http="),
            child,
            log: log.to_path_buf(),
            _stdout: Some(reader),
        };
        (server, before)
    }
}

// ---------------------------------------------------------------------------
// The JSON API as one caller

/// `/api/v1` as one caller.
pub struct Api {
    pub addr: SocketAddr,
    pub token: String,
}

impl Api {
    pub fn admin(srv: &TestServer) -> Api {
        Api {
            addr: srv.http(),
            token: srv.admin_token(),
        }
    }

    /// A user of `tenant` with `role`, made directly in the registry.
    pub fn user(srv: &TestServer, name: &str, role: m2mhub_identity::Role, tenant: &str) -> Api {
        let reg = &srv.get().registry;
        reg.create_user(name, "long enough password", role, Some(tenant))
            .expect("user");
        let (_, token) = reg
            .create_api_token(name, role, None, "tests")
            .expect("token");
        Api {
            addr: srv.http(),
            token,
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> HttpResponse {
        http_request(
            self.addr,
            method,
            &format!("/api/v1{path}"),
            Some(&self.token),
            body.as_ref(),
        )
        .await
    }

    pub async fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        status: u16,
    ) -> serde_json::Value {
        let r = self.call(method, path, body).await;
        assert_eq!(
            r.status, status,
            "{method} {path}: expected {status}, got {}: {}",
            r.status, r.body
        );
        if r.body.is_empty() {
            serde_json::Value::Null
        } else {
            r.json()
        }
    }
}

/// Register device `id` (in `tenant`, else the default one) through the
/// API and issue it a token; returns the token's secret.
pub async fn registered_device(admin: &Api, id: &str, tenant: Option<&str>) -> String {
    let mut body = serde_json::json!({ "id": id });
    if let Some(t) = tenant {
        body["tenant"] = serde_json::json!(t);
    }
    admin.expect("POST", "/devices", Some(body), 201).await;
    let tok = admin
        .expect(
            "POST",
            &format!("/devices/{id}/tokens"),
            Some(serde_json::json!({})),
            201,
        )
        .await;
    tok["secret"].as_str().expect("secret").to_string()
}

/// A rustls client configuration trusting `trust_pem`, with a client
/// certificate when `identity` (certificate PEM, key PEM) is given.
pub fn client_tls_config(
    trust_pem: &str,
    identity: Option<(&str, &str)>,
) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(trust_pem.as_bytes()) {
        roots.add(c.expect("trust PEM")).expect("trust anchor");
    }
    let b = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    std::sync::Arc::new(match identity {
        Some((cert_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("client certificate PEM");
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("client key PEM");
            b.with_client_auth_cert(chain, key).expect("client cert")
        }
        None => b.with_no_client_auth(),
    })
}

/// A problem document with `status` whose detail contains `needle`.
pub fn assert_problem(r: &HttpResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let detail = r.json()["detail"].as_str().unwrap_or_default().to_string();
    assert!(
        detail.contains(needle),
        "{detail:?} should contain {needle:?}"
    );
}

/// The binary under test, without the tests' own `M2MHUB_TEST_*` settings
/// (service URLs) in its environment: the server refuses `M2MHUB_`
/// variables that name no config key.
pub fn m2mhub_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_m2mhub"));
    for (k, _) in std::env::vars() {
        if k.starts_with("M2MHUB_TEST_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Register a device in the default tenant.
pub fn add_default_device(srv: &TestServer, id: &str) {
    srv.get()
        .registry
        .create_device(m2mhub_identity::NewDevice {
            id: Some(id.into()),
            tenant: m2mhub_identity::DEFAULT_TENANT.into(),
            ..Default::default()
        })
        .expect("device");
}
