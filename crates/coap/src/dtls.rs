//! CoAPS: CoAP over DTLS 1.2 with pre-shared keys (RFC 7252 §9.1.3.1).
//!
//! [`DtlsSessions`] keeps one DTLS session per client address, each a
//! sans-IO [`dimpl::Dtls`] engine: datagrams in, records and plaintext out,
//! the caller's clock. The driver (`udp.rs`) feeds what arrives on the
//! socket through it and hands the plaintext to the CoAP [`crate::Server`]
//! core, and encrypts what the core sends back; the core never knows.
//!
//! Who the client is comes from its PSK identity: the application's
//! [`PskStore`] answers the handshake's lookup with the key and the device
//! it belongs to (a [`PskGrant`]); a handshake with an unknown identity
//! fails its Finished check, exactly like a wrong key. Requests from an
//! established session carry the device (`Request::identity`). Every
//! second the driver asks the store whether each session's grant still
//! holds: a revoked, rotated or expired key, or a disabled device, ends the
//! session at once (close_notify, then forgotten).
//!
//! Bounded: at most `max_sessions` sessions, of which at most
//! `max_handshakes` unfinished (a flood of ClientHellos from spoofed
//! addresses costs a stateless cookie exchange and at most that many small
//! engines); idle sessions are forgotten after `idle_timeout`.

use dimpl::{Config, Dtls, Output, PskResolver};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Run one call into the DTLS engine; a panic inside it (a bug there,
/// perhaps set off by a hostile datagram) fails that session only, never
/// the socket's driver.
fn guarded(f: impl FnOnce() -> Result<(), dimpl::Error>) -> Result<(), ()> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(()),
        Err(_) => {
            tracing::warn!("the DTLS engine panicked; the session is dropped");
            Err(())
        }
    }
}

/// What the application knows about a PSK identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskGrant {
    /// The device the key belongs to: requests carry it.
    pub device: Arc<str>,
    /// The credential (so the store can tell later whether it still holds).
    pub credential: Arc<str>,
}

/// The application's keys.
pub trait PskStore: Send + Sync + 'static {
    /// The key for `identity` and whom it grants, during a handshake from
    /// `peer`; `None` when unknown, revoked, expired or disabled (the
    /// handshake then fails).
    fn lookup(&self, identity: &[u8], peer: SocketAddr) -> Option<(Vec<u8>, PskGrant)>;
    /// Whether an established session's grant still holds.
    fn still_valid(&self, grant: &PskGrant) -> bool;
}

/// Limits of the session table.
#[derive(Debug, Clone)]
pub struct DtlsLimits {
    pub max_sessions: usize,
    pub max_handshakes: usize,
    pub idle_timeout: Duration,
}

