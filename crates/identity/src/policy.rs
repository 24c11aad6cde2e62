//! Topic authorization for devices.
//!
//! # Rules
//!
//! - Every device may publish and subscribe under its own namespace
//!   `devices/{device_id}/#` (which, per MQTT `#` semantics, includes
//!   `devices/{device_id}` itself).
//! - A device is also a Sparkplug B edge node whose node id is its device
//!   id: it may publish `spBv1.0/{group}/N*|D*/{device_id}[/{device}]`
//!   (births, deaths, data) and subscribe to its own commands
//!   (`spBv1.0/{group}/NCMD/{device_id}`, `…/DCMD/{device_id}/{device}`)
//!   and to host states (`spBv1.0/STATE/{host}`). Device ids are unique, so
//!   this reaches no other device.
//! - Policies of the device's own tenant (and, if the policy names a group,
//!   only for devices of that group) grant more: lists of topic filter
//!   patterns for publish and subscribe, with `{device_id}`, `{group}` and
//!   `{tenant}` replaced by the device's own values. A device without a group
//!   never matches a pattern using `{group}`; a value that is empty or
//!   contains `+ # /` makes the pattern match nothing.
//! - Publish is allowed iff the topic matches an allowed pattern; subscribe
//!   iff the requested filter is a *subset* of an allowed pattern
//!   ([`filter_is_subset`]), so `+` and `#` in a request can never widen
//!   access. `$share/{group}/{filter}` is judged on its inner filter; any
//!   other topic starting with `$` (such as `$SYS`) is for operators only.
//!
//! # Tenant isolation
//!
//! All tenants share one broker topic space, so isolation is structural:
//! every policy pattern must start with `devices/{device_id}/` or
//! `tenants/{tenant}/` (or the tenant's own literal id), checked when the
//! policy is stored. Device ids are globally unique, so each device's reach
//! is confined to its own namespace and its own tenant's `tenants/<id>/`
//! subtree, whatever filters it tries. Device-to-device topics for groups
//! look like `tenants/{tenant}/groups/{group}/#`.

use crate::error::{RegistryError, Result};
use crate::{validate_id, Registry};
use mqtt_codec::topic;
use serde::{Deserialize, Serialize};

/// A named grant of extra topics to a tenant's devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    /// Only devices of this group (of the policy's tenant) get the grant.
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Publish,
    Subscribe,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
        }
    }
}

/// Whose rights are being checked: the identity established on CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceScope<'a> {
    pub device_id: &'a str,
    pub tenant: &'a str,
    pub group: Option<&'a str>,
}

const MAX_PATTERNS: usize = 64;

/// Whether every topic matched by `requested` is also matched by `allowed`
/// (both valid, non-shared filters). Level by level: `#` in `allowed`
/// covers the rest (including nothing more); `+` in `allowed` covers any one
/// level of `requested` except `#`; a literal covers only the same literal.
pub fn filter_is_subset(requested: &str, allowed: &str) -> bool {
    let mut r = requested.split('/');
    let mut a = allowed.split('/');
    loop {
        match (a.next(), r.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(rl)) if rl != "#" => {}
            (Some(al), Some(rl)) if al == rl && al != "+" && rl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Replace the placeholders in `pattern` with the device's values, or
/// `None` if the pattern cannot apply (no group, unsafe value, unknown
/// placeholder, unbalanced braces).
pub(crate) fn substitute(pattern: &str, scope: &DeviceScope<'_>) -> Option<String> {
    fn safe(v: &str) -> Option<&str> {
        (!v.is_empty() && !v.contains(['+', '#', '/', '\0', '{', '}'])).then_some(v)
    }
    let mut out = String::with_capacity(pattern.len() + 32);
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}')?;
        let value = match &after[..close] {
            "device_id" => safe(scope.device_id)?,
            "tenant" => safe(scope.tenant)?,
            "group" => safe(scope.group?)?,
            _ => return None,
        };
        out.push_str(value);
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return None;
    }
    out.push_str(rest);
    Some(out)
}

