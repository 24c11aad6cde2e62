//! m2mhub nodes as one platform, over NATS.
//!
//! Each node keeps its own broker (sessions, subscription index, routing on
//! its cores) and joins the others through a NATS server or cluster with
//! JetStream; no consensus or replication is written here.
//!
//! Every subject and bucket starts with the cluster's name (`m2mhub` by
//! default), so several clusters can share one NATS system.
//!
//! - **Routing with interest propagation.** A message published on a node
//!   goes out on the subject of its topic (`{cluster}.t.{levels}`,
//!   [`subject`]); a node subscribes
//!   to the subjects of the filters its clients subscribe to, so NATS hands
//!   a message only to the nodes that want it. A node routes what it
//!   receives through its own index (exact MQTT matching, QoS downgrade, No
//!   Local does not apply across nodes). Overlapping filters make NATS
//!   deliver one message once per matching subscription: the receiver
//!   drops repeats by the message's cluster-wide id ([`dedupe`]).
//! - **Shared subscriptions** become NATS queue groups (one per
//!   `$share/{group}/{filter}`, on a second connection), so each message
//!   goes to one member node, which picks one of its members; the publishing
//!   node's own members take part through the same queue group.
//! - **Retained messages** live in the JetStream key-value bucket
//!   `{cluster}_retained` (key: the encoded topic, value: the message's
//!   [`frame`]). Every node watches it and mirrors it into its local
//!   retained store, so a SUBSCRIBE on any node gets the same retained
//!   messages.
//! - **Takeover across nodes.** A node accepting a client id announces it on
//!   `{cluster}.claim` with the time; the node holding a session for that id
//!   closes it with DISCONNECT 0x8E and ends it there, unless the client
//!   connected there again after the claim was made (the newest wins).
//! - **Membership.** Each node writes its load to the bucket `{cluster}_nodes`
//!   every two seconds (entries expire after ten), which `/api/v1/cluster`
//!   lists.
//!
//! - **QoS 1/2 and persistent sessions** ([`sessions`]): QoS 1/2 messages
//!   go through the JetStream stream `{cluster}_msgs` (the publisher is
//!   acknowledged once it holds them), persistent sessions' records live in
//!   the bucket `{cluster}_sessions`, and a node resuming a session it does
//!   not hold rebuilds it from both.
//! - **OTA**: firmware images in the object store `{cluster}_ota`
//!   ([`Cluster::put_image`]), and which devices are connected anywhere
//!   ([`presence`]), for the node driving a campaign.
#![forbid(unsafe_code)]

pub mod dedupe;
pub mod frame;
pub mod fuzz;
mod images;
pub mod leases;
pub mod presence;
pub mod sessions;
pub mod subject;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use m2mhub_broker::cluster::{AdminAction, ClusterLink, Interest};
use m2mhub_broker::message::Message;
use m2mhub_broker::Broker;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often a node writes its entry in the nodes bucket, and how long an
/// entry lives without being rewritten.
const HEARTBEAT: Duration = Duration::from_secs(2);
const NODE_TTL: Duration = Duration::from_secs(10);
/// How long a node remembers when a client id connected to it, to tell a
/// stale claim (sent before that) from a new one. Far above the time a
/// claim takes to cross NATS; nodes' clocks must agree better than this.
const CLAIM_WINDOW: Duration = Duration::from_secs(30);
/// Whether `s` may name a cluster or a node: at most `max` letters, digits,
/// `-` and `_` (it becomes part of NATS subjects and bucket names).
pub fn is_token(s: &str, max: usize) -> bool {
    s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Reacts to another node's change of shared metadata.
pub type ChangeListener = Arc<dyn Fn(&str) + Send + Sync>;

/// Changes announced within this window are applied once.
pub const CHANGE_DEBOUNCE: Duration = Duration::from_millis(200);

/// `kick {reason} {client id}` or `discard {client id}`.
fn encode_admin(a: &AdminAction) -> String {
    match a {
        AdminAction::Kick { client_id, reason } => format!("kick {reason} {client_id}"),
        AdminAction::Discard { client_id } => format!("discard {client_id}"),
    }
}

fn decode_admin(s: &str) -> Option<AdminAction> {
    let (verb, rest) = s.split_once(' ')?;
    match verb {
        "kick" => {
            let (reason, client_id) = rest.split_once(' ')?;
            Some(AdminAction::Kick {
                client_id: client_id.to_string(),
                reason: reason.parse().ok()?,
            })
        }
        "discard" => Some(AdminAction::Discard {
            client_id: rest.to_string(),
        }),
        _ => None,
    }
}

/// Listen for other nodes' operator actions (applied here at once) and
/// metadata changes (handed to the listener, debounced per kind).
async fn spawn_notices(
    nats: &async_nats::Client,
    name: &str,
    broker: Broker,
    listener: Arc<Mutex<Option<ChangeListener>>>,
) -> Result<JoinHandle<()>, ClusterError> {
    let mut admin = nats
        .subscribe(format!("{name}.admin"))
        .await
        .map_err(|e| ClusterError::Nats(e.to_string()))?;
    let mut changes = nats
        .subscribe(format!("{name}.changed"))
        .await
        .map_err(|e| ClusterError::Nats(e.to_string()))?;
    Ok(tokio::spawn(async move {
        let mut pending: HashSet<String> = HashSet::new();
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let wait = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = admin.next() => {
                    let Some(m) = m else { return };
                    match std::str::from_utf8(&m.payload).ok().and_then(decode_admin) {
                        Some(action) => {
                            broker.apply_admin(&action);
                        }
                        None => tracing::warn!("ignoring a malformed operator action from the cluster"),
                    }
                }
                m = changes.next() => {
                    let Some(m) = m else { return };
                    if let Ok(what) = std::str::from_utf8(&m.payload) {
                        pending.insert(what.to_string());
                        due.get_or_insert_with(|| tokio::time::Instant::now() + CHANGE_DEBOUNCE);
                    }
                }
                _ = wait => {
                    due = None;
                    let l = listener.lock().clone();
                    for what in pending.drain() {
                        if let Some(l) = &l {
                            l(&what);
                        }
                    }
                }
            }
        }
    }))
}

