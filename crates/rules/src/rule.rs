//! A compiled rule and its run-time state: the sans-IO heart of the engine.
//!
//! The caller feeds messages (`on_message`) and clock ticks (`on_tick`)
//! with explicit timestamps and gets [`Output`]s back; nothing here reads a
//! clock, sleeps or does I/O, so tests step time by hand and the server
//! drives it from whatever task and timer it likes (`next_deadline` says
//! when a tick has work to do).
//!
//! State is kept per *key*: the device for a rule without GROUP BY, the
//! GROUP BY key values otherwise. A key holds its lifecycle (`active`:
//! fired and not cleared), FOR timers, zscore baselines, window state and
//! what a timer needs to re-check the condition on a tick. A rule without
//! FOR or zscore creates a key only when its condition first holds, so a
//! plain filter over a million quiet devices keeps nothing.
//!
//! **Lifecycle.** When the firing condition becomes true for a key the
//! rule emits [`OutputKind::Fire`]; while it stays true, each new message
//! (or window result) emits [`OutputKind::Repeat`]; when it becomes false,
//! [`OutputKind::Clear`]. With `CLEAR WHEN c` an active key clears only
//! when `c` holds, so the band between the two conditions is hysteresis.

use std::collections::HashMap;
use std::sync::Arc;

use crate::aggregate::AggState;
use crate::anomaly::Baseline;
use crate::compile;
use crate::error::{CompileError, EvalError};
use crate::eval::{eval, update_timers, Scope, Timer};
use crate::plan::{Column, Expr, Plan, RuleKind, WindowSpec};
use crate::topic::{self, TopicFilter};
use crate::value::Val;
use crate::window::{PaneState, Panes, SlidingState};

/// Timestamps beyond ±10^15 ms (about 31,000 years) are refused, which
/// keeps every window and timer sum far from i64 overflow.
pub(crate) const MAX_TS: i64 = 1_000_000_000_000_000;

/// Bounds on what one rule may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Keys (devices or groups) tracked at once; a message for a new key
    /// beyond this fails with [`EvalError::TooManyKeys`].
    pub max_keys: usize,
    /// Values kept per key in a sliding window; beyond it the oldest value
    /// is dropped (counted in [`Counters::dropped`]).
    pub max_window_values: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_keys: 100_000,
            max_window_values: 10_000,
        }
    }
}

/// Per-rule counters, as the API reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Messages whose topic matched FROM.
    pub received: u64,
    /// Messages that passed WHERE (for a rule without GROUP BY: whose
    /// whole condition held); for grouped rules, messages taken into a window.
    pub matched: u64,
    /// Fire and Repeat outputs.
    pub fired: u64,
    /// Clear outputs.
    pub cleared: u64,
    /// Messages (or window results) that failed to evaluate.
    pub failed: u64,
    /// Messages refused because their window had already closed.
    pub late: u64,
    /// Values dropped from full sliding windows.
    pub dropped: u64,
    /// The most recent failure.
    pub last_error: Option<LastError>,
}

/// A failure and when it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct LastError {
    /// Timestamp of the message or tick that failed.
    pub ts_ms: i64,
    /// What went wrong.
    pub error: EvalError,
}

/// What an output means for actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// The condition became true for this key (raise an alarm, send a
    /// command once).
    Fire,
    /// The condition is still true: a new message or window result while
    /// active (update an alarm, republish).
    Repeat,
    /// The condition stopped holding (or CLEAR WHEN held) after firing.
    Clear,
}

/// The bounds of the window an output was computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowBounds {
    /// Inclusive start, epoch ms.
    pub start_ms: i64,
    /// Exclusive end, epoch ms.
    pub end_ms: i64,
}

/// One result of a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Fire, repeat or clear.
    pub kind: OutputKind,
    /// The key's text: the device id, or the GROUP BY values joined by
    /// U+001F; empty for a rule with one global key.
    pub key: Arc<str>,
    /// The device, when the key has one.
    pub device: Option<Arc<str>>,
    /// When: the message time, the window end, or the tick time.
    pub ts_ms: i64,
    /// The window, for windowed rules.
    pub window: Option<WindowBounds>,
    /// The SELECT columns.
    pub row: serde_json::Map<String, serde_json::Value>,
}

