//! Wiring: the broker, its listeners and the HTTP server, started from
//! validated settings. Used by `m2mhub serve` and by the integration tests,
//! which start real servers on ephemeral loopback ports.

use crate::broker_auth::RegistryAuth;
use crate::settings::{TelemetryStore, Validated};
use anyhow::{bail, Context, Result};
use m2mhub_api::AppState;
use m2mhub_broker::auth::{
    AuthDecision, Authenticator, Authorizer, ClientIdentity, ConnectInfo, StaticAuth,
};
use m2mhub_broker::{Broker, BrokerParts, SecurityEvent, SecurityEventKind, SecurityEvents};
use m2mhub_identity::{Registry, SecurityKind};
use m2mhub_pki::{DeviceCa, MasterKey};
use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use m2mhub_automation::Automation;
use m2mhub_fleet::Fleet;
use m2mhub_ingest::{ConnectionHistory, Ingest, IngestCounters, LiveHub};
use m2mhub_tsdb::{Retention, TimeSeriesStore, Tsdb};

/// A running m2mhub.
pub struct Server {
    pub broker: Broker,
    pub registry: Registry,
    /// Alarms, commands, device events and rule definitions.
    pub fleet: Fleet,
    /// The telemetry store: embedded, or PostgreSQL shared by the nodes.
    pub tsdb: Arc<dyn TimeSeriesStore>,
    pub ingest: Arc<IngestCounters>,
    /// The rule service (rules, alarms, commands, webhooks).
    pub automation: Automation,
    /// `(user, password)` of the administrator created on this start, when
    /// the registry had no user yet: shown once, never stored in clear.
    pub first_admin: Option<(String, String)>,
    pub mqtt_addr: SocketAddr,
    pub mqtts_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    /// The HTTPS listener's address, when one is configured.
    pub https_addr: Option<SocketAddr>,
    /// The plain CoAP listener's address, when one is configured.
    pub coap_addr: Option<SocketAddr>,
    coap: Option<m2mhub_coap::CoapServer>,
    /// The CoAPS listener's address, when one is configured.
    pub coaps_addr: Option<SocketAddr>,
    coaps: Option<m2mhub_coap::CoapServer>,
    /// OTA firmware: image files, the signing key, download URLs.
    pub ota: Arc<m2mhub_api::ota::OtaApi>,
    /// Seals and opens devices' DTLS pre-shared keys (the master key): the
    /// DTLS listener opens what `Registry::psk_lookup` returns with it.
    pub psk_keys: m2mhub_pki::PskKeys,
    /// This node's membership in a cluster, when `[cluster]` is enabled.
    pub cluster: Option<Arc<m2mhub_cluster::Cluster>>,
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
        let registry = match &v.postgres {
            Some(url) => {
                tracing::info!(server = %url, "metadata (registry and fleet) in PostgreSQL");
                m2mhub_pgstore::PgRegistryStore::open(url)
                    .and_then(|s| Registry::with_store(Box::new(s)))
                    .with_context(|| format!("cannot open the device registry in {url}"))?
            }
            None => Registry::open(&v.data_dir.join("registry")).with_context(|| {
                format!(
                    "cannot open the device registry under {}",
                    v.data_dir.display()
                )
            })?,
        };
        let env_key = std::env::var(m2mhub_pki::MASTER_KEY_ENV).ok();
        let (master, source) = MasterKey::load_or_create(&v.data_dir, env_key.as_deref())?;
        if let m2mhub_pki::KeySource::File { created: true } = source {
            tracing::warn!(
                path = %v.data_dir.join(m2mhub_pki::MASTER_KEY_FILE).display(),
                "created a master key file: it decrypts the CA key; back it up, or move it into M2MHUB_MASTER_KEY and delete the file"
            );
        }
        let (ca, created) = DeviceCa::load_or_create(&v.data_dir, &master)?;
        if created {
            tracing::info!(ca = %m2mhub_pki::ca_cert_path(&v.data_dir).display(), "created the device CA");
        }
        let first_admin = registry.ensure_admin()?;
        let fleet = match &v.postgres {
            Some(url) => m2mhub_pgstore::PgFleetStore::open(url)
                .and_then(|s| Fleet::with_store(Box::new(s), registry.clone()))
                .with_context(|| {
                    format!("cannot open the fleet tables (alarms, commands, rules) in {url}")
                })?,
            None => {
                Fleet::open(&v.data_dir.join("registry"), registry.clone()).with_context(|| {
                    format!(
                        "cannot open the fleet tables (alarms, commands, rules) under {}",
                        v.data_dir.display()
                    )
                })?
            }
        };
        fleet.configure_diagnostics(v.diagnostics.clone());

