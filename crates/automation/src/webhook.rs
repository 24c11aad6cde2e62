//! Webhook delivery: an HTTP(S) POST of a JSON body, signed with
//! HMAC-SHA256, retried with exponential backoff from a bounded queue.
//!
//! The HTTP client is a deliberately small HTTP/1.1 implementation (one
//! request per connection, `Content-Length` body, status line parsed,
//! response body read up to a bound and discarded): webhooks need nothing
//! more, and it keeps a general HTTP client stack out of the binary. TLS
//! uses rustls with the system's root certificates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Header carrying `sha256=<hex HMAC of the body>`.
pub const SIGNATURE_HEADER: &str = "X-M2mhub-Signature";
/// Header carrying the delivery id (the same across retries).
pub const DELIVERY_HEADER: &str = "X-M2mhub-Delivery";
/// Largest response read from a webhook (the rest is ignored).
const MAX_RESPONSE: usize = 64 * 1024;

/// Where and how to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub url: String,
    /// HMAC key; the signature header is sent when set.
    pub secret: Option<String>,
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum WebhookError {
    #[error("bad webhook URL {0:?}: use http://host[:port]/path or https://…")]
    BadUrl(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("TLS with {0}: {1}")]
    Tls(String, String),
    #[error("I/O with {0}: {1}")]
    Io(String, String),
    #[error("{0} answered {1}")]
    Status(String, u16),
    #[error("{0} sent a malformed response")]
    BadResponse(String),
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("webhook queue full: delivery dropped")]
    QueueFull,
}

pub fn parse_url(url: &str) -> Result<Url, WebhookError> {
    let bad = || WebhookError::BadUrl(url.to_string());
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.contains([' ', '\r', '\n']) {
        return Err(bad());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Url {
        tls,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in tag.as_ref() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    let cfg = CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err("no system root certificates found (install ca-certificates)".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    });
    cfg.clone().map(tokio_rustls::TlsConnector::from)
}

/// POST `body` once; `Ok(status)` for any 2xx.
pub async fn post(
    target: &Target,
    delivery: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<u16, WebhookError> {
    let url = parse_url(&target.url)?;
    let name = format!("{}:{}", url.host, url.port);
    match tokio::time::timeout(timeout, post_inner(&url, &name, target, delivery, body)).await {
        Ok(r) => r,
        Err(_) => Err(WebhookError::Timeout(name, timeout)),
    }
}

async fn post_inner(
    url: &Url,
    name: &str,
    target: &Target,
    delivery: &str,
    body: &[u8],
) -> Result<u16, WebhookError> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| WebhookError::Connect(name.to_string(), e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: m2mhub/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{DELIVERY_HEADER}: {delivery}\r\n",
        url.path,
        if url.port == 80 || url.port == 443 { url.host.clone() } else { name.to_string() },
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    if let Some(secret) = &target.secret {
        head.push_str(&format!("{SIGNATURE_HEADER}: {}\r\n", sign(secret, body)));
    }
    head.push_str("\r\n");
    if url.tls {
        let connector = tls_connector().map_err(|e| WebhookError::Tls(name.to_string(), e))?;
        let server_name = rustls_pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| WebhookError::Tls(name.to_string(), e.to_string()))?;
        let stream = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| WebhookError::Tls(name.to_string(), e.to_string()))?;
        exchange(stream, name, head.as_bytes(), body).await
    } else {
        exchange(tcp, name, head.as_bytes(), body).await
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    name: &str,
    head: &[u8],
    body: &[u8],
) -> Result<u16, WebhookError> {
    let io = |e: std::io::Error| WebhookError::Io(name.to_string(), e.to_string());
    s.write_all(head).await.map_err(io)?;
    s.write_all(body).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // Read until the status line is complete (the rest is not needed).
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 || buf.len() > MAX_RESPONSE {
            return Err(WebhookError::BadResponse(name.to_string()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line_end = buf
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or_else(|| WebhookError::BadResponse(name.to_string()))?;
    let line = std::str::from_utf8(&buf[..line_end])
        .map_err(|_| WebhookError::BadResponse(name.to_string()))?;
    let mut parts = line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(WebhookError::BadResponse(name.to_string()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(WebhookError::BadResponse(name.to_string()));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| WebhookError::BadResponse(name.to_string()))?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(WebhookError::Status(name.to_string(), status))
    }
}

/// Delivery counters, per service.
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub gave_up: AtomicU64,
    pub dropped_queue_full: AtomicU64,
}

/// One queued delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub target: Target,
    pub id: String,
    pub body: Vec<u8>,
    /// Called with the final outcome (for rule counters).
    pub rule: Option<String>,
}

/// Outcome reported back to the rule service.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub rule: Option<String>,
    pub delivery: String,
    pub result: Result<u16, WebhookError>,
    pub attempts: u32,
}

/// Retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    /// Deliveries in flight or waiting at most; more are dropped and counted.
    pub queue: usize,
    /// Concurrent deliveries.
    pub workers: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            queue: 10_000,
            workers: 8,
        }
    }
}

