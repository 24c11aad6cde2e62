//! What the platform's other surfaces (the HTTP API, the CLI through it)
//! need from the rule service. The API holds a `dyn RuleService`: it calls
//! down into automation, never the reverse, and tests can run the API
//! without an engine.

use serde_json::Value;

/// What the HTTP API needs from the rules engine.
pub trait RuleService: Send + Sync {
    /// Check a rule before it is stored: parse and type-check the SQL,
    /// check the actions.
    fn validate(&self, tenant: &str, sql: &str, actions: &Value) -> Result<(), RuleProblem>;
    /// The rule changed (or was deleted: it is then no longer in the
    /// fleet operations): pick up its current definition.
    fn reload(&self, rule_id: &str);
    /// The rule's counters (matched, fired, failed, last error…), if the
    /// engine runs it.
    fn counters(&self, rule_id: &str) -> Option<Value>;
    /// Send a command to a device: record it with
    /// `Fleet::create_command` and publish it; returns the command's id.
    /// The error is shown to the operator (422).
    fn send_command(
        &self,
        tenant: &str,
        device: &str,
        name: &str,
        params: Value,
        timeout_ms: u64,
        origin: &str,
    ) -> Result<String, String>;
    /// Service counters for `/metrics`: `(name, help, value)`, rendered
    /// as `m2mhub_rules_<name>_total`.
    fn metrics(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
}

/// Why the rule service refused a rule, and where (1-based positions in
/// the SQL text, when known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RuleProblem {
    pub message: String,
    pub line: Option<u64>,
    pub column: Option<u64>,
}
