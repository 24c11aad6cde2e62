//! `m2mhub rule …`: rule definitions (SQL and actions, see
//! `crates/rules/README.md` and `crates/automation/src/actions.rs`) and the
//! engine's counters for each rule.
//!
//! The SQL and the actions come from a flag or a file (`-`: stdin); the
//! actions are checked to be a JSON array before any request (a usage
//! error, exit code 2), what they mean is the server's call. A rule the
//! server refuses is reported like a compiler error: the message, its line
//! and column, and the SQL line with a caret under the column.

use super::{enc, fields, query, table, text, time_text, Conn, UsageError};
use crate::client::ApiClient;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum RuleCmd {
    /// List rules with how often each fired and failed.
    List {
        /// Only this tenant's rules (platform users; default: all).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// A rule's definition and the engine's counters.
    Show { id: String },
    /// Create a rule; the server checks its SQL and actions first.
    Add(AddArgs),
    /// Change a rule: only the given parts change (SQL and actions are
    /// checked again as a whole).
    Set(SetArgs),
    /// Run a disabled rule again.
    Enable { id: String },
    /// Stop running a rule (it stays defined).
    Disable { id: String },
    /// Delete a rule; it stops at once.
    Delete { id: String },
    /// What a rule would have done over stored telemetry: every fire,
    /// repeat and clear with the actions it would have run (nothing is
    /// executed). A stored rule by id (`--sql`/`--actions` try a change
    /// first), or new SQL.
    Backtest(BacktestArgs),
}

#[derive(Args, Debug)]
pub struct BacktestArgs {
    /// A stored rule (else give --sql or --sql-file).
    id: Option<String>,
    /// The SQL and actions to try (default: the stored rule's; actions
    /// default to none for new SQL).
    #[command(flatten)]
    text: RuleText,
    /// Start of the range: epoch ms, RFC 3339, or relative (`-24h`).
    #[arg(long, default_value = "-24h")]
    from: String,
    /// End of the range (default: now).
    #[arg(long, default_value = "now")]
    to: String,
    /// Only this device (repeatable; default: every device of the tenant).
    #[arg(long = "device", value_name = "ID")]
    devices: Vec<String>,
    /// The tenant whose telemetry is replayed (platform users; default:
    /// the rule's, or the default tenant).
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Args, Debug)]
pub struct AddArgs {
    #[arg(long)]
    name: String,
    /// The rule, e.g. "SELECT * FROM 'devices/+/telemetry' WHERE temperature > 85".
    #[arg(
        long,
        required_unless_present = "sql_file",
        conflicts_with = "sql_file"
    )]
    sql: Option<String>,
    /// Read the SQL from this file (`-`: stdin).
    #[arg(long, value_name = "FILE")]
    sql_file: Option<PathBuf>,
    /// A JSON array of actions, e.g.
    /// '[{"type":"alarm","alarm_type":"hot","severity":"major"}]' (default: none).
    #[arg(long, value_name = "JSON", value_parser = actions_arg, conflicts_with = "actions_file")]
    actions: Option<Value>,
    /// Read the actions (a JSON array) from this file (`-`: stdin).
    #[arg(long, value_name = "FILE")]
    actions_file: Option<PathBuf>,
    /// Rule id (generated when absent).
    #[arg(long)]
    id: Option<String>,
    /// The tenant the rule belongs to (platform users; default: the default tenant).
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    description: Option<String>,
    /// Store the rule without running it (`rule enable` starts it).
    #[arg(long)]
    disabled: bool,
}

/// A rule's SQL and actions, each from a flag or a file; any may be
/// absent (what is absent stays as stored).
#[derive(Args, Debug)]
pub struct RuleText {
    #[arg(long, conflicts_with = "sql_file")]
    sql: Option<String>,
    /// Read the SQL from this file (`-`: stdin).
    #[arg(long, value_name = "FILE")]
    sql_file: Option<PathBuf>,
    /// A JSON array of actions; replaces all of them (`[]`: none).
    #[arg(long, value_name = "JSON", value_parser = actions_arg, conflicts_with = "actions_file")]
    actions: Option<Value>,
    /// Read the actions (a JSON array) from this file (`-`: stdin).
    #[arg(long, value_name = "FILE")]
    actions_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    id: String,
    #[command(flatten)]
    text: RuleText,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    description: Option<String>,
}

