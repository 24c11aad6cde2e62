//! Many rules by id: the unit the server drives. A message goes to every
//! enabled rule whose FROM matches (each rule checks its own filter without
//! allocating; a topic index can come when rule counts make it matter);
//! outputs come back tagged with the rule's id.

use std::sync::Arc;

use crate::rule::{CompiledRule, Output};

/// An output and the rule that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleOutput {
    /// The rule's id.
    pub rule: Arc<str>,
    /// What it produced.
    pub output: Output,
}

#[derive(Debug, Clone)]
struct Entry {
    id: Arc<str>,
    rule: CompiledRule,
    enabled: bool,
}

/// A set of rules, keyed by id.
#[derive(Debug, Clone, Default)]
pub struct Engine {
    rules: Vec<Entry>,
    scratch: Vec<Output>,
}

impl Engine {
    /// An engine with no rules.
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Add a rule, enabled, or replace the rule with the same id (whose
    /// state is dropped; the old rule is returned).
    pub fn insert(&mut self, id: &str, rule: CompiledRule) -> Option<CompiledRule> {
        match self.rules.iter_mut().find(|e| &*e.id == id) {
            Some(e) => Some(std::mem::replace(&mut e.rule, rule)),
            None => {
                self.rules.push(Entry {
                    id: id.into(),
                    rule,
                    enabled: true,
                });
                None
            }
        }
    }

    /// Remove a rule.
    pub fn remove(&mut self, id: &str) -> Option<CompiledRule> {
        let i = self.rules.iter().position(|e| &*e.id == id)?;
        Some(self.rules.remove(i).rule)
    }

    /// A rule by id.
    pub fn get(&self, id: &str) -> Option<&CompiledRule> {
        self.rules.iter().find(|e| &*e.id == id).map(|e| &e.rule)
    }

    /// Enable or disable a rule; disabling forgets its per-key state (a
    /// re-enabled rule starts fresh). Returns false for an unknown id.
    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> bool {
        let Some(e) = self.rules.iter_mut().find(|e| &*e.id == id) else {
            return false;
        };
        if e.enabled && !enabled {
            e.rule.reset_state();
        }
        e.enabled = enabled;
        true
    }

    /// Whether a rule is enabled (`None` for an unknown id).
    pub fn is_enabled(&self, id: &str) -> Option<bool> {
        self.rules.iter().find(|e| &*e.id == id).map(|e| e.enabled)
    }

    /// Rule ids in insertion order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|e| &*e.id)
    }

    /// Evaluate one message against every enabled rule.
    pub fn on_message(
        &mut self,
        topic: &str,
        payload: &serde_json::Value,
        ts_ms: i64,
    ) -> Vec<RuleOutput> {
        let mut out = Vec::new();
        for e in self.rules.iter_mut().filter(|e| e.enabled) {
            e.rule
                .on_message_into(topic, payload, ts_ms, &mut self.scratch);
            out.extend(self.scratch.drain(..).map(|output| RuleOutput {
                rule: e.id.clone(),
                output,
            }));
        }
        out
    }

    /// Advance every enabled rule's clock.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<RuleOutput> {
        let mut out = Vec::new();
        for e in self.rules.iter_mut().filter(|e| e.enabled) {
            e.rule.on_tick_into(now_ms, &mut self.scratch);
            out.extend(self.scratch.drain(..).map(|output| RuleOutput {
                rule: e.id.clone(),
                output,
            }));
        }
        out
    }

    /// The earliest time any enabled rule needs a tick.
    pub fn next_deadline(&self) -> Option<i64> {
        self.rules
            .iter()
            .filter(|e| e.enabled)
            .filter_map(|e| e.rule.next_deadline())
            .min()
    }
}
