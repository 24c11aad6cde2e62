//! Server flows (Observe, block-wise, limits) stepped with a fake clock.

use std::time::Duration;

use super::*;
use crate::message::content_format;

const CLIENT: u16 = 40_001;

fn client() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], CLIENT))
}

fn server(t0: Instant) -> Server {
    Server::new(CoapConfig::default(), 5, t0).unwrap()
}

struct Client {
    mid: u16,
}

impl Client {
    fn new() -> Client {
        Client { mid: 100 }
    }

    fn request(&mut self, code: Code, path: &str, token: u8) -> Message {
        self.mid = self.mid.wrapping_add(1);
        let mut m = Message::new(
            MessageType::Confirmable,
            code,
            self.mid,
            Token::new(&[token]).unwrap(),
        );
        m.set_uri_path(path);
        m
    }
}

fn send(s: &mut Server, now: Instant, m: &Message) {
    s.handle_datagram(now, client(), &m.encode().unwrap());
}

fn out(s: &mut Server) -> Vec<Message> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|(_, b)| Message::decode(&b).unwrap())
        .collect()
}

fn one(s: &mut Server) -> Message {
    let v = out(s);
    assert_eq!(v.len(), 1, "{v:?}");
    v.into_iter().next().unwrap()
}

fn ack(s: &mut Server, now: Instant, m: &Message) {
    let a = Message::empty(MessageType::Acknowledgement, m.message_id);
    send(s, now, &a);
}

#[test]
fn observe_register_notify_deregister() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut c = Client::new();
    let mut get = c.request(Code::GET, "devices/7/temp", 1);
    get.set_observe(0);
    send(&mut s, t0, &get);
    let (id, req) = s.poll_request().unwrap();
    assert!(req.observe);
    assert_eq!(req.path, vec!["devices", "7", "temp"]);
    s.respond(
        t0,
        id,
        Response::content(content_format::TEXT_PLAIN, "20").with_observe("temp-7"),
    )
    .unwrap();
    let r = one(&mut s);
    assert_eq!(r.mtype, MessageType::Acknowledgement);
    let seq0 = r.observe().expect("registered: Observe in the response");
    assert_eq!(s.observers().count("temp-7"), 1);

    // The observer never acknowledged anything yet: the first notification is CON.
    assert_eq!(
        s.notify(t0, "temp-7", Bytes::from_static(b"21"), Some(0)),
        1
    );
    let n = one(&mut s);
    assert_eq!(n.mtype, MessageType::Confirmable);
    assert_eq!(n.token, get.token);
    assert!(n.observe().unwrap() > seq0);
    assert_eq!(&n.payload[..], b"21");
    ack(&mut s, t0, &n);
    // Now verified: NON.
    s.notify(t0, "temp-7", Bytes::from_static(b"22"), Some(0));
    let n2 = one(&mut s);
    assert_eq!(n2.mtype, MessageType::NonConfirmable);
    assert!(n2.observe() > n.observe());

    // Deregister with Observe 1: a normal GET answer, no more notifications.
    let mut dereg = c.request(Code::GET, "devices/7/temp", 1);
    dereg.set_observe(1);
    send(&mut s, t0, &dereg);
    let (id, req) = s.poll_request().unwrap();
    assert!(!req.observe);
    assert!(s.observers().is_empty());
    s.respond(t0, id, Response::content(0, "22")).unwrap();
    assert_eq!(one(&mut s).observe(), None);
    assert_eq!(s.notify(t0, "temp-7", Bytes::from_static(b"23"), None), 0);
}

#[test]
fn observer_removed_after_con_notification_times_out() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut get = Client::new().request(Code::GET, "t", 2);
    get.set_observe(0);
    send(&mut s, t0, &get);
    let (id, _) = s.poll_request().unwrap();
    s.respond(t0, id, Response::content(0, "1").with_observe("t"))
        .unwrap();
    out(&mut s);
    s.notify(t0, "t", Bytes::from_static(b"2"), None);
    assert_eq!(one(&mut s).mtype, MessageType::Confirmable);
    // Nobody answers: retransmitted, then given up (at most 93 s).
    let mut now = t0;
    let mut transmissions = 0;
    while let Some(at) = s.poll_timeout() {
        if at > t0 + Duration::from_secs(100) {
            break;
        }
        now = at;
        s.handle_timeout(now);
        transmissions += out(&mut s).len();
    }
    assert_eq!(transmissions, 4, "MAX_RETRANSMIT retransmissions");
    assert!(now - t0 <= Duration::from_secs(93));
    assert!(s.observers().is_empty());
    assert_eq!(s.stats().observers_lost, 1);
}

