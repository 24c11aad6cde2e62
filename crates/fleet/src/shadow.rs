//! Device shadows (twins): the state a device should have (`desired`, set by
//! operators, rules and fleet-wide settings) next to the state it says it
//! has (`reported`), kept while either side is offline.
//!
//! # The model
//!
//! - Each device has one *classic* shadow (name `""`) and up to
//!   [`MAX_NAMED`] *named* shadows (one per concern: `config`, `firmware`…).
//! - An update is a JSON merge into `desired` and/or `reported`: an object
//!   merges key by key (recursively), any other value replaces, and `null`
//!   deletes the key. Every key written gets a `timestamp_ms` in `metadata`,
//!   mirroring its place in the state.
//! - `delta` is computed, never stored: the desired keys whose value differs
//!   from the reported one (recursively for objects).
//! - `version` grows by one per accepted update. An update may name the
//!   version it was based on; if the shadow has moved on it is refused with
//!   [`RegistryError::Conflict`] (409), so two writers never overwrite each
//!   other silently.
//! - Limits: the state (desired + reported) is at most [`MAX_STATE_BYTES`]
//!   as JSON and [`MAX_DEPTH`] levels deep under `desired`/`reported`; a
//!   larger update is refused as invalid, leaving the shadow unchanged.
//!
//! # Storage
//!
//! Shadows are held in memory and every accepted update is written to the
//! store before it is acknowledged (the caller publishes `accepted` only
//! after [`Fleet::update_shadow`] returns), so an accepted update survives a
//! crash. Updates are serialized per fleet: versions are assigned in order.

use crate::{Fleet, RegistryError, Result};
use m2mhub_identity::now_ms;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};

/// Named shadows per device at most (the classic shadow does not count).
pub const MAX_NAMED: usize = 16;
/// Desired + reported, serialized, at most.
pub const MAX_STATE_BYTES: usize = 8 * 1024;
/// Levels of nesting under `desired` / `reported` at most.
pub const MAX_DEPTH: usize = 6;
/// A client token is echoed back; longer ones are refused.
pub const MAX_CLIENT_TOKEN: usize = 64;

/// One shadow as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    pub tenant: String,
    pub device_id: String,
    /// `""` for the classic shadow.
    pub name: String,
    pub desired: Map<String, Value>,
    pub reported: Map<String, Value>,
    /// `{"desired": {key: {"timestamp_ms": …}}, "reported": {…}}`.
    pub metadata: Map<String, Value>,
    pub version: u64,
    pub updated_ms: i64,
}

impl Shadow {
    fn empty(tenant: &str, device_id: &str, name: &str) -> Shadow {
        Shadow {
            tenant: tenant.into(),
            device_id: device_id.into(),
            name: name.into(),
            desired: Map::new(),
            reported: Map::new(),
            metadata: Map::new(),
            version: 0,
            updated_ms: 0,
        }
    }

    /// The desired keys whose value differs from the reported one.
    pub fn delta(&self) -> Map<String, Value> {
        delta(&self.desired, &self.reported)
    }

    /// The document as the API and the devices see it.
    pub fn document(&self) -> Value {
        let mut state = json!({
            "desired": self.desired,
            "reported": self.reported,
        });
        let d = self.delta();
        if !d.is_empty() {
            state["delta"] = Value::Object(d);
        }
        json!({
            "name": self.name,
            "state": state,
            "metadata": self.metadata,
            "version": self.version,
            "timestamp_ms": self.updated_ms,
        })
    }
}

/// Who changes a shadow; a device reports, everyone else desires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowWriter {
    /// The device itself (over MQTT, CoAP or HTTP): may write both.
    Device,
    /// An operator, a rule or a fleet-wide setting: `desired` only.
    Platform,
}

impl ShadowWriter {
    /// How events and the API name the writer.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowWriter::Device => "device",
            ShadowWriter::Platform => "platform",
        }
    }
}

/// An update request: `{"state": {"desired": {…}, "reported": {…}},
/// "version": n, "clientToken": "…"}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowUpdate {
    #[serde(default)]
    pub state: UpdateState,
    /// The version the update was based on (refused if the shadow moved on).
    pub version: Option<u64>,
    #[serde(rename = "clientToken")]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateState {
    /// `null` clears the whole section.
    #[serde(default, deserialize_with = "present")]
    pub desired: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub reported: Option<Value>,
}

