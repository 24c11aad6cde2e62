//! A byte buffer that costs one pointer while it holds nothing.
//!
//! Every connection has a read and a write buffer, but an idle one — most
//! of a fleet's, most of the time — has both empty and without capacity.
//! Inline, two `BytesMut` are 64 bytes of every parked connection; boxed
//! on first use and released when empty, they are 16. The cost is one
//! small allocation each time a quiet connection becomes active.

use bytes::BytesMut;
use std::ops::{Deref, DerefMut};
use std::sync::LazyLock;

/// What an unallocated buffer reads as.
static EMPTY: LazyLock<BytesMut> = LazyLock::new(BytesMut::new);

#[derive(Default)]
pub(crate) struct LazyBuf(Option<Box<BytesMut>>);

impl LazyBuf {
    /// Give the buffer and its box back (what it held is dropped).
    pub fn release(&mut self) {
        self.0 = None;
    }

    /// Whether a buffer is allocated (for tests and the idle check).
    pub fn is_allocated(&self) -> bool {
        self.0.is_some()
    }
}

impl Deref for LazyBuf {
    type Target = BytesMut;

    fn deref(&self) -> &BytesMut {
        match &self.0 {
            Some(b) => b,
            None => &EMPTY,
        }
    }
}

impl DerefMut for LazyBuf {
    /// Allocates on first use: call only to change the buffer.
    fn deref_mut(&mut self) -> &mut BytesMut {
        self.0.get_or_insert_with(Default::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_until_written_and_after_release() {
        let mut b = LazyBuf::default();
        assert!(b.is_empty());
        assert_eq!(b.capacity(), 0);
        assert!(!b.is_allocated(), "reading does not allocate");
        b.extend_from_slice(b"abc");
        assert_eq!(&b[..], b"abc");
        assert!(b.is_allocated());
        b.release();
        assert!(b.is_empty() && !b.is_allocated());
        assert_eq!(std::mem::size_of::<LazyBuf>(), 8);
    }
}