#[test]
fn reset_of_a_notification_removes_the_observer() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut get = Client::new().request(Code::GET, "t", 3);
    get.set_observe(0);
    send(&mut s, t0, &get);
    let (id, _) = s.poll_request().unwrap();
    s.respond(t0, id, Response::content(0, "1").with_observe("t"))
        .unwrap();
    out(&mut s);
    s.notify(t0, "t", Bytes::from_static(b"2"), None);
    let n = one(&mut s);
    send(
        &mut s,
        t0,
        &Message::empty(MessageType::Reset, n.message_id),
    );
    assert!(s.observers().is_empty());
    assert_eq!(s.endpoint().exchanges(), 0);
}

#[test]
fn observe_refused_with_an_error_code_does_not_register() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut get = Client::new().request(Code::GET, "nothing", 3);
    get.set_observe(0);
    send(&mut s, t0, &get);
    let (id, _) = s.poll_request().unwrap();
    s.respond(t0, id, Response::new(Code::NOT_FOUND).with_observe("x"))
        .unwrap();
    let r = one(&mut s);
    assert_eq!(r.code, Code::NOT_FOUND);
    assert_eq!(r.observe(), None);
    assert!(s.observers().is_empty());
}

fn put_block(c: &mut Client, num: u32, more: bool, szx: u8, payload: &[u8]) -> Message {
    let mut m = c.request(Code::PUT, "fw/image", 9);
    m.set_block(option::BLOCK1, BlockValue::new(num, more, szx).unwrap());
    m.payload = Bytes::copy_from_slice(payload);
    m
}

#[test]
fn block1_upload_of_64_kib_is_delivered_once_whole() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut c = Client::new();
    let body: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 256) as u8).collect();
    let blocks: Vec<&[u8]> = body.chunks(1024).collect();
    for (i, chunk) in blocks.iter().enumerate() {
        let more = i + 1 < blocks.len();
        send(&mut s, t0, &put_block(&mut c, i as u32, more, 6, chunk));
        if more {
            let r = one(&mut s);
            assert_eq!(r.code, Code::CONTINUE);
            assert_eq!(
                r.block1(),
                Some(Ok(BlockValue::new(i as u32, true, 6).unwrap()))
            );
            assert!(s.poll_request().is_none());
        }
    }
    let (id, req) = s.poll_request().unwrap();
    assert_eq!(req.method, Code::PUT);
    assert_eq!(req.payload.len(), 65_536);
    assert_eq!(&req.payload[..], &body[..]);
    s.respond(t0, id, Response::new(Code::CHANGED)).unwrap();
    let r = one(&mut s);
    assert_eq!(r.code, Code::CHANGED);
    assert_eq!(r.block1(), Some(Ok(BlockValue::new(63, false, 6).unwrap())));
}

