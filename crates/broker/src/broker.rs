//! The broker's shared state and the routing of one message to its
//! subscribers. Connections (see `connection.rs`) call in here; nothing in
//! this file does I/O except through the persistent store.

use crate::auth::{AuthDecision, Authenticator, Authorizer, ClientIdentity, ConnectInfo};
use crate::ban::{BanInfo, BanKey, Bans};
use crate::cluster::ClusterLink;
use crate::config::BrokerConfig;
use crate::events::{ConnectionEvents, Hooks, PublishHook, SecurityEventKind, SecurityEvents};
use crate::limits::Limits;
use crate::message::Message;
use crate::metrics::{Gauges, Metrics};
use crate::persist;
use crate::retained::RetainedStore;
use crate::route_cache::{RouteCache, SubscriptionIndex};
use crate::session::{ConnLink, Outgoing, Session, SubscriptionRecord};
use crate::topic_tree::{Delivery, Subscriber, TopicTree};
use bytes::Bytes;
use m2mhub_broker_log::{Durability, Op, Store, StoreError, StoreOptions, StoredMessage};
use mqtt_codec::{reason, Protocol, PublishProperties, QoS, SubscriptionOptions};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open the broker store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot load the password file: {0}")]
    Password(#[from] crate::auth::PasswordFileError),
}

pub(crate) struct Inner {
    pub config: BrokerConfig,
    /// The cluster fabric, when this node is one of several.
    pub(crate) cluster: RwLock<Option<Arc<dyn ClusterLink>>>,
    /// `cluster.is_some()`, read on the publish path without the lock.
    pub(crate) clustered: AtomicBool,
    pub tree: SubscriptionIndex,
    pub retained: RwLock<RetainedStore>,
    pub sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    pub store: Option<Store>,
    pub authn: Arc<dyn Authenticator>,
    pub authz: Arc<dyn Authorizer>,
    pub metrics: Metrics,
    /// Shared identity of not-yet-authenticated connections.
    pub anonymous: Arc<crate::auth::ClientIdentity>,
    ids: AtomicU64,
    seq: AtomicU64,
    pub connections: AtomicU64,
    /// Connections parked without a task (`park.rs`).
    pub(crate) parked: AtomicU64,
    /// The runtime connections are served on, where a parked connection
    /// resumes when a thread outside it (the cluster fabric's runtime, a
    /// blocking thread) wakes it.
    pub(crate) runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    pub connections_closed: Notify,
    pub shutdown: watch::Sender<bool>,
    /// Set when shutdown begins; connections check it when signalled.
    pub shutting_down: std::sync::atomic::AtomicBool,
    pub started: Instant,
    /// Every connection's keep-alive deadline, in one timer.
    pub(crate) deadlines: Arc<crate::deadlines::Deadlines>,
    pub bans: Bans,
    /// Bumped by every IP ban, so connections re-check their address.
    pub(crate) ip_ban_epoch: std::sync::atomic::AtomicU32,
    pub limits: Limits,
    pub hooks: Hooks,
    /// Throttle of non-ban security events (see `events.rs`).
    event_bucket: Mutex<crate::limits::TokenBucket>,
    /// Platform subscriptions ([`Broker::subscribe_internal`]); the flag
    /// keeps the routing path to one atomic load while there are none.
    /// Changed only through [`Inner::internal_write`], which makes cached
    /// routes stale.
    pub(crate) internal: RwLock<Vec<InternalSub>>,
    pub(crate) has_internal: AtomicBool,
}

thread_local! {
    /// Set when this thread queued a message for a session whose queue is
    /// an eighth full: the publishing connection then lets the subscriber
    /// run before it reads more (see [`take_queue_backlog`]).
    static QUEUE_BACKLOG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a session queue filled up behind this thread's routing since
/// the last call. A subscriber that coalesces its writes waits a turn of
/// the scheduler, which lasts as long as publishers keep finding input:
/// the publishers yield, or they would route past the queue limit first.
pub(crate) fn take_queue_backlog() -> bool {
    QUEUE_BACKLOG.replace(false)
}

/// A topic's first level: platform filters mostly start with a literal
/// one, compared first (see [`InternalSub::wants`]).
fn first_level(topic: &str) -> &str {
    topic.split('/').next().unwrap_or("")
}

/// One platform subscription: filters and a bounded channel.
pub(crate) struct InternalSub {
    /// A message matching any of them is sent once.
    filters: Vec<PlatformFilter>,
    tx: mpsc::Sender<Arc<Message>>,
    /// An observer (the rule engine) watches traffic without being a
    /// subscriber: it does not turn a PUBACK's "no matching subscribers"
    /// into success.
    observer: Option<ObserverId>,
    /// An observer's filters for messages published on *other* nodes of a
    /// cluster ([`Broker::set_observed_remote`]); announced to the fabric
    /// as platform interest.
    pub(crate) remote: Vec<String>,
}

impl InternalSub {
    /// Whether one of its filters matches `topic` (whose first level is
    /// `first`).
    fn wants(&self, topic: &str, first: &str) -> bool {
        self.filters.iter().any(|f| f.matches(topic, first))
    }
}

/// A platform subscription's filter with its first level read once, when
/// it is set: every PUBLISH is checked against every platform filter, and
/// most are rejected by comparing that level (`devices`, `$provision`…)
/// alone, without splitting the filter again per message.
pub(crate) struct PlatformFilter {
    filter: String,
    /// The first level when it is literal.
    first: Option<Box<str>>,
}

impl PlatformFilter {
    fn new(filter: String) -> PlatformFilter {
        let first = filter.split('/').next().unwrap_or("");
        let first = (first != "+" && first != "#").then(|| first.into());
        PlatformFilter { filter, first }
    }

    /// `topic_first`: the topic's first level.
    fn matches(&self, topic: &str, topic_first: &str) -> bool {
        match &self.first {
            Some(first) if **first != *topic_first => false,
            _ => mqtt_codec::topic::matches(&self.filter, topic),
        }
    }
}

/// Names an observer ([`Broker::observer`]) to change its filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObserverId(u64);

/// A running broker. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
}

/// What the API shows of a session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub client_id: String,
    pub online: bool,
    pub protocol_v5: bool,
    pub persistent: bool,
    pub expiry_interval: u32,
    /// Seconds since the client disconnected, while offline.
    pub offline_secs: Option<u64>,
    pub subscriptions: Vec<(String, u8)>,
    pub queued: usize,
    pub inflight: usize,
    /// Messages dropped for this session (queue full or too large).
    pub dropped: u64,
}

