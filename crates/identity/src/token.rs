//! Device token credentials: `m2m_` + 32 random bytes (base64url), shown
//! once, stored as SHA-256. Not Argon2: the secret is 256 bits of OS
//! randomness, so a stolen hash cannot be brute-forced whatever the hash
//! costs, while a memory-hard hash would make a reconnect storm of thousands
//! of devices expensive for us.
//!
//! A device may hold at most two *active* tokens (not revoked, not expired):
//! one in use and its successor during a rollover. The rollover is: issue a
//! new token, deliver it, then expire or revoke the old one.

use crate::device::Device;
use crate::error::{RegistryError, Result};
use crate::{now_ms, secret, Registry};
use serde::{Deserialize, Serialize};

/// The prefix of device token secrets (recognisable in leaks and scanners).
pub const TOKEN_PREFIX: &str = "m2m_";
/// How many active tokens a device may hold at once.
pub const MAX_ACTIVE_TOKENS: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub device_id: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked: bool,
}

impl TokenInfo {
    pub fn is_active(&self, now_ms: i64) -> bool {
        !self.revoked && self.expires_ms.is_none_or(|e| now_ms < e)
    }
}

/// A token as stored: its metadata and the SHA-256 of the secret.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub info: TokenInfo,
    pub hash: [u8; 32],
}

/// The outcome of checking a device's token on CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    Valid(Device),
    UnknownDevice,
    /// The secret was right but the device is disabled.
    Disabled,
    /// No unrevoked token of this device has this secret.
    BadSecret,
    /// The secret belongs to a token that has expired.
    Expired,
}

