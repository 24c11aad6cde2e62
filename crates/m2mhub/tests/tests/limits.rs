//! DoS limits, bans and the platform hooks (kick, internal subscriptions,
//! security and connection events), against a bare broker configured
//! through `BrokerConfig` (see `BrokerServer`).

use crate::common::*;
use bytes::Bytes;
use m2mhub_broker::auth::{Authorizer, ClientIdentity};
use m2mhub_broker::{BanKey, ConnectionEvents, SecurityEvent, SecurityEventKind, SecurityEvents};
use mqtt_codec::{reason, Connect, Packet, Protocol, QoS};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Default)]
struct Recorder {
    security: Mutex<Vec<SecurityEvent>>,
    connection: Mutex<Vec<String>>,
}

impl Recorder {
    fn kinds(&self) -> Vec<SecurityEventKind> {
        self.security
            .lock()
            .expect("lock")
            .iter()
            .map(|e| e.kind)
            .collect()
    }

    fn has(&self, kind: SecurityEventKind) -> bool {
        self.kinds().contains(&kind)
    }

    fn conn_events(&self) -> Vec<String> {
        self.connection.lock().expect("lock").clone()
    }
}

impl SecurityEvents for Recorder {
    fn event(&self, e: SecurityEvent) {
        self.security.lock().expect("lock").push(e);
    }
}

impl ConnectionEvents for Recorder {
    fn connected(&self, client_id: &str, _: &ClientIdentity, _: SocketAddr) {
        self.connection
            .lock()
            .expect("lock")
            .push(format!("connected {client_id}"));
    }
    fn disconnected(&self, client_id: &str, _: &ClientIdentity, reason: &str) {
        self.connection
            .lock()
            .expect("lock")
            .push(format!("disconnected {client_id} {reason}"));
    }
    fn auth_failed(&self, client_id: &str, username: Option<&str>, _: SocketAddr, code: u8) {
        self.connection.lock().expect("lock").push(format!(
            "auth_failed {client_id} {} 0x{code:02x}",
            username.unwrap_or("-")
        ));
    }
}

fn hooks(srv: &BrokerServer) -> Arc<Recorder> {
    let r = Arc::new(Recorder::default());
    srv.broker.set_security_events(r.clone());
    srv.broker.set_connection_events(r.clone());
    r
}

fn with_credentials(mut c: Connect, user: &str, password: &str) -> Connect {
    c.username = Some(user.into());
    c.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    c
}

fn localhost() -> BanKey {
    BanKey::ip("127.0.0.1".parse().expect("ip"))
}

