//! `m2mhub query …`: the telemetry API from the command line — a device's
//! latest values and series, raw points (one page, or every page with
//! `--all`), bucketed aggregates, a CSV export, the retention rules and the
//! store's figures.
//!
//! Arguments are checked in two steps before any request: clap parses each
//! value (a time, a duration, an aggregate function, a retention rule), so a
//! typo is refused naming its flag; then [`QueryCmd::check`] refuses bad
//! combinations with the fix. Both are usage errors (exit code 2). Times
//! travel as typed: the server resolves `now` and `-24h` on its own clock,
//! and following pages reuse the range it reports (`from_ms`, `to_ms`), so
//! every page reads the same range however long the walk takes.

use super::{enc, query as query_string, show, table, Conn, UsageError};
use crate::client::ApiClient;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use m2mhub_api::telemetry::{format_time, parse_duration_ms, parse_time};
use m2mhub_tsdb::AggFn;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

const TIME_FORMS: &str =
    "epoch ms, RFC 3339 (2026-11-21T10:00:00Z), now, or relative to now (-15m, -24h, -7d)";

#[derive(Subcommand, Debug)]
pub enum QueryCmd {
    /// The latest value of every metric of a device.
    Latest { device: String },
    /// The metrics a device has reported, with their kinds.
    Series { device: String },
    /// Raw points of one metric, oldest first: one page (followed by the
    /// --cursor of the next page, if any), or the whole range with --all.
    Raw(RawArgs),
    /// Per-bucket aggregates of one metric: of some devices (--device), of a
    /// group (--group), or of every device of a tenant that has the metric.
    Agg(AggArgs),
    /// CSV (ts_ms,time,value) of one metric over the whole range, to stdout
    /// or to --out FILE.
    Export(ExportArgs),
    /// Telemetry retention: show the default and the per-tenant/per-metric
    /// rules; `retention set` replaces the rules.
    Retention {
        #[command(subcommand)]
        cmd: Option<RetentionCmd>,
    },
    /// Time-series store and ingest figures.
    Stats,
}

/// `[--from T] [--to T]`: a half-open range, 24 hours up to now by default.
#[derive(Args, Debug)]
pub struct TimeRange {
    /// Start, inclusive (default: 24 h before --to). Epoch ms, RFC 3339,
    /// `now`, or relative to now such as -24h.
    #[arg(long, value_name = "TIME", value_parser = time_arg, allow_hyphen_values = true)]
    from: Option<String>,
    /// End, exclusive (default: now). Same forms as --from.
    #[arg(long, value_name = "TIME", value_parser = time_arg, allow_hyphen_values = true)]
    to: Option<String>,
}

#[derive(Args, Debug)]
pub struct RawArgs {
    device: String,
    /// Metric name; nested JSON fields are dotted (engine.rpm).
    metric: String,
    #[command(flatten)]
    range: TimeRange,
    /// Points per page (default 1000 on the server).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=m2mhub_tsdb::MAX_PAGE as u64))]
    limit: Option<u64>,
    /// Continue after the previous page: the --cursor printed under it.
    #[arg(long)]
    cursor: Option<String>,
    /// Follow every page to the end of the range.
    #[arg(long)]
    all: bool,
}

#[derive(Args, Debug)]
pub struct AggArgs {
    metric: String,
    /// Device id; repeatable or a comma list. Not with --group.
    #[arg(long = "device", value_name = "ID", value_delimiter = ',')]
    devices: Vec<String>,
    /// Every device of this group (of --tenant).
    #[arg(long)]
    group: Option<String>,
    /// The tenant of --group, or whose devices to aggregate (default: the
    /// default tenant, or your own). Not with --device: devices carry theirs.
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    range: TimeRange,
    /// Bucket width: 30s, 5m, 1h, 1d, 1w or milliseconds.
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    bucket: String,
    /// Aggregate functions, repeatable or a comma list (default: all of them).
    #[arg(
        long = "fn",
        value_name = "FN",
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(AggFn::ALL.map(AggFn::name))
    )]
    fns: Vec<String>,
    /// Merge the devices into one series (device `*`).
    #[arg(long)]
    combine: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    device: String,
    metric: String,
    #[command(flatten)]
    range: TimeRange,
    /// Write the CSV to this file (replaced whole, never left half-written)
    /// instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum RetentionCmd {
    /// Show the default and the rules (what `query retention` alone does).
    Show,
    /// Replace every per-tenant/per-metric rule: list all the rules to keep.
    /// The default retention comes from the configuration (retention_days).
    Set {
        /// tenant=T,metric=M,days=N, repeatable. Leave tenant or metric out
        /// to match any; days=forever keeps the matching points forever.
        #[arg(long = "rule", value_name = "RULE", value_parser = rule_arg)]
        rules: Vec<RetentionRule>,
        /// Remove every rule (only the default applies then).
        #[arg(long, conflicts_with = "rules")]
        clear: bool,
    },
}

