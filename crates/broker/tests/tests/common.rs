//! A broker on an ephemeral port and a hand-driven MQTT client.

#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use m2mhub_broker::auth::{AllowAll, StaticAuth};
use m2mhub_broker::{Broker, BrokerConfig, BrokerParts};
use mqtt_codec::{
    decode, encode, Connect, ConnectProperties, Packet, Protocol, PubResponse, Publish, QoS,
    Subscribe, SubscribeProperties, SubscriptionOptions,
};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Longest wait for anything that is expected to happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Await `f` for at most `WAIT`, naming `what` if it does not finish.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A broker (anonymous access, no `$SYS`, in memory) serving TCP on an
/// ephemeral loopback port until dropped.
pub struct TestBroker {
    pub broker: Broker,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TestBroker {
    pub async fn start(f: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        let mut config = BrokerConfig {
            allow_anonymous: true,
            sys_interval: Duration::ZERO,
            ..Default::default()
        };
        f(&mut config);
        let broker = Broker::open(BrokerParts {
            config,
            data_dir: None,
            fsync: false,
            authenticator: Arc::new(StaticAuth::new(true)),
            authorizer: Arc::new(AllowAll),
        })
        .expect("broker opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let b = broker.clone();
        let task = tokio::spawn(async move { b.run_tcp(listener).await });
        TestBroker { broker, addr, task }
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

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

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
    io: TcpStream,
    rbuf: BytesMut,
    pub protocol: Protocol,
}

impl Raw {
    /// Connect and insist on CONNACK success.
    pub async fn connect(addr: SocketAddr, c: Connect) -> Raw {
        let io = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        io.set_nodelay(true).expect("nodelay");
        let mut raw = Raw {
            io,
            rbuf: BytesMut::new(),
            protocol: c.protocol,
        };
        raw.send(&Packet::Connect(Box::new(c))).await;
        match raw.recv().await {
            Packet::ConnAck(a) => assert_eq!(a.reason_code, 0, "CONNACK refused: {a:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut buf = BytesMut::new();
        encode(p, self.protocol, &mut buf).expect("encode");
        within("write", self.io.write_all(&buf))
            .await
            .expect("write to broker");
    }

    /// Send several packets with one write, as a client that does not wait
    /// for acknowledgements does: they reach the broker together.
    pub async fn send_all(&mut self, packets: &[Packet]) {
        let mut buf = BytesMut::new();
        for p in packets {
            encode(p, self.protocol, &mut buf).expect("encode");
        }
        self.send_bytes(&buf).await;
    }

    /// Write without failing the test: the outcome is the test's to judge.
    pub async fn try_write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(WAIT, self.io.write_all(bytes)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        within("write", self.io.write_all(bytes))
            .await
            .expect("write to broker");
    }

    /// A TCP connection with nothing sent yet (for CONNECT pipelined with
    /// other packets).
    pub async fn tcp(addr: SocketAddr, protocol: Protocol) -> Raw {
        let io = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        io.set_nodelay(true).expect("nodelay");
        Raw {
            io,
            rbuf: BytesMut::new(),
            protocol,
        }
    }

    pub async fn next(&mut self, wait: Duration) -> Next {
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

    /// Read packets until the broker closes the connection (within `WAIT`):
    /// the packets, and how the stream ended — `Ok` for an orderly end of
    /// stream (FIN), the error for a reset. Panics on timeout.
    pub async fn read_until_closed(&mut self) -> (Vec<Packet>, std::io::Result<()>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            match decode(&mut self.rbuf, self.protocol, usize::MAX) {
                Ok(Some(p)) => {
                    seen.push(p);
                    continue;
                }
                Ok(None) => {}
                Err(e) => panic!("broker sent an undecodable packet: {e}"),
            }
            self.rbuf.reserve(64 * 1024);
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf)).await {
                Err(_) => panic!("connection still open after {WAIT:?}; saw {seen:?}"),
                Ok(Ok(0)) => return (seen, Ok(())),
                Ok(Err(e)) => return (seen, Err(e)),
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

    /// Assert that nothing arrives within `QUIET` (and the socket stays open).
    pub async fn expect_nothing(&mut self) {
        match self.next(QUIET).await {
            Next::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// The next packet must be a PUBACK for `pid`; returns its reason code.
    pub async fn expect_puback(&mut self, pid: u16) -> u8 {
        match self.recv().await {
            Packet::PubAck(a) if a.packet_id == pid => a.reason_code,
            other => panic!("expected PUBACK {pid}, got {other:?}"),
        }
    }

    /// The next packet must be a PUBREC for `pid`; returns its reason code.
    pub async fn expect_pubrec(&mut self, pid: u16) -> u8 {
        match self.recv().await {
            Packet::PubRec(a) if a.packet_id == pid => a.reason_code,
            other => panic!("expected PUBREC {pid}, got {other:?}"),
        }
    }

    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    pub async fn subscribe(&mut self, pid: u16, filter: &str, qos: QoS) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: pid,
            properties: SubscribeProperties::default(),
            filters: vec![(
                filter.to_string(),
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            )],
        }))
        .await;
        match self.recv().await {
            Packet::SubAck(a) if a.packet_id == pid => {}
            other => panic!("expected SUBACK {pid}, got {other:?}"),
        }
    }

    pub async fn pubrel(&mut self, pid: u16) {
        self.send(&Packet::PubRel(PubResponse::new(pid, 0))).await;
    }
}

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

pub fn publish(topic: &str, qos: QoS, pid: u16, payload: &str) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_string(),
        packet_id: (qos != QoS::AtMostOnce).then_some(pid),
        properties: Default::default(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    })
}