impl SessionInfo {
    fn of(s: &Session) -> SessionInfo {
        let st = s.state.lock();
        SessionInfo {
            client_id: s.client_id.to_string(),
            online: st.conn.is_some(),
            protocol_v5: st.protocol.is_v5(),
            persistent: st.persistent,
            expiry_interval: st.expiry_interval,
            offline_secs: st.disconnected_at.map(|t| t.elapsed().as_secs()),
            subscriptions: st
                .subscriptions
                .iter()
                .map(|(f, r)| (f.clone(), r.options.qos as u8))
                .collect(),
            queued: st.queue.len(),
            inflight: st.inflight.len(),
            dropped: st.dropped,
        }
    }
}

/// Options for [`Broker::open`].
pub struct BrokerParts {
    pub config: BrokerConfig,
    /// Where the persistent store lives; `None` keeps everything in memory.
    pub data_dir: Option<std::path::PathBuf>,
    /// fsync every group commit (survives power loss) instead of only
    /// writing it (survives a process crash).
    pub fsync: bool,
    pub authenticator: Arc<dyn Authenticator>,
    pub authorizer: Arc<dyn Authorizer>,
}

impl Broker {
    /// Open the store, recover retained messages and persistent sessions,
    /// and start the background tasks (session expiry, `$SYS`). Must be
    /// called inside a tokio runtime.
    pub fn open(parts: BrokerParts) -> Result<Broker, BrokerError> {
        parts.config.validate()?;
        let (store, recovered) = match &parts.data_dir {
            Some(dir) => {
                let (store, rec) = Store::open(
                    &dir.join("broker"),
                    StoreOptions {
                        durability: if parts.fsync {
                            Durability::Fsync
                        } else {
                            Durability::Write
                        },
                        ..Default::default()
                    },
                )?;
                (Some(store), Some(rec))
            }
            None => (None, None),
        };
        let (shutdown, _) = watch::channel(false);
        let now = Instant::now();
        let inner = Arc::new(Inner {
            ip_ban_epoch: std::sync::atomic::AtomicU32::new(0),
            bans: Bans::new(
                parts.config.ban_base_duration,
                parts.config.ban_max_duration,
                parts.config.ban_forget_after,
            ),
            limits: Limits::new(&parts.config, now),
            hooks: Hooks::default(),
            event_bucket: Mutex::new(crate::limits::TokenBucket::new(
                f64::from(crate::events::SECURITY_EVENT_RATE),
                f64::from(2 * crate::events::SECURITY_EVENT_RATE),
                now,
            )),
            internal: RwLock::new(Vec::new()),
            has_internal: AtomicBool::new(false),
            config: parts.config,
            tree: SubscriptionIndex::default(),
            retained: RwLock::new(RetainedStore::default()),
            sessions: Mutex::new(HashMap::new()),
            store,
            authn: parts.authenticator,
            authz: parts.authorizer,
            metrics: Metrics::default(),
            anonymous: Arc::new(crate::auth::ClientIdentity::default()),
            ids: AtomicU64::new(1),
            seq: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            runtime: std::sync::OnceLock::new(),
            connections_closed: Notify::new(),
            shutdown,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
            deadlines: crate::deadlines::Deadlines::new(),
            cluster: RwLock::new(None),
            clustered: AtomicBool::new(false),
        });
        if let Some(rec) = recovered {
            inner.recover(rec);
        }
        let broker = Broker { inner };
        broker.spawn_background();
        Ok(broker)
    }

    fn spawn_background(&self) {
        let weak = Arc::downgrade(&self.inner);
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                let now = Instant::now();
                inner.expire_sessions(now);
                n += 1;
                if n.is_multiple_of(10) {
                    inner.limits.purge(now);
                    inner.bans.purge(now);
                }
            }
        });
        if !self.inner.config.sys_interval.is_zero() {
            crate::sys::spawn(self.clone());
        }
    }

    /// Ask every connection to close (MQTT 5 clients get DISCONNECT 0x8B),
    /// wait up to `grace` for them, then flush the store.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.inner.shutdown.send(true);
        // Wake every connected client's task; each sees the flag and leaves.
        // (`notify`, not the queued-message shortcut: the flag they must
        // see is not under the session lock.)
        for s in self.inner.sessions.lock().values() {
            if let Some(c) = &s.state.lock().conn {
                c.waker.notify();
            }
        }
        let deadline = Instant::now() + grace;
        while self.inner.connections.load(Ordering::SeqCst) > 0 {
            let wait = self.inner.connections_closed.notified();
            if self.inner.connections.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                tracing::warn!(
                    open = self.inner.connections.load(Ordering::SeqCst),
                    "connections still open after the shutdown grace period"
                );
                break;
            }
        }
        if let Some(store) = &self.inner.store {
            let store = store.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = store.flush_blocking() {
                    tracing::error!(error = %e, "flushing the broker store failed");
                }
            })
            .await;
        }
    }

    /// A receiver that turns true when shutdown begins (listeners use it to
    /// stop accepting).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// Prometheus text for `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render(&self.inner.gauges())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Snapshot of the gauges, for the API.
    pub fn gauges(&self) -> Gauges {
        self.inner.gauges()
    }

    /// End `client_id`'s session for good (its device was deleted), on
    /// every node of a cluster.
    pub fn discard_session(&self, client_id: &str) -> bool {
        self.inner
            .admin_to_cluster(&crate::cluster::AdminAction::Discard {
                client_id: client_id.to_string(),
            });
        self.inner.discard_session(client_id)
    }

    /// One page of sessions, ordered by client id, starting after `after`.
    pub fn sessions(&self, after: Option<&str>, limit: usize) -> Vec<SessionInfo> {
        let mut list: Vec<Arc<Session>> = {
            let sessions = self.inner.sessions.lock();
            sessions
                .values()
                .filter(|s| after.is_none_or(|a| &*s.client_id > a))
                .cloned()
                .collect()
        };
        list.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        list.truncate(limit);
        list.iter().map(|s| SessionInfo::of(s)).collect()
    }

    /// One session by client id.
    pub fn session(&self, client_id: &str) -> Option<SessionInfo> {
        let s = self.inner.sessions.lock().get(client_id).cloned()?;
        Some(SessionInfo::of(&s))
    }

    /// Whether a client has a live connection: cheaper than
    /// [`Broker::session`] when that is all a caller needs (a fleet-wide
    /// online filter asks it for every device).
    pub fn is_online(&self, client_id: &str) -> bool {
        let Some(s) = self.inner.sessions.lock().get(client_id).cloned() else {
            return false;
        };
        let online = s.state.lock().conn.is_some();
        online
    }

    /// Publish a message from the platform itself (no authorization).
    pub async fn publish(&self, topic: &str, payload: Bytes, qos: QoS, retain: bool) {
        self.publish_with(topic, payload, qos, retain, PublishProperties::default())
            .await;
    }

    /// Publish from the platform with MQTT 5 properties (a command's
    /// response topic and correlation data, a content type). Returns how
    /// many subscriptions it was routed to (queued for offline persistent
    /// sessions included), after it is in the store when it had to be.
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: PublishProperties,
    ) -> usize {
        let msg = Arc::new(Message {
            topic: topic.to_string(),
            payload,
            qos,
            retain,
            properties: properties.into(),
            expires_at: None,
            publisher: 0,
        });
        let mut scratch = Vec::new();
        let mut ops = Vec::new();
        let matched = self.inner.publish(&msg, &mut scratch, &mut ops);
        if !ops.is_empty() {
            if let Some(store) = &self.inner.store {
                if let Err(e) = store.commit(ops).await {
                    Metrics::inc(&self.inner.metrics.store_errors);
                    tracing::error!(error = %e, "storing an internal publish failed");
                }
            }
        }
        matched
    }
}

