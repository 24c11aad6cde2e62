//! Message-layer flows stepped with a fake clock: no sockets, no sleeps.

use super::*;
use crate::message::{option, Code, Message, MessageType, Token};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

const CLIENT: u16 = 40_000;

/// A deterministic configuration: no random factor.
fn config() -> EndpointConfig {
    EndpointConfig {
        ack_random_factor_percent: 100,
        ..EndpointConfig::default()
    }
}

fn endpoint() -> Endpoint {
    Endpoint::new(config(), 7)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get(mtype: MessageType, mid: u16, token: u8) -> Vec<u8> {
    let mut m = Message::new(mtype, Code::GET, mid, Token::new(&[token]).unwrap());
    m.set_uri_path("temp");
    m.encode().unwrap()
}

fn drain(ep: &mut Endpoint) -> Vec<Message> {
    std::iter::from_fn(|| ep.poll_transmit())
        .map(|(_, b)| Message::decode(&b).unwrap())
        .collect()
}

fn events(ep: &mut Endpoint) -> Vec<Event> {
    std::iter::from_fn(|| ep.poll_event()).collect()
}

fn request_id(ev: &[Event]) -> ExchangeId {
    match ev {
        [Event::Request { id, .. }] => *id,
        other => panic!("expected one request, got {other:?}"),
    }
}

fn content(text: &'static str) -> Message {
    let mut m = Message::new(
        MessageType::Acknowledgement,
        Code::CONTENT,
        0,
        Token::default(),
    );
    m.payload = Bytes::from_static(text.as_bytes());
    m
}

fn notification(seq: u32) -> Message {
    let mut m = Message::new(
        MessageType::Confirmable,
        Code::CONTENT,
        0,
        Token::new(&[9]).unwrap(),
    );
    m.set_observe(seq);
    m
}

#[test]
fn con_retransmission_schedule_doubles_and_gives_up_after_max_retransmit() {
    let t0 = Instant::now();
    let mut ep = endpoint();
    let id = ep.send(t0, addr(CLIENT), notification(1)).unwrap();
    let first = drain(&mut ep);
    assert_eq!(first.len(), 1);
    let mid = first[0].message_id;
    // 2 s, then 4, 8, 16: retransmissions at 2, 6, 14, 30 s.
    let mut sent_at = Vec::new();
    let mut now = t0;
    while let Some(at) = ep.poll_timeout() {
        if at > t0 + Duration::from_secs(300) {
            break;
        }
        // Just before the deadline nothing happens.
        ep.handle_timeout(at - ms(1));
        assert!(ep.poll_transmit().is_none());
        now = at;
        ep.handle_timeout(now);
        for m in drain(&mut ep) {
            assert_eq!(m.message_id, mid, "a retransmission keeps its id");
            sent_at.push((now - t0).as_secs());
        }
        if !events(&mut ep).is_empty() {
            break;
        }
    }
    assert_eq!(sent_at, vec![2, 6, 14, 30]);
    // Gave up after the last timeout (32 s after the fourth retransmission).
    assert_eq!((now - t0).as_secs(), 62);
    assert!(!ep.in_flight(id));
    assert_eq!(ep.exchanges(), 0);
}

#[test]
fn give_up_is_reported_as_a_timeout_event() {
    let t0 = Instant::now();
    let mut ep = endpoint();
    let id = ep.send(t0, addr(CLIENT), notification(1)).unwrap();
    ep.handle_timeout(t0 + Duration::from_secs(2));
    ep.handle_timeout(t0 + Duration::from_secs(6));
    ep.handle_timeout(t0 + Duration::from_secs(14));
    ep.handle_timeout(t0 + Duration::from_secs(30));
    assert!(events(&mut ep).is_empty());
    ep.handle_timeout(t0 + Duration::from_secs(62));
    assert_eq!(
        events(&mut ep),
        vec![Event::Failed {
            id,
            peer: addr(CLIENT),
            reason: Failure::Timeout
        }]
    );
}

#[test]
fn first_timeout_is_randomised_between_ack_timeout_and_its_factor() {
    let t0 = Instant::now();
    for seed in 0..50 {
        let mut ep = Endpoint::new(EndpointConfig::default(), seed);
        ep.send(t0, addr(CLIENT), notification(1)).unwrap();
        let wait = ep.poll_timeout().unwrap() - t0;
        assert!(wait >= ms(2000) && wait <= ms(3000), "{wait:?}");
    }
}

#[test]
fn duplicate_con_is_answered_from_the_cache_and_delivered_once() {
    let t0 = Instant::now();
    let mut ep = endpoint();
    let req = get(MessageType::Confirmable, 0x10, 1);
    ep.handle_datagram(t0, addr(CLIENT), &req);
    let id = request_id(&events(&mut ep));
    ep.respond(t0, id, content("21.5")).unwrap();
    let first = drain(&mut ep);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].mtype, MessageType::Acknowledgement);
    assert_eq!(first[0].message_id, 0x10);
    assert_eq!(first[0].token, Token::new(&[1]).unwrap());
    assert_eq!(&first[0].payload[..], b"21.5");

    // The client did not get the ACK and retransmits: same answer, no event.
    ep.handle_datagram(t0 + ms(2000), addr(CLIENT), &req);
    assert_eq!(drain(&mut ep), first);
    assert!(events(&mut ep).is_empty());

    // The same message id from another port is another message.
    ep.handle_datagram(t0 + ms(2000), addr(CLIENT + 1), &req);
    request_id(&events(&mut ep));

    // After EXCHANGE_LIFETIME the id is forgotten.
    ep.handle_timeout(t0 + Duration::from_secs(248));
    ep.handle_datagram(t0 + Duration::from_secs(248), addr(CLIENT), &req);
    request_id(&events(&mut ep));
}

