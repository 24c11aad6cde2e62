//! Gorilla-style chunk encoding of `(timestamp_ms, f64)` points.
//!
//! # Format (version 1)
//!
//! Header, byte-aligned:
//!
//! | field        | encoding                                         |
//! |--------------|--------------------------------------------------|
//! | magic        | 1 byte, [`MAGIC`]                                |
//! | version      | 1 byte, [`VERSION`]                              |
//! | point count  | unsigned LEB128 varint                           |
//! | first ts     | zigzag + LEB128 varint (absent if count is 0)    |
//! | first value  | 8 bytes, `f64::to_bits` little-endian (ditto)    |
//!
//! Then a bit stream (MSB first, last byte zero-padded) with, for every point
//! after the first:
//!
//! 1. **Timestamp**: `dod = (ts - prev_ts) - prev_delta` (wrapping `i64`
//!    arithmetic, `prev_delta` starts at 0), zigzag-encoded as `zz`:
//!    * `0` if `zz == 0`
//!    * `10` + 7 bits if `zz < 2^7`
//!    * `110` + 9 bits if `zz < 2^9`
//!    * `1110` + 12 bits if `zz < 2^12`
//!    * `1111` + 64 bits otherwise (out-of-order, duplicate, huge gaps…).
//! 2. **Value**: `xor = bits ^ prev_bits`:
//!    * `0` if `xor == 0`
//!    * `10` + meaningful bits, reusing the previous leading/trailing window
//!    * `11` + 5 bits leading-zero count (capped at 31) + 6 bits meaningful
//!      length (64 stored as 0) + the meaningful bits.

//!
//! # Format (version 2, decimal)
//!
//! Sensors report decimals (`21.37`), whose binary mantissas differ in
//! nearly every bit from one reading to the next, which is where XOR
//! encoding loses. When every value of a chunk is exactly `n / 10^e` for
//! integers `n` (|n| < 2^53) and one `e` in `0..=9`, [`encode_best`] also
//! tries storing the integers: the header holds `e` (1 byte) and the first
//! `n` (zigzag varint) instead of the first value's bits, and each value
//! becomes `zz = zigzag(n - prev_n)` coded as `0` (zero), `10` + 4 bits,
//! `110` + 8 bits, `1110` + 16 bits or `1111` + 64 bits. Timestamps are
//! coded as in version 1. The smaller encoding wins; decoding rebuilds
//! each value as `n as f64 / 10^e`, which the encoder checked is the
//! original bit pattern. This is the idea of ALP / `pco`'s float-mult mode
//! in its simplest form.

use crate::bits::{BitReader, BitWriter};

/// First byte of every chunk.
pub const MAGIC: u8 = 0xD7;
/// Format version written by [`ChunkEncoder`].
pub const VERSION: u8 = 1;
/// Format version of decimal chunks (see [`encode_best`]).
pub const VERSION_DECIMAL: u8 = 2;

/// Exact powers of ten (all below 2^53, so exact as `f64`).
const POW10: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// The integers `n` with `v == n / 10^e` for every value, at the smallest
/// such `e`, if there is one.
fn as_decimal(points: &[(i64, f64)]) -> Option<(u8, Vec<i64>)> {
    'scale: for (e, &p) in POW10.iter().enumerate() {
        let mut out = Vec::with_capacity(points.len());
        for &(_, v) in points {
            let n = (v * p).round();
            if n.is_nan() || n.abs() >= 9_007_199_254_740_992.0 {
                continue 'scale;
            }
            let n = n as i64;
            if (n as f64 / p).to_bits() != v.to_bits() {
                continue 'scale;
            }
            out.push(n);
        }
        return Some((e as u8, out));
    }
    None
}

/// Encode `points` in whichever of the two formats is smaller (decimal
/// only applies when every value is a short decimal, see the module docs).
pub fn encode_best(points: &[(i64, f64)]) -> Vec<u8> {
    let mut enc = ChunkEncoder::new();
    for &(t, v) in points {
        enc.push(t, v);
    }
    let gorilla = enc.finish();
    match as_decimal(points) {
        Some((e, ns)) if points.len() > 1 => {
            let dec = encode_decimal(points, e, &ns);
            if dec.len() < gorilla.len() {
                dec
            } else {
                gorilla
            }
        }
        _ => gorilla,
    }
}

