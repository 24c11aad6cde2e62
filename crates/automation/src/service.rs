//! The rule service: feeds the broker's messages and the platform's events
//! to the rule engine (one `Engine` per tenant, so a rule only ever sees
//! its own tenant's devices), runs the actions of what fires, and sends
//! and tracks device commands.
//!
//! One task owns the loop: messages come from an internal broker
//! subscription on `#`, connection events from the broker's
//! `ConnectionEvents` hook, alarm changes from fleet operations, security
//! events from the registry (`security.rs`); a timer ticks
//! the engines for windows, `FOR` durations and silence. Rule changes made
//! through the API arrive as `reload` calls and take effect at once.

use crate::actions::{self, Action, BanTarget, Kind, LogLevel};
use crate::control::{RuleProblem, RuleService};
use crate::security::{self, SecurityAlarms};
use crate::webhook::{Delivery, Outcome, Policy, Target, Webhooks};
use bytes::Bytes;
use m2mhub_broker::auth::ClientIdentity;
use m2mhub_broker::message::Message;
use m2mhub_broker::{Broker, ConnectionEvents};
use m2mhub_fleet::{
    AlarmChange, ClearedBy, CommandStatus, CommandUpdate, Fleet, NewCommand, ShadowUpdate,
    ShadowWriter,
};
use m2mhub_identity::{SecurityEventRecord, DEFAULT_TENANT};
use m2mhub_rules::{CompiledRule, Engine, Output, OutputKind, RuleOutput};
use mqtt_codec::{PublishProperties, QoS};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Messages queued for the rule engine; beyond this they are dropped and
/// counted (the broker never waits for rules).
const QUEUE: usize = 65_536;

fn now_ms() -> i64 {
    m2mhub_identity::now_ms()
}

/// The rule engine's clock: the wall clock, except that it never goes
/// back. Windows, `FOR` and silence run on it; when the system clock is
/// stepped back (NTP, an operator), this one keeps advancing at real-time
/// speed from where it was until the wall clock catches up, so windows
/// keep closing on time instead of refusing every message as late for as
/// long as the step (found by the chaos harness: a 2 h step back silenced
/// a tumbling-window rule for 2 h). A step forward is followed at once, as
/// the time that passed.
fn rule_now() -> i64 {
    static CLOCK: parking_lot::Mutex<Option<(i64, std::time::Instant)>> =
        parking_lot::Mutex::new(None);
    let mut last = CLOCK.lock();
    let wall = now_ms();
    let at = std::time::Instant::now();
    let now = match *last {
        None => wall,
        Some((t, then)) => advance(t, at.saturating_duration_since(then), wall),
    };
    *last = Some((now, at));
    now
}

/// The rule clock `elapsed` after it read `last`, when the wall clock
/// reads `wall`.
fn advance(last: i64, elapsed: Duration, wall: i64) -> i64 {
    let elapsed = i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX);
    wall.max(last.saturating_add(elapsed))
}

/// What the service knows about one rule besides its compiled form.
struct Meta {
    tenant: String,
    /// As defined (whether it runs here also depends on the placement).
    enabled: bool,
    /// Its FROM filter, and whether that is an event source (`$events/…`:
    /// events happen on one node each, so such rules run on every node).
    source: String,
    event_source: bool,
    /// The SQL reads `shadow.…`: messages get the device's shadow.
    reads_shadow: bool,
    actions: Vec<Action>,
    action_failures: u64,
    last_action_error: Option<(i64, String)>,
}

#[derive(Default)]
struct Rules {
    engines: HashMap<String, Engine>,
    meta: HashMap<String, Meta>,
    /// Tenant → how many of its rules read `shadow.…` (so a tenant whose
    /// rules do not pays nothing per message).
    shadow_readers: HashMap<String, usize>,
}

impl Rules {
    fn forget(&mut self, rule_id: &str) -> Option<Meta> {
        let old = self.meta.remove(rule_id)?;
        if old.reads_shadow {
            if let Some(n) = self.shadow_readers.get_mut(&old.tenant) {
                *n -= 1;
                if *n == 0 {
                    self.shadow_readers.remove(&old.tenant);
                }
            }
        }
        Some(old)
    }
}

impl Rules {
    /// The broker topics the rules read (event sources come from hooks),
    /// plus command responses, which are always watched.
    fn filters(&self) -> Vec<String> {
        let mut set = std::collections::BTreeSet::new();
        set.insert("devices/+/commands/response".to_string());
        for e in self.engines.values() {
            for id in e.ids() {
                if let Some(r) = e.get(id) {
                    if !r.source().is_event_source() {
                        set.insert(r.source().as_str().to_string());
                    }
                }
            }
        }
        set.into_iter().collect()
    }
}

