//! CoAP load: devices posting SenML+CBOR readings over plain CoAP or CoAPS
//! (CON, each waiting for its 2.04, or NON), and the DTLS handshake rate.
//! Latencies are per request, from send to response (µs).

use crate::histogram::Histogram;
use m2mhub_coap::client::Client;
use m2mhub_coap::message::content_format;
use m2mhub_coap::{Code, MessageType};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How the load authenticates.
#[derive(Debug, Clone)]
pub enum CoapAuth {
    /// Plain CoAP: `/{device}/{secret}/telemetry`.
    Token { device: String, secret: String },
    /// CoAPS with this PSK identity and key: `/telemetry`.
    Psk { identity: Vec<u8>, key: Vec<u8> },
    /// Plain CoAP PUTs to this path, no credentials (a peer server's
    /// resource, e.g. libcoap's `example_data`).
    Path(String),
}

#[derive(Debug, Clone)]
pub struct CoapLoad {
    pub target: SocketAddr,
    pub auth: CoapAuth,
    /// Concurrent clients, one request in flight each.
    pub clients: usize,
    pub duration: Duration,
    /// Non-confirmable requests (the server still answers each).
    pub non: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CoapLoadReport {
    pub mode: String,
    pub clients: usize,
    pub seconds: f64,
    pub readings: u64,
    pub readings_per_sec: f64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The CoAP message of one reading, in bytes (before DTLS).
    pub request_bytes: usize,
    /// Measured: UDP payload bytes both ways per answered reading (DTLS
    /// records included on CoAPS; the handshake excluded).
    pub wire_bytes_per_reading: f64,
    /// Measured: UDP payload bytes of one DTLS handshake, both ways (0 on
    /// plain CoAP).
    pub handshake_bytes: u64,
}

/// One reading as SenML+CBOR: `[{0: "t", 2: <f64>}]`.
pub fn senml_reading(value: f64) -> Vec<u8> {
    let mut b = vec![0x81, 0xa2, 0x00, 0x61, b't', 0x02, 0xfb];
    b.extend_from_slice(&value.to_bits().to_be_bytes());
    b
}

async fn client(load: &CoapLoad) -> Result<(Client, String), String> {
    match &load.auth {
        CoapAuth::Token { device, secret } => Ok((
            Client::new(load.target).await.map_err(|e| e.to_string())?,
            format!("{device}/{secret}/telemetry"),
        )),
        CoapAuth::Path(p) => Ok((
            Client::new(load.target).await.map_err(|e| e.to_string())?,
            p.trim_start_matches('/').to_string(),
        )),
        CoapAuth::Psk { identity, key } => Ok((
            Client::new_psk(load.target, identity, key)
                .await
                .map_err(|e| e.to_string())?,
            "telemetry".to_string(),
        )),
    }
}

/// Run the load for `duration` and report.
pub async fn run(load: CoapLoad) -> Result<CoapLoadReport, String> {
    let deadline = Instant::now() + load.duration;
    let mut tasks = Vec::new();
    let started = Instant::now();
    let mut request_bytes = 0;
    let mut handshake_bytes = 0;
    for i in 0..load.clients {
        let (mut c, path) = client(&load).await?;
        let at_start = c.wire;
        if i == 0 {
            handshake_bytes = at_start.bytes_sent + at_start.bytes_received;
        }
        if i == 0 {
            let mut m = c.request(Code::POST, &path);
            m.set_content_format(content_format::SENML_CBOR);
            m.payload = senml_reading(21.5).into();
            request_bytes = m.encode().map(|b| b.len()).unwrap_or(0);
        }
        let non = load.non;
        // A NON request or its answer may be lost: do not wait long.
        if non {
            c.timeout = Duration::from_secs(2);
        }
        let method = if matches!(load.auth, CoapAuth::Path(_)) {
            Code::PUT
        } else {
            Code::POST
        };
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let mut m = c.request(method, &path);
                if non {
                    m.mtype = MessageType::NonConfirmable;
                }
                m.set_content_format(content_format::SENML_CBOR);
                m.payload = senml_reading(n as f64).into();
                let t = Instant::now();
                match c.call(m).await {
                    Ok(r) if r.code == Code::CHANGED || r.code == Code::CREATED => {
                        h.record(t.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
                n += 1;
            }
            let w = c.wire;
            let bytes =
                (w.bytes_sent + w.bytes_received) - (at_start.bytes_sent + at_start.bytes_received);
            (h, errors, bytes)
        }));
    }
    let mut h = Histogram::new();
    let mut errors = 0;
    let mut bytes = 0u64;
    for t in tasks {
        let (th, te, tb) = t.await.map_err(|e| e.to_string())?;
        h.merge(&th);
        errors += te;
        bytes += tb;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(CoapLoadReport {
        mode: match (&load.auth, load.non) {
            (CoapAuth::Token { .. }, false) => "coap CON".into(),
            (CoapAuth::Token { .. }, true) => "coap NON".into(),
            (CoapAuth::Psk { .. }, false) => "coaps CON".into(),
            (CoapAuth::Psk { .. }, true) => "coaps NON".into(),
            (CoapAuth::Path(_), false) => "coap CON (path)".into(),
            (CoapAuth::Path(_), true) => "coap NON (path)".into(),
        },
        clients: load.clients,
        seconds,
        readings: h.count(),
        readings_per_sec: h.count() as f64 / seconds,
        errors,
        p50_ms: h.percentile(50.0) as f64 / 1000.0,
        p99_ms: h.percentile(99.0) as f64 / 1000.0,
        request_bytes,
        wire_bytes_per_reading: if h.count() > 0 {
            bytes as f64 / h.count() as f64
        } else {
            0.0
        },
        handshake_bytes,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct HandshakeReport {
    pub concurrency: usize,
    pub seconds: f64,
    pub handshakes: u64,
    pub handshakes_per_sec: f64,
    pub failures: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Full DTLS-PSK handshakes, `concurrency` at a time, for `duration`.
pub async fn handshakes(
    target: SocketAddr,
    identity: Vec<u8>,
    key: Vec<u8>,
    concurrency: usize,
    duration: Duration,
) -> Result<HandshakeReport, String> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    // One client configuration for all: the load generator should spend
    // its time in handshakes, not in building configurations.
    let cfg = Client::psk_config(&identity, &key).map_err(|e| e.to_string())?;
    for _ in 0..concurrency {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::new();
            let mut failures = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match Client::with_psk_config(target, cfg.clone()).await {
                    Ok(_) => h.record(t.elapsed().as_micros() as u64),
                    Err(_) => failures += 1,
                }
            }
            (h, failures)
        }));
    }
    let mut h = Histogram::new();
    let mut failures = 0;
    for t in tasks {
        let (th, tf) = t.await.map_err(|e| e.to_string())?;
        h.merge(&th);
        failures += tf;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(HandshakeReport {
        concurrency,
        seconds,
        handshakes: h.count(),
        handshakes_per_sec: h.count() as f64 / seconds,
        failures,
        p50_ms: h.percentile(50.0) as f64 / 1000.0,
        p99_ms: h.percentile(99.0) as f64 / 1000.0,
    })
}