/// Bans, kicks, platform subscriptions and hooks.
impl Broker {
    /// Ban a source address (IPv6: its /64 prefix). `duration: None`
    /// escalates from `ban_base_duration` (doubling per repeat ban, up to
    /// `ban_max_duration`). New connections from it are refused, and the
    /// open ones from it are closed with DISCONNECT 0x98 (every connection
    /// is woken and checks its own address). Automatic bans for failed
    /// logins only refuse new connections: the devices already connected
    /// from a shared (NAT) address proved who they are. Returns the
    /// duration applied.
    pub fn ban_ip(&self, ip: IpAddr, reason: &str, duration: Option<Duration>) -> Duration {
        self.ban(BanKey::ip(ip), reason, duration)
    }

    /// Ban a client id (refused at CONNECT with 0x8A); a live connection
    /// with it is closed. See [`Broker::ban_ip`] for `duration`.
    pub fn ban_client(
        &self,
        client_id: &str,
        reason: &str,
        duration: Option<Duration>,
    ) -> Duration {
        self.ban(BanKey::ClientId(client_id.to_string()), reason, duration)
    }

    /// Ban a registered device (`ClientIdentity::device_id`) whatever client
    /// id it uses; its live connections are closed.
    pub fn ban_device(
        &self,
        device_id: &str,
        reason: &str,
        duration: Option<Duration>,
    ) -> Duration {
        self.ban(BanKey::Device(device_id.to_string()), reason, duration)
    }

    /// Ban any key (administrative). Live connections of a banned client id
    /// or device are closed (MQTT 5: DISCONNECT 0x98 Administrative action).
    pub fn ban(&self, key: BanKey, reason: &str, duration: Option<Duration>) -> Duration {
        let d = self
            .inner
            .bans
            .ban(key.clone(), reason, duration, false, Instant::now())
            .unwrap_or_default();
        Metrics::inc(&self.inner.metrics.bans_issued);
        tracing::info!(key = %key, reason, secs = d.as_secs(), "banned");
        let reason = mqtt_codec::reason::ADMINISTRATIVE_ACTION;
        let n = match &key {
            BanKey::Ip(_) => {
                // Connections know their own address: wake them all and
                // each one with a banned address closes (`check_kicked`).
                self.inner.ip_ban_epoch.fetch_add(1, Ordering::AcqRel);
                self.inner.wake_all_connections();
                0
            }
            BanKey::ClientId(c) => self.inner.kick_matching(reason, |id, _| id == c.as_str()),
            BanKey::Device(d) => self.inner.kick_matching(reason, |_, identity| {
                identity.device_id.as_deref() == Some(d.as_str())
            }),
        };
        if n > 0 {
            tracing::info!(key = %key, connections = n, "closed connections of a banned key");
        }
        d
    }

    /// Lift a ban (and forget its escalation history). True if it existed.
    pub fn unban(&self, key: &BanKey) -> bool {
        self.inner.bans.unban(key)
    }

    /// Active bans, longest remaining first.
    pub fn bans(&self) -> Vec<BanInfo> {
        self.inner.bans.list(Instant::now())
    }

    /// Close the live connection of `client_id` now: MQTT 5 clients get
    /// DISCONNECT with `reason` (use a DISCONNECT reason code, e.g. 0x98
    /// Administrative action). The session itself follows its expiry as
    /// after any disconnection. False if the client is not connected.
    ///
    /// In a cluster the other nodes are told too: the client may be
    /// connected to any of them.
    pub fn kick(&self, client_id: &str, reason: u8) -> bool {
        self.inner
            .admin_to_cluster(&crate::cluster::AdminAction::Kick {
                client_id: client_id.to_string(),
                reason,
            });
        self.kick_here(client_id, reason)
    }

    /// [`Broker::kick`] on this node only.
    pub(crate) fn kick_here(&self, client_id: &str, reason: u8) -> bool {
        let Some(s) = self.inner.sessions.lock().get(client_id).cloned() else {
            return false;
        };
        let kicked = kick_session(&s, reason);
        if kicked {
            Metrics::inc(&self.inner.metrics.clients_kicked);
        }
        kicked
    }

    /// Close (DISCONNECT 0x98) every live connection whose identity matches
    /// `pred`, e.g. all connections of a disabled device or tenant. Returns
    /// how many. `pred` runs without broker locks held.
    pub fn kick_where(&self, pred: impl Fn(&ClientIdentity) -> bool) -> usize {
        self.inner
            .kick_matching(mqtt_codec::reason::ADMINISTRATIVE_ACTION, |_, identity| {
                pred(identity)
            })
    }

    /// Re-check the subscriptions of every session whose owner matches
    /// `pred` (after a policy or group change) and drop the ones no longer
    /// authorized. Returns how many subscriptions were removed.
    pub fn revalidate_subscriptions(&self, pred: impl Fn(&ClientIdentity) -> bool) -> usize {
        let sessions: Vec<Arc<Session>> = self.inner.sessions.lock().values().cloned().collect();
        let mut n = 0;
        for s in sessions {
            let owner = s.state.lock().owner.clone();
            if let Some(o) = owner.filter(|o| pred(o)) {
                n += self.inner.revalidate(&s, &o);
            }
        }
        n
    }

    /// Receive every message published to a topic matching `filter` (after
    /// the publisher was authorized): client publishes, wills and the
    /// platform's own. At most `capacity` messages wait in the channel;
    /// beyond that messages for this receiver are dropped and counted
    /// (`internal_messages_dropped`), never blocking a publisher. Dropping
    /// the receiver ends the subscription. Topics starting with `$` match
    /// only filters that spell out their first level (`$provision/+/request`).
    pub fn subscribe_internal(
        &self,
        filter: &str,
        capacity: usize,
    ) -> mpsc::Receiver<Arc<Message>> {
        if let Err(e) = mqtt_codec::topic::validate_topic_filter(filter) {
            tracing::warn!(filter, error = ?e, "internal subscription with an invalid filter matches nothing");
        }
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let mut subs = self.inner.internal_write();
        subs.push(InternalSub {
            filters: vec![PlatformFilter::new(filter.to_string())],
            tx,
            observer: None,
            remote: Vec::new(),
        });
        self.inner.has_internal.store(true, Ordering::Release);
        rx
    }

