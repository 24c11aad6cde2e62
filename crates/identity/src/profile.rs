//! Device profiles: what a tenant's devices of one kind have in common —
//! for now, the content type of their telemetry payloads, which the ingest
//! path needs to pick a decoder before it has looked at a single byte.
//!
//! A device names its profile (`Device::profile`). Every tenant has the
//! built-in profile `default` without any stored row (no content type: the
//! ingest guesses); storing a row named `default` gives the tenant's default
//! devices settings, and deleting that row returns to the built-in one.
//! Any other name must be created before a device can use it, and cannot be
//! deleted while a device or an unrevoked claim token still names it.
//!
//! The ingest path asks [`Registry::ingest_info`] for every message, so the
//! answer is precomputed per device ([`IngestInfo`] in the registry's
//! in-memory state) and recomputed by every write that can change it:
//! device create/update/delete, claim redemption, profile create/update/
//! delete.

use crate::device::Device;
use crate::error::{RegistryError, Result};
use crate::{now_ms, validate_id, Registry, State};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The profile every device has unless told otherwise; it needs no row.
pub const DEFAULT_PROFILE: &str = "default";

/// Payload content types the ingest understands, in their canonical form.
pub const CONTENT_TYPES: [&str; 5] = [
    "application/json",
    "application/senml+json",
    "application/senml+cbor",
    "application/cbor",
    "text/plain",
];

const MAX_DESCRIPTION: usize = 1024;

/// A tenant's device profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceProfile {
    pub tenant: String,
    pub name: String,
    /// One of [`CONTENT_TYPES`]; `None` lets the ingest detect the format.
    pub content_type: Option<String>,
    pub description: String,
    /// 0 for the built-in `default` profile of a tenant that stored none.
    pub created_ms: i64,
}

/// What `create_profile` needs besides the tenant.
#[derive(Debug, Clone, Default)]
pub struct NewProfile {
    pub name: String,
    pub content_type: Option<String>,
    pub description: String,
}

/// A partial update: `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct ProfileUpdate {
    /// `Some(None)` clears the content type.
    pub content_type: Option<Option<String>>,
    pub description: Option<String>,
}

/// What the telemetry ingest needs to know about a device for each message.
/// Cloning it costs one reference-count increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestInfo {
    pub tenant: Arc<str>,
    /// The device's profile's content type: one of [`CONTENT_TYPES`]
    /// (static, so the hot path never allocates), `None` when the profile
    /// sets none.
    pub content_type: Option<&'static str>,
}

/// The canonical spelling of a supported content type (ASCII case and
/// surrounding blanks are forgiven; parameters such as `; charset=` are not,
/// because the decoders would ignore them).
pub fn canonical_content_type(s: &str) -> Result<&'static str> {
    let t = s.trim();
    CONTENT_TYPES
        .iter()
        .find(|c| c.eq_ignore_ascii_case(t))
        .copied()
        .ok_or_else(|| {
            RegistryError::Validation(format!(
                "content type {s:?} is not supported: use one of {}",
                CONTENT_TYPES.join(", ")
            ))
        })
}

fn validate_description(d: &str) -> Result<()> {
    if d.chars().count() > MAX_DESCRIPTION || d.chars().any(char::is_control) {
        return Err(RegistryError::Validation(format!(
            "profile description must be at most {MAX_DESCRIPTION} characters without control characters"
        )));
    }
    Ok(())
}

fn key(tenant: &str, name: &str) -> (String, String) {
    (tenant.to_string(), name.to_string())
}

/// The built-in `default` profile of a tenant that stored no row for it.
fn builtin_default(tenant: &str) -> DeviceProfile {
    DeviceProfile {
        tenant: tenant.into(),
        name: DEFAULT_PROFILE.into(),
        content_type: None,
        description: "built-in default profile".into(),
        created_ms: 0,
    }
}

impl State {
    /// Whether devices of `tenant` may name `profile`.
    pub(crate) fn profile_exists(&self, tenant: &str, profile: &str) -> bool {
        profile == DEFAULT_PROFILE || self.profiles.contains_key(&key(tenant, profile))
    }