/// Check a pattern when a policy is stored (see the module docs).
fn validate_pattern(tenant: &str, pattern: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(RegistryError::Validation(format!(
            "policy pattern {pattern:?}: {why}"
        )))
    };
    let probe = DeviceScope {
        device_id: "d",
        tenant: "t",
        group: Some("g"),
    };
    let Some(filled) = substitute(pattern, &probe) else {
        return bad("placeholders are {device_id}, {group} and {tenant}");
    };
    if filled.starts_with('$') {
        return bad("topics starting with $ are reserved");
    }
    if let Err(e) = topic::validate_topic_filter(&filled) {
        return bad(&e.to_string());
    }
    let mut levels = pattern.split('/');
    let ok = match (levels.next(), levels.next(), levels.next()) {
        (Some("devices"), Some("{device_id}"), Some(_)) => true,
        (Some("tenants"), Some(t), Some(_)) => t == "{tenant}" || t == tenant,
        _ => false,
    };
    if !ok {
        return bad(
            "must start with devices/{device_id}/ or tenants/{tenant}/ so it stays inside the device's tenant",
        );
    }
    Ok(())
}

fn validate_policy(tenant: &str, p: &Policy) -> Result<()> {
    validate_id("policy", &p.name)?;
    if let Some(g) = &p.group {
        validate_id("group", g)?;
    }
    if p.publish.len() + p.subscribe.len() > MAX_PATTERNS {
        return Err(RegistryError::Validation(format!(
            "a policy has at most {MAX_PATTERNS} patterns"
        )));
    }
    for pat in p.publish.iter().chain(&p.subscribe) {
        validate_pattern(tenant, pat)?;
    }
    Ok(())
}

fn in_own_namespace(device_id: &str, topic: &str) -> bool {
    topic
        .strip_prefix("devices/")
        .and_then(|r| r.strip_prefix(device_id))
        .is_some_and(|r| r.is_empty() || r.starts_with('/'))
}

/// The pure authorization decision for a device, given its tenant's
/// policies (the caller has checked the device exists and is enabled).
pub fn decide<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    scope: &DeviceScope<'_>,
    action: Action,
    topic_or_filter: &str,
) -> bool {
    match action {
        Action::Publish => {
            let t = topic_or_filter;
            if t.starts_with('$') || topic::validate_topic_name(t).is_err() {
                return false;
            }
            if in_own_namespace(scope.device_id, t) || sparkplug_allows(scope.device_id, action, t)
            {
                return true;
            }
            any_grant(policies, scope, action, |allowed| {
                topic::matches(allowed, t)
            })
        }
        Action::Subscribe => {
            let f = match topic::parse_shared(topic_or_filter) {
                Some(Ok((_, inner))) => inner,
                Some(Err(_)) => return false,
                None => topic_or_filter,
            };
            if f.starts_with('$') || topic::validate_topic_filter(f).is_err() {
                return false;
            }
            let own = format!("devices/{}/#", scope.device_id);
            if filter_is_subset(f, &own) || sparkplug_allows(scope.device_id, action, f) {
                return true;
            }
            any_grant(policies, scope, action, |allowed| {
                filter_is_subset(f, allowed)
            })
        }
    }
}

/// The Sparkplug B topics an edge node named `device_id` may use: publish
/// its births, deaths and data; subscribe to its own commands and to host
/// states. Filters are judged level by level: a wildcard is allowed only
/// where the rule allows any value (the group, the device below the node).
fn sparkplug_allows(device_id: &str, action: Action, t: &str) -> bool {
    let levels: Vec<&str> = t.split('/').collect();
    let plain = |l: &str| !l.is_empty() && l != "+" && l != "#";
    let any_value = |l: &str| !l.is_empty() && l != "#";
    match (action, levels.as_slice()) {
        (Action::Publish, ["spBv1.0", group, kind, node, rest @ ..]) => {
            plain(group)
                && *node == device_id
                && match (*kind, rest) {
                    ("NBIRTH" | "NDEATH" | "NDATA", []) => true,
                    ("DBIRTH" | "DDEATH" | "DDATA", [device]) => plain(device),
                    _ => false,
                }
        }
        (Action::Subscribe, ["spBv1.0", "STATE", host]) => any_value(host),
        (Action::Subscribe, ["spBv1.0", group, "NCMD", node]) => {
            any_value(group) && *node == device_id
        }
        (Action::Subscribe, ["spBv1.0", group, "DCMD", node, device]) => {
            any_value(group) && *node == device_id && any_value(device)
        }
        _ => false,
    }
}

