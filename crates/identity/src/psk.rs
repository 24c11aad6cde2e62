//! DTLS pre-shared keys (PSK) for CoAPS devices.
//!
//! A DTLS 1.2 PSK handshake names the key by an *identity* the device sends
//! in clear, and the server must then *use* the key: so, unlike token
//! secrets, the key cannot be stored hashed. It is stored sealed (encrypted
//! under the platform master key). This crate never sees the plain key nor
//! the master key: the caller seals before [`Registry::create_psk`] and
//! opens what [`Registry::psk_lookup`] returns (see `m2mhub_pki::PskKeys`),
//! so identity stays independent of the PKI.
//!
//! An identity is unique platform-wide among the PSKs that are not revoked
//! (the handshake carries nothing else to tell two devices apart), and by
//! default it is the device id. Revoked PSKs stay listed, like revoked
//! tokens, so the history of a device's credentials can be read back.
//!
//! A rotation is a new credential under the same identity: the new key gets
//! a new id and the old record is revoked (`replaced_by` names its
//! successor). So a live DTLS session holds the id of the PSK it was
//! established with, and [`Registry::psk_still_valid`] answers false the
//! moment that PSK is revoked, rotated or expired, or its device disabled
//! or deleted.

use crate::device::Device;
use crate::error::{RegistryError, Result};
use crate::{now_ms, secret, Registry, State};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// The prefix of PSK credential ids.
pub const PSK_ID_PREFIX: &str = "psk";
/// The longest PSK identity accepted. RFC 4279 allows 65535 bytes; 128 is
/// plenty for an id and keeps the platform-wide index small.
pub const MAX_IDENTITY_LEN: usize = 128;
/// The longest sealed key accepted: a sealed 16- or 32-byte key is about
/// 70 bytes; anything much larger is not a sealed PSK.
pub const MAX_SEALED_KEY_LEN: usize = 1024;

/// A PSK credential as listed: everything but the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PskInfo {
    pub id: String,
    pub device_id: String,
    /// What the device sends as `psk_identity` in the DTLS handshake.
    pub identity: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked: bool,
    /// For a PSK revoked by a rotation: the id of its successor.
    pub replaced_by: Option<String>,
    /// The last successful handshake, as reported by the DTLS server
    /// (persisted lazily, like a device's last-seen time).
    pub last_used_ms: Option<i64>,
}

impl PskInfo {
    pub fn is_active(&self, now_ms: i64) -> bool {
        !self.revoked && self.expires_ms.is_none_or(|e| now_ms < e)
    }
}

/// A PSK sealed under the master key, as the caller's sealer produced it.
/// Shared, not copied, between the cache and every handshake that looks it
/// up; `Debug` prints only its length, so it cannot end up in a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKey(Arc<[u8]>);

impl SealedKey {
    pub fn new(bytes: Vec<u8>) -> SealedKey {
        SealedKey(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SealedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedKey(<{} bytes>)", self.0.len())
    }
}

/// A PSK as stored: its metadata and the sealed key.
#[derive(Debug, Clone)]
pub struct PskRecord {
    pub info: PskInfo,
    pub sealed_key: SealedKey,
}

/// The outcome of looking up the identity a DTLS client sent.
// `Valid` is much larger than the rest, but this is a return value, never
// stored in bulk: boxing it would only add an allocation per handshake.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PskCheck {
    /// Finish the handshake with this key (open `sealed_key` first); keep
    /// `psk_id` to ask [`Registry::psk_still_valid`] during the session.
    Valid {
        device: Device,
        psk_id: String,
        sealed_key: SealedKey,
    },
    /// No PSK, live or revoked, has this identity.
    Unknown,
    /// The identity's PSK was revoked (or rotated away) and none replaced it.
    Revoked,
    Expired,
    /// The PSK is fine but its device is disabled.
    Disabled,
}

/// Who holds an identity, in the cache the handshake reads.
#[derive(Debug, Clone)]
pub(crate) enum Holder {
    /// The one PSK with this identity that is not revoked.
    Active(String),
    /// Only revoked PSKs of this device have had it (so a lookup answers
    /// `Revoked`, not `Unknown`, which tells an operator more).
    Revoked { device_id: String },
}