#[test]
fn duplicate_non_is_delivered_once_within_non_lifetime() {
    let t0 = Instant::now();
    let mut ep = endpoint();
    let req = get(MessageType::NonConfirmable, 0x20, 1);
    ep.handle_datagram(t0, addr(CLIENT), &req);
    let id = request_id(&events(&mut ep));
    ep.handle_datagram(t0 + ms(10), addr(CLIENT), &req);
    assert!(events(&mut ep).is_empty());
    ep.respond(t0, id, content("x")).unwrap();
    let out = drain(&mut ep);
    assert_eq!(out[0].mtype, MessageType::NonConfirmable);
    assert_eq!(out[0].token, Token::new(&[1]).unwrap());
    ep.handle_timeout(t0 + Duration::from_secs(146));
    assert_eq!(ep.dedup_len(), 0);
    ep.handle_datagram(t0 + Duration::from_secs(146), addr(CLIENT), &req);
    request_id(&events(&mut ep));
}

#[test]
fn separate_response_empty_ack_then_con_response_retransmitted_until_acked() {
    let t0 = Instant::now();
    let mut ep = endpoint();
    let req = get(MessageType::Confirmable, 0x30, 3);
    ep.handle_datagram(t0, addr(CLIENT), &req);
    let id = request_id(&events(&mut ep));
    // The application is slow: at the separate-ACK delay an empty ACK goes out.
    assert_eq!(ep.poll_timeout(), Some(t0 + ms(500)));
    ep.handle_timeout(t0 + ms(500));
    let ack = drain(&mut ep);
    assert_eq!(
        ack,
        vec![Message::empty(MessageType::Acknowledgement, 0x30)]
    );
    // A retransmitted request now gets the empty ACK again.
    ep.handle_datagram(t0 + ms(2000), addr(CLIENT), &req);
    assert_eq!(drain(&mut ep), ack);

    // The answer is a CON with the request's token and a new message id.
    let t1 = t0 + Duration::from_secs(5);
    ep.respond(t1, id, content("late")).unwrap();
    let resp = drain(&mut ep);
    assert_eq!(resp.len(), 1);
    assert_eq!(resp[0].mtype, MessageType::Confirmable);
    assert_eq!(resp[0].token, Token::new(&[3]).unwrap());
    assert_ne!(resp[0].message_id, 0x30);
    // Not acknowledged: retransmitted.
    ep.handle_timeout(t1 + Duration::from_secs(2));
    assert_eq!(drain(&mut ep), resp);
    // The client's ACK ends it.
    let client_ack = Message::empty(MessageType::Acknowledgement, resp[0].message_id);
    ep.handle_datagram(t1 + ms(2100), addr(CLIENT), &client_ack.encode().unwrap());
    assert_eq!(
        events(&mut ep),
        vec![Event::Acknowledged {
            id,
            peer: addr(CLIENT)
        }]
    );
    ep.handle_timeout(t1 + Duration::from_secs(100));
    assert!(drain(&mut ep).is_empty());
    assert_eq!(ep.exchanges(), 0);
    assert!(ep.is_verified(addr(CLIENT)));
}