/// The sender: a bounded queue drained by a few worker tasks.
#[derive(Clone)]
pub struct Webhooks {
    tx: mpsc::Sender<Delivery>,
    pub stats: Arc<WebhookStats>,
}

impl Webhooks {
    /// Start the workers; outcomes are sent to `outcomes` (best effort).
    pub fn start(policy: Policy, outcomes: mpsc::UnboundedSender<Outcome>) -> Webhooks {
        let (tx, rx) = mpsc::channel::<Delivery>(policy.queue.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let stats = Arc::new(WebhookStats::default());
        for _ in 0..policy.workers.max(1) {
            let rx = rx.clone();
            let stats = stats.clone();
            let outcomes = outcomes.clone();
            tokio::spawn(async move {
                loop {
                    let next = rx.lock().await.recv().await;
                    let Some(d) = next else { return };
                    let o = deliver(&d, policy, &stats).await;
                    let _ = outcomes.send(o);
                }
            });
        }
        Webhooks { tx, stats }
    }

    /// Queue a delivery; refused (and counted) when the queue is full.
    pub fn send(&self, d: Delivery) -> Result<(), WebhookError> {
        self.tx.try_send(d).map_err(|_| {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            WebhookError::QueueFull
        })
    }
}

async fn deliver(d: &Delivery, p: Policy, stats: &WebhookStats) -> Outcome {
    let mut backoff = p.first_backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let r = post(&d.target, &d.id, &d.body, p.timeout).await;
        match r {
            Ok(status) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                return Outcome {
                    rule: d.rule.clone(),
                    delivery: d.id.clone(),
                    result: Ok(status),
                    attempts: attempt,
                };
            }
            Err(e) => {
                stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                // A 4xx other than 408/429 will not get better by retrying.
                let permanent = matches!(e, WebhookError::BadUrl(_))
                    || matches!(e, WebhookError::Status(_, s) if (400..500).contains(&s) && s != 408 && s != 429);
                if permanent || attempt >= p.attempts {
                    stats.gave_up.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(delivery = %d.id, url = %d.target.url, error = %e, attempts = attempt, "webhook delivery failed");
                    return Outcome {
                        rule: d.rule.clone(),
                        delivery: d.id.clone(),
                        result: Err(e),
                        attempts: attempt,
                    };
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(p.max_backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_are_refused() {
        let u = parse_url("http://127.0.0.1:8081/hook?x=1").expect("url");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 8081, "/hook?x=1")
        );
        let u = parse_url("https://example.com").expect("url");
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/"));
        let u = parse_url("http://[::1]:9000/x").expect("url");
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        for bad in [
            "ftp://x",
            "http://",
            "http://user@host/",
            "http://h:99999/",
            "http://h/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signature_is_the_rfc_4231_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
