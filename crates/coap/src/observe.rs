//! Observe (RFC 7641), server side, sans-IO: who observes what, and which
//! notifications to send.
//!
//! An observer is a (client address, token) pair registered under an
//! application-chosen key (several URIs may feed one key, and a key may
//! have many observers). [`Observers::notify`] turns one new
//! representation into one [`Notification`] per observer, numbered with a
//! 24-bit sequence that only increases (one counter for the server, which
//! keeps each resource's numbers increasing too).
//!
//! Notifications are Non-confirmable by default. One is Confirmable when
//! the observer has not been heard from yet (it has not acknowledged
//! anything: a registration from a spoofed address then costs the victim
//! one retransmitted message, not a stream), every
//! [`ObserveConfig::con_every`] notifications, and at least once per
//! [`ObserveConfig::con_interval`] (RFC 7641 §4.5: 24 h at most), so a
//! client that went away is found out: a Confirmable notification that
//! times out, or any notification answered with Reset, removes the
//! observer ([`Observers::failed`]). While a Confirmable notification is in
//! flight, newer ones replace it and keep its retransmission state
//! (§4.5.2): [`Notification::replaces`].

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use crate::exchange::ExchangeId;
use crate::message::{Code, Message, MessageType, Token};

/// Observe settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveConfig {
    /// The most observers in total.
    pub max_observers: usize,
    /// Every this many notifications to one observer, one is Confirmable.
    pub con_every: u32,
    /// At least this often a notification is Confirmable.
    pub con_interval: Duration,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        ObserveConfig {
            max_observers: 4096,
            con_every: 16,
            con_interval: Duration::from_secs(24 * 3600),
        }
    }
}

/// The observer table is full: the response goes out without Observe,
/// which tells the client it is not registered (RFC 7641 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("too many observers")]
pub struct ObserversFull;

type ObserverKey = (SocketAddr, Token);

#[derive(Debug)]
struct Observer {
    key: String,
    uri: String,
    request_len: usize,
    since_con: u32,
    last_con: Instant,
    /// The Confirmable notification in flight, if any.
    in_flight: Option<ExchangeId>,
    /// The last Non-confirmable notification (a Reset to it cancels).
    last_non: Option<ExchangeId>,
}

/// One notification to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The observer's address.
    pub peer: SocketAddr,
    /// The URI it registered with (for the Block2 cache).
    pub uri: String,
    /// The size of its registration request (for the amplification limit
    /// while its address is not verified).
    pub request_len: usize,
    /// The message: type, token, Observe and Content-Format set; the
    /// message id is the endpoint's to assign.
    pub message: Message,
    /// The in-flight Confirmable notification this one replaces.
    pub replaces: Option<ExchangeId>,
}

/// The observer registry. See the module documentation.
#[derive(Debug)]
pub struct Observers {
    config: ObserveConfig,
    observers: HashMap<ObserverKey, Observer>,
    by_key: HashMap<String, BTreeSet<ObserverKey>>,
    by_exchange: HashMap<ExchangeId, ObserverKey>,
    seq: u32,
}

impl Observers {
    /// An empty registry.
    pub fn new(config: ObserveConfig) -> Observers {
        Observers {
            config,
            observers: HashMap::new(),
            by_key: HashMap::new(),
            by_exchange: HashMap::new(),
            seq: 0,
        }
    }

    /// Registered observers.
    pub fn len(&self) -> usize {
        self.observers.len()
    }

    /// No observer.
    pub fn is_empty(&self) -> bool {
        self.observers.is_empty()
    }

    /// Observers of `key`.
    pub fn count(&self, key: &str) -> usize {
        self.by_key.get(key).map_or(0, BTreeSet::len)
    }

    /// The next Observe sequence number (24 bits, wrapping).
    pub fn next_seq(&mut self) -> u32 {
        self.seq = (self.seq + 1) & 0xFF_FFFF;
        self.seq
    }

