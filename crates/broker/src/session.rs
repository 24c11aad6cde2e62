//! A client's session: what outlives a single network connection.
//!
//! The session holds the subscriptions, the queue of messages waiting to be
//! sent, the QoS 1/2 messages in flight and the packet identifiers of
//! incoming QoS 2 messages. Publishers on other tasks push into the queue
//! under the session's own mutex (no global lock) and wake the connection
//! that currently owns the session, which drains the queue in batches.

use crate::message::Message;
use mqtt_codec::{Protocol, QoS, SubscriptionOptions};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

pub struct Session {
    /// Unique for this session instance (a new clean session gets a new id).
    pub id: u64,
    pub client_id: Arc<str>,
    online: AtomicBool,
    pub(crate) state: Mutex<SessionState>,
}

/// The connection that currently owns a session.
pub(crate) struct ConnLink {
    pub conn_id: u64,
    /// Wakes the connection: new messages to send, or it has been kicked.
    pub waker: Arc<crate::signal::Signal>,
    /// Who is connected, for [`crate::Broker::kick_where`] and device bans.
    pub identity: Arc<crate::auth::ClientIdentity>,
}

/// A message waiting in a session's queue or in flight.
#[derive(Clone, Debug)]
pub(crate) struct Outgoing {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Sequence number in the persistent store, if the message is stored.
    pub seq: Option<u64>,
    /// Shared group (`group/filter`) the message was routed through.
    pub share: Option<Arc<str>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stage {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

pub(crate) struct InFlight {
    pub out: Outgoing,
    pub stage: Stage,
}

#[derive(Clone, Debug)]
pub(crate) struct SubscriptionRecord {
    pub options: SubscriptionOptions,
    pub sub_id: Option<u32>,
}

pub(crate) struct SessionState {
    pub protocol: Protocol,
    pub conn: Option<ConnLink>,
    /// Set when another connection took the session over (or an operator
    /// kicked it): `(connection id, reason code)`. A kicked connection that
    /// still owns the session detaches from it like any ending connection.
    pub kicked: Option<(u64, u8)>,
    pub subscriptions: BTreeMap<String, SubscriptionRecord>,
    pub queue: VecDeque<Outgoing>,
    pub inflight: Lazy<BTreeMap<u16, InFlight>>,
    pub next_packet_id: u16,
    /// Packet ids of received QoS 2 messages awaiting PUBREL.
    pub incoming_qos2: Lazy<BTreeSet<u16>>,
    /// Session Expiry Interval in seconds (0: ends with the connection).
    pub expiry_interval: u32,
    /// Whether the session is written to the persistent store.
    pub persistent: bool,
    pub disconnected_at: Option<Instant>,
    /// Bumped on every (re)connection, so a delayed will can tell whether
    /// the client came back in the meantime.
    pub generation: u32,
    /// Messages dropped because the queue was full or too large for the client.
    pub dropped: u64,
    /// The session was discarded; late deliveries are ignored.
    pub ended: bool,
    /// Who created the session; only the same principal may take it over or
    /// resume it. `None` for sessions recovered from the store.
    pub owner: Option<Arc<crate::auth::ClientIdentity>>,
}

/// A collection that costs one pointer while empty, as the in-flight
/// window and the QoS 2 ids of a session are almost all the time: boxed
/// on the first insert, freed again on the removal that empties it. (Two
/// of them put `Session` in the allocator's 224-byte class, not 256.)
pub(crate) struct Lazy<T>(Option<Box<T>>);

impl<T> Default for Lazy<T> {
    fn default() -> Self {
        Lazy(None)
    }
}

impl<K: Ord + Copy, V> Lazy<BTreeMap<K, V>> {
    pub fn get(&self, k: &K) -> Option<&V> {
        self.0.as_ref()?.get(k)
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.0.as_mut()?.get_mut(k)
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.get(k).is_some()
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.0.get_or_insert_with(Default::default).insert(k, v)
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        let map = self.0.as_mut()?;
        let v = map.remove(k);
        if map.is_empty() {
            self.0 = None;
        }
        v
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    pub fn range<R: std::ops::RangeBounds<K> + Clone>(
        &self,
        r: R,
    ) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().flat_map(move |m| m.range(r.clone()))
    }

    /// Everything, leaving it empty.
    pub fn take(&mut self) -> BTreeMap<K, V> {
        self.0.take().map(|m| *m).unwrap_or_default()
    }
}

impl<K: Ord + Copy> Lazy<BTreeSet<K>> {
    pub fn contains(&self, k: &K) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(k))
    }

