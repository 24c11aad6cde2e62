//! Dashboards operators build and save, per tenant, and the read-only
//! links that share them.
//!
//! A dashboard is a name and a *layout*: a JSON document `{"widgets":
//! [...]}` whose widgets the console draws in order (value, chart, gauge,
//! map, alarm list, device table, group aggregate; see [`WIDGET_TYPES`]).
//! The platform checks only its shape and size — what a widget shows is
//! resolved when it is read (`api/src/dashboards.rs`), always within the
//! dashboard's tenant. A dashboard may be the *default of a device
//! profile* (at most one per tenant and profile): opened for a device,
//! its widgets that name no device show that device.
//!
//! A share is a viewer token scoped to one dashboard: only its SHA-256 is
//! stored, it expires, and it can be revoked; whoever holds the link sees
//! that dashboard read-only, and nothing else. Dashboards are read rarely
//! and written by hand, so nothing is cached: every call goes to the
//! [`FleetStore`](crate::FleetStore), under the fleet's writer lock for
//! writes.

use crate::{random_id, Fleet, RegistryError, Result};
use m2mhub_identity::now_ms;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kinds of widget the console can draw.
pub const WIDGET_TYPES: [&str; 7] = [
    "value", "chart", "gauge", "map", "alarms", "devices", "group",
];
/// Widgets per dashboard.
pub const MAX_WIDGETS: usize = 48;
/// The layout's JSON, at most.
pub const MAX_LAYOUT_BYTES: usize = 64 * 1024;
/// Dashboards per tenant.
pub const MAX_PER_TENANT: usize = 500;
/// Live shares per dashboard.
pub const MAX_SHARES: usize = 50;
/// The longest a share may live.
pub const MAX_SHARE_MS: i64 = 365 * 86_400_000;

/// A saved dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dashboard {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub description: String,
    /// This dashboard is the default of the tenant's devices of this
    /// profile.
    pub profile: Option<String>,
    /// `{"widgets": [{"type": …, …}, …]}`.
    pub layout: Value,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub updated_by: String,
}

/// A read-only link to one dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardShare {
    pub id: String,
    pub dashboard_id: String,
    pub tenant: String,
    /// Hex SHA-256 of the token (the token itself is shown once).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub token_hash: String,
    pub created_by: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub revoked_ms: Option<i64>,
}

impl DashboardShare {
    /// Usable at `now`: not revoked, not expired.
    pub fn live(&self, now: i64) -> bool {
        self.revoked_ms.is_none() && now < self.expires_ms
    }
}

/// What a new dashboard has.
#[derive(Debug, Clone, Default)]
pub struct NewDashboard {
    pub id: Option<String>,
    pub name: String,
    pub description: String,
    pub profile: Option<String>,
    pub layout: Value,
}

/// A change: absent fields stay (`profile: Some(None)` unsets it).
#[derive(Debug, Clone, Default)]
pub struct DashboardUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub profile: Option<Option<String>>,
    pub layout: Option<Value>,
}

fn invalid(msg: impl Into<String>) -> RegistryError {
    RegistryError::Validation(msg.into())
}

/// Check a layout's shape: an object with a `widgets` array of objects,
/// each with a known `type`; bounded in count and size.
pub fn validate_layout(layout: &Value) -> Result<()> {
    let size = serde_json::to_vec(layout)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_LAYOUT_BYTES {
        return Err(invalid(format!(
            "the layout is {size} bytes; at most {MAX_LAYOUT_BYTES}"
        )));
    }
    let widgets = layout
        .get("widgets")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("`layout` must be an object with a `widgets` array"))?;
    if widgets.len() > MAX_WIDGETS {
        return Err(invalid(format!("at most {MAX_WIDGETS} widgets")));
    }
    for (i, w) in widgets.iter().enumerate() {
        let ty = w
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("widget {i}: an object with a `type` is required")))?;
        if !WIDGET_TYPES.contains(&ty) {
            return Err(invalid(format!(
                "widget {i}: unknown type {ty:?}; use {}",
                WIDGET_TYPES.join(", ")
            )));
        }
        if let Some(width) = w.get("width") {
            if !width.as_u64().is_some_and(|n| (1..=4).contains(&n)) {
                return Err(invalid(format!(
                    "widget {i}: `width` must be 1 to 4 columns"
                )));
            }
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > 128 {
        return Err(invalid("`name` must be 1 to 128 bytes"));
    }
    Ok(())
}

fn token_hash(token: &str) -> String {
    m2mhub_identity::ids::hex(
        ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref(),
    )
}

impl Fleet {
    /// A tenant's dashboards (every tenant's with `None`), by name.
    pub fn list_dashboards(&self, tenant: Option<&str>) -> Result<Vec<Dashboard>> {
        let mut v = self.shared.store.list_dashboards(tenant)?;
        v.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        Ok(v)
    }

    pub fn get_dashboard(&self, id: &str) -> Result<Dashboard> {
        self.shared
            .store
            .get_dashboard(id)?
            .ok_or_else(|| RegistryError::NotFound(format!("dashboard {id}")))
    }

