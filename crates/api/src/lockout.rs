//! Operator login throttling: failed password logins are counted per user
//! name and per source address, and too many within a window lock that
//! name (or address) out for a while — doubling with each repeat, up to a
//! ceiling — so a password cannot be guessed online at any useful rate.
//! A locked attempt is refused before any password hashing.
//!
//! Password checks are Argon2id, memory-hard and tens of milliseconds each,
//! so they run on the blocking pool, at most `max_concurrent_hashes` at a
//! time with a short queue: a login flood is answered 503 instead of
//! starving the API's async workers and the broker.
//!
//! The counting core ([`Counters`]) has no clock and no locks: it takes
//! `now`, so the unit tests below step it with a fake clock.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How logins are throttled (settings `[login]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoginConfig {
    /// Failures of one user name within `window` that lock it (0: never).
    pub max_failures_per_user: u32,
    /// Failures from one address (any user names) within `window` that
    /// lock the address (0: never). IPv6 addresses count per /64.
    pub max_failures_per_address: u32,
    pub window: Duration,
    /// The first lockout; each further one doubles, up to `max_lockout`.
    pub lockout: Duration,
    pub max_lockout: Duration,
    /// Password checks running at once.
    pub max_concurrent_hashes: usize,
    /// Password checks waiting for a slot; beyond that a login gets 503.
    pub max_queued_hashes: usize,
    /// User names and addresses tracked at once (memory bound).
    pub max_tracked: usize,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            max_failures_per_user: 5,
            max_failures_per_address: 20,
            window: Duration::from_secs(300),
            lockout: Duration::from_secs(60),
            max_lockout: Duration::from_secs(3600),
            max_concurrent_hashes: 2,
            max_queued_hashes: 16,
            max_tracked: 10_000,
        }
    }
}

/// What failed logins are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LoginKey {
    User(String),
    /// An IPv4 address, or the /64 of an IPv6 address (one host usually
    /// holds a whole /64, so counting single IPv6 addresses is no limit).
    Address(IpAddr),
}

/// User names longer than any valid one (64 bytes) are counted by their
/// digest, so a flood of megabyte-long names cannot fill the memory.
const MAX_NAME_KEY: usize = 64;

impl LoginKey {
    pub fn user(name: &str) -> LoginKey {
        if name.len() <= MAX_NAME_KEY {
            return LoginKey::User(name.to_string());
        }
        let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
        let hex: String = d.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        LoginKey::User(format!("#sha256:{hex}"))
    }

    pub fn address(ip: IpAddr) -> LoginKey {
        LoginKey::Address(match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let net = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(net.into())
                }
            },
            v4 => v4,
        })
    }

    /// `user` or `address`, for audit records and security events.
    pub fn scope(&self) -> &'static str {
        match self {
            LoginKey::User(_) => "user",
            LoginKey::Address(_) => "address",
        }
    }
}

impl std::fmt::Display for LoginKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginKey::User(u) => f.write_str(u),
            LoginKey::Address(a) => write!(f, "{a}"),
        }
    }
}

/// A lockout that has just begun.
#[derive(Debug, Clone, PartialEq)]
pub struct Lockout {
    pub key: LoginKey,
    pub duration: Duration,
    /// Failures within the window that caused it.
    pub failures: u32,
    /// 1 for the first lockout, 2 for the next (twice as long)…
    pub strike: u32,
}

#[derive(Debug)]
struct Record {
    /// Failure times within the window (at most the threshold).
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
    /// Lockouts so far, for the doubling.
    strikes: u32,
    last: Instant,
}

/// The counting core: failures, lockouts and their expiry, with a bounded
/// number of records.
#[derive(Debug)]
pub struct Counters {
    config: LoginConfig,
    records: HashMap<LoginKey, Record>,
    last_prune: Option<Instant>,
}

impl Counters {
    pub fn new(config: LoginConfig) -> Counters {
        Counters {
            config,
            records: HashMap::new(),
            last_prune: None,
        }
    }

    /// How long `key` stays locked, if it is.
    pub fn locked(&self, key: &LoginKey, now: Instant) -> Option<Duration> {
        let until = self.records.get(key)?.locked_until?;
        (until > now).then(|| until - now)
    }

