//! Block-wise transfers (RFC 7959), server side, sans-IO.
//!
//! **Block1** (a request body in blocks): [`Uploads`] reassembles bodies
//! keyed by the client's address and the request URI (RFC 7959 §2.5: the
//! endpoint and the URI identify the body). Each block must start where the
//! previous one ended, so a client that lowers its block size mid-transfer
//! (or follows a smaller size we proposed) still lands on the right offset;
//! a gap is answered 4.08 Request Entity Incomplete, and a body that would
//! exceed the configured maximum 4.13 Request Entity Too Large with Size1.
//! Memory is bounded by the number of uploads and a total byte budget;
//! an upload idle for longer than its lifetime is forgotten.
//!
//! **Block2** (a response body in blocks): [`block2_slice`] picks the slice
//! of a body for a requested block, and [`Downloads`] keeps a body that is
//! being fetched block by block for a while, so that every block comes from
//! the same representation and the application is asked once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::message::{BlockValue, Code, MAX_BLOCK_NUM};

/// Bounds of Block1 reassembly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadLimits {
    /// The largest body accepted.
    pub max_body: usize,
    /// The most bodies being reassembled at once.
    pub max_uploads: usize,
    /// The most bytes held by all bodies being reassembled.
    pub max_total_bytes: usize,
    /// How long an upload may wait for its next block.
    pub lifetime: Duration,
    /// The largest block size we accept (SZX); larger client blocks are
    /// accepted but the 2.31 answer proposes this size.
    pub szx: u8,
}

/// What to answer to one Block1 block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block1Outcome {
    /// Not the last block: answer 2.31 Continue carrying this Block1 value.
    Continue(BlockValue),
    /// The last block arrived: here is the whole body. The final response
    /// echoes `block` (M = 0).
    Complete {
        /// The reassembled body.
        body: Bytes,
        /// The Block1 value to echo.
        block: BlockValue,
    },
    /// A block is missing (or the upload was forgotten): 4.08.
    Incomplete,
    /// The body would exceed the maximum: 4.13 with Size1 = `max`.
    TooLarge {
        /// The largest body accepted.
        max: usize,
    },
    /// A non-final block whose payload is not exactly the block size: 4.00.
    BadBlock,
    /// Too many uploads in progress: 5.03.
    Busy,
}

impl Block1Outcome {
    /// The response code for this outcome (2.31 for `Continue`; `Complete`
    /// is answered by the application).
    pub fn code(&self) -> Code {
        match self {
            Block1Outcome::Continue(_) => Code::CONTINUE,
            Block1Outcome::Complete { .. } => Code::CHANGED,
            Block1Outcome::Incomplete => Code::REQUEST_ENTITY_INCOMPLETE,
            Block1Outcome::TooLarge { .. } => Code::REQUEST_ENTITY_TOO_LARGE,
            Block1Outcome::BadBlock => Code::BAD_REQUEST,
            Block1Outcome::Busy => Code::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Debug)]
struct Upload {
    body: Vec<u8>,
    expires: Instant,
}

/// Block1 bodies being reassembled. See the module documentation.
#[derive(Debug)]
pub struct Uploads {
    limits: UploadLimits,
    uploads: HashMap<(SocketAddr, String), Upload>,
    total: usize,
}

impl Uploads {
    /// An empty table.
    pub fn new(limits: UploadLimits) -> Uploads {
        Uploads {
            limits,
            uploads: HashMap::new(),
            total: 0,
        }
    }

    /// Bodies in progress.
    pub fn len(&self) -> usize {
        self.uploads.len()
    }

    /// No body in progress.
    pub fn is_empty(&self) -> bool {
        self.uploads.is_empty()
    }

    /// Whether a body from `peer` to `uri` is being reassembled.
    pub fn contains(&self, peer: SocketAddr, uri: &str) -> bool {
        self.uploads.contains_key(&(peer, uri.to_owned()))
    }