        let registry_auth = Arc::new(RegistryAuth::new(
            registry.clone(),
            v.broker.allow_anonymous,
            v.accept_unregistered_certs,
        ));
        let (authenticator, authorizer): (Arc<dyn Authenticator>, Arc<dyn Authorizer>) =
            match &v.broker.password_file {
                Some(path) => {
                    let users = Arc::new(StaticAuth::new(false).with_password_file(path)?);
                    let chain = Arc::new(PasswordUsersFirst {
                        users,
                        registry: registry_auth.clone(),
                    });
                    (chain.clone(), chain)
                }
                None => (registry_auth.clone(), registry_auth.clone()),
            };
        let broker = Broker::open(BrokerParts {
            config: v.broker.clone(),
            data_dir: Some(v.data_dir.clone()),
            fsync: v.fsync,
            authenticator,
            authorizer,
        })?;
        broker.set_security_events(Arc::new(SecurityToRegistry(registry.clone())));

        let t = &v.telemetry;
        let retention = Retention {
            default: t.retention,
            rules: Vec::new(),
        };
        let tsdb: Arc<dyn TimeSeriesStore> = match &t.store {
            TelemetryStore::Postgres(url) => {
                tracing::info!(server = %url, "telemetry in PostgreSQL");
                let store = m2mhub_pgstore::PgTelemetryStore::open(
                    url,
                    m2mhub_pgstore::PgTelemetryOptions {
                        durable: t.durable,
                        retention,
                        ..Default::default()
                    },
                )
                .with_context(|| format!("cannot open the telemetry store in {url}"))?;
                Arc::new(store)
            }
            TelemetryStore::Embedded => {
                let tsdb_dir = v.data_dir.join("tsdb");
                let store = Tsdb::open(
                    &tsdb_dir,
                    m2mhub_tsdb::Options {
                        durable: t.durable,
                        flush_interval: t.flush_interval,
                        min_free_bytes: t.min_free_bytes,
                        retention,
                        ..Default::default()
                    },
                )
                .with_context(|| {
                    format!(
                        "cannot open the time-series store under {}",
                        tsdb_dir.display()
                    )
                })?;
                Arc::new(store)
            }
        };
        let ingest = Arc::new(IngestCounters::default());
        let live = Arc::new(LiveHub::default());
        // Every accepted shadow change, whoever wrote it, reaches the live
        // streams (nothing is built while none is open).
        fleet.watch_shadows(live.clone());
        broker.add_connection_events(Arc::new(ConnectionHistory {
            fleet: fleet.clone(),
            live: live.clone(),
        }));
        let pipeline = Arc::new(Ingest {
            live: live.clone(),
            store: tsdb.clone(),
            registry: registry.clone(),
            fleet: fleet.clone(),
            durable: t.durable,
            limits: m2mhub_telemetry::Limits {
                max_points: t.max_points,
                ..Default::default()
            },
            counters: ingest.clone(),
            gateways: Some(m2mhub_ingest::gateways::Gateways::start(
                &broker,
                v.gateways.clone(),
            )),
        });
        broker.set_publish_hook(pipeline.clone());

