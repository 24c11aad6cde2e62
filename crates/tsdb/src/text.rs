//! Chunks of text values: zigzag timestamp deltas and length-prefixed
//! UTF-8 strings. Text series are rare (firmware versions, states) and
//! short, so no compression beyond the varints.

use crate::codec::{put_blob, put_zz, write_varint, Reader};
use std::sync::Arc;

/// Streaming encoder of a text chunk.
#[derive(Debug, Clone, Default)]
pub(crate) struct TextEncoder {
    count: u64,
    prev_ts: i64,
    body: Vec<u8>,
}

impl TextEncoder {
    pub fn push(&mut self, ts: i64, s: &str) {
        put_zz(&mut self.body, ts.wrapping_sub(self.prev_ts));
        self.prev_ts = ts;
        put_blob(&mut self.body, s.as_bytes());
        self.count += 1;
    }

    pub fn heap_bytes(&self) -> usize {
        self.body.len()
    }

    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 10);
        write_varint(&mut out, self.count);
        out.extend_from_slice(&self.body);
        out
    }
}

pub(crate) fn decode(buf: &[u8]) -> Option<Vec<(i64, Arc<str>)>> {
    let mut r = Reader::new(buf);
    let n = r.usize_v()?;
    if n > buf.len() {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    let mut ts = 0i64;
    for _ in 0..n {
        ts = ts.wrapping_add(r.zz()?);
        out.push((ts, Arc::from(r.str()?)));
    }
    r.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(pts in proptest::collection::vec((any::<i64>(), ".{0,20}"), 0..50)) {
            let mut e = TextEncoder::default();
            for (t, s) in &pts {
                e.push(*t, s);
            }
            let back = decode(&e.snapshot()).expect("decodes");
            prop_assert_eq!(back.len(), pts.len());
            for ((t1, s1), (t2, s2)) in pts.iter().zip(&back) {
                prop_assert_eq!(t1, t2);
                prop_assert_eq!(s1.as_str(), &**s2);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&bytes);
        }
    }
}