    fn ingest_for(&self, d: &Device) -> IngestInfo {
        let content_type = self
            .profiles
            .get(&key(&d.tenant, &d.profile))
            .and_then(|p| p.content_type.as_deref())
            .and_then(|c| canonical_content_type(c).ok());
        IngestInfo {
            tenant: Arc::from(d.tenant.as_str()),
            content_type,
        }
    }

    /// Insert or replace a device, keeping its ingest information current.
    /// Every device write goes through here (or [`State::remove_device`]).
    pub(crate) fn put_device(&mut self, d: Device) {
        let info = self.ingest_for(&d);
        self.ingest.insert(d.id.clone(), info);
        self.devices.insert(d.id.clone(), d);
    }

    pub(crate) fn remove_device(&mut self, id: &str) {
        self.devices.remove(id);
        self.ingest.remove(id);
    }

    /// Recompute the ingest information of the tenant's devices using the
    /// profile (after the profile changed).
    fn refresh_profile_users(&mut self, tenant: &str, profile: &str) {
        let ids: Vec<(String, IngestInfo)> = self
            .devices
            .values()
            .filter(|d| d.tenant == tenant && d.profile == profile)
            .map(|d| (d.id.clone(), self.ingest_for(d)))
            .collect();
        for (id, info) in ids {
            self.ingest.insert(id, info);
        }
    }

    /// Recompute every device's ingest information (at open).
    pub(crate) fn rebuild_ingest(&mut self) {
        let all: Vec<(String, IngestInfo)> = self
            .devices
            .values()
            .map(|d| (d.id.clone(), self.ingest_for(d)))
            .collect();
        self.ingest = all.into_iter().collect();
    }
}

impl Registry {
    /// Tenant and payload content type of a device, for every telemetry
    /// message: an in-memory lookup (no I/O, no allocation), reflecting every
    /// device and profile change at once. `None` for unknown devices.
    pub fn ingest_info(&self, device_id: &str) -> Option<IngestInfo> {
        self.shared.state.read().ingest.get(device_id).cloned()
    }

    pub fn create_profile(&self, tenant: &str, new: NewProfile) -> Result<DeviceProfile> {
        validate_id("profile", &new.name)?;
        validate_description(&new.description)?;
        let content_type = new
            .content_type
            .as_deref()
            .map(canonical_content_type)
            .transpose()?
            .map(str::to_string);
        let s = &*self.shared;
        let _w = s.write.lock();
        {
            let st = s.state.read();
            if !st.tenants.contains_key(tenant) {
                return Err(RegistryError::NotFound(format!("tenant {tenant}")));
            }
            if st.profiles.contains_key(&key(tenant, &new.name)) {
                return Err(RegistryError::AlreadyExists(format!(
                    "profile {} in tenant {tenant}",
                    new.name
                )));
            }
        }
        let p = DeviceProfile {
            tenant: tenant.into(),
            name: new.name,
            content_type,
            description: new.description,
            created_ms: now_ms(),
        };
        s.store.insert_profile(&p)?;
        let mut st = s.state.write();
        st.profiles.insert(key(tenant, &p.name), p.clone());
        st.refresh_profile_users(tenant, &p.name);
        Ok(p)
    }

    /// A profile; `default` always exists (built in unless stored).
    pub fn get_profile(&self, tenant: &str, name: &str) -> Result<DeviceProfile> {
        let st = self.shared.state.read();
        if !st.tenants.contains_key(tenant) {
            return Err(RegistryError::NotFound(format!("tenant {tenant}")));
        }
        match st.profiles.get(&key(tenant, name)) {
            Some(p) => Ok(p.clone()),
            None if name == DEFAULT_PROFILE => Ok(builtin_default(tenant)),
            None => Err(RegistryError::NotFound(format!(
                "profile {name} in tenant {tenant}"
            ))),
        }
    }

    /// Profiles of one tenant (or of all), in (tenant, name) order,
    /// including each tenant's built-in `default` unless it stored one.
    pub fn list_profiles(&self, tenant: Option<&str>) -> Result<Vec<DeviceProfile>> {
        let st = self.shared.state.read();
        if let Some(t) = tenant {
            if !st.tenants.contains_key(t) {
                return Err(RegistryError::NotFound(format!("tenant {t}")));
            }
        }
        let mut out: Vec<DeviceProfile> = st
            .profiles
            .values()
            .filter(|p| tenant.is_none_or(|t| p.tenant == t))
            .cloned()
            .collect();
        for t in st.tenants.keys() {
            if tenant.is_none_or(|want| want == t)
                && !st.profiles.contains_key(&key(t, DEFAULT_PROFILE))
            {
                out.push(builtin_default(t));
            }
        }
        out.sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
        Ok(out)
    }