fn encode_decimal(points: &[(i64, f64)], e: u8, ns: &[i64]) -> Vec<u8> {
    let mut enc = ChunkEncoder::new();
    let mut prev_n = ns[0];
    for (i, &(t, _)) in points.iter().enumerate() {
        if i == 0 {
            enc.first_ts = t;
            enc.prev_ts = t;
            enc.count = 1;
            continue;
        }
        let delta = t.wrapping_sub(enc.prev_ts);
        enc.encode_dod(delta.wrapping_sub(enc.prev_delta));
        enc.prev_delta = delta;
        enc.prev_ts = t;
        let zz = zigzag(ns[i].wrapping_sub(prev_n));
        prev_n = ns[i];
        let w = &mut enc.body;
        if zz == 0 {
            w.push_bit(false);
        } else if zz < 1 << 4 {
            w.push_bits((0b10 << 4) | zz, 2 + 4);
        } else if zz < 1 << 8 {
            w.push_bits((0b110 << 8) | zz, 3 + 8);
        } else if zz < 1 << 16 {
            w.push_bits((0b1110 << 16) | zz, 4 + 16);
        } else {
            w.push_bits(0b1111, 4);
            w.push_bits(zz, 64);
        }
        enc.count += 1;
    }
    let body = enc.body.finish();
    let mut out = Vec::with_capacity(2 + 10 + 10 + 1 + 10 + body.len());
    out.push(MAGIC);
    out.push(VERSION_DECIMAL);
    write_varint(&mut out, enc.count as u64);
    write_varint(&mut out, zigzag(enc.first_ts));
    out.push(e);
    write_varint(&mut out, zigzag(ns[0]));
    out.extend_from_slice(&body);
    out
}

/// Why a chunk could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The input ended before all announced points were read.
    #[error("chunk is truncated")]
    Truncated,
    /// The first byte is not [`MAGIC`].
    #[error("bad chunk magic byte {0:#04x}")]
    BadMagic(u8),
    /// The version byte is not one this decoder understands.
    #[error("unsupported chunk version {0}")]
    UnsupportedVersion(u8),
    /// The input is structurally invalid.
    #[error("corrupt chunk: {0}")]
    Corrupt(&'static str),
}

#[inline]
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(crate) fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, ChunkError> {
    let mut v = 0u64;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or(ChunkError::Truncated)?;
        *pos += 1;
        if i == 9 && b > 1 {
            return Err(ChunkError::Corrupt("varint overflows u64"));
        }
        v |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ChunkError::Corrupt("varint too long"))
}

/// Leading/trailing zero window of the last explicitly encoded XOR.
#[derive(Debug, Clone, Copy)]
struct Window {
    leading: u32,
    trailing: u32,
}

/// Streaming encoder for one chunk.
#[derive(Debug, Clone, Default)]
pub struct ChunkEncoder {
    count: usize,
    first_ts: i64,
    first_value: u64,
    prev_ts: i64,
    prev_delta: i64,
    prev_value: u64,
    window: Option<Window>,
    body: BitWriter,
}

impl ChunkEncoder {
    /// Creates an empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of points pushed so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if no point has been pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a point. Any timestamp is accepted (including out-of-order and
    /// duplicates) and any `f64` bit pattern is preserved exactly.
    #[inline]
    pub fn push(&mut self, ts_ms: i64, value: f64) {
        let bits = value.to_bits();
        if self.count == 0 {
            self.first_ts = ts_ms;
            self.first_value = bits;
        } else {
            let delta = ts_ms.wrapping_sub(self.prev_ts);
            self.encode_dod(delta.wrapping_sub(self.prev_delta));
            self.prev_delta = delta;
            self.encode_value(bits);
        }
        self.prev_ts = ts_ms;
        self.prev_value = bits;
        self.count += 1;
    }

    #[inline]
    fn encode_dod(&mut self, dod: i64) {
        let zz = zigzag(dod);
        let w = &mut self.body;
        if zz == 0 {
            w.push_bit(false);
        } else if zz < 1 << 7 {
            w.push_bits((0b10 << 7) | zz, 2 + 7);
        } else if zz < 1 << 9 {
            w.push_bits((0b110 << 9) | zz, 3 + 9);
        } else if zz < 1 << 12 {
            w.push_bits((0b1110 << 12) | zz, 4 + 12);
        } else {
            w.push_bits(0b1111, 4);
            w.push_bits(zz, 64);
        }
    }