        let mut tasks = Vec::new();
        let mqtt = bind(v.mqtt_listen, "mqtt.listen", "--mqtt-listen").await?;
        let mqtt_addr = mqtt.local_addr()?;
        let http = bind(v.http_listen, "http.listen", "--http-listen").await?;
        let http_addr = http.local_addr()?;
        // Join before the first client is accepted, so that everything
        // published here reaches the other nodes.
        let cluster = match &v.cluster {
            Some(join) => Some(
                m2mhub_cluster::Cluster::join(
                    broker.clone(),
                    m2mhub_cluster::ClusterConfig {
                        nats_url: join.nats_url.clone(),
                        name: join.name.clone(),
                        queue_retention: join.queue_retention,
                        tls: join.tls.clone(),
                        forward_queue: join.forward_queue,
                        node_id: node_id(&v.data_dir, join.node_id.as_deref())?,
                        mqtt_addr: mqtt_addr.to_string(),
                        http_addr: http_addr.to_string(),
                    },
                )
                .await
                .context("cannot join the cluster (`cluster.nats_url`, --nats-url)")?,
            ),
            None => None,
        };
        let b = broker.clone();
        tasks.push(tokio::spawn(async move { b.run_tcp(mqtt).await }));

        // TLS: the configured certificate, else one from the built-in CA.
        let builtin = match &v.tls.files {
            Some(_) => None,
            None => {
                let mut names = vec!["localhost".to_string()];
                let host = v.tls.listen.ip();
                if !host.is_unspecified() {
                    names.push(host.to_string());
                }
                Some(ca.server_identity(&v.data_dir, &master, &names)?)
            }
        };
        let tls_source = TlsSource {
            files: v.tls.clone(),
            builtin,
            ca_pem: ca.ca_pem(),
        };
        let tls_config = tls_source.load()?;
        let mqtt_tls = m2mhub_broker::tls::ReloadableConfig::new(tls_config.clone());
        let listener = bind(v.tls.listen, "mqtt.tls_listen", "--mqtts-listen").await?;
        let mqtts_addr = Some(listener.local_addr()?);
        let b = broker.clone();
        let tls = mqtt_tls.clone();
        tasks.push(tokio::spawn(async move { b.run_tls(listener, tls).await }));

        tasks.push(tokio::spawn(sweep_diagnostics(fleet.clone())));