/// `--actions` (and the text of `--actions-file`): JSON, and an array
/// (each element is the server's to check).
fn actions_arg(s: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_array() {
        return Err(
            "must be a JSON array of actions, e.g. '[{\"type\":\"log\",\"level\":\"warn\"}]'"
                .into(),
        );
    }
    Ok(v)
}

/// The text of `--<flag> FILE`; `-` is stdin.
fn read_text(flag: &str, path: &Path) -> Result<String, UsageError> {
    let read = if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map(|_| s)
    } else {
        std::fs::read_to_string(path)
    };
    read.map_err(|e| UsageError(format!("--{flag} {}: cannot read: {e}", path.display())))
}

/// The SQL of `--sql` or `--sql-file`, if either was given.
fn sql_from(sql: Option<String>, file: Option<PathBuf>) -> Result<Option<String>, UsageError> {
    match (sql, file) {
        (Some(s), _) => Ok(Some(s)),
        (None, Some(p)) => read_text("sql-file", &p).map(Some),
        (None, None) => Ok(None),
    }
}

/// The actions of `--actions` or `--actions-file`, if either was given.
fn actions_from(
    actions: Option<Value>,
    file: Option<PathBuf>,
) -> Result<Option<Value>, UsageError> {
    match (actions, file) {
        (Some(a), _) => Ok(Some(a)),
        (None, Some(p)) => {
            let text = read_text("actions-file", &p)?;
            actions_arg(&text)
                .map(Some)
                .map_err(|e| UsageError(format!("--actions-file {}: {e}", p.display())))
        }
        (None, None) => Ok(None),
    }
}

pub async fn rule(conn: &Conn, cmd: RuleCmd, env: &[(String, String)]) -> Result<()> {
    let c = conn.client(env)?;
    let j = conn.json;
    match cmd {
        RuleCmd::List { tenant } => {
            let v = c
                .get(&format!("/api/v1/rules{}", query(&[("tenant", tenant)])))
                .await?
                .ok()?;
            if j {
                return print_json(&v);
            }
            let items: Vec<Value> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    json!({
                        "id": r["id"], "name": r["name"], "tenant": r["tenant"],
                        "enabled": r["enabled"],
                        "fired": r["counters"]["fired"], "failed": r["counters"]["failed"],
                        "sql": one_line(r["sql"].as_str().unwrap_or_default()),
                    })
                })
                .collect();
            table(
                &json!({ "items": items }),
                false,
                &["id", "name", "tenant", "enabled", "fired", "failed", "sql"],
            );
        }
        RuleCmd::Show { id } => {
            let v = c.get(&rule_path(&id)).await?.ok()?;
            print_rule(&v, j)?;
        }
        RuleCmd::Add(a) => {
            let sql = sql_from(a.sql, a.sql_file)?.unwrap_or_default();
            let actions = actions_from(a.actions, a.actions_file)?.unwrap_or_else(|| json!([]));
            let body = json!({
                "id": a.id, "tenant": a.tenant, "name": a.name,
                "description": a.description.unwrap_or_default(),
                "sql": sql, "actions": actions, "enabled": !a.disabled,
            });
            let v = submit(&c, "POST", "/api/v1/rules", &body, Some(&sql)).await?;
            print_rule(&v, j)?;
        }
        RuleCmd::Set(a) => {
            let sql = sql_from(a.text.sql, a.text.sql_file)?;
            let mut body = Map::new();
            if let Some(s) = &sql {
                body.insert("sql".into(), json!(s));
            }
            if let Some(acts) = actions_from(a.text.actions, a.text.actions_file)? {
                body.insert("actions".into(), acts);
            }
            if let Some(n) = a.name {
                body.insert("name".into(), json!(n));
            }
            if let Some(d) = a.description {
                body.insert("description".into(), json!(d));
            }
            if body.is_empty() {
                return Err(UsageError(
                    "nothing to change: give --sql (or --sql-file), --actions (or --actions-file), --name or --description".into(),
                )
                .into());
            }
            let v = submit(
                &c,
                "PUT",
                &rule_path(&a.id),
                &Value::Object(body),
                sql.as_deref(),
            )
            .await?;
            print_rule(&v, j)?;
        }
        RuleCmd::Enable { id } => {
            let v = c
                .post(&format!("{}/enable", rule_path(&id)), &json!({}))
                .await?
                .ok()?;
            done(&v, j, &format!("enabled rule {id}"))?;
        }
        RuleCmd::Disable { id } => {
            let v = c
                .post(&format!("{}/disable", rule_path(&id)), &json!({}))
                .await?
                .ok()?;
            done(&v, j, &format!("disabled rule {id}"))?;
        }
        RuleCmd::Backtest(a) => {
            let sql = sql_from(a.text.sql, a.text.sql_file)?;
            if a.id.is_none() && sql.is_none() {
                return Err(UsageError(
                    "give a stored rule's id, or the rule's --sql (or --sql-file)".into(),
                )
                .into());
            }
            let mut body = Map::new();
            body.insert("from".into(), json!(a.from));
            body.insert("to".into(), json!(a.to));
            if let Some(id) = &a.id {
                body.insert("rule_id".into(), json!(id));
            }
            if let Some(s) = &sql {
                body.insert("sql".into(), json!(s));
            }
            if let Some(acts) = actions_from(a.text.actions, a.text.actions_file)? {
                body.insert("actions".into(), acts);
            }
            if !a.devices.is_empty() {
                body.insert("devices".into(), json!(a.devices));
            }
            if let Some(t) = a.tenant {
                body.insert("tenant".into(), json!(t));
            }
            let v = submit(
                &c,
                "POST",
                "/api/v1/rules/backtest",
                &Value::Object(body),
                sql.as_deref(),
            )
            .await?;
            print_backtest(&v, j)?;
        }
        RuleCmd::Delete { id } => {
            c.delete(&rule_path(&id)).await?.ok()?;
            if !j {
                println!("deleted rule {id}");
            }
        }
    }
    Ok(())
}

