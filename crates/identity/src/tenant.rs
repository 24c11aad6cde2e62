//! Tenants (isolated customers) and groups (sets of a tenant's devices that
//! policies can address).

use crate::error::{RegistryError, Result};
use crate::{now_ms, validate_id, validate_name, Registry};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub tenant: String,
    pub id: String,
    pub name: String,
    pub created_ms: i64,
}

impl Registry {
    pub fn create_tenant(&self, id: &str, name: &str) -> Result<Tenant> {
        validate_id("tenant", id)?;
        validate_name("tenant", name)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        if s.state.read().tenants.contains_key(id) {
            return Err(RegistryError::AlreadyExists(format!("tenant {id}")));
        }
        let t = Tenant {
            id: id.into(),
            name: name.into(),
            created_ms: now_ms(),
        };
        s.store.insert_tenant(&t)?;
        s.state.write().tenants.insert(t.id.clone(), t.clone());
        Ok(t)
    }

    pub fn get_tenant(&self, id: &str) -> Result<Tenant> {
        self.shared
            .state
            .read()
            .tenants
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("tenant {id}")))
    }

    /// Whether the tenant exists (a cheap check for other domains).
    pub fn has_tenant(&self, id: &str) -> bool {
        self.shared.state.read().tenants.contains_key(id)
    }

    pub fn list_tenants(&self) -> Result<Vec<Tenant>> {
        Ok(self.shared.state.read().tenants.values().cloned().collect())
    }

    pub fn create_group(&self, tenant: &str, id: &str, name: &str) -> Result<Group> {
        validate_id("group", id)?;
        validate_name("group", name)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        {
            let st = s.state.read();
            if !st.tenants.contains_key(tenant) {
                return Err(RegistryError::NotFound(format!("tenant {tenant}")));
            }
            if st
                .groups
                .contains_key(&(tenant.to_string(), id.to_string()))
            {
                return Err(RegistryError::AlreadyExists(format!(
                    "group {id} in tenant {tenant}"
                )));
            }
        }
        let g = Group {
            tenant: tenant.into(),
            id: id.into(),
            name: name.into(),
            created_ms: now_ms(),
        };
        s.store.insert_group(&g)?;
        s.state
            .write()
            .groups
            .insert((g.tenant.clone(), g.id.clone()), g.clone());
        Ok(g)
    }

    /// Groups of one tenant, or of all tenants.
    pub fn list_groups(&self, tenant: Option<&str>) -> Result<Vec<Group>> {
        Ok(self
            .shared
            .state
            .read()
            .groups
            .values()
            .filter(|g| tenant.is_none_or(|t| g.tenant == t))
            .cloned()
            .collect())
    }

    /// Delete an empty group. A group still holding devices, named by a
    /// policy or by an unrevoked claim token is a conflict: deleting it
    /// would silently change what those devices may do.
    pub fn delete_group(&self, tenant: &str, id: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let key = (tenant.to_string(), id.to_string());
        {
            let st = s.state.read();
            if !st.groups.contains_key(&key) {
                return Err(RegistryError::NotFound(format!(
                    "group {id} in tenant {tenant}"
                )));
            }
            let n = st
                .devices
                .values()
                .filter(|d| d.tenant == tenant && d.group.as_deref() == Some(id))
                .count();
            if n > 0 {
                return Err(RegistryError::Conflict(format!(
                    "group {id} still has {n} device(s); move or delete them first"
                )));
            }
            if let Some(p) = st
                .policies
                .get(tenant)
                .and_then(|ps| ps.values().find(|p| p.group.as_deref() == Some(id)))
            {
                return Err(RegistryError::Conflict(format!(
                    "policy {} applies to group {id}; delete it first",
                    p.name
                )));
            }
            if let Some(c) = st.claims.values().find(|c| {
                !c.info.revoked && c.info.tenant == tenant && c.info.group.as_deref() == Some(id)
            }) {
                return Err(RegistryError::Conflict(format!(
                    "claim token {} provisions into group {id}; revoke it first",
                    c.info.id
                )));
            }
        }
        s.store.delete_group(tenant, id)?;
        s.state.write().groups.remove(&key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::open;
    use crate::RegistryError;

    #[test]
    fn default_tenant_exists_and_groups_are_per_tenant() {
        let (_d, reg) = open();
        let ts = reg.list_tenants().expect("list");
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].id, "default");
        reg.create_tenant("acme", "Acme").expect("tenant");
        assert!(matches!(
            reg.create_tenant("acme", "again"),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert!(matches!(
            reg.create_tenant("a/b", "bad"),
            Err(RegistryError::Validation(_))
        ));
        reg.create_group("acme", "pumps", "Pumps").expect("group");
        reg.create_group("default", "pumps", "Pumps")
            .expect("same id, other tenant");
        assert!(matches!(
            reg.create_group("nope", "x", "x"),
            Err(RegistryError::NotFound(_))
        ));
        assert_eq!(reg.list_groups(Some("acme")).expect("list").len(), 1);
        assert_eq!(reg.list_groups(None).expect("list").len(), 2);
        reg.delete_group("acme", "pumps").expect("delete");
        assert!(matches!(
            reg.delete_group("acme", "pumps"),
            Err(RegistryError::NotFound(_))
        ));
    }
}
