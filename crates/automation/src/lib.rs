//! The rule service: where the rule engine (`m2mhub-rules`, sans-IO) meets
//! the running platform.
//!
//! * [`Automation`] subscribes to the broker's messages and the platform's
//!   events (device connected/disconnected, alarm changes), runs each
//!   tenant's rules on them, and ticks the rules' clocks;
//! * what fires runs the rule's actions (`actions.rs`): alarms with their
//!   lifecycle in fleet operations, device commands (MQTT 5 correlation data,
//!   status tracked to answered or timed out), desired configuration as
//!   retained messages, republish, signed webhooks (`webhook.rs`), logs;
//! * it implements [`RuleService`] (`control.rs`), which the HTTP API calls,
//!   so rules created over HTTP are validated (line and column of a
//!   mistake) and take effect at once;
//! * security events (`security.rs`) raise alarms and feed the rules on
//!   `$events/security/<kind>`, where a `ban` action can answer them;
//! * [`backtest`] replays stored readings through a rule's compiled plan
//!   on the data's own clock: what it would have fired, before it runs.
#![forbid(unsafe_code)]

pub mod actions;
pub mod backtest;
pub mod control;
pub mod security;
mod service;
pub mod webhook;

pub use control::{RuleProblem, RuleService};
pub use security::SecurityAlarms;
pub use service::{command_topic, response_topic, Automation, AutomationStats};
