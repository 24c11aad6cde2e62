//! Accept loops for the MQTT listeners (TCP and TLS). Each accepted
//! connection gets its own task; the loop stops when shutdown begins.

use crate::broker::Broker;
use std::net::SocketAddr;

use tokio::net::TcpListener;

impl Broker {
    /// Serve one connection over any transport (the HTTP server hands
    /// WebSocket connections in here).
    pub fn serve_connection<S: crate::Transport>(
        &self,
        stream: S,
        peer: SocketAddr,
        transport: &'static str,
        tls: Option<crate::auth::TlsPeer>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        crate::connection::serve(
            self.inner.clone(),
            stream,
            peer,
            transport,
            tls.map(Box::new),
        )
    }

    /// Accept plain MQTT connections until shutdown.
    pub async fn run_tcp(&self, listener: TcpListener) {
        let mut shutdown = self.shutdown_signal();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.changed() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(self.serve_connection(
                        crate::transport::Tcp::from(stream),
                        peer,
                        "tcp",
                        None,
                    ));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Accept MQTT over TLS until shutdown. The handshake must finish within
    /// the CONNECT timeout.
    pub async fn run_tls(&self, listener: TcpListener, tls: crate::tls::ReloadableConfig) {
        let mut shutdown = self.shutdown_signal();
        let timeout = self.config().connect_timeout;
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.changed() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let broker = self.clone();
                    let acceptor = tls.acceptor();
                    tokio::spawn(async move {
                        let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                        let identity = crate::tls::peer(tls.get_ref().1);
                        broker.serve_connection(tls, peer, "tls", identity).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}