/// Whether `pred` holds for any substituted pattern the device gets from
/// its tenant's policies.
fn any_grant<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    scope: &DeviceScope<'_>,
    action: Action,
    mut pred: impl FnMut(&str) -> bool,
) -> bool {
    for p in policies {
        if p.group.as_deref().is_some_and(|g| scope.group != Some(g)) {
            continue;
        }
        let patterns = match action {
            Action::Publish => &p.publish,
            Action::Subscribe => &p.subscribe,
        };
        for pat in patterns {
            if substitute(pat, scope).is_some_and(|allowed| pred(&allowed)) {
                return true;
            }
        }
    }
    false
}

/// What a client holding only a claim token may do: publish its request to
/// `$provision/{client_id}/request` and subscribe (exactly) to
/// `$provision/{client_id}/response`.
pub fn claim_allows(client_id: &str, action: Action, topic_or_filter: &str) -> bool {
    if client_id.is_empty() || client_id.contains(['+', '#', '/', '\0']) {
        return false;
    }
    let Some(rest) = topic_or_filter
        .strip_prefix("$provision/")
        .and_then(|r| r.strip_prefix(client_id))
    else {
        return false;
    };
    match action {
        Action::Publish => rest == "/request",
        Action::Subscribe => rest == "/response",
    }
}

impl Registry {
    /// Create or replace a tenant's policy.
    pub fn put_policy(&self, tenant: &str, p: Policy) -> Result<()> {
        validate_policy(tenant, &p)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        {
            let st = s.state.read();
            if !st.tenants.contains_key(tenant) {
                return Err(RegistryError::NotFound(format!("tenant {tenant}")));
            }
            if let Some(g) = &p.group {
                if !st.groups.contains_key(&(tenant.to_string(), g.clone())) {
                    return Err(RegistryError::NotFound(format!(
                        "group {g} in tenant {tenant}"
                    )));
                }
            }
        }
        s.store.put_policy(tenant, &p)?;
        s.state
            .write()
            .policies
            .entry(tenant.into())
            .or_default()
            .insert(p.name.clone(), p);
        Ok(())
    }

    pub fn list_policies(&self, tenant: &str) -> Result<Vec<Policy>> {
        let st = self.shared.state.read();
        if !st.tenants.contains_key(tenant) {
            return Err(RegistryError::NotFound(format!("tenant {tenant}")));
        }
        Ok(st
            .policies
            .get(tenant)
            .map(|ps| ps.values().cloned().collect())
            .unwrap_or_default())
    }

    pub fn delete_policy(&self, tenant: &str, name: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        if !s
            .state
            .read()
            .policies
            .get(tenant)
            .is_some_and(|ps| ps.contains_key(name))
        {
            return Err(RegistryError::NotFound(format!(
                "policy {name} in tenant {tenant}"
            )));
        }
        s.store.delete_policy(tenant, name)?;
        if let Some(ps) = s.state.write().policies.get_mut(tenant) {
            ps.remove(name);
        }
        Ok(())
    }

    /// May this device publish to the topic / subscribe to the filter?
    /// Memory only. The device must still exist, be enabled and belong to the
    /// tenant and group in `scope`, so disabling or moving a device takes
    /// effect on its next packet.
    pub fn authorize(
        &self,
        scope: &DeviceScope<'_>,
        action: Action,
        topic_or_filter: &str,
    ) -> bool {
        let st = self.shared.state.read();
        match st.devices.get(scope.device_id) {
            Some(d)
                if d.enabled && d.tenant == scope.tenant && d.group.as_deref() == scope.group => {}
            _ => return false,
        }
        let policies = st
            .policies
            .get(scope.tenant)
            .into_iter()
            .flat_map(|m| m.values());
        decide(policies, scope, action, topic_or_filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scope<'a>(id: &'a str, tenant: &'a str, group: Option<&'a str>) -> DeviceScope<'a> {
        DeviceScope {
            device_id: id,
            tenant,
            group,
        }
    }

