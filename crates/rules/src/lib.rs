//! The rule engine core: SQL rules over the message stream, sans-IO.
//!
//! # Model
//!
//! A rule is written in SQL the way EMQX and AWS IoT rules are, extended
//! with the windows of Azure Stream Analytics and with durations:
//!
//! ```sql
//! SELECT device, avg(temperature) AS t
//! FROM 'devices/+/telemetry'
//! GROUP BY device, TUMBLING(10s)
//! HAVING avg(temperature) > 85 FOR 30s OR max(vibration) > 7
//! CLEAR WHEN avg(temperature) < 75
//! ```
//!
//! [`CompiledRule::compile`] parses the text with `sqlparser` (after a
//! token pass for durations, `FOR` and `CLEAR WHEN`, see `parse.rs`),
//! type-checks it and compiles it into a plan of resolved field paths,
//! aggregate slots and timer slots (`compile.rs`, `plan.rs`); a rule that
//! does not compile is refused with a line, column and reason.
//!
//! At run time the caller feeds [`CompiledRule::on_message`] (topic,
//! decoded JSON payload, timestamp) and [`CompiledRule::on_tick`] (the
//! clock) and gets [`Output`]s: `Fire` when a key's condition becomes true,
//! `Repeat` while it stays true, `Clear` when it stops. No clocks, no I/O:
//! time is whatever the caller says, so tests step it by hand. Per-key
//! state (windows in `window.rs`, FOR timers, zscore baselines in
//! `anomaly.rs`) lives inside the rule. A message that fails (a missing
//! field, a wrong type) is counted in [`Counters`] and the rule goes on.
//! An [`Engine`] holds many rules by id and routes messages to them.
//!
//! The full language is described in `crates/rules/README.md`.

#![forbid(unsafe_code)]

mod aggregate;
mod anomaly;
mod compile;
mod duration;
mod engine;
mod error;
mod eval;
pub mod fuzz;
mod geo;
mod parse;
mod plan;
mod rule;
mod topic;
mod value;
mod window;

pub use engine::{Engine, RuleOutput};
pub use error::{CompileError, CompileErrorKind, EvalError, Position};
pub use plan::RuleKind;
pub use rule::{CompiledRule, Counters, LastError, Limits, Output, OutputKind, WindowBounds};
pub use topic::TopicFilter;

#[cfg(test)]
mod tests;