    /// Register (or re-register: same address and token) an observer of
    /// `key` that asked with a request of `request_len` bytes to `uri`;
    /// returns the Observe value for the registration response.
    pub fn register(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        token: Token,
        key: &str,
        uri: &str,
        request_len: usize,
    ) -> Result<u32, ObserversFull> {
        let existing = self.observers.contains_key(&(peer, token));
        if !existing && self.observers.len() >= self.config.max_observers {
            return Err(ObserversFull);
        }
        self.deregister(peer, token);
        self.observers.insert(
            (peer, token),
            Observer {
                key: key.to_owned(),
                uri: uri.to_owned(),
                request_len,
                since_con: 0,
                last_con: now,
                in_flight: None,
                last_non: None,
            },
        );
        self.by_key
            .entry(key.to_owned())
            .or_default()
            .insert((peer, token));
        Ok(self.next_seq())
    }

    /// Remove an observer (a GET with Observe 1 or without Observe from the
    /// same address and token, RFC 7641 §3.6 / §4.1). Returns whether it was
    /// registered.
    pub fn deregister(&mut self, peer: SocketAddr, token: Token) -> bool {
        let Some(obs) = self.observers.remove(&(peer, token)) else {
            return false;
        };
        if let Some(set) = self.by_key.get_mut(&obs.key) {
            set.remove(&(peer, token));
            if set.is_empty() {
                self.by_key.remove(&obs.key);
            }
        }
        for id in [obs.in_flight, obs.last_non].into_iter().flatten() {
            self.by_exchange.remove(&id);
        }
        true
    }

    /// One notification per observer of `key`.
    pub fn notify(
        &mut self,
        now: Instant,
        key: &str,
        payload: Bytes,
        content_format: Option<u16>,
        verified: impl Fn(SocketAddr) -> bool,
    ) -> Vec<Notification> {
        let Some(set) = self.by_key.get(key) else {
            return Vec::new();
        };
        let targets: Vec<ObserverKey> = set.iter().copied().collect();
        let seq = self.next_seq();
        let mut out = Vec::with_capacity(targets.len());
        for (peer, token) in targets {
            let Some(obs) = self.observers.get_mut(&(peer, token)) else {
                continue;
            };
            let con = obs.in_flight.is_some()
                || !verified(peer)
                || obs.since_con + 1 >= self.config.con_every
                || now.saturating_duration_since(obs.last_con) >= self.config.con_interval;
            let mtype = if con {
                obs.since_con = 0;
                obs.last_con = now;
                MessageType::Confirmable
            } else {
                obs.since_con += 1;
                MessageType::NonConfirmable
            };
            let mut message = Message::new(mtype, Code::CONTENT, 0, token);
            message.set_observe(seq);
            if let Some(cf) = content_format {
                message.set_content_format(cf);
            }
            message.payload = payload.clone();
            out.push(Notification {
                peer,
                uri: obs.uri.clone(),
                request_len: obs.request_len,
                message,
                replaces: obs.in_flight,
            });
        }
        out
    }

    /// Record that the notification to `peer`/`token` went out under `id`.
    pub fn sent(&mut self, peer: SocketAddr, token: Token, id: ExchangeId, con: bool) {
        let Some(obs) = self.observers.get_mut(&(peer, token)) else {
            return;
        };
        let old = if con {
            obs.in_flight.replace(id)
        } else {
            obs.last_non.replace(id)
        };
        if let Some(old) = old.filter(|&o| o != id) {
            self.by_exchange.remove(&old);
        }
        self.by_exchange.insert(id, (peer, token));
    }

    /// A Confirmable notification was acknowledged.
    pub fn acknowledged(&mut self, id: ExchangeId) {
        if let Some(key) = self.by_exchange.remove(&id) {
            if let Some(obs) = self.observers.get_mut(&key) {
                if obs.in_flight == Some(id) {
                    obs.in_flight = None;
                }
            }
        }
    }

