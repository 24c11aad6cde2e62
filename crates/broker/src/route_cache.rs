//! A publisher's recent routes: the deliveries its last few topics matched,
//! valid for as long as the subscription index does not change.
//!
//! A device publishes on the same few topics over and over, and the
//! subscriptions they match change far less often than messages arrive.
//! Walking the trie for each message (split the topic, hash and compare a
//! level per trie level, take the index's read lock) was ~15 % of the
//! broker's time in QoS 0 fan-in. With the route cached, a PUBLISH costs
//! one atomic load of the index's generation and a topic comparison.
//!
//! The cache belongs to one connection, so the No Local filtering already
//! applied to its entries (it depends on the publisher) stays right. It is
//! checked against [`SubscriptionIndex::generation`], which every write to
//! the index advances: a SUBSCRIBE or UNSUBSCRIBE that was applied before a
//! PUBLISH was read is seen by it, as the ordering rules ask. Routes through
//! shared subscriptions are never reused (each message picks a member), nor
//! are routes on a clustered node (see [`crate::cluster`]).

use crate::topic_tree::{Delivery, TopicTree};
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::sync::atomic::{AtomicU64, Ordering};

/// The subscription trie behind its lock, with a generation that every
/// write advances (see the module documentation).
#[derive(Default)]
pub(crate) struct SubscriptionIndex {
    tree: RwLock<TopicTree>,
    generation: AtomicU64,
}