    fn threshold(&self, key: &LoginKey) -> u32 {
        match key {
            LoginKey::User(_) => self.config.max_failures_per_user,
            LoginKey::Address(_) => self.config.max_failures_per_address,
        }
    }

    /// Count a failure; the lockout it starts, if it reaches the threshold.
    pub fn fail(&mut self, key: LoginKey, now: Instant) -> Option<Lockout> {
        let threshold = self.threshold(&key);
        if threshold == 0 {
            return None;
        }
        self.make_room(now);
        let window = self.config.window;
        let forget = self.config.max_lockout.max(window);
        let rec = self.records.entry(key.clone()).or_insert_with(|| Record {
            failures: VecDeque::new(),
            locked_until: None,
            strikes: 0,
            last: now,
        });
        // A name that has behaved for a long while starts afresh.
        if rec.locked_until.is_none_or(|u| u <= now) && now.duration_since(rec.last) >= forget {
            rec.strikes = 0;
        }
        rec.last = now;
        if rec.locked_until.is_some_and(|u| u > now) {
            // Attempts while locked are refused before they get here; one
            // that raced the lockout does not extend it.
            return None;
        }
        while rec
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            rec.failures.pop_front();
        }
        rec.failures.push_back(now);
        if rec.failures.len() < threshold as usize {
            return None;
        }
        let factor = 1u32.checked_shl(rec.strikes.min(31)).unwrap_or(u32::MAX);
        let duration = self
            .config
            .lockout
            .saturating_mul(factor)
            .min(self.config.max_lockout);
        rec.strikes = rec.strikes.saturating_add(1);
        rec.locked_until = Some(now + duration);
        rec.failures.clear();
        Some(Lockout {
            key,
            duration,
            failures: threshold,
            strike: rec.strikes,
        })
    }

    /// A successful login: the user name's failures and strikes are
    /// forgotten (an address's are not: one good account must not let an
    /// address guess at the others).
    pub fn succeed(&mut self, user: &str) {
        self.records.remove(&LoginKey::user(user));
    }

    /// Records held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Drop records with nothing left to remember, at most once a second
    /// unless full; when still full, forget the least recently active
    /// record that is not locked (or, failing that, the one whose lock
    /// ends first) so a new name can be counted.
    fn make_room(&mut self, now: Instant) {
        let full = self.records.len() >= self.config.max_tracked;
        let due = self
            .last_prune
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if !full && !due {
            return;
        }
        self.last_prune = Some(now);
        let window = self.config.window;
        let forget = self.config.max_lockout.max(window);
        self.records.retain(|_, r| {
            let locked = r.locked_until.is_some_and(|u| u > now);
            let idle = now.duration_since(r.last);
            locked || idle < if r.strikes == 0 { window } else { forget }
        });
        while self.records.len() >= self.config.max_tracked.max(1) {
            let victim = self
                .records
                .iter()
                .min_by_key(|(_, r)| {
                    let locked = r.locked_until.is_some_and(|u| u > now);
                    (locked, r.locked_until.unwrap_or(r.last).max(r.last))
                })
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    self.records.remove(&k);
                }
                None => break,
            }
        }
    }
}

/// No password-check slot within the queue's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// The shared login throttle: the counters behind a lock, and the bound on
/// password checks.
#[derive(Debug)]
pub struct LoginGuard {
    counters: parking_lot::Mutex<Counters>,
    hashes: Arc<Semaphore>,
    queued: AtomicUsize,
    max_queued: usize,
    pub stats: LoginStats,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LoginStats {
    /// Password checks run (Argon2id verifications).
    pub password_checks: AtomicU64,
    /// Logins refused while the name or address was locked (no hashing).
    pub refused_locked: AtomicU64,
    /// Logins refused because too many password checks were queued.
    pub refused_busy: AtomicU64,
    /// Lockouts begun.
    pub lockouts: AtomicU64,
}

impl LoginStats {
    /// `(name, help, value)` for Prometheus text.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 4] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "password_checks",
                "operator password checks run (Argon2id)",
                v(&self.password_checks),
            ),
            (
                "refused_locked",
                "logins refused during a lockout, without a password check",
                v(&self.refused_locked),
            ),
            (
                "refused_busy",
                "logins refused because too many password checks were waiting",
                v(&self.refused_busy),
            ),
            (
                "lockouts",
                "lockouts of a user name or source address after failed logins",
                v(&self.lockouts),
            ),
        ]
    }
}

