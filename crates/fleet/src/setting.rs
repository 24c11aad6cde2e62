//! Fleet-wide desired settings: one call sets desired keys in the shadows of
//! every device a selector picks — a group, a label, a profile, or a whole
//! tenant (demand response: 10,000 setpoints at once) — and its progress is
//! how many of those devices have *reported* the value since.
//!
//! The setting is recorded with its targets (the devices selected when it
//! was made), so progress is counted against them even as the fleet
//! changes. Applying writes every shadow in one store transaction, so ten
//! thousand devices cost one commit, not ten thousand.

use crate::shadow::{self, Shadow, ShadowChange, ShadowUpdate, ShadowWriter, UpdateState};
use crate::{random_id, Fleet, RegistryError, Result};
use m2mhub_identity::{now_ms, DeviceFilter};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Devices one setting may target at most.
pub const MAX_TARGETS: usize = 100_000;
/// Settings kept (the oldest are forgotten past this).
pub const KEPT: usize = 1_000;

/// Which devices of a tenant a setting targets (all given filters apply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub group: Option<String>,
    /// `key=value`, or `key` for "has this label".
    pub label: Option<String>,
    pub profile: Option<String>,
}

/// A fleet-wide desired setting as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSetting {
    pub id: String,
    pub tenant: String,
    pub selector: Selector,
    /// `""`: the classic shadow.
    pub shadow: String,
    /// The desired keys set.
    pub state: Map<String, Value>,
    pub targets: Vec<String>,
    /// Devices whose shadow refused the update, with the reason.
    pub failed: Vec<(String, String)>,
    pub created_ms: i64,
    pub created_by: String,
}

/// Where a setting stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub targeted: usize,
    /// Devices whose reported state has every key of the setting, equal.
    pub reported: usize,
    /// Devices still to report it (the first 100 are listed).
    pub pending: usize,
    pub pending_devices: Vec<String>,
    pub failed: usize,
}

/// Whether `reported` holds every key of `want` with the same value
/// (recursively for objects).
fn holds(reported: &Map<String, Value>, want: &Map<String, Value>) -> bool {
    want.iter().all(|(k, w)| match (w, reported.get(k)) {
        (Value::Null, r) => r.is_none(),
        (Value::Object(wm), Some(Value::Object(rm))) => holds(rm, wm),
        (w, Some(r)) => w == r,
        (_, None) => false,
    })
}

impl Fleet {
    /// Set `state` as desired in the `shadow` of every device of `tenant`
    /// that `selector` picks. Returns the recorded setting and the accepted
    /// changes (publish their answers to tell the devices).
    pub fn apply_setting(
        &self,
        tenant: &str,
        selector: Selector,
        shadow_name: &str,
        state: Map<String, Value>,
        by: &str,
    ) -> Result<(FleetSetting, Vec<ShadowChange>)> {
        shadow::validate_name(shadow_name)?;
        if state.is_empty() {
            return Err(RegistryError::Validation(
                "`state` must have at least one desired key".into(),
            ));
        }
        let identity = &self.shared.identity;
        if !identity.has_tenant(tenant) {
            return Err(RegistryError::NotFound(format!("tenant {tenant}")));
        }
        let mut targets = Vec::new();
        let mut after = None;
        loop {
            let page = identity.list_devices(&DeviceFilter {
                tenant: Some(tenant.into()),
                group: selector.group.clone(),
                label: selector.label.clone(),
                profile: selector.profile.clone(),
                after: after.take(),
                limit: Some(10_000),
                ..Default::default()
            })?;
            let full = page.len() == 10_000;
            after = page.last().map(|d| d.id.clone());
            targets.extend(page.into_iter().map(|d| d.id));
            if targets.len() > MAX_TARGETS {
                return Err(RegistryError::Validation(format!(
                    "the selector picks more than {MAX_TARGETS} devices; narrow it"
                )));
            }
            if !full {
                break;
            }
        }
        if targets.is_empty() {
            return Err(RegistryError::Validation(format!(
                "the selector picks no device of tenant {tenant}: check the group, label or profile"
            )));
        }
        let id = random_id("set-");
        // The setting's id is each change's client token: a device can
        // tell which setting a delta came from.
        let update = ShadowUpdate {
            state: UpdateState {
                desired: Some(Value::Object(state.clone())),
                reported: None,
            },
            version: None,
            client_token: Some(id.clone()),
        };
        let now = now_ms();
        let s = &*self.shared;
        let mut failed = Vec::new();
        let mut changes = Vec::with_capacity(targets.len());
        {
            let mut shadows = s.shadows.lock();
            for d in &targets {
                let applied = shadows.check_room(d, shadow_name).and_then(|()| {
                    shadow::apply(
                        shadows.get(d, shadow_name),
                        tenant,
                        d,
                        shadow_name,
                        &update,
                        ShadowWriter::Platform,
                        now,
                    )
                });
                match applied {
                    Ok(c) => changes.push(c),
                    Err(e) => failed.push((d.clone(), e.to_string())),
                }
            }
            // One conditional write per shadow, in one transaction; the
            // shadows another node changed meanwhile are read again and
            // written one by one.
            let written = {
                let batch: Vec<(&Shadow, u64)> = changes
                    .iter()
                    .map(|c| (&c.current, c.current.version.saturating_sub(1)))
                    .collect();
                s.store.put_shadows_if(&batch)?
            };
            let mut done = Vec::with_capacity(changes.len());
            for (c, ok) in changes.into_iter().zip(written) {
                if ok {
                    shadows.insert(c.current.clone());
                    done.push(c);
                    continue;
                }
                let d = c.current.device_id.clone();
                let again = shadow::reread(s, &mut shadows, &d, shadow_name).and_then(|()| {
                    shadow::write_shadow(
                        s,
                        &mut shadows,
                        tenant,
                        &d,
                        shadow_name,
                        &update,
                        ShadowWriter::Platform,
                    )
                });
                match again {
                    Ok(c) => done.push(c),
                    Err(e) => failed.push((d, e.to_string())),
                }
            }
            changes = done;
            s.tell_watcher(&changes);
        }
        let setting = FleetSetting {
            id,
            tenant: tenant.into(),
            selector,
            shadow: shadow_name.into(),
            state,
            targets,
            failed,
            created_ms: now,
            created_by: by.into(),
        };
        s.store.put_setting(&setting, KEPT)?;
        Ok((setting, changes))
    }

