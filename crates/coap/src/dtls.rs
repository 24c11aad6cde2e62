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

/// Answers one handshake's PSK lookup and remembers the grant.
struct Resolver {
    store: AssertUnwindSafe<Arc<dyn PskStore>>,
    peer: SocketAddr,
    grant: Arc<Mutex<Option<PskGrant>>>,
}

impl PskResolver for Resolver {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        let (key, grant) = self.store.lookup(identity, self.peer)?;
        if let Ok(mut g) = self.grant.lock() {
            *g = Some(grant);
        }
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

struct Session {
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
    buf: Vec<u8>,
    pub stats: DtlsStats,
}

/// A per-handshake configuration: the PSK suites only (CCM_8 first, the
/// one RFC 7252 mandates), no identity hint.
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
            buf: vec![0; 2048],
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
        if !self.sessions.contains_key(&peer) {
            // Only a handshake record (content type 22) opens a session.
            if data.first() != Some(&22) {
                return;
            }
            let handshaking = self.sessions.values().filter(|s| !s.connected).count();
            if self.sessions.len() >= self.limits.max_sessions
                || handshaking >= self.limits.max_handshakes
            {
                self.evict_idle(now);
                let handshaking = self.sessions.values().filter(|s| !s.connected).count();
                if self.sessions.len() >= self.limits.max_sessions
                    || handshaking >= self.limits.max_handshakes
                {
                    self.stats.refused_full += 1;
                    return;
                }
            }
            let grant = Arc::new(Mutex::new(None));
            let resolver = Resolver {
                store: AssertUnwindSafe(self.store.clone()),
                peer,
                grant: grant.clone(),
            };
            let cfg = match config(resolver) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "DTLS configuration refused");
                    return;
                }
            };
            let mut dtls = Dtls::new_12_psk(cfg, now);
            // The engine draws its random values on its first timer.
            if guarded(|| dtls.handle_timeout(now)).is_err() {
                return;
            }
            self.sessions.insert(
                peer,
                Session {
                    dtls,
                    grant,
                    connected: false,
                    timer: None,
                    last_active: now,
                },
            );
        }
        let failed = match self.sessions.get_mut(&peer) {
            Some(s) => {
                s.last_active = now;
                guarded(|| s.dtls.handle_packet(data)).is_err()
            }
            None => return,
        };
        if failed {
            self.drop_failed(peer);
            return;
        }
        self.drain(peer, out);
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
        let mut closed = false;
        loop {
            let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                match s.dtls.poll_output(&mut self.buf) {
                    Output::Packet(p) => Polled::Packet(p.to_vec()),
                    Output::ApplicationData(d) => Polled::Data(d.to_vec()),
                    Output::Connected => Polled::Connected,
                    Output::Timeout(t) => Polled::Timeout(t),
                    Output::CloseNotify => Polled::Close,
                    Output::BufferTooSmall { needed } => Polled::Grow(needed),
                    _ => Polled::Other,
                }
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
                    self.stats.handshakes_completed += 1;
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
                    self.buf.resize(needed, 0);
                }
                Polled::Other => {}
            }
        }
        if closed {
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
        self.sessions.values().filter_map(|s| s.timer).min()
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
    }
}