/// A key's window.
#[derive(Debug, Clone)]
enum KeyWindow {
    None,
    Panes(PaneState),
    Sliding(SlidingState),
}

/// What a timer needs to re-check a filter rule's condition on a tick.
#[derive(Debug, Clone)]
struct Replay {
    payload: serde_json::Value,
    topic: String,
}

/// Everything kept for one key.
#[derive(Debug, Clone)]
struct KeyState {
    data: KeyData,
    life: Lifecycle,
    window: KeyWindow,
    replay: Option<Replay>,
    /// Time of the last evaluation (a timer is pending while its deadline
    /// is after this).
    last_eval: i64,
    /// When this key next needs a tick.
    due: i64,
}

/// What expressions read about a key (borrowed by a `Scope`).
#[derive(Debug, Clone)]
struct KeyData {
    key: Arc<str>,
    device: Option<Arc<str>>,
    keys: Vec<Val<'static>>,
    baselines: Box<[Baseline]>,
    /// Last window result (grouped rules) and its bounds.
    aggs: Vec<Val<'static>>,
    bounds: Option<(i64, i64)>,
    last_seen: i64,
}

/// What a decision changes (borrowed mutably while the scope is read).
#[derive(Debug, Clone)]
struct Lifecycle {
    active: bool,
    timers: Box<[Timer]>,
}

/// A rule ready to run: its plan, its per-key state and its counters.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    plan: Plan,
    sql: Arc<str>,
    limits: Limits,
    keys: HashMap<Arc<str>, KeyState>,
    counters: Counters,
    /// No key needs a tick before this.
    next_due: i64,
    panes: Option<Panes>,
    /// Empty aggregate states, one per aggregate.
    template: Box<[AggState]>,
    /// Merged window states / one value's states.
    scratch: Vec<AggState>,
    /// One message's aggregate inputs.
    inputs: Vec<Val<'static>>,
    /// FOR timers of a key that has no state yet.
    timer_scratch: Vec<Timer>,
    key_buf: String,
}

impl CompiledRule {
    /// Parse, type-check and compile a rule; errors carry the position.
    pub fn compile(sql: &str) -> Result<CompiledRule, CompileError> {
        let plan = compile::compile(sql)?;
        let timer_scratch = vec![Timer::default(); plan.timers.len()];
        let template: Box<[AggState]> = plan.aggs.iter().map(|a| a.func.empty()).collect();
        Ok(CompiledRule {
            panes: plan.window.and_then(Panes::of),
            scratch: template.to_vec(),
            template,
            plan,
            sql: sql.into(),
            limits: Limits::default(),
            keys: HashMap::new(),
            counters: Counters::default(),
            next_due: i64::MAX,
            inputs: Vec::new(),
            timer_scratch,
            key_buf: String::new(),
        })
    }

    /// Replace the default [`Limits`].
    pub fn with_limits(mut self, limits: Limits) -> CompiledRule {
        self.limits = limits;
        self
    }

    /// The rule text as given.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The FROM topic filter.
    pub fn source(&self) -> &TopicFilter {
        &self.plan.source
    }

    /// Filter, windowed or silence rule.
    pub fn kind(&self) -> RuleKind {
        self.plan.kind
    }

    /// Output column names in order (`*` for the payload's members).
    pub fn columns(&self) -> Vec<&str> {
        self.plan
            .columns
            .iter()
            .map(|c| match c {
                Column::Star => "*",
                Column::Expr { name, .. } => name,
            })
            .collect()
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Keys (devices or groups) currently tracked.
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }

    /// The earliest time at which [`on_tick`](Self::on_tick) has work
    /// (a window to close, a FOR timer to expire, a silence to detect).
    pub fn next_deadline(&self) -> Option<i64> {
        (self.next_due != i64::MAX).then_some(self.next_due)
    }

    /// Forget all per-key state (windows, timers, baselines, active
    /// alarms); counters are kept.
    pub fn reset_state(&mut self) {
        self.keys.clear();
        self.next_due = i64::MAX;
    }