/// Service-wide counters.
#[derive(Debug, Default)]
pub struct AutomationStats {
    pub messages: AtomicU64,
    pub dropped: AtomicU64,
    pub outputs: AtomicU64,
    pub action_failures: AtomicU64,
    pub commands_sent: AtomicU64,
    pub commands_answered: AtomicU64,
}

struct Shared {
    broker: Broker,
    /// Rules, alarms and commands; its `identity()` answers device lookups.
    fleet: Fleet,
    rules: Mutex<Rules>,
    webhooks: Webhooks,
    stats: AutomationStats,
    events: mpsc::Sender<(String, Option<String>, Value)>,
    /// The broker observer the loop reads, and the topic filters it
    /// watches (changed in place, under this lock, when rules change).
    observer: m2mhub_broker::ObserverId,
    filters: Mutex<Vec<String>>,
    /// Device attributes by device id (see `device_meta`).
    meta: Mutex<HashMap<String, (std::time::Instant, Value)>>,
    /// Which security events raise alarms.
    security_alarms: SecurityAlarms,
    /// In a cluster: which message-fed rules this node runs for everyone.
    placement: Mutex<Option<Placement>>,
}

/// Rules over messages placed on one node each (see
/// [`Automation::place_with`]).
struct Placement {
    /// The rules this node owns now.
    owned: BTreeSet<String>,
    /// Tells the cluster which rules want an owner.
    want: Arc<dyn Fn(BTreeSet<String>) + Send + Sync>,
}

/// The running service; implements the API's [`RuleService`].
#[derive(Clone)]
pub struct Automation {
    shared: Arc<Shared>,
}

impl Automation {
    /// Load the enabled rules, install the hooks and start the loop.
    pub fn start(broker: Broker, fleet: Fleet, security_alarms: SecurityAlarms) -> Automation {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let webhooks = Webhooks::start(Policy::default(), out_tx);
        let (ev_tx, ev_rx) = mpsc::channel(QUEUE);
        let (observer, msgs) = broker.observer(QUEUE);
        let shared = Arc::new(Shared {
            observer,
            filters: Mutex::new(Vec::new()),
            meta: Mutex::new(HashMap::new()),
            broker: broker.clone(),
            fleet: fleet.clone(),
            rules: Mutex::new(Rules::default()),
            webhooks,
            stats: AutomationStats::default(),
            events: ev_tx,
            security_alarms,
            placement: Mutex::new(None),
        });
        let svc = Automation { shared };
        match fleet.list_rules(None) {
            Ok(rules) => {
                for r in rules {
                    svc.reload(&r.id);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot load rules"),
        }
        svc.refresh_filters();
        broker.add_connection_events(Arc::new(ConnEvents(svc.shared.events.clone())));
        tokio::spawn(run(svc.shared.clone(), msgs, ev_rx, out_rx));
        svc
    }

    /// Observe the union of the rules' filters: done before the API call
    /// that changed a rule returns, so the rule sees the next message. In
    /// a cluster, also say which rules want an owner, and ask the fabric
    /// for every node's messages that the rules owned here read.
    fn refresh_filters(&self) {
        let f = self.shared.rules.lock().filters();
        {
            let mut cur = self.shared.filters.lock();
            if *cur != f {
                self.shared.broker.set_observed(self.shared.observer, &f);
                *cur = f;
            }
        }
        // The placement's lock is not held with the rules' (reload takes
        // them in the other order).
        let (owned, want) = match self.shared.placement.lock().as_ref() {
            Some(p) => (p.owned.clone(), p.want.clone()),
            None => return,
        };
        let (wanted, remote) = {
            let rules = self.shared.rules.lock();
            let placed = rules
                .meta
                .iter()
                .filter(|(_, m)| m.enabled && !m.event_source);
            let wanted: BTreeSet<String> = placed.clone().map(|(id, _)| id.clone()).collect();
            let remote: BTreeSet<String> = placed
                .filter(|(id, _)| owned.contains(*id))
                .map(|(_, m)| m.source.clone())
                .collect();
            (wanted, remote)
        };
        want(wanted);
        let remote: Vec<String> = remote.into_iter().collect();
        self.shared
            .broker
            .set_observed_remote(self.shared.observer, &remote);
    }

    /// Whether this node runs a message-fed rule: always on a single node;
    /// in a cluster, when it holds the rule's lease.
    fn owns_placed(&self, rule_id: &str) -> bool {
        self.shared
            .placement
            .lock()
            .as_ref()
            .is_none_or(|p| p.owned.contains(rule_id))
    }

    /// Run each rule over messages on one node of the cluster: `want` is
    /// told the ids of the rules that need an owner whenever they change
    /// (the cluster's leases), and [`Automation::placed`] says which this
    /// node owns. Until then it runs none of them (their windows would
    /// otherwise count only this node's share of the messages). Rules over
    /// `$events/…` keep running on every node: each event happens on one.
    pub fn place_with(&self, want: impl Fn(BTreeSet<String>) + Send + Sync + 'static) {
        *self.shared.placement.lock() = Some(Placement {
            owned: BTreeSet::new(),
            want: Arc::new(want),
        });
        self.apply_placement();
    }

    /// The rules this node now owns (see [`Automation::place_with`]). A
    /// rule gained starts with empty windows; a rule lost forgets its own.
    pub fn placed(&self, owned: BTreeSet<String>) {
        {
            let mut p = self.shared.placement.lock();
            let Some(p) = p.as_mut() else { return };
            if p.owned == owned {
                return;
            }
            tracing::info!(rules = owned.len(), "rules placed on this node changed");
            p.owned = owned;
        }
        self.apply_placement();
    }

    fn apply_placement(&self) {
        {
            let mut rules = self.shared.rules.lock();
            let runs: Vec<(String, String, bool)> = rules
                .meta
                .iter()
                .map(|(id, m)| {
                    let runs = m.enabled && (m.event_source || self.owns_placed(id));
                    (m.tenant.clone(), id.clone(), runs)
                })
                .collect();
            for (tenant, id, runs) in runs {
                if let Some(e) = rules.engines.get_mut(&tenant) {
                    if e.is_enabled(&id) != Some(runs) {
                        e.set_enabled(&id, runs);
                    }
                }
            }
        }
        self.refresh_filters();
    }

    pub fn stats(&self) -> &AutomationStats {
        &self.shared.stats
    }

    pub fn webhook_stats(&self) -> &crate::webhook::WebhookStats {
        &self.shared.webhooks.stats
    }
}

impl Automation {
    fn reload_rule(&self, rule_id: &str) {
        let def = self.shared.fleet.get_rule(rule_id).ok();
        let mut rules = self.shared.rules.lock();
        // Drop the old version wherever it was.
        if let Some(old) = rules.forget(rule_id) {
            if let Some(e) = rules.engines.get_mut(&old.tenant) {
                e.remove(rule_id);
            }
        }
        let Some(def) = def else { return };
        let compiled = match CompiledRule::compile(&def.sql) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(rule = rule_id, error = %e.kind, "stored rule does not compile; not run");
                return;
            }
        };
        let acts = match actions::parse(&def.actions) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(rule = rule_id, error = %e, "stored rule has bad actions; not run");
                return;
            }
        };
        let reads_shadow = def.sql.contains("shadow.");
        if reads_shadow {
            *rules.shadow_readers.entry(def.tenant.clone()).or_default() += 1;
        }
        let event_source = compiled.source().is_event_source();
        let source = compiled.source().as_str().to_string();
        let engine = rules.engines.entry(def.tenant.clone()).or_default();
        engine.insert(rule_id, compiled);
        let runs_here = def.enabled && (event_source || self.owns_placed(rule_id));
        engine.set_enabled(rule_id, runs_here);
        rules.meta.insert(
            rule_id.to_string(),
            Meta {
                enabled: def.enabled,
                source,
                event_source,
                tenant: def.tenant,
                reads_shadow,
                actions: acts,
                action_failures: 0,
                last_action_error: None,
            },
        );
    }
}

