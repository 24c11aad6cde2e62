//! The subscription index: a trie over topic levels.
//!
//! Publishing walks the trie once per message under a read lock (readers never
//! block each other; only SUBSCRIBE/UNSUBSCRIBE take the write lock), so the
//! publish path scales across cores. Each match names the session, the
//! subscription options and identifier; a session matched by several
//! filters receives one copy with the highest QoS and all identifiers.
//! Shared subscriptions (`$share/group/filter`) are stored per filter node
//! and pick one member per message, round-robin, preferring online members.

use crate::cluster::Interest;
use crate::session::Session;
use mqtt_codec::{QoS, SubscriptionOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubscriptionOptions,
    pub sub_id: Option<u32>,
}

struct SharedGroup {
    name: Arc<str>,
    members: Vec<Subscriber>,
    next: AtomicUsize,
}

#[derive(Default)]
struct Node {
    /// Literal levels. The wildcards have fields of their own: a match
    /// looks for both at every level, and a pointer test is much cheaper
    /// than hashing `#` and `+` (a profile of QoS 0 fan-in found the
    /// hashing at 8 % of the broker's time). The literal levels are
    /// hashed with foldhash, not SipHash: a publish hashes one level per
    /// trie level, and SipHash of a short level cost more than the lookup
    /// itself. Its per-process random seed keeps collisions unpredictable
    /// (subscribers choose the levels).
    children: foldhash::HashMap<Box<str>, Node>,
    hash: Option<Box<Node>>,
    plus: Option<Box<Node>>,
    subscribers: Vec<Subscriber>,
    shared: Vec<SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.hash.is_none()
            && self.plus.is_none()
            && self.subscribers.is_empty()
            && self.shared.is_empty()
    }

    fn child(&self, level: &str) -> Option<&Node> {
        match level {
            "#" => self.hash.as_deref(),
            "+" => self.plus.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node> {
        match level {
            "#" => self.hash.as_deref_mut(),
            "+" => self.plus.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    /// The child for `level`, made if missing.
    fn child_or_new(&mut self, level: &str) -> &mut Node {
        match level {
            "#" => self.hash.get_or_insert_with(Default::default),
            "+" => self.plus.get_or_insert_with(Default::default),
            _ => self.children.entry(level.into()).or_default(),
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "#" => self.hash = None,
            "+" => self.plus = None,
            _ => {
                self.children.remove(level);
            }
        }
    }

    /// Every child with its level, wildcards included.
    fn each_child(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.children
            .iter()
            .map(|(l, n)| (&**l, n))
            .chain(self.hash.as_deref().map(|n| ("#", n)))
            .chain(self.plus.as_deref().map(|n| ("+", n)))
    }
}

/// One delivery decided by a match.
pub(crate) struct Delivery {
    pub session: Arc<Session>,
    pub qos: QoS,
    pub retain_as_published: bool,
    pub sub_ids: Vec<u32>,
    /// `Some(group/filter)` when it came through a shared subscription, so
    /// that unacknowledged messages can be handed to another member.
    pub share: Option<Arc<str>>,
}

#[derive(Default)]
pub(crate) struct TopicTree {
    root: Node,
    count: usize,
    /// In a cluster: record when a filter gains its first subscriber on
    /// this node or loses its last (see [`crate::cluster`]), so the node's
    /// interest follows its subscriptions. Off on a single node.
    track_interest: bool,
    interest_changes: Vec<(Interest, bool)>,
}

impl TopicTree {
    /// Number of subscriptions (shared members included).
    pub fn len(&self) -> usize {
        self.count
    }

    /// Add or replace `session`'s subscription to `filter` (already
    /// validated; may be `$share/…`). Returns true if it was new.
    pub fn subscribe(&mut self, filter: &str, sub: Subscriber) -> bool {
        let (share, inner) = split_share(filter);
        let had = self.track_interest && self.has_filter(share, inner);
        let new = self.insert(share, inner, sub);
        if self.track_interest && !had {
            self.interest_changes
                .push((Interest::new(share, inner), true));
        }
        new
    }

    fn insert(&mut self, share: Option<&str>, inner: &str, sub: Subscriber) -> bool {
        let mut node = &mut self.root;
        for level in inner.split('/') {
            node = node.child_or_new(level);
        }
        let list = match share {
            None => &mut node.subscribers,
            Some(group) => {
                let key: Arc<str> = format!("{group}/{inner}").into();
                let pos = match node.shared.iter().position(|g| g.name == key) {
                    Some(p) => p,
                    None => {
                        node.shared.push(SharedGroup {
                            name: key,
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.shared.len() - 1
                    }
                };
                &mut node.shared[pos].members
            }
        };
        if let Some(existing) = list.iter_mut().find(|s| s.session.id == sub.session.id) {
            *existing = sub;
            false
        } else {
            list.push(sub);
            self.count += 1;
            true
        }
    }

    /// Remove `session_id`'s subscription to `filter`; true if it existed.
    pub fn unsubscribe(&mut self, filter: &str, session_id: u64) -> bool {
        let (share, inner) = split_share(filter);
        let levels: Vec<&str> = inner.split('/').collect();
        let removed = remove_rec(&mut self.root, &levels, share, inner, session_id);
        if removed {
            self.count -= 1;
            if self.track_interest && !self.has_filter(share, inner) {
                self.interest_changes
                    .push((Interest::new(share, inner), false));
            }
        }
        removed
    }

    /// Whether anyone on this node subscribes to `inner` (through `share`'s
    /// group when given).
    fn has_filter(&self, share: Option<&str>, inner: &str) -> bool {
        let mut node = &self.root;
        for level in inner.split('/') {
            match node.child(level) {
                Some(n) => node = n,
                None => return false,
            }
        }
        match share {
            None => !node.subscribers.is_empty(),
            Some(group) => node.shared.iter().any(|g| {
                g.name.strip_suffix(inner).and_then(|n| n.strip_suffix('/')) == Some(group)
                    && !g.members.is_empty()
            }),
        }
    }

    /// Start recording interest changes; returns what this node already
    /// subscribes to (each filter once).
    pub fn track_interest(&mut self) -> Vec<Interest> {
        self.track_interest = true;
        let mut out = Vec::new();
        let mut path = Vec::new();
        interests_rec(&self.root, &mut path, &mut out);
        out
    }

    /// The interest changes recorded since the last call, in order.
    pub fn take_interest_changes(&mut self) -> Vec<(Interest, bool)> {
        std::mem::take(&mut self.interest_changes)
    }

    /// Collect the deliveries for a message published on `topic` into `out`
    /// (cleared first), skipping No Local subscriptions of `publisher`.
    ///
    /// `shared: false` leaves shared groups out: in a cluster a message
    /// reaches a shared group through the fabric's queue group, which picks
    /// one node (this one included) per message.
    pub fn matches(&self, topic: &str, publisher: u64, shared: bool, out: &mut Vec<Delivery>) {
        out.clear();
        let dollar = topic.starts_with('$');
        let mut stack = Walk::new(&self.root);
        // The levels on the stack for the usual depth, not a vector per
        // message.
        let mut few = [""; 16];
        let many: Vec<&str>;
        let mut n = 0;
        // Split at '/' bytes: `str::split(char)` ran a general searcher,
        // 2 % of the broker's time in QoS 0 fan-in. '/' is ASCII, so every
        // cut is on a character boundary.
        let mut start = 0;
        for (i, &b) in topic.as_bytes().iter().enumerate() {
            if b == b'/' {
                if n == few.len() {
                    break;
                }
                few[n] = &topic[start..i];
                n += 1;
                start = i + 1;
            }
        }
        if n < few.len() {
            few[n] = &topic[start..];
            n += 1;
        }
        let levels: &[&str] = if n < few.len() {
            &few[..n]
        } else {
            many = topic.split('/').collect();
            &many
        };
        // Filters that added plain deliveries: from the second on, a
        // session may have been listed twice.
        let mut plain = 0u32;
        while let Some((node, depth)) = stack.pop() {
            if depth == levels.len() {
                plain += u32::from(collect(node, publisher, shared, out));
                // `a/#` also matches `a`.
                if let Some(hash) = &node.hash {
                    plain += u32::from(collect(hash, publisher, shared, out));
                }
                continue;
            }
            let wild_ok = !(dollar && depth == 0);
            if wild_ok {
                if let Some(hash) = &node.hash {
                    plain += u32::from(collect(hash, publisher, shared, out));
                }
                if let Some(plus) = &node.plus {
                    stack.push((plus, depth + 1));
                }
            }
            // A topic's own `#` or `+` is a literal level (topic names
            // cannot hold wildcards; the codec refuses them).
            if let Some(child) = node.children.get(levels[depth]) {
                stack.push((child, depth + 1));
            }
        }
        if plain > 1 {
            merge_duplicates(out);
        }
    }
}

/// The nodes a match has still to visit, with their depth: on the stack
/// for the usual topic (a heap vector per message was an allocation on
/// every publish), spilling to the heap past [`Walk::FIXED`].
struct Walk<'a> {
    fixed: [(&'a Node, usize); Walk::FIXED],
    len: usize,
    spill: Vec<(&'a Node, usize)>,
}

impl<'a> Walk<'a> {
    /// A walk pushes at most two nodes per level (`+` and the literal):
    /// enough for 16 levels.
    const FIXED: usize = 32;

    fn new(root: &'a Node) -> Self {
        Walk {
            fixed: [(root, 0); Walk::FIXED],
            len: 1,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, entry: (&'a Node, usize)) {
        if self.len < Walk::FIXED {
            self.fixed[self.len] = entry;
            self.len += 1;
        } else {
            self.spill.push(entry);
        }
    }

    /// Last in, first out: spilled entries came after the fixed ones.
    fn pop(&mut self) -> Option<(&'a Node, usize)> {
        if let Some(e) = self.spill.pop() {
            return Some(e);
        }
        self.len = self.len.checked_sub(1)?;
        Some(self.fixed[self.len])
    }
}

fn split_share(filter: &str) -> (Option<&str>, &str) {
    match mqtt_codec::topic::parse_shared(filter) {
        Some(Ok((group, inner))) => (Some(group), inner),
        _ => (None, filter),
    }
}

fn remove_rec(
    node: &mut Node,
    levels: &[&str],
    share: Option<&str>,
    inner: &str,
    session_id: u64,
) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match share {
            None => {
                let before = node.subscribers.len();
                node.subscribers.retain(|s| s.session.id != session_id);
                before != node.subscribers.len()
            }
            Some(group) => {
                let key = format!("{group}/{inner}");
                let Some(pos) = node.shared.iter().position(|g| *g.name == *key) else {
                    return false;
                };
                let g = &mut node.shared[pos];
                let before = g.members.len();
                g.members.retain(|s| s.session.id != session_id);
                let removed = before != g.members.len();
                if g.members.is_empty() {
                    node.shared.swap_remove(pos);
                }
                removed
            }
        };
    };
    let Some(child) = node.child_mut(first) else {
        return false;
    };
    let removed = remove_rec(child, rest, share, inner, session_id);
    if child.is_empty() {
        node.remove_child(first);
    }
    removed
}

fn interests_rec<'a>(node: &'a Node, path: &mut Vec<&'a str>, out: &mut Vec<Interest>) {
    if !path.is_empty() {
        let inner = path.join("/");
        if !node.subscribers.is_empty() {
            out.push(Interest::new(None, &inner));
        }
        for g in node.shared.iter().filter(|g| !g.members.is_empty()) {
            if let Some(group) = g
                .name
                .strip_suffix(inner.as_str())
                .and_then(|n| n.strip_suffix('/'))
            {
                out.push(Interest::new(Some(group), &inner));
            }
        }
    }
    for (level, child) in node.each_child() {
        path.push(level);
        interests_rec(child, path, out);
        path.pop();
    }
}

/// Add `node`'s subscribers to `out`; whether it added any plain (not
/// shared) delivery. A session has at most one subscription per filter,
/// so one node never lists a session twice: duplicates come only from
/// several matching filters, and [`merge_duplicates`] folds them once at
/// the end instead of a search per subscriber (which made a 1 → 1,000
/// fan-out quadratic).
fn collect(node: &Node, publisher: u64, shared: bool, out: &mut Vec<Delivery>) -> bool {
    let before = out.len();
    for s in &node.subscribers {
        if s.options.no_local && s.session.id == publisher {
            continue;
        }
        out.push(Delivery {
            session: s.session.clone(),
            qos: s.options.qos,
            retain_as_published: s.options.retain_as_published,
            sub_ids: s.sub_id.into_iter().collect(),
            share: None,
        });
    }
    let plain = out.len() > before;
    if !shared {
        return plain;
    }
    for g in &node.shared {
        let n = g.members.len();
        if n == 0 {
            continue;
        }
        let start = g.next.fetch_add(1, Ordering::Relaxed);
        let pick = (0..n)
            .map(|i| &g.members[(start + i) % n])
            .find(|m| m.session.is_online())
            .unwrap_or(&g.members[start % n]);
        out.push(Delivery {
            session: pick.session.clone(),
            qos: pick.options.qos,
            retain_as_published: pick.options.retain_as_published,
            sub_ids: pick.sub_id.into_iter().collect(),
            share: Some(g.name.clone()),
        });
    }
    plain
}

/// One delivery per session for its plain subscriptions: the highest QoS
/// of those that matched, Retain As Published if any asked for it, and
/// every Subscription Identifier (MQTT 5.0, 3.3.4). Deliveries through
/// shared subscriptions stay separate. Sorts by session, stably: the
/// identifiers keep their order.
fn merge_duplicates(out: &mut Vec<Delivery>) {
    out.sort_by_key(|d| (d.share.is_some(), d.session.id));
    out.dedup_by(|later, kept| {
        if later.share.is_some() || kept.share.is_some() || later.session.id != kept.session.id {
            return false;
        }
        kept.qos = kept.qos.max(later.qos);
        kept.retain_as_published |= later.retain_as_published;
        kept.sub_ids.append(&mut later.sub_ids);
        true
    });
}

impl TopicTree {
    /// Pick a member of a shared group (`group/filter`) for a message the
    /// cluster's queue group gave this node: an online one, round-robin,
    /// or any when none is online (a persistent member queues it).
    pub fn pick_for_group(&self, group_filter: &str) -> Option<Subscriber> {
        let g = self.group(group_filter)?;
        let n = g.members.len();
        if n == 0 {
            return None;
        }
        let start = g.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &g.members[(start + i) % n])
            .find(|m| m.session.is_online())
            .or_else(|| g.members.get(start % n))
            .cloned()
    }

    fn group(&self, group_filter: &str) -> Option<&SharedGroup> {
        let (_, inner) = group_filter.split_once('/')?;
        let mut node = &self.root;
        for level in inner.split('/') {
            node = node.child(level)?;
        }
        node.shared.iter().find(|g| &*g.name == group_filter)
    }

    /// Pick an online member of a shared group other than `except`, to hand
    /// over a message that `except` will never acknowledge.
    pub fn pick_shared_member(&self, group_filter: &str, except: u64) -> Option<Subscriber> {
        let g = self.group(group_filter)?;
        let n = g.members.len();
        let start = g.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &g.members[(start + i) % n])
            .find(|m| m.session.id != except && m.session.is_online())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt_codec::Protocol;

    fn session(id: u64) -> Arc<Session> {
        let s = Arc::new(Session::new(id, format!("c{id}").into(), Protocol::V5));
        s.set_online(true);
        s
    }

    fn sub(s: &Arc<Session>, qos: QoS, sub_id: Option<u32>, no_local: bool) -> Subscriber {
        Subscriber {
            session: s.clone(),
            options: SubscriptionOptions {
                qos,
                no_local,
                ..Default::default()
            },
            sub_id,
        }
    }

    fn matched(tree: &TopicTree, topic: &str, publisher: u64) -> Vec<(u64, QoS, Vec<u32>)> {
        let mut out = Vec::new();
        tree.matches(topic, publisher, true, &mut out);
        let mut v: Vec<_> = out
            .into_iter()
            .map(|mut d| {
                d.sub_ids.sort_unstable();
                (d.session.id, d.qos, d.sub_ids)
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    #[test]
    fn wildcards_dedup_and_no_local() {
        let (a, b) = (session(1), session(2));
        let mut t = TopicTree::default();
        assert!(t.subscribe("x/+/z", sub(&a, QoS::AtMostOnce, Some(1), false)));
        assert!(t.subscribe("x/#", sub(&a, QoS::ExactlyOnce, Some(2), false)));
        assert!(t.subscribe("#", sub(&b, QoS::AtLeastOnce, None, true)));
        assert!(
            !t.subscribe("#", sub(&b, QoS::AtLeastOnce, None, true)),
            "replaced, not added"
        );
        assert_eq!(t.len(), 3);
        assert_eq!(
            matched(&t, "x/y/z", 9),
            vec![
                (1, QoS::ExactlyOnce, vec![1, 2]),
                (2, QoS::AtLeastOnce, vec![])
            ]
        );
        assert_eq!(
            matched(&t, "x", 9),
            vec![
                (1, QoS::ExactlyOnce, vec![2]),
                (2, QoS::AtLeastOnce, vec![])
            ]
        );
        // No Local: b's own message is not sent back to it.
        assert_eq!(matched(&t, "q", 2), vec![]);
        // `$` topics are not matched by a leading wildcard.
        assert_eq!(matched(&t, "$SYS/x", 9), vec![]);
        assert!(t.unsubscribe("x/#", 1));
        assert!(!t.unsubscribe("x/#", 1));
        assert_eq!(matched(&t, "x/y/z", 9)[0], (1, QoS::AtMostOnce, vec![1]));
    }

    /// Many sessions over several overlapping filters, with a shared
    /// group among them: one plain delivery per session (highest QoS,
    /// every identifier), the shared one apart.
    #[test]
    fn overlapping_filters_give_one_delivery_per_session() {
        let filters = ["a/b/c", "a/+/c", "a/#", "#"];
        let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
        let mut t = TopicTree::default();
        let mut expected = Vec::new();
        let sessions: Vec<_> = (1..=300u64).map(session).collect();
        for (i, s) in sessions.iter().enumerate() {
            // Which filters this session holds: a varying subset.
            let mask = (i * 7 + 3) % 16;
            let mut best = None;
            let mut ids = Vec::new();
            for (f, filter) in filters.iter().enumerate() {
                if mask & (1 << f) == 0 {
                    continue;
                }
                let q = qos[(i + f) % 3];
                let id = (i * 10 + f) as u32 + 1;
                t.subscribe(filter, sub(s, q, Some(id), false));
                best = best.max(Some(q));
                ids.push(id);
            }
            if let Some(q) = best {
                expected.push((s.id, q, ids));
            }
        }
        let member = session(1_000);
        t.subscribe("$share/g/a/#", sub(&member, QoS::AtLeastOnce, None, false));
        let mut out = Vec::new();
        t.matches("a/b/c", 9, true, &mut out);
        let shared: Vec<_> = out.iter().filter(|d| d.share.is_some()).collect();
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].session.id, 1_000);
        let mut plain: Vec<_> = out
            .into_iter()
            .filter(|d| d.share.is_none())
            .map(|mut d| {
                d.sub_ids.sort_unstable();
                (d.session.id, d.qos, d.sub_ids)
            })
            .collect();
        plain.sort_by_key(|x| x.0);
        assert_eq!(plain, expected);
    }

    #[test]
    fn wildcard_children_are_pruned_and_deep_topics_match() {
        let a = session(1);
        let mut t = TopicTree::default();
        assert!(t.subscribe("+/+/#", sub(&a, QoS::AtMostOnce, None, false)));
        assert!(t.subscribe("a/+", sub(&a, QoS::AtMostOnce, Some(5), false)));
        // Deeper than the 16 levels matched without a vector.
        let deep = vec!["l"; 40].join("/");
        assert_eq!(matched(&t, &deep, 9), vec![(1, QoS::AtMostOnce, vec![])]);
        assert_eq!(matched(&t, "a/b", 9), vec![(1, QoS::AtMostOnce, vec![5])]);
        assert_eq!(
            t.track_interest().len(),
            2,
            "wildcard levels are walked like literal ones"
        );
        assert!(t.unsubscribe("+/+/#", 1));
        assert!(t.unsubscribe("a/+", 1));
        assert!(t.root.is_empty(), "every wildcard node was removed");
        assert_eq!(matched(&t, &deep, 9), vec![]);
    }

    #[test]
    fn a_walk_deeper_than_its_fixed_stack_finds_every_match() {
        // Each level adds a `+` branch and a literal one: 40 levels keep
        // more than `Walk::FIXED` nodes waiting at once.
        let (a, b, c) = (session(1), session(2), session(3));
        let mut t = TopicTree::default();
        let pluses = vec!["+"; 40].join("/");
        let literal = vec!["l"; 40].join("/");
        let mixed = format!("{}/+", vec!["l"; 39].join("/"));
        let mixed_first = format!("+/{}", vec!["l"; 39].join("/"));
        t.subscribe(&pluses, sub(&a, QoS::AtMostOnce, Some(1), false));
        t.subscribe(&literal, sub(&b, QoS::AtMostOnce, Some(2), false));
        t.subscribe(&mixed, sub(&c, QoS::AtMostOnce, Some(3), false));
        t.subscribe(&mixed_first, sub(&c, QoS::AtMostOnce, Some(4), false));
        assert_eq!(
            matched(&t, &literal, 9),
            vec![
                (1, QoS::AtMostOnce, vec![1]),
                (2, QoS::AtMostOnce, vec![2]),
                (3, QoS::AtMostOnce, vec![3, 4]),
            ]
        );
    }

    #[test]
    fn shared_groups_round_robin_over_online_members() {
        let (a, b, c) = (session(1), session(2), session(3));
        let mut t = TopicTree::default();
        t.subscribe("$share/g/s/+", sub(&a, QoS::AtLeastOnce, None, false));
        t.subscribe("$share/g/s/+", sub(&b, QoS::AtLeastOnce, None, false));
        t.subscribe("s/+", sub(&c, QoS::AtMostOnce, None, false));
        let mut counts = [0usize; 4];
        for _ in 0..10 {
            for (id, _, _) in matched(&t, "s/1", 9) {
                counts[id as usize] += 1;
            }
        }
        assert_eq!(counts[1..], [5, 5, 10]);
        b.set_online(false);
        let mut only_a = 0;
        for _ in 0..4 {
            only_a += matched(&t, "s/1", 9).iter().filter(|m| m.0 == 1).count();
        }
        assert_eq!(only_a, 4, "offline members are skipped");
        assert_eq!(t.pick_shared_member("g/s/+", 1).map(|s| s.session.id), None);
        b.set_online(true);
        assert_eq!(
            t.pick_shared_member("g/s/+", 1).map(|s| s.session.id),
            Some(2)
        );
        assert!(t.unsubscribe("$share/g/s/+", 1));
        assert!(t.unsubscribe("$share/g/s/+", 2));
        assert_eq!(t.len(), 1);
    }
}