    /// Take one block of a request body sent by `peer` to `uri`. `size1`
    /// is the client's announced total size, if any.
    pub fn receive(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        uri: &str,
        block: BlockValue,
        size1: Option<u32>,
        payload: &[u8],
    ) -> Block1Outcome {
        let key = (peer, uri.to_owned());
        let max = self.limits.max_body;
        if size1.is_some_and(|s| s as usize > max) {
            self.remove(&key);
            return Block1Outcome::TooLarge { max };
        }
        if (block.more && payload.len() != block.size()) || payload.len() > block.size() {
            self.remove(&key);
            return Block1Outcome::BadBlock;
        }
        let offset = block.offset();
        if block.num == 0 {
            // A first block (re)starts the body.
            self.remove(&key);
            if !block.more {
                return Block1Outcome::Complete {
                    body: Bytes::copy_from_slice(payload),
                    block,
                };
            }
            if payload.len() > max {
                return Block1Outcome::TooLarge { max };
            }
            self.expire(now);
            if self.uploads.len() >= self.limits.max_uploads
                || self.total + payload.len() > self.limits.max_total_bytes
            {
                return Block1Outcome::Busy;
            }
            self.total += payload.len();
            self.uploads.insert(
                key,
                Upload {
                    body: payload.to_vec(),
                    expires: now + self.limits.lifetime,
                },
            );
            return Block1Outcome::Continue(self.continue_value(block));
        }
        let Some(up) = self.uploads.get(&key) else {
            return Block1Outcome::Incomplete;
        };
        if up.expires <= now || offset != up.body.len() {
            self.remove(&key);
            return Block1Outcome::Incomplete;
        }
        let new_len = offset + payload.len();
        if new_len > max {
            self.remove(&key);
            return Block1Outcome::TooLarge { max };
        }
        if block.more && self.total + payload.len() > self.limits.max_total_bytes {
            self.remove(&key);
            return Block1Outcome::Busy;
        }
        if !block.more {
            let body = self
                .uploads
                .remove(&key)
                .map(|u| u.body)
                .unwrap_or_default();
            self.total -= body.len();
            let mut body = body;
            body.extend_from_slice(payload);
            return Block1Outcome::Complete {
                body: Bytes::from(body),
                block,
            };
        }
        self.total += payload.len();
        let lifetime = self.limits.lifetime;
        if let Some(up) = self.uploads.get_mut(&key) {
            up.body.extend_from_slice(payload);
            up.expires = now + lifetime;
        }
        Block1Outcome::Continue(self.continue_value(block))
    }

    /// The Block1 value of a 2.31 answer: the client's block, or — when the
    /// client's blocks are larger than ours — the same NUM with our size
    /// (RFC 7959 §2.3 control usage, as in its figure of a late
    /// negotiation): the client then counts what it already sent in our
    /// size, and since blocks are placed by byte offset either way the
    /// body stays consistent.
    fn continue_value(&self, block: BlockValue) -> BlockValue {
        BlockValue {
            num: block.num,
            more: true,
            szx: block.szx.min(self.limits.szx),
        }
    }

    fn remove(&mut self, key: &(SocketAddr, String)) {
        if let Some(up) = self.uploads.remove(key) {
            self.total -= up.body.len();
        }
    }

