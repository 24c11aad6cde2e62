//! What one client may hold of the HTTP server: connections per source
//! address, requests in flight per bearer token, bytes per request body,
//! seconds to send a request's header. Each bound turns a flood from one
//! client into refusals for that client instead of a slower server for
//! everybody.

use crate::problem::Problem;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Limits of the HTTP(S) server (settings `[http]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Largest body of a route without a cap of its own (JSON requests).
    /// Uploads (firmware, diagnostic bundles) and device telemetry have
    /// their own caps.
    pub max_body_bytes: usize,
    /// A client must send a request's whole header within this time of
    /// connecting or of the previous response; this closes stalled
    /// (slowloris) and idle keep-alive connections alike.
    pub header_read_timeout: Duration,
    /// Once a request's header is in, its body may pause at most this long
    /// between two pieces (slow-body slowloris); beyond, 408.
    pub body_read_timeout: Duration,
    /// Open connections per source address (IPv6: per /64); 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Requests in flight per bearer token; beyond, 429. 0 = unlimited.
    pub max_requests_per_token: usize,
    /// Origins browsers may call the API from (`Access-Control-Allow-Origin`);
    /// empty: none (the console is served from the same origin and needs
    /// none); `*`: any.
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 1 << 20,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections_per_ip: 256,
            max_requests_per_token: 32,
            cors_origins: Vec::new(),
        }
    }
}

/// The limits and the counts they are checked against.
#[derive(Debug, Default)]
pub struct HttpLimits {
    pub config: HttpConfig,
    connections: parking_lot::Mutex<HashMap<IpAddr, usize>>,
    in_flight: parking_lot::Mutex<HashMap<[u8; 32], usize>>,
    /// Connections closed at once: their address held its maximum.
    pub connections_refused: AtomicU64,
    /// Requests refused (429): their token had its maximum in flight.
    pub requests_refused: AtomicU64,
}

impl HttpLimits {
    pub fn new(config: HttpConfig) -> HttpLimits {
        HttpLimits {
            config,
            ..Default::default()
        }
    }

    /// A slot for a new connection from `ip`, or `None` when the address
    /// holds its maximum. The slot is given back when dropped.
    pub fn connection(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let key = per_host(ip);
        let max = self.config.max_connections_per_ip;
        let mut c = self.connections.lock();
        let n = c.entry(key).or_insert(0);
        if max > 0 && *n >= max {
            self.connections_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            limits: self.clone(),
            ip: key,
        })
    }

    /// Connections open from `ip` (tests, metrics).
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.connections
            .lock()
            .get(&per_host(ip))
            .copied()
            .unwrap_or(0)
    }

    fn enter(self: &Arc<Self>, token: &str) -> Option<InFlight> {
        let max = self.config.max_requests_per_token;
        if max == 0 {
            return None;
        }
        let key = token_key(token);
        let mut m = self.in_flight.lock();
        let n = m.entry(key).or_insert(0);
        if *n >= max {
            return Some(InFlight { limits: None, key });
        }
        *n += 1;
        Some(InFlight {
            limits: Some(self.clone()),
            key,
        })
    }
}

impl HttpLimits {
    /// `(name, help, value)` for Prometheus text.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 2] {
        [
            (
                "connections_refused",
                "HTTP connections closed at once: their address held http.max_connections_per_ip",
                self.connections_refused.load(Ordering::Relaxed),
            ),
            (
                "requests_refused_per_token",
                "API requests refused with 429: their token had http.max_requests_per_token in flight",
                self.requests_refused.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// IPv6 clients usually hold a whole /64: count them per /64.
fn per_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// Tokens are counted by their SHA-256, so the table holds no secrets.
fn token_key(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut k = [0u8; 32];
    k.copy_from_slice(d.as_ref());
    k
}

/// One open connection, counted against its address while held.
pub struct ConnectionSlot {
    limits: Arc<HttpLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.limits.connections.lock();
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// One request in flight for a token; `limits: None` means it is over the
/// limit and was not counted.
struct InFlight {
    limits: Option<Arc<HttpLimits>>,
    key: [u8; 32],
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(l) = &self.limits {
            let mut m = l.in_flight.lock();
            if let Some(n) = m.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

/// Middleware: at most `max_requests_per_token` requests in flight per
/// bearer token (until the response's header; a live stream's body does
/// not hold a slot). Counted before the token is checked, so a flood with
/// a made-up token is bounded too.
pub async fn per_token(
    State(limits): State<Arc<HttpLimits>>,
    req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return next.run(req).await;
    };
    let slot = limits.enter(token);
    if slot.as_ref().is_some_and(|s| s.limits.is_none()) {
        limits.requests_refused.fetch_add(1, Ordering::Relaxed);
        return Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-requests",
            format!(
                "at most {} requests may be in flight per token (`http.max_requests_per_token`); wait for some to finish",
                limits.config.max_requests_per_token
            ),
        )
        .retry_after(Duration::from_secs(1))
        .into_response();
    }
    let resp = next.run(req).await;
    drop(slot);
    resp
}

/// The error a request body ends with when it stalled.
#[derive(Debug)]
struct BodyStalled(Duration);

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no request body data for {} s", self.0.as_secs())
    }
}

impl std::error::Error for BodyStalled {}

/// Middleware: a request body that stalls for `body_read_timeout` ends
/// with an error, and whatever the handler made of that (a parse error, an
/// interrupted upload) is replaced by 408. Requests without a body are
/// left alone (long polls and streams wait on the server's side, not the
/// client's).
pub async fn body_timeout(
    State(limits): State<Arc<HttpLimits>>,
    req: Request,
    next: Next,
) -> Response {
    use axum::body::{Body, HttpBody};
    use futures_util::StreamExt;
    if req.body().size_hint().exact() == Some(0) {
        return next.run(req).await;
    }
    let idle = limits.config.body_read_timeout;
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stalled.clone();
    let (parts, body) = req.into_parts();
    let data = futures_util::stream::unfold(Some(body.into_data_stream()), move |state| {
        let flag = flag.clone();
        async move {
            let mut s = state?;
            match tokio::time::timeout(idle, s.next()).await {
                Ok(Some(chunk)) => Some((chunk, Some(s))),
                Ok(None) => None,
                Err(_) => {
                    flag.store(true, Ordering::Relaxed);
                    Some((Err(axum::Error::new(BodyStalled(idle))), None))
                }
            }
        }
    });
    let resp = next
        .run(Request::from_parts(parts, Body::from_stream(data)))
        .await;
    if !stalled.load(Ordering::Relaxed) {
        return resp;
    }
    let mut resp = Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "body-timeout",
        format!(
            "the request body stalled for {} s (`http.body_read_timeout_secs`)",
            idle.as_secs()
        ),
    )
    .into_response();
    resp.headers_mut().insert(
        header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_counted_per_address_and_given_back() {
        let l = Arc::new(HttpLimits::new(HttpConfig {
            max_connections_per_ip: 2,
            ..HttpConfig::default()
        }));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let s1 = l.connection(a).expect("first");
        let _s2 = l.connection(a).expect("second");
        assert!(l.connection(a).is_none());
        let _other = l.connection(b).expect("another address");
        drop(s1);
        assert_eq!(l.connections_from(a), 1);
        assert!(l.connection(a).is_some());
        // One IPv6 /64 is one client.
        let v6a: IpAddr = "2001:db8::1".parse().expect("ip");
        let v6b: IpAddr = "2001:db8::2".parse().expect("ip");
        let _x = l.connection(v6a).expect("v6");
        let _y = l.connection(v6b).expect("v6, same /64");
        assert!(l.connection(v6a).is_none());
    }

    #[test]
    fn tokens_in_flight_are_bounded_and_released() {
        let l = Arc::new(HttpLimits::new(HttpConfig {
            max_requests_per_token: 2,
            ..HttpConfig::default()
        }));
        let a = l.enter("t1").expect("limited");
        let b = l.enter("t1").expect("limited");
        assert!(a.limits.is_some() && b.limits.is_some());
        let over = l.enter("t1").expect("limited");
        assert!(over.limits.is_none(), "third is over");
        drop(over);
        assert!(l.enter("t2").expect("limited").limits.is_some());
        drop(a);
        assert!(l.enter("t1").expect("limited").limits.is_some());
        drop(b);
        assert!(l.in_flight.lock().is_empty());
    }
}
