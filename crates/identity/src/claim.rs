//! Claim tokens for fleet provisioning: a batch of identical devices ships
//! with one shared secret; each device connects with it (username `$claim`),
//! may use only its `$provision/{client_id}/…` topics, and redeems the claim
//! for its own identity and token. The claim fixes the tenant, group and
//! profile, and limits how many devices it can create and until when.

use crate::device::{Device, NewDevice};
use crate::error::{ClaimError, RegistryError, Result};
use crate::{now_ms, secret, validate_name, Registry, State};
use serde::{Deserialize, Serialize};

/// The prefix of claim token secrets.
pub const CLAIM_PREFIX: &str = "m2mclaim_";

/// What a new claim token provisions.
#[derive(Debug, Clone)]
pub struct ClaimSpec {
    /// A label for operators ("line 3 batch 2024-05").
    pub name: String,
    pub tenant: String,
    pub group: Option<String>,
    /// Defaults to `default`.
    pub profile: Option<String>,
    pub max_uses: u32,
    pub expires_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimInfo {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub group: Option<String>,
    pub profile: String,
    pub max_uses: u32,
    pub uses: u32,
    pub expires_ms: Option<i64>,
    pub revoked: bool,
    pub created_ms: i64,
}

/// A claim token as stored: metadata and the SHA-256 of the secret.
#[derive(Debug, Clone)]
pub struct ClaimRecord {
    pub info: ClaimInfo,
    pub hash: [u8; 32],
}

/// Find the claim for a secret and check it is usable.
fn check(st: &State, secret: &[u8], now_ms: i64) -> Result<ClaimInfo, ClaimError> {
    // A lookup by hash is safe: the attacker controls the secret, not its
    // SHA-256, so timing reveals nothing about stored secrets.
    let hash = secret::sha256(secret);
    let rec = st
        .claim_by_hash
        .get(&hash)
        .and_then(|id| st.claims.get(id))
        .ok_or(ClaimError::Unknown)?;
    let c = &rec.info;
    if c.revoked {
        return Err(ClaimError::Revoked);
    }
    if c.expires_ms.is_some_and(|e| now_ms >= e) {
        return Err(ClaimError::Expired);
    }
    if c.uses >= c.max_uses {
        return Err(ClaimError::Exhausted);
    }
    Ok(c.clone())
}

impl Registry {
    pub fn create_claim_token(&self, spec: ClaimSpec) -> Result<(ClaimInfo, String)> {
        validate_name("claim token", &spec.name)?;
        if spec.max_uses == 0 {
            return Err(RegistryError::Validation(
                "max_uses must be at least 1".into(),
            ));
        }
        let now = now_ms();
        if spec.expires_ms.is_some_and(|e| e <= now) {
            return Err(RegistryError::Validation(
                "claim token expiry must be in the future".into(),
            ));
        }
        let s = &*self.shared;
        let _w = s.write.lock();
        let id = {
            let st = s.state.read();
            crate::device::check_placement(
                &st,
                &spec.tenant,
                spec.group.as_deref(),
                spec.profile.as_deref().unwrap_or("default"),
            )?;
            loop {
                let id = secret::new_id("clm");
                if !st.claims.contains_key(&id) {
                    break id;
                }
            }
        };
        let secret = secret::new_secret(CLAIM_PREFIX);
        let rec = ClaimRecord {
            info: ClaimInfo {
                id,
                name: spec.name,
                tenant: spec.tenant,
                group: spec.group,
                profile: spec.profile.unwrap_or_else(|| "default".into()),
                max_uses: spec.max_uses,
                uses: 0,
                expires_ms: spec.expires_ms,
                revoked: false,
                created_ms: now,
            },
            hash: secret::sha256(secret.as_bytes()),
        };
        s.store.insert_claim(&rec)?;
        let info = rec.info.clone();
        let mut st = s.state.write();
        st.claim_by_hash.insert(rec.hash, info.id.clone());
        st.claims.insert(info.id.clone(), rec);
        Ok((info, secret))
    }

    pub fn get_claim_token(&self, id: &str) -> Result<ClaimInfo> {
        self.shared
            .state
            .read()
            .claims
            .get(id)
            .map(|c| c.info.clone())
            .ok_or_else(|| RegistryError::NotFound(format!("claim token {id}")))
    }

    pub fn list_claim_tokens(&self, tenant: Option<&str>) -> Result<Vec<ClaimInfo>> {
        Ok(self
            .shared
            .state
            .read()
            .claims
            .values()
            .filter(|c| tenant.is_none_or(|t| c.info.tenant == t))
            .map(|c| c.info.clone())
            .collect())
    }

    /// Revoke a claim token (idempotent). Devices it already created stay.
    pub fn revoke_claim_token(&self, id: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut info = self.get_claim_token(id)?;
        if info.revoked {
            return Ok(());
        }
        info.revoked = true;
        s.store.update_claim(&info)?;
        if let Some(c) = s.state.write().claims.get_mut(id) {
            c.info = info;
        }
        Ok(())
    }

    /// Check a claim secret on CONNECT without consuming a use.
    pub fn check_claim(&self, secret: &[u8], now_ms: i64) -> Result<ClaimInfo, ClaimError> {
        check(&self.shared.state.read(), secret, now_ms)
    }

