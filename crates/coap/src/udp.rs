//! The thin tokio driver: one UDP socket, one task that owns the sans-IO
//! [`Server`], and one task per request for the application's [`Handler`].
//!
//! The driver only does I/O and waiting: it feeds datagrams in, sends what
//! the core queued, sleeps until the core's next deadline, and runs
//! handlers. A handler that takes long is fine — the core acknowledges the
//! request with an empty ACK after [`CoapConfig::separate_ack_delay`] and
//! sends the answer as a separate response — but one that exceeds
//! [`CoapConfig::handler_timeout`] is cancelled and answered 5.03, and one
//! that panics is answered 5.00, so every request gets an answer.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant as TokioInstant;

use crate::config::{CoapConfig, ConfigError};
use crate::dtls::{DtlsLimits, DtlsOutput, DtlsSessions, PskStore};
use crate::exchange::ExchangeId;
use crate::message::Code;
use crate::server::{Request, Response, Server};

/// The application behind the CoAP listener.
pub trait Handler: Send + Sync + 'static {
    /// Answer a complete request. May take time: the driver sends an empty
    /// ACK and a separate response.
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;
}

/// A new representation for the observers of a key.
#[derive(Debug)]
struct Notice {
    key: String,
    payload: Bytes,
    content_format: Option<u16>,
}

/// Why a notification was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NotifyError {
    /// The driver is behind; the newest state will come with a later
    /// notification.
    #[error("CoAP notification queue is full")]
    Full,
    /// The server stopped.
    #[error("CoAP server stopped")]
    Closed,
}

/// A cloneable handle to push notifications to observers.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Notice>,
}

impl Notifier {
    /// Send `payload` to every observer registered under `key`. Never
    /// waits: a full queue is an error the caller may ignore.
    pub fn notify(
        &self,
        key: impl Into<String>,
        payload: impl Into<Bytes>,
        content_format: Option<u16>,
    ) -> Result<(), NotifyError> {
        self.tx
            .try_send(Notice {
                key: key.into(),
                payload: payload.into(),
                content_format,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => NotifyError::Full,
                mpsc::error::TrySendError::Closed(_) => NotifyError::Closed,
            })
    }
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServeError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The UDP socket could not be bound.
    #[error("cannot bind the CoAP socket to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
}

