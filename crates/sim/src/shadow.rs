//! The shadow-update scenario ([`Scenario::Shadow`]): how many device
//! shadow updates per second the platform accepts over MQTT, and how long
//! each takes from the device's PUBLISH to its `…/update/accepted`.
//!
//! Each of `publishers` devices (client id = device id
//! `<device_prefix><i>`, which must be registered: the shadow service
//! answers 404 for unknown devices) subscribes to its own
//! `devices/{id}/shadow/update/accepted` and `…/rejected` first, then
//! publishes `{"state": {"reported": {"temperature": …, "seq": n}},
//! "clientToken": "n"}` on `devices/{id}/shadow/update` — no `version`, so
//! no update is refused as stale — keeping at most `inflight` updates
//! unanswered (closed loop), and, with `rate`, paced to that total rate.
//! The answer is matched to its update by `clientToken`; latency is
//! counted for updates *sent* inside the measurement window, and an update
//! of the window that gets no answer by the end of the grace period is
//! lost. Rejections (any `…/rejected`) are counted apart and are not in
//! the latency.
//!
//! The load here is light per message (one small JSON each way), so a
//! plain `select!` over the socket and a pacing timer is enough: the
//! server side, one durable write per update, is what is measured.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_codec::{Packet, Protocol, PubResponse, Publish, QoS};

use crate::bench::{BenchError, BenchOptions, BenchReport, Scenario};
use crate::client::{ClientConfig, Conn};
use crate::histogram::Histogram;

/// After the window: how long to wait for the last answers.
const GRACE: Duration = Duration::from_secs(3);
/// Concurrent connection attempts while setting up.
const CONNECT_BATCH: usize = 200;
const KEEP_ALIVE: u16 = 60;

/// One device's counts.
#[derive(Debug, Default)]
struct DeviceStats {
    /// Updates sent inside the window.
    sent: u64,
    /// Of those, accepted (answered on `…/accepted`).
    accepted: u64,
    /// Of those, rejected.
    rejected: u64,
    /// Latency (ns) of the accepted ones.
    hist: Histogram,
    /// The first rejection's body, to say why.
    first_rejection: Option<String>,
}

/// The run's clock: nanoseconds since `t0`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    t0: Instant,
    window_start: u64,
    window_end: u64,
}

impl Clock {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn at(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.t0 + Duration::from_nanos(ns))
    }
    fn in_window(&self, ns: u64) -> bool {
        ns >= self.window_start && ns < self.window_end
    }
}

/// Run the scenario (see the module docs).
pub async fn run_shadow(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let n = opts.publishers;
    if n == 0 {
        return Err(BenchError::InvalidOptions(
            "the shadow scenario needs at least one device (--publishers)".into(),
        ));
    }
    if opts.duration.is_zero() {
        return Err(BenchError::InvalidOptions("duration must be > 0".into()));
    }
    let qos = QoS::from_u8(opts.qos).ok_or_else(|| {
        BenchError::InvalidOptions(format!("qos must be 0..=2, not {}", opts.qos))
    })?;
    let protocol = if opts.protocol_v5 {
        Protocol::V5
    } else {
        Protocol::V311
    };
    let mut conns = Vec::with_capacity(n);
    let mut begin = 0;
    while begin < n {
        let end = (begin + CONNECT_BATCH).min(n);
        let mut set = tokio::task::JoinSet::new();
        for i in begin..end {
            let cfg = ClientConfig {
                host: opts.host.clone(),
                client_id: format!("{}{i}", opts.device_prefix),
                protocol,
                keep_alive: KEEP_ALIVE,
                clean_start: true,
                username: opts.username.clone(),
                password: opts.password.clone(),
                tls: None,
                local_ip: None,
            };
            set.spawn(async move {
                let mut c = Conn::connect(&cfg).await?;
                let base = format!("devices/{}/shadow/update", cfg.client_id);
                c.subscribe(&format!("{base}/accepted"), QoS::AtLeastOnce)
                    .await?;
                c.subscribe(&format!("{base}/rejected"), QoS::AtLeastOnce)
                    .await?;
                Ok::<_, BenchError>((i, c))
            });
        }
        while let Some(joined) = set.join_next().await {
            let (i, c) =
                joined.map_err(|e| BenchError::Protocol(format!("connect task failed: {e}")))??;
            conns.push((i, c));
        }
        begin = end;
    }
    conns.sort_by_key(|(i, _)| *i);

    let start = 20_000_000; // let every task get scheduled first
    let window_start = start + opts.warmup.as_nanos() as u64;
    let clock = Clock {
        t0: Instant::now(),
        window_start,
        window_end: window_start + opts.duration.as_nanos() as u64,
    };
    // Each device its share of the rate, staggered so they do not all
    // publish in the same instant.
    let interval_ns = (opts.rate > 0).then(|| (1e9 * n as f64 / opts.rate as f64) as u64);
    let window = opts.inflight.max(1);
    let mut tasks = Vec::with_capacity(n);
    for (i, conn) in conns {
        let first = start + interval_ns.map_or(0, |iv| iv * i as u64 / n as u64);
        tasks.push(tokio::spawn(device(
            conn,
            clock,
            qos,
            window,
            first,
            interval_ns,
        )));
    }
    let mut total = DeviceStats::default();
    for t in tasks {
        let s = t
            .await
            .map_err(|e| BenchError::Protocol(format!("device task failed: {e}")))??;
        total.sent += s.sent;
        total.accepted += s.accepted;
        total.rejected += s.rejected;
        total.hist.merge(&s.hist);
        if total.first_rejection.is_none() {
            total.first_rejection = s.first_rejection;
        }
    }
    if let Some(why) = &total.first_rejection {
        tracing::warn!(rejected = total.rejected, first = %why, "shadow updates were rejected");
    }
    let secs = opts.duration.as_secs_f64();
    let answered = total.accepted + total.rejected;
    Ok(BenchReport {
        scenario: Scenario::Shadow.name().to_string(),
        qos: opts.qos,
        payload_size: 0,
        publishers: n,
        subscribers: 0,
        duration_secs: secs,
        sent: total.sent,
        received: total.accepted,
        expected: total.sent,
        lost: total.sent.saturating_sub(answered),
        sent_per_sec: total.sent as f64 / secs,
        received_per_sec: total.accepted as f64 / secs,
        latency_p50_us: total.hist.percentile(50.0) as f64 / 1000.0,
        latency_p99_us: total.hist.percentile(99.0) as f64 / 1000.0,
        latency_max_us: total.hist.max() as f64 / 1000.0,
        connections: n,
        rejected: Some(total.rejected),
        first_rejection: total.first_rejection,
        ..Default::default()
    })
}

