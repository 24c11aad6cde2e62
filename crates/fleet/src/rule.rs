//! Rule definitions: what the rules engine runs, as the operator wrote it.
//!
//! The registry stores a rule's SQL and its actions without understanding
//! them (the actions are an opaque JSON array): the rule service validates
//! both before they are stored and compiles them when it (re)loads a rule.
//! Rules have platform-wide unique ids (an action's origin is
//! `rule:<id>`), belong to one tenant, and are held in memory like the
//! rest of the registry, so the engine can list them all at start. Their
//! counters are the engine's, in memory, not here.

use crate::{Fleet, RegistryError, Result};
use m2mhub_identity::ids::{new_id, validate_id, validate_name};
use m2mhub_identity::now_ms;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Rule SQL and the actions' JSON are limited to this many bytes.
pub const MAX_RULE_TEXT: usize = 64 * 1024;
/// Rules per tenant at most.
pub const MAX_RULES_PER_TENANT: usize = 1_000;
const MAX_DESCRIPTION: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub description: String,
    pub sql: String,
    /// A JSON array; its elements are the rule service's business.
    pub actions: serde_json::Value,
    pub enabled: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// What `create_rule` needs besides the tenant.
#[derive(Debug, Clone)]
pub struct NewRule {
    /// Generated (`rule-<12 hex>`) when `None`.
    pub id: Option<String>,
    /// Defaults to the id.
    pub name: Option<String>,
    pub description: String,
    pub sql: String,
    pub actions: serde_json::Value,
    pub enabled: bool,
}

/// A partial update: `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct RuleUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub sql: Option<String>,
    pub actions: Option<serde_json::Value>,
    pub enabled: Option<bool>,
}

fn validate_sql(sql: &str) -> Result<()> {
    if sql.trim().is_empty() || sql.len() > MAX_RULE_TEXT {
        return Err(RegistryError::Validation(format!(
            "rule SQL must be 1 to {MAX_RULE_TEXT} bytes"
        )));
    }
    Ok(())
}

fn validate_actions(actions: &serde_json::Value) -> Result<()> {
    if !actions.is_array() {
        return Err(RegistryError::Validation(
            "rule actions must be a JSON array".into(),
        ));
    }
    if serde_json::to_vec(actions).map_or(usize::MAX, |b| b.len()) > MAX_RULE_TEXT {
        return Err(RegistryError::Validation(format!(
            "rule actions must be at most {MAX_RULE_TEXT} bytes of JSON"
        )));
    }
    Ok(())
}

fn validate_description(d: &str) -> Result<()> {
    if d.chars().count() > MAX_DESCRIPTION || d.chars().any(char::is_control) {
        return Err(RegistryError::Validation(format!(
            "rule description must be at most {MAX_DESCRIPTION} characters without control characters"
        )));
    }
    Ok(())
}

fn validate_rule_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(RegistryError::Validation("rule name is empty".into()));
    }
    validate_name("rule", name)
}

impl Fleet {
    pub fn create_rule(&self, tenant: &str, new: NewRule) -> Result<Rule> {
        validate_sql(&new.sql)?;
        validate_actions(&new.actions)?;
        validate_description(&new.description)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        let id = {
            if !s.identity.has_tenant(tenant) {
                return Err(RegistryError::NotFound(format!("tenant {tenant}")));
            }
            let rules = s.rules.read();
            if rules.values().filter(|r| r.tenant == tenant).count() >= MAX_RULES_PER_TENANT {
                return Err(RegistryError::Conflict(format!(
                    "tenant {tenant} has {MAX_RULES_PER_TENANT} rules, the most it may have"
                )));
            }
            match new.id {
                Some(id) => {
                    validate_id("rule", &id)?;
                    if rules.contains_key(&id) {
                        return Err(RegistryError::AlreadyExists(format!("rule {id}")));
                    }
                    id
                }
                None => loop {
                    let id = new_id("rule");
                    if !rules.contains_key(&id) {
                        break id;
                    }
                },
            }
        };
        let name = new.name.unwrap_or_else(|| id.clone());
        validate_rule_name(&name)?;
        let now = now_ms();
        let r = Rule {
            id,
            tenant: tenant.into(),
            name,
            description: new.description,
            sql: new.sql,
            actions: new.actions,
            enabled: new.enabled,
            created_ms: now,
            updated_ms: now,
        };
        s.store.insert_rule(&r)?;
        s.rules.write().insert(r.id.clone(), r.clone());
        Ok(r)
    }

    /// Read the rule definitions again from the store (in a cluster another
    /// node changed them in the shared store); returns the ids of the rules
    /// added, changed or removed, for the rule service to reload.
    pub fn reload_rules(&self) -> Result<Vec<String>> {
        let s = &self.shared;
        let _w = s.write.lock();
        let fresh: BTreeMap<String, Rule> = s
            .store
            .load()?
            .rules
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let mut rules = s.rules.write();
        let mut changed: Vec<String> = fresh
            .iter()
            .filter(|(id, r)| rules.get(*id) != Some(*r))
            .map(|(id, _)| id.clone())
            .collect();
        changed.extend(rules.keys().filter(|id| !fresh.contains_key(*id)).cloned());
        *rules = fresh;
        Ok(changed)
    }

