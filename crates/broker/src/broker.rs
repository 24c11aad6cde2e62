//! The broker's shared state and the routing of one message to its
//! subscribers. Connections (see `connection.rs`) call in here; nothing in
//! this file does I/O except through the persistent store.

use crate::auth::{Authenticator, Authorizer};
use crate::config::BrokerConfig;
use crate::message::Message;
use crate::metrics::{Gauges, Metrics};
use crate::persist;
use crate::retained::RetainedStore;
use crate::session::{ConnLink, Outgoing, Session, SubscriptionRecord};
use crate::topic_tree::{Delivery, Subscriber, TopicTree};
use bytes::Bytes;
use m2mhub_store::{Durability, Op, Store, StoreError, StoreOptions, StoredMessage};
use mqtt_codec::{Protocol, PublishProperties, QoS, SubscriptionOptions};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
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
    pub tree: RwLock<TopicTree>,
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
    pub connections_closed: Notify,
    pub shutdown: watch::Sender<bool>,
    /// Set when shutdown begins; connections check it when signalled.
    pub shutting_down: std::sync::atomic::AtomicBool,
    pub started: Instant,
}

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
        let inner = Arc::new(Inner {
            config: parts.config,
            tree: RwLock::new(TopicTree::default()),
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
            connections_closed: Notify::new(),
            shutdown,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
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
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                inner.expire_sessions(Instant::now());
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
        for s in self.inner.sessions.lock().values() {
            s.state.lock().wake();
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

    /// Publish a message from the platform itself (no authorization).
    pub async fn publish(&self, topic: &str, payload: Bytes, qos: QoS, retain: bool) {
        let msg = Arc::new(Message {
            topic: topic.to_string(),
            payload,
            qos,
            retain,
            properties: PublishProperties::default(),
            expires_at: None,
            publisher: 0,
        });
        let mut scratch = Vec::new();
        let mut ops = Vec::new();
        self.inner.publish(&msg, &mut scratch, &mut ops);
        if !ops.is_empty() {
            if let Some(store) = &self.inner.store {
                if let Err(e) = store.commit(ops).await {
                    Metrics::inc(&self.inner.metrics.store_errors);
                    tracing::error!(error = %e, "storing an internal publish failed");
                }
            }
        }
    }
}

impl Inner {
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            connections: self.connections.load(Ordering::Relaxed),
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
        self.tree.read().matches(&msg.topic, msg.publisher, scratch);
        let n = scratch.len();
        for d in scratch.drain(..) {
            let qos = d.qos.min(msg.qos);
            let out = Outgoing {
                msg: msg.clone(),
                qos,
                retain: d.retain_as_published && msg.retain,
                sub_ids: d.sub_ids,
                seq: None,
                share: d.share,
            };
            self.enqueue(&d.session, out, ops, &mut stored);
        }
        n
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
        st.wake();
        true
    }

    /// Submit store operations without waiting (acks, metadata).
    pub fn submit(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        if let Some(store) = &self.store {
            store.submit(ops);
        }
    }

    /// Wait until store operations are durable.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
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
    /// whether it existed before (Session Present).
    pub fn attach(
        &self,
        client_id: &str,
        clean_start: bool,
        protocol: Protocol,
        conn_id: u64,
        waker: Arc<crate::signal::Signal>,
    ) -> (Arc<Session>, bool) {
        let mut sessions = self.sessions.lock();
        if let Some(existing) = sessions.get(client_id).cloned() {
            {
                let mut st = existing.state.lock();
                if let Some(old) = st.conn.take() {
                    st.kicked = Some((old.conn_id, mqtt_codec::reason::SESSION_TAKEN_OVER));
                    old.waker.notify();
                    Metrics::inc(&self.metrics.sessions_taken_over);
                }
                if !clean_start {
                    st.conn = Some(ConnLink {
                        conn_id,
                        waker: waker.clone(),
                    });
                    st.protocol = protocol;
                    st.generation += 1;
                    st.disconnected_at = None;
                    existing.set_online(true);
                    return (existing.clone(), true);
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
            st.conn = Some(ConnLink { conn_id, waker });
            st.generation = 1;
        }
        session.set_online(true);
        sessions.insert(session.client_id.clone(), session.clone());
        (session, false)
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
            let inflight = std::mem::take(&mut st.inflight);
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

    /// Register a subscription in the index. Returns true if it is new.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        options: SubscriptionOptions,
        sub_id: Option<u32>,
    ) -> bool {
        {
            let mut st = session.state.lock();
            if st.ended {
                return false;
            }
            st.subscriptions
                .insert(filter.to_string(), SubscriptionRecord { options, sub_id });
        }
        self.tree.write().subscribe(
            filter,
            Subscriber {
                session: session.clone(),
                options,
                sub_id,
            },
        )
    }

    pub fn unsubscribe(&self, session: &Arc<Session>, filter: &str) -> bool {
        let existed = session.state.lock().subscriptions.remove(filter).is_some();
        let in_tree = self.tree.write().unsubscribe(filter, session.id);
        existed || in_tree
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
                        && st.expiry_interval != u32::MAX
                        && st.disconnected_at.is_some_and(|t| {
                            now.duration_since(t)
                                >= Duration::from_secs(u64::from(st.expiry_interval))
                        })
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
    fn recover(self: &Arc<Self>, rec: m2mhub_store::Recovered) {
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
            let s = &rs.session;
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
                for (seq, m) in &rs.queue {
                    let msg = Arc::new(persist::from_stored(m, now, now_ms));
                    st.queue.push_back(redelivery(msg, &subs, *seq));
                }
            }
            for (filter, options, sub_id) in &subs {
                self.subscribe(&session, filter, *options, *sub_id);
            }
            self.sessions
                .lock()
                .insert(session.client_id.clone(), session);
            restored += 1;
        }
        tracing::info!(
            retained = rec.retained.len(),
            sessions = restored,
            "recovered broker state"
        );
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

/// Where the broker keeps its files inside the data directory.
pub fn store_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("broker")
}
