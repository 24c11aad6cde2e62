//! Small byte-level helpers shared by the WAL, the partition files and the
//! rollup blocks: LEB128 varints, zigzag, and a bounds-checked reader that
//! reports corruption instead of panicking.

pub(crate) use crate::chunk::{unzigzag, write_varint, zigzag};

/// Bounds-checked reader over a byte slice. Every method returns `None`
/// when the input is too short or malformed; callers turn that into a
/// corruption error naming the file.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    pub fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    pub fn zz(&mut self) -> Option<i64> {
        self.varint().map(unzigzag)
    }

    pub fn u32v(&mut self) -> Option<u32> {
        u32::try_from(self.varint()?).ok()
    }

    pub fn usize_v(&mut self) -> Option<usize> {
        usize::try_from(self.varint()?).ok()
    }

    pub fn f64(&mut self) -> Option<f64> {
        let raw = self.bytes(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(raw);
        Some(f64::from_bits(u64::from_le_bytes(b)))
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    /// A varint length followed by that many bytes.
    pub fn blob(&mut self) -> Option<&'a [u8]> {
        let n = self.usize_v()?;
        self.bytes(n)
    }

    pub fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.blob()?).ok()
    }
}

pub(crate) fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_bits().to_le_bytes());
}

pub(crate) fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    write_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

pub(crate) fn put_zz(out: &mut Vec<u8>, v: i64) {
    write_varint(out, zigzag(v));
}

/// Frame a record: `len: u32 LE`, `crc32(payload): u32 LE`, payload.
pub(crate) fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Split framed records off `buf`. Returns the records and the length of
/// the valid prefix: a torn or corrupt record ends the scan (everything
/// after it is a crash's leftover and is truncated by the caller).
pub(crate) fn unframe(buf: &[u8], max_record: usize) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= 8 {
        let mut l = [0u8; 4];
        l.copy_from_slice(&buf[pos..pos + 4]);
        let len = u32::from_le_bytes(l) as usize;
        let mut c = [0u8; 4];
        c.copy_from_slice(&buf[pos + 4..pos + 8]);
        let crc = u32::from_le_bytes(c);
        if len > max_record || buf.len() - pos - 8 < len {
            break;
        }
        let payload = &buf[pos + 8..pos + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload);
        pos += 8 + len;
    }
    (out, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_torn_tail_is_cut() {
        let mut buf = Vec::new();
        frame(&mut buf, b"hello");
        frame(&mut buf, b"");
        frame(&mut buf, b"world");
        let full = buf.len();
        let (recs, valid) = unframe(&buf, 1 << 20);
        assert_eq!(recs, vec![&b"hello"[..], b"", b"world"]);
        assert_eq!(valid, full);
        // Tear the last record.
        let (recs, valid) = unframe(&buf[..full - 2], 1 << 20);
        assert_eq!(recs.len(), 2);
        assert_eq!(valid, full - 13);
        // Flip a byte inside the first record: nothing after it is trusted.
        buf[9] ^= 1;
        let (recs, valid) = unframe(&buf, 1 << 20);
        assert!(recs.is_empty());
        assert_eq!(valid, 0);
    }

    #[test]
    fn reader_rejects_short_input() {
        let mut r = Reader::new(&[0x80]);
        assert_eq!(r.varint(), None);
        let mut r = Reader::new(&[3, b'a']);
        assert_eq!(r.blob(), None);
    }
}