#[test]
fn block1_missing_block_gets_4_08_and_too_large_gets_4_13_with_size1() {
    let t0 = Instant::now();
    let cfg = CoapConfig {
        max_body: 4096,
        ..CoapConfig::default()
    };
    let mut s = Server::new(cfg, 5, t0).unwrap();
    let mut c = Client::new();
    send(&mut s, t0, &put_block(&mut c, 0, true, 6, &[1; 1024]));
    assert_eq!(one(&mut s).code, Code::CONTINUE);
    send(&mut s, t0, &put_block(&mut c, 2, true, 6, &[1; 1024]));
    assert_eq!(one(&mut s).code, Code::REQUEST_ENTITY_INCOMPLETE);

    let mut first = put_block(&mut c, 0, true, 6, &[1; 1024]);
    first.set_uint_option(option::SIZE1, 100_000);
    send(&mut s, t0, &first);
    let r = one(&mut s);
    assert_eq!(r.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(r.uint_option(option::SIZE1), Some(4096));

    for i in 0..4 {
        send(&mut s, t0, &put_block(&mut c, i, true, 6, &[1; 1024]));
        assert_eq!(one(&mut s).code, Code::CONTINUE);
    }
    send(&mut s, t0, &put_block(&mut c, 4, false, 6, &[1; 10]));
    let r = one(&mut s);
    assert_eq!(r.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert!(s.poll_request().is_none());
}

/// Fetch a whole body block by block, as a client does: `first` is the
/// first request (its answer may be a 4.01 Echo challenge, which is
/// repeated with the Echo value).
fn download(s: &mut Server, t0: Instant, c: &mut Client, path: &str) -> (Vec<u8>, usize, usize) {
    let big: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
    send(s, t0, &c.request(Code::GET, path, 5));
    let (id, _) = s.poll_request().unwrap();
    s.respond(
        t0,
        id,
        Response::content(content_format::OCTET_STREAM, big.clone()),
    )
    .unwrap();
    let mut r = one(s);
    let mut requests = 1;
    if r.code == Code::UNAUTHORIZED {
        let echo = r
            .option(option::ECHO)
            .expect("4.01 carries Echo")
            .value
            .clone();
        let mut again = c.request(Code::GET, path, 5);
        again.set_option(option::ECHO, echo);
        send(s, t0, &again);
        let (id, _) = s.poll_request().unwrap();
        s.respond(t0, id, Response::content(content_format::OCTET_STREAM, big))
            .unwrap();
        r = one(s);
        requests += 1;
    }
    let mut body = r.payload.to_vec();
    let first = r.block2().unwrap().unwrap();
    assert_eq!(r.uint_option(option::SIZE2), Some(3000));
    while r.block2().unwrap().unwrap().more {
        let b = r.block2().unwrap().unwrap();
        let mut next = c.request(Code::GET, path, 5);
        next.set_block(
            option::BLOCK2,
            BlockValue::new(b.num + 1, false, b.szx).unwrap(),
        );
        send(s, t0, &next);
        assert!(
            s.poll_request().is_none(),
            "later blocks come from the cache"
        );
        r = one(s);
        assert_eq!(r.content_format(), Some(content_format::OCTET_STREAM));
        body.extend_from_slice(&r.payload);
        requests += 1;
    }
    (body, first.size(), requests)
}

#[test]
fn large_get_from_an_unverified_client_is_challenged_with_echo_then_served_in_full_blocks() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let (body, block, requests) = download(&mut s, t0, &mut Client::new(), "big");
    assert_eq!(
        body,
        (0..3000u32).map(|i| (i % 256) as u8).collect::<Vec<_>>()
    );
    // One 4.01 challenge, then three 1024-byte blocks.
    assert_eq!((block, requests), (1024, 4));
    assert!(s.endpoint().is_verified(client()));
}

#[test]
fn echo_values_are_bound_to_the_address_and_expire() {
    let t0 = Instant::now();
    let s = server(t0);
    let echo = s.echo_value(t0, client());
    assert!(s.echo_valid(t0 + Duration::from_secs(60), client(), &echo));
    let other = SocketAddr::from(([127, 0, 0, 1], CLIENT + 1));
    assert!(!s.echo_valid(t0, other, &echo));
    assert!(!s.echo_valid(t0 + Duration::from_secs(121), client(), &echo));
    assert!(!s.echo_valid(t0, client(), &echo[..11]));
    let mut forged = echo;
    forged[11] ^= 1;
    assert!(!s.echo_valid(t0, client(), &forged));
}

#[test]
fn large_post_answer_to_an_unverified_client_uses_small_blocks() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut c = Client::new();
    let mut post = c.request(Code::POST, "report", 7);
    post.payload = Bytes::from_static(b"q");
    send(&mut s, t0, &post);
    let (id, _) = s.poll_request().unwrap();
    s.respond(t0, id, Response::content(0, vec![b'r'; 500]))
        .unwrap();
    let r = one(&mut s);
    assert_eq!(r.code, Code::CONTENT);
    let b = r.block2().unwrap().unwrap();
    assert!(b.more);
    // About 14 request bytes earn 16-byte blocks: no 4.01 for a POST,
    // whose handler must not run twice.
    assert_eq!(b.size(), 16);
    let reply_len = r.encode().unwrap().len();
    assert!(
        reply_len <= 3 * post.encode().unwrap().len() + 32,
        "{reply_len}"
    );
}

#[test]
fn block2_download_without_amplification_limit_uses_the_block_size() {
    let t0 = Instant::now();
    let cfg = CoapConfig {
        amplification_factor: 0,
        rate_burst: 1000,
        ..CoapConfig::default()
    };
    let mut s = Server::new(cfg, 5, t0).unwrap();
    let mut c = Client::new();
    let (body, block, requests) = download(&mut s, t0, &mut c, "big");
    assert_eq!(body.len(), 3000);
    assert_eq!((block, requests), (1024, 3));
    // The client asks for smaller blocks: honoured.
    let mut get = c.request(Code::GET, "small", 6);
    get.set_block(option::BLOCK2, BlockValue::new(0, false, 2).unwrap());
    send(&mut s, t0, &get);
    let (id, _) = s.poll_request().unwrap();
    s.respond(t0, id, Response::content(0, vec![b'x'; 100]))
        .unwrap();
    let r = one(&mut s);
    assert_eq!(r.block2(), Some(Ok(BlockValue::new(0, true, 2).unwrap())));
    assert_eq!(r.payload.len(), 64);
}

