//! Randomness, hashing and encodings shared by every kind of secret the
//! registry hands out (device tokens, claim tokens, API tokens, ids).
//!
//! Why SHA-256 and not Argon2 for these secrets: they are 256 bits of OS
//! randomness, so a brute-force or dictionary attack on a stolen hash is
//! hopeless whatever the hash costs; a memory-hard hash would only make a
//! reconnect storm of thousands of devices expensive for us.

use ring::rand::{SecureRandom, SystemRandom};

/// Fill a buffer from the OS CSPRNG.
///
/// `SystemRandom` fails only when the OS has no entropy source at all; there
/// is no safe way to issue credentials then, so this is the one place that
/// panics instead of returning an error.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    #[allow(clippy::expect_used)]
    SystemRandom::new()
        .fill(&mut buf)
        .expect("the operating system's random number generator failed");
    buf
}

/// A new secret: `prefix` followed by 32 random bytes in unpadded base64url
/// (43 characters).
pub(crate) fn new_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = random_bytes();
    let mut s = String::with_capacity(prefix.len() + 43);
    s.push_str(prefix);
    s.push_str(&base64url(&bytes));
    s
}

/// A new id: `prefix-` followed by 12 random hex digits (48 bits: collisions
/// are checked by the caller anyway).
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 6] = random_bytes();
    format!("{prefix}-{}", hex(&bytes))
}

/// A random password of `len` characters from `[A-Za-z0-9]`, unbiased
/// (rejection sampling).
pub(crate) fn random_password(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let buf: [u8; 32] = random_bytes();
        for b in buf {
            // 248 = 4 * 62: values above would favour the first characters.
            if b < 248 && out.len() < len {
                out.push(char::from(ALPHABET[usize::from(b) % 62]));
            }
        }
    }
    out
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Constant-time equality, so response timing reveals nothing about how
/// much of a guessed secret was right.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

/// Decode hex of any even length (stored sealed keys).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// Decode exactly 32 bytes of hex (stored hashes and fingerprints).
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Unpadded base64url (RFC 4648 section 5): safe in MQTT passwords, HTTP
/// headers and shell command lines alike.
pub(crate) fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let idx = (n >> (18 - 6 * i)) & 63;
            out.push(char::from(ALPHABET[idx as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn secrets_have_the_documented_shape() {
        let s = new_secret("m2m_");
        assert_eq!(s.len(), 4 + 43);
        assert!(s[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(s, new_secret("m2m_"));
        let id = new_id("dev");
        assert_eq!(id.len(), 16);
        let pw = random_password(20);
        assert_eq!(pw.len(), 20);
        assert!(pw.bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn hex_round_trip_and_ct_eq() {
        let h = sha256(b"abc");
        assert_eq!(
            hex(&h),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(unhex32(&hex(&h)), Some(h));
        assert_eq!(unhex32("zz"), None);
        assert_eq!(unhex(&hex(b"\x00\x7f\xff")), Some(vec![0, 0x7f, 0xff]));
        assert_eq!(unhex(""), Some(vec![]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
