//! CoAPS: the driver behind DTLS 1.2 with pre-shared keys, against a
//! client whose session comes from the same DTLS engine (dimpl, in its
//! client role) — a real handshake over loopback UDP.

use crate::common::*;
use m2mhub_coap::client::Client;
use m2mhub_coap::dtls::{DtlsLimits, PskGrant, PskStore};
use m2mhub_coap::message::content_format;
use m2mhub_coap::{CoapConfig, CoapServer, Code, Handler, Request, Response};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One device, `dev-1`, with one key that can be revoked.
struct Keys {
    valid: AtomicBool,
}

const KEY: &[u8] = b"0123456789abcdef";

impl PskStore for Keys {
    fn lookup(&self, identity: &[u8], _peer: SocketAddr) -> Option<(Vec<u8>, PskGrant)> {
        (identity == b"dev-1" && self.valid.load(Ordering::SeqCst)).then(|| {
            (
                KEY.to_vec(),
                PskGrant {
                    device: Arc::from("dev-1"),
                    credential: Arc::from("psk-1"),
                },
            )
        })
    }

    fn still_valid(&self, _grant: &PskGrant) -> bool {
        self.valid.load(Ordering::SeqCst)
    }
}

/// `GET /whoami`: the device of the request's session.
struct WhoAmI;

impl Handler for WhoAmI {
    async fn handle(&self, req: Request) -> Response {
        match req.path_str().as_str() {
            "whoami" => Response::content(
                content_format::TEXT_PLAIN,
                req.identity.as_deref().unwrap_or("nobody").to_string(),
            ),
            _ => App.handle(req).await,
        }
    }
}

async fn coaps(keys: Arc<Keys>) -> CoapServer {
    let config = CoapConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..CoapConfig::default()
    };
    CoapServer::bind_dtls(config, keys, DtlsLimits::default(), WhoAmI)
        .await
        .expect("CoAPS server starts")
}

#[tokio::test]
async fn a_psk_session_carries_the_device_and_block_wise_works_inside_it() {
    let keys = Arc::new(Keys {
        valid: AtomicBool::new(true),
    });
    let server = coaps(keys.clone()).await;
    let mut c = Client::new_psk(server.local_addr(), b"dev-1", KEY)
        .await
        .expect("handshake");
    let m = c.request(Code::GET, "whoami");
    let r = c.call(m).await.expect("whoami");
    assert_eq!(r.code, Code::CONTENT);
    assert_eq!(&r.payload[..], b"dev-1");
    // A 3000-byte answer, in Block2 blocks, with no Echo challenge: the
    // handshake verified the address.
    let m = c.request(Code::GET, "big");
    let r = c.call(m).await.expect("big");
    assert_eq!(r.code, Code::CONTENT);
    assert!(r.block2().is_some(), "sent block-wise");
    let body = big_body();
    let r = c
        .upload_blockwise(Code::PUT, "upload", None, &body, 256)
        .await
        .expect("upload");
    assert_eq!(r.code, Code::CHANGED);
    let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(
        String::from_utf8_lossy(&r.payload),
        format!("{} {sum}", body.len())
    );
}

#[tokio::test]
async fn a_wrong_key_or_unknown_identity_fails_the_handshake() {
    let keys = Arc::new(Keys {
        valid: AtomicBool::new(true),
    });
    let server = coaps(keys).await;
    let attempt = |identity: &'static [u8], key: &'static [u8]| {
        let addr = server.local_addr();
        async move {
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                Client::new_psk(addr, identity, key),
            )
            .await;
            assert!(
                !matches!(r, Ok(Ok(_))),
                "{:?} with a wrong key got a session",
                String::from_utf8_lossy(identity)
            );
        }
    };
    // Both at once: each waits out its handshake timeout.
    tokio::join!(
        attempt(b"dev-1", b"fedcba9876543210"),
        attempt(b"dev-9", KEY)
    );
}

#[tokio::test]
async fn revoking_the_key_ends_the_session_within_a_second_or_two() {
    let keys = Arc::new(Keys {
        valid: AtomicBool::new(true),
    });
    let server = coaps(keys.clone()).await;
    let mut c = Client::new_psk(server.local_addr(), b"dev-1", KEY)
        .await
        .expect("handshake");
    let m = c.request(Code::GET, "whoami");
    assert_eq!(c.call(m).await.expect("whoami").code, Code::CONTENT);
    keys.valid.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The server closed the session: the next request gets no answer.
    c.timeout = Duration::from_secs(3);
    let m = c.request(Code::GET, "whoami");
    let r = c.call(m).await;
    assert!(
        r.is_err() || !c.is_open(),
        "a revoked key still answers: {r:?}"
    );
}
