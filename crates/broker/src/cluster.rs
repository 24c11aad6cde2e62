//! The seam between the broker and a cluster fabric (`crates/cluster`
//! implements it over NATS). The broker stays one node's broker: it tells
//! the link what this node publishes and subscribes to, and takes in what
//! other nodes publish through [`crate::Broker::route_remote`].
//!
//! What crosses the seam:
//! - every message published on this node (by a client, a will or the
//!   platform; `$SYS` stays local) is handed to [`ClusterLink::forward`]
//!   after local routing;
//! - the node's *interest*: when a filter gains its first subscriber here
//!   or loses its last, [`ClusterLink::interest`] is told (called under the
//!   subscription index's write lock, so the changes arrive in order; it
//!   must not block);
//! - a client id connecting here: [`ClusterLink::claimed`], so that the
//!   node holding its session lets it go (takeover across nodes);
//! - persistent sessions: every record the broker writes to its own log is
//!   also given to [`ClusterLink::session_saved`] / `session_ended`, and a
//!   client resuming a session this node does not hold is first offered to
//!   [`ClusterLink::restore`] (its subscriptions and the messages it missed,
//!   from wherever the cluster keeps them).
//!
//! A QoS 1/2 message's publisher is acknowledged once the fabric holds the
//! message durably: [`ClusterLink::forward`] returns that gate.
//!
//! Platform subscriptions ([`crate::Broker::subscribe_internal`],
//! observers) are not interest: the platform on each node processes what
//! entered that node, so a reading is stored once. The one exception is an
//! observer's remote filters ([`crate::Broker::set_observed_remote`]):
//! the rules a node evaluates for the whole cluster, announced as
//! [`Interest::platform`].

use crate::message::Message;
use std::sync::Arc;

/// A filter this node subscribes to, plainly or through a shared group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interest {
    /// The topic filter without any `$share/{group}/` prefix.
    pub filter: String,
    /// The shared subscription's group, if any.
    pub group: Option<String>,
    /// Wanted by the platform (an observer's remote filter), not by a
    /// client: kept apart from a client's interest in the same filter, so
    /// either can end without ending the other.
    pub platform: bool,
}

impl Interest {
    pub fn new(group: Option<&str>, filter: &str) -> Interest {
        Interest {
            filter: filter.to_string(),
            group: group.map(str::to_string),
            platform: false,
        }
    }

    /// An observer's remote filter.
    pub fn platform(filter: &str) -> Interest {
        Interest {
            filter: filter.to_string(),
            group: None,
            platform: true,
        }
    }

    /// The key the subscription index uses for a shared group:
    /// `{group}/{filter}`.
    pub fn group_key(&self) -> Option<String> {
        self.group.as_ref().map(|g| format!("{g}/{}", self.filter))
    }
}

/// A cluster fabric. Every method is called on the broker's hot paths or
/// under its locks: queue the work and return.
pub trait ClusterLink: Send + Sync + 'static {
    /// A message published on this node, after local routing. `Some(gate)`
    /// (QoS 1/2): resolves once the fabric holds it durably.
    fn forward(&self, msg: &Arc<Message>) -> Option<crate::events::AckGate>;
    /// This node's interest in a filter began (`true`) or ended.
    fn interest(&self, interest: &Interest, on: bool);
    /// A client with this id connected to this node.
    fn claimed(&self, client_id: &str);
    /// `Some(f)` while interest changes are on their way to the fabric: `f`
    /// resolves once they, and all before them, are in effect there.
    fn settled(&self) -> Option<SettledFuture> {
        None
    }
    /// A persistent session's record (metadata and subscriptions) changed.
    fn session_saved(&self, _session: &StoredSession) {}
    /// A persistent session ended here (expired, cleaned, or released).
    fn session_ended(&self, _client_id: &str) {}
    /// A client resumes a session this node does not hold: `Some(f)` looks
    /// for it in the cluster; `f` yields the session and the QoS 1/2
    /// messages it is owed, oldest first, or `None`.
    fn restore(&self, _client_id: &str) -> Option<RestoreFuture> {
        None
    }
    /// An operator's action on a client that every node must apply (the
    /// client may be connected anywhere); see [`Broker::apply_admin`].
    fn admin(&self, _action: &AdminAction) {}
}