        let automation =
            Automation::start(broker.clone(), fleet.clone(), v.security_alarms.clone());
        let ota_cluster: Option<Arc<dyn m2mhub_ingest::ota_topics::OtaCluster>> = match &cluster {
            Some(c) => Some(Arc::new(
                crate::ota_cluster::ClusterOta::new(c.clone())
                    .context("the cluster's runtime is not running")?,
            )),
            None => None,
        };
        // Download URLs signed with one key cluster-wide: a URL from any
        // node works on every node (devices may reach HTTP through a
        // balancer); alone, the node's own key.
        let own_url_key = m2mhub_pki::url_token_key(&v.data_dir, &master)?;
        let url_key = match &cluster {
            Some(c) => c
                .shared_key("ota-url", own_url_key)
                .await
                .context("cannot read the cluster's download URL key from NATS")?,
            None => own_url_key,
        };
        let ota = Arc::new(ota_service(
            v,
            &master,
            &broker,
            &fleet,
            http_addr,
            (ota_cluster, url_key),
        )?);
        let psk_keys = m2mhub_pki::PskKeys::new(master);
        tasks.push(m2mhub_ingest::ota_topics::serve(
            ota.service.clone(),
            Duration::from_secs(1),
        ));
        if let Some(leases) = cluster.as_ref().and_then(|c| c.leases("rule")) {
            // Each rule over messages runs on one node, which the fabric
            // sends every node's matching messages; the rest run none of
            // it (its windows then see each message once, cluster-wide).
            let leases = Arc::new(leases);
            let mut owned = leases.owned();
            let l = leases.clone();
            automation.place_with(move |ids| l.want(ids));
            let a = automation.clone();
            tasks.push(tokio::spawn(async move {
                while owned.changed().await.is_ok() {
                    let set = owned.borrow_and_update().clone();
                    a.placed(set);
                }
            }));
        }
        if let Some(c) = &cluster {
            // Images uploaded while this node ran alone (or before the
            // cluster kept images) go to the cluster's store, so every
            // node can serve them.
            tasks.push(tokio::spawn(share_local_images(
                c.clone(),
                fleet.clone(),
                ota.service.files.clone(),
            )));
            // Every OTA change written here (a campaign, a job, an
            // artifact) is announced, so the other nodes read OTA again.
            let (announce, rt) = (c.clone(), tokio::runtime::Handle::current());
            fleet.on_ota_change(Arc::new(move || {
                let _in = rt.enter();
                announce.changed("ota");
            }));
            // Another node changed the shared metadata: read it again (the
            // registry, and the rules, which the rule service recompiles).
            let (r, f, a) = (registry.clone(), fleet.clone(), automation.clone());
            let files = ota.service.files.clone();
            c.on_change(Arc::new(move |what| {
                tracing::debug!(what, "metadata changed on another node; reloading");
                let (r, f, a) = (r.clone(), f.clone(), a.clone());
                if what == "ota" {
                    // Campaigns, jobs and artifacts only; images of deleted
                    // artifacts leave this node's cache.
                    let files = files.clone();
                    tokio::task::spawn_blocking(move || match f.reload_ota() {
                        Ok(gone) => {
                            for id in gone {
                                let _ = std::fs::remove_file(files.path(&id));
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot reload the OTA campaigns"),
                    });
                    return;
                }
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = r.reload() {
                        tracing::warn!(error = %e, "cannot reload the registry");
                    }
                    if let Err(e) = f.reload_alarms() {
                        tracing::warn!(error = %e, "cannot reload the alarms");
                    }
                    match f.reload_rules() {
                        Ok(changed) => {
                            for id in changed {
                                m2mhub_automation::RuleService::reload(&a, &id);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot reload the rules"),
                    }
                });
            }));
        }
        let reports = m2mhub_reports::Reports::new(
            fleet.clone(),
            tsdb.clone(),
            m2mhub_reports::ReportsConfig {
                dir: v.data_dir.join("reports"),
                smtp: v.reports.smtp.clone(),
                public_url: public_base(v, http_addr),
                webhook_timeout: Duration::from_secs(10),
                retry_delays: m2mhub_reports::default_retry_delays(),
            },
        );
        tasks.push(reports.clone().start(v.reports.check_interval));
        let state = AppState {
            broker: broker.clone(),
            registry: registry.clone(),
            fleet: fleet.clone(),
            ca: Arc::new(ca),
            psk_keys: psk_keys.clone(),
            cert_days: 365,
            auth_stats: Some(registry_auth.stats()),
            tsdb: tsdb.clone(),
            ingest: Some(ingest.clone()),
            rules: Some(Arc::new(automation.clone())),
            live,
            ota: Some(ota.clone()),
            pipeline: Some(pipeline.clone()),
            command_waiters: Some(m2mhub_api::device_http::CommandWaiters::start(&broker)),
            http: Arc::new(m2mhub_api::HttpLimits::new(v.http.clone())),
            login: Arc::new(m2mhub_api::LoginGuard::new(v.login.clone())),
            cluster: cluster.clone(),
            console: Arc::new(v.console.clone()),
            broker_history: Default::default(),
            reports: Some(reports.clone()),
        };
        tasks.push(m2mhub_api::broker_history::sample_every_minute(
            broker.clone(),
            state.broker_history.clone(),
        ));
        // The hash unknown user names are checked against, computed now so
        // that no login pays for it (timing must not tell names apart).
        let r = registry.clone();
        tokio::task::spawn_blocking(move || r.prepare_password_checks());
        tasks.push(tokio::spawn(m2mhub_api::provision::serve_mqtt(
            state.clone(),
        )));
        tasks.push(m2mhub_ingest::shadow_topics::serve(
            broker.clone(),
            fleet.clone(),
        ));

        // CoAP: plain (only when configured: token secrets travel in clear)
        // and CoAPS (DTLS with the devices' pre-shared keys), one set of
        // resources and one notification task for both.
        let mut resources = m2mhub_ingest::coap_resources::CoapResources::new(
            broker.clone(),
            pipeline.clone(),
            fleet.clone(),
        );
        resources.ota = Some(Arc::new(ota.service.clone()));
        let coap = match &v.coap {
            Some(config) => Some(
                m2mhub_coap::CoapServer::bind(config.clone(), resources.clone())
                    .await
                    .with_context(|| {
                        format!(
                            "cannot serve CoAP on {} (`coap.listen`): is another server using it?",
                            config.bind
                        )
                    })?,
            ),
            None => None,
        };
        let coaps = match &v.coaps {
            Some((config, limits)) => {
                let store = Arc::new(crate::coaps::RegistryPsks::new(
                    registry.clone(),
                    psk_keys.clone(),
                ));
                Some(
                    m2mhub_coap::CoapServer::bind_dtls(
                        config.clone(),
                        store,
                        limits.clone(),
                        resources.clone(),
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "cannot serve CoAPS on {} (`coap.dtls_listen`): is another server using it? choose another address with --coaps-listen",
                            config.bind
                        )
                    })?,
                )
            }
            None => None,
        };
        let notifiers: Vec<_> = coap
            .iter()
            .chain(coaps.iter())
            .map(|c| c.notifier())
            .collect();
        if !notifiers.is_empty() {
            resources.start_notifications(notifiers);
        }
        let mut https_tls = None;
        let https_addr = match v.https_listen {
            Some(addr) => {
                let listener = bind(addr, "http.tls_listen", "--https-listen").await?;
                let local = listener.local_addr()?;
                let tls = m2mhub_broker::tls::ReloadableConfig::new(https_config(&tls_config));
                https_tls = Some(tls.clone());
                let (state, mut signal) = (state.clone(), broker.shutdown_signal());
                tasks.push(tokio::spawn(async move {
                    let stop = async move {
                        let _ = signal.changed().await;
                    };
                    if let Err(e) = m2mhub_api::serve_tls(listener, tls, state, stop).await {
                        tracing::error!(error = %e, "HTTPS server failed");
                    }
                }));
                Some(local)
            }
            None => None,
        };
        #[cfg(unix)]
        tasks.push(reload_tls_on_hangup(tls_source, mqtt_tls, https_tls)?);
        let mut signal = broker.shutdown_signal();
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = signal.changed().await;
            };
            if let Err(e) = m2mhub_api::serve(http, state, stop).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }));
        Ok(Server {
            broker,
            registry,
            fleet,
            tsdb,
            ingest,
            automation,
            first_admin,
            mqtt_addr,
            mqtts_addr,
            http_addr,
            https_addr,
            coap_addr: coap.as_ref().map(|c| c.local_addr()),
            coap,
            coaps_addr: coaps.as_ref().map(|c| c.local_addr()),
            coaps,
            ota,
            psk_keys,
            cluster,
            tasks,
            _lock: lock,
        })
    }

    /// Graceful stop: refuse new connections, tell clients, flush the store.
    pub async fn shutdown(self) {
        if let Some(c) = self.coap {
            c.shutdown().await;
        }
        if let Some(c) = self.coaps {
            c.shutdown().await;
        }
        self.broker.shutdown(Duration::from_secs(5)).await;
        if let Some(c) = &self.cluster {
            c.leave().await;
        }
        for t in self.tasks {
            t.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Err(e) = self.registry.flush() {
            tracing::error!(error = %e, "flushing the registry failed");
        }
        // Commits what is queued; heads are rebuilt from the WAL next time.
        let tsdb = self.tsdb.clone();
        let _ = tokio::task::spawn_blocking(move || tsdb.close()).await;
    }
}

