//! The test application and a CoAP client built from `Endpoint`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use m2mhub_coap::exchange::{Endpoint, EndpointConfig, Event, ExchangeId};
use m2mhub_coap::message::{content_format, option, BlockValue};
use m2mhub_coap::{CoapConfig, CoapServer, Code, Handler, Message, MessageType, Request, Response};
use tokio::net::UdpSocket;

/// The body of `GET /big`: printable, so command-line clients can print it.
pub fn big_body() -> Vec<u8> {
    (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Resources: `POST /echo` (answers the payload's length), `PUT /upload`
/// (length and byte sum), `GET /big` (3000 bytes), `GET /slow` (answers
/// after 1 s: a separate response), `GET /panic` (the handler panics),
/// `GET /temp` (observable under "temp").
pub struct App;

impl Handler for App {
    async fn handle(&self, req: Request) -> Response {
        match (req.method, req.path_str().as_str()) {
            (Code::POST, "echo") => Response {
                code: Code::CHANGED,
                ..Response::content(
                    content_format::TEXT_PLAIN,
                    format!("{} bytes", req.payload.len()),
                )
            },
            (Code::PUT, "upload") => {
                let sum: u64 = req.payload.iter().map(|&b| u64::from(b)).sum();
                Response {
                    code: Code::CHANGED,
                    ..Response::content(
                        content_format::TEXT_PLAIN,
                        format!("{} {}", req.payload.len(), sum),
                    )
                }
            }
            (Code::GET, "big") => Response::content(content_format::TEXT_PLAIN, big_body()),
            (Code::GET, "slow") => {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                Response::content(content_format::TEXT_PLAIN, "slow")
            }
            (Code::GET, "panic") => panic!("the handler failed"),
            (Code::GET, "temp") => {
                Response::content(content_format::TEXT_PLAIN, "20").with_observe("temp")
            }
            _ => Response::new(Code::NOT_FOUND),
        }
    }
}

/// Start the server on an ephemeral loopback port.
pub async fn start() -> CoapServer {
    start_with(CoapConfig::default()).await
}

/// Start the server with `config` on an ephemeral loopback port.
pub async fn start_with(config: CoapConfig) -> CoapServer {
    let config = CoapConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..config
    };
    CoapServer::bind(config, App).await.expect("server starts")
}

/// A CoAP client: the crate's `Endpoint` over a real UDP socket.
pub struct Client {
    socket: UdpSocket,
    endpoint: Endpoint,
    server: SocketAddr,
    events: VecDeque<Event>,
}

impl Client {
    pub async fn new(server: SocketAddr) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
        Client {
            socket,
            endpoint: Endpoint::new(EndpointConfig::default(), 42),
            server,
            events: VecDeque::new(),
        }
    }

    /// A CON request to `path` with a fresh token.
    pub fn request(&mut self, code: Code, path: &str) -> Message {
        let token = self.endpoint.new_token();
        let mut m = Message::new(MessageType::Confirmable, code, 0, token);
        m.set_uri_path(path);
        m
    }

    pub fn send(&mut self, m: Message) -> ExchangeId {
        self.endpoint
            .send_request(Instant::now(), self.server, m)
            .expect("request accepted")
    }

    /// Stop listening for notifications of an observation.
    pub fn cancel_observation(&mut self, token: m2mhub_coap::Token) {
        self.endpoint.cancel_request(self.server, token);
    }

    /// Send and wait for the response.
    pub async fn call(&mut self, m: Message) -> Message {
        let id = self.send(m);
        self.response(id).await
    }

    /// The next response (or notification) for `id`, within 10 s.
    pub async fn response(&mut self, id: ExchangeId) -> Message {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pos) = self.events.iter().position(|e| match e {
                Event::Response { id: i, .. } => *i == id,
                Event::Failed { id: i, .. } => *i == id,
                _ => false,
            }) {
                match self.events.remove(pos) {
                    Some(Event::Response { message, .. }) => return message,
                    other => panic!("request failed: {other:?}"),
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no response within 10 s"
            );
            self.step(deadline).await;
        }
    }

    /// Whether any response for `id` arrives within `wait`.
    pub async fn quiet_for(&mut self, id: ExchangeId, wait: Duration) -> bool {
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until {
            self.step(until).await;
        }
        !self
            .events
            .iter()
            .any(|e| matches!(e, Event::Response { id: i, .. } if *i == id))
    }

    /// Send what is queued, then wait for one datagram or timer (or `until`).
    async fn step(&mut self, until: tokio::time::Instant) {
        while let Some((peer, bytes)) = self.endpoint.poll_transmit() {
            self.socket.send_to(&bytes, peer).await.expect("send");
        }
        let wake = self
            .endpoint
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .map_or(until, |t| t.min(until));
        let mut buf = [0u8; 2048];
        tokio::select! {
            r = self.socket.recv_from(&mut buf) => {
                let (n, peer) = r.expect("recv");
                self.endpoint.handle_datagram(Instant::now(), peer, &buf[..n]);
            }
            _ = tokio::time::sleep_until(wake) => self.endpoint.handle_timeout(Instant::now()),
        }
        while let Some((peer, bytes)) = self.endpoint.poll_transmit() {
            self.socket.send_to(&bytes, peer).await.expect("send");
        }
        self.events
            .extend(std::iter::from_fn(|| self.endpoint.poll_event()));
    }

    /// GET a body block-wise; returns it and the number of requests.
    pub async fn get_blockwise(&mut self, path: &str) -> (Vec<u8>, usize) {
        let mut body = Vec::new();
        let mut num = 0;
        let mut szx = 6;
        let mut requests = 0;
        loop {
            let mut m = self.request(Code::GET, path);
            if num > 0 {
                m.set_block(option::BLOCK2, BlockValue::new(num, false, szx).unwrap());
            }
            let mut r = self.call(m.clone()).await;
            requests += 1;
            if r.code == Code::UNAUTHORIZED {
                // RFC 9175: prove the address by repeating the Echo value.
                let echo = r
                    .option(option::ECHO)
                    .expect("4.01 with Echo")
                    .value
                    .clone();
                let mut again = self.request(Code::GET, path);
                again.set_option(option::ECHO, echo);
                if let Some(b) = m.option(option::BLOCK2) {
                    again.set_option(option::BLOCK2, b.value.clone());
                }
                r = self.call(again).await;
                requests += 1;
            }
            assert_eq!(r.code, Code::CONTENT);
            body.extend_from_slice(&r.payload);
            match r.block2() {
                Some(Ok(b)) if b.more => {
                    num = b.num + 1;
                    szx = b.szx;
                }
                _ => return (body, requests),
            }
        }
    }

    /// PUT a body in Block1 blocks of `size` bytes; returns the final response.
    pub async fn put_blockwise(&mut self, path: &str, body: &[u8], size: usize) -> Message {
        let szx = BlockValue::szx_for_size(size).unwrap();
        let chunks: Vec<&[u8]> = body.chunks(size).collect();
        let mut last = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let more = i + 1 < chunks.len();
            let mut m = self.request(Code::PUT, path);
            m.set_block(
                option::BLOCK1,
                BlockValue::new(i as u32, more, szx).unwrap(),
            );
            m.payload = Bytes::copy_from_slice(chunk);
            let r = self.call(m).await;
            if more {
                assert_eq!(r.code, Code::CONTINUE, "block {i}");
            }
            last = Some(r);
        }
        last.expect("at least one block")
    }
}