/// Tells `"desired": null` (clear it: `Some(Null)`) from an absent key
/// (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// What an accepted update did.
#[derive(Debug, Clone)]
pub struct ShadowChange {
    /// `None` when the shadow did not exist before.
    pub previous: Option<Shadow>,
    pub current: Shadow,
    /// The metadata of just the keys this update wrote.
    pub metadata: Map<String, Value>,
    pub client_token: Option<String>,
    /// Whether `desired` changed (the device should be told the delta).
    pub desired_changed: bool,
    /// Who made the change.
    pub writer: ShadowWriter,
}

impl ShadowChange {
    /// The top-level keys of `desired` whose value this change altered
    /// (added, replaced or deleted), in order.
    pub fn desired_keys(&self) -> Vec<String> {
        changed_keys(
            self.previous.as_ref().map(|p| &p.desired),
            &self.current.desired,
        )
    }

    /// The same for `reported`.
    pub fn reported_keys(&self) -> Vec<String> {
        changed_keys(
            self.previous.as_ref().map(|p| &p.reported),
            &self.current.reported,
        )
    }
}

/// Top-level keys whose values differ between `before` and `after`.
fn changed_keys(before: Option<&Map<String, Value>>, after: &Map<String, Value>) -> Vec<String> {
    let empty = Map::new();
    let before = before.unwrap_or(&empty);
    let mut keys: Vec<String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(before.keys().filter(|k| !after.contains_key(*k)).cloned())
        .collect();
    keys.sort();
    keys
}

/// Who hears about accepted shadow changes besides the writer (the live
/// hub behind `/api/v1/live`). Told here, in the one place every writer
/// goes through — devices over MQTT, operators, rules, fleet-wide settings
/// — so no writer can forget to; told while the shadows are locked, so a
/// watcher sees each shadow's versions in order.
pub trait ShadowWatch: Send + Sync {
    /// Whether anyone listens now; nothing is built for [`Self::changed`]
    /// otherwise (asked once per update: keep it to an atomic load).
    fn active(&self) -> bool;
    /// An accepted change, already durable. Must not block or call back
    /// into the fleet.
    fn changed(&self, change: &ShadowChange);
}

impl ShadowChange {
    /// `…/update/accepted`: the state as sent, its metadata, the version.
    pub fn accepted(&self, request: &ShadowUpdate) -> Value {
        let mut state = Map::new();
        if let Some(d) = &request.state.desired {
            state.insert("desired".into(), d.clone());
        }
        if let Some(r) = &request.state.reported {
            state.insert("reported".into(), r.clone());
        }
        with_token(
            json!({
                "state": state,
                "metadata": self.metadata,
                "version": self.current.version,
                "timestamp_ms": self.current.updated_ms,
            }),
            &self.client_token,
        )
    }

    /// `…/update/documents`: the whole shadow before and after.
    pub fn documents(&self) -> Value {
        with_token(
            json!({
                "previous": self.previous.as_ref().map(Shadow::document),
                "current": self.current.document(),
                "timestamp_ms": self.current.updated_ms,
            }),
            &self.client_token,
        )
    }

    /// `…/update/delta`, when desired changed and differs from reported.
    pub fn delta(&self) -> Option<Value> {
        if !self.desired_changed {
            return None;
        }
        let d = self.current.delta();
        if d.is_empty() {
            return None;
        }
        Some(with_token(
            json!({
                "state": d,
                "version": self.current.version,
                "timestamp_ms": self.current.updated_ms,
            }),
            &self.client_token,
        ))
    }
}

impl ShadowChange {
    /// What to publish to the device for an accepted update, in order:
    /// `…/update/accepted`, `…/update/documents`, and `…/update/delta` when
    /// desired changed and still differs from reported (see
    /// [`base_topic`] for where).
    pub fn answers(&self, request: &ShadowUpdate) -> Vec<(String, Value)> {
        let base = base_topic(&self.current.device_id, &self.current.name);
        let mut out = vec![
            (format!("{base}/update/accepted"), self.accepted(request)),
            (format!("{base}/update/documents"), self.documents()),
        ];
        if let Some(delta) = self.delta() {
            out.push((format!("{base}/update/delta"), delta));
        }
        out
    }
}

/// Where a shadow's MQTT topics live: `devices/{id}/shadow` for the classic
/// shadow, `devices/{id}/shadow/name/{name}` for a named one.
pub fn base_topic(device: &str, name: &str) -> String {
    if name.is_empty() {
        format!("devices/{device}/shadow")
    } else {
        format!("devices/{device}/shadow/name/{name}")
    }
}

