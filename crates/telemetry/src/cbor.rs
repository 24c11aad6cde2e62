//! A minimal CBOR (RFC 8949) decoder producing the crate's [`Node`] tree.
//!
//! Every declared length is checked against the bytes actually remaining
//! before anything is sliced or allocated, containers grow only as real
//! items are decoded, and nesting (arrays, maps and tags) is bounded by
//! the caller's depth limit, so hostile input costs at most linear work.

use crate::{DecodeError, Key, Node};

fn err(msg: impl Into<String>) -> DecodeError {
    DecodeError::InvalidCbor(msg.into())
}

/// Decode exactly one CBOR data item filling all of `buf`.
pub(crate) fn parse(buf: &[u8], max_depth: usize) -> Result<Node, DecodeError> {
    let mut d = Decoder {
        buf,
        pos: 0,
        max_depth,
    };
    let node = d.item(1)?;
    if d.pos != buf.len() {
        return Err(err(format!(
            "{} trailing bytes after the top-level item",
            buf.len() - d.pos
        )));
    }
    Ok(node)
}

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    max_depth: usize,
}

impl<'a> Decoder<'a> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| err("unexpected end of input"))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let remaining = self.buf.len() - self.pos;
        if n > remaining as u64 {
            return Err(err(format!(
                "length {n} exceeds the {remaining} remaining bytes"
            )));
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn uint(&mut self, n: u64) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// Initial byte plus argument; the argument is `None` for the
    /// indefinite-length marker (additional information 31).
    fn head(&mut self) -> Result<(u8, u8, Option<u64>), DecodeError> {
        let ib = self.byte()?;
        let (major, ai) = (ib >> 5, ib & 0x1f);
        let arg = match ai {
            0..=23 => Some(u64::from(ai)),
            24 => Some(self.uint(1)?),
            25 => Some(self.uint(2)?),
            26 => Some(self.uint(4)?),
            27 => Some(self.uint(8)?),
            28..=30 => return Err(err(format!("reserved additional information {ai}"))),
            _ => None,
        };
        Ok((major, ai, arg))
    }

    fn at_break(&self) -> bool {
        self.buf.get(self.pos) == Some(&0xff)
    }

    fn enter(&self, level: usize) -> Result<(), DecodeError> {
        if level > self.max_depth {
            Err(DecodeError::TooDeep)
        } else {
            Ok(())
        }
    }

    /// One data item; `level` is the nesting level a container here has.
    fn item(&mut self, level: usize) -> Result<Node, DecodeError> {
        let (major, ai, arg) = self.head()?;
        let definite = |what: &str| err(format!("indefinite length is not allowed for {what}"));
        match major {
            0 => Ok(Node::Int(i128::from(
                arg.ok_or_else(|| definite("an integer"))?,
            ))),
            1 => Ok(Node::Int(
                -1 - i128::from(arg.ok_or_else(|| definite("an integer"))?),
            )),
            2 => {
                self.string(2, arg)?;
                Ok(Node::Bytes)
            }
            3 => {
                let bytes = self.string(3, arg)?;
                String::from_utf8(bytes)
                    .map(Node::Str)
                    .map_err(|_| err("text string is not valid UTF-8"))
            }
            4 => {
                self.enter(level)?;
                let mut items = Vec::new();
                match arg {
                    Some(n) => {
                        for _ in 0..n {
                            items.push(self.item(level + 1)?);
                        }
                    }
                    None => {
                        while !self.at_break() {
                            items.push(self.item(level + 1)?);
                        }
                        self.pos += 1;
                    }
                }
                Ok(Node::Array(items))
            }
            5 => {
                self.enter(level)?;
                let mut entries = Vec::new();
                match arg {
                    Some(n) => {
                        for _ in 0..n {
                            entries.push(self.entry(level + 1)?);
                        }
                    }
                    None => {
                        while !self.at_break() {
                            entries.push(self.entry(level + 1)?);
                        }
                        self.pos += 1;
                    }
                }
                Ok(Node::Map(entries))
            }
            6 => {
                let tag = arg.ok_or_else(|| definite("a tag"))?;
                self.enter(level)?;
                let inner = self.item(level + 1)?;
                if tag != 1 {
                    return Ok(inner);
                }
                match inner {
                    Node::Int(i) => Ok(Node::Time(i as f64)),
                    Node::Num(f) => Ok(Node::Time(f)),
                    _ => Err(err("tag 1 (epoch time) must wrap a number")),
                }
            }
            _ => match (ai, arg) {
                (20, _) => Ok(Node::Bool(false)),
                (21, _) => Ok(Node::Bool(true)),
                (22, _) | (23, _) => Ok(Node::Null),
                (25, Some(h)) => Ok(Node::Num(f16_to_f64(h as u16))),
                (26, Some(f)) => Ok(Node::Num(f64::from(f32::from_bits(f as u32)))),
                (27, Some(f)) => Ok(Node::Num(f64::from_bits(f))),
                (31, _) => Err(err("unexpected break")),
                _ => Err(err(format!(
                    "unsupported simple value {}",
                    arg.unwrap_or(0)
                ))),
            },
        }
    }

    fn entry(&mut self, level: usize) -> Result<(Key, Node), DecodeError> {
        let key = match self.item(level)? {
            Node::Str(s) => Key::Text(s),
            Node::Int(i) => Key::Int(i),
            _ => return Err(err("map key must be a text string or an integer")),
        };
        Ok((key, self.item(level)?))
    }

    /// Byte (`major` 2) or text (`major` 3) string contents. Indefinite
    /// strings are a sequence of definite chunks of the same major type;
    /// each text chunk must be valid UTF-8 on its own (RFC 8949 §3.2.3).
    fn string(&mut self, major: u8, arg: Option<u64>) -> Result<Vec<u8>, DecodeError> {
        let check = |chunk: &[u8]| {
            if major == 3 && std::str::from_utf8(chunk).is_err() {
                Err(err("text string is not valid UTF-8"))
            } else {
                Ok(())
            }
        };
        if let Some(n) = arg {
            let s = self.take(n)?;
            check(s)?;
            return Ok(if major == 3 { s.to_vec() } else { Vec::new() });
        }
        let mut out = Vec::new();
        loop {
            if self.at_break() {
                self.pos += 1;
                return Ok(out);
            }
            let (m, _, a) = self.head()?;
            if m != major {
                return Err(err("indefinite-length string chunk of the wrong type"));
            }
            let n = a.ok_or_else(|| err("nested indefinite-length string"))?;
            let chunk = self.take(n)?;
            check(chunk)?;
            if major == 3 {
                out.extend_from_slice(chunk);
            }
        }
    }
}

