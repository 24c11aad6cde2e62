//! Scheduled reports: per-tenant definitions (stored by `m2mhub-fleet`)
//! that, on a schedule in a time zone's wall-clock time or on request,
//! compute a table from stored data, render it as CSV and as a
//! self-contained HTML page with inline SVG charts, keep both under the
//! data directory for download, and deliver them by e-mail and webhook.
//!
//! # The model
//!
//! A run is a pure function of the definition, a period and the stored
//! data: [`content`] reads the time-series store (energy), the connection
//! history (availability) or the alarms (alarm summary) and returns a
//! [`content::Content`] — a table, its charts and a summary — which
//! [`render`] turns into text with no I/O. [`schedule`] is likewise free of
//! clocks: it maps an instant to the next run and a run to its period. The
//! [`Reports`] service is the thin driver that owns the clock, the files
//! and the deliveries ([`smtp`], the rule actions' signed webhooks).
#![forbid(unsafe_code)]

pub mod content;
pub mod render;
pub mod schedule;
mod service;
pub mod smtp;

pub use service::{default_retry_delays, validate_email, Reports, ReportsConfig, RunRequest};
pub use smtp::{SmtpConfig, SmtpSecurity};

use m2mhub_identity::RegistryError;

/// What can go wrong with a report, shaped for the API's answer.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The definition or request makes no sense (422 / 400).
    #[error("{0}")]
    Invalid(String),
    /// The report is running already (409).
    #[error("report {0} is running; try again when it has finished")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] RegistryError),
    #[error("time-series store: {0}")]
    Tsdb(#[from] m2mhub_tsdb::TsdbError),
    #[error("date arithmetic: {0}")]
    Time(#[from] jiff::Error),
    #[error("report files: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests;