impl RuleService for Automation {
    fn validate(&self, tenant: &str, sql: &str, acts: &Value) -> Result<(), RuleProblem> {
        CompiledRule::compile(sql).map_err(|e| RuleProblem {
            message: e.kind.to_string(),
            line: Some(u64::from(e.position.line)),
            column: Some(u64::from(e.position.column)),
        })?;
        let parsed = actions::parse(acts).map_err(|message| RuleProblem {
            message,
            line: None,
            column: None,
        })?;
        if let Some(i) = parsed
            .iter()
            .position(|a| address_ban(a) && !may_ban_addresses(tenant))
        {
            return Err(RuleProblem {
                message: format!(
                    "action {i}: only the {DEFAULT_TENANT} tenant's rules may ban addresses (an address is shared by every tenant's devices behind it); ban the device instead"
                ),
                line: None,
                column: None,
            });
        }
        Ok(())
    }

    fn reload(&self, rule_id: &str) {
        self.reload_rule(rule_id);
        self.refresh_filters();
    }

    fn counters(&self, rule_id: &str) -> Option<Value> {
        let rules = self.shared.rules.lock();
        let meta = rules.meta.get(rule_id)?;
        let engine = rules.engines.get(&meta.tenant)?;
        let c = engine.get(rule_id)?.counters();
        Some(json!({
            "received": c.received,
            "matched": c.matched,
            "fired": c.fired,
            "cleared": c.cleared,
            "failed": c.failed,
            "late": c.late,
            "last_error": c.last_error.as_ref().map(|e| json!({"ts_ms": e.ts_ms, "error": e.error.to_string()})),
            "action_failures": meta.action_failures,
            "last_action_error": meta.last_action_error.as_ref().map(|(t, e)| json!({"ts_ms": t, "error": e})),
            "enabled": meta.enabled,
            "runs_here": engine.is_enabled(rule_id),
        }))
    }