/// Add `clientToken` when the request had one.
pub fn with_token(mut v: Value, token: &Option<String>) -> Value {
    if let (Some(t), Some(o)) = (token, v.as_object_mut()) {
        o.insert("clientToken".into(), Value::String(t.clone()));
    }
    v
}

/// A shadow's name: empty for the classic one, else `[A-Za-z0-9:_-]{1,64}`.
pub fn validate_name(name: &str) -> Result<()> {
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
    {
        return Err(RegistryError::Validation(format!(
            "shadow name {name:?} must be 1 to 64 characters from A-Z a-z 0-9 : _ -"
        )));
    }
    Ok(())
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Merge `patch` into `target` (objects key by key, `null` deletes), and
/// record a timestamp for every key written in `meta`.
fn merge(
    target: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    ts: i64,
) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
                meta.remove(k);
            }
            Value::Object(p) => {
                let t = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !t.is_object() {
                    *t = Value::Object(Map::new());
                }
                let m = meta
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !m.is_object() || m.get("timestamp_ms").is_some() {
                    *m = Value::Object(Map::new());
                }
                if let (Value::Object(t), Value::Object(m)) = (t, m) {
                    merge(t, m, p, ts);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
                meta.insert(k.clone(), json!({ "timestamp_ms": ts }));
            }
        }
    }
}

/// Metadata for exactly the keys of `patch` (what `accepted` reports).
fn stamp(patch: &Map<String, Value>, ts: i64) -> Map<String, Value> {
    patch
        .iter()
        .map(|(k, v)| {
            let m = match v {
                Value::Object(p) => Value::Object(stamp(p, ts)),
                _ => json!({ "timestamp_ms": ts }),
            };
            (k.clone(), m)
        })
        .collect()
}

fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, d) in desired {
        match (d, reported.get(k)) {
            (Value::Object(dm), Some(Value::Object(rm))) => {
                let sub = delta(dm, rm);
                if !sub.is_empty() {
                    out.insert(k.clone(), Value::Object(sub));
                }
            }
            (d, Some(r)) if d == r => {}
            (d, _) => {
                out.insert(k.clone(), d.clone());
            }
        }
    }
    out
}

/// Apply one section of an update; returns whether it changed anything.
fn apply_section(
    section: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Value,
    what: &str,
    ts: i64,
    stamped: &mut Map<String, Value>,
) -> Result<bool> {
    match patch {
        Value::Null => {
            let changed = !section.is_empty();
            section.clear();
            meta.clear();
            Ok(changed)
        }
        Value::Object(p) => {
            if depth(patch) > MAX_DEPTH {
                return Err(RegistryError::Validation(format!(
                    "state.{what} is nested more than {MAX_DEPTH} levels deep"
                )));
            }
            let before = section.clone();
            merge(section, meta, p, ts);
            stamped.insert(what.into(), Value::Object(stamp(p, ts)));
            Ok(*section != before)
        }
        _ => Err(RegistryError::Validation(format!(
            "state.{what} must be a JSON object (or null to clear it)"
        ))),
    }
}