#[test]
fn reset_cancels_a_con_and_a_non_message() {
    let t0 = Instant::now();
    let mut ep = endpoint();
    let con = ep.send(t0, addr(CLIENT), notification(1)).unwrap();
    let mid = drain(&mut ep)[0].message_id;
    let rst = Message::empty(MessageType::Reset, mid).encode().unwrap();
    ep.handle_datagram(t0 + ms(100), addr(CLIENT), &rst);
    assert_eq!(
        events(&mut ep),
        vec![Event::Failed {
            id: con,
            peer: addr(CLIENT),
            reason: Failure::Reset
        }]
    );
    ep.handle_timeout(t0 + Duration::from_secs(10));
    assert!(drain(&mut ep).is_empty(), "no retransmission after RST");

    let mut n = notification(2);
    n.mtype = MessageType::NonConfirmable;
    let non = ep.send(t0, addr(CLIENT), n).unwrap();
    let mid = drain(&mut ep)[0].message_id;
    let rst = Message::empty(MessageType::Reset, mid).encode().unwrap();
    // A RST from another address does not match.
    ep.handle_datagram(t0 + ms(100), addr(CLIENT + 1), &rst);
    assert!(events(&mut ep).is_empty());
    ep.handle_datagram(t0 + ms(100), addr(CLIENT), &rst);
    assert_eq!(
        events(&mut ep),
        vec![Event::Failed {
            id: non,
            peer: addr(CLIENT),
            reason: Failure::Reset
        }]
    );
    assert_eq!(ep.exchanges(), 0);
}

#[test]
fn ping_is_answered_with_reset() {
    let mut ep = endpoint();
    let ping = Message::empty(MessageType::Confirmable, 0x99)
        .encode()
        .unwrap();
    ep.handle_datagram(Instant::now(), addr(CLIENT), &ping);
    assert_eq!(
        drain(&mut ep),
        vec![Message::empty(MessageType::Reset, 0x99)]
    );
    assert!(events(&mut ep).is_empty());
}

#[test]
fn malformed_con_is_reset_and_malformed_non_is_ignored() {
    let mut ep = endpoint();
    let now = Instant::now();
    ep.handle_datagram(now, addr(CLIENT), &[0x40, 0x01, 0x00, 0x05, 0xFF]);
    assert_eq!(drain(&mut ep), vec![Message::empty(MessageType::Reset, 5)]);
    ep.handle_datagram(now, addr(CLIENT), &[0x50, 0x01, 0x00, 0x06, 0xFF]);
    ep.handle_datagram(now, addr(CLIENT), &[0x00, 0x01]);
    assert!(drain(&mut ep).is_empty());
    assert!(events(&mut ep).is_empty());
}

#[test]
fn unrecognised_critical_option_gets_bad_option_and_no_event() {
    let mut ep = endpoint();
    let mut m = Message::new(
        MessageType::Confirmable,
        Code::GET,
        0x42,
        Token::new(&[4]).unwrap(),
    );
    m.add_option(option::PROXY_URI, Bytes::from_static(b"coap://elsewhere/"));
    ep.handle_datagram(Instant::now(), addr(CLIENT), &m.encode().unwrap());
    let out = drain(&mut ep);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].code, Code::BAD_OPTION);
    assert_eq!(out[0].mtype, MessageType::Acknowledgement);
    assert_eq!(out[0].message_id, 0x42);
    assert!(events(&mut ep).is_empty());
}

#[test]
fn exchange_caps_refuse_con_with_503_max_age_and_drop_non() {
    let cfg = EndpointConfig {
        max_exchanges_per_peer: 2,
        max_exchanges: 3,
        ..config()
    };
    let mut ep = Endpoint::new(cfg, 1);
    let now = Instant::now();
    for mid in 0..2 {
        ep.handle_datagram(now, addr(CLIENT), &get(MessageType::Confirmable, mid, 1));
    }
    assert_eq!(events(&mut ep).len(), 2);
    ep.handle_datagram(now, addr(CLIENT), &get(MessageType::Confirmable, 2, 1));
    let out = drain(&mut ep);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].code, Code::SERVICE_UNAVAILABLE);
    assert_eq!(out[0].uint_option(option::MAX_AGE), Some(5));
    assert!(events(&mut ep).is_empty());
    ep.handle_datagram(now, addr(CLIENT), &get(MessageType::NonConfirmable, 3, 1));
    assert!(drain(&mut ep).is_empty());
    // Another peer still has room under the total cap, then not.
    ep.handle_datagram(now, addr(CLIENT + 1), &get(MessageType::Confirmable, 0, 1));
    assert_eq!(events(&mut ep).len(), 1);
    ep.handle_datagram(now, addr(CLIENT + 2), &get(MessageType::Confirmable, 0, 1));
    assert_eq!(drain(&mut ep)[0].code, Code::SERVICE_UNAVAILABLE);
    // Unanswered requests are forgotten after the response timeout.
    ep.handle_timeout(now + Duration::from_secs(61));
    assert_eq!(ep.exchanges(), 0);
}