/// IEEE 754 binary16 to f64 (RFC 8949 Appendix D).
fn f16_to_f64(h: u16) -> f64 {
    let exp = i32::from((h >> 10) & 0x1f);
    let mant = f64::from(h & 0x3ff);
    let val = match exp {
        0 => mant * 2f64.powi(-24),
        31 if mant == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (mant + 1024.0) * 2f64.powi(exp - 25),
    };
    if h & 0x8000 != 0 {
        -val
    } else {
        val
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(b: &[u8]) -> Result<Node, DecodeError> {
        parse(b, 16)
    }

    #[test]
    fn integers() {
        assert_eq!(p(&[0x17]), Ok(Node::Int(23)));
        assert_eq!(p(&[0x18, 0x64]), Ok(Node::Int(100)));
        assert_eq!(p(&[0x39, 0x03, 0xe7]), Ok(Node::Int(-1000)));
        assert_eq!(
            p(&[0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Ok(Node::Int(-18446744073709551616))
        );
    }

    #[test]
    fn floats() {
        assert_eq!(p(&[0xf9, 0x3c, 0x00]), Ok(Node::Num(1.0)));
        assert_eq!(p(&[0xf9, 0x00, 0x01]), Ok(Node::Num(5.960464477539063e-8)));
        assert_eq!(p(&[0xf9, 0xc4, 0x00]), Ok(Node::Num(-4.0)));
        assert_eq!(p(&[0xf9, 0x7c, 0x00]), Ok(Node::Num(f64::INFINITY)));
        assert!(matches!(p(&[0xf9, 0x7e, 0x00]), Ok(Node::Num(f)) if f.is_nan()));
        assert_eq!(p(&[0xfa, 0x47, 0xc3, 0x50, 0x00]), Ok(Node::Num(100000.0)));
        assert_eq!(
            p(&[0xfb, 0x3f, 0xf1, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a]),
            Ok(Node::Num(1.1))
        );
    }

    #[test]
    fn strings_and_simple() {
        assert_eq!(p(&[0x62, b'h', b'i']), Ok(Node::Str("hi".into())));
        // (_ "strea", "ming")
        let b = [
            0x7f, 0x65, b's', b't', b'r', b'e', b'a', 0x64, b'm', b'i', b'n', b'g', 0xff,
        ];
        assert_eq!(p(&b), Ok(Node::Str("streaming".into())));
        assert_eq!(p(&[0x5f, 0x42, 1, 2, 0xff]), Ok(Node::Bytes));
        assert_eq!(p(&[0xf4]), Ok(Node::Bool(false)));
        assert_eq!(p(&[0xf5]), Ok(Node::Bool(true)));
        assert_eq!(p(&[0xf6]), Ok(Node::Null));
        assert!(p(&[0x7f, 0x41, 0x00, 0xff]).is_err(), "mixed chunk types");
        assert!(p(&[0x62, 0xff, 0xfe]).is_err(), "bad UTF-8");
    }

    #[test]
    fn containers_and_tags() {
        // {_ "a": [_ 1, 2], 5: true}
        let b = [0xbf, 0x61, b'a', 0x9f, 0x01, 0x02, 0xff, 0x05, 0xf5, 0xff];
        assert_eq!(
            p(&b),
            Ok(Node::Map(vec![
                (
                    Key::Text("a".into()),
                    Node::Array(vec![Node::Int(1), Node::Int(2)])
                ),
                (Key::Int(5), Node::Bool(true)),
            ]))
        );
        assert_eq!(
            p(&[0xc1, 0x1a, 0x51, 0x4b, 0x67, 0xb0]),
            Ok(Node::Time(1363896240.0))
        );
        // Tag 2 (bignum) is ignored: the byte string is returned.
        assert_eq!(p(&[0xc2, 0x41, 0x01]), Ok(Node::Bytes));
    }

    #[test]
    fn hostile_input() {
        // Declared lengths far beyond the input allocate nothing and fail.
        assert!(p(&[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(p(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(p(&[0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(p(&[0x81; 100_000]), Err(DecodeError::TooDeep));
        assert_eq!(p(&[0xc6; 100_000]), Err(DecodeError::TooDeep));
        assert!(p(&[0xff]).is_err());
        assert!(p(&[0x1c]).is_err());
        assert!(p(&[0x01, 0x02]).is_err(), "trailing bytes");
        assert!(p(&[0x9f, 0x01]).is_err(), "unterminated");
        assert!(p(&[0xa1, 0x80, 0x01]).is_err(), "array key");
    }
}
