//! MSB-first bit writer and reader.
//!
//! The writer accumulates bits in a `u64` and flushes whole bytes; the reader
//! loads up to eight bytes at once and extracts fields with shifts. Neither
//! allocates per bit.

/// Appends bit fields, most significant bit first, to a byte vector.
#[derive(Debug, Default, Clone)]
pub struct BitWriter {
    buf: Vec<u8>,
    /// Pending bits, right-aligned; always fewer than 8 between calls.
    acc: u64,
    nbits: u32,
}

impl BitWriter {
    /// Creates an empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates an empty writer with room for `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            acc: 0,
            nbits: 0,
        }
    }

    /// Appends a single bit.
    #[inline]
    pub fn push_bit(&mut self, bit: bool) {
        self.push_small(u64::from(bit), 1);
    }

    /// Appends the low `n` bits of `value` (`n <= 64`), MSB first. Higher
    /// bits of `value` are ignored.
    ///
    /// # Panics
    ///
    /// Panics if `n > 64`.
    #[inline]
    pub fn push_bits(&mut self, value: u64, n: u32) {
        assert!(n <= 64, "cannot push more than 64 bits at once");
        if n > 32 {
            self.push_small(value >> 32, n - 32);
            self.push_small(value & 0xFFFF_FFFF, 32);
        } else {
            self.push_small(value, n);
        }
    }

    #[inline]
    fn push_small(&mut self, value: u64, n: u32) {
        debug_assert!(n <= 32);
        if n == 0 {
            return;
        }
        let v = value & (u64::MAX >> (64 - n));
        // acc holds < 8 bits, so this holds < 40 bits: no overflow.
        self.acc = (self.acc << n) | v;
        self.nbits += n;
        while self.nbits >= 8 {
            self.nbits -= 8;
            self.buf.push((self.acc >> self.nbits) as u8);
        }
        self.acc &= (1u64 << self.nbits) - 1;
    }

    /// Number of bits written so far.
    pub fn bit_len(&self) -> usize {
        self.buf.len() * 8 + self.nbits as usize
    }

    /// Flushes the last partial byte (zero-padded) and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        if self.nbits > 0 {
            self.buf.push((self.acc << (8 - self.nbits)) as u8);
        }
        self.buf
    }
}

/// Reads bit fields, most significant bit first, from a byte slice.
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    data: &'a [u8],
    /// Position in bits from the start of `data`.
    pos: usize,
}

impl<'a> BitReader<'a> {
    /// Creates a reader positioned at the first bit of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// Bits left to read.
    #[inline]
    pub fn remaining_bits(&self) -> usize {
        self.data.len().saturating_mul(8) - self.pos
    }

    /// Reads one bit; `None` at the end of the input.
    #[inline]
    pub fn read_bit(&mut self) -> Option<bool> {
        let byte = *self.data.get(self.pos >> 3)?;
        let bit = (byte >> (7 - (self.pos & 7))) & 1;
        self.pos += 1;
        Some(bit == 1)
    }

    /// Reads `n` bits (`n <= 64`) as the low bits of a `u64`. Returns `None`
    /// (consuming nothing) if fewer than `n` bits remain or `n > 64`.
    #[inline]
    pub fn read_bits(&mut self, n: u32) -> Option<u64> {
        if n > 64 || n as usize > self.remaining_bits() {
            return None;
        }
        match n {
            0 => Some(0),
            1..=32 => Some(self.read_small(n)),
            _ => {
                let hi = self.read_small(n - 32);
                let lo = self.read_small(32);
                Some((hi << 32) | lo)
            }
        }
    }

    /// Precondition: `1 <= n <= 32` and at least `n` bits remain.
    #[inline]
    fn read_small(&mut self, n: u32) -> u64 {
        let byte = self.pos >> 3;
        let shift = (self.pos & 7) as u32;
        let mut w = [0u8; 8];
        if let Some(src) = self.data.get(byte..byte + 8) {
            w.copy_from_slice(src);
        } else {
            let src = &self.data[byte..];
            w[..src.len()].copy_from_slice(src);
        }
        let word = u64::from_be_bytes(w);
        self.pos += n as usize;
        // shift + n <= 39 < 64.
        (word << shift) >> (64 - n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_mixed_widths() {
        let fields: Vec<(u64, u32)> = (0..=64u32)
            .flat_map(|n| {
                let v = 0x9E37_79B9_7F4A_7C15u64.rotate_left(n);
                [(v, n), (u64::MAX, n), (0, n), (1, n.max(1))]
            })
            .collect();
        let mut w = BitWriter::new();
        for &(v, n) in &fields {
            w.push_bits(v, n);
        }
        w.push_bit(true);
        let total = w.bit_len();
        let bytes = w.finish();
        assert_eq!(bytes.len(), total.div_ceil(8));
        let mut r = BitReader::new(&bytes);
        for &(v, n) in &fields {
            let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            assert_eq!(r.read_bits(n), Some(v & mask), "width {n}");
        }
        assert_eq!(r.read_bit(), Some(true));
        assert!(r.remaining_bits() < 8);
    }

    #[test]
    fn reader_returns_none_at_end() {
        let mut r = BitReader::new(&[0xA5]);
        assert_eq!(r.read_bits(9), None);
        assert_eq!(r.read_bits(65), None);
        assert_eq!(r.read_bits(4), Some(0xA));
        assert_eq!(r.read_bits(4), Some(0x5));
        assert_eq!(r.read_bit(), None);
        assert_eq!(r.read_bits(1), None);
        assert_eq!(r.read_bits(0), Some(0));
        let mut empty = BitReader::new(&[]);
        assert_eq!(empty.read_bit(), None);
    }
}