/// How often drained sessions' floors are looked at, and how old a floor
/// gets before it is moved (bounds both the bucket's writes and what a
/// resumed session may receive twice).
const FLOOR_SWEEP: Duration = Duration::from_secs(5);
const FLOOR_STEP: Duration = Duration::from_secs(30);
/// QoS 0 messages waiting to be forwarded; beyond this they are dropped
/// and counted (at most once: a QoS 0 publisher never waits for the
/// fabric). QoS 1/2 messages are never dropped for a slow fabric: their
/// PUBACK/PUBREC waits until JetStream has them, which holds each publisher
/// to its Receive Maximum of messages in flight and then stops its reading
/// — backpressure down to TCP. [`FORWARD_QUEUE_DURABLE`] only guards
/// against a bug.
pub const FORWARD_QUEUE: usize = 65_536;
const FORWARD_QUEUE_DURABLE: usize = 4 * 1024 * 1024;

/// Why the cluster could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {url}: {source} (is nats-server running there, with JetStream on: `nats-server -js`?)")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot open the JetStream key-value bucket {bucket}: {detail} (the NATS server needs JetStream: start it with `-js`)")]
    Bucket { bucket: String, detail: String },
    #[error("invalid cluster name {0:?}: use 1 to 32 letters, digits, - and _")]
    Name(String),
    #[error("NATS: {0}")]
    Nats(String),
}

/// How this node joins.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// The cluster's name: the prefix of its subjects and buckets, so that
    /// several clusters can share one NATS system.
    pub name: String,
    /// This node's name in the cluster (unique per node).
    pub node_id: String,
    /// What other nodes and operators see of this node's listeners.
    pub mqtt_addr: String,
    pub http_addr: String,
    /// How long the cluster keeps QoS 1/2 messages for sessions resumed on
    /// another node (the stream's age limit).
    pub queue_retention: Duration,
    /// QoS 0 messages waiting for the fabric before more are dropped
    /// ([`FORWARD_QUEUE`] by default).
    pub forward_queue: usize,
    /// TLS to the NATS servers; `None`: as the URL says (`tls://` needs
    /// TLS, trusting the system's roots).
    pub tls: Option<NatsTls>,
}

/// TLS to the NATS servers: always required when set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NatsTls {
    /// PEM file of the CA(s) that signed the servers' certificates; `None`:
    /// the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// This node's client certificate and key (PEM), for servers that
    /// verify clients (`verify: true` in nats-server's `tls` block).
    pub cert_key: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A node as the nodes bucket shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub node_id: String,
    pub version: String,
    pub mqtt: String,
    pub http: String,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub connections: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    /// Messages this node sent to / received from other nodes.
    pub forwarded: u64,
    pub received: u64,
}

/// Counters of the fabric on this node.
#[derive(Debug, Default)]
pub struct Stats {
    pub forwarded: AtomicU64,
    pub forward_dropped: AtomicU64,
    pub publish_errors: AtomicU64,
    pub received: AtomicU64,
    pub duplicates: AtomicU64,
    pub bad_frames: AtomicU64,
    pub delivered: AtomicU64,
    pub claims_sent: AtomicU64,
    pub sessions_released: AtomicU64,
    pub sessions_restored: AtomicU64,
    pub durable_errors: AtomicU64,
    pub retained_applied: AtomicU64,
}

impl Stats {
    /// `(name, help, value)` for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "forwarded",
                "messages sent to other nodes",
                v(&self.forwarded),
            ),
            (
                "forward_dropped",
                "messages not forwarded: the forward queue was full",
                v(&self.forward_dropped),
            ),
            (
                "publish_errors",
                "messages NATS refused to take",
                v(&self.publish_errors),
            ),
            (
                "received",
                "messages received from other nodes",
                v(&self.received),
            ),
            (
                "duplicates",
                "repeats of a received message dropped (overlapping filters)",
                v(&self.duplicates),
            ),
            (
                "bad_frames",
                "received frames that did not decode",
                v(&self.bad_frames),
            ),
            (
                "delivered",
                "deliveries to this node's sessions of messages from other nodes",
                v(&self.delivered),
            ),
            (
                "claims_sent",
                "client ids announced to other nodes",
                v(&self.claims_sent),
            ),
            (
                "sessions_released",
                "sessions ended here because their client connected to another node",
                v(&self.sessions_released),
            ),
            (
                "sessions_restored",
                "sessions resumed here from the cluster (record and owed messages)",
                v(&self.sessions_restored),
            ),
            (
                "durable_errors",
                "QoS 1/2 messages JetStream did not confirm (their publishers were refused)",
                v(&self.durable_errors),
            ),
            (
                "retained_applied",
                "retained messages set or cleared from the cluster's bucket",
                v(&self.retained_applied),
            ),
        ]
    }
}

