//! Serving HTTP connections with hyper directly rather than through
//! `axum::serve`, for the two things it does not expose: a header read
//! timeout (hyper has one but needs a timer, which `axum::serve` does not
//! set — a client could hold a connection forever by sending a request
//! line one byte a minute) and a bound on connections per source address.
//!
//! Each accepted connection is served by hyper's HTTP/1.1 connection
//! (with upgrades, for MQTT over WebSocket) in its own task; the peer's
//! address reaches handlers as `ConnectInfo`, as with
//! `into_make_service_with_connect_info`.

use crate::limits::HttpLimits;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;

/// The router with the connection's peer added to every request.
#[derive(Clone)]
struct WithPeer<A> {
    router: Router,
    peer: A,
}

impl<A: Clone + Send + Sync + 'static> tower_service::Service<hyper::Request<Incoming>>
    for WithPeer<A>
{
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = <Router as tower_service::Service<hyper::Request<Incoming>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A Router is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer.clone()));
        tower_service::Service::call(&mut self.router, req)
    }
}

/// Serve `app` on connections from `listener` until `shutdown` resolves,
/// within `limits` (connections per address, header read timeout).
/// `ip_of` tells the source address of a connection from its listener
/// address (a `SocketAddr` for TCP).
pub async fn serve_router<L>(
    mut listener: L,
    app: Router,
    limits: Arc<HttpLimits>,
    ip_of: fn(&L::Addr) -> IpAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    let mut shutdown = pin!(shutdown);
    // Dropped at shutdown: every connection then finishes its request in
    // progress and closes.
    let (stop, stopped) = watch::channel(());
    loop {
        let (io, peer) = tokio::select! {
            c = listener.accept() => c,
            _ = &mut shutdown => break,
        };
        let ip = ip_of(&peer);
        let Some(slot) = limits.connection(ip) else {
            tracing::debug!(%ip, "HTTP connection refused: too many from this address");
            continue;
        };
        let service = TowerToHyperService::new(WithPeer {
            router: app.clone(),
            peer,
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.config.header_read_timeout);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%ip, error = %e, "HTTP connection ended");
                    }
                    return;
                }
                _ = stopped.changed() => {}
            }
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(%ip, error = %e, "HTTP connection ended");
            }
        });
    }
    drop(stop);
    Ok(())
}