    /// Forget uploads whose client went quiet.
    pub fn expire(&mut self, now: Instant) {
        let mut freed = 0;
        self.uploads.retain(|_, up| {
            let keep = up.expires > now;
            if !keep {
                freed += up.body.len();
            }
            keep
        });
        self.total -= freed;
    }
}

/// The byte range and Block2 value of the block of `body` a client asked
/// for: `requested` is its Block2 option (block 0 when absent), `max_szx`
/// the largest block we send. When the client asks for larger blocks than
/// we send, its block number is rescaled to our size (RFC 7959 §2.4).
/// `None` when the block starts beyond the end of the body.
pub fn block2_slice(
    body_len: usize,
    requested: Option<BlockValue>,
    max_szx: u8,
) -> Option<(BlockValue, Range<usize>)> {
    let (offset, szx) = match requested {
        Some(b) => (b.offset(), b.szx.min(max_szx)),
        None => (0, max_szx),
    };
    let size = 1usize << (szx + 4);
    let num = offset / size;
    let start = num * size;
    if start > 0 && start >= body_len {
        return None;
    }
    let num = u32::try_from(num).ok().filter(|&n| n <= MAX_BLOCK_NUM)?;
    let end = (start + size).min(body_len);
    Some((
        BlockValue {
            num,
            more: end < body_len,
            szx,
        },
        start..end,
    ))
}

/// A response body being fetched block by block.
#[derive(Debug, Clone)]
pub struct Download {
    /// The response code.
    pub code: Code,
    /// Its Content-Format.
    pub content_format: Option<u16>,
    /// The whole body.
    pub body: Bytes,
    /// An entity tag of the body, so a client can tell that blocks belong to
    /// one representation.
    pub etag: [u8; 4],
    expires: Instant,
}

/// Response bodies kept for their later blocks, keyed by client and URI.
/// Bounded by entry count and total bytes; the oldest entry goes first.
#[derive(Debug)]
pub struct Downloads {
    entries: HashMap<(SocketAddr, String), Download>,
    max_entries: usize,
    max_total_bytes: usize,
    total: usize,
    lifetime: Duration,
}

impl Downloads {
    /// An empty cache.
    pub fn new(max_entries: usize, max_total_bytes: usize, lifetime: Duration) -> Downloads {
        Downloads {
            entries: HashMap::new(),
            max_entries,
            max_total_bytes,
            total: 0,
            lifetime,
        }
    }

    /// Keep `body` for `peer`'s later block requests to `uri`; returns its
    /// ETag. When the cache is full the entries closest to expiry go.
    pub fn insert(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        uri: &str,
        code: Code,
        content_format: Option<u16>,
        body: Bytes,
    ) -> [u8; 4] {
        let etag = etag(&body);
        self.remove(&(peer, uri.to_owned()));
        self.expire(now);
        if body.len() > self.max_total_bytes || self.max_entries == 0 {
            return etag;
        }
        while self.entries.len() >= self.max_entries
            || self.total + body.len() > self.max_total_bytes
        {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, d)| d.expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
        self.total += body.len();
        self.entries.insert(
            (peer, uri.to_owned()),
            Download {
                code,
                content_format,
                body,
                etag,
                expires: now + self.lifetime,
            },
        );
        etag
    }

    /// The body kept for `peer` and `uri`, if still fresh.
    pub fn get(&self, now: Instant, peer: SocketAddr, uri: &str) -> Option<&Download> {
        self.entries
            .get(&(peer, uri.to_owned()))
            .filter(|d| d.expires > now)
    }

    /// Forget a body (its last block was served).
    pub fn remove(&mut self, key: &(SocketAddr, String)) {
        if let Some(d) = self.entries.remove(key) {
            self.total -= d.body.len();
        }
    }

    /// Bodies held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No body held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forget expired bodies.
    pub fn expire(&mut self, now: Instant) {
        let mut freed = 0;
        self.entries.retain(|_, d| {
            let keep = d.expires > now;
            if !keep {
                freed += d.body.len();
            }
            keep
        });
        self.total -= freed;
    }
}

/// FNV-1a over the body: cheap, and enough to tell representations apart.
fn etag(body: &[u8]) -> [u8; 4] {
    let mut h: u32 = 0x811C_9DC5;
    for &b in body {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> UploadLimits {
        UploadLimits {
            max_body: 64 * 1024,
            max_uploads: 4,
            max_total_bytes: 128 * 1024,
            lifetime: Duration::from_secs(60),
            szx: 6,
        }
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 5683))
    }