    /// Consume one use and create a device in the claim's tenant, group and
    /// profile, atomically: concurrent redeems never exceed `max_uses`.
    /// The device gets a generated id; its name defaults to the id.
    pub fn redeem_claim(
        &self,
        secret: &[u8],
        now_ms: i64,
        device_name: Option<&str>,
    ) -> Result<(Device, ClaimInfo), ClaimError> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let (mut claim, device) = {
            let st = s.state.read();
            let claim = check(&st, secret, now_ms)?;
            let device = Self::prepare_device(
                &st,
                NewDevice {
                    id: None,
                    name: device_name.map(str::to_string),
                    tenant: claim.tenant.clone(),
                    group: claim.group.clone(),
                    profile: Some(claim.profile.clone()),
                    ..Default::default()
                },
                now_ms,
            )?;
            (claim, device)
        };
        claim.uses += 1;
        s.store.redeem_claim(&claim, &device)?;
        let mut st = s.state.write();
        if let Some(c) = st.claims.get_mut(&claim.id) {
            c.info = claim.clone();
        }
        st.put_device(device.clone());
        Ok((device, claim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;

    fn spec(max_uses: u32, expires_ms: Option<i64>) -> ClaimSpec {
        ClaimSpec {
            name: "batch 1".into(),
            tenant: "acme".into(),
            group: Some("line3".into()),
            profile: Some("sensor-v2".into()),
            max_uses,
            expires_ms,
        }
    }

    fn setup() -> (tempfile::TempDir, Registry) {
        let (d, reg) = open();
        reg.create_tenant("acme", "Acme").expect("tenant");
        reg.create_group("acme", "line3", "Line 3").expect("group");
        reg.create_profile(
            "acme",
            crate::NewProfile {
                name: "sensor-v2".into(),
                ..Default::default()
            },
        )
        .expect("profile");
        (d, reg)
    }

    #[test]
    fn redeem_counts_uses_and_refuses_clearly() {
        let (_d, reg) = setup();
        let now = now_ms();
        assert!(matches!(
            reg.create_claim_token(ClaimSpec {
                group: Some("nope".into()),
                ..spec(1, None)
            }),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.create_claim_token(spec(0, None)),
            Err(RegistryError::Validation(_))
        ));
        let (info, secret) = reg.create_claim_token(spec(2, None)).expect("create");
        assert!(secret.starts_with("m2mclaim_") && secret.len() == 9 + 43);
        assert_eq!(
            reg.check_claim(secret.as_bytes(), now).expect("check").uses,
            0
        );
        let (d1, c1) = reg
            .redeem_claim(secret.as_bytes(), now, Some("Sensor A"))
            .expect("redeem 1");
        assert_eq!(c1.uses, 1);
        assert_eq!(d1.name, "Sensor A");
        assert_eq!(d1.tenant, "acme");
        assert_eq!(d1.group.as_deref(), Some("line3"));
        assert_eq!(d1.profile, "sensor-v2");
        assert_eq!(reg.get_device(&d1.id).expect("stored"), d1);
        let (d2, _) = reg
            .redeem_claim(secret.as_bytes(), now, None)
            .expect("redeem 2");
        assert_eq!(d2.name, d2.id);
        let e = reg
            .redeem_claim(secret.as_bytes(), now, None)
            .expect_err("exhausted");
        assert!(matches!(e, ClaimError::Exhausted));
        assert!(e.to_string().contains("no uses left"));
        assert!(matches!(
            reg.check_claim(secret.as_bytes(), now),
            Err(ClaimError::Exhausted)
        ));
        assert!(matches!(
            reg.check_claim(b"m2mclaim_nope", now),
            Err(ClaimError::Unknown)
        ));
        assert_eq!(reg.get_claim_token(&info.id).expect("get").uses, 2);

        let (_i, exp) = reg
            .create_claim_token(spec(5, Some(now + 1000)))
            .expect("create");
        assert!(reg.check_claim(exp.as_bytes(), now).is_ok());
        assert!(matches!(
            reg.redeem_claim(exp.as_bytes(), now + 1000, None),
            Err(ClaimError::Expired)
        ));

        let (rinfo, rev) = reg.create_claim_token(spec(5, None)).expect("create");
        reg.revoke_claim_token(&rinfo.id).expect("revoke");
        reg.revoke_claim_token(&rinfo.id).expect("idempotent");
        assert!(matches!(
            reg.redeem_claim(rev.as_bytes(), now, None),
            Err(ClaimError::Revoked)
        ));
        assert!(matches!(
            reg.revoke_claim_token("clm-nope"),
            Err(RegistryError::NotFound(_))
        ));
        assert_eq!(reg.list_claim_tokens(Some("acme")).expect("list").len(), 3);
        assert!(reg
            .list_claim_tokens(Some("default"))
            .expect("list")
            .is_empty());
        // A group an unrevoked claim provisions into cannot be deleted.
        assert_eq!(reg.count_devices(Some("acme")).expect("count"), 2);
    }

    #[test]
    fn concurrent_redeems_never_exceed_max_uses() {
        let (dir, reg) = setup();
        let (info, secret) = reg.create_claim_token(spec(7, None)).expect("create");
        let ok = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (reg, secret, ok) = (reg.clone(), secret.clone(), &ok);
                s.spawn(move || {
                    for _ in 0..5 {
                        match reg.redeem_claim(secret.as_bytes(), now_ms(), None) {
                            Ok(_) => {
                                ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(ClaimError::Exhausted) => {}
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                });
            }
        });
        assert_eq!(ok.load(std::sync::atomic::Ordering::SeqCst), 7);
        assert_eq!(reg.count_devices(Some("acme")).expect("count"), 7);
        drop(reg);
        let reg = Registry::open(dir.path()).expect("reopen");
        assert_eq!(reg.get_claim_token(&info.id).expect("get").uses, 7);
        assert_eq!(reg.count_devices(Some("acme")).expect("count"), 7);
        assert!(matches!(
            reg.redeem_claim(secret.as_bytes(), now_ms(), None),
            Err(ClaimError::Exhausted)
        ));
    }
}
