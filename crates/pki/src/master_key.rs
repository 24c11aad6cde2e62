//! The master key that seals private keys at rest.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::files::{create_dir, io_err};
use crate::{Error, Result};

/// Environment variable the binary reads the master key from.
pub const MASTER_KEY_ENV: &str = "M2MHUB_MASTER_KEY";
/// Name of the key file under the data directory used when the environment
/// variable is not set.
pub const MASTER_KEY_FILE: &str = "master.key";

/// Leading bytes of every sealed blob. The version digit lets a later format
/// (another cipher, a key-derivation step) be told apart from this one.
const MAGIC: &[u8; 8] = b"M2MKEY1\n";
const TAG_LEN: usize = 16;

/// A 32-byte AES-256-GCM key that seals the CA and server private keys.
///
/// `Debug` does not print the key, so the key cannot leak into logs through
/// a `{:?}` of a struct that holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey([u8; 32]);

/// Where [`MasterKey::load_or_create`] found the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// From the value passed in (the `M2MHUB_MASTER_KEY` environment variable).
    Env,
    /// From `<data_dir>/master.key`; `created` is true when this call
    /// generated the file (first start), which the caller should log loudly:
    /// the file must be kept (and backed up) with the data directory.
    File { created: bool },
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Wraps raw key bytes (for callers with their own key source).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Generates a fresh random key.
    pub fn generate() -> Result<Self> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::Random)?;
        Ok(Self(bytes))
    }

    /// Parses a key written as 64 hex characters or as base64 (standard or
    /// URL-safe alphabet, padding optional) of exactly 32 bytes. Surrounding
    /// whitespace is ignored so a key file ending in a newline, or a value
    /// pasted with a trailing space, still works.
    pub fn from_text(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::InvalidMasterKey("the value is empty"));
        }
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut out = [0u8; 32];
            for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
                out[i] = (hex_val(pair[0]) << 4) | hex_val(pair[1]);
            }
            return Ok(Self(out));
        }
        let decoded = decode_base64(s).ok_or(Error::InvalidMasterKey(
            "expected 64 hex characters or base64 of 32 bytes",
        ))?;
        let bytes: [u8; 32] = decoded.try_into().map_err(|_| {
            Error::InvalidMasterKey("the base64 value does not decode to exactly 32 bytes")
        })?;
        Ok(Self(bytes))
    }

    /// The key as 64 lowercase hex characters (the key file's format).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Finds the master key: `env_value` when given (and non-empty), else
    /// `<dir>/master.key`, which is created with mode 0600 holding a random key
    /// when absent. The environment wins so an operator can keep the key out of
    /// the data directory entirely.
    pub fn load_or_create(dir: &Path, env_value: Option<&str>) -> Result<(Self, KeySource)> {
        if let Some(value) = env_value.filter(|v| !v.trim().is_empty()) {
            return Ok((Self::from_text(value)?, KeySource::Env));
        }
        let path = dir.join(MASTER_KEY_FILE);
        if let Some(key) = Self::read_file(&path)? {
            return Ok((key, KeySource::File { created: false }));
        }
        create_dir(dir, 0o700)?;
        let key = Self::generate()?;
        let mut options = fs::OpenOptions::new();
        // create_new: if another process created the file since we looked, use
        // theirs rather than overwrite a key that may already seal something.
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        match options.open(&path) {
            Ok(mut file) => {
                file.write_all(format!("{}\n", key.to_hex()).as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(&path))?;
                crate::files::sync_dir(dir);
                tracing::info!(path = %path.display(), "created a new master key");
                Ok((key, KeySource::File { created: true }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let key = Self::read_file(&path)?.ok_or_else(|| Error::Corrupt {
                    path: path.clone(),
                    reason: "the key file vanished while it was being created".into(),
                })?;
                Ok((key, KeySource::File { created: false }))
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn read_file(path: &Path) -> Result<Option<Self>> {
        let Some(bytes) = crate::files::read_optional(path)? else {
            return Ok(None);
        };
        let text = String::from_utf8(bytes).map_err(|_| Error::Corrupt {
            path: path.to_path_buf(),
            reason: "the master key file is not text".into(),
        })?;
        let key = Self::from_text(&text).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        #[cfg(unix)]
        if let Some(mode) = crate::files::mode_of(path) {
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "the master key file is readable by other users; chmod 600 it"
                );
            }
        }
        Ok(Some(key))
    }

    fn aead_key(&self) -> LessSafeKey {
        // A 32-byte key is always valid for AES-256-GCM, so this cannot fail.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("32-byte AES-256 key"))
    }

    /// Encrypts `plaintext` with AES-256-GCM under a random 96-bit nonce, with
    /// `purpose` as associated data: a blob sealed for one purpose does not open
    /// for another, so files cannot be swapped.
    ///
    /// Random nonces are safe here because a master key seals a handful of
    /// files plus one blob per device PSK issued or rotated: even a large
    /// fleet rotating often stays far below the 2^32 messages where nonce
    /// collisions matter.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails, which on the
    /// supported platforms does not happen once the system has booted.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random number generator failed");
        let mut buf = plaintext.to_vec();
        self.aead_key()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM sealing of an in-memory buffer");
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + buf.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out
    }

    /// Decrypts a blob made by [`seal`](Self::seal) with the same `purpose`.
    /// A wrong key, a wrong purpose or a modified blob all give
    /// [`Error::WrongMasterKey`].
    pub fn open(&self, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let rest = sealed
            .strip_prefix(MAGIC.as_slice())
            .ok_or(Error::NotSealed("missing M2MKEY1 header"))?;
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(Error::NotSealed("truncated"));
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| Error::NotSealed("bad nonce"))?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .aead_key()
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut buf)
            .map_err(|_| Error::WrongMasterKey {
                purpose: purpose.to_string(),
            })?;
        Ok(plain.to_vec())
    }
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip() {
        let key = MasterKey::generate().unwrap();
        let sealed = key.seal("CA key", b"secret");
        assert!(sealed.starts_with(b"M2MKEY1\n"));
        assert_eq!(sealed.len(), 8 + 12 + 6 + 16);
        assert_eq!(key.open("CA key", &sealed).unwrap(), b"secret");
        // Random nonces: sealing twice gives different blobs.
        assert_ne!(sealed, key.seal("CA key", b"secret"));
    }

    #[test]
    fn wrong_key_tamper_and_purpose_are_rejected_clearly() {
        let key = MasterKey::generate().unwrap();
        let other = MasterKey::generate().unwrap();
        let sealed = key.seal("CA key", b"secret");
        let err = other.open("CA key", &sealed).unwrap_err();
        assert!(matches!(err, Error::WrongMasterKey { .. }));
        assert!(err.to_string().starts_with(
            "the master key does not decrypt the CA key: set M2MHUB_MASTER_KEY to the key used \
             when the data directory was created"
        ));
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            key.open("CA key", &tampered),
            Err(Error::WrongMasterKey { .. })
        ));
        let mut tampered = sealed.clone();
        tampered[25] ^= 0x80;
        assert!(matches!(
            key.open("CA key", &tampered),
            Err(Error::WrongMasterKey { .. })
        ));
        assert!(matches!(
            key.open("TLS server key", &sealed),
            Err(Error::WrongMasterKey { .. })
        ));
        assert!(matches!(
            key.open("CA key", b"M2MKEY1\nshort"),
            Err(Error::NotSealed(_))
        ));
        assert!(matches!(
            key.open("CA key", b"garbage garbage garbage garbage"),
            Err(Error::NotSealed(_))
        ));
    }

    #[test]
    fn from_text_accepts_hex_and_base64() {
        let key = MasterKey::generate().unwrap();
        let hex = key.to_hex();
        assert_eq!(MasterKey::from_text(&hex).unwrap(), key);
        assert_eq!(
            MasterKey::from_text(&format!("  {}\n", hex.to_uppercase())).unwrap(),
            key
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.0);
        assert_eq!(MasterKey::from_text(&b64).unwrap(), key);
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.0);
        assert_eq!(MasterKey::from_text(&b64url).unwrap(), key);
        for bad in [
            "",
            "abc",
            &hex[..62],
            "zz",
            &base64::engine::general_purpose::STANDARD.encode([1u8; 31]),
        ] {
            assert!(
                matches!(MasterKey::from_text(bad), Err(Error::InvalidMasterKey(_))),
                "{bad}"
            );
        }
        assert!(!format!("{key:?}").contains(&hex[..8]));
    }

    #[test]
    fn key_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (k1, src1) = MasterKey::load_or_create(&data, None).unwrap();
        assert_eq!(src1, KeySource::File { created: true });
        #[cfg(unix)]
        assert_eq!(
            crate::files::mode_of(&data.join(MASTER_KEY_FILE)),
            Some(0o600)
        );
        let (k2, src2) = MasterKey::load_or_create(&data, Some("")).unwrap();
        assert_eq!(src2, KeySource::File { created: false });
        assert_eq!(k1, k2);
        let text = std::fs::read_to_string(data.join(MASTER_KEY_FILE)).unwrap();
        assert_eq!(text.trim(), k1.to_hex());

        let env = MasterKey::generate().unwrap();
        let (k3, src3) = MasterKey::load_or_create(&data, Some(&env.to_hex())).unwrap();
        assert_eq!((k3, src3), (env, KeySource::Env));
        assert!(MasterKey::load_or_create(&data, Some("not a key")).is_err());

        std::fs::write(data.join(MASTER_KEY_FILE), "junk\n").unwrap();
        assert!(matches!(
            MasterKey::load_or_create(&data, None),
            Err(Error::Corrupt { .. })
        ));
    }
}