/// Work for the control task, in the order the broker produced it.
enum Control {
    Interest(Interest, bool),
    Claim(String),
    /// An encoded [`AdminAction`] for the other nodes.
    Admin(String),
    /// Answered once everything before it reached the NATS server.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// What the broker calls: queues and returns.
struct Link {
    /// Interest changes sent to the control task and not yet confirmed by
    /// a barrier; SUBACKs wait only while this is above zero.
    unsettled: Arc<AtomicU64>,
    /// When each client id last connected here (wall clock, ms), kept for
    /// [`CLAIM_WINDOW`]: a claim from another node older than that is stale.
    local_claims: Arc<Mutex<HashMap<String, u64>>>,
    /// One queue for both paths, so a publisher's messages leave in order;
    /// its length is bounded per QoS by the counters below.
    forward: mpsc::UnboundedSender<Forward>,
    queued: Arc<Queued>,
    forward_limit: usize,
    control: mpsc::UnboundedSender<Control>,
    sessions: mpsc::UnboundedSender<SessionChange>,
    restore: Arc<RestoreParts>,
    stats: Arc<Stats>,
}

/// A message to forward and, for QoS 1/2, where to say when JetStream has
/// it.
type Forward = (Arc<Message>, Option<oneshot::Sender<Result<(), u8>>>);

/// Messages in the forward queue, by path.
#[derive(Default)]
struct Queued {
    fast: std::sync::atomic::AtomicUsize,
    durable: std::sync::atomic::AtomicUsize,
}

/// What resuming a session elsewhere needs.
struct RestoreParts {
    sessions: kv::Store,
    js: jetstream::Context,
    stream: String,
    durable_space: String,
}

/// A persistent session's record changed here, or it ended here.
enum SessionChange {
    Saved(m2mhub_broker_log::StoredSession),
    Ended(String),
}

impl ClusterLink for Link {
    fn forward(&self, msg: &Arc<Message>) -> Option<m2mhub_broker::AckGate> {
        let (tx, rx) = if msg.qos == mqtt_codec::QoS::AtMostOnce {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        let (count, limit) = if tx.is_none() {
            (&self.queued.fast, self.forward_limit)
        } else {
            (&self.queued.durable, FORWARD_QUEUE_DURABLE)
        };
        let full = count.fetch_add(1, Ordering::AcqRel) >= limit;
        if full || self.forward.send((msg.clone(), tx)).is_err() {
            count.fetch_sub(1, Ordering::AcqRel);
            self.stats.forward_dropped.fetch_add(1, Ordering::Relaxed);
            // QoS 0 over its bound is dropped; a QoS 1/2 publisher hears
            // "quota exceeded" only if the fabric is gone (or millions wait).
            return rx.map(|_| {
                Box::pin(async { Err(mqtt_codec::reason::QUOTA_EXCEEDED) })
                    as m2mhub_broker::AckGate
            });
        }
        rx.map(|rx| {
            Box::pin(async move {
                rx.await
                    .unwrap_or(Err(mqtt_codec::reason::UNSPECIFIED_ERROR))
            }) as m2mhub_broker::AckGate
        })
    }

    fn admin(&self, action: &AdminAction) {
        let _ = self.control.send(Control::Admin(encode_admin(action)));
    }

    fn session_saved(&self, session: &m2mhub_broker_log::StoredSession) {
        let _ = self.sessions.send(SessionChange::Saved(session.clone()));
    }

    fn session_ended(&self, client_id: &str) {
        let _ = self
            .sessions
            .send(SessionChange::Ended(client_id.to_string()));
    }

    fn restore(&self, client_id: &str) -> Option<m2mhub_broker::cluster::RestoreFuture> {
        let parts = self.restore.clone();
        let client_id = client_id.to_string();
        let stats = self.stats.clone();
        Some(Box::pin(async move {
            match sessions::restore(
                &parts.sessions,
                &parts.js,
                &parts.stream,
                &parts.durable_space,
                &client_id,
                now_ms(),
            )
            .await
            {
                Ok(found) => {
                    if found.is_some() {
                        stats.sessions_restored.fetch_add(1, Ordering::Relaxed);
                    }
                    found
                }
                Err(e) => {
                    tracing::warn!(client_id, error = %e, "cannot resume a session from the cluster");
                    None
                }
            }
        }))
    }

    fn interest(&self, interest: &Interest, on: bool) {
        self.unsettled.fetch_add(1, Ordering::AcqRel);
        let _ = self.control.send(Control::Interest(interest.clone(), on));
    }

    fn settled(&self) -> Option<m2mhub_broker::cluster::SettledFuture> {
        if self.unsettled.load(Ordering::Acquire) == 0 {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.control.send(Control::Barrier(tx)).ok()?;
        Some(Box::pin(async move {
            let _ = rx.await;
        }))
    }

    fn claimed(&self, client_id: &str) {
        let at = now_ms();
        self.local_claims.lock().insert(client_id.to_string(), at);
        let _ = self
            .control
            .send(Control::Claim(format!("{at} {client_id}")));
    }
}

/// This node's membership in a cluster. Dropping it leaves the tasks
/// running until the NATS connections close; call [`Cluster::leave`].
pub struct Cluster {
    config: ClusterConfig,
    /// Told (debounced) when another node changed shared metadata.
    on_change: Arc<Mutex<Option<ChangeListener>>>,
    started_ms: u64,
    nodes: kv::Store,
    plain: async_nats::Client,
    groups: async_nats::Client,
    stats: Arc<Stats>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The fabric's runtime (see [`Cluster::join`]).
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    images: images::Images,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.lock().take() {
            rt.shutdown_background();
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An id for this process's messages: the node id's hash mixed with the
/// start time, so a restarted node's sequence numbers never look like
/// repeats of its previous life's.
fn origin_id(node_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    h ^ nanos.rotate_left(17)
}

impl Cluster {
    /// Connect to NATS, open the buckets, mirror the cluster's retained
    /// messages, announce what this node already subscribes to, and start
    /// forwarding. Must be called inside a tokio runtime.
    ///
    /// The fabric's tasks (and the NATS clients' own) run on a runtime of
    /// their own, one thread: on a node whose cores are busy with client
    /// connections they would otherwise barely run, and messages meant for
    /// other nodes would pile up and be dropped.
    pub async fn join(broker: Broker, config: ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("m2mhub-fabric")
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Nats(format!("cannot start the fabric's thread: {e}")))?;
        let joined = rt
            .spawn(Self::join_here(broker, config))
            .await
            .map_err(|e| ClusterError::Nats(format!("joining failed: {e}")))
            .and_then(|r| r);
        match joined {
            Ok(cluster) => {
                *cluster.runtime.lock() = Some(rt);
                Ok(cluster)
            }
            Err(e) => {
                // Dropping a runtime inside another one panics: let it go
                // in the background, as `Cluster`'s own drop does.
                rt.shutdown_background();
                Err(e)
            }
        }
    }

    async fn join_here(
        broker: Broker,
        config: ClusterConfig,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let name = config.name.clone();
        if name.is_empty() || !is_token(&name, 32) {
            return Err(ClusterError::Name(name));
        }
        let (retained_bucket, nodes_bucket) = (format!("{name}_retained"), format!("{name}_nodes"));
        let (sessions_bucket, msgs_stream) = (format!("{name}_sessions"), format!("{name}_msgs"));
        let (fast_space, durable_space) = (format!("{name}.t"), format!("{name}.d"));
        let connect = |name: String, no_echo: bool| {
            let mut opts = async_nats::ConnectOptions::new()
                .name(name)
                .subscription_capacity(65_536)
                .client_capacity(65_536);
            if no_echo {
                opts = opts.no_echo();
            }
            if let Some(tls) = &config.tls {
                opts = opts.require_tls(true);
                if let Some(ca) = &tls.ca {
                    opts = opts.add_root_certificates(ca.clone());
                }
                if let Some((cert, key)) = &tls.cert_key {
                    opts = opts.add_client_certificate(cert.clone(), key.clone());
                }
            }
            let url = config.nats_url.clone();
            async move {
                opts.connect(url.as_str())
                    .await
                    .map_err(|source| ClusterError::Connect { url, source })
            }
        };
        // Plain routing and claims on a connection that does not hear its
        // own messages; queue groups on another, which must (this node's
        // shared members are in the same groups as everyone else's).
        let plain = connect(format!("m2mhub {} routing", config.node_id), true).await?;
        let groups = connect(format!("m2mhub {} shared", config.node_id), false).await?;
        let js = jetstream::new(plain.clone());
        let retained = js
            .create_or_update_key_value(kv::Config {
                bucket: retained_bucket.clone(),
                description: "m2mhub: retained MQTT messages, key = encoded topic".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket: retained_bucket,
                detail: e.to_string(),
            })?;
        let nodes = js
            .create_or_update_key_value(kv::Config {
                bucket: nodes_bucket.clone(),
                description: "m2mhub: cluster members and their load".into(),
                history: 1,
                max_age: NODE_TTL,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket: nodes_bucket,
                detail: e.to_string(),
            })?;

        let sessions_kv = js
            .create_or_update_key_value(kv::Config {
                bucket: sessions_bucket.clone(),
                description: "m2mhub: persistent MQTT sessions, key = encoded client id".into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket: sessions_bucket,
                detail: e.to_string(),
            })?;
        js.get_or_create_stream(jetstream::stream::Config {
            name: msgs_stream.clone(),
            description: Some(
                "m2mhub: QoS 1/2 messages, for sessions resumed on another node".into(),
            ),
            subjects: vec![format!("{durable_space}.>")],
            max_age: config.queue_retention,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| ClusterError::Bucket {
            bucket: msgs_stream.clone(),
            detail: e.to_string(),
        })?;

        let stats = Arc::new(Stats::default());
        let origin = origin_id(&config.node_id);
        let dedupe = Arc::new(Mutex::new(dedupe::Recent::new(8192)));
        let mut tasks = Vec::new();

        // Retained: seed an empty bucket from this node, else obey the bucket.
        sync_retained(&broker, &retained, origin, &stats).await?;
        tasks.push(tokio::spawn(watch_retained(
            broker.clone(),
            retained.clone(),
            stats.clone(),
        )));

        // Claims from other nodes.
        let claim_subject = format!("{name}.claim");
        let mut claims = plain
            .subscribe(claim_subject.clone())
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let local_claims = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
        {
            let (broker, stats, local) = (broker.clone(), stats.clone(), local_claims.clone());
            tasks.push(tokio::spawn(async move {
                let mut prune = tokio::time::interval(CLAIM_WINDOW);
                loop {
                    let m = tokio::select! {
                        m = claims.next() => match m {
                            Some(m) => m,
                            None => return,
                        },
                        _ = prune.tick() => {
                            let cutoff = now_ms().saturating_sub(CLAIM_WINDOW.as_millis() as u64);
                            local.lock().retain(|_, t| *t >= cutoff);
                            continue;
                        }
                    };
                    let Some((at, client_id)) = std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|p| p.split_once(' '))
                        .and_then(|(at, id)| Some((at.parse::<u64>().ok()?, id)))
                    else {
                        stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    // A claim that left its node before the client connected
                    // here again is stale: the newest connection wins.
                    if local.lock().get(client_id).is_some_and(|t| *t > at) {
                        continue;
                    }
                    if broker.release_claimed(client_id) {
                        stats.sessions_released.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(client_id, "session taken over by another node");
                    }
                }
            }));
        }

        let (fwd_tx, fwd_rx) = mpsc::unbounded_channel();
        let queued = Arc::new(Queued::default());
        let unsettled = Arc::new(AtomicU64::new(0));
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (sess_tx, sess_rx) = mpsc::unbounded_channel();
        tasks.push(tokio::spawn(session_loop(
            sess_rx,
            broker.clone(),
            sessions_kv.clone(),
            config.node_id.clone(),
        )));
        let current = broker.set_cluster_link(Arc::new(Link {
            sessions: sess_tx,
            restore: Arc::new(RestoreParts {
                sessions: sessions_kv,
                js: js.clone(),
                stream: msgs_stream,
                durable_space: durable_space.clone(),
            }),
            forward: fwd_tx,
            queued: queued.clone(),
            forward_limit: config.forward_queue.max(1),
            control: ctl_tx.clone(),
            stats: stats.clone(),
            local_claims,
            unsettled: unsettled.clone(),
        }));
        for i in current {
            unsettled.fetch_add(1, Ordering::AcqRel);
            let _ = ctl_tx.send(Control::Interest(i, true));
        }
        tasks.push(tokio::spawn(forward_loop(
            (fwd_rx, queued),
            plain.clone(),
            js.clone(),
            (fast_space.clone(), durable_space.clone()),
            retained,
            origin,
            stats.clone(),
        )));
        tasks.push(tokio::spawn(control_loop(
            ctl_rx,
            claim_subject,
            unsettled,
            Subscriptions {
                spaces: [fast_space, durable_space],
                cluster: name.clone(),
                broker: broker.clone(),
                plain: plain.clone(),
                groups: groups.clone(),
                dedupe,
                stats: stats.clone(),
                active: HashMap::new(),
            },
        )));

        let on_change: Arc<Mutex<Option<ChangeListener>>> = Arc::new(Mutex::new(None));
        tasks.push(spawn_notices(&plain, &name, broker.clone(), on_change.clone()).await?);
        tasks.push(presence::answer(&plain, &name, broker.clone()).await?);
        let cluster = Arc::new(Cluster {
            images: images::Images::new(js.clone(), format!("{name}_ota")),
            on_change,
            started_ms: now_ms(),
            config,
            nodes,
            plain,
            groups,
            stats,
            tasks: Mutex::new(Vec::new()),
            runtime: Mutex::new(None),
        });
        cluster.put_node_info(&broker).await;
        {
            let (c, b) = (Arc::downgrade(&cluster), broker.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(HEARTBEAT);
                loop {
                    tick.tick().await;
                    let Some(c) = c.upgrade() else { return };
                    c.put_node_info(&b).await;
                }
            }));
        }
        *cluster.tasks.lock() = tasks;
        tracing::info!(node = %cluster.config.node_id, nats = %cluster.config.nats_url, "joined the cluster");
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Tell the other nodes that shared metadata changed here (`what`: a
    /// short word such as `registry` or `rules`), so they reload it.
    pub fn changed(&self, what: &str) {
        let (nats, subject, what) = (
            self.plain.clone(),
            format!("{}.changed", self.config.name),
            what.to_string(),
        );
        tokio::spawn(async move {
            if let Err(e) = nats.publish(subject, what.into_bytes().into()).await {
                tracing::warn!(error = %e, "cannot tell the cluster about a change");
            }
        });
    }

    /// What to call when another node announces a change (at most once per
    /// [`CHANGE_DEBOUNCE`] per kind of change; called on a runtime worker:
    /// hand blocking work to `spawn_blocking`).
    pub fn on_change(&self, listener: ChangeListener) {
        *self.on_change.lock() = Some(listener);
    }

    /// Leases on keys of one kind (`prefix`, e.g. `rule`): this node wants
    /// some keys, and owns a share of them, each key owned by exactly one
    /// live node (`leases.rs`). `None` before [`Cluster::join`] finished.
    pub fn leases(&self, prefix: &str) -> Option<leases::Leases> {
        let handle = self.runtime.lock().as_ref()?.handle().clone();
        Some(leases::start(
            &handle,
            jetstream::new(self.plain.clone()),
            format!("{}_leases", self.config.name),
            self.nodes.clone(),
            self.config.node_id.clone(),
            prefix,
        ))
    }

    /// Which of `ids` are connected to another node (this node's own are
    /// the broker's to say). Nodes that do not answer within
    /// [`presence::PRESENCE_WAIT`] count as holding none.
    pub async fn online_elsewhere(&self, ids: &[String]) -> Result<HashSet<String>, ClusterError> {
        let others = self
            .nodes()
            .await?
            .iter()
            .filter(|n| n.node_id != self.config.node_id)
            .count();
        presence::ask(&self.plain, &self.config.name, others, ids).await
    }

    /// Store a firmware image (the file at `path`) for every node, under
    /// `name` (the artifact's id).
    pub async fn put_image(&self, name: &str, path: &std::path::Path) -> Result<(), ClusterError> {
        self.images.put(name, path).await
    }

    /// Copy the image `name` into `dest`; `false` when there is none.
    pub async fn fetch_image(
        &self,
        name: &str,
        dest: &std::path::Path,
    ) -> Result<bool, ClusterError> {
        self.images.get(name, dest).await
    }

    /// One 32-byte key every node uses under `name` (`ota-url`: the key
    /// firmware download URLs are signed with, so a URL issued by one node
    /// works on any, as behind a load balancer): the first node to ask
    /// stores its `candidate` in the bucket `{cluster}_keys`, created only
    /// if absent; everyone gets the stored one. Whoever can read NATS can
    /// read it — and the firmware images it guards, in `{cluster}_ota`,
    /// too: nothing more is exposed.
    pub async fn shared_key(
        &self,
        name: &str,
        candidate: [u8; 32],
    ) -> Result<[u8; 32], ClusterError> {
        let bucket = format!("{}_keys", self.config.name);
        let kv = jetstream::new(self.plain.clone())
            .create_or_update_key_value(kv::Config {
                bucket: bucket.clone(),
                description: "m2mhub: keys every node shares".into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket,
                detail: e.to_string(),
            })?;
        match kv.create(name, Bytes::copy_from_slice(&candidate)).await {
            Ok(_) => return Ok(candidate),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(ClusterError::Nats(format!(
                    "cannot store the key {name}: {e}"
                )))
            }
        }
        let stored = kv
            .get(name)
            .await
            .map_err(|e| ClusterError::Nats(format!("cannot read the key {name}: {e}")))?
            .ok_or_else(|| ClusterError::Nats(format!("the key {name} vanished")))?;
        <[u8; 32]>::try_from(&stored[..])
            .map_err(|_| ClusterError::Nats(format!("the key {name} is not 32 bytes")))
    }

    /// Whether the cluster's store holds the image `name`.
    pub async fn has_image(&self, name: &str) -> Result<bool, ClusterError> {
        self.images.has(name).await
    }

    /// Delete the image `name` (gone already is fine).
    pub async fn delete_image(&self, name: &str) -> Result<(), ClusterError> {
        self.images.delete(name).await
    }

    fn info(&self, broker: &Broker) -> NodeInfo {
        let g = broker.gauges();
        NodeInfo {
            node_id: self.config.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            mqtt: self.config.mqtt_addr.clone(),
            http: self.config.http_addr.clone(),
            started_ms: self.started_ms,
            updated_ms: now_ms(),
            connections: g.connections,
            sessions: g.sessions,
            subscriptions: g.subscriptions,
            retained: g.retained,
            forwarded: self.stats.forwarded.load(Ordering::Relaxed),
            received: self.stats.received.load(Ordering::Relaxed),
        }
    }

    async fn put_node_info(&self, broker: &Broker) {
        let info = self.info(broker);
        let Ok(json) = serde_json::to_vec(&info) else {
            return;
        };
        let key = subject::encode_topic(&self.config.node_id);
        if let Err(e) = self.nodes.put(key, json.into()).await {
            tracing::warn!(error = %e, "cannot write this node's entry in the nodes bucket");
        }
    }

    /// The live members (entries rewritten within the last ten seconds),
    /// sorted by node id.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        let mut keys = self
            .nodes
            .keys()
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let Ok(k) = k else { continue };
            if let Ok(Some(v)) = self.nodes.get(&k).await {
                if let Ok(info) = serde_json::from_slice::<NodeInfo>(&v) {
                    out.push(info);
                }
            }
        }
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(out)
    }

    /// Leave: stop the tasks, remove this node's entry, flush what is
    /// queued on the connections.
    pub async fn leave(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        let key = subject::encode_topic(&self.config.node_id);
        let _ = self.nodes.purge(key).await;
        let _ = self.plain.flush().await;
        let _ = self.groups.flush().await;
    }
}

/// Make this node's retained store the bucket's: an empty bucket is seeded
/// with this node's retained messages (a single node becoming the first of
/// a cluster keeps them); otherwise what the bucket lacks is cleared here
/// (it was cleared while this node was away). The watcher then applies the
/// bucket's values.
async fn sync_retained(
    broker: &Broker,
    bucket: &kv::Store,
    origin: u64,
    stats: &Stats,
) -> Result<(), ClusterError> {
    let mut keys = bucket
        .keys()
        .await
        .map_err(|e| ClusterError::Nats(e.to_string()))?;
    let mut present = HashSet::new();
    while let Some(k) = keys.next().await {
        if let Ok(k) = k {
            present.insert(k);
        }
    }
    let local = broker.retained_topics();
    if present.is_empty() {
        let now = Instant::now();
        let mut seq = 0;
        for m in broker.retained_messages() {
            seq += 1;
            let key = subject::encode_topic(&m.topic);
            if let Err(e) = bucket.put(key, frame::encode(origin, seq, &m, now)).await {
                tracing::warn!(topic = %m.topic, error = %e, "cannot seed a retained message into the cluster");
            }
        }
        return Ok(());
    }
    for topic in local {
        if !present.contains(&subject::encode_topic(&topic)) {
            broker.set_retained_remote(&topic, None);
            stats.retained_applied.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Mirror the retained bucket into the local store, history first.
async fn watch_retained(broker: Broker, bucket: kv::Store, stats: Arc<Stats>) {
    let mut watch = match bucket.watch_with_history(">").await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the cluster's retained messages");
            return;
        }
    };
    while let Some(entry) = watch.next().await {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "retained messages watch");
                continue;
            }
        };
        match entry.operation {
            kv::Operation::Put => match frame::decode(entry.value, Instant::now()) {
                Ok(f) => {
                    let mut msg = f.message;
                    msg.retain = true;
                    let topic = msg.topic.clone();
                    broker.set_retained_remote(&topic, Some(Arc::new(msg)));
                }
                Err(e) => {
                    stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %entry.key, error = %e, "bad retained message in the bucket");
                    continue;
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                let Some(topic) = subject::decode_topic(&entry.key) else {
                    stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                broker.set_retained_remote(&topic, None);
            }
        }
        stats.retained_applied.fetch_add(1, Ordering::Relaxed);
    }
}

/// Send this node's messages to the fabric, in order; retained changes go
/// to the bucket too.
async fn forward_loop(
    (mut rx, queued): (mpsc::UnboundedReceiver<Forward>, Arc<Queued>),
    nats: async_nats::Client,
    js: jetstream::Context,
    (fast_space, durable_space): (String, String),
    retained: kv::Store,
    origin: u64,
    stats: Arc<Stats>,
) {
    let mut seq = 0u64;
    let mut batch = Vec::with_capacity(256);
    // Retained writes wait for JetStream's acknowledgement: keep them off
    // the routing path, in order, on their own task.
    let (ret_tx, mut ret_rx) = mpsc::unbounded_channel::<(String, Option<bytes::Bytes>)>();
    tokio::spawn(async move {
        while let Some((key, value)) = ret_rx.recv().await {
            let r = match value {
                Some(v) => retained
                    .put(&key, v)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => retained.delete(&key).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = r {
                tracing::warn!(key, error = %e, "cannot write a retained message to the cluster");
            }
        }
    });
    // JetStream's confirmations are awaited in order on their own task, so
    // the next messages go out meanwhile.
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(
        jetstream::context::PublishAckFuture,
        Option<oneshot::Sender<Result<(), u8>>>,
    )>();
    {
        let stats = stats.clone();
        tokio::spawn(async move {
            while let Some((ack, done)) = ack_rx.recv().await {
                let r = match ack.await {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        stats.durable_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "JetStream did not confirm a message");
                        Err(mqtt_codec::reason::UNSPECIFIED_ERROR)
                    }
                };
                if let Some(done) = done {
                    let _ = done.send(r);
                }
            }
        });
    }
    while rx.recv_many(&mut batch, 256).await > 0 {
        let now = Instant::now();
        for (msg, done) in batch.drain(..) {
            let count = if done.is_none() {
                &queued.fast
            } else {
                &queued.durable
            };
            count.fetch_sub(1, Ordering::AcqRel);
            seq += 1;
            let bytes = frame::encode(origin, seq, &msg, now);
            if msg.retain {
                let key = subject::encode_topic(&msg.topic);
                let value = (!msg.payload.is_empty()).then(|| bytes.clone());
                let _ = ret_tx.send((key, value));
            }
            if msg.qos == mqtt_codec::QoS::AtMostOnce {
                match nats
                    .publish(subject::topic_subject(&fast_space, &msg.topic), bytes)
                    .await
                {
                    Ok(()) => stats.forwarded.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::debug!(error = %e, "forwarding a message failed");
                        stats.publish_errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
                continue;
            }
            // QoS 1/2: into the stream, which also hands it to the nodes
            // subscribed to its subject.
            match js
                .publish(subject::topic_subject(&durable_space, &msg.topic), bytes)
                .await
            {
                Ok(ack) => {
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    let _ = ack_tx.send((ack, done));
                }
                Err(e) => {
                    stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "forwarding a message failed");
                    if let Some(done) = done {
                        let _ = done.send(Err(mqtt_codec::reason::UNSPECIFIED_ERROR));
                    }
                }
            }
        }
    }
}

