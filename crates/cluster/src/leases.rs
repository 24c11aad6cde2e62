//! Leases: one owner in the cluster for each of a set of keys (the rules a
//! node evaluates for everyone), held in the JetStream key-value bucket
//! `{cluster}_leases` and taken over within seconds when the owner dies.
//!
//! Every node that wants a key runs the same loop every [`RENEW`]:
//!
//! - the *preferred* owner of a key is chosen by rendezvous hashing over
//!   the live members (the `{cluster}_nodes` bucket), so the keys spread
//!   over the nodes and a member joining or leaving moves only its share;
//! - a vacant key is created (`create`: only if absent, so exactly one
//!   node wins) by its preferred node — or by anyone once it has been
//!   vacant for a few rounds, in case the preferred node does not want it
//!   (it has not loaded the rule yet) or has just died (the member list
//!   keeps a dead node for ten seconds);
//! - the owner rewrites its entry with the revision it holds (`update`: a
//!   compare-and-set, so a lease lost to another node is noticed) and
//!   hands the key over (deletes it) when another live node is preferred;
//! - entries live [`LEASE_TTL`] after their last write (the bucket's
//!   `max_age`): a node killed with `kill -9` loses its keys that long
//!   after its last renewal, and the preferred survivor takes them;
//! - a node that could not renew a key for [`SAFE_HOLD`] stops treating it
//!   as its own before the entry can expire, so two nodes never both
//!   believe they own a key for long (a cut-off node stops first).
//!
//! What the owner does with a key is its own business: the rule service
//! evaluates a rule only on its owner, which the fabric sends every node's
//! matching messages (`Broker::set_observed_remote`); the OTA service
//! ticks a campaign (`ota.{campaign}`) only on its owner.

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a lease outlives its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often an owner renews (and everyone looks for vacant keys).
pub const RENEW: Duration = Duration::from_secs(1);
/// An owner that could not renew for this long gives the key up itself,
/// well before the entry expires for the others.
pub const SAFE_HOLD: Duration = Duration::from_secs(3);
/// A key taken because its preferred node did not take it is kept this
/// long before being handed to that node (no ping-pong while a node is
/// still loading).
const STICKY: Duration = Duration::from_secs(60);
/// A key vacant this long has no preferred node willing to take it (that
/// node would have within one round): anyone may.
const VACANT_GRACE: Duration = Duration::from_millis(2500);
/// Any one request to the bucket.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// The node a key should belong to among `nodes`: the highest hash of
/// (key, node) — rendezvous hashing, so every node computes the same
/// answer from the same member list, and a member leaving moves only the
/// keys it preferred.
pub fn preferred_owner<'a>(key: &str, nodes: &'a [String]) -> Option<&'a str> {
    nodes
        .iter()
        .max_by_key(|n| (score(key, n), n.as_str()))
        .map(String::as_str)
}

fn score(key: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain([0xff]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV alone clusters on similar inputs; a final mix spreads them.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// This node's side of a set of leases: say which keys it wants; watch
/// which it owns.
pub struct Leases {
    wanted: watch::Sender<BTreeSet<String>>,
    owned: watch::Receiver<BTreeSet<String>>,
}

impl Leases {
    /// Replace the keys this node wants to own (it owns a share of them).
    pub fn want(&self, keys: BTreeSet<String>) {
        self.wanted.send_if_modified(|w| {
            if *w == keys {
                return false;
            }
            *w = keys;
            true
        });
    }

    /// The keys this node owns, updated as leases are won and lost.
    pub fn owned(&self) -> watch::Receiver<BTreeSet<String>> {
        self.owned.clone()
    }
}

/// Start the loop on the fabric's runtime (`handle`). `prefix` names the
/// kind of key (`rule`), so several sets can share the bucket.
pub(crate) fn start(
    handle: &tokio::runtime::Handle,
    js: jetstream::Context,
    bucket: String,
    nodes: kv::Store,
    me: String,
    prefix: &str,
) -> Leases {
    let (wanted, wanted_rx) = watch::channel(BTreeSet::new());
    let (owned_tx, owned) = watch::channel(BTreeSet::new());
    let prefix = prefix.to_string();
    handle.spawn(async move {
        let store = loop {
            match js
                .create_or_update_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "m2mhub: one owner per key (rules evaluated cluster-wide)".into(),
                    history: 1,
                    max_age: LEASE_TTL,
                    ..Default::default()
                })
                .await
            {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(bucket, error = %e, "cannot open the leases bucket; retrying");
                    tokio::time::sleep(RENEW).await;
                }
            }
        };
        run(store, nodes, me, prefix, wanted_rx, owned_tx).await;
    });
    Leases { wanted, owned }
}

struct Held {
    revision: u64,
    renewed: Instant,
    since: Instant,
    /// Taken while vacant although another node was preferred.
    fallback: bool,
}

