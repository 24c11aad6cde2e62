//! Certificate records. Certificates are issued elsewhere (the platform CA
//! or a user-supplied CA); the registry only records which fingerprint
//! belongs to which device, so a single certificate can be revoked (and
//! listed in a CRL) without touching the device's other credentials.

use crate::device::Device;
use crate::error::{RegistryError, Result};
use crate::{now_ms, Registry};
use serde::{Deserialize, Serialize};

/// A certificate to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    /// SHA-256 of the certificate's DER encoding.
    pub fingerprint: [u8; 32],
    pub serial_hex: String,
    pub not_after_ms: i64,
    /// `builtin` (our CA) or `external` (a user-supplied CA).
    pub issuer: String,
}

/// A recorded certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    pub device_id: String,
    pub fingerprint: [u8; 32],
    pub serial_hex: String,
    pub not_after_ms: i64,
    pub issuer: String,
    pub created_ms: i64,
    /// When it was revoked (CRLs carry the revocation date).
    pub revoked_ms: Option<i64>,
}

/// The outcome of checking a client certificate on CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertCheck {
    Valid(Device),
    Revoked,
    Expired,
    UnknownDevice,
    Disabled,
    /// The fingerprint is not recorded. With a common name that names an
    /// enabled device, that device is given: a certificate from a
    /// user-supplied CA that was never registered. The caller decides.
    NotRegistered(Option<Device>),
}

fn validate(rec: &CertRecord) -> Result<()> {
    if rec.serial_hex.is_empty()
        || rec.serial_hex.len() > 64
        || !rec.serial_hex.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(RegistryError::Validation(
            "certificate serial must be 1 to 64 hex digits".into(),
        ));
    }
    if rec.issuer.is_empty() || rec.issuer.len() > 64 || rec.issuer.chars().any(char::is_control) {
        return Err(RegistryError::Validation(
            "certificate issuer must be 1 to 64 characters (builtin or external)".into(),
        ));
    }
    Ok(())
}

impl Registry {
    pub fn add_certificate(&self, device_id: &str, rec: CertRecord) -> Result<CertInfo> {
        validate(&rec)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        {
            let st = s.state.read();
            if !st.devices.contains_key(device_id) {
                return Err(RegistryError::NotFound(format!("device {device_id}")));
            }
            if st.certs.contains_key(&rec.fingerprint) {
                return Err(RegistryError::AlreadyExists(
                    "a certificate with this fingerprint".into(),
                ));
            }
        }
        let info = CertInfo {
            device_id: device_id.into(),
            fingerprint: rec.fingerprint,
            serial_hex: rec.serial_hex.to_ascii_lowercase(),
            not_after_ms: rec.not_after_ms,
            issuer: rec.issuer,
            created_ms: now_ms(),
            revoked_ms: None,
        };
        s.store.insert_certificate(&info)?;
        s.state.write().certs.insert(info.fingerprint, info.clone());
        Ok(info)
    }

    pub fn list_certificates(&self, device_id: &str) -> Result<Vec<CertInfo>> {
        let st = self.shared.state.read();
        if !st.devices.contains_key(device_id) {
            return Err(RegistryError::NotFound(format!("device {device_id}")));
        }
        let mut v: Vec<CertInfo> = st
            .certs
            .values()
            .filter(|c| c.device_id == device_id)
            .cloned()
            .collect();
        v.sort_by_key(|c| c.created_ms);
        Ok(v)
    }