    /// Watch messages without counting as a subscriber, with a set of
    /// filters that can change ([`Broker::set_observed`]); each matching
    /// message is delivered once. Like [`Broker::subscribe_internal`]
    /// otherwise: bounded, never blocks a publisher, ends when the receiver
    /// is dropped. For the rule engine, whose filters change with its rules:
    /// changing them in place (instead of subscribing anew) means a rule is
    /// in force as soon as the call that changed it returns, with no message
    /// missed or seen twice around the change.
    pub fn observer(&self, capacity: usize) -> (ObserverId, mpsc::Receiver<Arc<Message>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = ObserverId(self.inner.next_id());
        let mut subs = self.inner.internal_write();
        subs.push(InternalSub {
            filters: Vec::new(),
            tx,
            observer: Some(id),
            remote: Vec::new(),
        });
        self.inner.has_internal.store(true, Ordering::Release);
        (id, rx)
    }

    /// Replace an observer's filters (invalid ones are left out). Messages
    /// routed after this returns are matched against the new set.
    pub fn set_observed(&self, id: ObserverId, filters: &[String]) {
        let filters: Vec<PlatformFilter> = filters
            .iter()
            .filter(|f| mqtt_codec::topic::validate_topic_filter(f).is_ok())
            .map(|f| PlatformFilter::new(f.clone()))
            .collect();
        let mut subs = self.inner.internal_write();
        if let Some(s) = subs.iter_mut().find(|s| s.observer == Some(id)) {
            s.filters = filters;
        }
    }

    /// Replace the filters an observer also wants matched against messages
    /// published on other nodes of the cluster (a rule this node evaluates
    /// for the whole cluster must see every node's messages). They become
    /// this node's interest at the fabric, so the messages travel here;
    /// [`Broker::route_remote`] hands them to the observer. A single node
    /// keeps them and never uses them.
    pub fn set_observed_remote(&self, id: ObserverId, filters: &[String]) {
        let mut want: Vec<String> = filters
            .iter()
            .filter(|f| mqtt_codec::topic::validate_topic_filter(f).is_ok())
            .cloned()
            .collect();
        want.sort();
        want.dedup();
        let mut subs = self.inner.internal_write();
        let Some(s) = subs.iter_mut().find(|s| s.observer == Some(id)) else {
            return;
        };
        let old = std::mem::replace(&mut s.remote, want.clone());
        drop(subs);
        if !self.inner.clustered.load(Ordering::Acquire) {
            return;
        }
        // Under the index's write lock, like every interest change, so the
        // link sees them in order with the clients' own.
        let _tree = self.inner.tree.write();
        if let Some(link) = self.inner.cluster.read().as_ref() {
            for f in old.iter().filter(|f| !want.contains(f)) {
                link.interest(&crate::cluster::Interest::platform(f), false);
            }
            for f in want.iter().filter(|f| !old.contains(f)) {
                link.interest(&crate::cluster::Interest::platform(f), true);
            }
        }
    }

    /// Install the security event hook (replaces any previous one).
    pub fn set_security_events(&self, hook: Arc<dyn SecurityEvents>) {
        self.inner.hooks.set_security(hook);
    }

    /// Install the connection event hook (replaces any previous one).
    pub fn set_connection_events(&self, hook: Arc<dyn ConnectionEvents>) {
        self.inner.hooks.set_connection(hook);
    }

    /// Install a connection event hook beside the one already installed
    /// (both are told of every event).
    pub fn add_connection_events(&self, hook: Arc<dyn ConnectionEvents>) {
        self.inner.hooks.add_connection(hook);
    }

    /// Install the publish hook (replaces any previous one): it sees every
    /// authorized PUBLISH and may hold back its PUBACK/PUBREC until its own
    /// work is done (see [`PublishHook`]). Connections pick up a replacement
    /// at their next PUBLISH.
    pub fn set_publish_hook(&self, hook: Arc<dyn PublishHook>) {
        self.inner.hooks.set_publish(hook);
    }
}

/// Authentication for device requests that do not come over MQTT (HTTP,
/// CoAP): the same authenticator, bans and failure counting as a CONNECT,
/// so guessing a device's token over HTTP gets the address banned just as
/// it would over MQTT.
impl Broker {
    /// Authenticate one request as a device's. `info.client_id` is the
    /// device the request speaks for. `Err` carries the MQTT reason code of
    /// the refusal ([`reason::BANNED`] for a banned address, client id or
    /// device); callers map it to their own status.
    pub fn authenticate_request(&self, info: &ConnectInfo<'_>) -> Result<Arc<ClientIdentity>, u8> {
        let inner = &self.inner;
        let now = Instant::now();
        let ip = info.peer.ip();
        if !inner.bans.is_empty() {
            for key in [BanKey::ip(ip), BanKey::ClientId(info.client_id.to_string())] {
                if let Some((why, left)) = inner.bans.check(&key, now) {
                    Metrics::inc(&inner.metrics.connections_refused_banned);
                    inner.security_event(
                        SecurityEventKind::BannedConnectRefused,
                        Some(info.client_id),
                        Some(ip),
                        || {
                            format!(
                                "{key} banned ({why}); {} s left ({})",
                                left.as_secs(),
                                info.transport
                            )
                        },
                    );
                    return Err(reason::BANNED);
                }
            }
        }
        match inner.authn.authenticate(info) {
            AuthDecision::Allow(identity) => {
                if let Some(dev) = identity.device_id.as_deref() {
                    if !inner.bans.is_empty()
                        && inner
                            .bans
                            .check(&BanKey::Device(dev.to_string()), now)
                            .is_some()
                    {
                        return Err(reason::BANNED);
                    }
                }
                Ok(Arc::new(identity))
            }
            AuthDecision::Deny(code) => {
                Metrics::inc(&inner.metrics.auth_failures);
                if let Some(h) = inner.hooks.connection() {
                    h.auth_failed(info.client_id, info.username, info.peer, code);
                }
                inner.count_auth_failure(code, info.client_id, ip);
                Err(code)
            }
        }
    }

    /// Whether `identity` may publish to `topic` (the broker's authorizer).
    pub fn may_publish(&self, client_id: &str, identity: &ClientIdentity, topic: &str) -> bool {
        let ok = identity.internal || self.inner.authz.can_publish(client_id, identity, topic);
        if !ok {
            Metrics::inc(&self.inner.metrics.authz_denials);
        }
        ok
    }
}