#[test]
fn dedup_cache_is_bounded_and_forgets_ids_past_max_transmit_span_first() {
    let cfg = EndpointConfig {
        max_dedup: 4,
        ..config()
    };
    let mut ep = Endpoint::new(cfg, 1);
    let t0 = Instant::now();
    // MAX_TRANSMIT_SPAN is 2 s x 15 = 30 s here.
    let later = t0 + Duration::from_secs(31);
    let mut delivered = 0;
    let mut send = |ep: &mut Endpoint, at: Instant, mid: u16| {
        ep.handle_datagram(at, addr(CLIENT), &get(MessageType::NonConfirmable, mid, 1));
        for ev in events(ep) {
            if let Event::Request { id, .. } = ev {
                ep.respond(at, id, content("x")).unwrap();
                delivered += 1;
            }
        }
        drain(ep);
    };
    send(&mut ep, t0, 0);
    send(&mut ep, t0, 1);
    for mid in 2..5 {
        send(&mut ep, later, mid);
    }
    // Full at four: the id past MAX_TRANSMIT_SPAN (0) went, no young one.
    assert_eq!(ep.dedup_len(), 4);
    assert_eq!(ep.dedup_evicted_young(), 0);
    send(&mut ep, later, 5);
    assert_eq!(ep.dedup_evicted_young(), 0, "id 1 was old too");
    // Under load that fills the table sooner, young ids go as well: every
    // request is served, none refused.
    send(&mut ep, later, 6);
    assert_eq!(ep.dedup_evicted_young(), 1);
    assert_eq!(delivered, 7);
    assert_eq!(ep.dedup_len(), 4);
    // A duplicate of a remembered id is still answered from the cache.
    ep.handle_datagram(later, addr(CLIENT), &get(MessageType::NonConfirmable, 6, 1));
    assert!(
        events(&mut ep).is_empty(),
        "a duplicate is not delivered again"
    );
}

#[test]
fn dedup_cache_is_bounded_in_bytes() {
    let cfg = EndpointConfig {
        max_dedup_bytes: 100,
        ..config()
    };
    let mut ep = Endpoint::new(cfg, 1);
    let now = Instant::now();
    let mut answered = 0;
    for mid in 0..10 {
        ep.handle_datagram(now, addr(CLIENT), &get(MessageType::Confirmable, mid, 1));
        if let Some(Event::Request { id, .. }) = ep.poll_event() {
            ep.respond(now, id, content("0123456789012345678901234567890123456789"))
                .unwrap();
            answered += 1;
        }
    }
    // Every request is served; each cached reply is about 45 bytes, so the
    // cache keeps the newest few under 100 bytes.
    assert_eq!(answered, 10);
    assert!(ep.dedup_len() <= 3, "{} ids kept", ep.dedup_len());
}

/// Move every datagram from `from` to `to`.
fn pump(now: Instant, from: &mut Endpoint, from_addr: SocketAddr, to: &mut Endpoint) -> usize {
    let mut n = 0;
    while let Some((_, bytes)) = from.poll_transmit() {
        to.handle_datagram(now, from_addr, &bytes);
        n += 1;
    }
    n
}