/// The in-memory PSK tables, kept in step by the methods below.
#[derive(Default)]
pub(crate) struct PskTables {
    /// PSK id → record.
    pub by_id: std::collections::HashMap<String, PskRecord>,
    /// Device id → its PSK ids, oldest first.
    pub by_device: std::collections::HashMap<String, Vec<String>>,
    /// Identity → who holds it.
    pub by_identity: std::collections::HashMap<String, Holder>,
}

impl PskTables {
    pub(crate) fn insert(&mut self, rec: PskRecord) {
        let holder = if rec.info.revoked {
            Holder::Revoked {
                device_id: rec.info.device_id.clone(),
            }
        } else {
            Holder::Active(rec.info.id.clone())
        };
        // A revoked record (loaded after the active one with the same
        // identity) must not hide it; an active one always takes over.
        let hides_active = rec.info.revoked
            && matches!(
                self.by_identity.get(&rec.info.identity),
                Some(Holder::Active(_))
            );
        if !hides_active {
            self.by_identity.insert(rec.info.identity.clone(), holder);
        }
        self.by_device
            .entry(rec.info.device_id.clone())
            .or_default()
            .push(rec.info.id.clone());
        self.by_id.insert(rec.info.id.clone(), rec);
    }

    /// Apply a changed record (revocation): the identity's holder follows.
    fn update(&mut self, info: PskInfo) {
        if info.revoked {
            if let Some(Holder::Active(id)) = self.by_identity.get(&info.identity) {
                if *id == info.id {
                    self.by_identity.insert(
                        info.identity.clone(),
                        Holder::Revoked {
                            device_id: info.device_id.clone(),
                        },
                    );
                }
            }
        }
        if let Some(r) = self.by_id.get_mut(&info.id) {
            r.info = info;
        }
    }

    /// Forget a device's PSKs; their ids.
    pub(crate) fn remove_device(&mut self, device_id: &str) -> Vec<String> {
        let ids = self.by_device.remove(device_id).unwrap_or_default();
        for id in &ids {
            if let Some(r) = self.by_id.remove(id) {
                let held_here = match self.by_identity.get(&r.info.identity) {
                    Some(Holder::Active(a)) => a == id,
                    Some(Holder::Revoked { device_id: d }) => d == device_id,
                    None => false,
                };
                if held_here {
                    self.by_identity.remove(&r.info.identity);
                }
            }
        }
        ids
    }

    /// Sort every device's list by creation (after loading). Stable, so
    /// PSKs made in the same millisecond (a rotation) keep the order the
    /// store gave them: the order they were written in.
    pub(crate) fn sort(&mut self) {
        let by_id = &self.by_id;
        for ids in self.by_device.values_mut() {
            ids.sort_by_key(|id| by_id.get(id).map(|r| r.info.created_ms));
        }
    }
}

/// 1 to 128 visible ASCII characters. No spaces: an identity copied into a
/// device's configuration must not differ from ours by invisible whitespace.
pub fn validate_identity(identity: &str) -> Result<()> {
    if identity.is_empty()
        || identity.len() > MAX_IDENTITY_LEN
        || !identity.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(RegistryError::Validation(format!(
            "PSK identity must be 1 to {MAX_IDENTITY_LEN} printable ASCII characters without spaces"
        )));
    }
    Ok(())
}

fn validate_sealed(sealed: &[u8]) -> Result<()> {
    if sealed.is_empty() || sealed.len() > MAX_SEALED_KEY_LEN {
        return Err(RegistryError::Validation(format!(
            "a sealed PSK must be 1 to {MAX_SEALED_KEY_LEN} bytes"
        )));
    }
    Ok(())
}

fn new_psk_id(st: &State) -> String {
    loop {
        let id = secret::new_id(PSK_ID_PREFIX);
        if !st.psks.by_id.contains_key(&id) {
            return id;
        }
    }
}

/// The PSK `psk_id` of `device_id`, or NotFound (also when it belongs to
/// another device, so ids of other tenants' devices reveal nothing).
fn of_device<'a>(st: &'a State, device_id: &str, psk_id: &str) -> Result<&'a PskRecord> {
    st.psks
        .by_id
        .get(psk_id)
        .filter(|r| r.info.device_id == device_id)
        .ok_or_else(|| RegistryError::NotFound(format!("PSK {psk_id} of device {device_id}")))
}