/// Ask the connection that owns `s` to close with `reason`.
fn kick_session(s: &Session, reason: u8) -> bool {
    let mut st = s.state.lock();
    let Some(conn) = st.conn.as_ref() else {
        return false;
    };
    let (id, waker) = (conn.conn_id, conn.waker.clone());
    st.kicked = Some((id, reason));
    drop(st);
    waker.notify();
    true
}

impl Inner {
    /// Kick every live connection for which `pred(client_id, identity)`
    /// holds; `pred` runs without locks held. Returns how many.
    /// Ask the authorizer again about every subscription of `session`
    /// (owned by `identity`) and drop those it now refuses. Returns how many.
    pub fn revalidate(&self, session: &Arc<Session>, identity: &ClientIdentity) -> usize {
        let filters: Vec<String> = session.state.lock().subscriptions.keys().cloned().collect();
        let mut dropped = 0;
        for f in filters {
            if !self.authz.can_subscribe(&session.client_id, identity, &f) {
                self.unsubscribe(session, &f);
                dropped += 1;
            }
        }
        if dropped > 0 {
            // Nor does what was queued for them still go out.
            let unsent = self.drop_unwanted_queued(session);
            Metrics::add(&self.metrics.messages_dropped_unsubscribed, unsent as u64);
            if let Some(op) = self.session_put_op(session) {
                self.submit(vec![op]);
            }
            tracing::info!(client_id = %session.client_id, dropped, "subscriptions no longer authorized were removed");
        }
        dropped
    }

    /// Wake every attached connection (they re-check bans and kicks).
    pub(crate) fn wake_all_connections(&self) {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        for s in sessions {
            let waker = s.state.lock().conn.as_ref().map(|c| c.waker.clone());
            if let Some(w) = waker {
                w.notify();
            }
        }
    }

    pub fn kick_matching(&self, reason: u8, pred: impl Fn(&str, &ClientIdentity) -> bool) -> usize {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        let mut n = 0;
        for s in sessions {
            let link = {
                let st = s.state.lock();
                st.conn.as_ref().map(|c| (c.conn_id, c.identity.clone()))
            };
            let Some((conn_id, identity)) = link else {
                continue;
            };
            if !pred(&s.client_id, &identity) {
                continue;
            }
            let mut st = s.state.lock();
            let Some(waker) = st
                .conn
                .as_ref()
                .filter(|c| c.conn_id == conn_id)
                .map(|c| c.waker.clone())
            else {
                continue;
            };
            st.kicked = Some((conn_id, reason));
            drop(st);
            waker.notify();
            Metrics::inc(&self.metrics.clients_kicked);
            n += 1;
        }
        n
    }

    /// Count a failed authentication against the source address; enough of
    /// them within the window ban it.
    pub(crate) fn count_auth_failure(&self, code: u8, client_id: &str, ip: IpAddr) {
        if !matches!(
            code,
            reason::BAD_USER_NAME_OR_PASSWORD
                | reason::NOT_AUTHORIZED
                | reason::CLIENT_IDENTIFIER_NOT_VALID
        ) {
            return;
        }
        let now = Instant::now();
        if self.limits.auth_failed_client(client_id, now) {
            // Guessing one device's credentials from many addresses.
            if let Some(d) = self.bans.ban(
                BanKey::ClientId(client_id.to_string()),
                "repeated failed authentication for this client id",
                None,
                true,
                now,
            ) {
                Metrics::inc(&self.metrics.bans_automatic);
                tracing::warn!(
                    client_id,
                    secs = d.as_secs(),
                    "client id banned after repeated failed authentication"
                );
                self.security_event(
                    SecurityEventKind::AutoBanAuthFailures,
                    Some(client_id),
                    Some(ip),
                    || {
                        format!(
                            "repeated failed authentications for this client id; banned for {} s",
                            d.as_secs()
                        )
                    },
                );
            }
        }
        if !self.limits.auth_failed(ip, now) {
            return;
        }
        let Some(d) = self.bans.ban(
            BanKey::ip(ip),
            "repeated failed authentication",
            None,
            true,
            now,
        ) else {
            return;
        };
        Metrics::inc(&self.metrics.bans_automatic);
        tracing::warn!(%ip, secs = d.as_secs(), "address banned after repeated failed authentication");
        let cfg = &self.config;
        let (n, w) = (
            cfg.auth_failures_before_ban,
            cfg.auth_failure_window.as_secs(),
        );
        self.security_event(
            SecurityEventKind::AutoBanAuthFailures,
            Some(client_id),
            Some(ip),
            || {
                format!(
                    "{n} failed authentications within {w} s; address banned for {} s",
                    d.as_secs()
                )
            },
        );
    }

    /// Report a security event to the installed hook, throttled (except
    /// automatic bans). Call without broker locks held.
    pub fn security_event(
        &self,
        kind: SecurityEventKind,
        client_id: Option<&str>,
        ip: Option<IpAddr>,
        detail: impl FnOnce() -> String,
    ) {
        if !self.hooks.has_security() {
            return;
        }
        let always = matches!(
            kind,
            SecurityEventKind::AutoBanAuthFailures | SecurityEventKind::AutoBanFlapping
        );
        if !always && !self.event_bucket.lock().try_take(Instant::now()) {
            Metrics::inc(&self.metrics.security_events_suppressed);
            return;
        }
        self.hooks.security(kind, client_id, ip, detail);
    }

    /// Hand a routed message to the platform subscriptions it matches;
    /// returns how many matched.
    /// Whether any internal subscription (or observer) matches `topic`
    /// (for [`RouteCache`], which remembers it with the route).
    fn internal_matches(&self, topic: &str) -> bool {
        if !self.has_internal.load(Ordering::Acquire) {
            return false;
        }
        let first = first_level(topic);
        self.internal.read().iter().any(|s| s.wants(topic, first))
    }