    #[inline]
    fn encode_value(&mut self, bits: u64) {
        let xor = bits ^ self.prev_value;
        let w = &mut self.body;
        if xor == 0 {
            w.push_bit(false);
            return;
        }
        let leading = xor.leading_zeros().min(31);
        let trailing = xor.trailing_zeros();
        if let Some(win) = self.window {
            if leading >= win.leading && trailing >= win.trailing {
                let len = 64 - win.leading - win.trailing;
                w.push_bits(0b10, 2);
                w.push_bits(xor >> win.trailing, len);
                return;
            }
        }
        let len = 64 - leading - trailing;
        w.push_bits(0b11, 2);
        w.push_bits(u64::from(leading), 5);
        w.push_bits(u64::from(len & 63), 6);
        w.push_bits(xor >> trailing, len);
        self.window = Some(Window { leading, trailing });
    }

    /// The chunk as it would be serialised now, leaving the encoder open
    /// (queries read a series' head while it is still being written).
    pub fn snapshot(&self) -> Vec<u8> {
        self.clone().finish()
    }

    /// Approximate heap bytes held (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.body.bit_len() / 8 + 1
    }

    /// Serialises the chunk (header + bit stream).
    pub fn finish(self) -> Vec<u8> {
        let body = self.body.finish();
        let mut out = Vec::with_capacity(2 + 10 + 10 + 8 + body.len());
        out.push(MAGIC);
        out.push(VERSION);
        write_varint(&mut out, self.count as u64);
        if self.count > 0 {
            write_varint(&mut out, zigzag(self.first_ts));
            out.extend_from_slice(&self.first_value.to_le_bytes());
        }
        out.extend_from_slice(&body);
        out
    }
}

/// Decodes a whole chunk.
pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<(i64, f64)>, ChunkError> {
    let iter = ChunkIter::new(bytes)?;
    let mut out = Vec::with_capacity(iter.point_count());
    for point in iter {
        out.push(point?);
    }
    Ok(out)
}

/// Lazily decodes the points of a chunk.
///
/// Yields `Ok` points in order; on corruption yields one `Err` and then
/// ends. After the last point the padding is checked, so trailing garbage is
/// reported as a final `Err`.
#[derive(Debug, Clone)]
pub struct ChunkIter<'a> {
    reader: BitReader<'a>,
    total: usize,
    emitted: usize,
    prev_ts: i64,
    prev_delta: i64,
    prev_value: u64,
    window: Option<Window>,
    done: bool,
    /// Decimal chunks: the scale `10^e` and the previous integer.
    decimal: Option<f64>,
    prev_n: i64,
}

impl<'a> ChunkIter<'a> {
    /// Parses the header. Cheap plausibility checks on the point count are
    /// done here so that corrupt counts cannot trigger huge allocations.
    pub fn new(bytes: &'a [u8]) -> Result<Self, ChunkError> {
        let (&magic, rest) = bytes.split_first().ok_or(ChunkError::Truncated)?;
        if magic != MAGIC {
            return Err(ChunkError::BadMagic(magic));
        }
        let (&version, rest) = rest.split_first().ok_or(ChunkError::Truncated)?;
        if version != VERSION && version != VERSION_DECIMAL {
            return Err(ChunkError::UnsupportedVersion(version));
        }
        let mut pos = 0;
        let count = read_varint(rest, &mut pos)?;
        let mut decimal = None;
        let mut prev_n = 0;
        let (first_ts, first_value) = if version == VERSION_DECIMAL {
            if count == 0 {
                return Err(ChunkError::Corrupt("empty decimal chunk"));
            }
            let ts = unzigzag(read_varint(rest, &mut pos)?);
            let e = *rest.get(pos).ok_or(ChunkError::Truncated)?;
            pos += 1;
            let p = *POW10
                .get(usize::from(e))
                .ok_or(ChunkError::Corrupt("decimal scale out of range"))?;
            prev_n = unzigzag(read_varint(rest, &mut pos)?);
            decimal = Some(p);
            (ts, (prev_n as f64 / p).to_bits())
        } else if count > 0 {
            let ts = unzigzag(read_varint(rest, &mut pos)?);
            let raw = rest.get(pos..pos + 8).ok_or(ChunkError::Truncated)?;
            pos += 8;
            let mut b = [0u8; 8];
            b.copy_from_slice(raw);
            (ts, u64::from_le_bytes(b))
        } else {
            (0, 0)
        };
        let body = &rest[pos..];
        // Every point after the first costs at least two bits.
        let body_bits = (body.len() as u64).saturating_mul(8);
        if count > 1 && count - 1 > body_bits / 2 {
            return Err(ChunkError::Truncated);
        }
        let total = usize::try_from(count).map_err(|_| ChunkError::Truncated)?;
        Ok(Self {
            reader: BitReader::new(body),
            total,
            emitted: 0,
            prev_ts: first_ts,
            prev_delta: 0,
            prev_value: first_value,
            window: None,
            done: false,
            decimal,
            prev_n,
        })
    }