/// The pure part of an update: the new shadow, or why not.
pub(crate) fn apply(
    current: Option<&Shadow>,
    tenant: &str,
    device_id: &str,
    name: &str,
    update: &ShadowUpdate,
    writer: ShadowWriter,
    now: i64,
) -> Result<ShadowChange> {
    if update.state.desired.is_none() && update.state.reported.is_none() {
        return Err(RegistryError::Validation(
            "the update has no state.desired or state.reported".into(),
        ));
    }
    if writer == ShadowWriter::Platform && update.state.reported.is_some() {
        return Err(RegistryError::Validation(
            "state.reported is the device's to write; set state.desired".into(),
        ));
    }
    if update
        .client_token
        .as_ref()
        .is_some_and(|t| t.len() > MAX_CLIENT_TOKEN)
    {
        return Err(RegistryError::Validation(format!(
            "clientToken is longer than {MAX_CLIENT_TOKEN} bytes"
        )));
    }
    let current_version = current.map_or(0, |s| s.version);
    if let Some(v) = update.version {
        if v != current_version {
            return Err(RegistryError::Conflict(format!(
                "version {v} is not the shadow's current version {current_version}"
            )));
        }
    }
    let mut next = current
        .cloned()
        .unwrap_or_else(|| Shadow::empty(tenant, device_id, name));
    let mut stamped = Map::new();
    let mut desired_changed = false;
    if let Some(d) = &update.state.desired {
        let mut meta = take_section(&mut next.metadata, "desired");
        desired_changed = apply_section(
            &mut next.desired,
            &mut meta,
            d,
            "desired",
            now,
            &mut stamped,
        )?;
        next.metadata.insert("desired".into(), Value::Object(meta));
    }
    if let Some(r) = &update.state.reported {
        let mut meta = take_section(&mut next.metadata, "reported");
        apply_section(
            &mut next.reported,
            &mut meta,
            r,
            "reported",
            now,
            &mut stamped,
        )?;
        next.metadata.insert("reported".into(), Value::Object(meta));
    }
    let size = serde_json::to_vec(&next.desired).map_or(usize::MAX, |v| v.len())
        + serde_json::to_vec(&next.reported).map_or(usize::MAX, |v| v.len());
    if size > MAX_STATE_BYTES {
        return Err(RegistryError::Validation(format!(
            "the shadow's state would be {size} bytes, more than {MAX_STATE_BYTES}; \
             delete keys (set them to null) or use a named shadow"
        )));
    }
    next.version = current_version + 1;
    next.updated_ms = now;
    Ok(ShadowChange {
        previous: current.cloned(),
        current: next,
        metadata: stamped,
        client_token: update.client_token.clone(),
        desired_changed,
        writer,
    })
}