/// What [`ClusterLink::admin`] carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    /// Close the client's connection with this DISCONNECT reason.
    Kick { client_id: String, reason: u8 },
    /// End the client's session for good (its device was deleted).
    Discard { client_id: String },
}

/// A session found in the cluster and the messages it is owed.
pub type Restored = (StoredSession, Vec<Arc<Message>>);

/// See [`ClusterLink::restore`].
pub type RestoreFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Restored>> + Send>>;

/// See [`ClusterLink::settled`].
pub type SettledFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

use crate::session::{Outgoing, Session};
use crate::{persist, Broker};
use m2mhub_broker_log::{Op, StoredSession};
use std::sync::atomic::Ordering;
use tokio::time::Instant;

impl crate::broker::Inner {
    fn link(&self) -> Option<Arc<dyn ClusterLink>> {
        if !self.clustered.load(Ordering::Acquire) {
            return None;
        }
        self.cluster.read().clone()
    }

    /// See [`ClusterLink::settled`]; `None` on a single node.
    pub(crate) fn cluster_settled(&self) -> Option<SettledFuture> {
        self.link()?.settled()
    }

    pub(crate) fn admin_to_cluster(&self, action: &AdminAction) {
        if let Some(link) = self.link() {
            link.admin(action);
        }
    }

    /// Hand the session records among `ops` to the cluster.
    pub(crate) fn sessions_to_cluster(&self, ops: &[Op]) {
        let Some(link) = self.link() else { return };
        for op in ops {
            match op {
                Op::SessionPut(s) => link.session_saved(s),
                Op::SessionDelete { client_id } => link.session_ended(client_id),
                _ => {}
            }
        }
    }

    /// A CONNECT resuming `client_id`'s session on this node: when this
    /// node does not hold it, ask the cluster and adopt what it returns
    /// (as an offline session, which the CONNECT then attaches to).
    pub(crate) async fn restore_from_cluster(&self, client_id: &str, wait: std::time::Duration) {
        if self.sessions.lock().contains_key(client_id) {
            return;
        }
        let Some(f) = self.link().and_then(|l| l.restore(client_id)) else {
            return;
        };
        let Ok(Some((record, messages))) = tokio::time::timeout(wait, f).await else {
            return;
        };
        if record.client_id != client_id || self.sessions.lock().contains_key(client_id) {
            return;
        }
        let now = Instant::now();
        let now_ms = persist::unix_ms_now();
        let mut ops = Vec::new();
        let queue: Vec<(u64, Arc<Message>)> = messages
            .into_iter()
            .filter(|m| !m.is_expired(now))
            .map(|m| {
                let seq = self.next_seq();
                (seq, m)
            })
            .collect();
        if self.store.is_some() {
            for (seq, m) in &queue {
                ops.push(Op::Enqueue {
                    client_id: client_id.to_string(),
                    seq: *seq,
                    msg: persist::to_stored(m),
                });
            }
        }
        let adopted = queue.len();
        let session: Arc<Session> = self.restore_session(&record, queue.into_iter(), now, now_ms);
        if let Some(op) = self.session_put_op(&session) {
            ops.push(op);
        }
        self.submit(ops);
        tracing::info!(
            client_id,
            messages = adopted,
            "resumed a session from the cluster"
        );
    }
}

/// The broker's side of the seam: what the cluster link calls.
impl Broker {
    /// Join a cluster: from now on this node's publishes, interest and
    /// client ids go to `link`, and shared groups are served through it.
    /// Returns what this node subscribes to already (e.g. recovered
    /// persistent sessions), for the link to announce.
    pub fn set_cluster_link(&self, link: Arc<dyn ClusterLink>) -> Vec<Interest> {
        let mut tree = self.inner.tree.write();
        let mut current = tree.track_interest();
        for s in self.inner.internal.read().iter() {
            current.extend(s.remote.iter().map(|f| Interest::platform(f)));
        }
        *self.inner.cluster.write() = Some(link);
        self.inner.clustered.store(true, Ordering::Release);
        current
    }