    /// The internal subscriptions for changing: cached routes made before
    /// are stale from now on (see [`RouteCache`]).
    fn internal_write(&self) -> parking_lot::RwLockWriteGuard<'_, Vec<InternalSub>> {
        let subs = self.internal.write();
        self.tree.invalidate_routes();
        subs
    }

    fn deliver_internal(&self, msg: &Arc<Message>) -> usize {
        let mut n = 0;
        let mut closed = false;
        {
            let subs = self.internal.read();
            // Platform filters mostly start with a literal level
            // (`$provision/…`, `devices/…`): compare that first, so the
            // traffic they do not cover costs no full match.
            let first = first_level(&msg.topic);
            for s in subs.iter() {
                if !s.wants(&msg.topic, first) {
                    continue;
                }
                // Counted as matched even when dropped, like a full session
                // queue: the publisher's PUBACK says someone subscribed.
                let counted = usize::from(s.observer.is_none());
                match s.tx.try_send(msg.clone()) {
                    Ok(()) => {
                        n += counted;
                        Metrics::inc(&self.metrics.internal_messages_delivered);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        n += counted;
                        Metrics::inc(&self.metrics.internal_messages_dropped);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                }
            }
        }
        if closed {
            let mut subs = self.internal_write();
            subs.retain(|s| !s.tx.is_closed());
            self.has_internal.store(!subs.is_empty(), Ordering::Release);
        }
        n
    }

    /// Hand a message from another node to the observers whose remote
    /// filters match it.
    pub(crate) fn deliver_remote_observers(&self, msg: &Arc<Message>) {
        let subs = self.internal.read();
        for s in subs.iter().filter(|s| !s.remote.is_empty()) {
            if !s
                .remote
                .iter()
                .any(|f| mqtt_codec::topic::matches(f, &msg.topic))
            {
                continue;
            }
            match s.tx.try_send(msg.clone()) {
                Ok(()) => Metrics::inc(&self.metrics.internal_messages_delivered),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    Metrics::inc(&self.metrics.internal_messages_dropped)
                }
                // Removed by the next local delivery.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// A new sequence number for the broker's log.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            connections: self.connections.load(Ordering::Relaxed),
            connections_parked: self.parked.load(Ordering::Relaxed),
            sessions: self.sessions.lock().len() as u64,
            subscriptions: self.tree.read().len() as u64,
            retained: self.retained.read().len() as u64,
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// Route a message: update the retained store if it is retained, then
    /// queue it for every matching session. Store operations that must be
    /// durable before the publisher is acknowledged are appended to `ops`.
    /// Returns the number of sessions it was queued for.
    pub fn publish(
        &self,
        msg: &Arc<Message>,
        scratch: &mut Vec<Delivery>,
        ops: &mut Vec<Op>,
    ) -> usize {
        self.publish_gated(msg, None, scratch, ops).0
    }

    /// [`Inner::publish`], and in a cluster the gate that resolves once
    /// the fabric holds the message durably (QoS 1/2): a publisher's
    /// acknowledgement waits for it.
    ///
    /// `routes`, a publishing connection's [`RouteCache`], spares the walk
    /// of the subscription trie when the topic's route is known;
    /// `scratch` holds the deliveries otherwise (and is left for the
    /// caller to clear).
    pub fn publish_gated(
        &self,
        msg: &Arc<Message>,
        routes: Option<&mut RouteCache>,
        scratch: &mut Vec<Delivery>,
        ops: &mut Vec<Op>,
    ) -> (usize, Option<crate::events::AckGate>) {
        let mut stored: Option<Arc<StoredMessage>> = None;
        let persist_topic = self.store.is_some() && !msg.topic.starts_with("$SYS");
        if msg.retain && self.config.retain_available {
            if msg.payload.is_empty() {
                self.retained.write().set(&msg.topic, None);
                if persist_topic {
                    ops.push(Op::RetainDelete {
                        topic: msg.topic.clone(),
                    });
                }
            } else {
                // Copy the payload so a retained message does not pin the
                // whole read buffer it arrived in.
                let kept = Arc::new(Message {
                    topic: msg.topic.clone(),
                    payload: Bytes::copy_from_slice(&msg.payload),
                    qos: msg.qos,
                    retain: true,
                    properties: msg.properties.clone(),
                    expires_at: msg.expires_at,
                    publisher: msg.publisher,
                });
                if persist_topic {
                    let s = persist::to_stored(&kept);
                    stored = Some(s.clone());
                    ops.push(Op::RetainPut(s));
                }
                self.retained.write().set(&msg.topic, Some(kept));
            }
        }
        let clustered = self.clustered.load(Ordering::Acquire);
        let (deliveries, internal_may_match): (&[Delivery], bool) = match routes {
            Some(routes) if !clustered => {
                let r = routes.route(&self.tree, &msg.topic, msg.publisher, |topic| {
                    self.internal_matches(topic)
                });
                (r.deliveries, r.internal)
            }
            _ => {
                self.tree
                    .read()
                    .matches(&msg.topic, msg.publisher, !clustered, scratch);
                (scratch, true)
            }
        };
        let internal = if internal_may_match && self.has_internal.load(Ordering::Acquire) {
            self.deliver_internal(msg)
        } else {
            0
        };
        let n = deliveries.len() + internal;
        for d in deliveries {
            let out = Outgoing {
                msg: msg.clone(),
                qos: d.qos.min(msg.qos),
                retain: d.retain_as_published && msg.retain,
                sub_ids: d.sub_ids.clone(),
                seq: None,
                share: d.share.clone(),
            };
            self.enqueue(&d.session, out, ops, &mut stored);
        }
        if clustered && !msg.topic.starts_with("$SYS") {
            if let Some(link) = self.cluster.read().as_ref() {
                let gate = link.forward(msg);
                // Other nodes may have subscribers this node cannot see:
                // never answer "no matching subscribers" (0x10) here.
                return (n.max(1), gate);
            }
        }
        (n, None)
    }

    /// Tell the cluster link what the last change to the subscription index
    /// did to this node's interest. Called with the index write-locked, so
    /// the link sees the changes in the order they happened.
    fn interest_changed(&self, tree: &mut TopicTree) {
        if !self.clustered.load(Ordering::Acquire) {
            return;
        }
        let changes = tree.take_interest_changes();
        if let Some(link) = self.cluster.read().as_ref() {
            for (interest, on) in &changes {
                link.interest(interest, *on);
            }
        }
    }

    /// Queue one delivery for a session (bounded), waking its connection.
    pub fn enqueue(
        &self,
        session: &Arc<Session>,
        mut out: Outgoing,
        ops: &mut Vec<Op>,
        stored: &mut Option<Arc<StoredMessage>>,
    ) -> bool {
        let mut st = session.state.lock();
        if st.ended {
            return false;
        }
        if out.qos == QoS::AtMostOnce && st.conn.is_none() {
            // QoS 0 messages are not queued for offline sessions.
            return false;
        }
        if st.queue.len() >= self.config.max_queued_messages {
            st.dropped += 1;
            Metrics::inc(&self.metrics.messages_dropped_queue_full);
            return false;
        }
        if st.persistent && out.qos != QoS::AtMostOnce && self.store.is_some() {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let msg = stored
                .get_or_insert_with(|| persist::to_stored(&out.msg))
                .clone();
            ops.push(Op::Enqueue {
                client_id: session.client_id.to_string(),
                seq,
                msg,
            });
            out.seq = Some(seq);
        }
        st.queue.push_back(out);
        if st.queue.len() >= (self.config.max_queued_messages / 8).max(64) {
            QUEUE_BACKLOG.set(true);
        }
        st.wake();
        true
    }

    /// Submit store operations without waiting (acks, metadata).
    pub fn submit(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        self.sessions_to_cluster(&ops);
        if let Some(store) = &self.store {
            store.submit(ops);
        }
    }

    /// Wait until store operations are durable.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.sessions_to_cluster(&ops);
        match &self.store {
            Some(store) => {
                let r = store.commit(ops).await;
                if r.is_err() {
                    Metrics::inc(&self.metrics.store_errors);
                }
                r
            }
            None => Ok(()),
        }
    }

    /// Attach a new connection to the session of `client_id`, taking it
    /// over from any connection that holds it. Returns the session and
    /// whether it existed before (Session Present), or `Err` when the
    /// session belongs to another principal: a client id is not a key that
    /// lets one identity take over (or resume) another's session.
    pub fn attach(
        &self,
        client_id: &str,
        clean_start: bool,
        protocol: Protocol,
        conn_id: u64,
        waker: Arc<crate::signal::Signal>,
        identity: Arc<ClientIdentity>,
    ) -> Result<(Arc<Session>, bool), ()> {
        let mut sessions = self.sessions.lock();
        if let Some(existing) = sessions.get(client_id).cloned() {
            {
                let mut st = existing.state.lock();
                if st
                    .owner
                    .as_ref()
                    .is_some_and(|o| !same_principal(o, &identity))
                {
                    return Err(());
                }
                if let Some(old) = crate::protocol::take_over(&mut st) {
                    old.waker.notify();
                    Metrics::inc(&self.metrics.sessions_taken_over);
                }
                if !clean_start {
                    st.conn = Some(ConnLink {
                        conn_id,
                        waker: waker.clone(),
                        identity: identity.clone(),
                    });
                    st.protocol = protocol;
                    st.generation = st.generation.wrapping_add(1);
                    st.disconnected_at = None;
                    st.owner = Some(identity);
                    existing.set_online(true);
                    self.claim(client_id);
                    return Ok((existing.clone(), true));
                }
            }
            sessions.remove(client_id);
            drop(sessions);
            self.end_session(&existing);
            sessions = self.sessions.lock();
        }
        let session = Arc::new(Session::new(self.next_id(), client_id.into(), protocol));
        {
            let mut st = session.state.lock();
            st.owner = Some(identity.clone());
            st.conn = Some(ConnLink {
                conn_id,
                waker,
                identity,
            });
            st.generation = 1;
        }
        session.set_online(true);
        sessions.insert(session.client_id.clone(), session.clone());
        self.claim(client_id);
        Ok((session, false))
    }

    /// Tell the other nodes that `client_id` connected here.
    fn claim(&self, client_id: &str) {
        if self.clustered.load(Ordering::Acquire) {
            if let Some(link) = self.cluster.read().as_ref() {
                link.claimed(client_id);
            }
        }
    }

    /// End a session for good (its device was deleted): the connection is
    /// dropped with 0x98 and subscriptions and queued messages are discarded.
    pub fn discard_session(&self, client_id: &str) -> bool {
        let Some(session) = self.sessions.lock().get(client_id).cloned() else {
            return false;
        };
        {
            let mut st = session.state.lock();
            if let Some(old) = st.conn.take() {
                st.kicked = Some((old.conn_id, mqtt_codec::reason::ADMINISTRATIVE_ACTION));
                old.waker.notify();
            }
        }
        session.set_online(false);
        self.end_session(&session);
        true
    }

    /// Discard a session: its subscriptions, queue and stored state. Shared
    /// subscription messages it will never acknowledge go to other members.
    pub fn end_session(&self, session: &Arc<Session>) {
        let (filters, handover, persistent) = {
            let mut st = session.state.lock();
            if st.ended {
                return;
            }
            st.ended = true;
            let filters: Vec<String> = std::mem::take(&mut st.subscriptions).into_keys().collect();
            let mut handover: Vec<Outgoing> =
                st.queue.drain(..).filter(|o| o.share.is_some()).collect();
            let inflight = st.inflight.take();
            handover.extend(
                inflight
                    .into_values()
                    .filter(|f| {
                        f.out.share.is_some() && f.stage == crate::session::Stage::Published
                    })
                    .map(|f| f.out),
            );
            (filters, handover, st.persistent)
        };
        {
            let mut tree = self.tree.write();
            for f in &filters {
                tree.unsubscribe(f, session.id);
            }
            self.interest_changed(&mut tree);
        }
        {
            let mut sessions = self.sessions.lock();
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.client_id);
            }
        }
        if persistent {
            self.submit(vec![Op::SessionDelete {
                client_id: session.client_id.to_string(),
            }]);
        }
        self.hand_over_shared(session.id, handover);
    }

    /// Give shared-subscription messages that `from` will not acknowledge to
    /// another online member of the same group.
    pub fn hand_over_shared(&self, from: u64, messages: Vec<Outgoing>) {
        if messages.is_empty() {
            return;
        }
        let mut ops = Vec::new();
        for mut out in messages {
            let Some(group) = out.share.clone() else {
                continue;
            };
            let member = self.tree.read().pick_shared_member(&group, from);
            if let Some(m) = member {
                out.seq = None;
                out.qos = out.qos.min(m.options.qos);
                out.sub_ids = m.sub_id.into_iter().collect();
                let mut stored = None;
                self.enqueue(&m.session, out, &mut ops, &mut stored);
            }
        }
        self.submit(ops);
    }

    /// Register a subscription in the index. Returns whether it is new, or
    /// `None` if it is new and the session already holds `limit`
    /// subscriptions (0 = unlimited; replacing an existing one is allowed).
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        options: SubscriptionOptions,
        sub_id: Option<u32>,
        limit: usize,
    ) -> Option<bool> {
        {
            let mut st = session.state.lock();
            if st.ended {
                return Some(false);
            }
            if limit > 0
                && st.subscriptions.len() >= limit
                && !st.subscriptions.contains_key(filter)
            {
                return None;
            }
            st.subscriptions
                .insert(filter.to_string(), SubscriptionRecord { options, sub_id });
        }
        let mut tree = self.tree.write();
        let new = tree.subscribe(
            filter,
            Subscriber {
                session: session.clone(),
                options,
                sub_id,
            },
        );
        self.interest_changed(&mut tree);
        Some(new)
    }

    pub fn unsubscribe(&self, session: &Arc<Session>, filter: &str) -> bool {
        let existed = session.state.lock().subscriptions.remove(filter).is_some();
        let in_tree = {
            let mut tree = self.tree.write();
            let removed = tree.unsubscribe(filter, session.id);
            self.interest_changed(&mut tree);
            removed
        };
        existed || in_tree
    }

    /// After subscriptions were removed: drop the session's queued messages
    /// (routed, not yet sent) that no remaining subscription wants, so that
    /// nothing on a topic the client left reaches it after UNSUBACK. MQTT 5
    /// §3.10.4 lets a server deliver such buffered messages or not; a client
    /// that left a busy topic would otherwise still get up to a whole queue
    /// of it. Messages in flight (sending started) are completed as the
    /// specification requires. Returns how many were dropped.
    pub fn drop_unwanted_queued(&self, session: &Session) -> usize {
        let mut forget = Vec::new();
        let dropped = {
            let mut st = session.state.lock();
            let crate::session::SessionState {
                queue,
                subscriptions,
                ..
            } = &mut *st;
            let before = queue.len();
            queue.retain(|o| {
                let wanted = match &o.share {
                    // Routed through `$share/{group}/{filter}` ("group/filter").
                    Some(g) => subscriptions.contains_key(&format!("$share/{g}")),
                    None => subscriptions.keys().any(|f| {
                        mqtt_codec::topic::parse_shared(f).is_none()
                            && mqtt_codec::topic::matches(f, &o.msg.topic)
                    }),
                };
                if !wanted {
                    forget.extend(o.seq);
                }
                wanted
            });
            before - queue.len()
        };
        if !forget.is_empty() {
            self.submit(
                forget
                    .into_iter()
                    .map(|seq| Op::Ack {
                        client_id: session.client_id.to_string(),
                        seq,
                    })
                    .collect(),
            );
        }
        dropped
    }

    /// Write a persistent session's metadata and subscriptions.
    pub fn session_put_op(&self, session: &Session) -> Option<Op> {
        self.store.as_ref()?;
        let st = session.state.lock();
        if !st.persistent {
            return None;
        }
        Some(Op::SessionPut(persist::session_record(
            &session.client_id,
            &st,
        )))
    }

    /// Remove offline sessions whose expiry interval has elapsed.
    pub fn expire_sessions(&self, now: Instant) {
        let expired: Vec<Arc<Session>> = {
            let sessions = self.sessions.lock();
            sessions
                .values()
                .filter(|s| {
                    let st = s.state.lock();
                    st.conn.is_none()
                        && crate::protocol::lifetime::is_expired(
                            st.disconnected_at,
                            st.expiry_interval,
                            now,
                        )
                })
                .cloned()
                .collect()
        };
        for s in expired {
            tracing::debug!(client_id = %s.client_id, "session expired");
            Metrics::inc(&self.metrics.sessions_expired);
            self.end_session(&s);
        }
    }

    /// Rebuild retained messages and offline persistent sessions from the
    /// store after a restart.
    fn recover(self: &Arc<Self>, rec: m2mhub_broker_log::Recovered) {
        let now = Instant::now();
        let now_ms = persist::unix_ms_now();
        self.seq.store(rec.next_seq.max(1), Ordering::Relaxed);
        {
            let mut retained = self.retained.write();
            for m in &rec.retained {
                let msg = persist::from_stored(m, now, now_ms);
                if !msg.is_expired(now) {
                    retained.set(&m.topic, Some(Arc::new(msg)));
                }
            }
        }
        let mut restored = 0usize;
        for rs in rec.sessions {
            let queue = rs
                .queue
                .iter()
                .map(|(seq, m)| (*seq, Arc::new(persist::from_stored(m, now, now_ms))));
            self.restore_session(&rs.session, queue, now, now_ms);
            restored += 1;
        }
        tracing::info!(
            retained = rec.retained.len(),
            sessions = restored,
            "recovered broker state"
        );
    }

    /// Rebuild one offline persistent session: its subscriptions (in the
    /// index) and its queue (`(store seq, message)`, oldest first).
    pub(crate) fn restore_session(
        &self,
        s: &m2mhub_broker_log::StoredSession,
        queue: impl Iterator<Item = (u64, Arc<Message>)>,
        now: Instant,
        now_ms: u64,
    ) -> Arc<Session> {
        {
            let protocol = if s.protocol_v5 {
                Protocol::V5
            } else {
                Protocol::V311
            };
            let session = Arc::new(Session::new(
                self.next_id(),
                s.client_id.as_str().into(),
                protocol,
            ));
            {
                let mut st = session.state.lock();
                st.persistent = true;
                st.expiry_interval = s.expiry_interval;
                st.disconnected_at = Some(
                    s.disconnected_at_ms
                        .map(|ms| persist::unix_ms_to_instant(ms, now, now_ms))
                        .unwrap_or(now),
                );
            }
            let subs: Vec<(String, SubscriptionOptions, Option<u32>)> = s
                .subscriptions
                .iter()
                .filter_map(|sub| match SubscriptionOptions::from_byte(sub.options) {
                    Some(o) => Some((sub.filter.clone(), o, sub.subscription_id)),
                    None => {
                        tracing::warn!(client_id = %s.client_id, filter = %sub.filter, "skipping a stored subscription with invalid options");
                        None
                    }
                })
                .collect();
            {
                let mut st = session.state.lock();
                for (seq, msg) in queue {
                    st.queue.push_back(redelivery(msg, &subs, seq));
                }
            }
            for (filter, options, sub_id) in &subs {
                self.subscribe(&session, filter, *options, *sub_id, 0);
            }
            self.sessions
                .lock()
                .insert(session.client_id.clone(), session.clone());
            session
        }
    }
}