impl Registry {
    /// Record a new PSK for a device. `identity` defaults to the device id;
    /// `sealed_key` is the key already sealed by the caller.
    pub fn create_psk(
        &self,
        device_id: &str,
        identity: Option<String>,
        sealed_key: Vec<u8>,
        expires_ms: Option<i64>,
    ) -> Result<PskInfo> {
        validate_sealed(&sealed_key)?;
        let identity = identity.unwrap_or_else(|| device_id.to_string());
        validate_identity(&identity)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        let now = now_ms();
        if expires_ms.is_some_and(|e| e <= now) {
            return Err(RegistryError::Validation(
                "PSK expiry must be in the future".into(),
            ));
        }
        let id = {
            let st = s.state.read();
            if !st.devices.contains_key(device_id) {
                return Err(RegistryError::NotFound(format!("device {device_id}")));
            }
            // Another device's id is reserved for that device's default
            // identity. The message names no device or tenant: identities
            // are platform-wide, their holders are not everyone's business.
            let taken = matches!(st.psks.by_identity.get(&identity), Some(Holder::Active(_)))
                || (identity != device_id && st.devices.contains_key(&identity));
            if taken {
                return Err(RegistryError::AlreadyExists(format!(
                    "PSK identity {identity:?} is already in use (revoke its PSK first, or choose another)"
                )));
            }
            new_psk_id(&st)
        };
        let rec = PskRecord {
            info: PskInfo {
                id,
                device_id: device_id.into(),
                identity,
                created_ms: now,
                expires_ms,
                revoked: false,
                replaced_by: None,
                last_used_ms: None,
            },
            sealed_key: SealedKey::new(sealed_key),
        };
        s.store.insert_psk(&rec)?;
        let info = rec.info.clone();
        s.state.write().psks.insert(rec);
        Ok(info)
    }

