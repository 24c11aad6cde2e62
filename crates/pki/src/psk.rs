//! DTLS pre-shared keys, sealed at rest under the master key.
//!
//! A PSK handshake needs the key itself, so the registry cannot store a
//! hash: it stores what [`PskKeys::seal`] returns and the DTLS server opens
//! it per handshake with [`PskKeys::open`]. The device id is part of the
//! associated data, so a sealed key copied to another device's row (by
//! someone who can write the database but lacks the master key) does not
//! open: nobody can make their own device's key authenticate another one.

use std::fmt;
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, MasterKey, Result};

/// Associated data (purpose) under which PSKs are sealed; the device id
/// follows it.
pub const PURPOSE_DTLS_PSK: &str = "DTLS PSK";
/// Length of the keys [`PskKeys::generate`] makes: 128 bits, what the
/// CoAP PSK cipher suites (TLS_PSK_WITH_AES_128_CCM_8) use as their key
/// strength.
pub const PSK_LEN: usize = 16;

/// Seals and opens device PSKs. Cheap to clone (shares the master key).
///
/// `Debug` prints nothing of the key.
#[derive(Clone)]
pub struct PskKeys {
    master: Arc<MasterKey>,
}

impl fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PskKeys(<redacted>)")
    }
}

fn purpose(device_id: &str) -> String {
    format!("{PURPOSE_DTLS_PSK} of device {device_id}")
}

impl PskKeys {
    pub fn new(master: MasterKey) -> PskKeys {
        PskKeys {
            master: Arc::new(master),
        }
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Result<[u8; PSK_LEN]> {
        let mut key = [0u8; PSK_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| Error::Random)?;
        Ok(key)
    }

    /// Seal `key` for `device_id` (what the registry stores).
    pub fn seal(&self, device_id: &str, key: &[u8]) -> Vec<u8> {
        self.master.seal(&purpose(device_id), key)
    }

    /// Open a key sealed for `device_id`. Fails with
    /// [`Error::WrongMasterKey`] for another master key, another device or a
    /// modified blob, and [`Error::NotSealed`] for something else entirely.
    pub fn open(&self, device_id: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        self.master.open(&purpose(device_id), sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_bound_to_the_device() {
        let keys = PskKeys::new(MasterKey::generate().expect("master"));
        let key = PskKeys::generate().expect("key");
        assert_ne!(key, PskKeys::generate().expect("another key"));
        let sealed = keys.seal("d1", &key);
        assert!(!sealed.windows(PSK_LEN).any(|w| w == key), "encrypted");
        assert_eq!(keys.open("d1", &sealed).expect("open"), key);
        assert!(matches!(
            keys.open("d2", &sealed),
            Err(Error::WrongMasterKey { .. })
        ));
        let other = PskKeys::new(MasterKey::generate().expect("master"));
        assert!(matches!(
            other.open("d1", &sealed),
            Err(Error::WrongMasterKey { .. })
        ));
        assert!(matches!(keys.open("d1", b"junk"), Err(Error::NotSealed(_))));
        assert_eq!(format!("{keys:?}"), "PskKeys(<redacted>)");
    }
}