impl Registry {
    /// Issue a new token; the secret is returned once and never stored.
    pub fn issue_token(
        &self,
        device_id: &str,
        expires_ms: Option<i64>,
    ) -> Result<(TokenInfo, String)> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let now = now_ms();
        if let Some(e) = expires_ms {
            if e <= now {
                return Err(RegistryError::Validation(
                    "token expiry must be in the future".into(),
                ));
            }
        }
        let id = {
            let st = s.state.read();
            if !st.devices.contains_key(device_id) {
                return Err(RegistryError::NotFound(format!("device {device_id}")));
            }
            let tokens = st.tokens.get(device_id);
            let active = tokens
                .map(|ts| ts.iter().filter(|t| t.info.is_active(now)).count())
                .unwrap_or(0);
            if active >= MAX_ACTIVE_TOKENS {
                return Err(RegistryError::Conflict(format!(
                    "device {device_id} already has {active} active tokens; revoke or expire one first"
                )));
            }
            loop {
                let id = secret::new_id("tok");
                if !tokens.is_some_and(|ts| ts.iter().any(|t| t.info.id == id)) {
                    break id;
                }
            }
        };
        let secret = secret::new_secret(TOKEN_PREFIX);
        let rec = TokenRecord {
            info: TokenInfo {
                id,
                device_id: device_id.into(),
                created_ms: now,
                expires_ms,
                revoked: false,
            },
            hash: secret::sha256(secret.as_bytes()),
        };
        s.store.insert_token(&rec)?;
        let info = rec.info.clone();
        s.state
            .write()
            .tokens
            .entry(device_id.into())
            .or_default()
            .push(rec);
        Ok((info, secret))
    }

    /// All tokens of a device, oldest first, revoked and expired included.
    pub fn list_tokens(&self, device_id: &str) -> Result<Vec<TokenInfo>> {
        let st = self.shared.state.read();
        if !st.devices.contains_key(device_id) {
            return Err(RegistryError::NotFound(format!("device {device_id}")));
        }
        Ok(st
            .tokens
            .get(device_id)
            .map(|ts| ts.iter().map(|t| t.info.clone()).collect())
            .unwrap_or_default())
    }

    fn modify_token(
        &self,
        device_id: &str,
        token_id: &str,
        f: impl FnOnce(&mut TokenInfo),
    ) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut info = s
            .state
            .read()
            .tokens
            .get(device_id)
            .and_then(|ts| ts.iter().find(|t| t.info.id == token_id))
            .map(|t| t.info.clone())
            .ok_or_else(|| {
                RegistryError::NotFound(format!("token {token_id} of device {device_id}"))
            })?;
        f(&mut info);
        s.store.update_token(&info)?;
        let mut st = s.state.write();
        if let Some(t) = st
            .tokens
            .get_mut(device_id)
            .and_then(|ts| ts.iter_mut().find(|t| t.info.id == token_id))
        {
            t.info = info;
        }
        Ok(())
    }

    /// Revoke a token at once (idempotent).
    pub fn revoke_token(&self, device_id: &str, token_id: &str) -> Result<()> {
        self.modify_token(device_id, token_id, |t| t.revoked = true)
    }

    /// Let a token expire at `at_ms` (the second half of a rollover: give
    /// the device time to switch to its new token).
    pub fn expire_token(&self, device_id: &str, token_id: &str, at_ms: i64) -> Result<()> {
        self.modify_token(device_id, token_id, |t| t.expires_ms = Some(at_ms))
    }

    /// Check a CONNECT's token. In memory only: one SHA-256 and a
    /// constant-time comparison per stored token of the device.
    pub fn verify_device_token(&self, device_id: &str, secret: &[u8], now_ms: i64) -> TokenCheck {
        let hash = secret::sha256(secret);
        let st = self.shared.state.read();
        let Some(device) = st.devices.get(device_id) else {
            return TokenCheck::UnknownDevice;
        };
        let mut found = None;
        for t in st
            .tokens
            .get(device_id)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            // Compare against every token (no early exit) so timing does not
            // reveal which one matched.
            if secret::ct_eq(&t.hash, &hash) && !t.info.revoked {
                found = Some(t);
            }
        }
        let Some(t) = found else {
            return TokenCheck::BadSecret;
        };
        if t.info.expires_ms.is_some_and(|e| now_ms >= e) {
            return TokenCheck::Expired;
        }
        if !device.enabled {
            return TokenCheck::Disabled;
        }
        TokenCheck::Valid(device.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;
    use crate::NewDevice;

    fn device(reg: &Registry, id: &str) {
        reg.create_device(NewDevice {
            id: Some(id.into()),
            ..Default::default()
        })
        .expect("device");
    }

    #[test]
    fn issue_verify_rotate() {
        let (_d, reg) = open();
        device(&reg, "d1");
        device(&reg, "d2");
        let now = now_ms();
        let (t1, s1) = reg.issue_token("d1", None).expect("issue");
        assert!(s1.starts_with("m2m_") && s1.len() == 47);
        assert!(
            matches!(reg.verify_device_token("d1", s1.as_bytes(), now), TokenCheck::Valid(d) if d.id == "d1")
        );
        assert_eq!(
            reg.verify_device_token("d2", s1.as_bytes(), now),
            TokenCheck::BadSecret
        );
        assert_eq!(
            reg.verify_device_token("d9", s1.as_bytes(), now),
            TokenCheck::UnknownDevice
        );
        assert_eq!(
            reg.verify_device_token("d1", b"m2m_wrong", now),
            TokenCheck::BadSecret
        );

        // Rollover: a second token is fine, a third is a conflict.
        let (t2, s2) = reg
            .issue_token("d1", Some(now + 3_600_000))
            .expect("second");
        assert!(matches!(
            reg.issue_token("d1", None),
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            reg.verify_device_token("d1", s2.as_bytes(), now),
            TokenCheck::Valid(_)
        ));
        assert_eq!(
            reg.verify_device_token("d1", s2.as_bytes(), now + 3_600_000),
            TokenCheck::Expired
        );

        // Expire the old one: it stops working then, and frees a slot.
        reg.expire_token("d1", &t1.id, now + 1000).expect("expire");
        assert!(matches!(
            reg.verify_device_token("d1", s1.as_bytes(), now),
            TokenCheck::Valid(_)
        ));
        assert_eq!(
            reg.verify_device_token("d1", s1.as_bytes(), now + 1000),
            TokenCheck::Expired
        );
        reg.expire_token("d1", &t1.id, now - 1).expect("expire now");
        let (_t3, s3) = reg.issue_token("d1", None).expect("slot freed");

        // Revoke: a revoked token is a bad secret, not a hint.
        reg.revoke_token("d1", &t2.id).expect("revoke");
        assert_eq!(
            reg.verify_device_token("d1", s2.as_bytes(), now),
            TokenCheck::BadSecret
        );
        assert!(matches!(
            reg.revoke_token("d1", "tok-nope"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.revoke_token("d2", &t2.id),
            Err(RegistryError::NotFound(_))
        ));
        assert_eq!(reg.list_tokens("d1").expect("list").len(), 3);

        // Disabled devices: the right secret says Disabled, a wrong one BadSecret.
        reg.set_device_enabled("d1", false).expect("disable");
        assert_eq!(
            reg.verify_device_token("d1", s3.as_bytes(), now),
            TokenCheck::Disabled
        );
        assert_eq!(
            reg.verify_device_token("d1", b"x", now),
            TokenCheck::BadSecret
        );

        // Deleting the device deletes its tokens.
        reg.delete_device("d1").expect("delete");
        device(&reg, "d1");
        assert_eq!(
            reg.verify_device_token("d1", s3.as_bytes(), now),
            TokenCheck::BadSecret
        );
        assert!(reg.list_tokens("d1").expect("list").is_empty());
        assert!(matches!(
            reg.issue_token("d1", Some(now - 5)),
            Err(RegistryError::Validation(_))
        ));
    }

    #[test]
    fn tokens_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tok, secret) = {
            let reg = Registry::open(dir.path()).expect("open");
            device(&reg, "d1");
            reg.issue_token("d1", None).expect("issue")
        };
        let reg = Registry::open(dir.path()).expect("reopen");
        assert!(matches!(
            reg.verify_device_token("d1", secret.as_bytes(), now_ms()),
            TokenCheck::Valid(_)
        ));
        reg.revoke_token("d1", &tok.id).expect("revoke");
        drop(reg);
        let reg = Registry::open(dir.path()).expect("reopen");
        assert_eq!(
            reg.verify_device_token("d1", secret.as_bytes(), now_ms()),
            TokenCheck::BadSecret
        );
    }
}