/// One `--rule`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionRule {
    tenant: Option<String>,
    metric: Option<String>,
    /// `None`: forever.
    days: Option<u32>,
}

fn time_arg(s: &str) -> Result<String, String> {
    let now = super::now_ms();
    match parse_time(s, now) {
        Some(_) => Ok(s.to_string()),
        None => Err(format!("not a time; use {TIME_FORMS}")),
    }
}

fn duration_arg(s: &str) -> Result<String, String> {
    match parse_duration_ms(s) {
        Some(ms) if ms > 0 => Ok(s.to_string()),
        _ => Err("not a duration; use e.g. 30s, 5m, 1h, 1d, 1w or milliseconds".into()),
    }
}

fn rule_arg(s: &str) -> Result<RetentionRule, String> {
    let (mut tenant, mut metric, mut days) = (None, None, None);
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value; use tenant=T,metric=M,days=N"))?;
        let v = v.trim();
        match k.trim() {
            "tenant" => tenant = Some(v.to_string()),
            "metric" => metric = Some(v.to_string()),
            "days" => {
                days = Some(match v {
                    "forever" => None,
                    n => match n.parse::<u32>() {
                        Ok(n) if n > 0 => Some(n),
                        _ => {
                            return Err(format!(
                                "days={n:?}: give a number of days (at least 1) or forever"
                            ))
                        }
                    },
                })
            }
            other => {
                return Err(format!(
                    "unknown key {other:?}; the keys are tenant, metric and days"
                ))
            }
        }
    }
    let days = days.ok_or("every rule needs days=N or days=forever")?;
    Ok(RetentionRule {
        tenant: tenant.filter(|t| !t.is_empty()),
        metric: metric.filter(|m| !m.is_empty()),
        days,
    })
}

impl TimeRange {
    fn check(&self) -> Result<(), UsageError> {
        let now = super::now_ms();
        let at = |s: &Option<String>| s.as_deref().and_then(|s| parse_time(s, now));
        let to = at(&self.to).unwrap_or(now);
        if let Some(from) = at(&self.from) {
            if from >= to {
                return Err(UsageError(format!(
                    "--from ({}) must be before --to ({}){}",
                    format_time(from),
                    format_time(to),
                    if self.to.is_none() {
                        ", which defaults to now"
                    } else {
                        ""
                    }
                )));
            }
        }
        Ok(())
    }

    fn params(&self) -> [(&'static str, Option<String>); 2] {
        [("from", self.from.clone()), ("to", self.to.clone())]
    }
}

impl QueryCmd {
    /// Combinations clap cannot express with a helpful message.
    pub fn check(&self) -> Result<(), UsageError> {
        match self {
            QueryCmd::Raw(a) => a.range.check(),
            QueryCmd::Export(a) => a.range.check(),
            QueryCmd::Agg(a) => {
                if a.devices.iter().any(|d| d.trim().is_empty()) {
                    return Err(UsageError(
                        "--device: empty device id; give ids like --device a,b or --device a --device b"
                            .into(),
                    ));
                }
                if !a.devices.is_empty() && a.group.is_some() {
                    return Err(UsageError(
                        "--device and --group both choose the devices: give --device a,b for those devices, or --group G for every device of a group".into(),
                    ));
                }
                if !a.devices.is_empty() && a.tenant.is_some() {
                    return Err(UsageError(
                        "--tenant does not go with --device (each device carries its tenant): drop --tenant, or use --tenant with --group".into(),
                    ));
                }
                a.range.check()
            }
            QueryCmd::Retention {
                cmd: Some(RetentionCmd::Set { rules, clear }),
            } if rules.is_empty() && !clear => Err(UsageError(
                "nothing to set: give --rule tenant=T,metric=M,days=N (repeatable; list every rule to keep), or --clear to remove all rules".into(),
            )),
            _ => Ok(()),
        }
    }
}

pub async fn query_telemetry(conn: &Conn, cmd: QueryCmd, env: &[(String, String)]) -> Result<()> {
    cmd.check()?;
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        QueryCmd::Latest { device } => {
            let v = c
                .get(&format!("/api/v1/devices/{}/telemetry", enc(&device)))
                .await?
                .ok()?;
            table(&v, j, &["metric", "value", "time"]);
        }
        QueryCmd::Series { device } => {
            let v = c
                .get(&format!("/api/v1/devices/{}/series", enc(&device)))
                .await?
                .ok()?;
            table(&v, j, &["metric", "kind"]);
        }
        QueryCmd::Raw(a) => raw(&c, j, a).await?,
        QueryCmd::Agg(a) => agg(&c, j, a).await?,
        QueryCmd::Export(a) => export(&c, j, a).await?,
        QueryCmd::Retention { cmd } => {
            let v = match cmd {
                None | Some(RetentionCmd::Show) => {
                    c.get("/api/v1/telemetry/retention").await?.ok()?
                }
                Some(RetentionCmd::Set { rules, clear: _ }) => {
                    let rules: Vec<Value> = rules
                        .iter()
                        .map(|r| json!({"tenant": r.tenant, "metric": r.metric, "days": r.days}))
                        .collect();
                    c.request(
                        "PUT",
                        "/api/v1/telemetry/retention",
                        Some(&json!({ "rules": rules })),
                    )
                    .await?
                    .ok()?
                }
            };
            print_retention(&v, j);
        }
        QueryCmd::Stats => {
            let v = c.get("/api/v1/telemetry/stats").await?.ok()?;
            if j {
                show(&v, true);
            } else {
                show(&flatten(&v), false);
            }
        }
    }
    Ok(())
}