    #[test]
    fn subset_logic() {
        let yes = [
            ("a/b", "a/b"),
            ("a/b", "a/+"),
            ("a/b", "a/#"),
            ("a", "a/#"),
            ("a/+", "a/+"),
            ("a/+", "a/#"),
            ("a/#", "a/#"),
            ("a/b/#", "a/#"),
            ("a/b/#", "a/+/#"),
            ("a/+/c", "a/+/+"),
            ("#", "#"),
            ("+", "#"),
            ("a/b/c", "#"),
        ];
        for (r, a) in yes {
            assert!(filter_is_subset(r, a), "{r} ⊆ {a}");
        }
        let no = [
            ("a/#", "a/+"),
            ("a/+", "a/b"),
            ("a/#", "a/b"),
            ("#", "a/#"),
            ("+", "a"),
            ("a/b/c", "a/+"),
            ("a", "a/+"),
            ("a/b", "a"),
            ("a/+/#", "a/+/c"),
            ("b", "a/#"),
        ];
        for (r, a) in no {
            assert!(!filter_is_subset(r, a), "{r} ⊄ {a}");
        }
    }

    #[test]
    fn substitution() {
        let s = scope("d1", "acme", Some("g1"));
        assert_eq!(
            substitute("tenants/{tenant}/groups/{group}/{device_id}/x", &s).as_deref(),
            Some("tenants/acme/groups/g1/d1/x")
        );
        assert_eq!(
            substitute(
                "tenants/{tenant}/groups/{group}/#",
                &scope("d1", "acme", None)
            ),
            None
        );
        assert_eq!(substitute("a/{nope}", &s), None);
        assert_eq!(substitute("a/{group", &s), None);
        assert_eq!(substitute("a/group}", &s), None);
        for evil in ["", "+", "#", "a/b", "x+"] {
            assert_eq!(
                substitute("t/{group}/x", &scope("d1", "acme", Some(evil))),
                None,
                "{evil:?}"
            );
        }
    }

    #[test]
    fn default_namespace() {
        let s = scope("d1", "acme", None);
        let none: [&Policy; 0] = [];
        let ok = |a, t: &str| decide(none, &s, a, t);
        assert!(ok(Action::Publish, "devices/d1"));
        assert!(ok(Action::Publish, "devices/d1/telemetry"));
        assert!(ok(Action::Subscribe, "devices/d1/#"));
        assert!(ok(Action::Subscribe, "devices/d1"));
        assert!(ok(Action::Subscribe, "devices/d1/+/x"));
        assert!(ok(Action::Subscribe, "$share/g/devices/d1/cmd"));
        assert!(!ok(Action::Publish, "devices/d10/telemetry"));
        assert!(!ok(Action::Publish, "devices/d"));
        assert!(!ok(Action::Publish, "devices/d1/+"));
        assert!(!ok(Action::Subscribe, "devices/+/telemetry"));
        assert!(!ok(Action::Subscribe, "devices/#"));
        assert!(!ok(Action::Subscribe, "#"));
        assert!(!ok(Action::Subscribe, "+/d1/#"));
        assert!(!ok(Action::Subscribe, "$SYS/#"));
        assert!(!ok(Action::Subscribe, "$share/g/#"));
        assert!(!ok(Action::Subscribe, "$share//devices/d1"));
        assert!(!ok(Action::Subscribe, "$share/g/$SYS/x"));
        assert!(!ok(Action::Publish, "$SYS/x"));
        assert!(!ok(Action::Subscribe, "devices/d1/#/x"));
    }

