//! Devices: the things that connect. A device's id is also its MQTT client
//! id and the root of its topic namespace, hence the restricted alphabet.

use crate::error::{RegistryError, Result};
use crate::{now_ms, secret, validate_id, validate_name, Registry, Seen, State, DEFAULT_TENANT};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub group: Option<String>,
    pub profile: String,
    pub labels: BTreeMap<String, String>,
    pub enabled: bool,
    pub created_ms: i64,
    pub last_seen_ms: Option<i64>,
    /// The address (IP, without port) of the latest connection.
    pub last_addr: Option<String>,
}

/// What `create_device` needs; everything but the tenant has a default.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Generated (`dev-<12 hex>`) when `None`.
    pub id: Option<String>,
    /// Defaults to the id.
    pub name: Option<String>,
    pub tenant: String,
    pub group: Option<String>,
    /// Defaults to `default`.
    pub profile: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub enabled: bool,
}

impl Default for NewDevice {
    fn default() -> Self {
        NewDevice {
            id: None,
            name: None,
            tenant: DEFAULT_TENANT.into(),
            group: None,
            profile: None,
            labels: BTreeMap::new(),
            enabled: true,
        }
    }
}

/// A partial update: `None` leaves a field alone. The tenant cannot change:
/// moving a device between tenants would carry its credentials across the
/// isolation boundary.
#[derive(Debug, Clone, Default)]
pub struct DeviceUpdate {
    pub name: Option<String>,
    /// `Some(None)` removes the device from its group.
    pub group: Option<Option<String>>,
    pub profile: Option<String>,
    /// Replaces all labels.
    pub labels: Option<BTreeMap<String, String>>,
}

/// Filters for `list_devices`; all present filters must match.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub tenant: Option<String>,
    pub group: Option<String>,
    pub profile: Option<String>,
    /// `key=value`, or just `key` for "has this label".
    pub label: Option<String>,
    /// Case-insensitive substring of the id or the name.
    pub search: Option<String>,
    pub enabled: Option<bool>,
    /// Cursor: only ids strictly after this one (results are in id order).
    pub after: Option<String>,
    /// Defaults to 100, at most 10,000.
    pub limit: Option<usize>,
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > 64 {
        return Err(RegistryError::Validation("at most 64 labels".into()));
    }
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > 64
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        {
            return Err(RegistryError::Validation(format!(
                "label key {k:?} must be 1 to 64 characters from A-Z a-z 0-9 . _ - /"
            )));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(RegistryError::Validation(format!(
                "label {k}: value must be at most 256 characters without control characters"
            )));
        }
    }
    Ok(())
}

fn validate_profile(p: &str) -> Result<()> {
    if p.is_empty() || p.len() > 64 || p.chars().any(char::is_control) {
        return Err(RegistryError::Validation(
            "profile must be 1 to 64 characters without control characters".into(),
        ));
    }
    Ok(())
}

/// A device may only name a profile its tenant has (or the built-in
/// `default`), so the ingest never has to guess what a misspelt profile
/// meant.
fn check_profile(st: &State, tenant: &str, profile: &str) -> Result<()> {
    validate_profile(profile)?;
    if !st.profile_exists(tenant, profile) {
        return Err(RegistryError::Validation(format!(
            "profile {profile:?} does not exist in tenant {tenant}: create it first, or use \"default\""
        )));
    }
    Ok(())
}

fn check_group(st: &State, tenant: &str, group: Option<&str>) -> Result<()> {
    if let Some(g) = group {
        if !st.groups.contains_key(&(tenant.to_string(), g.to_string())) {
            return Err(RegistryError::NotFound(format!(
                "group {g} in tenant {tenant}"
            )));
        }
    }
    Ok(())
}

/// Check where a device would be created: the tenant, group and profile
/// exist. Claim tokens check the same at creation so a
/// claim can never be created that cannot be redeemed.
pub(crate) fn check_placement(
    st: &State,
    tenant: &str,
    group: Option<&str>,
    profile: &str,
) -> Result<()> {
    if !st.tenants.contains_key(tenant) {
        return Err(RegistryError::NotFound(format!("tenant {tenant}")));
    }
    check_group(st, tenant, group)?;
    check_profile(st, tenant, profile)
}