    /// Change a profile; devices using it see the change on their next
    /// message. Updating the built-in `default` stores it.
    pub fn update_profile(
        &self,
        tenant: &str,
        name: &str,
        u: ProfileUpdate,
    ) -> Result<DeviceProfile> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let (mut p, stored) = {
            let st = s.state.read();
            if !st.tenants.contains_key(tenant) {
                return Err(RegistryError::NotFound(format!("tenant {tenant}")));
            }
            match st.profiles.get(&key(tenant, name)) {
                Some(p) => (p.clone(), true),
                None if name == DEFAULT_PROFILE => (
                    DeviceProfile {
                        description: String::new(),
                        created_ms: now_ms(),
                        ..builtin_default(tenant)
                    },
                    false,
                ),
                None => {
                    return Err(RegistryError::NotFound(format!(
                        "profile {name} in tenant {tenant}"
                    )))
                }
            }
        };
        if let Some(ct) = u.content_type {
            p.content_type = ct
                .as_deref()
                .map(canonical_content_type)
                .transpose()?
                .map(str::to_string);
        }
        if let Some(d) = u.description {
            validate_description(&d)?;
            p.description = d;
        }
        if stored {
            s.store.update_profile(&p)?;
        } else {
            s.store.insert_profile(&p)?;
        }
        let mut st = s.state.write();
        st.profiles.insert(key(tenant, name), p.clone());
        st.refresh_profile_users(tenant, name);
        Ok(p)
    }

    /// Delete a profile nothing uses any more. Deleting a stored `default`
    /// returns the tenant to the built-in one (its devices keep working).
    pub fn delete_profile(&self, tenant: &str, name: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        {
            let st = s.state.read();
            if !st.tenants.contains_key(tenant) {
                return Err(RegistryError::NotFound(format!("tenant {tenant}")));
            }
            if !st.profiles.contains_key(&key(tenant, name)) {
                return Err(if name == DEFAULT_PROFILE {
                    RegistryError::Conflict(format!(
                        "tenant {tenant} uses the built-in default profile, which cannot be deleted"
                    ))
                } else {
                    RegistryError::NotFound(format!("profile {name} in tenant {tenant}"))
                });
            }
            if name != DEFAULT_PROFILE {
                let n = st
                    .devices
                    .values()
                    .filter(|d| d.tenant == tenant && d.profile == name)
                    .count();
                if n > 0 {
                    return Err(RegistryError::Conflict(format!(
                        "profile {name} is used by {n} device(s); give them another profile first"
                    )));
                }
                if let Some(c) = st
                    .claims
                    .values()
                    .find(|c| !c.info.revoked && c.info.tenant == tenant && c.info.profile == name)
                {
                    return Err(RegistryError::Conflict(format!(
                        "claim token {} provisions devices with profile {name}; revoke it first",
                        c.info.id
                    )));
                }
            }
        }
        s.store.delete_profile(tenant, name)?;
        let mut st = s.state.write();
        st.profiles.remove(&key(tenant, name));
        st.refresh_profile_users(tenant, name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;
    use crate::{ClaimSpec, DeviceUpdate, NewDevice};

    fn new(name: &str, ct: Option<&str>) -> NewProfile {
        NewProfile {
            name: name.into(),
            content_type: ct.map(str::to_string),
            description: String::new(),
        }
    }

    fn device(id: &str, tenant: &str, profile: Option<&str>) -> NewDevice {
        NewDevice {
            id: Some(id.into()),
            tenant: tenant.into(),
            profile: profile.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn crud_and_validation() {
        let (_d, reg) = open();
        reg.create_tenant("acme", "Acme").expect("tenant");
        let p = reg
            .create_profile(
                "acme",
                NewProfile {
                    description: "SenML meters".into(),
                    ..new("meter", Some(" Application/SenML+JSON "))
                },
            )
            .expect("create");
        assert_eq!(p.content_type.as_deref(), Some("application/senml+json"));
        assert!(matches!(
            reg.create_profile("acme", new("meter", None)),
            Err(RegistryError::AlreadyExists(_))
        ));
        // The same name in another tenant is another profile.
        reg.create_profile("default", new("meter", None))
            .expect("other tenant");
        for bad in ["application/xml", "application/json; charset=utf-8", ""] {
            let e = reg
                .create_profile("acme", new("x", Some(bad)))
                .expect_err(bad);
            assert!(
                matches!(&e, RegistryError::Validation(m) if m.contains("application/senml+cbor")),
                "{e}"
            );
        }
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(matches!(
                reg.create_profile("acme", new(bad, None)),
                Err(RegistryError::Validation(_))
            ));
        }
        assert!(matches!(
            reg.create_profile("nope", new("x", None)),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.create_profile(
                "acme",
                NewProfile {
                    description: "a\nb".into(),
                    ..new("x", None)
                }
            ),
            Err(RegistryError::Validation(_))
        ));

        assert_eq!(reg.get_profile("acme", "meter").expect("get"), p);
        let builtin = reg.get_profile("acme", "default").expect("built in");
        assert_eq!(builtin.content_type, None);
        assert!(matches!(
            reg.get_profile("acme", "nope"),
            Err(RegistryError::NotFound(_))
        ));
        let names = |t: Option<&str>| -> Vec<(String, String)> {
            reg.list_profiles(t)
                .expect("list")
                .into_iter()
                .map(|p| (p.tenant, p.name))
                .collect()
        };
        assert_eq!(
            names(Some("acme")),
            [
                ("acme".into(), "default".into()),
                ("acme".into(), "meter".into())
            ]
        );
        assert_eq!(names(None).len(), 4);

        let u = reg
            .update_profile(
                "acme",
                "meter",
                ProfileUpdate {
                    content_type: Some(Some("application/cbor".into())),
                    description: None,
                },
            )
            .expect("update");
        assert_eq!(u.content_type.as_deref(), Some("application/cbor"));
        assert_eq!(u.description, "SenML meters");
        assert!(matches!(
            reg.update_profile(
                "acme",
                "meter",
                ProfileUpdate {
                    content_type: Some(Some("image/png".into())),
                    ..Default::default()
                }
            ),
            Err(RegistryError::Validation(_))
        ));
        let cleared = reg
            .update_profile(
                "acme",
                "meter",
                ProfileUpdate {
                    content_type: Some(None),
                    ..Default::default()
                },
            )
            .expect("clear");
        assert_eq!(cleared.content_type, None);

        // The built-in default: updating stores it, deleting returns to it.
        assert!(matches!(
            reg.delete_profile("acme", "default"),
            Err(RegistryError::Conflict(_))
        ));
        let d = reg
            .update_profile(
                "acme",
                "default",
                ProfileUpdate {
                    content_type: Some(Some("text/plain".into())),
                    ..Default::default()
                },
            )
            .expect("store default");
        assert_eq!(d.content_type.as_deref(), Some("text/plain"));
        assert_eq!(names(Some("acme")).len(), 2);
        reg.delete_profile("acme", "default").expect("unstore");
        assert_eq!(
            reg.get_profile("acme", "default")
                .expect("built in")
                .content_type,
            None
        );

        reg.delete_profile("acme", "meter").expect("delete");
        assert!(matches!(
            reg.delete_profile("acme", "meter"),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn profiles_in_use_are_kept_and_names_are_checked() {
        let (_d, reg) = open();
        reg.create_tenant("acme", "Acme").expect("tenant");
        reg.create_profile("acme", new("meter", Some("application/json")))
            .expect("profile");
        // A device may only name a profile of its own tenant.
        assert!(matches!(
            reg.create_device(device("d0", "default", Some("meter"))),
            Err(RegistryError::Validation(_))
        ));
        reg.create_device(device("d1", "acme", Some("meter")))
            .expect("device");
        let e = reg.delete_profile("acme", "meter").expect_err("in use");
        assert!(matches!(&e, RegistryError::Conflict(m) if m.contains("1 device")));
        assert!(matches!(
            reg.update_device(
                "d1",
                DeviceUpdate {
                    profile: Some("ghost".into()),
                    ..Default::default()
                }
            ),
            Err(RegistryError::Validation(_))
        ));
        reg.update_device(
            "d1",
            DeviceUpdate {
                profile: Some("default".into()),
                ..Default::default()
            },
        )
        .expect("back to default");
        // An unrevoked claim token keeps its profile too.
        let (claim, _) = reg
            .create_claim_token(ClaimSpec {
                name: "batch".into(),
                tenant: "acme".into(),
                group: None,
                profile: Some("meter".into()),
                max_uses: 1,
                expires_ms: None,
            })
            .expect("claim");
        assert!(matches!(
            reg.delete_profile("acme", "meter"),
            Err(RegistryError::Conflict(_))
        ));
        reg.revoke_claim_token(&claim.id).expect("revoke");
        reg.delete_profile("acme", "meter").expect("now unused");
        assert!(matches!(
            reg.create_claim_token(ClaimSpec {
                name: "batch".into(),
                tenant: "acme".into(),
                group: None,
                profile: Some("meter".into()),
                max_uses: 1,
                expires_ms: None,
            }),
            Err(RegistryError::Validation(_))
        ));
    }

    #[test]
    fn ingest_info_follows_every_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = Registry::open(dir.path()).expect("open");
            reg.create_tenant("acme", "Acme").expect("tenant");
            assert_eq!(reg.ingest_info("d1"), None);
            reg.create_device(device("d1", "acme", None)).expect("d1");
            let info = reg.ingest_info("d1").expect("known");
            assert_eq!(&*info.tenant, "acme");
            assert_eq!(info.content_type, None);

            reg.create_profile("acme", new("senml", Some("application/senml+cbor")))
                .expect("profile");
            reg.update_device(
                "d1",
                DeviceUpdate {
                    profile: Some("senml".into()),
                    ..Default::default()
                },
            )
            .expect("set profile");
            assert_eq!(
                reg.ingest_info("d1").and_then(|i| i.content_type),
                Some("application/senml+cbor")
            );
            reg.update_profile(
                "acme",
                "senml",
                ProfileUpdate {
                    content_type: Some(Some("application/senml+json".into())),
                    ..Default::default()
                },
            )
            .expect("update profile");
            assert_eq!(
                reg.ingest_info("d1").and_then(|i| i.content_type),
                Some("application/senml+json")
            );

            // The stored default reaches default devices, including ones
            // created by a claim.
            reg.create_device(device("d2", "acme", None)).expect("d2");
            reg.update_profile(
                "acme",
                "default",
                ProfileUpdate {
                    content_type: Some(Some("application/json".into())),
                    ..Default::default()
                },
            )
            .expect("default");
            assert_eq!(
                reg.ingest_info("d2").and_then(|i| i.content_type),
                Some("application/json")
            );
            let (_c, secret) = reg
                .create_claim_token(ClaimSpec {
                    name: "b".into(),
                    tenant: "acme".into(),
                    group: None,
                    profile: None,
                    max_uses: 1,
                    expires_ms: None,
                })
                .expect("claim");
            let (claimed, _) = reg
                .redeem_claim(secret.as_bytes(), now_ms(), None)
                .expect("redeem");
            assert_eq!(
                reg.ingest_info(&claimed.id).and_then(|i| i.content_type),
                Some("application/json")
            );
            // Another tenant's default is not affected.
            reg.create_device(device("d3", "default", None))
                .expect("d3");
            assert_eq!(reg.ingest_info("d3").and_then(|i| i.content_type), None);

            reg.delete_device("d2").expect("delete");
            assert_eq!(reg.ingest_info("d2"), None);
        }
        // Rebuilt from the file at open.
        let reg = Registry::open(dir.path()).expect("reopen");
        assert_eq!(
            reg.ingest_info("d1").and_then(|i| i.content_type),
            Some("application/senml+json")
        );
        reg.delete_profile("acme", "default")
            .expect("unstore default");
        assert_eq!(
            reg.ingest_info("d1").map(|i| i.tenant.to_string()),
            Some("acme".into())
        );
        let default_dev = reg
            .list_devices(&crate::DeviceFilter {
                tenant: Some("acme".into()),
                profile: Some("default".into()),
                ..Default::default()
            })
            .expect("list");
        assert!(!default_dev.is_empty());
        for d in default_dev {
            assert_eq!(reg.ingest_info(&d.id).and_then(|i| i.content_type), None);
        }
    }
}