    #[test]
    fn policies_grant_within_tenant_and_group() {
        let p = Policy {
            name: "fleet".into(),
            group: Some("g1".into()),
            publish: vec!["tenants/{tenant}/groups/{group}/{device_id}/status".into()],
            subscribe: vec!["tenants/{tenant}/groups/{group}/+/status".into()],
        };
        let all = Policy {
            name: "bcast".into(),
            group: None,
            publish: vec![],
            subscribe: vec!["tenants/{tenant}/broadcast/#".into()],
        };
        let ps = [&p, &all];
        let g1 = scope("d1", "acme", Some("g1"));
        let g2 = scope("d2", "acme", Some("g2"));
        assert!(decide(
            ps,
            &g1,
            Action::Publish,
            "tenants/acme/groups/g1/d1/status"
        ));
        assert!(!decide(
            ps,
            &g1,
            Action::Publish,
            "tenants/acme/groups/g1/d9/status"
        ));
        assert!(decide(
            ps,
            &g1,
            Action::Subscribe,
            "tenants/acme/groups/g1/+/status"
        ));
        assert!(decide(
            ps,
            &g1,
            Action::Subscribe,
            "tenants/acme/groups/g1/d9/status"
        ));
        assert!(!decide(
            ps,
            &g1,
            Action::Subscribe,
            "tenants/acme/groups/g1/#"
        ));
        assert!(!decide(
            ps,
            &g1,
            Action::Subscribe,
            "tenants/acme/groups/+/+/status"
        ));
        assert!(!decide(
            ps,
            &g2,
            Action::Subscribe,
            "tenants/acme/groups/g1/+/status"
        ));
        assert!(decide(
            ps,
            &g2,
            Action::Subscribe,
            "tenants/acme/broadcast/x/y"
        ));
        assert!(decide(
            ps,
            &g2,
            Action::Subscribe,
            "$share/s/tenants/acme/broadcast/#"
        ));
        assert!(!decide(
            ps,
            &g2,
            Action::Publish,
            "tenants/acme/broadcast/x"
        ));
    }