/// Rebuild the per-subscriber form of a stored queued message from the
/// session's own subscriptions: the store keeps one copy of a message for
/// all sessions, so granted QoS, retain-as-published and subscription
/// identifiers are derived again, exactly as routing derived them.
fn redelivery(
    msg: Arc<Message>,
    subs: &[(String, SubscriptionOptions, Option<u32>)],
    seq: u64,
) -> Outgoing {
    let mut qos = None;
    let mut retain = false;
    let mut sub_ids = Vec::new();
    let mut share = None;
    for (filter, o, id) in subs {
        let (group, inner) = match mqtt_codec::topic::parse_shared(filter) {
            Some(Ok((g, f))) => (Some(g), f),
            _ => (None, filter.as_str()),
        };
        if !mqtt_codec::topic::matches(inner, &msg.topic) {
            continue;
        }
        qos = Some(qos.map_or(o.qos, |q: QoS| q.max(o.qos)));
        retain |= o.retain_as_published && msg.retain;
        sub_ids.extend(*id);
        if let Some(g) = group {
            share = Some(Arc::from(format!("{g}/{inner}")));
        }
    }
    Outgoing {
        // A message no longer matching any subscription keeps its own QoS:
        // it was accepted for this session and is still owed.
        qos: qos.map_or(msg.qos, |q| q.min(msg.qos)),
        retain,
        msg,
        sub_ids,
        seq: Some(seq),
        share,
    }
}

/// Whether two identities are the same principal (for session ownership).
fn same_principal(a: &ClientIdentity, b: &ClientIdentity) -> bool {
    a.device_id == b.device_id
        && a.tenant == b.tenant
        && a.claim.is_some() == b.claim.is_some()
        && a.username == b.username
}

/// Where the broker keeps its files inside the data directory.
pub fn store_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("broker")
}