#[test]
fn rate_limit_answers_con_with_503_max_age_and_drops_non() {
    let t0 = Instant::now();
    let cfg = CoapConfig {
        rate_per_second: 1,
        rate_burst: 2,
        ..CoapConfig::default()
    };
    let mut s = Server::new(cfg, 5, t0).unwrap();
    let mut c = Client::new();
    for _ in 0..2 {
        send(&mut s, t0, &c.request(Code::GET, "x", 1));
        let (id, _) = s.poll_request().unwrap();
        s.respond(t0, id, Response::new(Code::CONTENT)).unwrap();
        out(&mut s);
    }
    send(&mut s, t0, &c.request(Code::GET, "x", 1));
    let r = one(&mut s);
    assert_eq!(r.code, Code::SERVICE_UNAVAILABLE);
    assert_eq!(r.uint_option(option::MAX_AGE), Some(1));
    let mut non = c.request(Code::GET, "x", 1);
    non.mtype = MessageType::NonConfirmable;
    send(&mut s, t0, &non);
    assert!(out(&mut s).is_empty());
    assert!(s.poll_request().is_none());
    assert_eq!(s.stats().rate_limited, 2);
    // A second later there is room again.
    send(
        &mut s,
        t0 + Duration::from_secs(1),
        &c.request(Code::GET, "x", 1),
    );
    assert!(s.poll_request().is_some());
}

#[test]
fn unknown_method_is_4_05() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let m = Client::new().request(Code::new(0, 20), "x", 1);
    send(&mut s, t0, &m);
    assert_eq!(one(&mut s).code, Code::METHOD_NOT_ALLOWED);
    assert!(s.poll_request().is_none());
}

#[test]
fn large_notification_goes_out_as_its_first_block() {
    let t0 = Instant::now();
    let cfg = CoapConfig {
        amplification_factor: 0,
        ..CoapConfig::default()
    };
    let mut s = Server::new(cfg, 5, t0).unwrap();
    let mut c = Client::new();
    let mut get = c.request(Code::GET, "log", 4);
    get.set_observe(0);
    send(&mut s, t0, &get);
    let (id, _) = s.poll_request().unwrap();
    s.respond(t0, id, Response::content(0, "x").with_observe("log"))
        .unwrap();
    out(&mut s);
    s.notify(t0, "log", Bytes::from(vec![7u8; 2000]), Some(42));
    let n = one(&mut s);
    assert_eq!(n.block2(), Some(Ok(BlockValue::new(0, true, 6).unwrap())));
    assert_eq!(n.uint_option(option::SIZE2), Some(2000));
    assert_eq!(n.payload.len(), 1024);
    // The rest with a plain GET + Block2, from the cache.
    let mut next = c.request(Code::GET, "log", 8);
    next.set_block(option::BLOCK2, BlockValue::new(1, false, 6).unwrap());
    send(&mut s, t0, &next);
    let r = one(&mut s);
    assert_eq!(r.payload.len(), 2000 - 1024);
    assert_eq!(r.block2(), Some(Ok(BlockValue::new(1, false, 6).unwrap())));
}

#[test]
fn notification_to_an_unverified_observer_is_small_and_confirmable() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut get = Client::new().request(Code::GET, "log", 4);
    get.set_observe(0);
    send(&mut s, t0, &get);
    let (id, _) = s.poll_request().unwrap();
    s.respond(t0, id, Response::content(0, "x").with_observe("log"))
        .unwrap();
    out(&mut s);
    s.notify(t0, "log", Bytes::from(vec![7u8; 2000]), Some(42));
    let n = one(&mut s);
    assert_eq!(n.mtype, MessageType::Confirmable);
    // A registration of about a dozen bytes earns a 16-byte first block.
    assert_eq!(n.block2(), Some(Ok(BlockValue::new(0, true, 0).unwrap())));
    assert!(n.encode().unwrap().len() <= 3 * get.encode().unwrap().len() + 32);
}