    /// A notification timed out or was reset: the observer is removed.
    /// Returns the removed observer's address and token.
    pub fn failed(&mut self, id: ExchangeId) -> Option<(SocketAddr, Token)> {
        let (peer, token) = self.by_exchange.remove(&id)?;
        self.deregister(peer, token);
        Some((peer, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 2], n))
    }

    fn tok(n: u8) -> Token {
        Token::new(&[n]).unwrap()
    }

    fn cfg() -> ObserveConfig {
        ObserveConfig {
            max_observers: 3,
            con_every: 4,
            con_interval: Duration::from_secs(3600),
        }
    }

    #[test]
    fn register_notify_deregister() {
        let t0 = Instant::now();
        let mut obs = Observers::new(cfg());
        let s0 = obs
            .register(t0, peer(1), tok(1), "dev/1", "d/1", 20)
            .unwrap();
        obs.register(t0, peer(2), tok(2), "dev/1", "d/1", 20)
            .unwrap();
        obs.register(t0, peer(2), tok(3), "dev/2", "d/2", 20)
            .unwrap();
        assert_eq!(obs.count("dev/1"), 2);
        let n = obs.notify(t0, "dev/1", Bytes::from_static(b"1"), Some(50), |_| true);
        assert_eq!(n.len(), 2);
        for x in &n {
            assert!(x.message.observe().unwrap() > s0, "sequence increases");
            assert_eq!(x.message.content_format(), Some(50));
            assert_eq!(x.message.mtype, MessageType::NonConfirmable);
        }
        assert_eq!(n[0].message.token, tok(1));
        assert!(obs.deregister(peer(1), tok(1)));
        assert!(!obs.deregister(peer(1), tok(1)));
        assert_eq!(
            obs.notify(t0, "dev/1", Bytes::new(), None, |_| true).len(),
            1
        );
        assert!(obs
            .notify(t0, "nobody", Bytes::new(), None, |_| true)
            .is_empty());
    }

    #[test]
    fn observer_cap_refuses_new_but_not_re_registration() {
        let t0 = Instant::now();
        let mut obs = Observers::new(cfg());
        for i in 0..3 {
            obs.register(t0, peer(i), tok(1), "k", "k", 20).unwrap();
        }
        assert_eq!(
            obs.register(t0, peer(9), tok(1), "k", "k", 20),
            Err(ObserversFull)
        );
        assert!(obs.register(t0, peer(0), tok(1), "other", "o", 20).is_ok());
        assert_eq!(obs.count("k"), 2);
    }

    #[test]
    fn every_nth_notification_and_unverified_observers_get_con() {
        let t0 = Instant::now();
        let mut obs = Observers::new(cfg());
        obs.register(t0, peer(1), tok(1), "k", "k", 20).unwrap();
        let types: Vec<MessageType> = (0..8)
            .map(|i| {
                let n = obs.notify(t0, "k", Bytes::new(), None, |_| true);
                obs.sent(peer(1), tok(1), ExchangeId(i), false);
                n[0].message.mtype
            })
            .collect();
        use MessageType::{Confirmable as C, NonConfirmable as N};
        assert_eq!(types, vec![N, N, N, C, N, N, N, C]);
        // An observer that never answered anything gets CON.
        let n = obs.notify(t0, "k", Bytes::new(), None, |_| false);
        assert_eq!(n[0].message.mtype, C);
        // And a day-old last CON forces one.
        let n = obs.notify(
            t0 + Duration::from_secs(3601),
            "k",
            Bytes::new(),
            None,
            |_| true,
        );
        assert_eq!(n[0].message.mtype, C);
    }

    #[test]
    fn failed_con_notification_removes_the_observer_and_ack_keeps_it() {
        let t0 = Instant::now();
        let mut obs = Observers::new(cfg());
        obs.register(t0, peer(1), tok(1), "k", "k", 20).unwrap();
        let n = obs.notify(t0, "k", Bytes::new(), None, |_| false);
        obs.sent(peer(1), tok(1), ExchangeId(10), true);
        assert_eq!(n[0].replaces, None);
        // A newer one while it is in flight replaces it.
        let n = obs.notify(t0, "k", Bytes::new(), None, |_| true);
        assert_eq!(n[0].replaces, Some(ExchangeId(10)));
        assert_eq!(n[0].message.mtype, MessageType::Confirmable);
        obs.acknowledged(ExchangeId(10));
        assert_eq!(obs.len(), 1);
        let _ = obs.notify(t0, "k", Bytes::new(), None, |_| false);
        obs.sent(peer(1), tok(1), ExchangeId(11), true);
        assert_eq!(obs.failed(ExchangeId(11)), Some((peer(1), tok(1))));
        assert!(obs.is_empty());
        assert!(obs.by_exchange.is_empty());
        assert!(obs.by_key.is_empty());
    }

    #[test]
    fn sequence_wraps_at_24_bits() {
        let mut obs = Observers::new(cfg());
        obs.seq = 0xFF_FFFF;
        assert_eq!(obs.next_seq(), 0);
    }
}