    fn b(num: u32, more: bool, szx: u8) -> BlockValue {
        BlockValue::new(num, more, szx).unwrap()
    }

    #[test]
    fn block1_upload_of_64_kib_in_1024_byte_blocks() {
        let t0 = Instant::now();
        let mut up = Uploads::new(limits());
        let body: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<&[u8]> = body.chunks(1024).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let more = i + 1 < chunks.len();
            let out = up.receive(t0, peer(), "fw", b(i as u32, more, 6), None, chunk);
            if more {
                assert_eq!(out, Block1Outcome::Continue(b(i as u32, true, 6)));
            } else {
                assert_eq!(
                    out,
                    Block1Outcome::Complete {
                        body: Bytes::from(body.clone()),
                        block: b(63, false, 6)
                    }
                );
            }
        }
        assert!(up.is_empty());
        assert_eq!(up.total, 0);
    }

    #[test]
    fn block1_missing_block_is_request_entity_incomplete() {
        let t0 = Instant::now();
        let mut up = Uploads::new(limits());
        let blk = [0u8; 64];
        up.receive(t0, peer(), "fw", b(0, true, 2), None, &blk);
        assert_eq!(
            up.receive(t0, peer(), "fw", b(2, true, 2), None, &blk),
            Block1Outcome::Incomplete
        );
        // The upload is gone: block 1 is now incomplete too.
        assert_eq!(
            up.receive(t0, peer(), "fw", b(1, true, 2), None, &blk),
            Block1Outcome::Incomplete
        );
        // A continuation with no first block.
        assert_eq!(
            up.receive(t0, peer(), "other", b(1, false, 2), None, &blk[..3]),
            Block1Outcome::Incomplete
        );
    }

    #[test]
    fn block1_too_large_by_size1_or_by_growth() {
        let t0 = Instant::now();
        let mut up = Uploads::new(UploadLimits {
            max_body: 2048,
            ..limits()
        });
        assert_eq!(
            up.receive(t0, peer(), "fw", b(0, true, 6), Some(4096), &[0; 1024]),
            Block1Outcome::TooLarge { max: 2048 }
        );
        up.receive(t0, peer(), "fw", b(0, true, 6), None, &[0; 1024]);
        up.receive(t0, peer(), "fw", b(1, true, 6), None, &[0; 1024]);
        assert_eq!(
            up.receive(t0, peer(), "fw", b(2, false, 6), None, &[0; 10]),
            Block1Outcome::TooLarge { max: 2048 }
        );
        assert!(up.is_empty());
    }

    #[test]
    fn block1_incomplete_body_times_out() {
        let t0 = Instant::now();
        let mut up = Uploads::new(limits());
        up.receive(t0, peer(), "fw", b(0, true, 0), None, &[1; 16]);
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            up.receive(later, peer(), "fw", b(1, false, 0), None, &[1; 4]),
            Block1Outcome::Incomplete
        );
        up.receive(t0, peer(), "fw", b(0, true, 0), None, &[1; 16]);
        up.expire(later);
        assert!(up.is_empty());
        assert_eq!(up.total, 0);
    }

    #[test]
    fn block1_bounds_refuse_new_uploads_when_full() {
        let t0 = Instant::now();
        let mut up = Uploads::new(limits());
        for i in 0..4 {
            let uri = format!("u{i}");
            assert!(matches!(
                up.receive(t0, peer(), &uri, b(0, true, 0), None, &[0; 16]),
                Block1Outcome::Continue(_)
            ));
        }
        assert_eq!(
            up.receive(t0, peer(), "u9", b(0, true, 0), None, &[0; 16]),
            Block1Outcome::Busy
        );
        // A non-final block of the wrong size is refused.
        assert_eq!(
            up.receive(t0, peer(), "u0", b(1, true, 0), None, &[0; 15]),
            Block1Outcome::BadBlock
        );
    }

    #[test]
    fn block1_larger_client_blocks_get_our_size_proposed() {
        let t0 = Instant::now();
        let mut up = Uploads::new(UploadLimits { szx: 2, ..limits() });
        // Client sends 128-byte blocks, we prefer 64: the answer proposes
        // 64, so the client continues with NUM 2 of size 64 (offset 128).
        assert_eq!(
            up.receive(t0, peer(), "x", b(0, true, 3), None, &[0; 128]),
            Block1Outcome::Continue(b(0, true, 2))
        );
        assert!(matches!(
            up.receive(t0, peer(), "x", b(2, false, 2), None, &[0; 10]),
            Block1Outcome::Complete { .. }
        ));
    }

    #[test]
    fn block2_download_slices() {
        let (v, r) = block2_slice(2500, None, 6).unwrap();
        assert_eq!((v, r), (b(0, true, 6), 0..1024));
        let (v, r) = block2_slice(2500, Some(b(2, false, 6)), 6).unwrap();
        assert_eq!((v, r), (b(2, false, 6), 2048..2500));
        // The client asks for smaller blocks: honoured.
        let (v, r) = block2_slice(2500, Some(b(3, false, 4)), 6).unwrap();
        assert_eq!((v, r), (b(3, true, 4), 768..1024));
        // The client asks for larger blocks than ours: rescaled.
        let (v, r) = block2_slice(2500, Some(b(1, false, 6)), 5).unwrap();
        assert_eq!((v, r), (b(2, true, 5), 1024..1536));
        assert_eq!(block2_slice(2500, Some(b(3, false, 6)), 6), None);
        // An empty body is one empty block.
        assert_eq!(block2_slice(0, None, 6), Some((b(0, false, 6), 0..0)));
    }

    #[test]
    fn downloads_are_bounded() {
        let t0 = Instant::now();
        let mut d = Downloads::new(2, 100, Duration::from_secs(10));
        d.insert(
            t0,
            peer(),
            "a",
            Code::CONTENT,
            None,
            Bytes::from(vec![0; 40]),
        );
        d.insert(
            t0 + Duration::from_secs(1),
            peer(),
            "b",
            Code::CONTENT,
            None,
            Bytes::from(vec![0; 40]),
        );
        d.insert(
            t0 + Duration::from_secs(2),
            peer(),
            "c",
            Code::CONTENT,
            None,
            Bytes::from(vec![0; 40]),
        );
        assert_eq!(d.len(), 2);
        assert!(d.get(t0, peer(), "a").is_none());
        assert!(d.get(t0 + Duration::from_secs(3), peer(), "c").is_some());
        assert!(d.get(t0 + Duration::from_secs(13), peer(), "c").is_none());
        d.expire(t0 + Duration::from_secs(13));
        assert!(d.is_empty());
        assert_eq!(d.total, 0);
    }

    proptest! {
        #[test]
        fn block2_slices_cover_the_body_exactly(len in 0usize..10_000, szx in 0u8..=6) {
            let mut covered = 0;
            let mut num = 0;
            loop {
                let (v, r) = block2_slice(len, Some(BlockValue::new(num, false, szx).unwrap()), 6).unwrap();
                prop_assert_eq!(r.start, covered);
                covered = r.end;
                if !v.more { break; }
                num += 1;
            }
            prop_assert_eq!(covered, len);
        }

        #[test]
        fn block1_reassembles_any_body(body in proptest::collection::vec(any::<u8>(), 1..5000), szx in 0u8..=6) {
            let t0 = Instant::now();
            let mut up = Uploads::new(limits());
            let size = 1usize << (szx + 4);
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            let mut last = None;
            for (i, c) in chunks.iter().enumerate() {
                last = Some(up.receive(t0, peer(), "p", BlockValue::new(i as u32, i + 1 < chunks.len(), szx).unwrap(), None, c));
            }
            match last {
                Some(Block1Outcome::Complete { body: got, .. }) => prop_assert_eq!(&got[..], &body[..]),
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