    fn metrics(&self) -> Vec<(&'static str, &'static str, u64)> {
        let s = &self.shared.stats;
        let w = &self.shared.webhooks.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "messages",
                "messages seen by the rule service",
                l(&s.messages),
            ),
            (
                "dropped",
                "events the rule service could not keep up with",
                l(&s.dropped),
            ),
            (
                "outputs",
                "rule outputs (fire, repeat, clear)",
                l(&s.outputs),
            ),
            (
                "action_failures",
                "rule actions that failed",
                l(&s.action_failures),
            ),
            (
                "commands_sent",
                "device commands published",
                l(&s.commands_sent),
            ),
            (
                "commands_answered",
                "device commands answered",
                l(&s.commands_answered),
            ),
            (
                "webhooks_delivered",
                "webhook deliveries that succeeded",
                l(&w.delivered),
            ),
            (
                "webhook_failed_attempts",
                "webhook attempts that failed (retried or not)",
                l(&w.failed_attempts),
            ),
            (
                "webhooks_given_up",
                "webhook deliveries abandoned after their retries",
                l(&w.gave_up),
            ),
            (
                "webhooks_dropped",
                "webhook deliveries refused by a full queue",
                l(&w.dropped_queue_full),
            ),
        ]
    }

    fn send_command(
        &self,
        tenant: &str,
        device: &str,
        name: &str,
        params: Value,
        timeout_ms: u64,
        origin: &str,
    ) -> Result<String, String> {
        let cmd = self
            .shared
            .fleet
            .create_command(NewCommand {
                tenant: tenant.into(),
                device_id: device.into(),
                name: name.into(),
                params,
                origin: origin.into(),
                timeout_ms,
            })
            .map_err(|e| e.to_string())?;
        let shared = self.shared.clone();
        let id = cmd.id.clone();
        tokio::spawn(async move { publish_command(&shared, &cmd).await });
        Ok(id)
    }
}

fn address_ban(a: &Action) -> bool {
    matches!(
        a.kind,
        Kind::Ban {
            target: BanTarget::Address,
            ..
        }
    )
}

fn may_ban_addresses(tenant: &str) -> bool {
    tenant == DEFAULT_TENANT
}

/// The topic a device receives commands on, and the one it answers on.
pub fn command_topic(device: &str) -> String {
    format!("devices/{device}/commands")
}

pub fn response_topic(device: &str) -> String {
    format!("devices/{device}/commands/response")
}