impl Default for DtlsLimits {
    fn default() -> Self {
        DtlsLimits {
            max_sessions: 10_000,
            max_handshakes: 1_024,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// The handshake being driven right now: the engine calls the resolver
/// synchronously inside `handle_packet`, and one task drives every
/// session, so "the session being fed" is known around each call.
#[derive(Default)]
struct Lookup {
    peer: Option<SocketAddr>,
    grant: Option<PskGrant>,
}

/// Answers a handshake's PSK lookup and leaves the grant in [`Lookup`].
/// One configuration (and so one resolver) serves every session: building
/// a configuration validates the crypto provider, which costs elliptic-
/// curve work a PSK handshake otherwise never does.
struct Resolver {
    store: AssertUnwindSafe<Arc<dyn PskStore>>,
    current: Arc<Mutex<Lookup>>,
}

impl PskResolver for Resolver {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        let mut cur = self.current.lock().ok()?;
        let peer = cur.peer?;
        let (key, grant) = self.store.lookup(identity, peer)?;
        cur.grant = Some(grant);
        Some(key)
    }
}

/// One output of the engine, owned (so the engine's borrow ends inside
/// the panic guard).
enum Polled {
    Packet(Vec<u8>),
    Data(Vec<u8>),
    Connected,
    Timeout(Instant),
    Close,
    Grow(usize),
    Other,
}

/// Invalid records one session may send before it is dropped.
const MAX_RECORD_ERRORS: u32 = 16;

struct Session {
    /// Invalid records received so far.
    errors: u32,
    dtls: Dtls,
    grant: Arc<Mutex<Option<PskGrant>>>,
    connected: bool,
    timer: Option<Instant>,
    last_active: Instant,
}

impl Session {
    fn grant(&self) -> Option<PskGrant> {
        self.grant.lock().ok().and_then(|g| g.clone())
    }
}

/// Counters of the session table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DtlsStats {
    pub handshakes_completed: u64,
    pub handshakes_failed: u64,
    pub refused_full: u64,
    pub closed_revoked: u64,
    /// Established sessions dropped to make room for a new handshake.
    pub evicted: u64,
}

/// What one datagram or timer produced.
#[derive(Debug, Default)]
pub struct DtlsOutput {
    /// Records to send, each to its peer.
    pub transmit: Vec<(SocketAddr, Vec<u8>)>,
    /// Decrypted CoAP messages, each from its peer.
    pub plaintext: Vec<(SocketAddr, Vec<u8>)>,
}

/// The DTLS sessions of one CoAPS socket.
pub struct DtlsSessions {
    store: Arc<dyn PskStore>,
    limits: DtlsLimits,
    sessions: HashMap<SocketAddr, Session>,
    /// New handshakes from addresses that still have an established
    /// session (a device that rebooted behind the same address and port):
    /// the old session serves until the new one completes (RFC 6347
    /// §4.2.8), so a spoofed ClientHello cannot end a live session.
    replacements: HashMap<SocketAddr, Session>,
    buf: Vec<u8>,
    pub stats: DtlsStats,
    /// The one engine configuration, built on first use.
    config: Option<Arc<Config>>,
    current: Arc<Mutex<Lookup>>,
}

/// The engines' configuration: PSK with no identity hint.
fn config(resolver: Resolver) -> Result<Arc<Config>, dimpl::Error> {
    Config::builder()
        .with_psk_server(None, Arc::new(resolver))
        .build()
        .map(Arc::new)
}

impl DtlsSessions {
    pub fn new(store: Arc<dyn PskStore>, limits: DtlsLimits) -> DtlsSessions {
        DtlsSessions {
            store,
            limits,
            sessions: HashMap::new(),
            replacements: HashMap::new(),
            buf: vec![0; 2048],
            config: None,
            current: Arc::default(),
            stats: DtlsStats::default(),
        }
    }

    /// The device of an established session with `peer`.
    pub fn identity(&self, peer: SocketAddr) -> Option<Arc<str>> {
        let s = self.sessions.get(&peer)?;
        s.connected.then(|| s.grant().map(|g| g.device))?
    }

    /// Sessions in the table (established or not).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// A datagram from `peer`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        data: &[u8],
        out: &mut DtlsOutput,
    ) {
        let hello = is_client_hello(data);
        match self.sessions.get(&peer) {
            None => {
                // Only a handshake record (content type 22) opens a session.
                if data.first() != Some(&22) || !self.room_for_handshake(now) {
                    return;
                }
                let Some(s) = self.new_session(peer, now) else {
                    return;
                };
                self.sessions.insert(peer, s);
            }
            // A fresh ClientHello (no cookie yet) starts a new handshake;
            // its repetition with the cookie goes on in the same one.
            Some(old) if hello && old.connected && !hello_has_cookie(data) => {
                if !self.room_for_handshake(now) {
                    return;
                }
                if let Some(s) = self.new_session(peer, now) {
                    self.replacements.insert(peer, s);
                }
            }
            Some(_) => {}
        }
        // Handshake and ChangeCipherSpec records go to a replacement in
        // progress; application data and alerts to the established session.
        let to_replacement =
            self.replacements.contains_key(&peer) && matches!(data.first(), Some(20 | 22));
        let table = if to_replacement {
            &mut self.replacements
        } else {
            &mut self.sessions
        };
        let Some(s) = table.get_mut(&peer) else {
            return;
        };
        s.last_active = now;
        if let Ok(mut cur) = self.current.lock() {
            *cur = Lookup {
                peer: Some(peer),
                grant: None,
            };
        }
        let result = guarded(|| s.dtls.handle_packet(data));
        if let Some(g) = self.current.lock().ok().and_then(|mut c| c.grant.take()) {
            if let Ok(mut mine) = s.grant.lock() {
                *mine = Some(g);
            }
        }
        if result.is_err() {
            // RFC 6347 §4.1.2.7: an invalid record is discarded, not fatal —
            // a stray or replayed datagram must not end a handshake in
            // progress. Too many of them do.
            s.errors += 1;
            if s.errors > MAX_RECORD_ERRORS {
                if to_replacement {
                    self.replacements.remove(&peer);
                    self.stats.handshakes_failed += 1;
                } else {
                    self.drop_failed(peer);
                }
                return;
            }
        }
        if to_replacement {
            self.drain_replacement(peer, out);
        } else {
            self.drain(peer, out);
        }
    }