/// This node's NATS subscriptions, one set per interest.
struct Subscriptions {
    /// Where QoS 0 and QoS 1/2 messages travel: a filter is subscribed in
    /// both.
    spaces: [String; 2],
    cluster: String,
    broker: Broker,
    plain: async_nats::Client,
    groups: async_nats::Client,
    dedupe: Arc<Mutex<dedupe::Recent>>,
    stats: Arc<Stats>,
    active: HashMap<Interest, Vec<JoinHandle<()>>>,
}

impl Subscriptions {
    async fn add(&mut self, interest: Interest) {
        if self.active.contains_key(&interest) {
            return;
        }
        let mut readers = Vec::new();
        let subjects: Vec<String> = self
            .spaces
            .iter()
            .flat_map(|space| subject::filter_subjects(space, &interest.filter))
            .collect();
        for subj in subjects {
            let sub = match &interest.group {
                None => self.plain.subscribe(subj.clone()).await,
                Some(g) => {
                    self.groups
                        .queue_subscribe(
                            subj.clone(),
                            subject::queue_group(&self.cluster, g, &interest.filter),
                        )
                        .await
                }
            };
            let mut sub = match sub {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(subject = %subj, error = %e, "cannot subscribe on NATS");
                    continue;
                }
            };
            let broker = self.broker.clone();
            let stats = self.stats.clone();
            let dedupe = self.dedupe.clone();
            let group_key = interest.group_key();
            readers.push(tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    let f = match frame::decode(m.payload, Instant::now()) {
                        Ok(f) => f,
                        Err(e) => {
                            stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "bad frame from the fabric");
                            continue;
                        }
                    };
                    // Queue groups get each message once per group; plain
                    // subscriptions once per overlapping filter, each on its
                    // own reader. Whichever reader comes first routes it,
                    // under the lock: a reader reaches a message only after
                    // the ones before it, so they are routed in order.
                    let n = if group_key.is_none() {
                        let mut seen = dedupe.lock();
                        if !seen.first_time(f.origin, f.seq) {
                            stats.duplicates.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        broker.route_remote(Arc::new(f.message), None)
                    } else {
                        broker.route_remote(Arc::new(f.message), group_key.as_deref())
                    };
                    stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
                }
            }));
        }
        self.active.insert(interest, readers);
    }

    fn remove(&mut self, interest: &Interest) {
        // Aborting a reader drops its subscriber, which unsubscribes.
        for r in self.active.remove(interest).into_iter().flatten() {
            r.abort();
        }
    }
}