async fn run(
    store: kv::Store,
    nodes: kv::Store,
    me: String,
    prefix: String,
    mut wanted_rx: watch::Receiver<BTreeSet<String>>,
    owned_tx: watch::Sender<BTreeSet<String>>,
) {
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut vacant_since: HashMap<String, Instant> = HashMap::new();
    let mut live: Vec<String> = vec![me.clone()];
    let mut tick = tokio::time::interval(RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let entry_key = |k: &str| format!("{prefix}.{}", crate::subject::encode_topic(k));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = wanted_rx.changed() => if r.is_err() {
                // Nobody wants anything any more (the node is stopping):
                // hand everything over at once.
                for (k, h) in held.drain() {
                    let _ = tokio::time::timeout(OP_TIMEOUT, store.delete_expect_revision(entry_key(&k), Some(h.revision))).await;
                }
                owned_tx.send_replace(BTreeSet::new());
                return;
            },
        }
        let wanted = wanted_rx.borrow_and_update().clone();
        if let Some(mut l) = live_nodes(&nodes).await {
            if !l.contains(&me) {
                l.push(me.clone());
            }
            l.sort();
            live = l;
        }
        let now = Instant::now();
        // Keys no longer wanted: let them go.
        let dropped: Vec<String> = held
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for k in dropped {
            if let Some(h) = held.remove(&k) {
                let _ = tokio::time::timeout(
                    OP_TIMEOUT,
                    store.delete_expect_revision(entry_key(&k), Some(h.revision)),
                )
                .await;
            }
        }
        vacant_since.retain(|k, _| wanted.contains(k));
        for k in &wanted {
            let preferred = preferred_owner(k, &live).unwrap_or(&me) == me;
            let key = entry_key(k);
            if let Some(h) = held.get(k) {
                let sticky = h.fallback && now.duration_since(h.since) < STICKY;
                if !preferred && !sticky {
                    let rev = h.revision;
                    held.remove(k);
                    vacant_since.remove(k);
                    let _ = tokio::time::timeout(
                        OP_TIMEOUT,
                        store.delete_expect_revision(&key, Some(rev)),
                    )
                    .await;
                    tracing::info!(key = %k, "lease handed over to its preferred node");
                    continue;
                }
                match tokio::time::timeout(
                    OP_TIMEOUT,
                    store.update(&key, me.clone().into(), h.revision),
                )
                .await
                {
                    Ok(Ok(rev)) => {
                        if let Some(h) = held.get_mut(k) {
                            h.revision = rev;
                            h.renewed = now;
                        }
                    }
                    Ok(Err(e)) => {
                        // Someone else holds it now (ours expired).
                        tracing::warn!(key = %k, error = %e, "lease lost");
                        held.remove(k);
                    }
                    Err(_) => {
                        if held
                            .get(k)
                            .is_some_and(|h| h.renewed.elapsed() >= SAFE_HOLD)
                        {
                            tracing::warn!(key = %k, "lease not renewed in time; given up");
                            held.remove(k);
                        }
                    }
                }
                continue;
            }
            let entry = match tokio::time::timeout(OP_TIMEOUT, store.entry(key.clone())).await {
                Ok(Ok(e)) => e,
                _ => continue,
            };
            let vacant = match entry {
                None => true,
                Some(e) => matches!(e.operation, kv::Operation::Delete | kv::Operation::Purge),
            };
            if !vacant {
                vacant_since.remove(k);
                continue;
            }
            let since = *vacant_since.entry(k.clone()).or_insert(now);
            let fallback = !preferred;
            if preferred || now.duration_since(since) >= VACANT_GRACE {
                if let Ok(Ok(rev)) =
                    tokio::time::timeout(OP_TIMEOUT, store.create(&key, me.clone().into())).await
                {
                    tracing::info!(key = %k, fallback, "lease taken");
                    held.insert(
                        k.clone(),
                        Held {
                            revision: rev,
                            renewed: now,
                            since: now,
                            fallback,
                        },
                    );
                    vacant_since.remove(k);
                }
            }
        }
        let owned: BTreeSet<String> = held.keys().cloned().collect();
        owned_tx.send_if_modified(|o| {
            if *o == owned {
                return false;
            }
            *o = owned;
            true
        });
    }
}

/// The members whose entries are in the nodes bucket; `None` if it cannot
/// be read (the previous list is kept).
async fn live_nodes(nodes: &kv::Store) -> Option<Vec<String>> {
    let read = async {
        let mut keys = nodes.keys().await.ok()?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let Ok(k) = k else { continue };
            if let Ok(Some(v)) = nodes.get(&k).await {
                if let Ok(info) = serde_json::from_slice::<crate::NodeInfo>(&v) {
                    out.push(info.node_id);
                }
            }
        }
        Some(out)
    };
    tokio::time::timeout(OP_TIMEOUT, read).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_agrees_and_keys_spread() {
        let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for i in 0..3000 {
            let k = format!("rule-{i}");
            let a = preferred_owner(&k, &nodes).expect("owner");
            // Order of the member list does not matter.
            let mut rev = nodes.clone();
            rev.reverse();
            assert_eq!(preferred_owner(&k, &rev), Some(a));
            *count.entry(a).or_default() += 1;
        }
        for n in ["n1", "n2", "n3"] {
            let c = count.get(n).copied().unwrap_or(0);
            assert!(
                (800..=1200).contains(&c),
                "{n} prefers {c} of 3000: {count:?}"
            );
        }
        assert_eq!(preferred_owner("x", &[]), None);
    }

    #[test]
    fn a_member_leaving_moves_only_its_keys() {
        let three: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        let two: Vec<String> = ["n1", "n3"].iter().map(|s| s.to_string()).collect();
        for i in 0..1000 {
            let k = format!("k{i}");
            let before = preferred_owner(&k, &three).expect("owner");
            let after = preferred_owner(&k, &two).expect("owner");
            if before != "n2" {
                assert_eq!(before, after, "{k} moved although its owner stayed");
            }
        }
    }
}