/// Open a TCP connection and send CONNECT; the CONNACK code, or `None` if
/// the broker closed the socket without one.
async fn try_connect(addr: SocketAddr, c: Connect) -> (Raw, Option<u8>) {
    let mut raw = Raw::tcp(addr, c.protocol).await;
    raw.protocol = c.protocol;
    let sent = raw
        .try_send_raw(&bytes_of(&Packet::Connect(Box::new(c)), raw.protocol))
        .await;
    if !sent {
        return (raw, None);
    }
    match raw.next(WAIT).await {
        Next::Packet(Packet::ConnAck(a)) => (raw, Some(a.reason_code)),
        Next::Closed => (raw, None),
        other => panic!("expected CONNACK or close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_limited() {
    let srv = BrokerServer::start(|c| c.max_connections_per_ip = 3).await;
    let rec = hooks(&srv);
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(Raw::connect_ok(srv.addr, v5(&format!("ip-{i}"))).await.0);
    }
    // The fourth is closed before its CONNECT is even read.
    let (_, code) = try_connect(srv.addr, v5("ip-3")).await;
    assert_eq!(code, None, "no CONNACK for a connection over the limit");
    assert_eq!(srv.counter("connections_refused_per_ip"), 1);
    assert!(rec.has(SecurityEventKind::ConnectionsPerIpExceeded));

    // A connection that ends frees its slot.
    open.pop().expect("conn").disconnect().await;
    within("slot freed", async {
        loop {
            if let (_, Some(0)) = try_connect(srv.addr, v5("ip-3")).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rate_per_ip_refuses_beyond_the_burst() {
    let srv = BrokerServer::start(|c| {
        c.max_connect_rate_per_ip = 1;
        c.connect_burst_per_ip = 3;
    })
    .await;
    let rec = hooks(&srv);
    for i in 0..3 {
        Raw::connect_ok(srv.addr, v5(&format!("r-{i}"))).await;
    }
    let (mut c, ack) = Raw::connect(srv.addr, v5("r-3")).await;
    assert_eq!(ack.reason_code, reason::CONNECTION_RATE_EXCEEDED);
    assert!(c.expect_close(WAIT).await.is_empty());
    // 3.1.1: return code 3 (server unavailable).
    assert_eq!(crate::auth::v311_return_code(srv.addr, v3("r-4")).await, 3);
    assert_eq!(srv.counter("connections_refused_rate"), 2);
    assert!(rec.has(SecurityEventKind::ConnectRateExceeded));
    // A token comes back after a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    Raw::connect_ok(srv.addr, v5("r-5")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_connect_rate_is_limited() {
    let srv = BrokerServer::start(|c| {
        c.max_connect_rate = 1; // burst 2
        c.max_connect_rate_per_ip = 0;
    })
    .await;
    Raw::connect_ok(srv.addr, v5("g-1")).await;
    Raw::connect_ok(srv.addr, v5("g-2")).await;
    let (_, ack) = Raw::connect(srv.addr, v5("g-3")).await;
    assert_eq!(ack.reason_code, reason::CONNECTION_RATE_EXCEEDED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_connect_is_cut_at_the_connect_timeout() {
    let srv = BrokerServer::start(|c| c.connect_timeout = Duration::from_secs(1)).await;
    let bytes = bytes_of(&Packet::Connect(Box::new(v5("slowloris"))), Protocol::V5);
    let mut raw = Raw::tcp(srv.addr, Protocol::V5).await;
    let t0 = Instant::now();
    let mut closed = false;
    // One byte every 150 ms: always some progress, never a whole CONNECT
    // before the deadline.
    for b in bytes.iter().take(bytes.len() - 1) {
        if !raw.try_send_raw(&[*b]).await {
            closed = true;
            break;
        }
        match raw.next(Duration::from_millis(150)).await {
            Next::Timeout => {}
            Next::Closed => {
                closed = true;
                break;
            }
            Next::Packet(p) => panic!("unexpected {p:?}"),
        }
    }
    assert!(closed, "still open after the whole trickle");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert_eq!(srv.counter("connect_timeouts"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_is_limited_then_disconnects() {
    // 2/s, burst 4; more than 20 refusals within a second disconnect.
    let srv = BrokerServer::start(|c| c.max_publish_rate = 2).await;
    let rec = hooks(&srv);
    let (mut sub, _) = Raw::connect_ok(srv.addr, v5("rate-sub")).await;
    sub.subscribe(1, "rate/t", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.addr, v5("rate-pub")).await;
    for i in 1..=4u16 {
        let code = p
            .publish(publish("rate/t", QoS::AtLeastOnce, i, format!("m{i}")))
            .await;
        assert_eq!(code, reason::SUCCESS, "message {i}");
    }
    let code = p
        .publish(publish("rate/t", QoS::AtLeastOnce, 5, "over"))
        .await;
    assert_eq!(code, reason::QUOTA_EXCEEDED);
    for i in 1..=4u16 {
        let m = sub.recv_publish().await;
        assert_eq!(text(&m), format!("m{i}"));
        sub.puback(m.packet_id.expect("pid")).await;
    }
    sub.expect_nothing(QUIET).await;
    assert!(rec.has(SecurityEventKind::PublishRateExceeded));

    // Keep going: a flood of QoS 0 ends with DISCONNECT 0x96.
    let mut flood = Vec::new();
    for _ in 0..30 {
        flood.extend_from_slice(&bytes_of(
            &Packet::Publish(publish("rate/t", QoS::AtMostOnce, 0, "x")),
            Protocol::V5,
        ));
    }
    p.send_raw(&flood).await;
    p.expect_disconnect(reason::MESSAGE_RATE_TOO_HIGH).await;
    assert_eq!(srv.counter("rate_limit_disconnects"), 1);
    assert!(srv.counter("publishes_rate_limited") >= 21);
    assert!(rec.has(SecurityEventKind::PublishRateDisconnect));
    sub.expect_nothing(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_v311_drops_silently() {
    let srv = BrokerServer::start(|c| c.max_publish_rate = 1).await; // burst 2
    let (mut sub, _) = Raw::connect_ok(srv.addr, v3("rate3-sub")).await;
    sub.subscribe(1, "rate3/t", QoS::AtMostOnce).await;
    let (mut p, _) = Raw::connect_ok(srv.addr, v3("rate3-pub")).await;
    for i in 1..=3u16 {
        // 3.1.1 PUBACKs carry no code: all look the same.
        assert_eq!(
            p.publish(publish("rate3/t", QoS::AtLeastOnce, i, "m"))
                .await,
            0
        );
    }
    sub.recv_publish().await;
    sub.recv_publish().await;
    sub.expect_nothing(QUIET).await;
    assert_eq!(srv.counter("publishes_rate_limited"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_session_are_limited() {
    let srv = BrokerServer::start(|c| c.max_subscriptions_per_session = 2).await;
    let rec = hooks(&srv);
    let (mut c, _) = Raw::connect_ok(srv.addr, v5("subs")).await;
    assert_eq!(
        c.subscribe(1, "a", QoS::AtLeastOnce).await.reason_codes,
        [1]
    );
    assert_eq!(c.subscribe(2, "b", QoS::AtMostOnce).await.reason_codes, [0]);
    assert_eq!(
        c.subscribe(3, "c", QoS::AtMostOnce).await.reason_codes,
        [reason::QUOTA_EXCEEDED]
    );
    // Replacing an existing subscription is not a new one.
    assert_eq!(c.subscribe(4, "a", QoS::AtMostOnce).await.reason_codes, [0]);
    c.send(&Packet::Unsubscribe(mqtt_codec::Unsubscribe {
        packet_id: 5,
        user_properties: Vec::new(),
        filters: vec!["a".into()],
    }))
    .await;
    c.recv_where("UNSUBACK", |p| {
        matches!(p, Packet::UnsubAck(_)).then_some(())
    })
    .await;
    assert_eq!(c.subscribe(6, "c", QoS::AtMostOnce).await.reason_codes, [0]);
    assert!(rec.has(SecurityEventKind::SubscriptionQuotaExceeded));

    let (mut old, _) = Raw::connect_ok(srv.addr, v3("subs-3")).await;
    old.subscribe(1, "a", QoS::AtMostOnce).await;
    old.subscribe(2, "b", QoS::AtMostOnce).await;
    assert_eq!(
        old.subscribe(3, "c", QoS::AtMostOnce).await.reason_codes,
        [0x80]
    );
    assert_eq!(srv.counter("subscriptions_quota_exceeded"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_auth_failures_ban_the_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwords");
    std::fs::write(
        &file,
        m2mhub_broker::auth::hash_password_line("alice", "s3cret") + "\n",
    )
    .expect("write password file");
    let srv = BrokerServer::start(|c| {
        c.allow_anonymous = false;
        c.password_file = Some(file.clone());
    })
    .await;
    let rec = hooks(&srv);
    for i in 0..10 {
        let (_, ack) = Raw::connect(
            srv.addr,
            with_credentials(v5(&format!("bad-{i}")), "alice", "nope"),
        )
        .await;
        assert_eq!(
            ack.reason_code,
            reason::BAD_USER_NAME_OR_PASSWORD,
            "attempt {i}"
        );
    }
    // Banned now, even with the right password.
    let good = || with_credentials(v5("alice-1"), "alice", "s3cret");
    let (_, ack) = Raw::connect(srv.addr, good()).await;
    assert_eq!(ack.reason_code, reason::BANNED);
    // 3.1.1: return code 5.
    assert_eq!(
        crate::auth::v311_return_code(srv.addr, with_credentials(v3("alice-3"), "alice", "s3cret"))
            .await,
        5
    );
    let bans = srv.broker.bans();
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0].key, localhost());
    assert!(bans[0].automatic);
    assert!(bans[0].remaining <= Duration::from_secs(60));
    assert!(rec.has(SecurityEventKind::AutoBanAuthFailures));
    assert!(rec.has(SecurityEventKind::BannedConnectRefused));
    let failures = rec
        .conn_events()
        .iter()
        .filter(|e| e.starts_with("auth_failed") && e.ends_with("alice 0x86"))
        .count();
    assert_eq!(failures, 10);
    assert_eq!(srv.counter("bans_automatic"), 1);

    assert!(srv.broker.unban(&localhost()));
    assert!(srv.broker.bans().is_empty());
    Raw::connect_ok(srv.addr, good()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_can_be_banned() {
    let srv = BrokerServer::start(|_| {}).await;
    srv.broker.ban_client("evil", "test", None);
    let (_, ack) = Raw::connect(srv.addr, v5("evil")).await;
    assert_eq!(ack.reason_code, reason::BANNED);
    assert_eq!(crate::auth::v311_return_code(srv.addr, v3("evil")).await, 5);
    Raw::connect_ok(srv.addr, v5("good")).await;

    // Banning a connected client closes its connection.
    let (mut live, _) = Raw::connect_ok(srv.addr, v5("evil-2")).await;
    let d = srv
        .broker
        .ban_client("evil-2", "test", Some(Duration::from_secs(600)));
    assert_eq!(d, Duration::from_secs(600));
    live.expect_disconnect(reason::ADMINISTRATIVE_ACTION).await;
    let keys: Vec<String> = srv
        .broker
        .bans()
        .iter()
        .map(|b| b.key.to_string())
        .collect();
    assert_eq!(keys, ["client:evil-2", "client:evil"]);

    assert!(srv.broker.unban(&BanKey::ClientId("evil".into())));
    Raw::connect_ok(srv.addr, v5("evil")).await;
}

/// A TCP connection to `addr` from another loopback address (Linux routes
/// all of 127.0.0.0/8 to the loopback interface).
async fn tcp_from(addr: SocketAddr, local: &str) -> Raw {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(local.parse().expect("ip"), 0))
        .expect("bind a second loopback address");
    let s = within("TCP connect", sock.connect(addr))
        .await
        .expect("TCP connect");
    s.set_nodelay(true).expect("nodelay");
    Raw::over(Box::new(s), Protocol::V5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banning_an_address_closes_its_open_connections() {
    let srv = BrokerServer::start(|_| {}).await;
    // Two clients from 127.0.0.2 (one persistent, one idle) and one from
    // 127.0.0.1.
    let mut banned = Vec::new();
    for c in [v5("from-2a"), v5_persistent("from-2b", true, 600)] {
        let mut raw = tcp_from(srv.addr, "127.0.0.2").await;
        assert_eq!(raw.handshake(c).await.reason_code, 0);
        banned.push(raw);
    }
    let (mut other, _) = Raw::connect_ok(srv.addr, v5("from-1")).await;

    srv.broker
        .ban_ip("127.0.0.2".parse().expect("ip"), "test", None);
    for raw in &mut banned {
        raw.expect_disconnect(reason::ADMINISTRATIVE_ACTION).await;
    }
    // The other address is untouched, and the banned one cannot return.
    other.ping().await;
    let mut again = tcp_from(srv.addr, "127.0.0.2").await;
    let sent = again
        .try_send_raw(&bytes_of(
            &Packet::Connect(Box::new(v5("from-2c"))),
            Protocol::V5,
        ))
        .await;
    if sent {
        match again.next(WAIT).await {
            Next::Packet(Packet::ConnAck(a)) => assert_eq!(a.reason_code, reason::BANNED),
            Next::Closed => {}
            other => panic!("expected CONNACK 0x8A or close, got {other:?}"),
        }
    }
    // Lifting the ban lets it back in.
    assert!(srv
        .broker
        .unban(&BanKey::ip("127.0.0.2".parse().expect("ip"))));
    let mut back = tcp_from(srv.addr, "127.0.0.2").await;
    assert_eq!(back.handshake(v5("from-2a")).await.reason_code, 0);
    other.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_flapping_bans_the_client_id() {
    let srv = BrokerServer::start(|c| c.max_connects_per_client_id = 3).await;
    let rec = hooks(&srv);
    // Dropped without DISCONNECT: connections a client ends politely do
    // not count (see `refusals.rs` in the broker's tests).
    for _ in 0..3 {
        Raw::connect_ok(srv.addr, v5("flappy"))
            .await
            .0
            .drop_abruptly()
            .await;
    }
    let (_, ack) = Raw::connect(srv.addr, v5("flappy")).await;
    assert_eq!(ack.reason_code, reason::BANNED);
    let (_, ack) = Raw::connect(srv.addr, v5("flappy")).await;
    assert_eq!(ack.reason_code, reason::BANNED);
    assert!(rec.has(SecurityEventKind::AutoBanFlapping));
    assert_eq!(srv.broker.bans()[0].key, BanKey::ClientId("flappy".into()));
    Raw::connect_ok(srv.addr, v5("steady")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_closes_a_live_session() {
    let srv = BrokerServer::start(|_| {}).await;
    let rec = hooks(&srv);
    let (mut c, _) = Raw::connect_ok(srv.addr, v5("kick-me")).await;
    assert!(srv.broker.kick("kick-me", reason::ADMINISTRATIVE_ACTION));
    c.expect_disconnect(reason::ADMINISTRATIVE_ACTION).await;
    assert!(!srv.broker.kick("nobody", reason::ADMINISTRATIVE_ACTION));
    // The session (expiry 0) ended with its connection.
    eventually("session gone", || srv.broker.session("kick-me").is_none()).await;
    assert!(!srv.broker.kick("kick-me", reason::ADMINISTRATIVE_ACTION));
    eventually("disconnected event", || {
        rec.conn_events()
            .contains(&"disconnected kick-me administrative action".to_string())
    })
    .await;
    assert!(rec.conn_events().contains(&"connected kick-me".to_string()));

    // A persistent session stays, offline, and the client can return.
    let (mut p, _) = Raw::connect_ok(srv.addr, v5_persistent("kick-p", true, 600)).await;
    p.subscribe(1, "kp/t", QoS::AtLeastOnce).await;
    assert!(srv.broker.kick("kick-p", reason::ADMINISTRATIVE_ACTION));
    p.expect_disconnect(reason::ADMINISTRATIVE_ACTION).await;
    eventually("offline", || {
        srv.broker.session("kick-p").is_some_and(|s| !s.online)
    })
    .await;
    let (_, ack) = Raw::connect_ok(srv.addr, v5_persistent("kick-p", false, 600)).await;
    assert!(ack.session_present);

    // kick_where by identity (anonymous access keeps the user name).
    let mut named = v5("kick-u");
    named.username = Some("operator-x".into());
    let (mut u, _) = Raw::connect_ok(srv.addr, named).await;
    let (mut other, _) = Raw::connect_ok(srv.addr, v5("kick-other")).await;
    let n = srv
        .broker
        .kick_where(|id| id.username.as_deref() == Some("operator-x"));
    assert_eq!(n, 1);
    u.expect_disconnect(reason::ADMINISTRATIVE_ACTION).await;
    other.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_subscription_receives_and_never_blocks() {
    let srv = BrokerServer::start(|_| {}).await;
    let mut rx = srv.broker.subscribe_internal("devices/+/telemetry", 2);
    let (mut p, _) = Raw::connect_ok(srv.addr, v5("dev-1")).await;
    for i in 1..=5u16 {
        let code = within(
            "PUBACK while the internal receiver is full",
            p.publish(publish(
                "devices/d1/telemetry",
                QoS::AtLeastOnce,
                i,
                format!("t{i}"),
            )),
        )
        .await;
        assert_eq!(code, reason::SUCCESS);
    }
    // Not matching: not delivered (and no subscriber at all).
    assert_eq!(
        p.publish(publish("devices/d1/other", QoS::AtLeastOnce, 9, "x"))
            .await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
    let a = rx.try_recv().expect("first");
    let b = rx.try_recv().expect("second");
    assert_eq!((&a.payload[..], &b.payload[..]), (&b"t1"[..], &b"t2"[..]));
    assert_eq!(a.topic, "devices/d1/telemetry");
    assert!(rx.try_recv().is_err());
    assert_eq!(srv.counter("internal_messages_dropped"), 3);
    assert_eq!(srv.counter("internal_messages_delivered"), 2);

    // Room again: delivered again. The platform's own publishes too.
    p.publish(publish("devices/d1/telemetry", QoS::AtMostOnce, 0, "t6"))
        .await;
    assert_eq!(&rx.recv().await.expect("t6").payload[..], b"t6");
    srv.broker
        .publish(
            "devices/x/telemetry",
            Bytes::from_static(b"own"),
            QoS::AtMostOnce,
            false,
        )
        .await;
    assert_eq!(&rx.recv().await.expect("own").payload[..], b"own");

    // Dropping the receiver ends the subscription.
    drop(rx);
    p.publish(publish("devices/d1/telemetry", QoS::AtLeastOnce, 10, "t7"))
        .await;
    assert_eq!(
        p.publish(publish("devices/d1/telemetry", QoS::AtLeastOnce, 11, "t8"))
            .await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
}

/// Allows `$provision/{own client id}/request` and everything not starting
/// with `$`; records what it was asked.
#[derive(Default)]
struct ProvisionAuthz {
    asked: Mutex<Vec<String>>,
}

impl Authorizer for ProvisionAuthz {
    fn can_publish(&self, client_id: &str, _: &ClientIdentity, topic: &str) -> bool {
        self.asked.lock().expect("lock").push(topic.to_string());
        !topic.starts_with('$') || topic == format!("$provision/{client_id}/request")
    }
    fn can_subscribe(&self, _: &str, _: &ClientIdentity, _: &str) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_other_than_sys_go_to_the_authorizer() {
    let authz = Arc::new(ProvisionAuthz::default());
    let srv = BrokerServer::start_with(|_| {}, authz.clone()).await;
    let mut rx = srv.broker.subscribe_internal("$provision/+/request", 16);
    let (mut c, _) = Raw::connect_ok(srv.addr, v5("claim-1")).await;
    assert_eq!(
        c.publish(publish("$SYS/x", QoS::AtLeastOnce, 1, "x")).await,
        reason::NOT_AUTHORIZED
    );
    assert_eq!(
        c.publish(publish(
            "$provision/claim-2/request",
            QoS::AtLeastOnce,
            2,
            "x"
        ))
        .await,
        reason::NOT_AUTHORIZED
    );
    assert_eq!(
        c.publish(publish(
            "$provision/claim-1/request",
            QoS::AtLeastOnce,
            3,
            "csr"
        ))
        .await,
        reason::SUCCESS
    );
    let m = within("internal delivery", rx.recv())
        .await
        .expect("message");
    assert_eq!(m.topic, "$provision/claim-1/request");
    assert_eq!(&m.payload[..], b"csr");
    // `$SYS` never reached the authorizer; the others did.
    assert_eq!(
        *authz.asked.lock().expect("lock"),
        ["$provision/claim-2/request", "$provision/claim-1/request"]
    );
}
