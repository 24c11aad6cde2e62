//! Wiring: the broker, its listeners and the HTTP server, started from
//! validated settings. Used by `m2mhub serve` and by the integration tests,
//! which start real servers on ephemeral loopback ports.

use crate::settings::Validated;
use anyhow::{Context, Result};
use m2mhub_broker::auth::{AllowAll, StaticAuth};
use m2mhub_broker::{Broker, BrokerParts};
use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running m2mhub.
pub struct Server {
    pub broker: Broker,
    pub mqtt_addr: SocketAddr,
    pub mqtts_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    /// Held for the life of the server: one server per data directory.
    _lock: File,
}

async fn bind(addr: SocketAddr, key: &str, flag: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (`{key}`): is another server using it? choose another address with {flag}")
    })
}

impl Server {
    pub async fn start(v: &Validated) -> Result<Server> {
        std::fs::create_dir_all(&v.data_dir)
            .with_context(|| format!("cannot create data directory {}", v.data_dir.display()))?;
        let lock_path = v.data_dir.join("LOCK");
        let lock = File::create(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "data directory {} is in use by another m2mhub; stop it or choose another with --data-dir",
                v.data_dir.display()
            );
        }
        let mut authn = StaticAuth::new(v.broker.allow_anonymous);
        if let Some(path) = &v.broker.password_file {
            authn = authn.with_password_file(path)?;
        }
        let broker = Broker::open(BrokerParts {
            config: v.broker.clone(),
            data_dir: Some(v.data_dir.clone()),
            fsync: v.fsync,
            authenticator: Arc::new(authn),
            authorizer: Arc::new(AllowAll),
        })?;

        let mut tasks = Vec::new();
        let mqtt = bind(v.mqtt_listen, "mqtt.listen", "--mqtt-listen").await?;
        let mqtt_addr = mqtt.local_addr()?;
        let b = broker.clone();
        tasks.push(tokio::spawn(async move { b.run_tcp(mqtt).await }));

        let mut mqtts_addr = None;
        if let Some(tls) = &v.tls {
            let config =
                m2mhub_broker::tls::server_config(&tls.cert, &tls.key, tls.client_ca.as_deref())?;
            let listener = bind(tls.listen, "mqtt.tls_listen", "--mqtts-listen").await?;
            mqtts_addr = Some(listener.local_addr()?);
            let b = broker.clone();
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            tasks.push(tokio::spawn(
                async move { b.run_tls(listener, acceptor).await },
            ));
        }

        let http = bind(v.http_listen, "http.listen", "--http-listen").await?;
        let http_addr = http.local_addr()?;
        let mut signal = broker.shutdown_signal();
        let b = broker.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = signal.changed().await;
            };
            if let Err(e) = m2mhub_api::serve(http, b, stop).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }));
        Ok(Server {
            broker,
            mqtt_addr,
            mqtts_addr,
            http_addr,
            tasks,
            _lock: lock,
        })
    }

    /// Graceful stop: refuse new connections, tell clients, flush the store.
    pub async fn shutdown(self) {
        self.broker.shutdown(Duration::from_secs(5)).await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}