    /// Evaluate one message. `ts_ms` is its time (arrival or device time,
    /// consistently with the ticks).
    pub fn on_message(
        &mut self,
        topic: &str,
        payload: &serde_json::Value,
        ts_ms: i64,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        self.on_message_into(topic, payload, ts_ms, &mut out);
        out
    }

    /// [`on_message`](Self::on_message) appending to a caller's vector.
    pub fn on_message_into(
        &mut self,
        topic: &str,
        payload: &serde_json::Value,
        ts_ms: i64,
        out: &mut Vec<Output>,
    ) {
        if !self.plan.source.matches(topic) {
            return;
        }
        self.counters.received += 1;
        if !(-MAX_TS..=MAX_TS).contains(&ts_ms) {
            self.fail(ts_ms, EvalError::TimestampOutOfRange(ts_ms));
            return;
        }
        let device = topic::device_of(topic, payload);
        let result = match self.plan.kind {
            RuleKind::Filter => self.filter_message(topic, payload, device, ts_ms, out),
            RuleKind::Windowed | RuleKind::Silence => {
                self.grouped_message(topic, payload, device, ts_ms, out)
            }
        };
        if let Err(e) = result {
            self.fail(ts_ms, e);
        }
    }

    /// Advance the clock: close windows that ended, expire FOR timers,
    /// detect silent keys.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<Output> {
        let mut out = Vec::new();
        self.on_tick_into(now_ms, &mut out);
        out
    }

    /// [`on_tick`](Self::on_tick) appending to a caller's vector.
    /// A tick outside ±10^15 ms is ignored.
    pub fn on_tick_into(&mut self, now_ms: i64, out: &mut Vec<Output>) {
        if now_ms < self.next_due || !(-MAX_TS..=MAX_TS).contains(&now_ms) {
            return;
        }
        let mut next = i64::MAX;
        let mut failures = Vec::new();
        let mut ctx = Ctx {
            plan: &self.plan,
            counters: &mut self.counters,
            template: &self.template,
            scratch: &mut self.scratch,
            panes: self.panes,
            limits: self.limits,
        };
        for st in self.keys.values_mut() {
            if st.due <= now_ms {
                if let Err(e) = ctx.tick_key(st, now_ms, out) {
                    failures.push(e);
                }
                st.due = ctx.due_of(st);
            }
            next = next.min(st.due);
        }
        self.next_due = next;
        for e in failures {
            self.fail(now_ms, e);
        }
        // Keys with nothing left to remember go (a cleared key without
        // timers or baselines, drained windows).
        let plan = &self.plan;
        self.keys.retain(|_, st| !is_idle(plan, st));
    }

    fn fail(&mut self, ts_ms: i64, error: EvalError) {
        self.counters.failed += 1;
        self.counters.last_error = Some(LastError { ts_ms, error });
    }

    fn ctx(&mut self) -> (Ctx<'_>, &mut HashMap<Arc<str>, KeyState>) {
        (
            Ctx {
                plan: &self.plan,
                counters: &mut self.counters,
                template: &self.template,
                scratch: &mut self.scratch,
                panes: self.panes,
                limits: self.limits,
            },
            &mut self.keys,
        )
    }

    fn filter_message(
        &mut self,
        topic: &str,
        payload: &serde_json::Value,
        device: Option<&str>,
        ts: i64,
        out: &mut Vec<Output>,
    ) -> Result<(), EvalError> {
        let key = device.unwrap_or("");
        let mut known = None;
        let mut fresh_timers = None;
        // Fast path: a key that has nothing to remember (no zscore
        // baseline, no state yet) is decided on scratch timers, and gets
        // state only if its condition holds or a FOR timer starts. Quiet
        // devices cost no allocation.
        if self.plan.zscores.is_empty() && (self.keys.is_empty() || !self.keys.contains_key(key)) {
            let plan = &self.plan;
            // Taken, not borrowed: an error below may drop it, and the
            // next message then sizes a new one.
            let mut timers = std::mem::take(&mut self.timer_scratch);
            timers.clear();
            timers.resize(plan.timers.len(), Timer::default());
            let scope = Scope::message(&plan.fields, payload, topic, device, ts);
            let cond = update_timers(&plan.timers, &scope, &mut timers).and_then(|()| {
                let scope = Scope {
                    timers: &timers,
                    ..scope
                };
                match &plan.condition {
                    Some(c) => eval(c, &scope).map(|v| v.is_true()),
                    None => Ok(true),
                }
            });
            let starts = timers.iter().any(|t| t.since.is_some());
            match cond {
                Ok(false) if !starts => {
                    self.timer_scratch = timers;
                    return Ok(());
                }
                Ok(cond) => {
                    known = Some(cond);
                    fresh_timers = Some(timers);
                }
                Err(e) => {
                    self.timer_scratch = timers;
                    return Err(e);
                }
            }
        }
        let limits = self.limits;
        let (mut ctx, keys) = self.ctx();
        let plan = ctx.plan;
        let st = get_or_insert(keys, &limits, key, || {
            KeyState::new(plan, key, device, Vec::new(), ts)
        });
        let st = st?;
        if let Some(timers) = &fresh_timers {
            st.life.timers.clone_from_slice(timers);
        }
        observe_zscores(plan, &mut st.data, payload, topic, device, ts)?;
        let scope = Scope {
            baselines: &st.data.baselines,
            ..Scope::message(&plan.fields, payload, topic, device, ts)
        };
        let decided = decide(plan, &scope, &mut st.life, known, known.is_none());
        st.last_eval = ts;
        st.data.last_seen = ts;
        let (cond, kind) = decided?;
        ctx.counters.matched += u64::from(cond);
        if let Some(kind) = kind {
            let row = project(plan, &scope, kind == OutputKind::Clear)?;
            ctx.emit(&st.data, kind, ts, None, row, out);
        }
        let due = ctx.due_of(st);
        st.due = due;
        // A pending timer re-checks on ticks: keep what it needs.
        st.replay = (due != i64::MAX).then(|| Replay {
            payload: payload.clone(),
            topic: topic.to_string(),
        });
        let idle = is_idle(plan, st);
        if let Some(timers) = fresh_timers {
            self.timer_scratch = timers;
        }
        self.next_due = self.next_due.min(due);
        if idle {
            self.keys.remove(key);
        }
        Ok(())
    }

    fn grouped_message(
        &mut self,
        topic: &str,
        payload: &serde_json::Value,
        device: Option<&str>,
        ts: i64,
        out: &mut Vec<Output>,
    ) -> Result<(), EvalError> {
        let CompiledRule {
            plan,
            limits,
            keys,
            counters,
            next_due,
            panes,
            template,
            scratch,
            inputs,
            key_buf,
            ..
        } = self;
        let plan = &*plan;
        let message_zscores = plan.zscores.iter().any(|z| !z.over_groups);
        let scope = Scope::message(&plan.fields, payload, topic, device, ts);
        if !message_zscores {
            if let Some(f) = &plan.filter {
                if !eval(f, &scope)?.is_true() {
                    return Ok(());
                }
            }
        }
        // The key: the text of the GROUP BY values.
        let mut key_vals = Vec::with_capacity(plan.keys.len());
        for k in &plan.keys {
            key_vals.push(eval(k, &scope)?);
        }
        let key: &str = match key_vals.as_slice() {
            [Val::Str(s)] => s,
            vals => {
                key_buf.clear();
                for (i, v) in vals.iter().enumerate() {
                    if i > 0 {
                        key_buf.push('\u{1f}');
                    }
                    match v {
                        Val::Str(s) => key_buf.push_str(s),
                        Val::Null => {}
                        other => key_buf.push_str(&other.to_json().to_string()),
                    }
                }
                key_buf
            }
        };
        let key_device = match plan.device_key.and_then(|i| key_vals.get(i)) {
            Some(Val::Str(d)) => Some(&**d),
            _ => None,
        };
        let st = get_or_insert(keys, limits, key, || {
            KeyState::new(
                plan,
                key,
                key_device,
                key_vals.iter().map(|v| v.clone().into_owned()).collect(),
                ts,
            )
        })?;
        let mut ctx = Ctx {
            plan,
            counters,
            template,
            scratch,
            panes: *panes,
            limits: *limits,
        };
        let result = (|| {
            if message_zscores {
                observe_zscores(plan, &mut st.data, payload, topic, device, ts)?;
                if let Some(f) = &plan.filter {
                    let scope = Scope {
                        baselines: &st.data.baselines,
                        ..scope
                    };
                    if !eval(f, &scope)?.is_true() {
                        return Ok(());
                    }
                }
            }
            if plan.kind == RuleKind::Silence {
                ctx.counters.matched += 1;
                st.data.last_seen = st.data.last_seen.max(ts);
                if st.life.active {
                    st.life.active = false;
                    let row = project(plan, &group_scope(plan, &st.data, ts), true)?;
                    ctx.emit(&st.data, OutputKind::Clear, ts, None, row, out);
                }
                return Ok(());
            }
            // Aggregate inputs, all checked before any state changes.
            let scope = Scope {
                baselines: &st.data.baselines,
                ..scope
            };
            inputs.clear();
            for a in &plan.aggs {
                let v = match &a.arg {
                    Some(e) => eval(e, &scope)?,
                    None => Val::Bool(true),
                };
                a.func.check(&v)?;
                inputs.push(v.into_owned());
            }
            ctx.counters.matched += 1;
            st.data.last_seen = st.data.last_seen.max(ts);
            ctx.window_message(st, ts, inputs, out)
        })();
        let due = ctx.due_of(st);
        st.due = due;
        *next_due = (*next_due).min(due);
        result
    }
}