impl SubscriptionIndex {
    pub fn read(&self) -> RwLockReadGuard<'_, TopicTree> {
        self.tree.read()
    }

    /// The trie for changing. The generation moves on as the lock is
    /// taken, before any change: a publisher that still sees the old
    /// generation is routing a message read before the change.
    pub fn write(&self) -> RwLockWriteGuard<'_, TopicTree> {
        let tree = self.tree.write();
        self.generation.fetch_add(1, Ordering::SeqCst);
        tree
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Something else a route depends on is changing (the platform's
    /// internal subscriptions): call it holding that thing's write lock,
    /// before the change, as [`SubscriptionIndex::write`] does.
    pub fn invalidate_routes(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// The route of a message: its deliveries to sessions, and whether any of
/// the platform's internal subscriptions may want it.
pub(crate) struct Route<'a> {
    pub deliveries: &'a [Delivery],
    pub internal: bool,
}

/// Topics remembered per publisher: a device that alternates between a
/// few topics (temperature, humidity, status) still hits.
const WAYS: usize = 4;

/// Never a real generation (the counter starts at 0 and counts writes).
const STALE: u64 = u64::MAX;

struct Entry {
    topic: Box<str>,
    generation: u64,
    deliveries: Vec<Delivery>,
    /// An internal subscription matched when the route was made.
    internal: bool,
}

#[derive(Default)]
pub(crate) struct RouteCache {
    entries: Vec<Entry>,
    /// The entry to reuse next, round-robin.
    next: usize,
}

impl RouteCache {
    /// The route of a message on `topic` published by `publisher`: the
    /// cached one if the index is still at its generation, else a fresh
    /// walk of the trie (and `internal`, which says whether an internal
    /// subscription matches the topic), remembered when it can be reused.
    pub fn route(
        &mut self,
        index: &SubscriptionIndex,
        topic: &str,
        publisher: u64,
        internal: impl FnOnce(&str) -> bool,
    ) -> Route<'_> {
        let now = index.generation();
        let hit = self
            .entries
            .iter()
            .position(|e| e.generation == now && *e.topic == *topic);
        let i = match hit {
            Some(i) => i,
            None => self.refill(index, topic, publisher, internal),
        };
        let e = &self.entries[i];
        Route {
            deliveries: &e.deliveries,
            internal: e.internal,
        }
    }

    fn refill(
        &mut self,
        index: &SubscriptionIndex,
        topic: &str,
        publisher: u64,
        internal: impl FnOnce(&str) -> bool,
    ) -> usize {
        // The same topic at an older generation is refreshed in place,
        // so a topic never holds two entries.
        let i = match self.entries.iter().position(|e| *e.topic == *topic) {
            Some(i) => i,
            None if self.entries.len() < WAYS => {
                self.entries.push(Entry {
                    topic: topic.into(),
                    generation: STALE,
                    deliveries: Vec::new(),
                    internal: true,
                });
                self.entries.len() - 1
            }
            None => {
                let i = self.next;
                self.next = (self.next + 1) % WAYS;
                self.entries[i].topic = topic.into();
                i
            }
        };
        let e = &mut self.entries[i];
        let tree = index.read();
        // Read under the lock: no write is under way, so this is the
        // generation of the trie being walked.
        let generation = index.generation();
        tree.matches(topic, publisher, true, &mut e.deliveries);
        drop(tree);
        // After the generation was read: a change to the internal
        // subscriptions from then on makes this entry stale at once.
        e.internal = internal(topic);
        let shared = e.deliveries.iter().any(|d| d.share.is_some());
        e.generation = if shared { STALE } else { generation };
        i
    }

    /// Forget every route (the connection is going idle: an idle
    /// connection holds no routes, and no references to other sessions).
    pub fn clear(&mut self) {
        *self = RouteCache::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;
    use crate::topic_tree::Subscriber;
    use mqtt_codec::{Protocol, QoS, SubscriptionOptions};
    use std::sync::Arc;

    fn session(id: u64) -> Arc<Session> {
        let s = Arc::new(Session::new(id, format!("c{id}").into(), Protocol::V5));
        s.set_online(true);
        s
    }

    fn sub(s: &Arc<Session>, no_local: bool) -> Subscriber {
        Subscriber {
            session: s.clone(),
            options: SubscriptionOptions {
                qos: QoS::AtMostOnce,
                no_local,
                ..Default::default()
            },
            sub_id: None,
        }
    }

    fn ids(d: &[Delivery]) -> Vec<u64> {
        let mut v: Vec<u64> = d.iter().map(|d| d.session.id).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn routes_follow_every_change_to_the_index() {
        let index = SubscriptionIndex::default();
        let (a, b) = (session(1), session(2));
        index.write().subscribe("t/+", sub(&a, false));
        let mut cache = RouteCache::default();
        assert_eq!(
            ids(cache.route(&index, "t/1", 9, |_| false).deliveries),
            vec![1]
        );
        // A hit: nothing walked, same answer.
        let g = index.generation();
        assert_eq!(
            ids(cache.route(&index, "t/1", 9, |_| false).deliveries),
            vec![1]
        );
        assert_eq!(index.generation(), g);
        // A new subscriber is seen at once...
        index.write().subscribe("t/1", sub(&b, false));
        assert_eq!(
            ids(cache.route(&index, "t/1", 9, |_| false).deliveries),
            vec![1, 2]
        );
        // ...and so is one that left.
        index.write().unsubscribe("t/+", 1);
        assert_eq!(
            ids(cache.route(&index, "t/1", 9, |_| false).deliveries),
            vec![2]
        );
        index.write().unsubscribe("t/1", 2);
        assert!(cache
            .route(&index, "t/1", 9, |_| false)
            .deliveries
            .is_empty());
    }

    #[test]
    fn no_local_is_the_publishers_own_and_topics_do_not_mix() {
        let index = SubscriptionIndex::default();
        let a = session(1);
        index.write().subscribe("t/#", sub(&a, true));
        let mut own = RouteCache::default();
        let mut other = RouteCache::default();
        assert!(own.route(&index, "t/x", 1, |_| false).deliveries.is_empty());
        assert_eq!(
            ids(other.route(&index, "t/x", 2, |_| false).deliveries),
            vec![1]
        );
        // More topics than ways: each still gets its own answer.
        index.write().subscribe("u/3", sub(&a, false));
        for round in 0..3 {
            for t in ["t/1", "u/3", "v/1", "t/2", "w", "u/3"] {
                let want: Vec<u64> = if t.starts_with("t/") || t == "u/3" {
                    vec![1]
                } else {
                    vec![]
                };
                assert_eq!(
                    ids(other.route(&index, t, 2, |_| false).deliveries),
                    want,
                    "{t} in round {round}"
                );
            }
        }
        assert!(other.entries.len() <= WAYS);
        other.clear();
        assert!(other.entries.is_empty());
    }

    #[test]
    fn the_internal_verdict_is_cached_and_invalidated_with_the_route() {
        let index = SubscriptionIndex::default();
        let mut cache = RouteCache::default();
        let mut asked = 0;
        let mut route = |cache: &mut RouteCache, want: bool| {
            cache
                .route(&index, "devices/1/up", 9, |_| {
                    asked += 1;
                    want
                })
                .internal
        };
        assert!(route(&mut cache, true));
        // Cached: not asked again, whatever it would say now.
        assert!(route(&mut cache, false));
        index.invalidate_routes();
        assert!(!route(&mut cache, false));
        assert_eq!(asked, 2);
    }

    #[test]
    fn shared_routes_pick_a_member_per_message() {
        let index = SubscriptionIndex::default();
        let (a, b) = (session(1), session(2));
        index.write().subscribe("$share/g/t", sub(&a, false));
        index.write().subscribe("$share/g/t", sub(&b, false));
        let mut cache = RouteCache::default();
        let picks: Vec<u64> = (0..4)
            .map(|_| ids(cache.route(&index, "t", 9, |_| false).deliveries)[0])
            .collect();
        assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
    }
}