#[test]
fn client_and_server_endpoints_piggybacked_and_separate_responses() {
    let t0 = Instant::now();
    let (c_addr, s_addr) = (addr(CLIENT), addr(5683));
    let mut client = endpoint();
    let mut server = Endpoint::new(config(), 99);

    // Piggybacked.
    let token = client.new_token();
    let mut req = Message::new(MessageType::Confirmable, Code::GET, 0, token);
    req.set_uri_path("a");
    let rid = client.send_request(t0, s_addr, req.clone()).unwrap();
    assert_eq!(
        client.send_request(t0, s_addr, req),
        Err(ExchangeError::TokenInUse)
    );
    pump(t0, &mut client, c_addr, &mut server);
    let sid = request_id(&events(&mut server));
    server.respond(t0, sid, content("A")).unwrap();
    pump(t0, &mut server, s_addr, &mut client);
    match &events(&mut client)[..] {
        [Event::Response { id, message, .. }] => {
            assert_eq!(*id, rid);
            assert_eq!(&message.payload[..], b"A");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.exchanges(), 0);

    // Separate.
    let token = client.new_token();
    let rid = client
        .send_request(
            t0,
            s_addr,
            Message::new(MessageType::Confirmable, Code::GET, 0, token),
        )
        .unwrap();
    pump(t0, &mut client, c_addr, &mut server);
    let sid = request_id(&events(&mut server));
    server.handle_timeout(t0 + ms(500));
    pump(t0 + ms(500), &mut server, s_addr, &mut client); // empty ACK
    client.handle_timeout(t0 + Duration::from_secs(10));
    assert!(
        client.poll_transmit().is_none(),
        "acknowledged: no retransmission"
    );
    server
        .respond(t0 + Duration::from_secs(10), sid, content("B"))
        .unwrap();
    pump(
        t0 + Duration::from_secs(10),
        &mut server,
        s_addr,
        &mut client,
    );
    match &events(&mut client)[..] {
        [Event::Response { id, message, .. }] => {
            assert_eq!(*id, rid);
            assert_eq!(&message.payload[..], b"B");
        }
        other => panic!("{other:?}"),
    }
    // The client's ACK reaches the server.
    pump(
        t0 + Duration::from_secs(10),
        &mut client,
        c_addr,
        &mut server,
    );
    assert_eq!(
        events(&mut server),
        vec![Event::Acknowledged {
            id: sid,
            peer: c_addr
        }]
    );
    assert_eq!((client.exchanges(), server.exchanges()), (0, 0));
    assert_eq!((client.timer_count(), server.timer_count()), (0, 0));
}

#[test]
fn unexpected_response_is_reset() {
    let mut ep = endpoint();
    let m = Message::new(
        MessageType::Confirmable,
        Code::CONTENT,
        0x77,
        Token::new(&[1]).unwrap(),
    );
    ep.handle_datagram(Instant::now(), addr(5683), &m.encode().unwrap());
    assert_eq!(
        drain(&mut ep),
        vec![Message::empty(MessageType::Reset, 0x77)]
    );
    assert!(events(&mut ep).is_empty());
}

#[test]
fn replaced_notification_keeps_the_retransmission_schedule() {
    let t0 = Instant::now();
    let mut ep = endpoint();
    let id = ep.send(t0, addr(CLIENT), notification(1)).unwrap();
    drain(&mut ep);
    ep.handle_timeout(t0 + Duration::from_secs(2)); // first retransmission
    drain(&mut ep);
    assert!(ep.replace(id, notification(2)).unwrap());
    let out = drain(&mut ep);
    assert_eq!(out[0].observe(), Some(2));
    // Retransmissions continue at 6, 14, 30 s, and it is given up at 62 s.
    for s in [6, 14, 30] {
        ep.handle_timeout(t0 + Duration::from_secs(s));
        assert_eq!(drain(&mut ep)[0].observe(), Some(2));
    }
    ep.handle_timeout(t0 + Duration::from_secs(62));
    assert!(matches!(
        &events(&mut ep)[..],
        [Event::Failed {
            reason: Failure::Timeout,
            ..
        }]
    ));
}

#[test]
fn message_ids_count_per_peer_so_a_busy_peer_does_not_spend_anothers() {
    let mut ep = Endpoint::new(config(), 7);
    let now = Instant::now();
    let (a, b) = (addr(CLIENT), "127.0.0.1:6000".parse().expect("addr"));
    let mids = |ep: &mut Endpoint, peer, n| -> Vec<u16> {
        (0..n)
            .map(|i| {
                let token = Token::new(&[i as u8, (i >> 8) as u8]).expect("token");
                let mut m = Message::new(MessageType::NonConfirmable, Code::POST, 0, token);
                m.set_uri_path("x");
                ep.send_request(now, peer, m).expect("sent");
                let (_, bytes) = ep.poll_transmit().expect("a datagram");
                // Not waiting for answers: the per-peer exchange cap.
                ep.cancel_request(peer, token);
                Message::decode(&bytes).expect("decode").message_id
            })
            .collect()
    };
    let to_a = mids(&mut ep, a, 300);
    let to_b = mids(&mut ep, b, 2);
    // Consecutive per peer: 300 messages to `a` cost `b` nothing.
    assert!(to_a.windows(2).all(|w| w[1] == w[0].wrapping_add(1)));
    assert_eq!(to_b[1], to_b[0].wrapping_add(1));
}
