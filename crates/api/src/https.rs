//! HTTPS: the same router as plain HTTP, served over TLS with the
//! platform's certificate (the MQTT TLS listener's). A client certificate
//! signed by the device CA (or `mqtt.tls_client_ca`) is optional: when a
//! device presents one, it authenticates the device's own requests
//! (`device_http`); operators and token devices connect without one.
//!
//! Handshakes run in their own tasks (at most [`MAX_HANDSHAKES`] at once,
//! each bounded by [`HANDSHAKE_TIMEOUT`]) and finished connections are
//! handed to axum through a channel, so one slow or silent client never
//! holds up the accept loop.

use crate::device_http;
use crate::state::AppState;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::Listener;
use m2mhub_broker::auth::TlsPeer;
use m2mhub_broker::tls::ReloadableConfig;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;

/// Handshakes in progress at once; more wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of an HTTPS connection.
#[derive(Clone)]
pub struct TlsInfo {
    pub peer: SocketAddr,
    /// The verified client certificate, if one was presented.
    pub cert: Option<Arc<TlsPeer>>,
}

impl std::fmt::Debug for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsInfo")
            .field("peer", &self.peer)
            .field(
                "client_cn",
                &self.cert.as_ref().and_then(|c| c.common_name.as_deref()),
            )
            .finish()
    }
}

/// Connections whose handshake finished, for axum to serve.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, TlsInfo)>,
    local: SocketAddr,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = TlsInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(TlsInfo {
            peer: self.local,
            cert: None,
        })
    }
}

impl TlsListener {
    /// Accept TCP connections on `listener` and handshake them with
    /// `tls`'s current configuration in background tasks.
    pub fn start(listener: TcpListener, tls: ReloadableConfig) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "HTTPS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (tls.acceptor(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "HTTPS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "HTTPS handshake timed out");
                            return;
                        }
                    };
                    let cert = m2mhub_broker::tls::peer(tls.get_ref().1).map(Arc::new);
                    let _ = tx.send((tls, TlsInfo { peer, cert })).await;
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

/// Give HTTPS requests the same extensions plain HTTP has (the peer as
/// `ConnectInfo<SocketAddr>`), plus the client certificate.
async fn tls_extensions(mut req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(info)) = req.extensions().get::<ConnectInfo<TlsInfo>>().cloned() {
        device_http::tls_extensions(&mut req, info.peer, info.cert);
    }
    next.run(req).await
}

/// Serve HTTPS on `listener` until `shutdown` resolves.
pub async fn serve_tls(
    listener: TcpListener,
    tls: ReloadableConfig,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tls = TlsListener::start(listener, tls)?;
    let limits = state.http.clone();
    let app = crate::router(state)
        .layer(axum::middleware::from_fn(crate::timing::server_timing))
        .layer(axum::middleware::from_fn(tls_extensions));
    // The same connection limits as plain HTTP: header read and idle
    // timeouts, connections per address.
    crate::connections::serve_router(tls, app, limits, |i: &TlsInfo| i.peer.ip(), shutdown).await
}
