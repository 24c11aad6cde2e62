//! Keys the platform signs with, other than the CA's: the firmware signing
//! key (Ed25519) whose public half devices pin to verify OTA images, and the
//! secret behind short-lived URL tokens (HMAC-SHA256: firmware downloads,
//! diagnostic uploads).
//!
//! Both are created on first start and sealed under the [`MasterKey`] like
//! the CA key, each under its own purpose, so one sealed file cannot be
//! swapped in for another:
//!
//! - `pki/firmware-signing.key.enc` (PKCS#8 Ed25519, sealed) and
//!   `pki/firmware-signing.pub` (the raw 32-byte public key, base64: what a
//!   device pins);
//! - `pki/url-token.key.enc` (32 random bytes, sealed).
//!
//! A firmware signature is Ed25519 over the image's SHA-256 digest (32
//! bytes), so a device verifies while it streams the image to flash without
//! keeping it in memory: hash as it downloads, then one signature check.

use crate::files::{create_dir, read_optional, write_atomic};
use crate::{Error, MasterKey, Result};
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use std::path::Path;

/// Purpose (associated data) of the sealed firmware signing key.
pub const PURPOSE_FIRMWARE_KEY: &str = "firmware signing key";
/// Purpose (associated data) of the sealed URL token secret.
pub const PURPOSE_URL_TOKEN_KEY: &str = "URL token key";
const FIRMWARE_KEY_FILE: &str = "firmware-signing.key.enc";
const FIRMWARE_PUB_FILE: &str = "firmware-signing.pub";
const URL_TOKEN_KEY_FILE: &str = "url-token.key.enc";

/// The platform's firmware signing key.
pub struct FirmwareSigner {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for FirmwareSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirmwareSigner")
            .field("public_key", &self.public_key_base64())
            .finish()
    }
}

impl FirmwareSigner {
    /// Load the key from `<data_dir>/pki`, creating it on first start.
    /// Returns whether it was created.
    pub fn load_or_create(data_dir: &Path, master: &MasterKey) -> Result<(FirmwareSigner, bool)> {
        let dir = data_dir.join("pki");
        let key_path = dir.join(FIRMWARE_KEY_FILE);
        if let Some(sealed) = read_optional(&key_path)? {
            let pkcs8 = master.open(PURPOSE_FIRMWARE_KEY, &sealed)?;
            let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| Error::Corrupt {
                path: key_path.clone(),
                reason: format!("not an Ed25519 PKCS#8 key: {e}"),
            })?;
            let signer = FirmwareSigner { key };
            // Rewrite the public half if it went missing: it is derived.
            let pub_path = dir.join(FIRMWARE_PUB_FILE);
            if read_optional(&pub_path)?.is_none() {
                write_atomic(&pub_path, signer.public_key_base64().as_bytes(), 0o644)?;
            }
            return Ok((signer, false));
        }
        create_dir(&dir, 0o700)?;
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| Error::Random)?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| Error::Random)?;
        write_atomic(
            &key_path,
            &master.seal(PURPOSE_FIRMWARE_KEY, pkcs8.as_ref()),
            0o600,
        )?;
        let signer = FirmwareSigner { key };
        write_atomic(
            &dir.join(FIRMWARE_PUB_FILE),
            signer.public_key_base64().as_bytes(),
            0o644,
        )?;
        tracing::info!("created the firmware signing key");
        Ok((signer, true))
    }

    /// A key that lives only in memory (tests, tools).
    pub fn ephemeral() -> Result<FirmwareSigner> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| Error::Random)?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| Error::Random)?;
        Ok(FirmwareSigner { key })
    }

    /// Sign a firmware image's SHA-256 digest.
    pub fn sign_digest(&self, sha256: &[u8; 32]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.key.sign(sha256).as_ref());
        out
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    pub fn public_key_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.public_key())
    }
}

/// Whether `signature` is a valid Ed25519 signature of `sha256` under the
/// raw 32-byte `public_key`.
pub fn verify_firmware(public_key: &[u8], sha256: &[u8; 32], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(sha256, signature)
        .is_ok()
}

/// The secret behind short-lived URL tokens, from `<data_dir>/pki`, created
/// on first start.
pub fn url_token_key(data_dir: &Path, master: &MasterKey) -> Result<[u8; 32]> {
    let dir = data_dir.join("pki");
    let path = dir.join(URL_TOKEN_KEY_FILE);
    let mut key = [0u8; 32];
    if let Some(sealed) = read_optional(&path)? {
        let bytes = master.open(PURPOSE_URL_TOKEN_KEY, &sealed)?;
        if bytes.len() != 32 {
            return Err(Error::Corrupt {
                path,
                reason: format!("holds {} bytes, not 32", bytes.len()),
            });
        }
        key.copy_from_slice(&bytes);
        return Ok(key);
    }
    create_dir(&dir, 0o700)?;
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| Error::Random)?;
    write_atomic(&path, &master.seal(PURPOSE_URL_TOKEN_KEY, &key), 0o600)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_key_survives_a_restart_and_signatures_verify_with_the_pinned_key() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::from_bytes([7; 32]);
        let (a, created) = FirmwareSigner::load_or_create(dir.path(), &master).unwrap();
        assert!(created);
        let (b, created) = FirmwareSigner::load_or_create(dir.path(), &master).unwrap();
        assert!(!created);
        assert_eq!(a.public_key(), b.public_key());
        let pinned =
            std::fs::read_to_string(dir.path().join("pki").join(FIRMWARE_PUB_FILE)).unwrap();
        let pinned = base64::engine::general_purpose::STANDARD
            .decode(pinned.trim())
            .unwrap();
        let digest = [42u8; 32];
        let sig = b.sign_digest(&digest);
        assert!(verify_firmware(&pinned, &digest, &sig));
        let mut other = digest;
        other[0] ^= 1;
        assert!(!verify_firmware(&pinned, &other, &sig));
        // Another master key cannot open it.
        let wrong = MasterKey::from_bytes([8; 32]);
        assert!(FirmwareSigner::load_or_create(dir.path(), &wrong).is_err());
    }

    #[test]
    fn the_url_token_key_is_stable_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::from_bytes([1; 32]);
        let a = url_token_key(dir.path(), &master).unwrap();
        let b = url_token_key(dir.path(), &master).unwrap();
        assert_eq!(a, b);
        let raw = std::fs::read(dir.path().join("pki").join(URL_TOKEN_KEY_FILE)).unwrap();
        assert!(!raw.windows(32).any(|w| w == a));
    }
}
