//! Bans: IP addresses, client ids and devices refused for a while.
//!
//! A banned IP is refused at its CONNECT (CONNACK 0x8A Banned; 3.1.1 return
//! code 5) without reading more than the CONNECT; a banned client id or
//! device is refused at CONNECT. Bans escalate: every new ban of a key that
//! was banned before doubles the duration (from `ban_base_duration` up to
//! `ban_max_duration`); a key that stays clean for `ban_forget_after` after
//! its last ban ended starts over. IPv6 addresses are banned per /64 prefix
//! (one host usually owns the whole prefix), IPv4-mapped IPv6 as IPv4.
//!
//! The map is empty almost always, so the check on every accept is one
//! atomic load; when it is not, one read lock.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Most entries kept (active bans plus remembered ones); beyond it new
/// automatic bans are not recorded (administrative ones still are).
const MAX_ENTRIES: usize = 100_000;

/// What a ban applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BanKey {
    /// A source address (IPv6: the /64 prefix, see [`ip_key`]).
    Ip(IpAddr),
    ClientId(String),
    /// A registered device (`ClientIdentity::device_id`), whatever client
    /// id it connects with.
    Device(String),
}

impl BanKey {
    /// An IP key, normalized like the limits do (IPv6 → /64 prefix).
    pub fn ip(ip: IpAddr) -> BanKey {
        BanKey::Ip(ip_key(ip))
    }
}

impl fmt::Display for BanKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanKey::Ip(ip) => write!(f, "ip:{ip}"),
            BanKey::ClientId(c) => write!(f, "client:{c}"),
            BanKey::Device(d) => write!(f, "device:{d}"),
        }
    }
}

impl std::str::FromStr for BanKey {
    type Err = String;
    /// `ip:<address>`, `client:<client id>` or `device:<device id>`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("ip", a)) => a
                .parse()
                .map(BanKey::ip)
                .map_err(|_| format!("`{a}` is not an IP address")),
            Some(("client", c)) if !c.is_empty() => Ok(BanKey::ClientId(c.to_string())),
            Some(("device", d)) if !d.is_empty() => Ok(BanKey::Device(d.to_string())),
            _ => Err(format!(
                "`{s}`: expected ip:<address>, client:<client id> or device:<device id>"
            )),
        }
    }
}

/// The address limits and bans are keyed by: IPv4 as is (also when it
/// arrives IPv4-mapped over IPv6), IPv6 reduced to its /64 prefix.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// One active ban, for the API.
#[derive(Debug, Clone)]
pub struct BanInfo {
    pub key: BanKey,
    pub reason: String,
    /// Time left.
    pub remaining: Duration,
    /// How many times this key has been banned since it was last clean for
    /// `ban_forget_after` (1 for a first ban).
    pub strikes: u32,
    /// Set by the broker itself (auth failures, flapping), not an operator.
    pub automatic: bool,
}

struct Entry {
    until: Instant,
    reason: String,
    strikes: u32,
    automatic: bool,
}

/// The ban list. See the module documentation.
pub struct Bans {
    entries: RwLock<HashMap<BanKey, Entry>>,
    len: AtomicUsize,
    base: Duration,
    max: Duration,
    forget: Duration,
}

impl Bans {
    pub fn new(base: Duration, max: Duration, forget: Duration) -> Bans {
        Bans {
            entries: RwLock::new(HashMap::new()),
            len: AtomicUsize::new(0),
            base,
            max: max.max(base),
            forget,
        }
    }