    /// Whether another handshake may start (evicting idle sessions first).
    fn room_for_handshake(&mut self, now: Instant) -> bool {
        let full = |s: &DtlsSessions| {
            let handshaking =
                s.sessions.values().filter(|s| !s.connected).count() + s.replacements.len();
            s.sessions.len() >= s.limits.max_sessions || handshaking >= s.limits.max_handshakes
        };
        if full(self) {
            self.evict_idle(now);
        }
        // Still full of established sessions: the least recently active
        // one goes (its device handshakes again when it next speaks) rather
        // than refusing a new device. Unfinished handshakes are never
        // evicted for another: their cap refuses instead.
        let handshaking =
            self.sessions.values().filter(|s| !s.connected).count() + self.replacements.len();
        if self.sessions.len() >= self.limits.max_sessions
            && handshaking < self.limits.max_handshakes
        {
            let oldest = self
                .sessions
                .iter()
                .filter(|(_, s)| s.connected)
                .min_by_key(|(_, s)| s.last_active)
                .map(|(p, _)| *p);
            if let Some(p) = oldest {
                self.sessions.remove(&p);
                self.stats.evicted += 1;
            }
        }
        if full(self) {
            self.stats.refused_full += 1;
            return false;
        }
        true
    }

    fn new_session(&mut self, _peer: SocketAddr, now: Instant) -> Option<Session> {
        let cfg = match &self.config {
            Some(c) => c.clone(),
            None => {
                let resolver = Resolver {
                    store: AssertUnwindSafe(self.store.clone()),
                    current: self.current.clone(),
                };
                match config(resolver) {
                    Ok(c) => {
                        self.config = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "DTLS configuration refused");
                        return None;
                    }
                }
            }
        };
        let mut dtls = Dtls::new_12_psk(cfg, now);
        // The engine draws its random values on its first timer.
        guarded(|| dtls.handle_timeout(now)).ok()?;
        Some(Session {
            errors: 0,
            dtls,
            grant: Arc::new(Mutex::new(None)),
            connected: false,
            timer: None,
            last_active: now,
        })
    }

    /// Drain a replacement handshake; once it completes it becomes the
    /// address's session.
    fn drain_replacement(&mut self, peer: SocketAddr, out: &mut DtlsOutput) {
        let Some(mut s) = self.replacements.remove(&peer) else {
            return;
        };
        let closed = drain_session(&mut self.buf, &mut self.stats, peer, &mut s, out);
        if closed {
            return;
        }
        if s.connected {
            self.sessions.insert(peer, s);
        } else {
            self.replacements.insert(peer, s);
        }
    }

    fn drop_failed(&mut self, peer: SocketAddr) {
        if let Some(s) = self.sessions.remove(&peer) {
            if !s.connected {
                self.stats.handshakes_failed += 1;
            }
            tracing::debug!(%peer, "DTLS session failed");
        }
    }

    /// Move everything the session of `peer` has to say into `out`.
    fn drain(&mut self, peer: SocketAddr, out: &mut DtlsOutput) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if drain_session(&mut self.buf, &mut self.stats, peer, s, out) {
            self.sessions.remove(&peer);
        }
    }

    /// Encrypt a CoAP message for `peer`; dropped when no session is up.
    pub fn encrypt(&mut self, peer: SocketAddr, plaintext: &[u8], out: &mut DtlsOutput) {
        let failed = match self.sessions.get_mut(&peer) {
            Some(s) if s.connected => {
                guarded(|| s.dtls.send_application_data(plaintext).map(|_| ())).is_err()
            }
            _ => return,
        };
        if failed {
            self.drop_failed(peer);
            return;
        }
        self.drain(peer, out);
    }

    /// When [`DtlsSessions::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sessions
            .values()
            .chain(self.replacements.values())
            .filter_map(|s| s.timer)
            .min()
    }

    /// Run due timers (handshake retransmissions).
    pub fn handle_timeout(&mut self, now: Instant, out: &mut DtlsOutput) {
        let due: Vec<SocketAddr> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.timer.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let failed = match self.sessions.get_mut(&peer) {
                Some(s) => {
                    s.timer = None;
                    guarded(|| s.dtls.handle_timeout(now)).is_err()
                }
                None => continue,
            };
            if failed {
                self.drop_failed(peer);
            } else {
                self.drain(peer, out);
            }
        }
        let due: Vec<SocketAddr> = self
            .replacements
            .iter()
            .filter(|(_, s)| s.timer.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let failed = match self.replacements.get_mut(&peer) {
                Some(s) => {
                    s.timer = None;
                    guarded(|| s.dtls.handle_timeout(now)).is_err()
                }
                None => continue,
            };
            if failed {
                self.replacements.remove(&peer);
                self.stats.handshakes_failed += 1;
            } else {
                self.drain_replacement(peer, out);
            }
        }
    }

    /// End sessions whose grant no longer holds (close_notify goes out)
    /// and forget idle ones. Call about once a second.
    pub fn sweep(&mut self, now: Instant, out: &mut DtlsOutput) {
        let revoked: Vec<SocketAddr> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.connected)
            .filter(|(_, s)| s.grant().is_none_or(|g| !self.store.still_valid(&g)))
            .map(|(p, _)| *p)
            .collect();
        for peer in revoked {
            if let Some(s) = self.sessions.get_mut(&peer) {
                let _ = guarded(|| s.dtls.close());
            }
            self.drain(peer, out);
            if self.sessions.remove(&peer).is_some() {
                self.stats.closed_revoked += 1;
                tracing::info!(%peer, "DTLS session ended: its key no longer holds");
            }
        }
        self.evict_idle(now);
    }

    fn evict_idle(&mut self, now: Instant) {
        let idle = self.limits.idle_timeout;
        // Unfinished handshakes get a tenth of the idle time.
        let handshake = idle / 10;
        self.sessions.retain(|_, s| {
            let limit = if s.connected { idle } else { handshake };
            now.saturating_duration_since(s.last_active) < limit
        });
        self.replacements
            .retain(|_, s| now.saturating_duration_since(s.last_active) < handshake);
    }
}