    /// A device's PSKs, oldest first, revoked and expired included; never
    /// the keys.
    pub fn list_psks(&self, device_id: &str) -> Result<Vec<PskInfo>> {
        let st = self.shared.state.read();
        if !st.devices.contains_key(device_id) {
            return Err(RegistryError::NotFound(format!("device {device_id}")));
        }
        let used = self.shared.psk_used.lock();
        Ok(st
            .psks
            .by_device
            .get(device_id)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| st.psks.by_id.get(id))
                    .map(|r| {
                        let mut info = r.info.clone();
                        if let Some(u) = used.get(&info.id) {
                            info.last_used_ms = Some(u.ms);
                        }
                        info
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Revoke a PSK at once (idempotent). Its identity is free again.
    pub fn revoke_psk(&self, device_id: &str, psk_id: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut info = of_device(&s.state.read(), device_id, psk_id)?.info.clone();
        if info.revoked {
            return Ok(());
        }
        info.revoked = true;
        s.store.update_psk(&info)?;
        s.state.write().psks.update(info);
        Ok(())
    }

    /// Replace a PSK's key: a new PSK (new id, the same identity and
    /// expiry) takes its place and the old one is revoked, in one step, so
    /// the old key stops working at once. Returns the new PSK.
    pub fn rotate_psk(
        &self,
        device_id: &str,
        psk_id: &str,
        new_sealed_key: Vec<u8>,
    ) -> Result<PskInfo> {
        validate_sealed(&new_sealed_key)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        let now = now_ms();
        let (mut old, new_id) = {
            let st = s.state.read();
            let old = of_device(&st, device_id, psk_id)?.info.clone();
            (old, new_psk_id(&st))
        };
        if old.revoked {
            return Err(RegistryError::Conflict(format!(
                "PSK {psk_id} is revoked; issue a new one instead"
            )));
        }
        if !old.is_active(now) {
            return Err(RegistryError::Conflict(format!(
                "PSK {psk_id} has expired; revoke it and issue a new one"
            )));
        }
        let new = PskRecord {
            info: PskInfo {
                id: new_id,
                device_id: device_id.into(),
                identity: old.identity.clone(),
                created_ms: now,
                expires_ms: old.expires_ms,
                revoked: false,
                replaced_by: None,
                last_used_ms: None,
            },
            sealed_key: SealedKey::new(new_sealed_key),
        };
        old.revoked = true;
        old.replaced_by = Some(new.info.id.clone());
        s.store.rotate_psk(&old, &new)?;
        let info = new.info.clone();
        let mut st = s.state.write();
        st.psks.update(old);
        st.psks.insert(new);
        Ok(info)
    }

    /// Look up the identity a DTLS client sent: what the handshake needs,
    /// from memory only (called on every handshake).
    pub fn psk_lookup(&self, identity: &str, now_ms: i64) -> PskCheck {
        let st = self.shared.state.read();
        let rec = match st.psks.by_identity.get(identity) {
            None => return PskCheck::Unknown,
            Some(Holder::Revoked { .. }) => return PskCheck::Revoked,
            Some(Holder::Active(id)) => match st.psks.by_id.get(id) {
                Some(r) => r,
                None => return PskCheck::Unknown,
            },
        };
        if rec.info.expires_ms.is_some_and(|e| now_ms >= e) {
            return PskCheck::Expired;
        }
        match st.devices.get(&rec.info.device_id) {
            None => PskCheck::Unknown,
            Some(d) if !d.enabled => PskCheck::Disabled,
            Some(d) => PskCheck::Valid {
                device: d.clone(),
                psk_id: rec.info.id.clone(),
                sealed_key: rec.sealed_key.clone(),
            },
        }
    }

    /// Whether a session established with PSK `psk_id` may go on: false once
    /// the PSK is revoked, rotated or expired, or its device disabled or
    /// deleted. Memory only; a DTLS server asks it on every datagram or on
    /// a timer.
    pub fn psk_still_valid(&self, psk_id: &str, now_ms: i64) -> bool {
        let st = self.shared.state.read();
        st.psks.by_id.get(psk_id).is_some_and(|r| {
            r.info.is_active(now_ms) && st.devices.get(&r.info.device_id).is_some_and(|d| d.enabled)
        })
    }

    /// Note a successful handshake with PSK `psk_id` (shown as
    /// `last_used_ms`). Memory only, persisted by the background writer at
    /// most once a minute per PSK, so a reconnect storm costs no writes.
    pub fn record_psk_use(&self, psk_id: &str, now_ms: i64) {
        if !self.shared.state.read().psks.by_id.contains_key(psk_id) {
            return;
        }
        let mut used = self.shared.psk_used.lock();
        let u = used.entry(psk_id.to_string()).or_insert(crate::PskUsed {
            ms: now_ms,
            persisted_ms: 0,
            dirty: true,
        });
        if now_ms > u.ms {
            u.ms = now_ms;
            u.dirty = true;
        }
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

    fn sealed(b: u8) -> Vec<u8> {
        vec![b; 60]
    }

    fn valid_id(c: PskCheck) -> (String, String, Vec<u8>) {
        match c {
            PskCheck::Valid {
                device,
                psk_id,
                sealed_key,
            } => (device.id, psk_id, sealed_key.as_bytes().to_vec()),
            other => panic!("expected Valid, got {other:?}"),
        }
    }

    #[test]
    fn lookup_valid_unknown_revoked_expired_disabled() {
        let (_d, reg) = open();
        device(&reg, "d1");
        device(&reg, "d2");
        let now = now_ms();
        let p1 = reg.create_psk("d1", None, sealed(1), None).expect("psk");
        assert_eq!(p1.identity, "d1");
        assert!(p1.id.starts_with("psk-") && p1.id.len() == 16, "{}", p1.id);
        let (dev, id, key) = valid_id(reg.psk_lookup("d1", now));
        assert_eq!(
            (dev.as_str(), id.as_str(), key),
            ("d1", p1.id.as_str(), sealed(1))
        );
        assert!(reg.psk_still_valid(&p1.id, now));
        assert_eq!(reg.psk_lookup("nobody", now), PskCheck::Unknown);
        assert!(!reg.psk_still_valid("psk-000000000000", now));

        // Expiry.
        let p2 = reg
            .create_psk("d2", Some("sensor-2".into()), sealed(2), Some(now + 1000))
            .expect("psk");
        valid_id(reg.psk_lookup("sensor-2", now));
        assert_eq!(reg.psk_lookup("sensor-2", now + 1000), PskCheck::Expired);
        assert!(reg.psk_still_valid(&p2.id, now));
        assert!(!reg.psk_still_valid(&p2.id, now + 1000));
        assert!(matches!(
            reg.create_psk("d2", Some("x".into()), sealed(2), Some(now - 1)),
            Err(RegistryError::Validation(_))
        ));

        // Disabled device.
        reg.set_device_enabled("d1", false).expect("disable");
        assert_eq!(reg.psk_lookup("d1", now), PskCheck::Disabled);
        assert!(!reg.psk_still_valid(&p1.id, now));
        reg.set_device_enabled("d1", true).expect("enable");
        assert!(reg.psk_still_valid(&p1.id, now));

        // Revocation: idempotent, only by the owning device.
        assert!(matches!(
            reg.revoke_psk("d2", &p1.id),
            Err(RegistryError::NotFound(_))
        ));
        reg.revoke_psk("d1", &p1.id).expect("revoke");
        reg.revoke_psk("d1", &p1.id).expect("idempotent");
        assert_eq!(reg.psk_lookup("d1", now), PskCheck::Revoked);
        assert!(!reg.psk_still_valid(&p1.id, now));
        // The identity is free again.
        let p3 = reg
            .create_psk("d1", None, sealed(3), None)
            .expect("reissue");
        assert_eq!(valid_id(reg.psk_lookup("d1", now)).1, p3.id);
        let list = reg.list_psks("d1").expect("list");
        assert_eq!(
            list.iter()
                .map(|p| (p.id.clone(), p.revoked))
                .collect::<Vec<_>>(),
            vec![(p1.id.clone(), true), (p3.id.clone(), false)]
        );
        assert!(matches!(
            reg.list_psks("zz"),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn rotation_keeps_the_identity_and_ends_the_old_key() {
        let (_d, reg) = open();
        device(&reg, "d1");
        let now = now_ms();
        let old = reg
            .create_psk("d1", Some("id-1".into()), sealed(1), Some(now + 60_000))
            .expect("psk");
        let new = reg.rotate_psk("d1", &old.id, sealed(9)).expect("rotate");
        assert_ne!(new.id, old.id);
        assert_eq!(
            (new.identity.as_str(), new.expires_ms),
            ("id-1", old.expires_ms)
        );
        let (_, id, key) = valid_id(reg.psk_lookup("id-1", now));
        assert_eq!((id, key), (new.id.clone(), sealed(9)));
        assert!(!reg.psk_still_valid(&old.id, now), "old sessions end");
        assert!(reg.psk_still_valid(&new.id, now));
        let list = reg.list_psks("d1").expect("list");
        assert_eq!(list.len(), 2);
        assert!(list[0].revoked);
        assert_eq!(list[0].replaced_by.as_deref(), Some(new.id.as_str()));
        // The old one cannot be rotated again; unknown ids are not found.
        assert!(matches!(
            reg.rotate_psk("d1", &old.id, sealed(5)),
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            reg.rotate_psk("d1", "psk-nope", sealed(5)),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.rotate_psk("d1", &new.id, Vec::new()),
            Err(RegistryError::Validation(_))
        ));
    }

    #[test]
    fn identities_are_unique_and_validated() {
        let (_d, reg) = open();
        device(&reg, "d1");
        device(&reg, "d2");
        reg.create_psk("d1", Some("shared".into()), sealed(1), None)
            .expect("psk");
        let e = reg
            .create_psk("d2", Some("shared".into()), sealed(2), None)
            .expect_err("taken");
        assert!(matches!(e, RegistryError::AlreadyExists(_)), "{e}");
        assert!(!e.to_string().contains("d1"), "names no holder: {e}");
        // A device's own id stays its own.
        assert!(matches!(
            reg.create_psk("d2", Some("d1".into()), sealed(2), None),
            Err(RegistryError::AlreadyExists(_))
        ));
        // A second PSK with the same default identity: revoke first.
        reg.create_psk("d1", None, sealed(1), None)
            .expect("default");
        assert!(matches!(
            reg.create_psk("d1", None, sealed(1), None),
            Err(RegistryError::AlreadyExists(_))
        ));
        let long = "x".repeat(MAX_IDENTITY_LEN + 1);
        for bad in ["", "has space", "tab\t", "é", long.as_str()] {
            assert!(
                matches!(
                    reg.create_psk("d2", Some(bad.to_string()), sealed(2), None),
                    Err(RegistryError::Validation(_))
                ),
                "{bad:?}"
            );
        }
        reg.create_psk("d2", Some("~!x".repeat(42) + "yz"), sealed(2), None)
            .expect("128 printable characters");
        assert!(matches!(
            reg.create_psk(
                "d2",
                Some("k".into()),
                vec![0; MAX_SEALED_KEY_LEN + 1],
                None
            ),
            Err(RegistryError::Validation(_))
        ));
        assert!(matches!(
            reg.create_psk("nobody", None, sealed(1), None),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn deleting_a_device_deletes_its_psks() {
        let (_d, reg) = open();
        device(&reg, "d1");
        device(&reg, "d2");
        let now = now_ms();
        let a = reg.create_psk("d1", None, sealed(1), None).expect("psk");
        let b = reg
            .create_psk("d1", Some("old".into()), sealed(1), None)
            .expect("psk");
        reg.revoke_psk("d1", &b.id).expect("revoke");
        let c = reg
            .create_psk("d2", Some("other".into()), sealed(2), None)
            .expect("psk");
        reg.delete_device("d1").expect("delete");
        assert_eq!(reg.psk_lookup("d1", now), PskCheck::Unknown);
        assert_eq!(reg.psk_lookup("old", now), PskCheck::Unknown);
        assert!(!reg.psk_still_valid(&a.id, now));
        valid_id(reg.psk_lookup("other", now));
        assert!(reg.psk_still_valid(&c.id, now));
        // A later device with the same id starts with no PSK.
        device(&reg, "d1");
        assert!(reg.list_psks("d1").expect("list").is_empty());
        assert_eq!(reg.psk_lookup("d1", now), PskCheck::Unknown);
    }

    #[test]
    fn psks_survive_reopen_with_their_sealed_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = now_ms();
        let key: Vec<u8> = (0..=255).collect();
        let (rotated, revoked, live) = {
            let reg = Registry::open(dir.path()).expect("open");
            device(&reg, "d1");
            device(&reg, "d2");
            let first = reg
                .create_psk("d1", None, vec![1; 40], Some(now + 3_600_000))
                .expect("psk");
            let live = reg
                .rotate_psk("d1", &first.id, key.clone())
                .expect("rotate");
            let gone = reg
                .create_psk("d2", Some("gone".into()), vec![2; 40], None)
                .expect("psk");
            reg.revoke_psk("d2", &gone.id).expect("revoke");
            reg.record_psk_use(&live.id, now + 5);
            (first, gone, live)
        };
        let reg = Registry::open(dir.path()).expect("reopen");
        let (dev, id, sealed_key) = valid_id(reg.psk_lookup("d1", now));
        assert_eq!((dev.as_str(), id.as_str()), ("d1", live.id.as_str()));
        assert_eq!(sealed_key, key, "sealed bytes round trip unchanged");
        assert!(!reg.psk_still_valid(&rotated.id, now));
        assert_eq!(reg.psk_lookup("gone", now), PskCheck::Revoked);
        assert!(!reg.psk_still_valid(&revoked.id, now));
        let list = reg.list_psks("d1").expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].replaced_by.as_deref(), Some(live.id.as_str()));
        assert_eq!(list[1].expires_ms, Some(now + 3_600_000));
        assert_eq!(list[1].last_used_ms, Some(now + 5), "flushed on close");
        // The unique index allows the freed identity again after reopen.
        reg.create_psk("d2", Some("gone".into()), vec![3; 40], None)
            .expect("reuse a revoked identity");
    }

    #[test]
    fn sealed_keys_are_not_debug_printed() {
        let k = SealedKey::new(vec![0xAB; 20]);
        assert_eq!(format!("{k:?}"), "SealedKey(<20 bytes>)");
    }
}