/// This node's id in a cluster: the configured one, else the one kept in
/// the data folder (`node-id`), made on first start from the host name and
/// a random suffix so that two nodes on one host differ.
fn node_id(data_dir: &std::path::Path, configured: Option<&str>) -> Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let path = data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let host: String = std::fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let mut suffix = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
        .map_err(|_| anyhow::anyhow!("no random numbers for a node id"))?;
    let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let id = if host.is_empty() {
        format!("node-{hex}")
    } else {
        format!("{host}-{hex}")
    };
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// How often expired upload URLs are marked and old bundles deleted.
const DIAGNOSTICS_SWEEP: Duration = Duration::from_secs(60);

/// The diagnostics retention, applied once a minute (off the workers: it
/// deletes files).
async fn sweep_diagnostics(fleet: Fleet) {
    let mut tick = tokio::time::interval(DIAGNOSTICS_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let f = fleet.clone();
        match tokio::task::spawn_blocking(move || f.sweep_diagnostics()).await {
            Ok(Ok(r)) if r.expired + r.deleted > 0 => {
                tracing::info!(
                    expired = r.expired,
                    deleted = r.deleted,
                    "diagnostics swept"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "diagnostics sweep failed; will retry"),
            Err(e) => tracing::error!(error = %e, "diagnostics sweep panicked"),
        }
    }
}

/// MQTT users from the password file (bridges, tools) get full access;
/// everyone else is decided by the device registry.
struct PasswordUsersFirst {
    users: Arc<StaticAuth>,
    registry: Arc<RegistryAuth>,
}

impl Authenticator for PasswordUsersFirst {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> AuthDecision {
        if info.tls.is_none() && info.username.is_some_and(|u| self.users.knows(u)) {
            return self.users.authenticate(info);
        }
        self.registry.authenticate(info)
    }
}

impl PasswordUsersFirst {
    fn is_file_user(&self, identity: &ClientIdentity) -> bool {
        identity.device_id.is_none()
            && identity.claim.is_none()
            && identity
                .username
                .as_deref()
                .is_some_and(|u| self.users.knows(u))
    }
}

impl Authorizer for PasswordUsersFirst {
    fn can_publish(&self, client_id: &str, identity: &ClientIdentity, topic: &str) -> bool {
        self.is_file_user(identity) || self.registry.can_publish(client_id, identity, topic)
    }
    fn can_subscribe(&self, client_id: &str, identity: &ClientIdentity, filter: &str) -> bool {
        self.is_file_user(identity) || self.registry.can_subscribe(client_id, identity, filter)
    }
}

/// The broker's limit hits and automatic bans, kept as security events.
struct SecurityToRegistry(Registry);

impl SecurityEvents for SecurityToRegistry {
    fn event(&self, e: SecurityEvent) {
        let kind = match e.kind {
            SecurityEventKind::AutoBanAuthFailures => SecurityKind::AuthFailureBurst,
            SecurityEventKind::AutoBanFlapping => SecurityKind::Flapping,
            SecurityEventKind::BannedConnectRefused => SecurityKind::Ban,
            _ => SecurityKind::RateAnomaly,
        };
        let _ = self
            .0
            .record_security_event(m2mhub_identity::SecurityEvent {
                kind,
                device_id: e.client_id,
                addr: e.ip.map(|ip| ip.to_string()),
                detail: serde_json::json!({"event": format!("{:?}", e.kind), "detail": e.detail}),
                ts_ms: None,
            });
    }
}

/// Where the TLS listeners' configuration comes from: read at start and
/// again on every SIGHUP (a renewed certificate, a new CRL).
struct TlsSource {
    files: crate::settings::TlsFiles,
    /// The built-in CA's server identity (chain, key), when no files are
    /// configured.
    builtin: Option<(String, String)>,
    ca_pem: String,
}

impl TlsSource {
    fn load(&self) -> Result<Arc<rustls::ServerConfig>> {
        let read = |path: &std::path::Path, key: &str| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read `mqtt.{key}` {}", path.display()))
        };
        let (chain_pem, key_pem) = match (&self.files.files, &self.builtin) {
            (Some((cert, key)), _) => (read(cert, "tls_cert")?, read(key, "tls_key")?),
            (None, Some(builtin)) => builtin.clone(),
            (None, None) => bail!("no TLS certificate: set mqtt.tls_cert and mqtt.tls_key"),
        };
        let mut client_roots = vec![self.ca_pem.clone()];
        if let Some(path) = &self.files.client_ca {
            client_roots.push(read(path, "tls_client_ca")?);
        }
        let crls = match &self.files.client_crl {
            Some(path) => vec![read(path, "tls_client_crl")?],
            None => Vec::new(),
        };
        Ok(m2mhub_broker::tls::server_config_pem(
            &chain_pem,
            &key_pem,
            &client_roots,
            &crls,
            false,
        )?)
    }
}