fn rule_path(id: &str) -> String {
    format!("/api/v1/rules/{}", enc(id))
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn done(v: &Value, j: bool, message: &str) -> Result<()> {
    if j {
        print_json(v)
    } else {
        println!("{message}");
        Ok(())
    }
}

/// Create or change a rule. A refusal with a position (422 with `line` and
/// `column`) becomes an error that shows where, under the SQL we sent.
async fn submit(
    c: &ApiClient,
    method: &str,
    path: &str,
    body: &Value,
    sql: Option<&str>,
) -> Result<Value> {
    let r = c.request(method, path, Some(body)).await?;
    if r.status == 422 {
        if let Some(line) = r.body.get("line").and_then(Value::as_u64) {
            let column = r.body.get("column").and_then(Value::as_u64).unwrap_or(1);
            let detail = r.body["detail"].as_str().unwrap_or("invalid rule");
            bail!(
                "the server refused the rule: {detail} (422)\n{}",
                locate(sql, line, column)
            );
        }
    }
    r.ok()
}

/// Where a fault is, compiler style:
///
/// ```text
///  --> line 1, column 8
///   |
/// 1 | SELECT frobnicate(x) FROM 'a'
///   |        ^
/// ```
///
/// Positions are 1-based, columns in characters. Without the SQL (it was
/// not changed) or past its end, only the position.
fn locate(sql: Option<&str>, line: u64, column: u64) -> String {
    let at = format!("line {line}, column {column}");
    let number = line.to_string();
    let gutter = " ".repeat(number.len());
    let Some(src) = sql
        .and_then(|s| s.lines().nth(usize::try_from(line).ok()?.checked_sub(1)?))
        .map(|l| l.trim_end_matches('\r'))
    else {
        return format!("{gutter}--> {at}");
    };
    // At most just past the line's end; tabs stay tabs so the caret lines
    // up however the terminal shows them.
    let before = usize::try_from(column.saturating_sub(1))
        .unwrap_or(usize::MAX)
        .min(src.chars().count());
    let pad: String = src
        .chars()
        .take(before)
        .map(|ch| if ch == '\t' { '\t' } else { ' ' })
        .collect();
    format!("{gutter}--> {at}\n{gutter} |\n{number} | {src}\n{gutter} | {pad}^")
}

/// SQL on one table line: whitespace runs (newlines too) become one space.
fn one_line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The counters the engine reports, in reading order (others follow).
const COUNTERS: [&str; 9] = [
    "received",
    "matched",
    "fired",
    "cleared",
    "failed",
    "late",
    "last_error",
    "action_failures",
    "last_action_error",
];

fn print_rule(v: &Value, j: bool) -> Result<()> {
    if j {
        return print_json(v);
    }
    let sql = v["sql"].as_str().unwrap_or_default();
    let actions: Vec<String> = v["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(Value::to_string)
        .collect();
    fields(&[
        ("id", text(&v["id"])),
        ("name", text(&v["name"])),
        ("tenant", text(&v["tenant"])),
        ("enabled", text(&v["enabled"])),
        ("description", text(&v["description"])),
        ("created", time_text(&v["created_ms"])),
        ("updated", time_text(&v["updated_ms"])),
        ("sql", sql.trim().to_string()),
        (
            "actions",
            if actions.is_empty() {
                "none".into()
            } else {
                actions.join("\n")
            },
        ),
    ]);
    println!();
    let Some(counters) = v["counters"].as_object() else {
        println!("counters: none (the rule service does not run this rule)");
        return Ok(());
    };
    println!("counters (since the rule was last changed or the server started):");
    let mut rows: Vec<(&str, String)> = COUNTERS
        .iter()
        .filter_map(|k| counters.get(*k).map(|c| (*k, counter_text(c))))
        .collect();
    for (k, c) in counters {
        if !COUNTERS.contains(&k.as_str()) && k != "enabled" {
            rows.push((k.as_str(), counter_text(c)));
        }
    }
    let rows: Vec<(String, String)> = rows
        .into_iter()
        .map(|(k, c)| (format!("  {k}"), c))
        .collect();
    fields(&rows);
    Ok(())
}

/// The totals, then one line per output: time, event, device, the SELECT
/// row and what the actions would have done.
fn print_backtest(v: &Value, j: bool) -> Result<()> {
    if j {
        return print_json(v);
    }
    println!(
        "{} messages from {} devices ({} points), {} to {}: fired {}, repeated {}, cleared {}, failed {}",
        text(&v["messages"]),
        text(&v["devices"]),
        text(&v["points"]),
        time_text(&v["from_ms"]),
        time_text(&v["to_ms"]),
        text(&v["fired"]),
        text(&v["repeated"]),
        text(&v["cleared"]),
        text(&v["failed"]),
    );
    if let Some(e) = v["last_error"].as_str() {
        println!("last error: {e}");
    }
    let items: Vec<Value> = v["firings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let actions: Vec<&str> = f["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["summary"].as_str())
                .collect();
            json!({
                "time": time_text(&f["ts_ms"]), "event": f["event"], "device": f["device"],
                "row": f["row"].to_string(), "actions": actions.join("; "),
            })
        })
        .collect();
    if !items.is_empty() {
        println!();
        table(
            &json!({ "items": items }),
            false,
            &["time", "event", "device", "row", "actions"],
        );
    }
    if v["truncated"] == json!(true) {
        println!(
            "(only the first {} outputs are listed)",
            text(&v["max_listed"])
        );
    }
    Ok(())
}