    /// Revoke one certificate of a device (idempotent).
    pub fn revoke_certificate(&self, device_id: &str, fingerprint: &[u8; 32]) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut info = s
            .state
            .read()
            .certs
            .get(fingerprint)
            .filter(|c| c.device_id == device_id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("certificate of device {device_id}")))?;
        if info.revoked_ms.is_some() {
            return Ok(());
        }
        info.revoked_ms = Some(now_ms());
        s.store.update_certificate(&info)?;
        s.state.write().certs.insert(info.fingerprint, info);
        Ok(())
    }

    /// Every revoked certificate, for building a CRL.
    pub fn revoked_certificates(&self) -> Result<Vec<CertInfo>> {
        let mut v: Vec<CertInfo> = self
            .shared
            .state
            .read()
            .certs
            .values()
            .filter(|c| c.revoked_ms.is_some())
            .cloned()
            .collect();
        v.sort_by_key(|c| c.revoked_ms);
        Ok(v)
    }

    /// Check a verified client certificate on CONNECT (memory only).
    pub fn check_certificate(
        &self,
        fingerprint: &[u8; 32],
        common_name: Option<&str>,
        now_ms: i64,
    ) -> CertCheck {
        let st = self.shared.state.read();
        match st.certs.get(fingerprint) {
            Some(c) => {
                if c.revoked_ms.is_some() {
                    return CertCheck::Revoked;
                }
                if now_ms >= c.not_after_ms {
                    return CertCheck::Expired;
                }
                match st.devices.get(&c.device_id) {
                    None => CertCheck::UnknownDevice,
                    Some(d) if !d.enabled => CertCheck::Disabled,
                    Some(d) => CertCheck::Valid(d.clone()),
                }
            }
            None => match common_name {
                None => CertCheck::NotRegistered(None),
                Some(cn) => match st.devices.get(cn) {
                    None => CertCheck::UnknownDevice,
                    Some(d) if !d.enabled => CertCheck::Disabled,
                    Some(d) => CertCheck::NotRegistered(Some(d.clone())),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;
    use crate::NewDevice;

    fn rec(b: u8, not_after_ms: i64) -> CertRecord {
        CertRecord {
            fingerprint: [b; 32],
            serial_hex: format!("{b:02X}01"),
            not_after_ms,
            issuer: "builtin".into(),
        }
    }

    #[test]
    fn certificate_lifecycle() {
        let (_d, reg) = open();
        for id in ["c1", "c2"] {
            reg.create_device(NewDevice {
                id: Some(id.into()),
                ..Default::default()
            })
            .expect("device");
        }
        let now = now_ms();
        let far = now + 86_400_000;
        reg.add_certificate("c1", rec(1, far)).expect("add");
        assert!(matches!(
            reg.add_certificate("c2", rec(1, far)),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert!(matches!(
            reg.add_certificate("zz", rec(2, far)),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.add_certificate(
                "c1",
                CertRecord {
                    serial_hex: "xyz".into(),
                    ..rec(3, far)
                }
            ),
            Err(RegistryError::Validation(_))
        ));
        reg.add_certificate("c1", rec(4, now - 1))
            .expect("expired one");
        assert!(
            matches!(reg.check_certificate(&[1; 32], Some("c1"), now), CertCheck::Valid(d) if d.id == "c1")
        );
        assert_eq!(
            reg.check_certificate(&[4; 32], Some("c1"), now),
            CertCheck::Expired
        );
        assert!(
            matches!(reg.check_certificate(&[9; 32], Some("c2"), now), CertCheck::NotRegistered(Some(d)) if d.id == "c2")
        );
        assert_eq!(
            reg.check_certificate(&[9; 32], Some("nobody"), now),
            CertCheck::UnknownDevice
        );
        assert_eq!(
            reg.check_certificate(&[9; 32], None, now),
            CertCheck::NotRegistered(None)
        );
        assert_eq!(reg.list_certificates("c1").expect("list").len(), 2);

        assert!(matches!(
            reg.revoke_certificate("c2", &[1; 32]),
            Err(RegistryError::NotFound(_))
        ));
        reg.revoke_certificate("c1", &[1; 32]).expect("revoke");
        reg.revoke_certificate("c1", &[1; 32]).expect("idempotent");
        assert_eq!(
            reg.check_certificate(&[1; 32], Some("c1"), now),
            CertCheck::Revoked
        );
        assert_eq!(reg.revoked_certificates().expect("crl").len(), 1);

        reg.set_device_enabled("c2", false).expect("disable");
        assert_eq!(
            reg.check_certificate(&[9; 32], Some("c2"), now),
            CertCheck::Disabled
        );

        // Deleting a device revokes (and keeps) its certificates.
        reg.add_certificate("c2", rec(5, far)).expect("add");
        reg.delete_device("c2").expect("delete");
        assert_eq!(
            reg.check_certificate(&[5; 32], Some("c2"), now),
            CertCheck::Revoked
        );
        assert_eq!(reg.revoked_certificates().expect("crl").len(), 2);
    }
}