    /// Route a message another node published to this node's sessions.
    /// `group` is `Some("{group}/{filter}")` when the fabric picked this
    /// node for a shared group: then one member of that group gets it and
    /// no one else. Platform subscriptions and the retained store are left
    /// alone (the platform handles a message on the node it entered;
    /// retained messages arrive through [`Broker::set_retained_remote`]),
    /// except observers whose remote filters match
    /// ([`Broker::set_observed_remote`]), which get it once.
    /// Returns the number of sessions it was queued for.
    pub fn route_remote(&self, msg: Arc<Message>, group: Option<&str>) -> usize {
        let inner = &self.inner;
        let mut ops = Vec::new();
        let mut stored = None;
        let mut queued = 0;
        match group {
            None => {
                let mut deliveries = Vec::new();
                inner
                    .tree
                    .read()
                    .matches(&msg.topic, 0, false, &mut deliveries);
                for d in deliveries {
                    let out = Outgoing {
                        msg: msg.clone(),
                        qos: d.qos.min(msg.qos),
                        retain: d.retain_as_published && msg.retain,
                        sub_ids: d.sub_ids,
                        seq: None,
                        share: None,
                    };
                    queued += usize::from(inner.enqueue(&d.session, out, &mut ops, &mut stored));
                }
                if inner.has_internal.load(Ordering::Acquire) {
                    inner.deliver_remote_observers(&msg);
                }
            }
            Some(key) => {
                let member = inner.tree.read().pick_for_group(key);
                if let Some(m) = member {
                    let out = Outgoing {
                        msg: msg.clone(),
                        qos: m.options.qos.min(msg.qos),
                        retain: m.options.retain_as_published && msg.retain,
                        sub_ids: m.sub_id.into_iter().collect(),
                        seq: None,
                        share: Some(key.into()),
                    };
                    queued += usize::from(inner.enqueue(&m.session, out, &mut ops, &mut stored));
                }
            }
        }
        inner.submit(ops);
        queued
    }

    /// Set (Some) or clear (None) a retained message decided by the
    /// cluster (the cluster-wide retained store is the authority).
    pub fn set_retained_remote(&self, topic: &str, msg: Option<Arc<Message>>) {
        let inner = &self.inner;
        if !inner.config.retain_available {
            return;
        }
        let persist = inner.store.is_some() && !topic.starts_with("$SYS");
        match msg {
            None => {
                inner.retained.write().set(topic, None);
                if persist {
                    inner.submit(vec![Op::RetainDelete {
                        topic: topic.to_string(),
                    }]);
                }
            }
            Some(m) => {
                if persist {
                    inner.submit(vec![Op::RetainPut(persist::to_stored(&m))]);
                }
                inner.retained.write().set(topic, Some(m));
            }
        }
    }

    /// This node's retained messages (`$SYS` excluded, expired ones too).
    pub fn retained_messages(&self) -> Vec<Arc<Message>> {
        let mut all = Vec::new();
        self.inner
            .retained
            .read()
            .matching("#", Instant::now(), &mut all);
        all
    }

    /// The topics of this node's retained messages (`$SYS` excluded).
    pub fn retained_topics(&self) -> Vec<String> {
        self.retained_messages()
            .iter()
            .map(|m| m.topic.clone())
            .collect()
    }

    /// Apply an operator's action another node announced, here only.
    pub fn apply_admin(&self, action: &AdminAction) -> bool {
        match action {
            AdminAction::Kick { client_id, reason } => self.kick_here(client_id, *reason),
            AdminAction::Discard { client_id } => self.inner.discard_session(client_id),
        }
    }

    /// `client_id` connected to another node: close its connection here
    /// (DISCONNECT 0x8E, session taken over) and end its session here.
    /// Returns whether this node held a session for it.
    pub fn release_claimed(&self, client_id: &str) -> bool {
        let Some(session) = self.inner.sessions.lock().get(client_id).cloned() else {
            return false;
        };
        {
            let mut st = session.state.lock();
            if let Some(old) = st.conn.take() {
                st.kicked = Some((old.conn_id, mqtt_codec::reason::SESSION_TAKEN_OVER));
                old.waker.notify();
            }
        }
        session.set_online(false);
        crate::metrics::Metrics::inc(&self.inner.metrics.sessions_taken_over);
        self.inner.end_session(&session);
        true
    }
}