/// Move everything `s` has to say into `out`; true when it closed.
fn drain_session(
    buf: &mut Vec<u8>,
    stats: &mut DtlsStats,
    peer: SocketAddr,
    s: &mut Session,
    out: &mut DtlsOutput,
) -> bool {
    let mut closed = false;
    loop {
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| match s.dtls.poll_output(buf) {
            Output::Packet(p) => Polled::Packet(p.to_vec()),
            Output::ApplicationData(d) => Polled::Data(d.to_vec()),
            Output::Connected => Polled::Connected,
            Output::Timeout(t) => Polled::Timeout(t),
            Output::CloseNotify => Polled::Close,
            Output::BufferTooSmall { needed } => Polled::Grow(needed),
            _ => Polled::Other,
        }));
        let Ok(polled) = polled else {
            tracing::warn!("the DTLS engine panicked; the session is dropped");
            closed = true;
            break;
        };
        match polled {
            Polled::Packet(p) => out.transmit.push((peer, p)),
            Polled::Data(d) => {
                if s.connected {
                    out.plaintext.push((peer, d));
                }
            }
            Polled::Connected => {
                s.connected = true;
                stats.handshakes_completed += 1;
            }
            Polled::Timeout(t) => {
                s.timer = Some(t);
                break;
            }
            Polled::Close => closed = true,
            Polled::Grow(needed) => {
                if needed > 65_536 {
                    closed = true;
                    break;
                }
                buf.resize(needed, 0);
            }
            Polled::Other => {}
        }
    }
    closed
}

/// A ClientHello at epoch 0 (RFC 6347 §4.1, §4.2.2): content type 22,
/// epoch bytes zero, handshake type 1.
fn is_client_hello(data: &[u8]) -> bool {
    data.len() > 13 && data[0] == 22 && data[3] == 0 && data[4] == 0 && data[13] == 1
}