    pub fn get_rule(&self, id: &str) -> Result<Rule> {
        self.shared
            .rules
            .read()
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("rule {id}")))
    }

    /// Rules of one tenant (or of all), in id order.
    pub fn list_rules(&self, tenant: Option<&str>) -> Result<Vec<Rule>> {
        if let Some(t) = tenant {
            if !self.shared.identity.has_tenant(t) {
                return Err(RegistryError::NotFound(format!("tenant {t}")));
            }
        }
        Ok(self
            .shared
            .rules
            .read()
            .values()
            .filter(|r| tenant.is_none_or(|t| r.tenant == t))
            .cloned()
            .collect())
    }

    /// Change a rule (absent fields stay). The caller validates the
    /// resulting SQL and actions with the rule service first.
    pub fn update_rule(&self, id: &str, u: RuleUpdate) -> Result<Rule> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut r = self.get_rule(id)?;
        if let Some(name) = u.name {
            validate_rule_name(&name)?;
            r.name = name;
        }
        if let Some(d) = u.description {
            validate_description(&d)?;
            r.description = d;
        }
        if let Some(sql) = u.sql {
            validate_sql(&sql)?;
            r.sql = sql;
        }
        if let Some(a) = u.actions {
            validate_actions(&a)?;
            r.actions = a;
        }
        if let Some(e) = u.enabled {
            r.enabled = e;
        }
        r.updated_ms = now_ms().max(r.updated_ms);
        s.store.update_rule(&r)?;
        s.rules.write().insert(r.id.clone(), r.clone());
        Ok(r)
    }

    pub fn set_rule_enabled(&self, id: &str, enabled: bool) -> Result<Rule> {
        self.update_rule(
            id,
            RuleUpdate {
                enabled: Some(enabled),
                ..Default::default()
            },
        )
    }

    pub fn delete_rule(&self, id: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        if !s.rules.read().contains_key(id) {
            return Err(RegistryError::NotFound(format!("rule {id}")));
        }
        s.store.delete_rule(id)?;
        s.rules.write().remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;
    use serde_json::json;

    fn new(id: Option<&str>, sql: &str) -> NewRule {
        NewRule {
            id: id.map(str::to_string),
            name: None,
            description: "hot machines".into(),
            sql: sql.into(),
            actions: json!([{"alarm": {"type": "overheating"}}]),
            enabled: true,
        }
    }

    const SQL: &str = "SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85";

    #[test]
    fn crud() {
        let (_d, reg) = open();
        reg.identity()
            .create_tenant("acme", "Acme")
            .expect("tenant");
        let r = reg
            .create_rule("acme", new(Some("hot"), SQL))
            .expect("create");
        assert_eq!(
            (r.name.as_str(), r.enabled, r.tenant.as_str()),
            ("hot", true, "acme")
        );
        let g = reg
            .create_rule("default", new(None, SQL))
            .expect("generated id");
        assert!(g.id.starts_with("rule-"));
        assert!(matches!(
            reg.create_rule("default", new(Some("hot"), SQL)),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert_eq!(reg.get_rule("hot").expect("get"), r);
        assert_eq!(reg.list_rules(Some("acme")).expect("list").len(), 1);
        assert_eq!(reg.list_rules(None).expect("list").len(), 2);
        assert!(matches!(
            reg.list_rules(Some("nope")),
            Err(RegistryError::NotFound(_))
        ));

        let u = reg
            .update_rule(
                "hot",
                RuleUpdate {
                    name: Some("Hot machines".into()),
                    sql: Some("SELECT 1 FROM 'x'".into()),
                    ..Default::default()
                },
            )
            .expect("update");
        assert_eq!(u.name, "Hot machines");
        assert_eq!(u.sql, "SELECT 1 FROM 'x'");
        assert_eq!(u.description, "hot machines", "unchanged");
        assert!(u.updated_ms >= r.updated_ms);
        let off = reg.set_rule_enabled("hot", false).expect("disable");
        assert!(!off.enabled);
        reg.delete_rule("hot").expect("delete");
        assert!(matches!(
            reg.get_rule("hot"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.delete_rule("hot"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.set_rule_enabled("hot", true),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn validation() {
        let (_d, reg) = open();
        let bad = |n: NewRule| reg.create_rule("default", n).expect_err("refused");
        assert!(matches!(bad(new(None, "  ")), RegistryError::Validation(_)));
        assert!(matches!(
            bad(new(Some("a b"), SQL)),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(NewRule {
                actions: json!({"alarm": {}}),
                ..new(None, SQL)
            }),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(NewRule {
                name: Some("\n".into()),
                ..new(None, SQL)
            }),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            reg.create_rule("nope", new(None, SQL)),
            Err(RegistryError::NotFound(_))
        ));
        reg.create_rule("default", new(Some("r"), SQL))
            .expect("create");
        assert!(matches!(
            reg.update_rule(
                "r",
                RuleUpdate {
                    actions: Some(json!(1)),
                    ..Default::default()
                }
            ),
            Err(RegistryError::Validation(_))
        ));
        assert_eq!(
            reg.get_rule("r").expect("get").actions,
            new(None, SQL).actions,
            "unchanged"
        );
    }

    #[test]
    fn rules_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = crate::testutil::open_in(dir.path());
            reg.create_rule("default", new(Some("a"), SQL))
                .expect("create");
            reg.create_rule("default", new(Some("b"), SQL))
                .expect("create");
            reg.set_rule_enabled("b", false).expect("disable");
            reg.delete_rule("a").expect("delete");
        }
        let reg = crate::testutil::open_in(dir.path());
        let all = reg.list_rules(None).expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].id.as_str(), all[0].enabled), ("b", false));
        assert_eq!(all[0].actions, json!([{"alarm": {"type": "overheating"}}]));
    }
}