/// The HTTPS listener's configuration: the MQTT listener's, offering
/// HTTP/1.1 by ALPN.
fn https_config(mqtt: &Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let mut config = (**mqtt).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// On SIGHUP, read the TLS files again and give new handshakes the result;
/// a file that does not load leaves the running configuration in place.
#[cfg(unix)]
fn reload_tls_on_hangup(
    source: TlsSource,
    mqtt: m2mhub_broker::tls::ReloadableConfig,
    https: Option<m2mhub_broker::tls::ReloadableConfig>,
) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    Ok(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match source.load() {
                Ok(config) => {
                    if let Some(h) = &https {
                        h.replace(https_config(&config));
                    }
                    mqtt.replace(config);
                    tracing::info!("SIGHUP: TLS certificate, client CA and CRL files read again");
                }
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "SIGHUP: TLS files not reloaded; the running configuration stays"
                    );
                }
            }
        }
    }))
}

/// The base URL of links handed out (firmware downloads, report files):
/// `http.public_url`, else the HTTP listener's address.
fn public_base(v: &Validated, http_addr: std::net::SocketAddr) -> String {
    v.ota.public_url.clone().unwrap_or_else(|| {
        let ip = match http_addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => std::net::IpAddr::from([127, 0, 0, 1]),
            ip if ip.is_unspecified() => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", std::net::SocketAddr::new(ip, http_addr.port()))
    })
}