    /// A recorded setting (`tenant`: only if it is that tenant's).
    pub fn get_setting(&self, tenant: Option<&str>, id: &str) -> Result<FleetSetting> {
        self.shared
            .store
            .get_setting(id)?
            .filter(|s| tenant.is_none_or(|t| s.tenant == t))
            .ok_or_else(|| RegistryError::NotFound(format!("setting {id}")))
    }

    /// Recorded settings, newest first (of one tenant, or all).
    pub fn list_settings(&self, tenant: Option<&str>, limit: usize) -> Result<Vec<FleetSetting>> {
        self.shared
            .store
            .list_settings(tenant, limit.clamp(1, KEPT))
    }

    /// How many targets have reported the setting's value.
    pub fn setting_progress(&self, setting: &FleetSetting) -> Progress {
        let shadows = self.shared.shadows.lock();
        let failed: std::collections::HashSet<&str> =
            setting.failed.iter().map(|(d, _)| d.as_str()).collect();
        let mut reported = 0;
        let mut pending_devices = Vec::new();
        let mut pending = 0;
        for d in &setting.targets {
            if failed.contains(d.as_str()) {
                continue;
            }
            let done = shadows
                .get(d, &setting.shadow)
                .is_some_and(|s| holds(&s.reported, &setting.state));
            if done {
                reported += 1;
            } else {
                pending += 1;
                if pending_devices.len() < 100 {
                    pending_devices.push(d.clone());
                }
            }
        }
        Progress {
            targeted: setting.targets.len(),
            reported,
            pending,
            pending_devices,
            failed: failed.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;
    use m2mhub_identity::NewDevice;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[test]
    fn a_setting_reaches_the_selected_devices_and_counts_their_reports() {
        let (_d, f) = open();
        f.identity()
            .create_group("default", "north", "North")
            .expect("group");
        for i in 0..30 {
            let mut labels = BTreeMap::new();
            labels.insert(
                "site".to_string(),
                if i % 2 == 0 { "a" } else { "b" }.to_string(),
            );
            f.identity()
                .create_device(NewDevice {
                    id: Some(format!("m{i:02}")),
                    group: (i < 20).then(|| "north".to_string()),
                    labels,
                    ..Default::default()
                })
                .expect("device");
        }
        let state = json!({"setpoint": 19, "mode": {"eco": true}})
            .as_object()
            .cloned()
            .expect("map");
        let (set, changes) = f
            .apply_setting(
                "default",
                Selector {
                    group: Some("north".into()),
                    label: Some("site=a".into()),
                    profile: None,
                },
                "",
                state,
                "ops",
            )
            .expect("applied");
        assert_eq!(set.targets.len(), 10, "even-numbered devices of the group");
        assert_eq!(changes.len(), 10);
        assert!(changes
            .iter()
            .all(|c| c.delta().is_some_and(|d| d["clientToken"] == json!(set.id))));
        let p = f.setting_progress(&set);
        assert_eq!((p.targeted, p.reported, p.pending), (10, 0, 10));
        // Three devices report the value (one only partly).
        for (d, reported) in [
            (
                "m00",
                json!({"setpoint": 19, "mode": {"eco": true, "fan": 2}}),
            ),
            ("m02", json!({"setpoint": 19, "mode": {"eco": true}})),
            ("m04", json!({"setpoint": 19})),
        ] {
            f.update_shadow(
                "default",
                d,
                "",
                &serde_json::from_value(json!({"state": {"reported": reported}})).expect("update"),
                ShadowWriter::Device,
            )
            .expect("report");
        }
        let again = f.get_setting(Some("default"), &set.id).expect("recorded");
        let p = f.setting_progress(&again);
        assert_eq!((p.reported, p.pending), (2, 8));
        assert!(p.pending_devices.contains(&"m04".to_string()));
        assert_eq!(f.list_settings(Some("default"), 10).expect("list").len(), 1);
        assert!(f.get_setting(Some("other"), &set.id).is_err());
        assert!(f
            .apply_setting("default", Selector::default(), "", Map::new(), "ops")
            .is_err());
    }
}
