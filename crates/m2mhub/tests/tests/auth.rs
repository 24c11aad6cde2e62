//! Authentication: anonymous access off, password file.

use crate::common::*;
use bytes::Bytes;
use mqtt_codec::{reason, Connect, Packet, Protocol};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send a 3.1.1 CONNECT and return the CONNACK return code byte.
pub async fn v311_return_code(addr: SocketAddr, c: Connect) -> u8 {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(&bytes_of(&Packet::Connect(Box::new(c)), Protocol::V311))
        .await
        .expect("write");
    let mut connack = [0u8; 4];
    within("CONNACK", s.read_exact(&mut connack))
        .await
        .expect("CONNACK");
    assert_eq!(&connack[..3], &[0x20, 0x02, 0x00], "3.1.1 CONNACK");
    connack[3]
}

fn with_credentials(mut c: Connect, user: &str, password: &str) -> Connect {
    c.username = Some(user.into());
    c.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_are_refused_when_not_allowed() {
    let srv = TestServer::with(|s| s.mqtt.allow_anonymous = false).await;
    let (mut c, ack) = Raw::connect(srv.mqtt(), v5("anon-5")).await;
    assert_eq!(ack.reason_code, reason::NOT_AUTHORIZED);
    assert!(c.expect_close(WAIT).await.is_empty());
    assert_eq!(v311_return_code(srv.mqtt(), v3("anon-3")).await, 5);
    assert_eq!(srv.counter("auth_failures"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_accepts_good_credentials_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwords");
    std::fs::write(
        &file,
        format!(
            "# users\n{}\n{}\n",
            m2mhub_broker::auth::hash_password_line("alice", "s3cret"),
            m2mhub_broker::auth::hash_password_line("bob", "hunter2"),
        ),
    )
    .expect("write password file");
    let srv = TestServer::with(|s| {
        s.mqtt.allow_anonymous = false;
        s.mqtt.password_file = file.display().to_string();
    })
    .await;

    // MQTT 5.
    let (_c, ack) = Raw::connect(srv.mqtt(), with_credentials(v5("pw-1"), "alice", "s3cret")).await;
    assert_eq!(ack.reason_code, reason::SUCCESS);
    let (_c, ack) = Raw::connect(srv.mqtt(), with_credentials(v5("pw-2"), "bob", "hunter2")).await;
    assert_eq!(ack.reason_code, reason::SUCCESS);
    let (_c, ack) = Raw::connect(srv.mqtt(), with_credentials(v5("pw-3"), "alice", "wrong")).await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    let (_c, ack) = Raw::connect(
        srv.mqtt(),
        with_credentials(v5("pw-4"), "mallory", "s3cret"),
    )
    .await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    let mut no_password = v5("pw-5");
    no_password.username = Some("alice".into());
    let (_c, ack) = Raw::connect(srv.mqtt(), no_password).await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    let (_c, ack) = Raw::connect(srv.mqtt(), v5("pw-6")).await;
    assert_eq!(ack.reason_code, reason::NOT_AUTHORIZED);

    // MQTT 3.1.1.
    let good = with_credentials(v3("pw-7"), "alice", "s3cret");
    assert_eq!(v311_return_code(srv.mqtt(), good).await, 0);
    let bad = with_credentials(v3("pw-8"), "alice", "nope");
    assert_eq!(v311_return_code(srv.mqtt(), bad).await, 4);

    // And through rumqttc.
    let mut o = V3::options(srv.mqtt(), "pw-rumqttc");
    o.set_credentials("bob", "hunter2");
    let (c, _) = V3::connect(o).await;
    c.disconnect().await;
}