/// A number, or `{ts_ms, error}` as "TIME: error".
fn counter_text(c: &Value) -> String {
    match (c.get("ts_ms"), c.get("error")) {
        (Some(ts), Some(e)) => format!("{}: {}", time_text(ts), text(e)),
        _ => text(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carets_sit_under_the_column() {
        assert_eq!(
            locate(Some("SELECT frobnicate(x) FROM 'a'"), 1, 8),
            " --> line 1, column 8\n  |\n1 | SELECT frobnicate(x) FROM 'a'\n  |        ^"
        );
        let sql = "SELECT *\nFROM 'a'\n\tWHERE ä > = 1";
        let out = locate(Some(sql), 3, 10);
        assert!(
            out.ends_with("3 | \tWHERE ä > = 1\n  | \t        ^"),
            "{out}"
        );
        // Past the end of the line (the fault is the missing rest).
        assert!(locate(Some("SELECT"), 1, 7).ends_with("1 | SELECT\n  |       ^"));
        // No SQL sent, or a line it does not have: the position alone.
        assert_eq!(locate(None, 2, 3), " --> line 2, column 3");
        assert_eq!(locate(Some("SELECT"), 4, 1), " --> line 4, column 1");
        // A column past the end: the caret just after the line.
        assert!(locate(Some("SELECT"), 1, 99).ends_with("  |       ^"));
    }

    #[test]
    fn actions_must_be_a_json_array() {
        assert!(actions_arg(r#"[{"type":"log"}]"#).is_ok());
        assert!(actions_arg("[]").is_ok());
        assert!(actions_arg(r#"{"type":"log"}"#).is_err_and(|e| e.contains("array")));
        assert!(actions_arg("[{type:log}]").is_err_and(|e| e.starts_with("not JSON")));
    }

    #[test]
    fn sql_fits_one_table_line() {
        assert_eq!(
            one_line("SELECT *\n  FROM 'a'\n\tWHERE x > 1\n"),
            "SELECT * FROM 'a' WHERE x > 1"
        );
    }
}