impl Default for LoginGuard {
    fn default() -> Self {
        LoginGuard::new(LoginConfig::default())
    }
}

/// A slot for one password check; the check must be done while it is held.
pub struct HashSlot {
    _permit: OwnedSemaphorePermit,
}

impl LoginGuard {
    pub fn new(config: LoginConfig) -> LoginGuard {
        LoginGuard {
            hashes: Arc::new(Semaphore::new(config.max_concurrent_hashes.max(1))),
            max_queued: config.max_queued_hashes,
            queued: AtomicUsize::new(0),
            counters: parking_lot::Mutex::new(Counters::new(config)),
            stats: LoginStats::default(),
        }
    }

    /// `Err(wait)` while the user name or the address is locked out.
    pub fn check(&self, user: &str, addr: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        let c = self.counters.lock();
        let user = c.locked(&LoginKey::user(user), now);
        let addr = addr.and_then(|a| c.locked(&LoginKey::address(a), now));
        match user.max(addr) {
            Some(wait) => {
                self.stats.refused_locked.fetch_add(1, Ordering::Relaxed);
                Err(wait)
            }
            None => Ok(()),
        }
    }

    /// Count a failed login; the lockouts it started (to be audited).
    pub fn failed(&self, user: &str, addr: Option<IpAddr>) -> Vec<Lockout> {
        let now = Instant::now();
        let mut c = self.counters.lock();
        let mut started = Vec::new();
        started.extend(c.fail(LoginKey::user(user), now));
        if let Some(a) = addr {
            started.extend(c.fail(LoginKey::address(a), now));
        }
        self.stats
            .lockouts
            .fetch_add(started.len() as u64, Ordering::Relaxed);
        started
    }

