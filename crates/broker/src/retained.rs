//! Retained messages, indexed by topic level so a wildcard SUBSCRIBE finds
//! its retained messages without scanning all of them.

use crate::message::Message;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::Instant;

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

#[derive(Default)]
pub(crate) struct RetainedStore {
    root: Node,
    count: usize,
}

impl RetainedStore {
    pub fn len(&self) -> usize {
        self.count
    }

    /// Set (Some) or clear (None) the retained message of `topic`.
    pub fn set(&mut self, topic: &str, message: Option<Arc<Message>>) {
        match message {
            Some(m) => {
                let mut node = &mut self.root;
                for level in topic.split('/') {
                    node = node.children.entry(level.into()).or_default();
                }
                if node.message.replace(m).is_none() {
                    self.count += 1;
                }
            }
            None => {
                let levels: Vec<&str> = topic.split('/').collect();
                if remove_rec(&mut self.root, &levels) {
                    self.count -= 1;
                }
            }
        }
    }

    /// Retained messages matching a (non-shared) filter, expired ones skipped.
    pub fn matching(&self, filter: &str, now: Instant, out: &mut Vec<Arc<Message>>) {
        let levels: Vec<&str> = filter.split('/').collect();
        walk(&self.root, &levels, 0, now, out);
    }
}

fn remove_rec(node: &mut Node, levels: &[&str]) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.message.take().is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_rec(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn push_live(node: &Node, now: Instant, out: &mut Vec<Arc<Message>>) {
    if let Some(m) = &node.message {
        if !m.is_expired(now) {
            out.push(m.clone());
        }
    }
}

fn walk(node: &Node, levels: &[&str], depth: usize, now: Instant, out: &mut Vec<Arc<Message>>) {
    let Some(level) = levels.get(depth) else {
        push_live(node, now, out);
        return;
    };
    match *level {
        "#" => {
            // `a/#` matches `a` itself and everything below it.
            push_live(node, now, out);
            let mut stack: Vec<(&Node, bool)> = node
                .children
                .iter()
                .map(|(k, n)| (n, depth == 0 && k.starts_with('$')))
                .collect();
            while let Some((n, skip)) = stack.pop() {
                if skip {
                    continue;
                }
                push_live(n, now, out);
                stack.extend(n.children.values().map(|c| (c, false)));
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                walk(child, levels, depth + 1, now, out);
            }
        }
        exact => {
            if let Some(child) = node.children.get(exact) {
                walk(child, levels, depth + 1, now, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt_codec::QoS;

    fn msg(topic: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            publisher: 0,
        })
    }

    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.matching(filter, Instant::now(), &mut out);
        let mut v: Vec<String> = out.iter().map(|m| m.topic.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let mut s = RetainedStore::default();
        for t in ["a", "a/b", "a/c", "a/b/c", "$SYS/x", "/x"] {
            s.set(t, Some(msg(t)));
        }
        assert_eq!(s.len(), 6);
        assert_eq!(topics(&s, "a/#"), ["a", "a/b", "a/b/c", "a/c"]);
        assert_eq!(topics(&s, "a/+"), ["a/b", "a/c"]);
        assert_eq!(topics(&s, "#"), ["/x", "a", "a/b", "a/b/c", "a/c"]);
        assert_eq!(topics(&s, "+/x"), ["/x"]);
        assert_eq!(topics(&s, "$SYS/#"), ["$SYS/x"]);
        s.set("a/b", None);
        assert_eq!(topics(&s, "a/+"), ["a/c"]);
        assert_eq!(topics(&s, "a/b/c"), ["a/b/c"]);
        assert_eq!(s.len(), 5);
    }
}