impl Registry {
    /// Validate a new device against the current state and build its record
    /// (the caller holds the writer lock and stores it).
    pub(crate) fn prepare_device(st: &State, new: NewDevice, now: i64) -> Result<Device> {
        let profile = new.profile.unwrap_or_else(|| "default".into());
        check_placement(st, &new.tenant, new.group.as_deref(), &profile)?;
        let id = match new.id {
            Some(id) => {
                validate_id("device", &id)?;
                if st.devices.contains_key(&id) {
                    return Err(RegistryError::AlreadyExists(format!("device {id}")));
                }
                id
            }
            None => loop {
                let id = secret::new_id("dev");
                if !st.devices.contains_key(&id) {
                    break id;
                }
            },
        };
        let name = new.name.unwrap_or_else(|| id.clone());
        validate_name("device", &name)?;
        validate_labels(&new.labels)?;
        Ok(Device {
            id,
            name,
            tenant: new.tenant,
            group: new.group,
            profile,
            labels: new.labels,
            enabled: new.enabled,
            created_ms: now,
            last_seen_ms: None,
            last_addr: None,
        })
    }

    pub fn create_device(&self, new: NewDevice) -> Result<Device> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let d = Self::prepare_device(&s.state.read(), new, now_ms())?;
        s.store.insert_device(&d)?;
        s.state.write().put_device(d.clone());
        Ok(d)
    }

    /// The device with its latest last-seen information.
    pub fn get_device(&self, id: &str) -> Result<Device> {
        let mut d = self
            .shared
            .state
            .read()
            .devices
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("device {id}")))?;
        self.overlay_seen(std::slice::from_mut(&mut d));
        Ok(d)
    }

    fn overlay_seen(&self, devices: &mut [Device]) {
        let seen = self.shared.seen.lock();
        for d in devices {
            if let Some(s) = seen.get(&d.id) {
                d.last_seen_ms = Some(s.ms);
                d.last_addr = Some(s.addr.clone());
            }
        }
    }

    pub fn update_device(&self, id: &str, u: DeviceUpdate) -> Result<Device> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut d = {
            let st = s.state.read();
            let mut d = st
                .devices
                .get(id)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound(format!("device {id}")))?;
            if let Some(name) = u.name {
                validate_name("device", &name)?;
                d.name = name;
            }
            if let Some(group) = u.group {
                check_group(&st, &d.tenant, group.as_deref())?;
                d.group = group;
            }
            if let Some(p) = u.profile {
                // Re-stating the current profile is always fine, even one
                // from before profiles had to exist.
                if p != d.profile {
                    check_profile(&st, &d.tenant, &p)?;
                }
                d.profile = p;
            }
            if let Some(l) = u.labels {
                validate_labels(&l)?;
                d.labels = l;
            }
            d
        };
        s.store.update_device(&d)?;
        s.state.write().put_device(d.clone());
        self.overlay_seen(std::slice::from_mut(&mut d));
        Ok(d)
    }

    /// Disabling takes effect at the next CONNECT and, through
    /// [`Registry::authorize`], at the next PUBLISH or SUBSCRIBE.
    pub fn set_device_enabled(&self, id: &str, enabled: bool) -> Result<Device> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut d = s
            .state
            .read()
            .devices
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("device {id}")))?;
        d.enabled = enabled;
        s.store.update_device(&d)?;
        s.state.write().put_device(d.clone());
        Ok(d)
    }

    /// Delete a device, its tokens and its PSKs, after every [`DeviceRemoval`](crate::DeviceRemoval)
    /// listener has deleted what it keeps about it. Its certificates
    /// are kept, revoked, so they stay in the CRL and can never authenticate
    /// a later device that reuses the id.
    pub fn delete_device(&self, id: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        if !s.state.read().devices.contains_key(id) {
            return Err(RegistryError::NotFound(format!("device {id}")));
        }
        // What other domains keep about the device goes first: a failure
        // there leaves the device (and its credentials) in place.
        let listeners: Vec<_> = s
            .removal
            .read()
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        for l in listeners {
            l.device_removed(id)?;
        }
        let now = now_ms();
        s.store.delete_device(id, now)?;
        {
            let mut st = s.state.write();
            st.remove_device(id);
            st.tokens.remove(id);
            let psks = st.psks.remove_device(id);
            let mut used = s.psk_used.lock();
            for p in psks {
                used.remove(&p);
            }
            drop(used);
            for c in st.certs.values_mut() {
                if c.device_id == id && c.revoked_ms.is_none() {
                    c.revoked_ms = Some(now);
                }
            }
        }
        s.seen.lock().remove(id);
        Ok(())
    }

    /// Run `f` on a device's record without copying it (`None` when there
    /// is no such device): other domains' existence and tenant checks.
    pub fn with_device<R>(&self, id: &str, f: impl FnOnce(&Device) -> R) -> Option<R> {
        self.shared.state.read().devices.get(id).map(f)
    }

    /// Listen for device deletions (see [`DeviceRemoval`](crate::DeviceRemoval)).
    pub fn add_device_removal(&self, listener: std::sync::Weak<dyn crate::DeviceRemoval>) {
        let mut l = self.shared.removal.write();
        l.retain(|w| w.strong_count() > 0);
        l.push(listener);
    }

    /// Devices matching every filter, in id order, at most `limit`.
    pub fn list_devices(&self, f: &DeviceFilter) -> Result<Vec<Device>> {
        let limit = f.limit.unwrap_or(100).clamp(1, 10_000);
        let label = f.label.as_deref().map(|l| match l.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (l, None),
        });
        let search = f.search.as_deref().map(str::to_lowercase);
        let st = self.shared.state.read();
        let start = match f.after.as_deref() {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut out: Vec<Device> = st
            .devices
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(_, d)| d)
            .filter(|d| f.tenant.as_deref().is_none_or(|t| d.tenant == t))
            .filter(|d| {
                f.group
                    .as_deref()
                    .is_none_or(|g| d.group.as_deref() == Some(g))
            })
            .filter(|d| f.profile.as_deref().is_none_or(|p| d.profile == p))
            .filter(|d| f.enabled.is_none_or(|e| d.enabled == e))
            .filter(|d| {
                label.is_none_or(|(k, v)| match (d.labels.get(k), v) {
                    (Some(have), Some(want)) => have == want,
                    (Some(_), None) => true,
                    (None, _) => false,
                })
            })
            .filter(|d| {
                search.as_deref().is_none_or(|q| {
                    d.id.to_lowercase().contains(q) || d.name.to_lowercase().contains(q)
                })
            })
            .take(limit)
            .cloned()
            .collect();
        drop(st);
        self.overlay_seen(&mut out);
        Ok(out)
    }

    pub fn count_devices(&self, tenant: Option<&str>) -> Result<u64> {
        let st = self.shared.state.read();
        let n = match tenant {
            None => st.devices.len(),
            Some(t) => st.devices.values().filter(|d| d.tenant == t).count(),
        };
        Ok(n as u64)
    }

    /// Note a device's connection from `addr` (pass the IP without the port:
    /// ports change with every connection). Updates memory at once and
    /// persists at most once per device per minute, so it is cheap on every
    /// CONNECT. Returns the previous address when it differs: a "new
    /// address" security signal. Unknown devices are ignored.
    pub fn record_seen(&self, device_id: &str, addr: &str) -> Option<String> {
        let stored_addr = {
            let st = self.shared.state.read();
            let d = st.devices.get(device_id)?;
            d.last_addr.clone()
        };
        let now = now_ms();
        let mut seen = self.shared.seen.lock();
        let prev = match seen.get_mut(device_id) {
            Some(s) => {
                let prev = std::mem::replace(&mut s.addr, addr.to_string());
                s.ms = now;
                s.dirty = true;
                Some(prev)
            }
            None => {
                seen.insert(
                    device_id.to_string(),
                    Seen {
                        ms: now,
                        addr: addr.to_string(),
                        persisted_ms: 0,
                        dirty: true,
                    },
                );
                stored_addr
            }
        };
        prev.filter(|p| p != addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;

    fn new(id: &str) -> NewDevice {
        NewDevice {
            id: Some(id.into()),
            ..Default::default()
        }
    }

    #[test]
    fn crud() {
        let (_d, reg) = open();
        let d = reg.create_device(new("pump-1")).expect("create");
        assert_eq!(d.name, "pump-1");
        assert_eq!(d.profile, "default");
        assert_eq!(d.tenant, "default");
        assert!(d.enabled);
        assert!(matches!(
            reg.create_device(new("pump-1")),
            Err(RegistryError::AlreadyExists(_))
        ));
        for bad in ["", "a/b", "a+b", "a#", "ünï", &"x".repeat(65)] {
            assert!(
                matches!(
                    reg.create_device(new(bad)),
                    Err(RegistryError::Validation(_))
                ),
                "{bad:?}"
            );
        }
        let gen = reg.create_device(NewDevice::default()).expect("generated");
        assert!(gen.id.starts_with("dev-") && gen.id.len() == 16);
        assert!(matches!(
            reg.create_device(NewDevice {
                group: Some("nope".into()),
                ..new("x")
            }),
            Err(RegistryError::NotFound(_))
        ));
        reg.create_group("default", "pumps", "Pumps")
            .expect("group");
        reg.create_profile(
            "default",
            crate::NewProfile {
                name: "pump-v2".into(),
                ..Default::default()
            },
        )
        .expect("profile");
        let mut labels = BTreeMap::new();
        labels.insert("site".to_string(), "north".to_string());
        let u = reg
            .update_device(
                "pump-1",
                DeviceUpdate {
                    name: Some("Pump one".into()),
                    group: Some(Some("pumps".into())),
                    profile: Some("pump-v2".into()),
                    labels: Some(labels.clone()),
                },
            )
            .expect("update");
        assert_eq!(u.group.as_deref(), Some("pumps"));
        assert_eq!(reg.get_device("pump-1").expect("get"), u);
        assert!(matches!(
            reg.delete_group("default", "pumps"),
            Err(RegistryError::Conflict(_))
        ));
        let off = reg.set_device_enabled("pump-1", false).expect("disable");
        assert!(!off.enabled);
        reg.delete_device("pump-1").expect("delete");
        assert!(matches!(
            reg.get_device("pump-1"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.delete_device("pump-1"),
            Err(RegistryError::NotFound(_))
        ));
        reg.delete_group("default", "pumps").expect("now empty");
    }

    #[test]
    fn paging_and_filters() {
        let (_d, reg) = open();
        reg.create_tenant("acme", "Acme").expect("tenant");
        reg.create_group("acme", "g1", "G1").expect("group");
        for t in ["acme", "default"] {
            for p in ["p3", "px"] {
                reg.create_profile(
                    t,
                    crate::NewProfile {
                        name: p.into(),
                        ..Default::default()
                    },
                )
                .expect("profile");
            }
        }
        for i in 0..25 {
            let mut labels = BTreeMap::new();
            labels.insert("parity".to_string(), (i % 2).to_string());
            reg.create_device(NewDevice {
                id: Some(format!("d{i:02}")),
                name: Some(format!("Sensor {i}")),
                tenant: if i < 10 {
                    "acme".into()
                } else {
                    "default".into()
                },
                group: if i < 5 { Some("g1".into()) } else { None },
                profile: Some(if i % 3 == 0 { "p3" } else { "px" }.into()),
                labels,
                enabled: i != 7,
            })
            .expect("create");
        }
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = reg
                .list_devices(&DeviceFilter {
                    after: after.clone(),
                    limit: Some(10),
                    ..Default::default()
                })
                .expect("page");
            if page.is_empty() {
                break;
            }
            after = page.last().map(|d| d.id.clone());
            all.extend(page);
        }
        assert_eq!(all.len(), 25);
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        let count = |f: DeviceFilter| reg.list_devices(&f).expect("list").len();
        assert_eq!(
            count(DeviceFilter {
                tenant: Some("acme".into()),
                ..Default::default()
            }),
            10
        );
        assert_eq!(
            count(DeviceFilter {
                group: Some("g1".into()),
                ..Default::default()
            }),
            5
        );
        assert_eq!(
            count(DeviceFilter {
                profile: Some("p3".into()),
                ..Default::default()
            }),
            9
        );
        assert_eq!(
            count(DeviceFilter {
                label: Some("parity=1".into()),
                ..Default::default()
            }),
            12
        );
        assert_eq!(
            count(DeviceFilter {
                label: Some("parity".into()),
                ..Default::default()
            }),
            25
        );
        assert_eq!(
            count(DeviceFilter {
                label: Some("nope".into()),
                ..Default::default()
            }),
            0
        );
        assert_eq!(
            count(DeviceFilter {
                enabled: Some(false),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            count(DeviceFilter {
                search: Some("SENSOR 1".into()),
                ..Default::default()
            }),
            11
        );
        assert_eq!(
            count(DeviceFilter {
                search: Some("d2".into()),
                ..Default::default()
            }),
            5
        );
        assert_eq!(reg.count_devices(None).expect("count"), 25);
        assert_eq!(reg.count_devices(Some("acme")).expect("count"), 10);
    }

    #[test]
    fn record_seen_reports_new_addresses_and_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = Registry::open(dir.path()).expect("open");
            reg.create_device(new("t1")).expect("create");
            assert_eq!(reg.record_seen("t1", "10.0.0.1"), None);
            assert_eq!(reg.record_seen("t1", "10.0.0.1"), None);
            assert_eq!(
                reg.record_seen("t1", "10.0.0.2").as_deref(),
                Some("10.0.0.1")
            );
            assert_eq!(reg.record_seen("ghost", "10.0.0.2"), None);
            let d = reg.get_device("t1").expect("get");
            assert_eq!(d.last_addr.as_deref(), Some("10.0.0.2"));
            assert!(d.last_seen_ms.is_some());
        }
        let reg = Registry::open(dir.path()).expect("reopen");
        let d = reg.get_device("t1").expect("get");
        assert_eq!(d.last_addr.as_deref(), Some("10.0.0.2"));
        assert_eq!(
            reg.record_seen("t1", "10.0.0.3").as_deref(),
            Some("10.0.0.2")
        );
    }
}