async fn publish_command(shared: &Shared, cmd: &m2mhub_fleet::Command) {
    let body = json!({"id": cmd.id, "name": cmd.name, "params": cmd.params});
    let props = PublishProperties {
        response_topic: Some(response_topic(&cmd.device_id)),
        correlation_data: Some(Bytes::from(cmd.id.clone().into_bytes())),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    let matched = shared
        .broker
        .publish_with(
            &command_topic(&cmd.device_id),
            Bytes::from(body.to_string()),
            QoS::AtLeastOnce,
            false,
            props,
        )
        .await;
    shared.stats.commands_sent.fetch_add(1, Ordering::Relaxed);
    // Routed to the device's subscription (or queued for its offline
    // persistent session): delivered to it as far as the platform can
    // tell; nobody listening: sent, and it will time out.
    let status = if matched > 0 {
        CommandStatus::Delivered
    } else {
        CommandStatus::Sent
    };
    if let Err(e) = shared
        .fleet
        .update_command(&cmd.id, CommandUpdate::status(status))
    {
        tracing::warn!(command = %cmd.id, error = %e, "cannot record a command's status");
    }
}

/// A device's answer: correlation data (MQTT 5) or an `id` member in the
/// JSON body (MQTT 3.1.1) names the command.
fn on_response(shared: &Shared, device: &str, msg: &Message) {
    let body: Value = serde_json::from_slice(&msg.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&msg.payload).into_owned()));
    let id = msg
        .properties
        .correlation_data
        .as_ref()
        .and_then(|c| std::str::from_utf8(c).ok().map(str::to_string))
        .or_else(|| body.get("id").and_then(Value::as_str).map(str::to_string));
    let Some(id) = id else {
        tracing::debug!(device, "command response without a correlation id");
        return;
    };
    match shared.fleet.get_command(&id) {
        Ok(c) if c.device_id == device => {
            if let Ok(Some(_)) = shared
                .fleet
                .update_command(&id, CommandUpdate::answer(body))
            {
                shared
                    .stats
                    .commands_answered
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        // Another device's command id: ignored (a device cannot answer
        // for another).
        _ => tracing::debug!(device, command = %id, "response to an unknown command"),
    }
}

struct ConnEvents(mpsc::Sender<(String, Option<String>, Value)>);

impl ConnectionEvents for ConnEvents {
    fn connected(&self, client_id: &str, identity: &ClientIdentity, peer: SocketAddr) {
        let device = identity.device_id.as_deref().unwrap_or(client_id);
        let _ = self.0.try_send((
            "$events/device_connected".into(),
            Some(device.to_string()),
            json!({"device": device, "client_id": client_id, "addr": peer.ip().to_string()}),
        ));
    }

    fn disconnected(&self, client_id: &str, identity: &ClientIdentity, reason: &str) {
        let device = identity.device_id.as_deref().unwrap_or(client_id);
        let _ = self.0.try_send((
            "$events/device_disconnected".into(),
            Some(device.to_string()),
            json!({"device": device, "client_id": client_id, "reason": reason}),
        ));
    }

    fn auth_failed(
        &self,
        _client_id: &str,
        _username: Option<&str>,
        _peer: SocketAddr,
        _reason: u8,
    ) {
    }
}

/// `devices/{id}/…` → `id`.
fn device_of(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("devices/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// A payload as the JSON the rules read: JSON as is; for telemetry in
/// another format, the decoded points as `{metric: value}`.
fn payload_json(topic: &str, payload: &[u8]) -> Option<Value> {
    if let Ok(v) = serde_json::from_slice::<Value>(payload) {
        // A bare telemetry number is the metric `value`, as stored.
        if topic.ends_with("/telemetry") && !v.is_object() && !v.is_array() {
            return Some(json!({ "value": v }));
        }
        return Some(v);
    }
    if !topic.ends_with("/telemetry") {
        return None;
    }
    let points = m2mhub_telemetry::decode(payload, None, now_ms(), &Default::default()).ok()?;
    let mut m = Map::new();
    for p in points {
        let v = match p.value {
            m2mhub_telemetry::Value::F64(x) => json!(x),
            m2mhub_telemetry::Value::Bool(b) => json!(b),
            m2mhub_telemetry::Value::Str(s) => json!(s),
        };
        m.insert(p.metric, v);
    }
    Some(Value::Object(m))
}

async fn run(
    shared: Arc<Shared>,
    mut msgs: mpsc::Receiver<Arc<m2mhub_broker::message::Message>>,
    mut events: mpsc::Receiver<(String, Option<String>, Value)>,
    mut outcomes: mpsc::UnboundedReceiver<Outcome>,
) {
    let mut alarms = shared.fleet.subscribe_alarms();
    let mut security_events = Some(shared.fleet.identity().subscribe_security_events());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let mut shutdown = shared.broker.shutdown_signal();
    loop {
        tokio::select! {
            m = msgs.recv() => match m {
                Some(m) => on_message(&shared, &m).await,
                None => return,
            },
            e = events.recv() => if let Some((topic, device, body)) = e {
                on_event(&shared, &topic, device.as_deref(), &body).await;
            },
            a = alarms.recv() => match a {
                Ok(ev) => {
                    let change = match ev.change {
                        AlarmChange::Raised => "raised",
                        AlarmChange::Updated => "updated",
                        AlarmChange::Cleared => "cleared",
                        AlarmChange::Acked => "acked",
                    };
                    let a = &ev.alarm;
                    let body = json!({
                        "change": change, "id": a.id, "device": a.device_id, "type": a.alarm_type,
                        "severity": a.severity.as_str(), "acked": a.acked, "count": a.count,
                    });
                    on_event(&shared, "$events/alarm", Some(&a.device_id.clone()), &body).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    shared.stats.dropped.fetch_add(n, Ordering::Relaxed);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    alarms = shared.fleet.subscribe_alarms();
                }
            },
            e = async { security_events.as_mut()?.recv().await.ok_or_lag() }, if security_events.is_some() => match e {
                Some(Ok(ev)) => on_security_event(&shared, &ev).await,
                Some(Err(missed)) => {
                    shared.stats.dropped.fetch_add(missed, Ordering::Relaxed);
                    tracing::warn!(missed, "the rule service fell behind the security events (they are still stored)");
                }
                None => security_events = None,
            },
            o = outcomes.recv() => if let Some(o) = o {
                if let (Some(rule), Err(e)) = (&o.rule, &o.result) {
                    action_failed(&shared, rule, format!("webhook {}: {e} after {} attempts", o.delivery, o.attempts));
                }
            },
            _ = tick.tick() => {
                let now = rule_now();
                let outs: Vec<(String, Vec<RuleOutput>)> = {
                    let mut rules = shared.rules.lock();
                    rules
                        .engines
                        .iter_mut()
                        .map(|(t, e)| (t.clone(), e.on_tick(now)))
                        .filter(|(_, o)| !o.is_empty())
                        .collect()
                };
                for (tenant, outs) in outs {
                    act(&shared, &tenant, outs).await;
                }
            },
            _ = expiry.tick() => {
                for c in shared.fleet.expire_commands(now_ms()) {
                    tracing::info!(command = %c.id, device = %c.device_id, "command timed out");
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn on_message(shared: &Shared, m: &Message) {
    shared.stats.messages.fetch_add(1, Ordering::Relaxed);
    let Some(device) = device_of(&m.topic) else {
        return;
    };
    if m.topic.ends_with("/commands/response") && m.topic == response_topic(device) {
        on_response(shared, device, m);
    }
    let Some(info) = shared.fleet.identity().ingest_info(device) else {
        return;
    };
    let tenant: &str = &info.tenant;
    // Only parse the payload when some rule of the tenant reads this topic.
    let (wanted, shadow) = {
        let rules = shared.rules.lock();
        (
            rules
                .engines
                .get(tenant)
                .is_some_and(|e| e.ids().next().is_some()),
            rules.shadow_readers.contains_key(tenant),
        )
    };
    if !wanted {
        return;
    }
    let Some(mut payload) = payload_json(&m.topic, &m.payload) else {
        return;
    };
    // Device attributes, for rules like `WHERE meta.group = 'line-3'`, and
    // the device's classic shadow for `WHERE temp > shadow.desired.max`.
    if let Value::Object(obj) = &mut payload {
        if !obj.contains_key("meta") {
            if let Some(meta) = device_meta(shared, device) {
                obj.insert("meta".into(), meta);
            }
        }
        if shadow && !obj.contains_key("shadow") {
            if let Ok(s) = shared.fleet.get_shadow(Some(tenant), device, "") {
                obj.insert(
                    "shadow".into(),
                    json!({"desired": s.desired, "reported": s.reported, "version": s.version}),
                );
            }
        }
    }
    let outs = {
        let mut rules = shared.rules.lock();
        match rules.engines.get_mut(tenant) {
            Some(e) => e.on_message(&m.topic, &payload, rule_now()),
            None => return,
        }
    };
    if !outs.is_empty() {
        act(shared, tenant, outs).await;
    }
}

/// How long a device's attributes are reused before they are read again.
const META_TTL: Duration = Duration::from_secs(10);

/// `{name, group, profile, labels}` of a registered device, cached briefly
/// (rules read them per message; operators change them rarely).
fn device_meta(shared: &Shared, device: &str) -> Option<Value> {
    let now = std::time::Instant::now();
    if let Some((at, v)) = shared.meta.lock().get(device) {
        if now.duration_since(*at) < META_TTL {
            return Some(v.clone());
        }
    }
    let d = shared.fleet.identity().get_device(device).ok()?;
    let v = crate::backtest::device_meta(&d);
    let mut cache = shared.meta.lock();
    if cache.len() > 100_000 {
        cache.clear();
    }
    cache.insert(device.to_string(), (now, v.clone()));
    Some(v)
}

async fn on_event(shared: &Shared, topic: &str, device: Option<&str>, body: &Value) {
    let Some(tenant) = device
        .and_then(|d| shared.fleet.identity().ingest_info(d))
        .map(|i| i.tenant)
    else {
        return;
    };
    on_tenant_event(shared, &tenant, topic, body).await;
}

async fn on_tenant_event(shared: &Shared, tenant: &str, topic: &str, body: &Value) {
    let outs = {
        let mut rules = shared.rules.lock();
        match rules.engines.get_mut(tenant) {
            Some(e) => e.on_message(topic, body, rule_now()),
            None => return,
        }
    };
    if !outs.is_empty() {
        act(shared, tenant, outs).await;
    }
}

/// A security event: an alarm on its subject (when its kind raises one),
/// then the tenant's rules on `$events/security/<kind>`.
async fn on_security_event(shared: &Shared, ev: &SecurityEventRecord) {
    let identity = shared.fleet.identity();
    let registered = ev
        .device_id
        .as_deref()
        .is_some_and(|d| identity.with_device(d, |_| ()).is_some());
    let tenant = identity.security_event_tenant(ev);
    let subject = security::subject(ev, registered);
    if shared.security_alarms.raises(ev.kind) {
        let details = json!({
            "kind": ev.kind.as_str(),
            "client_id": ev.device_id,
            "addr": ev.addr,
            "detail": ev.detail,
            "event_seq": ev.seq,
        });
        if let Err(e) = shared.fleet.raise_alarm(
            &tenant,
            &subject,
            &security::alarm_type(ev.kind),
            security::severity(ev.kind),
            details,
            None,
        ) {
            tracing::warn!(kind = %ev.kind, subject, error = %e, "cannot raise a security alarm");
        }
    }
    let body = security::event_body(ev, &subject, registered);
    on_tenant_event(shared, &tenant, &security::topic(ev.kind), &body).await;
}

/// `broadcast::Receiver::recv`'s answer as `Some(Ok(event))`, `Some(Err(missed))`
/// or `None` once the sender is gone.
trait OrLag<T> {
    fn ok_or_lag(self) -> Option<Result<T, u64>>;
}

impl<T> OrLag<T> for Result<T, tokio::sync::broadcast::error::RecvError> {
    fn ok_or_lag(self) -> Option<Result<T, u64>> {
        match self {
            Ok(v) => Some(Ok(v)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Some(Err(n)),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    }
}

fn action_failed(shared: &Shared, rule: &str, error: String) {
    shared.stats.action_failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(rule, error = %error, "rule action failed");
    let mut rules = shared.rules.lock();
    if let Some(m) = rules.meta.get_mut(rule) {
        m.action_failures += 1;
        m.last_action_error = Some((now_ms(), error));
    }
}

fn output_json(rule: &str, o: &Output) -> Value {
    json!({
        "rule": rule,
        "event": match o.kind { OutputKind::Fire => "fire", OutputKind::Repeat => "repeat", OutputKind::Clear => "clear" },
        "device": o.device.as_deref(),
        "key": &*o.key,
        "ts_ms": o.ts_ms,
        "window": o.window.map(|w| json!({"start_ms": w.start_ms, "end_ms": w.end_ms})),
        "row": o.row,
    })
}

/// Run the actions of each output.
async fn act(shared: &Shared, tenant: &str, outs: Vec<RuleOutput>) {
    shared
        .stats
        .outputs
        .fetch_add(outs.len() as u64, Ordering::Relaxed);
    for RuleOutput { rule, output } in outs {
        let acts = {
            let rules = shared.rules.lock();
            match rules.meta.get(&*rule) {
                Some(m) => m.actions.clone(),
                None => continue,
            }
        };
        let device = output
            .device
            .as_deref()
            .map(str::to_string)
            .or_else(|| (!output.key.is_empty()).then(|| output.key.to_string()));
        for a in acts.iter().filter(|a| a.on.wants(output.kind)) {
            if let Err(e) = run_action(shared, tenant, &rule, device.as_deref(), &output, a).await {
                action_failed(shared, &rule, e);
            }
        }
    }
}

async fn run_action(
    shared: &Shared,
    tenant: &str,
    rule: &str,
    device: Option<&str>,
    o: &Output,
    a: &Action,
) -> Result<(), String> {
    let need_device = || {
        device.ok_or(
            "the rule's output names no device (GROUP BY device, or SELECT device)".to_string(),
        )
    };
    match &a.kind {
        Kind::Alarm {
            alarm_type,
            severity,
        } => {
            let d = need_device()?;
            if o.kind == OutputKind::Clear {
                shared
                    .fleet
                    .clear_alarm(tenant, d, alarm_type, ClearedBy::Rule);
            } else {
                let details = json!({"row": o.row, "window": o.window.map(|w| json!({"start_ms": w.start_ms, "end_ms": w.end_ms})), "ts_ms": o.ts_ms});
                shared
                    .fleet
                    .raise_alarm(tenant, d, alarm_type, *severity, details, Some(rule))
                    .map_err(|e| format!("alarm {alarm_type}: {e}"))?;
            }
        }
        Kind::Command {
            name,
            params,
            timeout_ms,
        } => {
            let d = need_device()?;
            let cmd = shared
                .fleet
                .create_command(NewCommand {
                    tenant: tenant.into(),
                    device_id: d.into(),
                    name: name.clone(),
                    params: params.clone(),
                    origin: format!("rule:{rule}"),
                    timeout_ms: *timeout_ms,
                })
                .map_err(|e| format!("command {name}: {e}"))?;
            publish_command(shared, &cmd).await;
        }
        Kind::Config { key, value } => {
            let d = need_device()?;
            shared
                .broker
                .publish(
                    &format!("devices/{d}/config/{key}"),
                    Bytes::from(value.to_string()),
                    QoS::AtLeastOnce,
                    true,
                )
                .await;
        }
        Kind::Desired { state, shadow } => {
            let d = need_device()?.to_string();
            let update = ShadowUpdate {
                state: m2mhub_fleet::shadow::UpdateState {
                    desired: Some(state.clone()),
                    reported: None,
                },
                version: None,
                client_token: None,
            };
            let fleet = shared.fleet.clone();
            let (t, name, u) = (tenant.to_string(), shadow.clone(), update.clone());
            // The shadow write is durable (synchronous): off the workers.
            let change = tokio::task::spawn_blocking(move || {
                fleet.update_shadow(&t, &d, &name, &u, ShadowWriter::Platform)
            })
            .await
            .map_err(|e| format!("desired: {e}"))?
            .map_err(|e| format!("desired: {e}"))?;
            for (topic, body) in change.answers(&update) {
                shared
                    .broker
                    .publish(
                        &topic,
                        Bytes::from(body.to_string()),
                        QoS::AtLeastOnce,
                        false,
                    )
                    .await;
            }
        }
        Kind::Republish { topic, qos, retain } => {
            let t = topic.replace("{device}", device.unwrap_or(""));
            if mqtt_codec::topic::validate_topic_name(&t).is_err() {
                return Err(format!("republish: {t:?} is not a valid topic"));
            }
            let qos = QoS::from_u8(*qos).unwrap_or(QoS::AtMostOnce);
            shared
                .broker
                .publish(
                    &t,
                    Bytes::from(output_json(rule, o).to_string()),
                    qos,
                    *retain,
                )
                .await;
        }
        Kind::Webhook { url, secret } => {
            let body = output_json(rule, o).to_string().into_bytes();
            let id = format!(
                "{rule}-{}-{}",
                o.ts_ms,
                shared.stats.outputs.load(Ordering::Relaxed)
            );
            shared
                .webhooks
                .send(Delivery {
                    target: Target {
                        url: url.clone(),
                        secret: secret.clone(),
                    },
                    id,
                    body,
                    rule: Some(rule.to_string()),
                })
                .map_err(|e| format!("webhook: {e}"))?;
        }
        Kind::Ban {
            target,
            duration_secs,
            reason,
        } => {
            let duration = duration_secs.map(Duration::from_secs);
            let why = format!("{reason} (rule {rule})");
            let (key, applied) = match target {
                BanTarget::Device => {
                    let d = need_device()?;
                    (
                        format!("device:{d}"),
                        shared.broker.ban_device(d, &why, duration),
                    )
                }
                BanTarget::Address => {
                    if !may_ban_addresses(tenant) {
                        return Err("only the default tenant's rules may ban addresses".into());
                    }
                    let addr =
                        o.row.get("addr").and_then(Value::as_str).ok_or(
                            "a ban of an address needs an `addr` column in the rule's output",
                        )?;
                    let ip: std::net::IpAddr = addr
                        .parse()
                        .map_err(|_| format!("`addr` {addr:?} is not an IP address"))?;
                    (format!("ip:{ip}"), shared.broker.ban_ip(ip, &why, duration))
                }
            };
            // A ban is an administrative action: audited like an
            // operator's, with the rule as the actor.
            if let Err(e) = shared.fleet.identity().audit(
                &format!("rule:{rule}"),
                "ban",
                &key,
                "ok",
                json!({"reason": reason, "secs": applied.as_secs()}),
            ) {
                tracing::error!(rule, error = %e, "cannot audit a rule's ban");
            }
        }
        Kind::Log { level } => {
            let j = output_json(rule, o);
            match level {
                LogLevel::Info => tracing::info!(rule, output = %j, "rule output"),
                LogLevel::Warn => tracing::warn!(rule, output = %j, "rule output"),
                LogLevel::Error => tracing::error!(rule, output = %j, "rule output"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule clock follows the wall clock forward, and through a step
    /// back keeps advancing in real time until the wall catches up.
    #[test]
    fn the_rule_clock_never_goes_back() {
        let s = Duration::from_secs;
        let h = 3_600_000;
        // Normal running: the wall clock.
        assert_eq!(advance(1_000_000, s(1), 1_001_000), 1_001_000);
        // A step forward of an hour: followed.
        assert_eq!(advance(1_000_000, s(1), 1_001_000 + h), 1_001_000 + h);
        // A step back of two hours: one second later is one second later.
        let t0 = 10 * h;
        let t1 = advance(t0, s(1), t0 + 1_000 - 2 * h);
        assert_eq!(t1, t0 + 1_000);
        let t2 = advance(t1, s(60), t0 + 61_000 - 2 * h);
        assert_eq!(t2, t0 + 61_000);
        // ...until the wall clock has caught up, then the wall clock again.
        let caught = advance(t2, s(1), t0 + 2 * h);
        assert_eq!(caught, t0 + 2 * h);
        // Monotonic in real use too.
        let (a, b) = (rule_now(), rule_now());
        assert!(b >= a);
    }

    #[test]
    fn devices_come_from_the_topic() {
        assert_eq!(device_of("devices/m1/telemetry"), Some("m1"));
        assert_eq!(device_of("devices/m1"), Some("m1"));
        assert_eq!(device_of("devices//x"), None);
        assert_eq!(device_of("tenants/a/b"), None);
    }

    #[test]
    fn non_json_telemetry_becomes_an_object() {
        let v = payload_json("devices/m1/telemetry", b"42.5").expect("decoded");
        assert_eq!(v, json!({"value": 42.5}));
        assert_eq!(payload_json("devices/m1/state", b"on"), None);
        assert_eq!(
            payload_json("devices/m1/state", b"{\"a\":1}"),
            Some(json!({"a": 1}))
        );
    }
}
