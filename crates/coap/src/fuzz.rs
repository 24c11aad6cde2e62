//! The bodies of the fuzz targets, kept in the library so that plain
//! `cargo test` replays the checked-in corpus on stable Rust.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::CoapConfig;
use crate::message::Message;
use crate::server::{Response, Server};

/// Decode `data`; whatever decodes must re-encode to bytes that decode to
/// the same message, and asking for its rejection must not panic.
pub fn message(data: &[u8]) {
    let Ok(m) = Message::decode(data) else {
        return;
    };
    let _ = m.option_rejection();
    let _ = (
        m.uri_path(),
        m.uri_query(),
        m.block1(),
        m.block2(),
        m.observe(),
    );
    let bytes = m.encode().expect("a decoded message re-encodes");
    let again = Message::decode(&bytes).expect("a re-encoded message decodes");
    assert_eq!(again, m, "decode(encode(m)) != m");
}

/// Feed `data`, split at 0xA5 bytes into datagrams from two peers (the
/// first byte of each also advances the clock), into a server with tight
/// limits; see [`drive`].
pub fn endpoint(data: &[u8]) {
    drive(data.split(|&b| b == 0xA5).enumerate().map(|(i, d)| {
        let delay = u64::from(d.first().copied().unwrap_or(0)) * 100;
        (i % 2, delay, d.to_vec())
    }));
}

/// Feed `(peer index, delay in ms, datagram)` into a server with tight
/// limits, answering every request (observe requests register) and
/// notifying observers now and then. The bounded tables must stay within
/// their bounds, and once time has run on, every exchange, remembered
/// message id, timer and pending request must be gone.
pub fn drive(datagrams: impl IntoIterator<Item = (usize, u64, Vec<u8>)>) {
    let t0 = Instant::now();
    let config = CoapConfig {
        max_exchanges: 4,
        max_exchanges_per_peer: 2,
        max_dedup: 8,
        max_uploads: 2,
        max_body: 256,
        max_observers: 2,
        block_size: 16,
        max_message_size: 256,
        ..CoapConfig::default()
    };
    let Ok(mut server) = Server::new(config, 1, t0) else {
        return;
    };
    let peers = [
        SocketAddr::from(([127, 0, 0, 1], 1)),
        SocketAddr::from(([127, 0, 0, 2], 2)),
    ];
    let mut now = t0;
    for (i, (peer, delay, datagram)) in datagrams.into_iter().enumerate() {
        now += Duration::from_millis(delay);
        server.handle_datagram(now, peers[peer % 2], &datagram);
        while let Some((id, req)) = server.poll_request() {
            let resp = if req.observe {
                Response::content(0, vec![b'x'; req.payload.len() * 3]).with_observe("k")
            } else {
                Response::content(0, vec![b'y'; req.payload.len() * 5])
            };
            let _ = server.respond(now, id, resp);
        }
        if i % 3 == 0 {
            server.notify(now, "k", bytes::Bytes::from_static(&[7; 40]), Some(0));
        }
        while server.poll_transmit().is_some() {}
        server.handle_timeout(now);
        assert!(server.endpoint().exchanges() <= 4, "exchange bound");
        assert!(server.endpoint().dedup_len() <= 8, "dedup bound");
        assert!(server.observers().len() <= 2, "observer bound");
    }
    let end = now + Duration::from_secs(600);
    while let Some(at) = server.poll_timeout().filter(|&at| at <= end) {
        server.handle_timeout(at);
        while server.poll_transmit().is_some() {}
    }
    assert_eq!(server.endpoint().exchanges(), 0, "exchanges left over");
    assert_eq!(server.endpoint().dedup_len(), 0, "message ids left over");
    assert_eq!(server.endpoint().timer_count(), 0, "timers left over");
    assert_eq!(server.pending(), 0, "requests left over");
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    fn replay(target: &str, f: fn(&[u8])) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus directory exists") {
            let data = std::fs::read(entry.expect("readable entry").path()).expect("readable file");
            f(&data);
            n += 1;
        }
        assert!(n >= 8, "corpus {target} has only {n} files");
    }

    #[test]
    fn message_corpus() {
        replay("message", super::message);
    }

    #[test]
    fn endpoint_corpus() {
        replay("endpoint", super::endpoint);
    }

    use crate::message::{option, BlockValue, Code, Message, MessageType, Token};
    use proptest::prelude::*;

    /// Messages that collide on purpose: few message ids, few tokens, two
    /// paths, and the options that drive the interesting state.
    fn arb_datagram() -> impl Strategy<Value = (usize, u64, Vec<u8>)> {
        (
            0usize..2,
            prop_oneof![Just(0u64), 0u64..3_000, 0u64..200_000],
            0u8..4,
            prop_oneof![
                Just(Code::GET),
                Just(Code::POST),
                Just(Code::PUT),
                Just(Code::EMPTY),
                Just(Code::CONTENT)
            ],
            0u16..6,
            0u8..3,
            prop_oneof![Just(None), Just(Some(0u32)), Just(Some(1u32))],
            proptest::option::of((0u32..4, any::<bool>(), 0u8..2)),
            proptest::option::of((0u32..4, 0u8..2)),
            0usize..40,
            any::<bool>(),
        )
            .prop_map(
                |(peer, delay, t, code, mid, tok, obs, b1, b2, len, path_a)| {
                    let mtype = match t {
                        0 => MessageType::Confirmable,
                        1 => MessageType::NonConfirmable,
                        2 => MessageType::Acknowledgement,
                        _ => MessageType::Reset,
                    };
                    if code == Code::EMPTY {
                        return (
                            peer,
                            delay,
                            Message::empty(mtype, mid).encode().unwrap_or_default(),
                        );
                    }
                    let mut m =
                        Message::new(mtype, code, mid, Token::new(&[tok]).unwrap_or_default());
                    m.set_uri_path(if path_a { "a" } else { "b" });
                    if let Some(o) = obs {
                        m.set_observe(o);
                    }
                    if let Some((num, more, szx)) = b1 {
                        m.set_block(option::BLOCK1, BlockValue { num, more, szx });
                    }
                    if let Some((num, szx)) = b2 {
                        m.set_block(
                            option::BLOCK2,
                            BlockValue {
                                num,
                                more: false,
                                szx,
                            },
                        );
                    }
                    m.payload = bytes::Bytes::from(vec![b'p'; len]);
                    (peer, delay, m.encode().unwrap_or_default())
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn server_stays_bounded_and_drains(datagrams in proptest::collection::vec(arb_datagram(), 0..40)) {
            super::drive(datagrams);
        }

        #[test]
        fn server_survives_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            super::endpoint(&data);
        }
    }
}
