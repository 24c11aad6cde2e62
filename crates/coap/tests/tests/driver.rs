//! The driver over real UDP with the `Endpoint`-based client.

use std::time::Duration;

use bytes::Bytes;
use m2mhub_coap::message::{option, Token};
use m2mhub_coap::{CoapConfig, Code, Message, MessageType, ServeError};
use tokio::net::UdpSocket;

use crate::common::{big_body, start, start_with, Client};

#[tokio::test]
async fn piggybacked_post_and_not_found() {
    let server = start().await;
    let mut c = Client::new(server.local_addr()).await;
    let mut post = c.request(Code::POST, "echo");
    post.payload = Bytes::from_static(b"hello");
    let r = c.call(post).await;
    assert_eq!(r.code, Code::CHANGED);
    assert_eq!(&r.payload[..], b"5 bytes");
    assert_eq!(r.mtype, MessageType::Acknowledgement, "piggybacked");
    let get = c.request(Code::GET, "nothing/here");
    let r = c.call(get).await;
    assert_eq!(r.code, Code::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn slow_handler_gets_a_separate_response() {
    let server = start().await;
    let mut c = Client::new(server.local_addr()).await;
    let get = c.request(Code::GET, "slow");
    let r = c.call(get).await;
    assert_eq!(&r.payload[..], b"slow");
    assert_eq!(r.mtype, MessageType::Confirmable, "a separate CON response");
    server.shutdown().await;
}

#[tokio::test]
async fn block1_upload_of_64_kib_and_block2_download() {
    let server = start().await;
    let mut c = Client::new(server.local_addr()).await;
    let body: Vec<u8> = (0..65_536u32).map(|i| (i * 13 % 256) as u8).collect();
    let r = c.put_blockwise("upload", &body, 1024).await;
    assert_eq!(r.code, Code::CHANGED);
    let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(r.payload, Bytes::from(format!("65536 {sum}")));
    assert_eq!(r.block1().unwrap().unwrap().num, 63);

    // The client acknowledged nothing of ours yet: the large GET is
    // challenged with Echo, then served in full 1024-byte blocks.
    let (got, requests) = c.get_blockwise("big").await;
    assert_eq!(got, big_body());
    assert_eq!(requests, 1 + 3);
    server.shutdown().await;
}

#[tokio::test]
async fn observe_register_notify_and_cancel() {
    let server = start().await;
    let notifier = server.notifier();
    let mut c = Client::new(server.local_addr()).await;
    let mut get = c.request(Code::GET, "temp");
    get.set_observe(0);
    let token = get.token;
    let id = c.send(get);
    let first = c.response(id).await;
    assert_eq!(&first.payload[..], b"20");
    let seq0 = first.observe().expect("registered");

    notifier.notify("temp", "21", Some(0)).unwrap();
    let n1 = c.response(id).await;
    assert_eq!(&n1.payload[..], b"21");
    assert_eq!(n1.token, token);
    assert!(n1.observe().unwrap() > seq0);
    notifier.notify("temp", "22", Some(0)).unwrap();
    let n2 = c.response(id).await;
    assert_eq!(&n2.payload[..], b"22");
    assert!(n2.observe() > n1.observe());

    // Deregister with GET + Observe 1 (a new exchange with the same token).
    c.cancel_observation(token);
    let mut stop = Message::new(MessageType::Confirmable, Code::GET, 0, token);
    stop.set_uri_path("temp");
    stop.set_observe(1);
    let r = c.call(stop).await;
    assert_eq!(r.observe(), None);
    notifier.notify("temp", "23", Some(0)).unwrap();
    assert!(c.quiet_for(id, Duration::from_millis(300)).await);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_con_is_reset_and_ping_is_answered() {
    let server = start().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    // A CON with a reserved option nibble.
    sock.send_to(&[0x40, 0x01, 0x12, 0x34, 0xF1, 0x00], server.local_addr())
        .await
        .unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let rst = Message::decode(&buf[..n]).unwrap();
    assert_eq!(rst, Message::empty(MessageType::Reset, 0x1234));
    // A CoAP ping.
    let ping = Message::empty(MessageType::Confirmable, 0x55)
        .encode()
        .unwrap();
    sock.send_to(&ping, server.local_addr()).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        Message::decode(&buf[..n]).unwrap(),
        Message::empty(MessageType::Reset, 0x55)
    );
    // An unrecognised critical option: 4.02.
    let mut m = Message::new(
        MessageType::Confirmable,
        Code::GET,
        0x56,
        Token::new(&[1]).unwrap(),
    );
    m.add_option(option::PROXY_URI, Bytes::from_static(b"coap://x/"));
    sock.send_to(&m.encode().unwrap(), server.local_addr())
        .await
        .unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Message::decode(&buf[..n]).unwrap().code, Code::BAD_OPTION);
    server.shutdown().await;
}

#[tokio::test]
async fn a_panicking_handler_gets_5_00_and_a_slow_one_5_03() {
    let server = start_with(CoapConfig {
        handler_timeout: Duration::from_millis(300),
        ..CoapConfig::default()
    })
    .await;
    let mut c = Client::new(server.local_addr()).await;
    let get = c.request(Code::GET, "panic");
    assert_eq!(c.call(get).await.code, Code::INTERNAL_SERVER_ERROR);
    let get = c.request(Code::GET, "slow");
    let r = c.call(get).await;
    assert_eq!(r.code, Code::SERVICE_UNAVAILABLE);
    assert!(r.uint_option(option::MAX_AGE).is_some());
    // The server still serves.
    let mut post = c.request(Code::POST, "echo");
    post.payload = Bytes::from_static(b"ok");
    assert_eq!(c.call(post).await.code, Code::CHANGED);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_config_is_refused_with_the_key() {
    let config = CoapConfig {
        block_size: 100,
        ..CoapConfig::default()
    };
    let err = m2mhub_coap::CoapServer::bind(config, crate::common::App)
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::Config(_)));
    assert!(err.to_string().contains("coap.block_size"), "{err}");
}