/// Borrowed pieces of a rule that key-level work needs, so that a key's
/// state can be borrowed mutably at the same time.
struct Ctx<'r> {
    plan: &'r Plan,
    counters: &'r mut Counters,
    template: &'r [AggState],
    scratch: &'r mut Vec<AggState>,
    panes: Option<Panes>,
    limits: Limits,
}

impl Ctx<'_> {
    fn emit(
        &mut self,
        data: &KeyData,
        kind: OutputKind,
        ts: i64,
        bounds: Option<(i64, i64)>,
        row: serde_json::Map<String, serde_json::Value>,
        out: &mut Vec<Output>,
    ) {
        match kind {
            OutputKind::Clear => self.counters.cleared += 1,
            _ => self.counters.fired += 1,
        }
        out.push(Output {
            kind,
            key: data.key.clone(),
            device: data.device.clone(),
            ts_ms: ts,
            window: bounds.map(|(start_ms, end_ms)| WindowBounds { start_ms, end_ms }),
            row,
        });
    }

    /// A value for a windowed rule: close what this message's time closes,
    /// then fold the value in.
    fn window_message(
        &mut self,
        st: &mut KeyState,
        ts: i64,
        inputs: &[Val<'static>],
        out: &mut Vec<Output>,
    ) -> Result<(), EvalError> {
        let closed = self.close_windows(st, ts, out);
        match (&mut st.window, self.panes, self.plan.window) {
            (KeyWindow::Panes(p), Some(g), _) => {
                match p.pane_for(&g, ts, self.template) {
                    Some(states) => {
                        for (s, v) in states.iter_mut().zip(inputs) {
                            s.add(ts, v);
                        }
                    }
                    None => {
                        self.counters.matched -= 1;
                        self.counters.late += 1;
                    }
                }
                closed
            }
            (KeyWindow::Sliding(w), _, Some(WindowSpec::Sliding { size })) => {
                if w.newest().is_some_and(|n| ts <= n - size) {
                    self.counters.matched -= 1;
                    self.counters.late += 1;
                    return Ok(());
                }
                self.scratch.clone_from_slice(self.template);
                for (s, v) in self.scratch.iter_mut().zip(inputs) {
                    s.add(ts, v);
                }
                if w.len() >= self.limits.max_window_values {
                    w.pop_oldest(self.template);
                    self.counters.dropped += 1;
                }
                w.push(ts, self.scratch);
                w.evict(ts - size, self.template);
                w.total(self.template, self.scratch);
                self.finish_window(&mut st.data, (ts - size, ts));
                self.evaluate_window(st, ts, ts, true, false, out)
            }
            _ => Ok(()),
        }
    }

    /// Emit every pane window ending at or before `now`.
    fn close_windows(
        &mut self,
        st: &mut KeyState,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<(), EvalError> {
        let Some(g) = self.panes else {
            return Ok(());
        };
        let mut first_error = None;
        while let KeyWindow::Panes(p) = &mut st.window {
            let Some((start, end)) = p.pop_due(&g, now, self.template, self.scratch) else {
                break;
            };
            self.finish_window(&mut st.data, (start, end));
            // One bad window must not stop the later ones from closing.
            if let Err(e) = self.evaluate_window(st, end, start, true, false, out) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Finalize the merged states in `scratch` into the key's results.
    fn finish_window(&mut self, data: &mut KeyData, bounds: (i64, i64)) {
        data.aggs.clear();
        data.aggs.extend(
            self.scratch
                .iter()
                .zip(&self.plan.aggs)
                .map(|(s, a)| s.finish(a.func)),
        );
        data.bounds = Some(bounds);
    }

    /// Decide on the key's current window result (HAVING, FOR, CLEAR WHEN).
    fn evaluate_window(
        &mut self,
        st: &mut KeyState,
        now: i64,
        since: i64,
        update_baselines: bool,
        replay: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), EvalError> {
        let plan = self.plan;
        if update_baselines {
            observe_group_zscores(plan, &mut st.data, now)?;
        }
        let scope = Scope {
            since,
            ..group_scope(plan, &st.data, now)
        };
        let decided = decide(plan, &scope, &mut st.life, None, !replay);
        st.last_eval = now;
        if let (_, Some(kind)) = decided? {
            let row = project(plan, &scope, kind == OutputKind::Clear)?;
            self.emit(&st.data, kind, now, st.data.bounds, row, out);
        }
        Ok(())
    }

    fn tick_key(
        &mut self,
        st: &mut KeyState,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<(), EvalError> {
        let plan = self.plan;
        match plan.kind {
            RuleKind::Filter => {
                if timer_deadline(plan, st) > now {
                    return Ok(());
                }
                let Some(replay) = st.replay.take() else {
                    return Ok(());
                };
                let result = (|| {
                    let scope = Scope {
                        baselines: &st.data.baselines,
                        ..Scope::message(
                            &plan.fields,
                            &replay.payload,
                            &replay.topic,
                            st.data.device.as_deref(),
                            now,
                        )
                    };
                    // A replay: the timers hold, only the time moves.
                    let decided = decide(plan, &scope, &mut st.life, None, false);
                    st.last_eval = now;
                    if let (_, Some(kind)) = decided? {
                        let row = project(plan, &scope, kind == OutputKind::Clear)?;
                        self.emit(&st.data, kind, now, None, row, out);
                    }
                    Ok(())
                })();
                st.replay = Some(replay);
                result
            }
            RuleKind::Windowed => {
                let mut result = self.close_windows(st, now, out);
                if let (KeyWindow::Sliding(w), Some(WindowSpec::Sliding { size })) =
                    (&mut st.window, plan.window)
                {
                    if w.evict(now - size, self.template) > 0 {
                        w.total(self.template, self.scratch);
                        self.finish_window(&mut st.data, (now - size, now));
                        return self.evaluate_window(st, now, now, false, false, out);
                    }
                }
                if timer_deadline(plan, st) <= now && st.data.bounds.is_some() {
                    let r = self.evaluate_window(st, now, now, false, true, out);
                    result = result.and(r);
                }
                result
            }
            RuleKind::Silence => {
                let Some(silence) = plan.silence_ms else {
                    return Ok(());
                };
                if !st.life.active && now - st.data.last_seen >= silence {
                    st.life.active = true;
                    st.last_eval = now;
                    let row = project(plan, &group_scope(plan, &st.data, now), false)?;
                    self.emit(&st.data, OutputKind::Fire, now, None, row, out);
                }
                Ok(())
            }
        }
    }

    /// When the key next needs a tick.
    fn due_of(&self, st: &KeyState) -> i64 {
        let mut due = timer_deadline(self.plan, st);
        match (&st.window, self.panes, self.plan.window) {
            (KeyWindow::Panes(p), Some(g), _) => {
                if let Some(end) = p.next_due(&g) {
                    due = due.min(end);
                }
            }
            (KeyWindow::Sliding(w), _, Some(WindowSpec::Sliding { size })) => {
                if let Some(oldest) = w.oldest() {
                    due = due.min(oldest.saturating_add(size));
                }
            }
            _ => {}
        }
        if let (RuleKind::Silence, Some(ms), false) =
            (self.plan.kind, self.plan.silence_ms, st.life.active)
        {
            due = due.min(st.data.last_seen.saturating_add(ms));
        }
        due
    }
}

impl KeyState {
    fn new(
        plan: &Plan,
        key: &str,
        device: Option<&str>,
        keys: Vec<Val<'static>>,
        ts: i64,
    ) -> KeyState {
        let window = match plan.window {
            Some(WindowSpec::Sliding { .. }) => {
                let template: Vec<AggState> = plan.aggs.iter().map(|a| a.func.empty()).collect();
                KeyWindow::Sliding(SlidingState::new(&template))
            }
            Some(spec) => match Panes::of(spec) {
                Some(g) => KeyWindow::Panes(PaneState::new(&g, ts)),
                None => KeyWindow::None,
            },
            None => KeyWindow::None,
        };
        KeyState {
            data: KeyData {
                key: key.into(),
                device: device.map(Into::into),
                keys,
                baselines: vec![Baseline::default(); plan.zscores.len()].into(),
                aggs: Vec::new(),
                bounds: None,
                last_seen: ts,
            },
            life: Lifecycle {
                active: false,
                timers: vec![Timer::default(); plan.timers.len()].into(),
            },
            window,
            replay: None,
            last_eval: ts,
            due: i64::MAX,
        }
    }
}

/// The scope of SELECT/HAVING/CLEAR WHEN of a grouped rule.
fn group_scope<'a>(plan: &'a Plan, data: &'a KeyData, now: i64) -> Scope<'a> {
    Scope {
        fields: &plan.fields,
        payload: None,
        topic: "",
        device: data.device.as_deref(),
        ts: now,
        since: now,
        keys: &data.keys,
        aggs: &data.aggs,
        window: data.bounds,
        last_seen: data.last_seen,
        baselines: &data.baselines,
        timers: &[],
    }
}

fn get_or_insert<'m>(
    keys: &'m mut HashMap<Arc<str>, KeyState>,
    limits: &Limits,
    key: &str,
    make: impl FnOnce() -> KeyState,
) -> Result<&'m mut KeyState, EvalError> {
    if !keys.contains_key(key) {
        if keys.len() >= limits.max_keys {
            return Err(EvalError::TooManyKeys(limits.max_keys));
        }
        let st = make();
        keys.insert(st.data.key.clone(), st);
    }
    keys.get_mut(key)
        .ok_or(EvalError::TooManyKeys(limits.max_keys))
}

/// The lifecycle step: update the FOR timers (unless this is a tick
/// re-checking them, or the caller already did), evaluate the condition
/// (unless `known`) and CLEAR WHEN while active, and move `active`.
/// Returns the condition's truth and the output to emit.
fn decide(
    plan: &Plan,
    base: &Scope<'_>,
    life: &mut Lifecycle,
    known: Option<bool>,
    update: bool,
) -> Result<(bool, Option<OutputKind>), EvalError> {
    if update {
        update_timers(&plan.timers, base, &mut life.timers)?;
    }
    let (cond, clear) = {
        let scope = Scope {
            timers: &life.timers,
            ..*base
        };
        let cond = match (known, &plan.condition) {
            (Some(c), _) => c,
            (None, Some(c)) => eval(c, &scope)?.is_true(),
            (None, None) => true,
        };
        let clear = match (&plan.clear, life.active) {
            (_, false) => false,
            (Some(c), true) => eval(c, &scope)?.is_true(),
            (None, true) => !cond,
        };
        (cond, clear)
    };
    if !life.active {
        if !cond {
            return Ok((cond, None));
        }
        life.active = true;
        // CLEAR WHEN's timers start fresh with each episode.
        if let Some(ts) = life.timers.get_mut(plan.clear_timers.clone()) {
            ts.fill(Timer::default());
        }
        return Ok((cond, Some(OutputKind::Fire)));
    }
    Ok((
        cond,
        if clear {
            life.active = false;
            Some(OutputKind::Clear)
        } else if cond {
            Some(OutputKind::Repeat)
        } else {
            None
        },
    ))
}

/// The output row. For a clear, a column that fails is null rather than
/// holding the clear back.
fn project(
    plan: &Plan,
    scope: &Scope<'_>,
    lenient: bool,
) -> Result<serde_json::Map<String, serde_json::Value>, EvalError> {
    let mut row = serde_json::Map::new();
    for col in &plan.columns {
        match col {
            Column::Star => match scope.payload {
                Some(serde_json::Value::Object(m)) => {
                    row.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                Some(other) => {
                    row.insert("payload".into(), other.clone());
                }
                None => {}
            },
            Column::Expr { name, expr } => {
                let v = match eval(expr, scope) {
                    Ok(v) => v.to_json(),
                    Err(_) if lenient => serde_json::Value::Null,
                    Err(e) => return Err(e),
                };
                row.insert(name.to_string(), v);
            }
        }
    }
    Ok(row)
}

/// Update the per-message zscore baselines of a key. All inputs are
/// evaluated first, so a failure leaves every baseline untouched.
fn observe_zscores(
    plan: &Plan,
    data: &mut KeyData,
    payload: &serde_json::Value,
    topic: &str,
    device: Option<&str>,
    ts: i64,
) -> Result<(), EvalError> {
    if !plan.zscores.iter().any(|z| !z.over_groups) {
        return Ok(());
    }
    let scope = Scope::message(&plan.fields, payload, topic, device, ts);
    let mut xs = Vec::with_capacity(plan.zscores.len());
    for z in &plan.zscores {
        xs.push(if z.over_groups {
            None
        } else {
            Some(zscore_input(&z.arg, &scope)?)
        });
    }
    fold_zscores(plan, data, xs);
    Ok(())
}

/// Update the zscore baselines over window results of a key.
fn observe_group_zscores(plan: &Plan, data: &mut KeyData, now: i64) -> Result<(), EvalError> {
    if !plan.zscores.iter().any(|z| z.over_groups) {
        return Ok(());
    }
    let mut xs = Vec::with_capacity(plan.zscores.len());
    {
        let scope = Scope {
            baselines: &[],
            ..group_scope(plan, data, now)
        };
        for z in &plan.zscores {
            xs.push(if z.over_groups {
                Some(zscore_input(&z.arg, &scope)?)
            } else {
                None
            });
        }
    }
    fold_zscores(plan, data, xs);
    Ok(())
}

fn fold_zscores(plan: &Plan, data: &mut KeyData, xs: Vec<Option<Option<f64>>>) {
    for ((z, b), x) in plan.zscores.iter().zip(data.baselines.iter_mut()).zip(xs) {
        match x {
            Some(Some(x)) => {
                b.observe(x, z.samples);
            }
            Some(None) => b.last = None,
            None => {}
        }
    }
}

fn zscore_input(arg: &Expr, scope: &Scope<'_>) -> Result<Option<f64>, EvalError> {
    match eval(arg, scope)? {
        Val::Num(x) => Ok(Some(x)),
        Val::Null => Ok(None),
        other => Err(EvalError::WrongType {
            op: "zscore",
            expected: "a number",
            found: other.type_name(),
        }),
    }
}

/// The earliest pending FOR deadline of a key.
fn timer_deadline(plan: &Plan, st: &KeyState) -> i64 {
    st.life
        .timers
        .iter()
        .zip(&plan.timers)
        .filter_map(|(t, spec)| t.since.map(|s| s.saturating_add(spec.ms)))
        .filter(|&deadline| deadline > st.last_eval)
        .min()
        .unwrap_or(i64::MAX)
}

/// A key that remembers nothing worth keeping.
fn is_idle(plan: &Plan, st: &KeyState) -> bool {
    if st.life.active || plan.kind == RuleKind::Silence || !plan.zscores.is_empty() {
        return false;
    }
    if st.life.timers.iter().any(|t| t.since.is_some()) {
        return false;
    }
    match &st.window {
        KeyWindow::None => true,
        KeyWindow::Sliding(w) => w.len() == 0,
        KeyWindow::Panes(p) => p.is_empty(),
    }
}