    /// Number of points the header announces.
    pub fn point_count(&self) -> usize {
        self.total
    }

    #[inline]
    fn bit(&mut self) -> Result<bool, ChunkError> {
        self.reader.read_bit().ok_or(ChunkError::Truncated)
    }

    #[inline]
    fn bits(&mut self, n: u32) -> Result<u64, ChunkError> {
        self.reader.read_bits(n).ok_or(ChunkError::Truncated)
    }

    #[inline]
    fn decode_next(&mut self) -> Result<(i64, f64), ChunkError> {
        // Timestamp.
        let mut ones = 0;
        while ones < 4 && self.bit()? {
            ones += 1;
        }
        let zz = match ones {
            0 => 0,
            1 => self.bits(7)?,
            2 => self.bits(9)?,
            3 => self.bits(12)?,
            _ => self.bits(64)?,
        };
        let delta = self.prev_delta.wrapping_add(unzigzag(zz));
        let ts = self.prev_ts.wrapping_add(delta);

        // Value.
        if let Some(p) = self.decimal {
            let mut ones = 0;
            while ones < 4 && self.bit()? {
                ones += 1;
            }
            let zz = match ones {
                0 => 0,
                1 => self.bits(4)?,
                2 => self.bits(8)?,
                3 => self.bits(16)?,
                _ => self.bits(64)?,
            };
            self.prev_n = self.prev_n.wrapping_add(unzigzag(zz));
            self.prev_value = (self.prev_n as f64 / p).to_bits();
        } else if self.bit()? {
            let xor = if self.bit()? {
                let leading = self.bits(5)? as u32;
                let len = match self.bits(6)? as u32 {
                    0 => 64,
                    l => l,
                };
                if leading + len > 64 {
                    return Err(ChunkError::Corrupt("xor window exceeds 64 bits"));
                }
                let trailing = 64 - leading - len;
                self.window = Some(Window { leading, trailing });
                self.bits(len)? << trailing
            } else {
                let win = self
                    .window
                    .ok_or(ChunkError::Corrupt("xor window reused before defined"))?;
                self.bits(64 - win.leading - win.trailing)? << win.trailing
            };
            self.prev_value ^= xor;
        }
        self.prev_delta = delta;
        self.prev_ts = ts;
        Ok((ts, f64::from_bits(self.prev_value)))
    }

    fn check_padding(&mut self) -> Result<(), ChunkError> {
        let rem = self.reader.remaining_bits();
        if rem >= 8 {
            return Err(ChunkError::Corrupt("trailing bytes after last point"));
        }
        if self.bits(rem as u32)? != 0 {
            return Err(ChunkError::Corrupt("non-zero padding bits"));
        }
        Ok(())
    }
}

impl Iterator for ChunkIter<'_> {
    type Item = Result<(i64, f64), ChunkError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.emitted == self.total {
            self.done = true;
            return self.check_padding().err().map(Err);
        }
        let point = if self.emitted == 0 {
            Ok((self.prev_ts, f64::from_bits(self.prev_value)))
        } else {
            self.decode_next()
        };
        match point {
            Ok(p) => {
                self.emitted += 1;
                Some(Ok(p))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            (0, Some(0))
        } else {
            // Plus one for a possible trailing error.
            (0, Some(self.total - self.emitted + 1))
        }
    }
}

