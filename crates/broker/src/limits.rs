//! DoS limits that span connections: open connections and connection
//! attempts per source IP, the global connection rate, failed
//! authentications per IP and connect flapping per client id.
//!
//! State lives in maps sharded by key (16 mutexes), so accepts on different
//! cores rarely contend, and is purged by the broker's background task once
//! it no longer constrains anything: entries exist only for addresses and
//! client ids seen recently. Limits of one connection (the publish rate)
//! live with the connection, allocated only when configured.

use crate::ban::ip_key;
use crate::config::BrokerConfig;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: f64, burst: f64, now: Instant) -> TokenBucket {
        let burst = burst.max(1.0);
        TokenBucket {
            rate: rate_per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now` (it then constrains
    /// nothing and can be forgotten).
    pub fn is_full(&self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + dt * self.rate >= self.burst
    }
}

/// A fixed window counter: how many events since the window started.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    /// Count one event; returns the count within the current window.
    fn hit(&mut self, now: Instant, len: Duration) -> u32 {
        if now.saturating_duration_since(self.start) >= len {
            self.start = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count
    }

    fn expired(&self, now: Instant, len: Duration) -> bool {
        self.count == 0 || now.saturating_duration_since(self.start) >= len
    }
}

const SHARDS: usize = 16;

/// A hash map split into independently locked shards.
struct Sharded<K, V> {
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<K, V>>]>,
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    fn new() -> Self {
        Sharded {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> &Mutex<HashMap<K, V>> {
        &self.shards[self.hasher.hash_one(k) as usize % SHARDS]
    }

    fn retain(&self, mut f: impl FnMut(&V) -> bool) {
        for s in self.shards.iter() {
            s.lock().retain(|_, v| f(v));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

struct IpState {
    conns: u32,
    rate: Option<TokenBucket>,
    auth: Window,
}

/// Why a connection attempt is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateRefusal {
    Global,
    PerIp,
}

pub(crate) struct Limits {
    ips: Sharded<IpAddr, IpState>,
    clients: Sharded<Arc<str>, Window>,
    /// Failed authentications per client id (a device id under attack from
    /// many addresses).
    client_auth: Sharded<Arc<str>, Window>,
    global: Option<Mutex<TokenBucket>>,
    max_per_ip: u32,
    rate_per_ip: u32,
    burst_per_ip: u32,
    auth_threshold: u32,
    auth_window: Duration,
    flap_threshold: u32,
    flap_window: Duration,
}

impl Limits {
    pub fn new(cfg: &BrokerConfig, now: Instant) -> Limits {
        Limits {
            ips: Sharded::new(),
            clients: Sharded::new(),
            client_auth: Sharded::new(),
            global: (cfg.max_connect_rate > 0).then(|| {
                let r = f64::from(cfg.max_connect_rate);
                Mutex::new(TokenBucket::new(r, 2.0 * r, now))
            }),
            max_per_ip: cfg.max_connections_per_ip.min(u32::MAX as usize) as u32,
            rate_per_ip: cfg.max_connect_rate_per_ip,
            burst_per_ip: cfg.connect_burst_per_ip,
            auth_threshold: cfg.auth_failures_before_ban,
            auth_window: cfg.auth_failure_window,
            flap_threshold: cfg.max_connects_per_client_id,
            flap_window: cfg.flapping_window,
        }
    }

    fn new_ip_state(&self, now: Instant) -> IpState {
        IpState {
            conns: 0,
            rate: (self.rate_per_ip > 0).then(|| {
                TokenBucket::new(
                    f64::from(self.rate_per_ip),
                    f64::from(self.burst_per_ip),
                    now,
                )
            }),
            auth: Window {
                start: now,
                count: 0,
            },
        }
    }

    /// Whether open connections are counted per IP (then every successful
    /// [`Limits::open`] must be paired with [`Limits::close`]).
    pub fn counts_connections(&self) -> bool {
        self.max_per_ip > 0
    }

    /// A connection from `ip` was accepted: count it, unless the IP is at
    /// its limit (then false, and nothing is counted).
    pub fn open(&self, ip: IpAddr, now: Instant) -> bool {
        if self.max_per_ip == 0 {
            return true;
        }
        let ip = ip_key(ip);
        let mut map = self.ips.shard(&ip).lock();
        let st = map.entry(ip).or_insert_with(|| self.new_ip_state(now));
        if st.conns >= self.max_per_ip {
            return false;
        }
        st.conns += 1;
        true
    }

    /// A connection counted by [`Limits::open`] ended.
    pub fn close(&self, ip: IpAddr) {
        if self.max_per_ip == 0 {
            return;
        }
        let ip = ip_key(ip);
        let mut map = self.ips.shard(&ip).lock();
        if let Some(st) = map.get_mut(&ip) {
            st.conns = st.conns.saturating_sub(1);
        }
    }

    /// A connection attempt from `ip`: take a token from the global and the
    /// per-IP bucket.
    pub fn attempt(&self, ip: IpAddr, now: Instant) -> Result<(), RateRefusal> {
        if self.rate_per_ip > 0 {
            let ip = ip_key(ip);
            let mut map = self.ips.shard(&ip).lock();
            let st = map.entry(ip).or_insert_with(|| self.new_ip_state(now));
            if let Some(b) = &mut st.rate {
                if !b.try_take(now) {
                    return Err(RateRefusal::PerIp);
                }
            }
        }
        if let Some(g) = &self.global {
            if !g.lock().try_take(now) {
                return Err(RateRefusal::Global);
            }
        }
        Ok(())
    }

    /// A failed authentication from `ip`. True when it reaches the ban
    /// threshold within the window (the count then starts over).
    pub fn auth_failed(&self, ip: IpAddr, now: Instant) -> bool {
        if self.auth_threshold == 0 {
            return false;
        }
        let ip = ip_key(ip);
        let mut map = self.ips.shard(&ip).lock();
        let st = map.entry(ip).or_insert_with(|| self.new_ip_state(now));
        if st.auth.hit(now, self.auth_window) >= self.auth_threshold {
            st.auth.count = 0;
            return true;
        }
        false
    }

    /// A failed authentication naming `client_id`: true when that client id
    /// reached the threshold within the window (the count then starts over).
    pub fn auth_failed_client(&self, client_id: &str, now: Instant) -> bool {
        if self.auth_threshold == 0 || client_id.is_empty() {
            return false;
        }
        let key: Arc<str> = client_id.into();
        let mut map = self.client_auth.shard(&*key).lock();
        let w = map.entry(key).or_insert(Window {
            start: now,
            count: 0,
        });
        if w.hit(now, self.auth_window) >= self.auth_threshold {
            w.count = 0;
            return true;
        }
        false
    }

    /// A successful CONNECT of `client_id`. True when the client id has
    /// connected more than the flapping threshold within the window (the
    /// count then starts over).
    pub fn client_connected(&self, client_id: &Arc<str>, now: Instant) -> bool {
        if self.flap_threshold == 0 {
            return false;
        }
        let mut map = self.clients.shard(&**client_id).lock();
        let w = map.entry(client_id.clone()).or_insert(Window {
            start: now,
            count: 0,
        });
        if w.hit(now, self.flap_window) > self.flap_threshold {
            w.count = 0;
            return true;
        }
        false
    }

    /// A connection of `client_id` counted by [`Limits::client_connected`]
    /// ended with the client's own DISCONNECT: it does not count toward
    /// flapping. (Should the window have started over in between, the new
    /// window is let off one connect: lenient by one, never stricter.)
    pub fn client_left_cleanly(&self, client_id: &Arc<str>) {
        if self.flap_threshold == 0 {
            return;
        }
        if let Some(w) = self.clients.shard(&**client_id).lock().get_mut(client_id) {
            w.count = w.count.saturating_sub(1);
        }
    }

    /// Forget state that no longer constrains anything.
    pub fn purge(&self, now: Instant) {
        let (aw, fw) = (self.auth_window, self.flap_window);
        self.ips.retain(|st| {
            st.conns > 0
                || st.rate.as_ref().is_some_and(|b| !b.is_full(now))
                || !st.auth.expired(now, aw)
        });
        self.clients.retain(|w| !w.expired(now, fw));
        self.client_auth.retain(|w| !w.expired(now, aw));
    }

    /// Tracked addresses and client ids.
    #[cfg(test)]
    pub fn tracked(&self) -> (usize, usize) {
        (self.ips.len(), self.clients.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_bursts_then_refills_at_rate() {
        let mut b = TokenBucket::new(10.0, 20.0, Instant::now());
        for i in 0..20 {
            assert!(b.try_take(Instant::now()), "burst token {i}");
        }
        assert!(!b.try_take(Instant::now()));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.try_take(Instant::now()), "one token per 100 ms");
        assert!(!b.try_take(Instant::now()));
        assert!(!b.is_full(Instant::now()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.is_full(Instant::now()));
        // Never more than the burst, however long the pause.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let n = (0..100).filter(|_| b.try_take(Instant::now())).count();
        assert_eq!(n, 20);
    }

    fn limits(f: impl FnOnce(&mut BrokerConfig)) -> Limits {
        let mut cfg = BrokerConfig::default();
        f(&mut cfg);
        Limits::new(&cfg, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn connections_per_ip_are_counted_and_purged() {
        let l = limits(|c| c.max_connections_per_ip = 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let now = Instant::now();
        assert!(l.open(a, now));
        assert!(l.open(a, now));
        assert!(!l.open(a, now));
        assert!(l.open(b, now));
        l.close(a);
        assert!(l.open(a, now));
        l.close(a);
        l.close(a);
        l.close(b);
        tokio::time::advance(Duration::from_secs(10)).await;
        l.purge(Instant::now());
        assert_eq!(l.tracked(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn connect_rate_per_ip_and_global() {
        let l = limits(|c| {
            c.max_connect_rate_per_ip = 1;
            c.connect_burst_per_ip = 3;
            c.max_connect_rate = 2; // burst 4
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(l.attempt(a, Instant::now()), Ok(()));
        }
        assert_eq!(l.attempt(a, Instant::now()), Err(RateRefusal::PerIp));
        assert_eq!(l.attempt(b, Instant::now()), Ok(()));
        assert_eq!(l.attempt(b, Instant::now()), Err(RateRefusal::Global));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(l.attempt(a, Instant::now()), Ok(()));
        // IPv6 neighbours in one /64 share a bucket.
        let l = limits(|c| {
            c.max_connect_rate_per_ip = 1;
            c.connect_burst_per_ip = 1;
        });
        let x: IpAddr = "2001:db8::1".parse().expect("ip");
        let y: IpAddr = "2001:db8::2".parse().expect("ip");
        assert_eq!(l.attempt(x, Instant::now()), Ok(()));
        assert_eq!(l.attempt(y, Instant::now()), Err(RateRefusal::PerIp));
    }

    #[tokio::test(start_paused = true)]
    async fn auth_failures_and_flapping_windows() {
        let l = limits(|c| {
            c.auth_failures_before_ban = 3;
            c.max_connects_per_client_id = 2;
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(!l.auth_failed(a, Instant::now()));
        assert!(!l.auth_failed(a, Instant::now()));
        // The window elapses: counting starts over.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!l.auth_failed(a, Instant::now()));
        assert!(!l.auth_failed(a, Instant::now()));
        assert!(l.auth_failed(a, Instant::now()));
        assert!(!l.auth_failed(a, Instant::now()), "reset after a ban");

        let id: Arc<str> = "c1".into();
        assert!(!l.client_connected(&id, Instant::now()));
        assert!(!l.client_connected(&id, Instant::now()));
        assert!(l.client_connected(&id, Instant::now()));
        // Connections the client ended with DISCONNECT do not count.
        for _ in 0..10 {
            assert!(!l.client_connected(&id, Instant::now()));
            l.client_left_cleanly(&id);
        }
        assert!(!l.client_connected(&id, Instant::now()));
        assert!(!l.client_connected(&id, Instant::now()));
        assert!(l.client_connected(&id, Instant::now()), "dropped ones do");
        tokio::time::advance(Duration::from_secs(61)).await;
        l.purge(Instant::now());
        assert_eq!(l.tracked(), (0, 0));
    }
}