/// Whether a ClientHello carries a cookie: after the record header (13),
/// the handshake header (12), the version (2), the random (32) and the
/// session id (1 + n) comes the cookie's length. Unreadable: treated as
/// carrying one (it then goes to the handshake in progress).
fn hello_has_cookie(data: &[u8]) -> bool {
    let sid = 13 + 12 + 2 + 32;
    let Some(&sid_len) = data.get(sid) else {
        return true;
    };
    data.get(sid + 1 + usize::from(sid_len))
        .is_none_or(|&cookie_len| cookie_len > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OneKey;

    impl PskStore for OneKey {
        fn lookup(&self, identity: &[u8], _peer: SocketAddr) -> Option<(Vec<u8>, PskGrant)> {
            (identity == b"dev").then(|| {
                (
                    b"0123456789abcdef".to_vec(),
                    PskGrant {
                        device: Arc::from("dev"),
                        credential: Arc::from("psk-1"),
                    },
                )
            })
        }

        fn still_valid(&self, _grant: &PskGrant) -> bool {
            true
        }
    }

    struct Fixed;

    impl PskResolver for Fixed {
        fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
            Some(b"0123456789abcdef".to_vec())
        }
    }

    /// Drive one handshake in memory; true when both sides are connected.
    fn handshake(server: &mut DtlsSessions, peer: SocketAddr, now: Instant) -> bool {
        let cfg = Config::builder()
            .with_psk_client(b"dev".to_vec(), Arc::new(Fixed))
            .build()
            .expect("client config");
        let mut client = Dtls::new_12_psk(Arc::new(cfg), now);
        client.set_active(true);
        client.handle_timeout(now).expect("start");
        let mut buf = vec![0u8; 4096];
        let mut connected = false;
        for _ in 0..20 {
            let mut to_server = Vec::new();
            loop {
                match client.poll_output(&mut buf) {
                    Output::Packet(p) => to_server.push(p.to_vec()),
                    Output::Connected => connected = true,
                    Output::Timeout(_) => break,
                    _ => {}
                }
            }
            if connected && server.identity(peer).is_some() {
                return true;
            }
            let mut out = DtlsOutput::default();
            for p in to_server {
                server.handle_datagram(now, peer, &p, &mut out);
            }
            for (_, r) in out.transmit {
                let _ = client.handle_packet(&r);
            }
        }
        false
    }

    #[test]
    fn a_new_handshake_from_an_address_with_a_session_replaces_it_once_complete() {
        let mut server = DtlsSessions::new(Arc::new(OneKey), DtlsLimits::default());
        let now = Instant::now();
        let peer: SocketAddr = ([127, 0, 0, 1], 9999).into();
        assert!(handshake(&mut server, peer, now));
        // The device reboots and comes back from the same address and port.
        assert!(
            handshake(&mut server, peer, now),
            "the second handshake completes"
        );
        assert_eq!(server.len(), 1);
        assert_eq!(server.stats.handshakes_completed, 2);
    }

    #[test]
    fn a_full_table_makes_room_by_dropping_the_least_recently_active_session() {
        let limits = DtlsLimits {
            max_sessions: 3,
            ..DtlsLimits::default()
        };
        let mut server = DtlsSessions::new(Arc::new(OneKey), limits);
        let t0 = Instant::now();
        for i in 0..5u16 {
            let peer: SocketAddr = ([127, 0, 0, 1], 20_000 + i).into();
            let at = t0 + Duration::from_millis(u64::from(i));
            assert!(
                handshake(&mut server, peer, at),
                "device {i} gets a session"
            );
        }
        assert_eq!(server.len(), 3);
        assert_eq!(server.stats.evicted, 2);
        assert!(server.identity(([127, 0, 0, 1], 20_000).into()).is_none());
        assert!(server.identity(([127, 0, 0, 1], 20_004).into()).is_some());
    }

    #[test]
    fn many_handshakes_in_memory_all_complete() {
        let mut server = DtlsSessions::new(Arc::new(OneKey), DtlsLimits::default());
        let now = Instant::now();
        let mut failed = Vec::new();
        for i in 0..300u16 {
            let peer: SocketAddr = ([127, 0, 0, 1], 10_000 + i).into();
            if !handshake(&mut server, peer, now) {
                failed.push(i);
            }
        }
        assert!(
            failed.is_empty(),
            "handshakes that did not complete: {failed:?}"
        );
    }
}