fn raw_path(device: &str, metric: &str) -> String {
    format!("/api/v1/devices/{}/telemetry/{}", enc(device), enc(metric))
}

async fn raw(c: &ApiClient, j: bool, a: RawArgs) -> Result<()> {
    let path = raw_path(&a.device, &a.metric);
    let limit = a.limit.map(|l| l.to_string());
    let mut params = a.range.params().to_vec();
    params.push(("limit", limit.clone()));
    params.push(("cursor", a.cursor));
    let mut v = c
        .get(&format!("{path}{}", query_string(&params)))
        .await?
        .ok()?;
    let range = |v: &Value| {
        (
            v["from_ms"].as_i64().unwrap_or_default(),
            v["to_ms"].as_i64().unwrap_or_default(),
        )
    };
    if a.all {
        let (from, to) = range(&v);
        let mut points = v["points"].as_array().cloned().unwrap_or_default();
        while let Some(cursor) = v["next"].as_str().map(str::to_string) {
            let q = query_string(&[
                ("from", Some(from.to_string())),
                ("to", Some(to.to_string())),
                ("limit", limit.clone()),
                ("cursor", Some(cursor.clone())),
            ]);
            v = c.get(&format!("{path}{q}")).await?.ok()?;
            if v["next"].as_str() == Some(cursor.as_str()) {
                bail!("the server returned the same page twice (cursor {cursor}); stopped");
            }
            points.extend(v["points"].as_array().cloned().unwrap_or_default());
        }
        v["points"] = Value::Array(points);
    }
    if j {
        show(&v, true);
        return Ok(());
    }
    let empty = Vec::new();
    let items: Vec<Value> = v["points"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|p| {
            let ts = p[0].as_i64().unwrap_or_default();
            json!({"ts_ms": ts, "time": format_time(ts), "value": p[1]})
        })
        .collect();
    table(
        &json!({ "items": items }),
        false,
        &["ts_ms", "time", "value"],
    );
    if let Some(next) = v["next"].as_str() {
        let (from, to) = range(&v);
        println!("(more: --cursor {next} --from {from} --to {to}, or --all for every page)");
    }
    Ok(())
}

async fn agg(c: &ApiClient, j: bool, a: AggArgs) -> Result<()> {
    let join = |l: &[String]| (!l.is_empty()).then(|| l.join(","));
    let mut params = vec![
        ("metric", Some(a.metric.clone())),
        ("device", join(&a.devices)),
        ("group", a.group),
        ("tenant", a.tenant),
        ("bucket", Some(a.bucket)),
        ("fn", join(&a.fns)),
        ("combine", a.combine.then(|| "true".to_string())),
    ];
    params.extend(a.range.params());
    let v = c
        .get(&format!(
            "/api/v1/telemetry/aggregate{}",
            query_string(&params)
        ))
        .await?
        .ok()?;
    if j {
        show(&v, true);
        return Ok(());
    }
    let fns: Vec<&str> = if a.fns.is_empty() {
        AggFn::ALL.iter().map(|f| f.name()).collect()
    } else {
        a.fns.iter().map(String::as_str).collect()
    };
    let mut items = Vec::new();
    for s in v["series"].as_array().into_iter().flatten() {
        for b in s["buckets"].as_array().into_iter().flatten() {
            let mut row = serde_json::Map::new();
            row.insert("device".into(), s["device"].clone());
            row.insert(
                "bucket".into(),
                json!(format_time(b["ts_ms"].as_i64().unwrap_or_default())),
            );
            for f in &fns {
                row.insert((*f).into(), json!(number_text(&b[*f])));
            }
            items.push(Value::Object(row));
        }
    }
    let mut cols = vec!["device", "bucket"];
    cols.extend(&fns);
    table(&json!({ "items": items }), false, &cols);
    Ok(())
}