/// A running CoAP server.
#[derive(Debug)]
pub struct CoapServer {
    local_addr: SocketAddr,
    notifier: Notifier,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl CoapServer {
    /// Bind `config.bind` and serve `handler` over plain CoAP until
    /// [`CoapServer::shutdown`].
    pub async fn bind<H: Handler>(
        config: CoapConfig,
        handler: H,
    ) -> Result<CoapServer, ServeError> {
        Self::start(config, handler, None).await
    }

    /// Bind `config.bind` and serve `handler` over DTLS 1.2 with the
    /// pre-shared keys of `store` (CoAPS). The handshake verifies the
    /// client's address, so answers are not size-limited.
    pub async fn bind_dtls<H: Handler>(
        config: CoapConfig,
        store: Arc<dyn PskStore>,
        limits: DtlsLimits,
        handler: H,
    ) -> Result<CoapServer, ServeError> {
        let config = CoapConfig {
            amplification_factor: 0,
            ..config
        };
        Self::start(config, handler, Some(DtlsSessions::new(store, limits))).await
    }

    async fn start<H: Handler>(
        config: CoapConfig,
        handler: H,
        dtls: Option<DtlsSessions>,
    ) -> Result<CoapServer, ServeError> {
        let (seed, echo_key) = secrets();
        let server = Server::with_key(config.clone(), seed, echo_key, now())?;
        let socket = UdpSocket::bind(config.bind)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.bind,
                source,
            })?;
        let local_addr = socket.local_addr().map_err(|source| ServeError::Bind {
            addr: config.bind,
            source,
        })?;
        let (notice_tx, notice_rx) = mpsc::channel(1024);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let secure = dtls.is_some();
        let driver = Driver {
            socket,
            server,
            handler: Arc::new(handler),
            config,
            dtls,
        };
        let task = tokio::spawn(driver.run(notice_rx, shutdown_rx));
        tracing::info!(%local_addr, dtls = secure, "CoAP listening");
        Ok(CoapServer {
            local_addr,
            notifier: Notifier { tx: notice_tx },
            shutdown: Some(shutdown_tx),
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle for notifications.
    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    /// Stop serving and wait for the driver to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for CoapServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

struct Driver<H> {
    socket: UdpSocket,
    server: Server,
    handler: Arc<H>,
    config: CoapConfig,
    /// CoAPS: every datagram passes through its peer's DTLS session.
    dtls: Option<DtlsSessions>,
}

/// How often DTLS sessions are checked against their keys (revocation).
const DTLS_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);

impl<H: Handler> Driver<H> {
    async fn run(
        mut self,
        mut notices: mpsc::Receiver<Notice>,
        mut shutdown: oneshot::Receiver<()>,
    ) {
        let (resp_tx, mut responses) = mpsc::channel::<(ExchangeId, Response)>(256);
        // One byte more than accepted, so an oversized datagram is seen as
        // such rather than silently truncated into a valid-looking one.
        // DTLS records carry up to 29 bytes of header and tag around the
        // CoAP message.
        let mut buf = vec![0u8; self.config.max_message_size + 64];
        let mut next_sweep = TokioInstant::now() + DTLS_SWEEP;
        loop {
            self.flush().await;
            while let Some((id, mut request)) = self.server.poll_request() {
                if let Some(d) = &self.dtls {
                    request.identity = d.identity(request.peer);
                }
                self.spawn_handler(id, request, resp_tx.clone());
            }
            let mut deadline = self.server.poll_timeout();
            if let Some(d) = &self.dtls {
                let t = d.poll_timeout().into_iter().chain(deadline).min();
                deadline = Some(t.map_or(next_sweep.into_std(), |t| t.min(next_sweep.into_std())));
            }
            let sleep =
                tokio::time::sleep_until(deadline.map_or_else(far_future, TokioInstant::from_std));
            tokio::select! {
                _ = &mut shutdown => break,
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, peer)) => self.receive(peer, n, &buf).await,
                    // ICMP errors surface here on some systems: not fatal.
                    Err(e) => tracing::debug!(error = %e, "CoAP receive error"),
                },
                Some((id, response)) = responses.recv() => {
                    if let Err(e) = self.server.respond(now(), id, response) {
                        tracing::debug!(error = %e, "CoAP response not sent");
                    }
                }
                Some(n) = notices.recv() => {
                    self.server.notify(now(), &n.key, n.payload, n.content_format);
                }
                _ = sleep, if deadline.is_some() => {
                    let t = now();
                    self.server.handle_timeout(t);
                    if let Some(d) = &mut self.dtls {
                        let mut out = DtlsOutput::default();
                        d.handle_timeout(t, &mut out);
                        if TokioInstant::now() >= next_sweep {
                            d.sweep(t, &mut out);
                            next_sweep = TokioInstant::now() + DTLS_SWEEP;
                        }
                        self.send_records(out.transmit).await;
                    }
                }
            }
        }
        self.flush().await;
    }

    /// A datagram: straight to the core, or through its DTLS session.
    async fn receive(&mut self, peer: SocketAddr, n: usize, buf: &[u8]) {
        // An oversized datagram is refused by the core (plain) or fails
        // the record layer (DTLS).
        let data = &buf[..n];
        let Some(d) = &mut self.dtls else {
            self.server.handle_datagram(now(), peer, data);
            return;
        };
        let mut out = DtlsOutput::default();
        let t = now();
        d.handle_datagram(t, peer, data, &mut out);
        for (from, plain) in out.plaintext {
            self.server.handle_datagram(t, from, &plain);
        }
        self.send_records(out.transmit).await;
    }

    async fn send_records(&self, records: Vec<(SocketAddr, Vec<u8>)>) {
        for (peer, bytes) in records {
            if let Err(e) = self.socket.send_to(&bytes, peer).await {
                tracing::debug!(%peer, error = %e, "CoAP send error");
            }
        }
    }

    async fn flush(&mut self) {
        while let Some((peer, bytes)) = self.server.poll_transmit() {
            match &mut self.dtls {
                Some(d) => {
                    let mut out = DtlsOutput::default();
                    d.encrypt(peer, &bytes, &mut out);
                    self.send_records(out.transmit).await;
                }
                None => {
                    if let Err(e) = self.socket.send_to(&bytes, peer).await {
                        tracing::debug!(%peer, error = %e, "CoAP send error");
                    }
                }
            }
        }
    }

    fn spawn_handler(
        &self,
        id: ExchangeId,
        request: Request,
        tx: mpsc::Sender<(ExchangeId, Response)>,
    ) {
        let handler = Arc::clone(&self.handler);
        let timeout = self.config.handler_timeout;
        let max_age = self.config.overload_max_age;
        tokio::spawn(async move {
            let mut task = tokio::spawn(async move { handler.handle(request).await });
            let response = match tokio::time::timeout(timeout, &mut task).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "CoAP handler failed");
                    Response::new(Code::INTERNAL_SERVER_ERROR)
                }
                Err(_) => {
                    task.abort();
                    tracing::warn!("CoAP handler timed out");
                    Response {
                        max_age: Some(max_age),
                        ..Response::new(Code::SERVICE_UNAVAILABLE)
                    }
                }
            };
            let _ = tx.send((id, response)).await;
        });
    }
}

/// The core's clock: tokio's, so paused-time tests work.
fn now() -> std::time::Instant {
    TokioInstant::now().into_std()
}

fn far_future() -> TokioInstant {
    TokioInstant::now() + std::time::Duration::from_secs(86_400)
}

/// A seed for message ids and the key of Echo values, from the OS (the
/// time if that fails: ids then stay unpredictable enough off-path, and
/// the Echo key only guards the amplification limit).
fn secrets() -> (u64, [u8; 32]) {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 40];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos());
        b[..16].copy_from_slice(&t.to_le_bytes());
    }
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&b[..8]);
    let mut key = [0u8; 32];
    key.copy_from_slice(&b[8..]);
    (u64::from_le_bytes(seed), key)
}
