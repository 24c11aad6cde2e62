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
/// limits, answering every request and notifying observers. The bounded
/// tables must stay within their bounds, and once time has run on, every
/// exchange and remembered message id must be gone.
pub fn endpoint(data: &[u8]) {
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
    for (i, datagram) in data.split(|&b| b == 0xA5).enumerate() {
        now += Duration::from_millis(u64::from(datagram.first().copied().unwrap_or(0)) * 100);
        server.handle_datagram(now, peers[i % 2], datagram);
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
        assert!(server.endpoint().exchanges() <= 4);
        assert!(server.endpoint().dedup_len() <= 8);
        assert!(server.observers().len() <= 2);
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
}