    pub fn insert(&mut self, k: K) -> bool {
        self.0.get_or_insert_with(Default::default).insert(k)
    }

    pub fn remove(&mut self, k: &K) -> bool {
        let Some(set) = self.0.as_mut() else {
            return false;
        };
        let removed = set.remove(k);
        if set.is_empty() {
            self.0 = None;
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }
}

impl Session {
    pub(crate) fn new(id: u64, client_id: Arc<str>, protocol: Protocol) -> Self {
        Session {
            id,
            client_id,
            online: AtomicBool::new(false),
            state: Mutex::new(SessionState {
                protocol,
                conn: None,
                kicked: None,
                subscriptions: BTreeMap::new(),
                queue: VecDeque::new(),
                inflight: Lazy::default(),
                next_packet_id: 1,
                incoming_qos2: Lazy::default(),
                expiry_interval: 0,
                persistent: false,
                disconnected_at: None,
                generation: 0,
                dropped: 0,
                ended: false,
                owner: None,
            }),
        }
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    pub(crate) fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Relaxed);
    }

    /// Queued plus in-flight messages and the drop count, for the API.
    pub fn queue_stats(&self) -> (usize, usize, u64) {
        let st = self.state.lock();
        (st.queue.len(), st.inflight.len(), st.dropped)
    }
}

impl SessionState {
    /// Next free packet identifier (1..=65535, skipping ids in flight).
    pub fn allocate_packet_id(&mut self) -> Option<u16> {
        if self.inflight.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
    }

    /// Wake the owning connection, if any, for a message queued (the
    /// guard of this state is held: see [`crate::signal::Signal::notify_queued`]).
    pub fn wake(&self) {
        if let Some(c) = &self.conn {
            c.waker.notify_queued();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_wrap_and_skip_in_flight() {
        let s = Session::new(1, "c".into(), Protocol::V5);
        let mut st = s.state.lock();
        st.next_packet_id = u16::MAX;
        assert_eq!(st.allocate_packet_id(), Some(u16::MAX));
        assert_eq!(st.allocate_packet_id(), Some(1));
        let msg = Arc::new(Message {
            topic: "t".into(),
            payload: Default::default(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: 0,
        });
        st.inflight.insert(
            2,
            InFlight {
                out: Outgoing {
                    msg,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    sub_ids: vec![],
                    seq: None,
                    share: None,
                },
                stage: Stage::Published,
            },
        );
        assert_eq!(st.allocate_packet_id(), Some(3));
    }

    #[test]
    fn lazy_collections_free_their_box_when_emptied() {
        let mut m: Lazy<BTreeMap<u16, u8>> = Lazy::default();
        assert!(m.is_empty() && m.remove(&1).is_none());
        m.insert(3, 30);
        m.insert(1, 10);
        assert_eq!(m.range(2..).map(|(k, _)| *k).collect::<Vec<_>>(), vec![3]);
        assert_eq!(m.remove(&1), Some(10));
        assert!(m.0.is_some(), "still holds 3");
        assert_eq!(m.remove(&3), Some(30));
        assert!(m.0.is_none(), "box freed");
        let mut s: Lazy<BTreeSet<u16>> = Lazy::default();
        assert!(s.insert(7) && s.contains(&7) && s.len() == 1);
        assert!(s.remove(&7));
        assert!(s.0.is_none() && !s.contains(&7));
    }
}