    #[test]
    fn pattern_validation_keeps_tenants_apart() {
        for ok in [
            "devices/{device_id}/x",
            "tenants/{tenant}/#",
            "tenants/acme/groups/{group}/+",
        ] {
            assert!(validate_pattern("acme", ok).is_ok(), "{ok}");
        }
        for bad in [
            "#",
            "+/x",
            "devices/+/x",
            "devices/#",
            "devices/{device_id}",
            "devices/{device_id}x/y",
            "tenants/other/#",
            "tenants/+/x",
            "tenants/{tenant}",
            "tenants/{tenant}x/y",
            "$SYS/#",
            "$share/g/tenants/{tenant}/x",
            "tenants/{tenant}/{nope}",
            "tenants/{tenant}/a#",
            "fleet/{group}/#",
        ] {
            assert!(validate_pattern("acme", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn claim_topics() {
        assert!(claim_allows("c1", Action::Publish, "$provision/c1/request"));
        assert!(claim_allows(
            "c1",
            Action::Subscribe,
            "$provision/c1/response"
        ));
        assert!(!claim_allows(
            "c1",
            Action::Publish,
            "$provision/c1/response"
        ));
        assert!(!claim_allows(
            "c1",
            Action::Subscribe,
            "$provision/c1/request"
        ));
        assert!(!claim_allows(
            "c1",
            Action::Subscribe,
            "$provision/+/response"
        ));
        assert!(!claim_allows("c1", Action::Subscribe, "$provision/c1/#"));
        assert!(!claim_allows(
            "c1",
            Action::Publish,
            "$provision/c12/request"
        ));
        assert!(!claim_allows("c", Action::Publish, "$provision/c1/request"));
        assert!(!claim_allows(
            "+",
            Action::Subscribe,
            "$provision/+/response"
        ));
        assert!(!claim_allows("c1", Action::Publish, "devices/c1/x"));
    }

    #[test]
    fn registry_policies_and_live_checks() {
        let (_d, reg) = crate::testutil::open();
        reg.create_tenant("acme", "Acme").expect("tenant");
        reg.create_group("acme", "g1", "G1").expect("group");
        reg.create_device(crate::NewDevice {
            id: Some("d1".into()),
            tenant: "acme".into(),
            group: Some("g1".into()),
            ..Default::default()
        })
        .expect("device");
        let p = Policy {
            name: "fleet".into(),
            group: Some("g1".into()),
            publish: vec![],
            subscribe: vec!["tenants/{tenant}/groups/{group}/#".into()],
        };
        assert!(matches!(
            reg.put_policy("nope", p.clone()),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.put_policy(
                "acme",
                Policy {
                    group: Some("zz".into()),
                    ..p.clone()
                }
            ),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.put_policy(
                "acme",
                Policy {
                    subscribe: vec!["#".into()],
                    ..p.clone()
                }
            ),
            Err(RegistryError::Validation(_))
        ));
        reg.put_policy("acme", p.clone()).expect("put");
        assert_eq!(reg.list_policies("acme").expect("list"), vec![p]);
        let s = scope("d1", "acme", Some("g1"));
        assert!(reg.authorize(&s, Action::Subscribe, "tenants/acme/groups/g1/x"));
        // A scope that does not match the registry's record gets nothing.
        assert!(!reg.authorize(
            &scope("d1", "default", Some("g1")),
            Action::Publish,
            "devices/d1/x"
        ));
        assert!(!reg.authorize(&scope("d1", "acme", None), Action::Publish, "devices/d1/x"));
        reg.set_device_enabled("d1", false).expect("disable");
        assert!(!reg.authorize(&s, Action::Publish, "devices/d1/x"));
        reg.set_device_enabled("d1", true).expect("enable");
        reg.delete_policy("acme", "fleet").expect("delete");
        assert!(!reg.authorize(&s, Action::Subscribe, "tenants/acme/groups/g1/x"));
        assert!(reg.authorize(&s, Action::Subscribe, "devices/d1/#"));
        assert!(matches!(
            reg.delete_policy("acme", "fleet"),
            Err(RegistryError::NotFound(_))
        ));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("+".to_string()),
            Just("#".to_string()),
            Just("devices".to_string()),
            Just("tenants".to_string()),
            Just("a".to_string()),
            Just("b".to_string()),
            Just("da".to_string()),
            Just("db".to_string()),
            Just("groups".to_string()),
            Just("g".to_string()),
            Just("ta".to_string()),
            Just("tb".to_string()),
            Just("x".to_string()),
            Just("y".to_string()),
            Just("$SYS".to_string()),
            Just("$share".to_string()),
            Just("".to_string()),
        ]
    }

    /// Random filters, biased towards the interesting namespaces (a purely
    /// random one is almost never allowed, which would test nothing).
    fn filter() -> impl Strategy<Value = String> {
        let head = prop_oneof![
            Just("devices/da".to_string()),
            Just("devices/db".to_string()),
            Just("devices/+".to_string()),
            Just("tenants/ta".to_string()),
            Just("tenants/tb".to_string()),
            Just("tenants/+".to_string()),
            Just("tenants/ta/groups/g".to_string()),
            Just("tenants/tb/groups/g".to_string()),
            Just("$SYS".to_string()),
            Just("+".to_string()),
            Just("#".to_string()),
        ];
        (head, prop::collection::vec(level(), 0..4)).prop_map(|(h, t)| {
            let mut v = vec![h];
            v.extend(t);
            v.join("/")
        })
    }

    fn valid_filter() -> impl Strategy<Value = String> {
        let lv = prop_oneof![Just("+"), Just("a"), Just("b"), Just("")];
        (prop::collection::vec(lv, 1..5), any::<bool>()).prop_map(|(v, hash)| {
            let mut s = v.join("/");
            if hash {
                s.push_str("/#");
            }
            s
        })
    }

    fn topic_name() -> impl Strategy<Value = String> {
        let lv = prop_oneof![Just("a"), Just("b"), Just("")];
        prop::collection::vec(lv, 1..6).prop_map(|v| v.join("/"))
    }

    fn pattern() -> impl Strategy<Value = String> {
        let head = prop_oneof![
            Just("devices/{device_id}".to_string()),
            Just("tenants/{tenant}".to_string()),
            Just("tenants/ta".to_string()),
        ];
        let tail = prop::collection::vec(
            prop_oneof![
                Just("+".to_string()),
                Just("{group}".to_string()),
                Just("{device_id}".to_string()),
                Just("{tenant}".to_string()),
                Just("x".to_string()),
            ],
            0..3,
        );
        let end = prop_oneof![Just("#".to_string()), Just("y".to_string())];
        (head, tail, end).prop_map(|(h, t, e)| {
            let mut v = vec![h];
            v.extend(t);
            v.push(e);
            v.join("/")
        })
    }

    /// Whether `f` could match any topic inside tenant `tb`'s reach when
    /// device `db` of that tenant is its only device: its namespace or its
    /// tenant subtree.
    fn reaches(f: &str, other_device: &str, other_tenant: &str) -> bool {
        let zones = [
            format!("devices/{other_device}/#"),
            format!("tenants/{other_tenant}/#"),
        ];
        zones.iter().any(|z| filters_overlap(f, z))
    }

    /// Whether two valid filters match at least one common topic.
    fn filters_overlap(a: &str, b: &str) -> bool {
        let mut x = a.split('/');
        let mut y = b.split('/');
        loop {
            match (x.next(), y.next()) {
                (Some("#"), _) | (_, Some("#")) => return true,
                (None, None) => return true,
                (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
                _ => return false,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Device `da` of tenant `ta`, with any valid policies of its own
        /// tenant, never gets a topic or filter that can reach device `db`
        /// of tenant `tb` or `tb`'s subtree, whatever it asks for.
        #[test]
        fn tenant_isolation(
            pubs in prop::collection::vec(pattern(), 0..4),
            subs in prop::collection::vec(pattern(), 0..4),
            group in prop::option::of(prop_oneof![Just("g"), Just("tb"), Just("db")]),
            policy_group in prop::option::of(Just("g".to_string())),
            req in filter(),
            share in any::<bool>(),
        ) {
            let p = Policy { name: "p".into(), group: policy_group, publish: pubs, subscribe: subs };
            prop_assume!(validate_policy("ta", &p).is_ok());
            let s = scope("da", "ta", group);
            let inner = req.clone();
            let req = if share { format!("$share/grp/{req}") } else { req };
            if decide([&p], &s, Action::Subscribe, &req) {
                prop_assert!(!reaches(&inner, "db", "tb"), "subscribe {req} leaks");
                prop_assert!(!inner.starts_with('$'));
            }
            if decide([&p], &s, Action::Publish, &req) {
                prop_assert!(!reaches(&req, "db", "tb"), "publish {req} leaks");
            }
            // And the device's own namespace is always reachable.
            if topic::validate_topic_filter(&inner).is_ok() && filter_is_subset(&inner, "devices/da/#") {
                prop_assert!(decide([&p], &s, Action::Subscribe, &req), "own {req} refused");
            }
        }

        /// Subset implies every topic matching the request matches the grant.
        #[test]
        fn subset_is_sound(r in valid_filter(), a in prop_oneof![valid_filter(), Just("#".to_string())], topic in topic_name()) {
            if filter_is_subset(&r, &a) && topic::matches(&r, &topic) {
                prop_assert!(topic::matches(&a, &topic), "{r} ⊆ {a} but {topic}");
            }
        }
    }

    #[test]
    fn a_device_is_a_sparkplug_edge_node_under_its_own_id() {
        let sc = scope("press-7", "acme", None);
        let ok = |a, t| decide([], &sc, a, t);
        for t in [
            "spBv1.0/plant/NBIRTH/press-7",
            "spBv1.0/plant/NDATA/press-7",
            "spBv1.0/plant/NDEATH/press-7",
            "spBv1.0/plant/DBIRTH/press-7/valve",
            "spBv1.0/plant/DDATA/press-7/valve",
        ] {
            assert!(ok(Action::Publish, t), "{t}");
        }
        for t in [
            "spBv1.0/plant/NDATA/press-8",
            "spBv1.0/plant/DDATA/press-8/valve",
            "spBv1.0/plant/NCMD/press-7",
            "spBv1.0/plant/DDATA/press-7",
            "spBv1.0/plant/NDATA/press-7/extra",
            "spBv1.0/STATE/host",
            "spBv1.0/+/NDATA/press-7",
        ] {
            assert!(!ok(Action::Publish, t), "{t}");
        }
        for f in [
            "spBv1.0/plant/NCMD/press-7",
            "spBv1.0/+/NCMD/press-7",
            "spBv1.0/plant/DCMD/press-7/+",
            "spBv1.0/STATE/+",
        ] {
            assert!(ok(Action::Subscribe, f), "{f}");
        }
        for f in [
            "spBv1.0/plant/NCMD/+",
            "spBv1.0/#",
            "spBv1.0/plant/DCMD/press-7/#",
            "spBv1.0/plant/NDATA/press-8",
            "spBv1.0/plant/DCMD/press-8/x",
        ] {
            assert!(!ok(Action::Subscribe, f), "{f}");
        }
    }
}