/// One device: publish updates within the window and the pacing, match the
/// answers by client token.
async fn device(
    mut conn: Conn,
    clock: Clock,
    qos: QoS,
    window: usize,
    first: u64,
    interval_ns: Option<u64>,
) -> Result<DeviceStats, BenchError> {
    let topic = format!("devices/{}/shadow/update", conn.client_id);
    let mut stats = DeviceStats::default();
    // clientToken (the sequence number) → send time.
    let mut unanswered: HashMap<u64, u64> = HashMap::new();
    let mut seq = 0u64;
    let mut next_due = first;
    let give_up = clock.window_end + GRACE.as_nanos() as u64;
    tokio::time::sleep_until(clock.at(first)).await;
    loop {
        let mut now = clock.now();
        while now < clock.window_end
            && unanswered.len() < window
            && (interval_ns.is_none() || next_due <= now)
        {
            seq += 1;
            let body = format!(
                r#"{{"state":{{"reported":{{"temperature":{}.{},"seq":{seq}}}}},"clientToken":"{seq}"}}"#,
                20 + seq % 10,
                seq % 100
            );
            let packet_id = (qos != QoS::AtMostOnce).then(|| conn.next_packet_id());
            conn.queue(&Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: topic.clone(),
                packet_id,
                properties: Default::default(),
                payload: Bytes::from(body),
            }))?;
            unanswered.insert(seq, now);
            if clock.in_window(now) {
                stats.sent += 1;
            }
            if let Some(iv) = interval_ns {
                next_due += iv;
            }
            now = clock.now();
        }
        conn.flush().await?;
        if now >= give_up || (now >= clock.window_end && unanswered.is_empty()) {
            break;
        }
        let wake = if now >= clock.window_end {
            give_up
        } else if unanswered.len() >= window {
            give_up.min(now + 1_000_000_000)
        } else {
            interval_ns.map_or(now, |_| next_due)
        };
        tokio::select! {
            p = conn.recv() => {
                let p = p?;
                answer(&mut conn, p, clock, &mut unanswered, &mut stats)?;
                // Whatever else arrived with it.
                while let Some(p) = conn.try_decode()? {
                    answer(&mut conn, p, clock, &mut unanswered, &mut stats)?;
                }
            }
            _ = tokio::time::sleep_until(clock.at(wake)) => {}
        }
    }
    conn.disconnect().await;
    Ok(stats)
}

/// Handle one packet from the broker: an answer to one of our updates, or
/// an acknowledgement.
fn answer(
    conn: &mut Conn,
    p: Packet,
    clock: Clock,
    unanswered: &mut HashMap<u64, u64>,
    stats: &mut DeviceStats,
) -> Result<(), BenchError> {
    let Packet::Publish(m) = p else {
        return match p {
            Packet::Disconnect(d) => Err(conn.lost(format!(
                "broker sent DISCONNECT (reason {:#04x})",
                d.reason_code
            ))),
            _ => Ok(()), // PUBACK of our update, PINGRESP
        };
    };
    if let Some(id) = m.packet_id {
        match m.qos {
            QoS::AtLeastOnce => conn.queue(&Packet::PubAck(PubResponse::new(id, 0)))?,
            QoS::ExactlyOnce => conn.queue(&Packet::PubRec(PubResponse::new(id, 0)))?,
            QoS::AtMostOnce => {}
        }
    }
    let Some(seq) = client_token(&m.payload) else {
        return Ok(());
    };
    let Some(sent) = unanswered.remove(&seq) else {
        return Ok(());
    };
    if !clock.in_window(sent) {
        return Ok(());
    }
    if m.topic.ends_with("/accepted") {
        stats.accepted += 1;
        stats.hist.record(clock.now().saturating_sub(sent));
    } else {
        stats.rejected += 1;
        if stats.first_rejection.is_none() {
            stats.first_rejection = Some(String::from_utf8_lossy(&m.payload).into_owned());
        }
    }
    Ok(())
}

/// The numeric `clientToken` of an answer, found without parsing the JSON
/// (the answers are the platform's, with the token as we sent it).
fn client_token(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""clientToken":""#;
    let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = &payload[at..];
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_token_is_found_in_an_answer() {
        assert_eq!(
            client_token(br#"{"state":{},"version":3,"clientToken":"42"}"#),
            Some(42)
        );
        assert_eq!(client_token(br#"{"code":404,"clientToken":"x"}"#), None);
        assert_eq!(client_token(br#"{"code":404}"#), None);
    }
}