fn take_section(meta: &mut Map<String, Value>, what: &str) -> Map<String, Value> {
    match meta.remove(what) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// Every shadow, by device and then by name, so that a device's shadows
/// are found, listed and counted without looking at any other device's.
#[derive(Debug, Default)]
pub(crate) struct ShadowBook(HashMap<String, BTreeMap<String, Shadow>>);

impl ShadowBook {
    pub fn load(all: Vec<Shadow>) -> ShadowBook {
        let mut book = ShadowBook::default();
        for s in all {
            book.insert(s);
        }
        book
    }

    pub fn get(&self, device_id: &str, name: &str) -> Option<&Shadow> {
        self.0.get(device_id)?.get(name)
    }

    /// A device's shadow names, in order (`""` first).
    pub fn names(&self, device_id: &str) -> Vec<String> {
        self.0
            .get(device_id)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `device_id` may have a shadow `name`: an existing one, the
    /// classic one, or a new named one within [`MAX_NAMED`].
    pub fn check_room(&self, device_id: &str, name: &str) -> Result<()> {
        let Some(m) = self.0.get(device_id) else {
            return Ok(());
        };
        if name.is_empty() || m.contains_key(name) {
            return Ok(());
        }
        let named = m.len() - usize::from(m.contains_key(""));
        if named >= MAX_NAMED {
            return Err(RegistryError::Conflict(format!(
                "device {device_id} has {MAX_NAMED} named shadows, the most it may have"
            )));
        }
        Ok(())
    }

    pub fn insert(&mut self, s: Shadow) {
        self.0
            .entry(s.device_id.clone())
            .or_default()
            .insert(s.name.clone(), s);
    }

    pub fn remove(&mut self, device_id: &str, name: &str) {
        if let Some(m) = self.0.get_mut(device_id) {
            m.remove(name);
            if m.is_empty() {
                self.0.remove(device_id);
            }
        }
    }

    pub fn forget_device(&mut self, device_id: &str) {
        self.0.remove(device_id);
    }
}

impl Fleet {
    /// A device's shadow (`name` `""`: the classic one). With `tenant`, a
    /// device of another tenant is not found.
    pub fn get_shadow(&self, tenant: Option<&str>, device_id: &str, name: &str) -> Result<Shadow> {
        validate_name(name)?;
        let shadows = self.shared.shadows.lock();
        shadows
            .get(device_id, name)
            .filter(|s| tenant.is_none_or(|t| s.tenant == t))
            .cloned()
            .ok_or_else(|| not_found(device_id, name))
    }

    /// The names of a device's shadows (`""` first when it has the classic one).
    pub fn list_shadows(&self, tenant: Option<&str>, device_id: &str) -> Result<Vec<String>> {
        let known = self
            .shared
            .identity
            .with_device(device_id, |d| tenant.is_none_or(|t| d.tenant == t))
            .unwrap_or(false);
        if !known {
            return Err(RegistryError::NotFound(format!("device {device_id}")));
        }
        Ok(self.shared.shadows.lock().names(device_id))
    }

    /// Apply an update (see the module docs) and make it durable before
    /// returning. `tenant` must be the device's.
    pub fn update_shadow(
        &self,
        tenant: &str,
        device_id: &str,
        name: &str,
        update: &ShadowUpdate,
        writer: ShadowWriter,
    ) -> Result<ShadowChange> {
        validate_name(name)?;
        crate::alarm::check_target(&self.shared.identity, tenant, device_id)?;
        if self
            .shared
            .identity
            .with_device(device_id, |_| ())
            .is_none()
        {
            return Err(RegistryError::NotFound(format!("device {device_id}")));
        }
        let s = &*self.shared;
        let mut shadows = s.shadows.lock();
        shadows.check_room(device_id, name)?;
        let change = write_shadow(s, &mut shadows, tenant, device_id, name, update, writer)?;
        s.tell_watcher(std::slice::from_ref(&change));
        Ok(change)
    }

    /// Delete a shadow; its version starts again from 1.
    pub fn delete_shadow(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        name: &str,
    ) -> Result<Shadow> {
        validate_name(name)?;
        let s = &*self.shared;
        let mut shadows = s.shadows.lock();
        let Some(existing) = shadows
            .get(device_id, name)
            .filter(|x| tenant.is_none_or(|t| x.tenant == t))
            .cloned()
        else {
            return Err(not_found(device_id, name));
        };
        s.store.delete_shadow(device_id, name)?;
        shadows.remove(device_id, name);
        Ok(existing)
    }
}

/// Writes lost to other nodes before an update gives up.
const MAX_RACES: usize = 5;

/// Apply `update` to the book's copy and write it. Nodes sharing a store
/// each hold the shadows in memory: the write is conditional on the
/// version this node applied the update to, and a lost race reads the
/// stored shadow and applies the update again.
pub(crate) fn write_shadow(
    s: &crate::Shared,
    shadows: &mut ShadowBook,
    tenant: &str,
    device_id: &str,
    name: &str,
    update: &ShadowUpdate,
    writer: ShadowWriter,
) -> Result<ShadowChange> {
    for _ in 0..MAX_RACES {
        let current = shadows.get(device_id, name);
        let prev = current.map_or(0, |c| c.version);
        let change = apply(current, tenant, device_id, name, update, writer, now_ms())?;
        if s.store.put_shadow_if(&change.current, prev)? {
            shadows.insert(change.current.clone());
            return Ok(change);
        }
        reread(s, shadows, device_id, name)?;
    }
    Err(RegistryError::Conflict(format!(
        "shadow {name:?} of device {device_id} kept changing on other nodes; try again"
    )))
}

/// Replace the book's copy of a shadow with the stored one.
pub(crate) fn reread(
    s: &crate::Shared,
    shadows: &mut ShadowBook,
    device_id: &str,
    name: &str,
) -> Result<()> {
    match s.store.stored_shadow(device_id, name)? {
        Some(stored) => shadows.insert(stored),
        None => shadows.remove(device_id, name),
    }
    Ok(())
}

fn not_found(device_id: &str, name: &str) -> RegistryError {
    if name.is_empty() {
        RegistryError::NotFound(format!("the shadow of device {device_id}"))
    } else {
        RegistryError::NotFound(format!("shadow {name:?} of device {device_id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;
    use m2mhub_identity::NewDevice;

    fn upd(v: Value) -> ShadowUpdate {
        serde_json::from_value(v).expect("an update")
    }

    fn device(f: &Fleet, id: &str) {
        f.identity()
            .create_device(NewDevice {
                id: Some(id.into()),
                ..Default::default()
            })
            .expect("device");
    }

    #[test]
    fn merge_deletes_with_null_and_delta_is_what_differs() {
        let (_d, f) = open();
        device(&f, "t1");
        let c = f
            .update_shadow(
                "default",
                "t1",
                "",
                &upd(json!({"state": {"desired": {"setpoint": 21, "mode": {"fan": "auto", "eco": true}}}})),
                ShadowWriter::Platform,
            )
            .expect("desired");
        assert_eq!(c.current.version, 1);
        assert!(c.previous.is_none());
        assert_eq!(
            c.delta().expect("delta")["state"],
            json!({"setpoint": 21, "mode": {"fan": "auto", "eco": true}})
        );
        let c = f
            .update_shadow(
                "default",
                "t1",
                "",
                &upd(json!({"state": {"reported": {"setpoint": 21, "mode": {"fan": "auto", "eco": false}}}})),
                ShadowWriter::Device,
            )
            .expect("reported");
        assert_eq!(c.current.version, 2);
        assert_eq!(
            c.current.delta(),
            json!({"mode": {"eco": true}})
                .as_object()
                .cloned()
                .expect("map")
        );
        // A report does not change desired: no delta message.
        assert!(c.delta().is_none());
        // null deletes a key (and its metadata).
        let c = f
            .update_shadow(
                "default",
                "t1",
                "",
                &upd(json!({"state": {"desired": {"mode": null}}})),
                ShadowWriter::Platform,
            )
            .expect("delete a key");
        assert_eq!(
            c.current.desired,
            json!({"setpoint": 21}).as_object().cloned().expect("map")
        );
        assert!(c.current.metadata["desired"].get("mode").is_none());
        assert!(c.current.metadata["desired"]["setpoint"]["timestamp_ms"].is_i64());
        assert!(c.current.delta().is_empty());
    }

    #[test]
    fn a_stale_version_is_a_conflict_and_changes_nothing() {
        let (_d, f) = open();
        device(&f, "t1");
        let first = upd(json!({"state": {"desired": {"a": 1}}, "version": 0}));
        f.update_shadow("default", "t1", "", &first, ShadowWriter::Platform)
            .expect("based on nothing");
        let e = f
            .update_shadow("default", "t1", "", &first, ShadowWriter::Platform)
            .expect_err("version 0 is stale now");
        assert!(matches!(e, RegistryError::Conflict(_)), "{e}");
        let s = f.get_shadow(None, "t1", "").expect("shadow");
        assert_eq!((s.version, s.desired["a"].clone()), (1, json!(1)));
    }

    #[test]
    fn limits_roles_names_and_tenants_are_enforced() {
        let (_d, f) = open();
        device(&f, "t1");
        let big = "x".repeat(MAX_STATE_BYTES);
        let e = f
            .update_shadow(
                "default",
                "t1",
                "",
                &upd(json!({"state": {"reported": {"blob": big}}})),
                ShadowWriter::Device,
            )
            .expect_err("too large");
        assert!(e.to_string().contains("more than"), "{e}");
        let deep = json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}});
        assert!(f
            .update_shadow(
                "default",
                "t1",
                "",
                &upd(json!({"state": {"desired": deep}})),
                ShadowWriter::Platform
            )
            .is_err());
        let e = f
            .update_shadow(
                "default",
                "t1",
                "",
                &upd(json!({"state": {"reported": {"x": 1}}})),
                ShadowWriter::Platform,
            )
            .expect_err("operators do not report");
        assert!(e.to_string().contains("device's to write"), "{e}");
        assert!(f
            .update_shadow(
                "default",
                "t1",
                "bad name!",
                &upd(json!({"state": {"desired": {}}})),
                ShadowWriter::Platform
            )
            .is_err());
        assert!(f
            .update_shadow(
                "default",
                "ghost",
                "",
                &upd(json!({"state": {"desired": {"a": 1}}})),
                ShadowWriter::Platform
            )
            .is_err());
        f.identity().create_tenant("acme", "Acme").expect("tenant");
        assert!(
            f.update_shadow(
                "acme",
                "t1",
                "",
                &upd(json!({"state": {"desired": {"a": 1}}})),
                ShadowWriter::Platform
            )
            .is_err(),
            "t1 is not acme's"
        );
        for i in 0..MAX_NAMED {
            f.update_shadow(
                "default",
                "t1",
                &format!("n{i}"),
                &upd(json!({"state": {"desired": {"a": 1}}})),
                ShadowWriter::Platform,
            )
            .expect("named");
        }
        assert!(matches!(
            f.update_shadow(
                "default",
                "t1",
                "one-more",
                &upd(json!({"state": {"desired": {"a": 1}}})),
                ShadowWriter::Platform
            ),
            Err(RegistryError::Conflict(_))
        ));
        assert!(
            f.get_shadow(Some("acme"), "t1", "n0").is_err(),
            "tenant-scoped read"
        );
        assert_eq!(
            f.list_shadows(Some("default"), "t1").expect("names").len(),
            MAX_NAMED
        );
    }

    /// Accepted updates are on disk: a reopen has them; deleting the
    /// device deletes its shadows.
    #[test]
    fn shadows_survive_a_reopen_and_go_with_their_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let f = crate::testutil::open_in(dir.path());
            device(&f, "t1");
            f.update_shadow(
                "default",
                "t1",
                "",
                &upd(json!({"state": {"desired": {"a": 1}}})),
                ShadowWriter::Platform,
            )
            .expect("classic");
            f.update_shadow(
                "default",
                "t1",
                "cfg",
                &upd(json!({"state": {"reported": {"b": 2}}})),
                ShadowWriter::Device,
            )
            .expect("named");
        }
        let f = crate::testutil::open_in(dir.path());
        assert_eq!(
            f.get_shadow(None, "t1", "").expect("classic").desired["a"],
            json!(1)
        );
        assert_eq!(
            f.get_shadow(None, "t1", "cfg").expect("named").reported["b"],
            json!(2)
        );
        f.delete_shadow(None, "t1", "cfg").expect("delete");
        assert!(f.get_shadow(None, "t1", "cfg").is_err());
        f.identity().delete_device("t1").expect("delete device");
        assert!(f.get_shadow(None, "t1", "").is_err());
        drop(f);
        let f = crate::testutil::open_in(dir.path());
        assert!(f.get_shadow(None, "t1", "").is_err(), "deleted on disk too");
    }

    #[test]
    fn clearing_a_section_with_null_and_documents() {
        let (_d, f) = open();
        device(&f, "t1");
        let u = upd(json!({"state": {"desired": {"a": 1}}, "clientToken": "tok-1"}));
        let c = f
            .update_shadow("default", "t1", "", &u, ShadowWriter::Platform)
            .expect("set");
        assert_eq!(c.accepted(&u)["clientToken"], "tok-1");
        assert_eq!(
            c.accepted(&u)["metadata"]["desired"]["a"]["timestamp_ms"],
            json!(c.current.updated_ms)
        );
        assert_eq!(c.documents()["previous"], Value::Null);
        let c = f
            .update_shadow(
                "default",
                "t1",
                "",
                &upd(json!({"state": {"desired": null}})),
                ShadowWriter::Platform,
            )
            .expect("clear");
        assert!(c.current.desired.is_empty());
        assert_eq!(
            c.documents()["previous"]["state"]["desired"],
            json!({"a": 1})
        );
        assert_eq!(c.documents()["current"]["version"], 2);
    }

    /// What a watcher is told: who wrote, and the top-level keys whose
    /// value changed (a rewrite of an equal value is no change; a deleted
    /// key and a cleared section are).
    #[test]
    fn changes_name_their_writer_and_changed_keys_and_reach_the_watcher() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        /// (version, desired keys, reported keys) per change told.
        type Told = Vec<(u64, Vec<String>, Vec<String>)>;
        struct Seen(AtomicBool, parking_lot::Mutex<Told>);
        impl ShadowWatch for Seen {
            fn active(&self) -> bool {
                self.0.load(Ordering::Relaxed)
            }
            fn changed(&self, c: &ShadowChange) {
                self.1
                    .lock()
                    .push((c.current.version, c.desired_keys(), c.reported_keys()));
            }
        }
        let (_d, f) = open();
        device(&f, "t1");
        let seen = Arc::new(Seen(AtomicBool::new(false), Default::default()));
        f.watch_shadows(seen.clone());
        let write = |v: Value, w: ShadowWriter| {
            f.update_shadow("default", "t1", "", &upd(v), w)
                .expect("update")
        };
        // Nobody listens: nothing is built.
        write(
            json!({"state": {"desired": {"a": 1, "b": 2}}}),
            ShadowWriter::Platform,
        );
        assert!(seen.1.lock().is_empty());
        seen.0.store(true, Ordering::Relaxed);
        let c = write(
            json!({"state": {"desired": {"a": 1, "b": null, "c": 3}, "reported": {"a": 1}}}),
            ShadowWriter::Device,
        );
        assert_eq!(c.writer, ShadowWriter::Device);
        assert_eq!(c.writer.as_str(), "device");
        write(json!({"state": {"reported": null}}), ShadowWriter::Device);
        assert_eq!(
            *seen.1.lock(),
            vec![
                (
                    2,
                    vec!["b".to_string(), "c".to_string()],
                    vec!["a".to_string()]
                ),
                (3, vec![], vec!["a".to_string()]),
            ]
        );
    }
}