/// The OTA parts: image files under `<data_dir>/ota`, the firmware signing
/// key and the URL token secret (both sealed under the master key), and the
/// base URL devices download from.
/// Put the images of this node's data folder the cluster's object store
/// lacks into it (once, at start).
async fn share_local_images(
    cluster: Arc<m2mhub_cluster::Cluster>,
    fleet: Fleet,
    files: m2mhub_fleet::ArtifactFiles,
) {
    for a in fleet.list_artifacts(None) {
        let path = files.path(&a.id);
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            continue;
        }
        match cluster.has_image(&a.id).await {
            Ok(true) => {}
            Ok(false) => match cluster.put_image(&a.id, &path).await {
                Ok(()) => {
                    tracing::info!(artifact = %a.id, "firmware image shared with the cluster")
                }
                Err(e) => {
                    tracing::warn!(artifact = %a.id, error = %e, "cannot share a firmware image with the cluster")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the cluster's image store; local images not shared");
                return;
            }
        }
    }
}

fn ota_service(
    v: &Validated,
    master: &MasterKey,
    broker: &m2mhub_broker::Broker,
    fleet: &Fleet,
    http_addr: std::net::SocketAddr,
    (cluster, secret): (
        Option<Arc<dyn m2mhub_ingest::ota_topics::OtaCluster>>,
        [u8; 32],
    ),
) -> anyhow::Result<m2mhub_api::ota::OtaApi> {
    let files = m2mhub_fleet::ArtifactFiles::new(&v.data_dir)
        .with_context(|| format!("cannot create {}", v.data_dir.join("ota").display()))?;
    files.clean_incoming();
    let (signer, created) = m2mhub_pki::FirmwareSigner::load_or_create(&v.data_dir, master)?;
    if created {
        tracing::info!(public_key = %signer.public_key_base64(), "created the firmware signing key: devices pin this public key");
    }
    let base = public_base(v, http_addr);
    Ok(m2mhub_api::ota::OtaApi {
        service: m2mhub_ingest::ota_topics::OtaService {
            broker: broker.clone(),
            fleet: fleet.clone(),
            files,
            urls: m2mhub_ingest::ota_topics::DownloadUrls::new(&secret, &base, v.ota.url_ttl),
            max_chunk: v.ota.chunk_bytes,
            cluster,
            fetching: Arc::new(tokio::sync::Mutex::new(())),
        },
        signer: Arc::new(signer),
        max_artifact_bytes: v.ota.max_artifact_bytes,
        download_budget: Arc::new(tokio::sync::Semaphore::new(
            m2mhub_api::ota::DOWNLOAD_BUDGET,
        )),
        public_url: v.ota.public_url.clone(),
        read_slots: Arc::new(tokio::sync::Semaphore::new(m2mhub_api::ota::READ_SLOTS)),
    })
}