/// Apply interest changes and send claims, in the order the broker made
/// them.
async fn control_loop(
    mut rx: mpsc::UnboundedReceiver<Control>,
    claim_subject: String,
    unsettled: Arc<AtomicU64>,
    mut subs: Subscriptions,
) {
    // Interest changes applied since the last barrier.
    let mut applied = 0u64;
    while let Some(c) = rx.recv().await {
        match c {
            Control::Interest(i, on) => {
                if on {
                    subs.add(i).await;
                } else {
                    subs.remove(&i);
                }
                applied += 1;
            }
            Control::Admin(action) => {
                if let Err(e) = subs
                    .plain
                    .publish(format!("{}.admin", subs.cluster), action.into())
                    .await
                {
                    tracing::warn!(error = %e, "cannot tell the cluster about an operator's action");
                }
            }
            Control::Claim(claim) => {
                if let Err(e) = subs
                    .plain
                    .publish(claim_subject.clone(), claim.into_bytes().into())
                    .await
                {
                    tracing::warn!(error = %e, "cannot announce a client id to the cluster");
                } else {
                    subs.stats.claims_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Control::Barrier(done) => {
                // `flush` only writes the socket; a request is a round
                // trip, answered (by "no responders") only after the server
                // has read, and so applied, everything sent before it.
                let probe = format!("{}.barrier", subs.cluster);
                let _ = subs.plain.request(probe.clone(), Bytes::new()).await;
                let _ = subs.groups.request(probe, Bytes::new()).await;
                unsettled.fetch_sub(std::mem::take(&mut applied), Ordering::AcqRel);
                let _ = done.send(());
            }
        }
    }
}

/// Keep the sessions bucket in step with this node's persistent sessions,
/// and move each drained session's floor forward now and then.
async fn session_loop(
    mut rx: mpsc::UnboundedReceiver<SessionChange>,
    broker: Broker,
    bucket: kv::Store,
    node: String,
) {
    struct Held {
        record: m2mhub_broker_log::StoredSession,
        floor_ms: u64,
        revision: u64,
    }
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut tick = tokio::time::interval(FLOOR_SWEEP);
    let put = |record: &m2mhub_broker_log::StoredSession, floor_ms: u64| {
        let doc = sessions::SessionDoc::new(&node, floor_ms, record);
        let key = subject::encode_topic(&record.client_id);
        let bucket = bucket.clone();
        async move {
            let json = serde_json::to_vec(&doc).map_err(|e| e.to_string())?;
            bucket
                .put(key, json.into())
                .await
                .map_err(|e| e.to_string())
        }
    };
    loop {
        tokio::select! {
            change = rx.recv() => match change {
                Some(SessionChange::Saved(record)) => {
                    let id = record.client_id.clone();
                    let floor_ms = held.get(&id).map_or_else(now_ms, |h| h.floor_ms);
                    match put(&record, floor_ms).await {
                        Ok(revision) => {
                            held.insert(id, Held { record, floor_ms, revision });
                        }
                        Err(e) => tracing::warn!(client_id = %id, error = %e, "cannot save a session in the cluster"),
                    }
                }
                Some(SessionChange::Ended(id)) => {
                    // Only our own write: the client may have moved on to
                    // another node, which wrote the record since.
                    if let Some(h) = held.remove(&id) {
                        let key = subject::encode_topic(&id);
                        let _ = bucket.delete_expect_revision(key, Some(h.revision)).await;
                    }
                }
                None => return,
            },
            _ = tick.tick() => {
                let now = now_ms();
                let due: Vec<String> = held
                    .iter()
                    .filter(|(_, h)| now.saturating_sub(h.floor_ms) >= FLOOR_STEP.as_millis() as u64)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in due {
                    let drained = broker
                        .session(&id)
                        .is_some_and(|s| s.queued == 0 && s.inflight == 0);
                    if !drained {
                        continue;
                    }
                    if let Some(h) = held.get_mut(&id) {
                        if let Ok(revision) = put(&h.record, now).await {
                            h.floor_ms = now;
                            h.revision = revision;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_actions_round_trip() {
        for a in [
            AdminAction::Kick {
                client_id: "meter 7".into(),
                reason: 0x98,
            },
            AdminAction::Discard {
                client_id: "x y".into(),
            },
        ] {
            assert_eq!(decode_admin(&encode_admin(&a)), Some(a));
        }
        for bad in ["", "kick", "kick x y", "nuke a", "kick 999 a"] {
            assert_eq!(decode_admin(bad), None, "{bad:?}");
        }
    }
}