    /// Count a password check (for `/metrics`).
    pub fn checking(&self) {
        self.stats.password_checks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn succeeded(&self, user: &str) {
        self.counters.lock().succeed(user);
    }

    /// Wait for a password-check slot, unless too many already wait.
    pub async fn hash_slot(&self) -> Result<HashSlot, Busy> {
        if let Ok(permit) = self.hashes.clone().try_acquire_owned() {
            return Ok(HashSlot { _permit: permit });
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
            return Err(Busy);
        }
        let permit = self.hashes.clone().acquire_owned().await;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        permit.map(|p| HashSlot { _permit: p }).map_err(|_| Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LoginConfig {
        LoginConfig {
            max_failures_per_user: 3,
            max_failures_per_address: 5,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(10),
            max_lockout: Duration::from_secs(35),
            max_tracked: 100,
            ..LoginConfig::default()
        }
    }

    fn user(u: &str) -> LoginKey {
        LoginKey::User(u.into())
    }

    #[test]
    fn failures_within_the_window_lock_and_lockouts_double_up_to_the_ceiling() {
        let mut c = Counters::new(config());
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(c.fail(user("alice"), t0), None);
        assert_eq!(c.fail(user("alice"), t0 + s(1)), None);
        // Two failures, then the window passes: they are forgotten.
        assert_eq!(c.fail(user("alice"), t0 + s(61)), None);
        assert_eq!(c.fail(user("alice"), t0 + s(62)), None);
        let l = c
            .fail(user("alice"), t0 + s(63))
            .expect("third in the window");
        assert_eq!((l.duration, l.strike, l.failures), (s(10), 1, 3));
        assert_eq!(c.locked(&user("alice"), t0 + s(64)), Some(s(9)));
        assert_eq!(c.locked(&user("bob"), t0 + s(64)), None);
        assert_eq!(c.locked(&user("alice"), t0 + s(73)), None);
        // The next lockouts last 20 s, then 35 s (the ceiling), then 35 s.
        let mut t = t0 + s(73);
        for want in [20, 35, 35] {
            for _ in 0..2 {
                assert_eq!(c.fail(user("alice"), t), None);
            }
            let l = c.fail(user("alice"), t).expect("locked again");
            assert_eq!(l.duration, s(want));
            t += s(want);
            assert_eq!(c.locked(&user("alice"), t), None);
        }
    }

    #[test]
    fn success_forgets_the_user_not_the_address() {
        let mut c = Counters::new(config());
        let t = Instant::now();
        let addr = LoginKey::address("10.0.0.1".parse().expect("ip"));
        for _ in 0..2 {
            c.fail(user("alice"), t);
            c.fail(addr.clone(), t);
        }
        c.succeed("alice");
        assert_eq!(c.fail(user("alice"), t), None);
        assert_eq!(c.fail(user("alice"), t), None);
        for _ in 0..2 {
            assert_eq!(c.fail(addr.clone(), t), None);
        }
        let l = c.fail(addr.clone(), t).expect("fifth from the address");
        assert_eq!(l.key.scope(), "address");
        assert!(c.locked(&addr, t).is_some());
    }

    #[test]
    fn strikes_are_forgotten_after_a_quiet_period() {
        let mut c = Counters::new(config());
        let t0 = Instant::now();
        let s = Duration::from_secs;
        for _ in 0..3 {
            c.fail(user("alice"), t0);
        }
        // Quiet for longer than the longest lockout: back to 10 s.
        let t = t0 + s(100);
        c.fail(user("alice"), t);
        c.fail(user("alice"), t);
        assert_eq!(c.fail(user("alice"), t).expect("locked").duration, s(10));
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        let a = LoginKey::address("2001:db8::1".parse().expect("ip"));
        let b = LoginKey::address("2001:db8::ffff:1".parse().expect("ip"));
        let other = LoginKey::address("2001:db8:0:1::1".parse().expect("ip"));
        assert_eq!(a, b);
        assert_ne!(a, other);
        let mapped = LoginKey::address("::ffff:10.0.0.1".parse().expect("ip"));
        assert_eq!(mapped, LoginKey::address("10.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn memory_is_bounded_and_locked_records_are_kept_longest() {
        let mut c = Counters::new(LoginConfig {
            max_tracked: 10,
            ..config()
        });
        let t = Instant::now();
        for _ in 0..3 {
            c.fail(user("victim"), t);
        }
        assert!(c.locked(&user("victim"), t).is_some());
        for i in 0..1000 {
            c.fail(user(&format!("spray{i}")), t + Duration::from_millis(i));
            assert!(c.len() <= 10, "{} records", c.len());
        }
        assert!(c
            .locked(&user("victim"), t + Duration::from_secs(1))
            .is_some());
        // Idle records are pruned once their window has passed.
        c.fail(user("late"), t + Duration::from_secs(120));
        assert!(c.len() <= 2, "{} records", c.len());
    }

    #[test]
    fn long_user_names_are_counted_by_digest() {
        let long = "x".repeat(1 << 20);
        let LoginKey::User(k) = LoginKey::user(&long) else {
            panic!("a user key");
        };
        assert!(k.len() < 64, "{k}");
        assert_eq!(LoginKey::user(&long), LoginKey::user(&long));
        assert_ne!(LoginKey::user(&long), LoginKey::user(&"y".repeat(1 << 20)));
        assert_eq!(LoginKey::user("alice"), user("alice"));
    }

    #[test]
    fn zero_thresholds_never_lock() {
        let mut c = Counters::new(LoginConfig {
            max_failures_per_user: 0,
            max_failures_per_address: 0,
            ..config()
        });
        let t = Instant::now();
        for _ in 0..100 {
            assert_eq!(c.fail(user("alice"), t), None);
        }
        assert!(c.is_empty());
    }

    #[tokio::test]
    async fn hash_slots_are_bounded_with_a_short_queue() {
        let g = Arc::new(LoginGuard::new(LoginConfig {
            max_concurrent_hashes: 1,
            max_queued_hashes: 1,
            ..config()
        }));
        let first = g.hash_slot().await.expect("free slot");
        let g2 = g.clone();
        let waiting = tokio::spawn(async move { g2.hash_slot().await.is_ok() });
        // Let the second one queue.
        while g.queued.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(g.hash_slot().await.is_err(), "the queue is full");
        drop(first);
        assert!(waiting.await.expect("join"));
    }
}