    /// The default dashboard of a tenant's devices of `profile`.
    pub fn profile_dashboard(&self, tenant: &str, profile: &str) -> Result<Option<Dashboard>> {
        Ok(self
            .shared
            .store
            .list_dashboards(Some(tenant))?
            .into_iter()
            .find(|d| d.profile.as_deref() == Some(profile)))
    }

    /// A second default for the same profile would leave the console to
    /// guess which one a device opens.
    fn check_profile_free(&self, tenant: &str, profile: Option<&str>, except: &str) -> Result<()> {
        if let Some(p) = profile {
            if let Some(other) = self.profile_dashboard(tenant, p)? {
                if other.id != except {
                    return Err(RegistryError::Conflict(format!(
                        "dashboard {} is already the default of profile {p}",
                        other.id
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn create_dashboard(&self, tenant: &str, new: NewDashboard, by: &str) -> Result<Dashboard> {
        check_name(&new.name)?;
        validate_layout(&new.layout)?;
        if !self.shared.identity.has_tenant(tenant) {
            return Err(RegistryError::NotFound(format!("tenant {tenant}")));
        }
        let _w = self.shared.write.lock();
        if self.shared.store.list_dashboards(Some(tenant))?.len() >= MAX_PER_TENANT {
            return Err(invalid(format!(
                "at most {MAX_PER_TENANT} dashboards per tenant"
            )));
        }
        let id = match new.id {
            Some(id) => {
                m2mhub_identity::validate_id("dashboard", &id)?;
                if self.shared.store.get_dashboard(&id)?.is_some() {
                    return Err(RegistryError::AlreadyExists(format!("dashboard {id}")));
                }
                id
            }
            None => random_id("dash-"),
        };
        self.check_profile_free(tenant, new.profile.as_deref(), &id)?;
        let now = now_ms();
        let d = Dashboard {
            id,
            tenant: tenant.into(),
            name: new.name,
            description: new.description,
            profile: new.profile,
            layout: new.layout,
            created_ms: now,
            updated_ms: now,
            updated_by: by.into(),
        };
        self.shared.store.put_dashboard(&d)?;
        Ok(d)
    }

    pub fn update_dashboard(&self, id: &str, u: DashboardUpdate, by: &str) -> Result<Dashboard> {
        let _w = self.shared.write.lock();
        let mut d = self.get_dashboard(id)?;
        if let Some(n) = u.name {
            check_name(&n)?;
            d.name = n;
        }
        if let Some(desc) = u.description {
            d.description = desc;
        }
        if let Some(p) = u.profile {
            self.check_profile_free(&d.tenant, p.as_deref(), id)?;
            d.profile = p;
        }
        if let Some(l) = u.layout {
            validate_layout(&l)?;
            d.layout = l;
        }
        d.updated_ms = now_ms();
        d.updated_by = by.into();
        self.shared.store.put_dashboard(&d)?;
        Ok(d)
    }

    /// Delete a dashboard and its shares (their links stop at once).
    pub fn delete_dashboard(&self, id: &str) -> Result<()> {
        let _w = self.shared.write.lock();
        self.get_dashboard(id)?;
        self.shared.store.delete_dashboard(id)
    }

    /// A new read-only link to a dashboard, valid for `valid_ms`. Returns
    /// the share and its token (shown once; only its hash is kept).
    pub fn create_share(
        &self,
        dashboard_id: &str,
        valid_ms: i64,
        by: &str,
    ) -> Result<(DashboardShare, String)> {
        if !(60_000..=MAX_SHARE_MS).contains(&valid_ms) {
            return Err(invalid(format!(
                "a share lives 1 minute to {} days",
                MAX_SHARE_MS / 86_400_000
            )));
        }
        let _w = self.shared.write.lock();
        let d = self.get_dashboard(dashboard_id)?;
        let now = now_ms();
        let live = self
            .shared
            .store
            .list_dashboard_shares(dashboard_id)?
            .iter()
            .filter(|s| s.live(now))
            .count();
        if live >= MAX_SHARES {
            return Err(invalid(format!(
                "at most {MAX_SHARES} live shares per dashboard; revoke some"
            )));
        }
        let bytes: [u8; 24] = m2mhub_identity::ids::random_bytes();
        let token = format!("dsh_{}", m2mhub_identity::ids::hex(&bytes));
        let s = DashboardShare {
            id: random_id("share-"),
            dashboard_id: d.id,
            tenant: d.tenant,
            token_hash: token_hash(&token),
            created_by: by.into(),
            created_ms: now,
            expires_ms: now.saturating_add(valid_ms),
            revoked_ms: None,
        };
        self.shared.store.put_dashboard_share(&s)?;
        Ok((s, token))
    }

    /// A dashboard's shares, newest first (revoked and expired included).
    pub fn list_shares(&self, dashboard_id: &str) -> Result<Vec<DashboardShare>> {
        let mut v = self.shared.store.list_dashboard_shares(dashboard_id)?;
        v.sort_by(|a, b| {
            b.created_ms
                .cmp(&a.created_ms)
                .then_with(|| b.id.cmp(&a.id))
        });
        Ok(v)
    }

    /// Revoke a share: its link stops working at once.
    pub fn revoke_share(&self, dashboard_id: &str, share_id: &str) -> Result<DashboardShare> {
        let _w = self.shared.write.lock();
        let mut s = self
            .shared
            .store
            .list_dashboard_shares(dashboard_id)?
            .into_iter()
            .find(|s| s.id == share_id)
            .ok_or_else(|| RegistryError::NotFound(format!("share {share_id}")))?;
        if s.revoked_ms.is_none() {
            s.revoked_ms = Some(now_ms());
            self.shared.store.put_dashboard_share(&s)?;
        }
        Ok(s)
    }

    /// The dashboard a share token opens at `now`; `NotFound` alike for an
    /// unknown, revoked or expired token (the holder learns nothing more).
    pub fn open_share(&self, token: &str, now: i64) -> Result<(DashboardShare, Dashboard)> {
        let gone = || RegistryError::NotFound("no such share, or it was revoked or expired".into());
        if !token.starts_with("dsh_") || token.len() > 100 {
            return Err(gone());
        }
        let s = self
            .shared
            .store
            .find_dashboard_share(&token_hash(token))?
            .filter(|s| s.live(now))
            .ok_or_else(gone)?;
        let d = self
            .shared
            .store
            .get_dashboard(&s.dashboard_id)?
            .ok_or_else(gone)?;
        Ok((s, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;
    use serde_json::json;

    fn layout() -> Value {
        json!({"widgets": [{"type": "value", "device": "m1", "metric": "t"}, {"type": "alarms", "width": 2}]})
    }

    #[test]
    fn dashboards_are_saved_changed_and_deleted() {
        let (_dir, fleet) = testutil::open();
        let d = fleet
            .create_dashboard(
                m2mhub_identity::DEFAULT_TENANT,
                NewDashboard {
                    name: "Line 3".into(),
                    layout: layout(),
                    profile: Some("press".into()),
                    ..Default::default()
                },
                "alice",
            )
            .expect("created");
        assert_eq!(fleet.get_dashboard(&d.id).expect("read"), d);
        assert_eq!(
            fleet
                .profile_dashboard(m2mhub_identity::DEFAULT_TENANT, "press")
                .expect("read")
                .map(|x| x.id),
            Some(d.id.clone())
        );
        // One default per profile.
        let e = fleet
            .create_dashboard(
                m2mhub_identity::DEFAULT_TENANT,
                NewDashboard {
                    name: "Other".into(),
                    layout: json!({"widgets": []}),
                    profile: Some("press".into()),
                    ..Default::default()
                },
                "alice",
            )
            .expect_err("taken");
        assert!(matches!(e, RegistryError::Conflict(_)), "{e}");
        let u = fleet
            .update_dashboard(
                &d.id,
                DashboardUpdate {
                    layout: Some(json!({"widgets": []})),
                    profile: Some(None),
                    ..Default::default()
                },
                "bob",
            )
            .expect("updated");
        assert_eq!(u.updated_by, "bob");
        assert_eq!(u.profile, None);
        assert_eq!(fleet.list_dashboards(None).expect("list").len(), 1);
        fleet.delete_dashboard(&d.id).expect("deleted");
        assert!(fleet.get_dashboard(&d.id).is_err());
    }

    #[test]
    fn layouts_are_checked() {
        assert!(validate_layout(&layout()).is_ok());
        for bad in [
            json!([]),
            json!({"widgets": [{"type": "pie"}]}),
            json!({"widgets": [{"title": "x"}]}),
            json!({"widgets": [{"type": "value", "width": 9}]}),
            json!({"widgets": vec![json!({"type": "value"}); MAX_WIDGETS + 1]}),
        ] {
            assert!(validate_layout(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shares_open_until_revoked_or_expired() {
        let (_dir, fleet) = testutil::open();
        let d = fleet
            .create_dashboard(
                m2mhub_identity::DEFAULT_TENANT,
                NewDashboard {
                    name: "Public".into(),
                    layout: layout(),
                    ..Default::default()
                },
                "alice",
            )
            .expect("created");
        let (s, token) = fleet
            .create_share(&d.id, 3_600_000, "alice")
            .expect("share");
        assert_ne!(s.token_hash, token, "only the hash is kept");
        let now = now_ms();
        let (_, opened) = fleet.open_share(&token, now).expect("opens");
        assert_eq!(opened.id, d.id);
        // Expired, unknown, malformed: all alike.
        assert!(fleet.open_share(&token, s.expires_ms).is_err());
        assert!(fleet.open_share("dsh_0000", now).is_err());
        assert!(fleet.open_share("nope", now).is_err());
        fleet.revoke_share(&d.id, &s.id).expect("revoked");
        assert!(fleet.open_share(&token, now).is_err());
        assert!(fleet.create_share(&d.id, 1, "alice").is_err());
        // Deleting the dashboard ends its other links too.
        let (_, token2) = fleet
            .create_share(&d.id, 3_600_000, "alice")
            .expect("share");
        fleet.delete_dashboard(&d.id).expect("deleted");
        assert!(fleet.open_share(&token2, now).is_err());
        assert!(fleet.list_shares(&d.id).expect("list").is_empty());
    }
}