    /// Ban `key`. `duration: None` escalates from the base duration (twice
    /// as long as the previous ban of the same key); an explicit duration is
    /// used as given. A ban never shortens an active one. Returns the
    /// duration applied, or `None` if the list is full (automatic bans only).
    pub fn ban(
        &self,
        key: BanKey,
        reason: &str,
        duration: Option<Duration>,
        automatic: bool,
        now: Instant,
    ) -> Option<Duration> {
        let mut map = self.entries.write();
        if automatic && map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
            self.purge_locked(&mut map, now);
            if map.len() >= MAX_ENTRIES {
                return None;
            }
        }
        let strikes = match map.get(&key) {
            Some(e) if now < e.until + self.forget => e.strikes.saturating_add(1),
            _ => 1,
        };
        let d = duration.unwrap_or_else(|| self.escalated(strikes));
        let mut until = now + d;
        if let Some(e) = map.get(&key) {
            if e.until > until {
                until = e.until;
            }
        }
        map.insert(
            key,
            Entry {
                until,
                reason: reason.to_string(),
                strikes,
                automatic,
            },
        );
        self.len.store(map.len(), Ordering::Release);
        Some(d)
    }

    /// `base × 2^(strikes-1)`, at most the maximum.
    fn escalated(&self, strikes: u32) -> Duration {
        let factor = 1u32
            .checked_shl(strikes.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Lift a ban and forget the key's history. True if it was listed.
    pub fn unban(&self, key: &BanKey) -> bool {
        let mut map = self.entries.write();
        let found = map.remove(key).is_some();
        self.len.store(map.len(), Ordering::Release);
        found
    }

    /// The active ban of `key`, if any: `(reason, time left)`.
    pub fn check(&self, key: &BanKey, now: Instant) -> Option<(String, Duration)> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let map = self.entries.read();
        let e = map.get(key)?;
        (now < e.until).then(|| (e.reason.clone(), e.until - now))
    }

    /// Whether there is any entry at all (cheap; lets callers skip building
    /// keys on the common path).
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    /// Active bans, longest remaining first.
    pub fn list(&self, now: Instant) -> Vec<BanInfo> {
        let map = self.entries.read();
        let mut v: Vec<BanInfo> = map
            .iter()
            .filter(|(_, e)| now < e.until)
            .map(|(k, e)| BanInfo {
                key: k.clone(),
                reason: e.reason.clone(),
                remaining: e.until - now,
                strikes: e.strikes,
                automatic: e.automatic,
            })
            .collect();
        v.sort_by_key(|b| std::cmp::Reverse(b.remaining));
        v
    }

    /// Drop keys clean for `ban_forget_after` since their last ban ended.
    pub fn purge(&self, now: Instant) {
        if self.is_empty() {
            return;
        }
        let mut map = self.entries.write();
        self.purge_locked(&mut map, now);
    }

    fn purge_locked(&self, map: &mut HashMap<BanKey, Entry>, now: Instant) {
        map.retain(|_, e| now < e.until + self.forget);
        self.len.store(map.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn bans() -> Bans {
        Bans::new(MIN, DAY, DAY)
    }

    #[tokio::test(start_paused = true)]
    async fn bans_expire_and_escalate() {
        let b = bans();
        let k = BanKey::ClientId("flappy".into());
        assert!(b.check(&k, Instant::now()).is_none());
        assert_eq!(
            b.ban(k.clone(), "test", None, true, Instant::now()),
            Some(MIN)
        );
        assert!(b.check(&k, Instant::now()).is_some());
        tokio::time::advance(MIN).await;
        assert!(b.check(&k, Instant::now()).is_none(), "expired");
        // Second ban: twice as long, then four times...
        assert_eq!(
            b.ban(k.clone(), "again", None, true, Instant::now()),
            Some(2 * MIN)
        );
        tokio::time::advance(MIN).await;
        assert!(b.check(&k, Instant::now()).is_some(), "still banned");
        tokio::time::advance(MIN).await;
        assert!(b.check(&k, Instant::now()).is_none());
        assert_eq!(
            b.ban(k.clone(), "again", None, true, Instant::now()),
            Some(4 * MIN)
        );
        assert_eq!(b.list(Instant::now())[0].strikes, 3);
        // ...capped at the maximum.
        for _ in 0..20 {
            b.ban(k.clone(), "again", None, true, Instant::now());
        }
        assert_eq!(
            b.ban(k.clone(), "again", None, true, Instant::now()),
            Some(DAY)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn clean_keys_are_forgotten() {
        let b = bans();
        let k = BanKey::ip("10.0.0.1".parse().expect("ip"));
        b.ban(k.clone(), "x", None, true, Instant::now());
        b.ban(k.clone(), "x", None, true, Instant::now());
        // Active for 2 min, then clean for a day: forgotten.
        tokio::time::advance(2 * MIN + DAY).await;
        b.purge(Instant::now());
        assert!(b.is_empty());
        assert_eq!(b.ban(k.clone(), "x", None, true, Instant::now()), Some(MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn explicit_duration_unban_and_list() {
        let b = bans();
        let k = BanKey::Device("d1".into());
        let long = Duration::from_secs(3600);
        assert_eq!(
            b.ban(k.clone(), "op", Some(long), false, Instant::now()),
            Some(long)
        );
        // A shorter automatic ban does not shorten it.
        b.ban(k.clone(), "auto", Some(MIN), true, Instant::now());
        let l = b.list(Instant::now());
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].remaining, long);
        assert!(b.unban(&k));
        assert!(!b.unban(&k));
        assert!(b.check(&k, Instant::now()).is_none());
        assert!(b.list(Instant::now()).is_empty());
    }

    #[test]
    fn keys_parse_and_normalize() {
        let k: BanKey = "ip:2001:db8:1:2:3:4:5:6".parse().expect("key");
        assert_eq!(k.to_string(), "ip:2001:db8:1:2::");
        let k: BanKey = "ip:::ffff:10.1.2.3".parse().expect("key");
        assert_eq!(k, BanKey::Ip("10.1.2.3".parse().expect("ip")));
        assert_eq!(
            "client:abc".parse::<BanKey>().expect("key"),
            BanKey::ClientId("abc".into())
        );
        assert!("client:".parse::<BanKey>().is_err());
        assert!("nope".parse::<BanKey>().is_err());
    }
}