impl std::iter::FusedIterator for ChunkIter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(points: &[(i64, f64)]) -> Vec<u8> {
        let mut enc = ChunkEncoder::new();
        for &(t, v) in points {
            enc.push(t, v);
        }
        assert_eq!(enc.len(), points.len());
        enc.finish()
    }

    fn assert_roundtrip(points: &[(i64, f64)]) -> Vec<u8> {
        let bytes = encode(points);
        let decoded = decode_chunk(&bytes).expect("decode");
        assert_eq!(decoded.len(), points.len());
        for (i, (a, b)) in points.iter().zip(&decoded).enumerate() {
            assert_eq!(a.0, b.0, "timestamp #{i}");
            assert_eq!(a.1.to_bits(), b.1.to_bits(), "value #{i}");
        }
        let via_iter: Vec<_> = ChunkIter::new(&bytes)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(via_iter.len(), points.len());
        bytes
    }

    #[test]
    fn empty_chunk() {
        let enc = ChunkEncoder::new();
        assert!(enc.is_empty());
        let bytes = enc.finish();
        assert_eq!(bytes, [MAGIC, VERSION, 0]);
        assert_eq!(decode_chunk(&bytes).unwrap(), vec![]);
    }

    #[test]
    fn single_point() {
        let bytes = assert_roundtrip(&[(1_700_000_000_000, 21.5)]);
        assert_eq!(bytes.len(), 2 + 1 + 6 + 8);
    }

    #[test]
    fn edge_values() {
        let nan_payloads = [
            f64::NAN,
            f64::from_bits(0x7FF0_0000_0000_0001), // signalling NaN
            f64::from_bits(0xFFF8_0000_DEAD_BEEF), // negative quiet NaN with payload
            f64::from_bits(0x7FFF_FFFF_FFFF_FFFF),
        ];
        let mut values = vec![
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            f64::MIN_POSITIVE / 2.0, // subnormal
            f64::from_bits(1),       // smallest subnormal
            f64::MAX,
            f64::MIN,
            f64::EPSILON,
            1.0,
            -1.0,
        ];
        values.extend(nan_payloads);
        values.extend(nan_payloads);
        values.push(-0.0);
        values.push(0.0);
        let points: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as i64 * 1000, v))
            .collect();
        assert_roundtrip(&points);
        // Also each edge value after every other one (windows differ).
        for &a in &values {
            for &b in &values {
                assert_roundtrip(&[(0, a), (1, b), (2, a), (3, a), (4, b)]);
            }
        }
    }

    #[test]
    fn out_of_order_and_duplicate_timestamps() {
        assert_roundtrip(&[
            (1000, 1.0),
            (1000, 2.0),
            (999, 3.0),
            (5000, 4.0),
            (5000, 4.0),
            (-5000, 5.0),
            (2000, 6.0),
            (2001, 6.0),
            (2001, 6.0),
        ]);
    }

    #[test]
    fn extreme_timestamps() {
        assert_roundtrip(&[
            (i64::MIN, 1.0),
            (i64::MAX, 1.0),
            (i64::MIN, 2.0),
            (i64::MIN, 2.0),
            (0, 3.0),
            (i64::MAX, 4.0),
            (i64::MAX - 1, 4.0),
            (i64::MIN + 1, 5.0),
        ]);
        assert_roundtrip(&[(i64::MAX, f64::NAN)]);
        assert_roundtrip(&[(i64::MIN, -0.0)]);
    }

    #[test]
    fn every_dod_bucket_boundary() {
        let mut points = vec![(0i64, 0.0f64)];
        let mut ts = 0i64;
        let mut delta = 0i64;
        for dod in [
            0i64, 1, -1, 63, -64, 64, -65, 255, -256, 256, -257, 2047, -2048, 2048, -2049,
        ] {
            delta += dod;
            ts += delta;
            points.push((ts, 0.0));
        }
        assert_roundtrip(&points);
    }

    #[test]
    fn regular_series_is_small() {
        let points: Vec<_> = (0..1000).map(|i| (i * 1000, 20.0)).collect();
        let bytes = assert_roundtrip(&points);
        // First delta costs 16 bits, then 2 bits per point.
        assert!(bytes.len() <= 17 + 2 + (999usize * 2).div_ceil(8));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode_chunk(&[]), Err(ChunkError::Truncated));
        assert_eq!(decode_chunk(&[0]), Err(ChunkError::BadMagic(0)));
        assert_eq!(
            decode_chunk(&[MAGIC, 9]),
            Err(ChunkError::UnsupportedVersion(9))
        );
        assert_eq!(decode_chunk(&[MAGIC, VERSION]), Err(ChunkError::Truncated));
        // Huge count with no body: rejected before allocating.
        let mut bytes = vec![MAGIC, VERSION];
        write_varint(&mut bytes, u64::MAX);
        write_varint(&mut bytes, 0);
        bytes.extend_from_slice(&[0; 8]);
        assert_eq!(decode_chunk(&bytes), Err(ChunkError::Truncated));
        // Overlong varint.
        assert!(decode_chunk(&[
            MAGIC, VERSION, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F
        ])
        .is_err());
        // Trailing bytes.
        let mut ok = encode(&[(1, 1.0), (2, 2.0)]);
        ok.push(0);
        assert!(matches!(decode_chunk(&ok), Err(ChunkError::Corrupt(_))));
        // Window reuse before definition: ts '0', value '10'.
        let mut bad = vec![MAGIC, VERSION, 2, 0];
        bad.extend_from_slice(&[0; 8]);
        bad.push(0b0100_0000);
        assert!(matches!(decode_chunk(&bad), Err(ChunkError::Corrupt(_))));
    }

    #[test]
    fn zigzag_roundtrip() {
        for v in [0, 1, -1, i64::MIN, i64::MAX, 12345, -12345] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