/// An aggregate for a table: six decimals at most (`--json` has them all).
fn number_text(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x == 0.0 || x.abs() >= 1e-3 => {
            let s = format!("{x:.6}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        }
        Some(x) => format!("{x:.3e}"),
        None => match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        },
    }
}

async fn export(c: &ApiClient, j: bool, a: ExportArgs) -> Result<()> {
    let mut params = a.range.params().to_vec();
    params.push(("format", Some("csv".into())));
    params.push(("all", Some("true".into())));
    let body = c
        .get(&format!(
            "{}{}",
            raw_path(&a.device, &a.metric),
            query_string(&params)
        ))
        .await?
        .ok()?;
    // The client reads JSON; a CSV body stays the text it was.
    let Value::String(csv) = body else {
        bail!("the server did not answer with CSV");
    };
    let points = csv.lines().count().saturating_sub(1);
    match a.out {
        None => {
            let mut out = std::io::stdout().lock();
            match out.write_all(csv.as_bytes()).and_then(|_| out.flush()) {
                // `| head` closing the pipe is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(e).context("cannot write to stdout")
                }
                _ => {}
            }
        }
        Some(path) => {
            write_replacing(&path, csv.as_bytes())?;
            if j {
                show(
                    &json!({"file": path.display().to_string(), "points": points}),
                    true,
                );
            } else {
                println!("wrote {points} points to {}", path.display());
            }
        }
    }
    Ok(())
}

/// Write a sibling temporary file, then rename it over `path`: readers see
/// the old file or the whole new one, and a failed export leaves no
/// truncated CSV behind.
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("--out {}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

fn print_retention(v: &Value, j: bool) {
    if j {
        show(v, true);
        return;
    }
    let days = |d: &Value| match d.as_u64() {
        Some(1) => "1 day".to_string(),
        Some(n) => format!("{n} days"),
        None => "forever".into(),
    };
    println!("default: {}", days(&v["default_days"]));
    let rules = v["rules"].as_array().cloned().unwrap_or_default();
    if rules.is_empty() {
        println!("no per-tenant or per-metric rules");
        return;
    }
    let any = |x: &Value| x.as_str().unwrap_or("*").to_string();
    let items: Vec<Value> = rules
        .iter()
        .map(|r| json!({"tenant": any(&r["tenant"]), "metric": any(&r["metric"]), "keep": days(&r["days"])}))
        .collect();
    table(
        &json!({ "items": items }),
        false,
        &["tenant", "metric", "keep"],
    );
}

/// `{"a": 1, "ingest": {"b": 2}}` → `{"a": 1, "ingest.b": 2}`, for `show`.
fn flatten(v: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(map) = v.as_object() {
        for (k, val) in map {
            match val.as_object() {
                Some(inner) => {
                    for (k2, v2) in inner {
                        out.insert(format!("{k}.{k2}"), v2.clone());
                    }
                }
                None => {
                    out.insert(k.clone(), val.clone());
                }
            }
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        assert_eq!(
            rule_arg("tenant=acme,metric=temp,days=30"),
            Ok(RetentionRule {
                tenant: Some("acme".into()),
                metric: Some("temp".into()),
                days: Some(30)
            })
        );
        assert_eq!(
            rule_arg("metric=engine.rpm,days=forever"),
            Ok(RetentionRule {
                tenant: None,
                metric: Some("engine.rpm".into()),
                days: None
            })
        );
        assert!(rule_arg("tenant=acme").is_err_and(|e| e.contains("days")));
        assert!(rule_arg("days=0").is_err());
        assert!(rule_arg("days=7,color=red").is_err_and(|e| e.contains("color")));
    }

    #[test]
    fn times_and_buckets_are_checked_locally() {
        assert!(time_arg("-24h").is_ok());
        assert!(time_arg("2026-11-21T10:00:00Z").is_ok());
        assert!(time_arg("yesterday").is_err());
        assert!(duration_arg("1h").is_ok());
        assert!(duration_arg("0s").is_err());
        assert!(duration_arg("hourly").is_err());
    }

    #[test]
    fn numbers_for_tables() {
        assert_eq!(number_text(&json!(22.950000000000003)), "22.95");
        assert_eq!(number_text(&json!(60.0)), "60");
        assert_eq!(number_text(&json!(0.0)), "0");
        assert_eq!(number_text(&json!(0.00001234)), "1.234e-5");
        assert_eq!(number_text(&json!("NaN")), "NaN");
    }

    #[test]
    fn stats_flatten_one_level() {
        assert_eq!(
            flatten(&json!({"series": 2, "ingest": {"points": 5}})),
            json!({"series": 2, "ingest.points": 5})
        );
    }
}
